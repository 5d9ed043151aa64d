"""Limits of what the API takes, shared by the server (:mod:`hitl.schemas`) and the
programs that talk to it (``hitl worker``), which must not load the server to know them."""

from __future__ import annotations

MAX_TEXT = 200_000  # characters of a task's input or output, or of a partial output
MAX_INTEGER = 2**63 - 1  # SQLite's largest: beyond it a query cannot even be asked
# The external-work API (hitl.work): a worker claims a job under a lease, then reports on it.
MAX_WORKER = 100  # characters of a worker's name
MAX_LEASE = 3600  # seconds
MAX_WAIT = 60  # seconds a claim may wait for a job (a long poll)
MAX_LEASE_ID = 100
MAX_ERROR = 20_000  # characters of a worker's error
