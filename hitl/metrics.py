"""Prometheus metrics: the one registry, every metric object, and their exposition.

The only module that imports ``prometheus_client``. Other modules record through the
small functions below, each a few attribute look-ups and a lock (about a microsecond),
called per commit, per subscription or per decision, never per watcher of a message.
Tasks by status are read from the store at each scrape (:mod:`hitl.exporter`) and
handed to :func:`exposition`, so they are the database's numbers, not a process's.

Multi-process mode (``hitl serve --workers N``, or several processes on one host): with
``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory before the processes start, each
process writes its values to files there, and a scrape answered by any of them adds
them up (``MultiProcessCollector``): counters and histograms sum over every process
that has run since the directory was emptied, and the open-streams gauge over the live
ones only (``livesum``; a process that ends is forgotten by :func:`process_exited`, or
at the next start-up by :func:`forget_dead_processes`).

With ``--workers`` (:mod:`hitl.supervisor`) the parent makes a fresh directory for its
children when none is set, and calls :func:`process_exited` for each child that ends.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping

# prometheus_client picks its storage when it is first imported: an unusable directory is
# found here first, and then start-up stops with one line (:func:`check_multiprocess_dir`).
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
MULTIPROCESS_PROBLEM: str | None = None
UNUSABLE_DIR = ""
if MULTIPROCESS_DIR is not None:
    try:
        os.makedirs(MULTIPROCESS_DIR, exist_ok=True)
        if not os.access(MULTIPROCESS_DIR, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as exc:
        MULTIPROCESS_PROBLEM = f"{exc.strerror or exc}"
        UNUSABLE_DIR, MULTIPROCESS_DIR = MULTIPROCESS_DIR, None
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]  # so that importing hitl still works

from prometheus_client import (  # noqa: E402  (after the directory check above)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402

from .errors import StartupError  # noqa: E402

# The classic text format, which every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The *_created series: noise to a scraper, and absent in multi-process mode.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
if MULTIPROCESS_DIR is None:  # (in multi-process mode only the directory's files count)
    ProcessCollector(registry=REGISTRY)

# A review waits from seconds (a reviewer at the page) to days (a holiday).
WAIT_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400,
                172800, 604800, float("inf"))
# A group commit of SQLite in WAL mode: a fraction of a millisecond to a slow disk's seconds.
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                 5, 10, float("inf"))

OUTCOMES = ("approved", "rejected", "timed_out")
LEASE_KINDS = ("job", "flow")

DECISIONS = Counter(
    "hitl_decisions_total",
    "Attempts decided, by outcome: approved, rejected (a reviewer's veto or rejection), "
    "timed_out (the review timeout decided, whatever its on_timeout)",
    ["outcome"], registry=REGISTRY)
REVIEW_WAIT = Histogram(
    "hitl_review_wait_seconds",
    "Time from an attempt going up for review to its decision being stored",
    buckets=WAIT_BUCKETS, registry=REGISTRY)
OPEN_STREAMS = Gauge(
    "hitl_open_streams",
    "Open subscriptions to task messages: the SSE streams /stream and /stream/<id>, and "
    "the pages' live updates",
    registry=REGISTRY, multiprocess_mode="livesum")
WATCHERS_DROPPED = Counter(
    "hitl_watchers_dropped_total",
    "Watchers dropped for lagging behind (--queue-size, --queue-bytes); they reconnect "
    "with Last-Event-ID and catch up", registry=REGISTRY)
STORE_WRITE = Histogram(
    "hitl_store_write_seconds",
    "Time to commit one batch of changes (a group commit of one or more) to the store",
    buckets=WRITE_BUCKETS, registry=REGISTRY)
WEBHOOK_DELIVERIES = Counter(
    "hitl_webhook_deliveries_total",
    "Webhook events delivered: the endpoint answered 2xx", registry=REGISTRY)
WEBHOOK_FAILURES = Counter(
    "hitl_webhook_failures_total",
    "Webhook delivery tries that failed (another status, no answer in time, no "
    "connection); each is tried again until --webhook-retry-for", registry=REGISTRY)
WEBHOOK_SKIPPED = Counter(
    "hitl_webhook_skipped_total",
    "Webhook events given up on after --webhook-retry-for seconds of failed tries",
    registry=REGISTRY)
LEASES_TAKEN_OVER = Counter(
    "hitl_leases_taken_over_total",
    "Leases that ran out and were taken over, by kind: job (an external worker's lease on "
    "an attempt, claimed by another worker), flow (a process's lease on a task's flow, "
    "taken over by another process)",
    ["kind"], registry=REGISTRY)

# Every series present from the start, at 0: a rate() over a series that appears later
# misses its first increase.
_DECIDED = {outcome: DECISIONS.labels(outcome) for outcome in OUTCOMES}
_TAKEN_OVER = {kind: LEASES_TAKEN_OVER.labels(kind) for kind in LEASE_KINDS}


def decided(outcome: str, waited: float) -> None:
    """An attempt's decision is stored: ``approved``, ``rejected`` or ``timed_out``, after
    ``waited`` seconds up for review."""
    _DECIDED[outcome].inc()
    REVIEW_WAIT.observe(max(waited, 0.0))


def stream_opened() -> None:
    OPEN_STREAMS.inc()


def stream_closed() -> None:
    OPEN_STREAMS.dec()


def watchers_dropped(count: int) -> None:
    WATCHERS_DROPPED.inc(count)


def store_written(seconds: float) -> None:
    """One commit (or failed try) of the journal's writer took ``seconds``."""
    STORE_WRITE.observe(seconds)


def webhook_delivered() -> None:
    WEBHOOK_DELIVERIES.inc()


def webhook_failed() -> None:
    WEBHOOK_FAILURES.inc()


def webhook_skipped() -> None:
    WEBHOOK_SKIPPED.inc()


def lease_taken_over(kind: str) -> None:
    """A lease ran out and another holder took it: ``job`` or ``flow``."""
    _TAKEN_OVER[kind].inc()


class TaskCounts(Collector):
    """``hitl_tasks``: the stored tasks by status, as read for this one scrape."""

    def __init__(self, counts: Mapping[str, int], statuses: Iterable[str]) -> None:
        self.counts = counts
        self.statuses = tuple(statuses)

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("hitl_tasks", "Stored tasks by status (read from the "
                                   "store at each scrape)", labels=["status"])
        for status in self.statuses:
            family.add_metric([status], self.counts.get(status, 0))
        yield family


def exposition(counts: Mapping[str, int], statuses: Iterable[str]) -> bytes:
    """Every metric in the text format: this process's (or, in multi-process mode, every
    process's, read from their files) and the task counts given. Reads files in
    multi-process mode: call it off the event loop."""
    registry = CollectorRegistry(auto_describe=False)
    if MULTIPROCESS_DIR is None:
        registry.register(REGISTRY)
    else:
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    registry.register(TaskCounts(counts, statuses))
    return generate_latest(registry)


def check_multiprocess_dir() -> None:
    """At start-up: raise StartupError (one line) if the multi-process directory is unusable."""
    if MULTIPROCESS_PROBLEM is not None:
        raise StartupError(f"PROMETHEUS_MULTIPROC_DIR={UNUSABLE_DIR!r} is not a usable "
                           f"directory: {MULTIPROCESS_PROBLEM}")


def process_exited(pid: int, directory: str | None = None) -> None:
    """A process of this host's fleet has ended: its live gauges stop counting.
    ``directory``: the fleet's, when it is not this process's own (the parent of
    ``hitl serve --workers`` makes one for its children)."""
    directory = directory or MULTIPROCESS_DIR
    if directory is not None:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_LIVE_FILE = re.compile(r"gauge_live\w*?_(\d+)\.db$")


def forget_dead_processes() -> None:
    """At start-up, before serving: forget the live gauges of processes that are gone
    (killed before they could say so), and zero this one's, which a process killed with
    the same pid left behind (pid 1 in a container, every time)."""
    if MULTIPROCESS_DIR is None:
        return
    OPEN_STREAMS.set(0)
    for path in glob.glob(os.path.join(MULTIPROCESS_DIR, "gauge_live*_*.db")):
        match = _LIVE_FILE.search(path)
        if match and not _running(int(match[1])):
            process_exited(int(match[1]))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        pass
    return True
