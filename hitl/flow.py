"""The review loop as a PocketFlow graph, one flow per task."""

from __future__ import annotations

from typing import Literal

from pocketflow import AsyncFlow

from .config import Config
from .nodes import ProcessNode, ResultNode, ReviewNode
from .processors import Pool

Step = Literal["process", "review", "result"]


def build_flow(config: Config, pool: Pool, start: Step = "process") -> AsyncFlow:
    """ProcessNode -> ReviewNode; approved -> ResultNode, rejected -> ProcessNode.

    ``start`` lets a task recovered after a restart resume where it stopped.
    """
    process = ProcessNode(pool, delay=config.process_delay, retries=config.retries,
                          wait=config.retry_wait)
    review = ReviewNode(max_attempts=config.max_attempts)
    result = ResultNode()

    process >> review
    review - "approved" >> result
    review - "rejected" >> process

    return AsyncFlow(start={"process": process, "review": review, "result": result}[start])
