"""``GET /metrics``: who may read it, the store's numbers, and the exposition.

A scrape asks the policy (admins, the ``--metrics-token``, or the operator with sign-in
off), reads the task counts on the store's reader connection, then renders in a worker
thread (in multi-process mode that reads every process's files): the event loop never
waits on either. The metrics themselves are in :mod:`hitl.metrics`.
"""

from __future__ import annotations

import asyncio

from quart import Quart

from . import metrics, policy
from .accounts import Identity
from .lifecycle import attach
from .models import Status
from .store import Store

STATUSES = tuple(status.value for status in Status)


class Exporter:
    """Answers scrapes; ``app.extensions["metrics"]``."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def init_app(self, app: Quart) -> None:
        attach(app, "metrics", self, self.start, self.close)

    async def start(self) -> None:
        await asyncio.to_thread(metrics.forget_dead_processes)

    async def close(self) -> None:
        pass

    async def scrape(self, *, by: Identity) -> tuple[bytes, str]:
        """The metrics in the Prometheus text format, and its content type."""
        policy.can_read_metrics(by).require()
        counts = await self.store.status_counts()
        body = await asyncio.to_thread(metrics.exposition, counts, STATUSES)
        return body, metrics.CONTENT_TYPE
