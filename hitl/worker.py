"""``hitl worker``: a processor run outside the service, on jobs claimed over HTTP.

Any processor that runs in-process runs here unchanged: it gets the same
:class:`~hitl.processors.Job` (real :class:`~hitl.models.Review` objects, a ``report``
callable from any thread) and is called the same way (awaited if async, else in a thread).

Each of ``concurrency`` slots long-polls ``/api/work/claim``, runs the job, and sends
``/complete`` (or ``/fail`` with the processor's error). While it runs, the latest
``report`` goes out as ``/progress`` (a few a second at most: later reports replace an
unsent one) and a heartbeat renews the lease when a third of it has passed. A 409 drops
the job: an async processor is cancelled; a thread cannot be stopped, so it is abandoned
(logged) and its result ignored, and the slot's next job runs in a fresh thread of its own
(:mod:`hitl.job_runner`): it never waits behind the abandoned one.

On SIGTERM or SIGINT the worker stops claiming and gives its jobs ``grace`` seconds to
finish. A job still running then is given back (``/release``): queued again at once for
another worker, and it costs no try (a ``/fail`` would). A second signal gives back at
once. A claim cut short by the signal is given back by the service if its answer had
not gone out; one answered just then waits out its lease, then goes to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .job_runner import JobRunner
from .limits import MAX_ERROR, MAX_TEXT
from .processors import Job, Processor
from .work_client import Away, Backoff, Claimed, Lost, Refused, WorkClient

log = logging.getLogger("hitl.worker")

PROGRESS_EVERY = 0.25  # seconds between one job's progress requests: at most 4 a second
MIN_RENEW = 0.2  # never renew more often than this, however short the lease
ABANDONED_PER_SLOT = 4  # threads of dropped jobs running on, per slot, before claims wait


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    token: str | None
    name: str
    concurrency: int = 1
    lease: float | None = None  # None: the service's --lease
    grace: float = 25.0
    wait: float = 60.0  # the claim's long poll


class LatestReport:
    """The latest unsent ``report`` of one job: later ones replace it, so memory stays flat.

    ``report`` may be called from the processor's thread; it never blocks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.changed = asyncio.Event()
        self._lock = threading.Lock()
        self._latest: tuple[float, str] | None = None

    def __call__(self, fraction: float, partial_output: str = "") -> None:
        fraction = float(fraction)
        fraction = min(max(fraction, 0.0), 1.0) if math.isfinite(fraction) else 0.0
        with self._lock:
            first, self._latest = self._latest is None, (fraction, str(partial_output))
        if first:
            self.loop.call_soon_threadsafe(self.changed.set)

    @property
    def pending(self) -> bool:
        return self._latest is not None

    def take(self) -> tuple[float, str] | None:
        with self._lock:
            latest, self._latest = self._latest, None
            self.changed.clear()
        return latest


class Held:
    """A job in hand: when to renew it, and a lock that keeps its requests in order."""

    def __init__(self, claimed: Claimed, lease: float | None) -> None:
        self.claimed = claimed
        self.lease = lease
        self.lock = asyncio.Lock()
        self.renew_at = 0.0
        self.report_after = 0.0  # no progress is sent before this (monotonic) time
        self.done = False  # the service has taken its complete or fail
        self.refused: set[str] = set()  # actions refused (logged once)
        self.renewed(claimed.lease_left)

    def renewed(self, left: float) -> None:
        left = self.lease if self.lease is not None else left
        self.renew_at = time.monotonic() + max(left / 3, MIN_RENEW)


class Worker:
    """Claims jobs and runs ``processor`` on them, ``settings.concurrency`` at a time."""

    def __init__(self, processor: Processor, settings: Settings) -> None:
        self.settings = settings
        self.runner = JobRunner(processor, limit=ABANDONED_PER_SLOT * settings.concurrency)
        self.client = WorkClient(settings.url, settings.token, settings.concurrency)
        self.stopping = asyncio.Event()
        self.now = asyncio.Event()  # a second signal: give back without waiting
        self.fatal: str | None = None
        self.claims: set[asyncio.Task[Claimed | None]] = set()
        self.jobs: set[Held] = set()
        self.sent: Counter[str] = Counter()  # requests about jobs, by action

    async def run(self) -> int:
        """Work until stopped (0) or refused by the service (2)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop, signal.Signals(signum).name)
        log.info("worker %s: claiming from %s, %d at a time", self.settings.name,
                 self.settings.url, self.settings.concurrency)
        slots = [asyncio.create_task(self.slot()) for _ in range(self.settings.concurrency)]
        try:
            await self.stopping.wait()
            for claim in self.claims:
                claim.cancel()
            await self.wind_down(slots)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.client.close()
        return 2 if self.fatal else 0

    def stop(self, reason: str = "signal") -> None:
        if self.stopping.is_set():
            log.info("worker %s: second %s: giving back jobs now", self.settings.name, reason)
            self.now.set()
            return
        log.info("worker %s: %s: stopping; %d job(s) in hand get %.0f s to finish",
                 self.settings.name, reason, len(self.jobs), self.settings.grace)
        self.stopping.set()

    async def wind_down(self, slots: list[asyncio.Task[None]]) -> None:
        """Let running jobs finish within the grace period, then give the rest back."""
        all_done = asyncio.gather(*slots, return_exceptions=True)
        now = asyncio.ensure_future(self.now.wait())
        either: list[asyncio.Future[Any]] = [all_done, now]
        await asyncio.wait(either, timeout=self.settings.grace,
                           return_when=asyncio.FIRST_COMPLETED)
        now.cancel()
        unfinished = [held for held in self.jobs if not held.done]
        all_done.cancel()  # cancels the slots still running a job
        await asyncio.gather(*slots, return_exceptions=True)
        await asyncio.gather(*(self.give_back(held) for held in unfinished))

    async def slot(self) -> None:
        """Claim, run, repeat, until stopping."""
        backoff = Backoff()
        while not self.stopping.is_set():
            if not await self.room():
                return
            claim = asyncio.create_task(self.client.claim(
                self.settings.name, self.settings.wait, self.settings.lease))
            self.claims.add(claim)
            asked = time.monotonic()
            try:
                claimed = await claim
            except asyncio.CancelledError:
                if self.stopping.is_set():
                    return
                raise
            except Away:
                await self.pause(backoff.next())
                continue
            except (Refused, Lost) as exc:
                if self.fatal is None:  # every slot hears it: one line
                    self.fatal = f"the service refuses claims ({exc}): is it run with " \
                                 "--processor external, and is the token a worker's?"
                    log.error("worker %s: %s", self.settings.name, self.fatal)
                self.stopping.set()
                return
            finally:
                self.claims.discard(claim)
            if claimed is None and time.monotonic() - asked < self.settings.wait / 2:
                await self.pause(backoff.next())  # an early 204 (the service stopping):
                continue  # never a loop of claims
            backoff.reset()
            if claimed is not None:
                held = Held(claimed, self.settings.lease)
                self.jobs.add(held)
                try:
                    await self.work(held)
                except Exception:  # a bug here must not cost the worker a slot
                    log.exception("%s: the worker failed on it", claimed.label)
                finally:
                    self.jobs.discard(held)

    async def room(self) -> bool:
        """Wait, before a claim, while too many abandoned threads run; False if stopping."""
        if self.runner.abandoned < self.runner.limit:
            return True
        log.warning("worker %s: %d abandoned threads still run: claiming waits until one "
                    "ends", self.settings.name, self.runner.abandoned)
        either = [asyncio.ensure_future(self.runner.room()),
                  asyncio.ensure_future(self.stopping.wait())]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in either:
                waiting.cancel()
        return not self.stopping.is_set()

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.stopping.wait()

    async def work(self, held: Held) -> None:
        """Run one job to its end: complete, fail, or dropped when lost."""
        claimed, started = held.claimed, time.monotonic()
        report = LatestReport(asyncio.get_running_loop())
        job = Job(claimed.task_input, claimed.attempt, claimed.reviews, report,
                  task_id=claimed.task_id, previous_output=claimed.previous_output)
        running = asyncio.ensure_future(self.runner.run(job))
        keeper = asyncio.create_task(self.keep(held, report))
        try:
            await asyncio.wait([running, keeper], return_when=asyncio.FIRST_COMPLETED)
            async with held.lock:  # no progress or heartbeat in flight past this point
                keeper.cancel()
            if not running.done():  # the keeper ended: the job was lost
                log.warning("%s: lost (%s): dropped", claimed.label, keeper.exception())
                return
            try:
                output = running.result()
            except Exception as exc:  # the processor's error: the service retries or fails
                log.warning("%s: processor raised %s: %s", claimed.label,
                            type(exc).__name__, exc)
                error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]  # a longer one is a 400
                answer = await self.finish(held, "fail", {"error": error})
                if answer is not None:
                    log.info("%s: failed; %s", claimed.label,
                             "the service retries it" if answer.get("retrying") else "task failed")
                return
            if await self.finish(held, "complete", {"output": output}) is not None:
                log.info("%s: completed in %.2f s", claimed.label, time.monotonic() - started)
        finally:
            running.cancel()  # an async processor stops; a thread is abandoned (logged)
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await keeper

    async def keep(self, held: Held, report: LatestReport) -> None:
        """Send the latest report (at most every PROGRESS_EVERY s) and heartbeats, each
        renewing the lease; return once the service says the job is lost."""
        while True:
            if report.pending:
                wake = min(held.report_after, held.renew_at)
                await asyncio.sleep(max(wake - time.monotonic(), 0))
            else:
                report.changed.clear()  # set again by the next report (on this loop)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(held.renew_at - time.monotonic(), 0)):
                        if not report.pending:
                            await report.changed.wait()
            async with held.lock:
                now = time.monotonic()
                if report.pending and now >= held.report_after:
                    fraction, text = report.take() or (0.0, "")
                    held.report_after = now + PROGRESS_EVERY
                    await self.renew(held, "progress", {"progress": fraction,
                                                        "partial_output": text[:MAX_TEXT]})
                elif now >= held.renew_at:
                    await self.renew(held, "heartbeat", self.lease_body())

    def lease_body(self) -> dict[str, float]:
        return {} if self.settings.lease is None else {"lease": self.settings.lease}

    async def renew(self, held: Held, action: str, body: dict[str, Any]) -> None:
        """One heartbeat or progress; while the service is away, try again soon."""
        self.sent[action] += 1
        try:
            held.renewed(await self.client.extend(held.claimed, action, body))
        except Away:
            held.renew_at = time.monotonic() + 1.0
        except Refused as exc:  # e.g. a partial output too large: the job goes on
            if action not in held.refused:  # one line per job, not one a second
                held.refused.add(action)
                log.warning("%s: %s refused: %s", held.claimed.label, action, exc)
            held.renew_at = time.monotonic() + 1.0

    async def finish(self, held: Held, action: str,
                     body: dict[str, Any]) -> dict[str, Any] | None:
        """``complete`` or ``fail``, retried while the service is away; None when lost."""
        backoff = Backoff()
        while True:
            self.sent[action] += 1
            try:
                answer = await self.client.finish(held.claimed, action, body)
                held.done = True
                return answer
            except Away:
                await asyncio.sleep(backoff.next())
            except Lost as exc:
                log.warning("%s: %s not taken (%s): dropped", held.claimed.label, action, exc)
                return None
            except Refused as exc:
                if action == "fail":
                    log.error("%s: fail refused: %s", held.claimed.label, exc)
                    return None
                action, body = "fail", {"error": f"the output was refused: {exc}"[:MAX_ERROR]}

    async def give_back(self, held: Held) -> None:
        """Release an unfinished job: queued again at once for another worker, as the same
        try (``/release``); if even that fails, its lease lapses."""
        self.sent["release"] += 1
        try:
            async with asyncio.timeout(5):
                await self.client.finish(held.claimed, "release", {})
            log.info("%s: given back", held.claimed.label)
        except (Away, Lost, Refused, TimeoutError) as exc:
            log.info("%s: left to its lease (%s)", held.claimed.label, exc or "timed out")
