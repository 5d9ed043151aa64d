"""A worker's progress reports, passed on to a task's watchers at a bounded rate."""

from __future__ import annotations

import asyncio
import math
import time

from .processors import Progress

# Progress reports are passed on at a bounded rate (see :class:`Coalescer`).
PROGRESS_INTERVAL = (0.25, 10.0)  # seconds between stored reports: at first, at most
PROGRESS_SLOWDOWN = 40.0  # the interval is the report stream's age over this, in between


class Coalescer:
    """A worker's progress reports, passed on to the task's watchers at a bounded rate.

    Each report goes through the tracker's reporter: a ``running`` message, stored, then
    published, so a worker sending hundreds a second would fill the journal. Here only
    the latest report waits (memory: one report per job), and one is passed on at most
    every interval, which starts at 0.25 s and grows with the stream's age (its age over
    40, up to 10 s): about 40 messages in the first 10 s, 150 in the first 10 min, then 6
    a minute. A report that comes within the interval is held and the latest one is
    passed on when it ends; the completion drops what is held (the output follows).
    """

    def __init__(self, report: Progress) -> None:
        self.report = report
        self.loop = asyncio.get_running_loop()
        self.held: tuple[float, str] | None = None
        self.first: float | None = None  # when the first report was passed on
        self.last = -math.inf
        self.timer: asyncio.TimerHandle | None = None

    def __call__(self, fraction: float, partial_output: str) -> None:
        self.held = (fraction, partial_output)
        if self.timer is not None:  # one is due: it takes the latest
            return
        now = time.monotonic()
        due = self.last + self.interval(now)
        if now >= due:
            self.flush()
        else:
            self.timer = self.loop.call_later(due - now, self.flush)

    def interval(self, now: float) -> float:
        low, high = PROGRESS_INTERVAL
        age = 0.0 if self.first is None else now - self.first
        return min(max(low, age / PROGRESS_SLOWDOWN), high)

    def flush(self) -> None:
        self.timer = None
        if self.held is None:
            return
        (fraction, partial_output), self.held = self.held, None
        self.last = time.monotonic()
        if self.first is None:
            self.first = self.last
        self.report(fraction, partial_output)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.held = None, None
