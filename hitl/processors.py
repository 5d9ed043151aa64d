"""Processors: the work a task's attempt does before a human reviews it.

A processor is any callable taking a :class:`Job` and returning the output text, either
directly (run in a worker thread, so it may block) or as an awaitable (awaited on the
event loop, so it must not block). Name one with ``--processor package.module:callable``.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, cast

from .errors import ConfigError
from .models import Review


class Progress(Protocol):
    """Report partial progress; safe to call from a worker thread; never blocks."""

    def __call__(self, fraction: float, partial_output: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class Job:
    """What one attempt of a processor gets."""

    task_input: str
    attempt: int
    reviews: tuple[Review, ...]
    report: Progress
    delay: float = 0.0  # the configured HITL_PROCESS_DELAY, for simulated processors
    task_id: str = ""  # whose attempt: an external worker's job is keyed by it
    previous_output: str | None = None  # the attempt before's output: what was rejected

    @property
    def last_comment(self) -> str:
        return self.reviews[-1].comment if self.reviews else ""


Processor = Callable[[Job], "str | Awaitable[str]"]
EXTERNAL = "external"  # --processor external: each attempt is a job for a worker (hitl.work)


class Pool(Protocol):
    """What runs an attempt's processing for a flow: in-process (:class:`ProcessorPool`)
    or as a job an external worker claims (:class:`hitl.work.ExternalPool`)."""

    busy: int

    async def run(self, job: Job) -> str: ...

    def shutdown(self) -> None: ...


async def simulate(job: Job) -> str:
    """The built-in processor: works for ``delay`` seconds in four reported steps.

    With no delay there is no work to watch, so it reports no steps.
    """
    steps = 4
    for step in range(1, steps + 1 if job.delay > 0 else 1):
        await asyncio.sleep(job.delay / steps)
        job.report(step / steps, f"step {step} of {steps}")
    output = f"Processed {job.task_input!r} (attempt {job.attempt})"
    if job.last_comment:
        output += f", revised for the comment {job.last_comment!r}"
    return output


class ProcessorPool:
    """Runs a processor: awaited if async, else in a worker thread the runner owns.

    Its own executor (not the loop's default one) lets shutdown abandon a processor
    still blocking in its thread instead of waiting for it at interpreter exit.
    """

    def __init__(self, processor: Processor, threads: int | None = None) -> None:
        self.processor = processor
        self.is_async = is_async(processor)
        self.busy = 0  # processors running in a thread right now (even if abandoned)
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="hitl-processor")

    async def run(self, job: Job) -> str:
        if self.is_async:
            result = await cast(Awaitable[object], self.processor(job))
        else:
            loop = asyncio.get_running_loop()
            # in the flow's context, as asyncio.to_thread does: its log records name the task
            result = await loop.run_in_executor(self._executor, contextvars.copy_context().run,
                                                self._call, job)
        if not isinstance(result, str):
            raise TypeError(f"processor returned {type(result).__name__}, not str")
        return result

    def _call(self, job: Job) -> object:
        with self._lock:
            self.busy += 1
        try:
            return self.processor(job)
        finally:
            with self._lock:
                self.busy -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def is_async(processor: Processor) -> bool:
    call = getattr(processor, "__call__", None)  # noqa: B004 - callable instances too
    return inspect.iscoroutinefunction(processor) or inspect.iscoroutinefunction(call)


def load_processor(spec: str) -> Processor:
    """Import ``package.module:callable``, or stop start-up with a one-line reason."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"--processor {spec!r} must look like 'package.module:callable'")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load processor {spec!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"processor {spec!r} is not callable")
    return cast(Processor, target)
