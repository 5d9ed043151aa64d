"""schemathesis hooks for ``tests/test_openapi.py`` (``SCHEMATHESIS_HOOKS``): short requests."""

from __future__ import annotations

from typing import Any

import schemathesis

LONGEST_WAIT = 0.2  # seconds


@schemathesis.hook
def map_case(context: Any, case: schemathesis.Case) -> schemathesis.Case:
    """A valid claim waits a moment at most: a long poll of up to 60 s is valid, but would
    spend the run waiting (``tests/test_work.py`` tests the waiting). Invalid waits are
    sent as generated, to be refused."""
    body = case.body
    if case.operation.path == "/api/work/claim" and isinstance(body, dict):
        wait = body.get("wait")
        if type(wait) in (int, float) and 0 < wait <= 60:
            case.body = {**body, "wait": min(wait, LONGEST_WAIT)}
    return case
