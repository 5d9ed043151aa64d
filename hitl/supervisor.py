"""``hitl serve --workers N``: N ``hitl serve`` processes on one listening socket, kept by a
parent that starts, restarts and stops them.

Why not hypercorn's own workers: each child must be a whole ``hitl serve`` (its start-up
checks, its store and broker, the shutdown of :mod:`hitl.server` that ends streams
first), and the parent must pass signals on and notice a death. So the parent binds the
socket once (a restarting child leaves connections queued in its backlog, not refused),
and each child serves it as ``fd://N`` (hypercorn's binding for an inherited socket).

The parent runs the start-up steps once before any child (migration, the first admin and
its one-time link, printed once), gives the children a fresh ``PROMETHEUS_MULTIPROC_DIR``
when none is set, so that ``/metrics`` on any of them adds up all of them, and marks each
child that ends as gone there, so the open-streams gauge counts live processes only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType

from . import cli, logs, metrics
from .config import Config, env_var
from .errors import StartupError

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.5  # seconds before restarting a child that died; doubles while it keeps dying
MAX_BACKOFF = 30.0
STEADY = 30.0  # a child that lived this long was healthy: its next death starts the backoff over
STARTUP = 10.0  # a first start that ends with status 2 this soon is a start-up error: stop
POLL = 0.1  # seconds between looks at the children


@dataclass
class Child:
    """One slot of the fleet and the process in it now (None while waiting to restart)."""

    slot: int
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    starts: int = 0
    deaths: int = 0  # in a row, each soon after its start: the backoff's exponent
    restart_at: float = 0.0


def run(config: Config, flags: Mapping[str, str | None]) -> int:
    """Serve ``config`` with ``config.workers`` children until SIGTERM or SIGINT.

    ``flags`` are the settings given on the command line, as typed: the children get
    them as ``HITL_*`` variables (a flag wins over the environment, so the same wins
    there), and out of ``ps``, where a ``--secret-key`` would show.
    """
    logs.configure(config.log_level, config.log_format)
    cli.check_workers(config)
    cli.prepare_server(config)  # once, before the children: migration, the first admin
    sock = listen(config)  # (as one process alone: the database first, then the port)
    directory, made = metrics.MULTIPROCESS_DIR, False
    if directory is None:
        directory, made = tempfile.mkdtemp(prefix="hitl-metrics-"), True
    env = {**os.environ, **{env_var(name): raw for name, raw in flags.items() if raw is not None},
           "HITL_WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": directory}
    fleet = Fleet(config, sock, env, directory)
    try:
        return fleet.run()
    finally:
        sock.close()
        if made:
            shutil.rmtree(directory, ignore_errors=True)


def listen(config: Config) -> socket.socket:
    """The one listening socket, bound as ``hitl serve`` alone would bind it."""
    host = config.host.strip("[]")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer)
        sock.bind((host, config.port))
        sock.listen(config.backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {config.host}:{config.port}: "
                           f"{exc.strerror or exc}") from None
    return sock


class Fleet:
    """The children and the loop that keeps them: restart the dead, stop on a signal."""

    def __init__(self, config: Config, sock: socket.socket, env: dict[str, str],
                 directory: str) -> None:
        self.config = config
        self.sock = sock
        self.env = env
        self.directory = directory
        self.children = [Child(slot) for slot in range(1, config.workers + 1)]
        self.signals: list[int] = []

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self.on_signal)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            for child in self.children:
                self.start(child)
            log.info("hitl on http://%s:%s: %d workers (pids %s), database %s, broker %s",
                     self.config.host, self.config.port, len(self.children),
                     ", ".join(str(c.proc.pid) for c in self.children if c.proc),
                     cli.safe_url(self.config.db), cli.safe_url(self.config.broker))
            while not self.signals:
                status = self.look()
                if status is not None:
                    self.stop()
                    return status
                time.sleep(POLL)
            self.stop()
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Pass the signal on (a second one too: the children then exit at once)."""
        if not self.signals:
            log.info("signal %s: stopping %d workers", signal.Signals(signum).name,
                     len(self.children))
        self.signals.append(signum)
        for child in self.children:
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.proc.pid, signum)

    def start(self, child: Child) -> None:
        fd = self.sock.fileno()
        command = [sys.executable, "-m", "hitl", "serve", "--workers", "1",
                   "--listen-fd", str(fd)]
        child.proc = subprocess.Popen(command, env=self.env, pass_fds=(fd,),
                                      preexec_fn=die_with_parent)
        child.started = time.monotonic()
        child.starts += 1

    def look(self) -> int | None:
        """Restart children that ended; an exit status to stop with, on a start-up error."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None:
                if now >= child.restart_at:
                    self.start(child)
                continue
            status = child.proc.poll()
            if status is None:
                continue
            metrics.process_exited(child.proc.pid, self.directory)
            lived = now - child.started
            if child.starts == 1 and status == 2 and lived < STARTUP:
                log.error("worker %d stopped at start-up (exit status 2, its reason above): "
                          "stopping", child.slot)
                return 2
            child.deaths = 1 if lived >= STEADY else child.deaths + 1
            wait = min(FIRST_BACKOFF * 2 ** (child.deaths - 1), MAX_BACKOFF)
            log.warning("worker %d (pid %d) exited with %s after %.1f s: restarting it in "
                        "%.1f s", child.slot, child.proc.pid, describe(status), lived, wait)
            child.proc, child.restart_at = None, now + wait
        return None

    def stop(self) -> None:
        """SIGTERM to every child not yet told, then wait for them, bounded (each drains
        its connections for up to ``--shutdown-timeout``); SIGKILL for what is left."""
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        if not self.signals:  # stopping on our own (a start-up error): tell them
            for proc in live:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + self.config.shutdown_timeout + 10.0
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d still running after shutdown: killed", proc.pid)
                proc.kill()
                proc.wait()
        for child in self.children:
            if child.proc is not None:
                metrics.process_exited(child.proc.pid, self.directory)


def describe(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-status).name
    return f"exit status {status}"


def die_with_parent() -> None:
    """In the child, before it runs: SIGTERM it when the parent dies (even by SIGKILL), so
    no child serves on unsupervised. Linux only (prctl); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
