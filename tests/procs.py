"""Processors for tests that run hitl in a subprocess (``--processor tests.procs:gated``)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hitl.processors import Job


def gated(job: Job) -> str:
    """Blocks (in its worker thread) on inputs with 'hold' until the gate file exists.

    'hold later' blocks from the second attempt on.
    """
    gate = Path(os.environ.get("HITL_TEST_GATE", "/nonexistent"))
    job.report(0.1, "started")
    deadline = time.monotonic() + 60
    hold = "hold" in job.task_input and not ("later" in job.task_input and job.attempt == 1)
    while hold and not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    comment = job.reviews[-1].comment if job.reviews else ""
    return f"{job.task_input} (attempt {job.attempt}) {comment}".strip()


def echo(job: Job) -> str:
    """Returns the input unchanged: a large input makes an equally large output."""
    return job.task_input


def logged(job: Job) -> str:
    """Logs from its worker thread (the record should name the task), then echoes."""
    logging.getLogger("tests.procs").info("processing attempt %d", job.attempt)
    return job.task_input
