"""The servers under test: each a subprocess on a free loopback port; start, stop, RSS.

Servers log to a file in their work directory (never a pipe, which would
block them when full) and run in their own session, so a Ctrl-C of the bench
reaches only the bench, which then stops them itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .client import HOST, request_json, use_token

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _hitl_base() -> list[str]:
    exe = VENV_BIN / "hitl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "hitl"]


def _hitl_command(port: int, db: Path) -> list[str]:
    return [*_hitl_base(), "serve", "--host", HOST, "--port", str(port), "--db", str(db)]


def _module_command(module: str) -> Callable[[int, Path], list[str]]:
    return lambda port, _db: [sys.executable, "-m", module, "--host", HOST, "--port", str(port)]


@dataclass(frozen=True)
class ServerSpec:
    name: str
    durable: bool  # keeps tasks and their messages across a restart (same --db)
    command: Callable[[int, Path], list[str]]
    env: Mapping[str, str] = field(default_factory=dict)
    about: str = ""
    signs_in: bool = False  # hitl with sign-in on: an admin and a token made before start


SPECS: dict[str, ServerSpec] = {
    "hitl": ServerSpec(
        "hitl",
        durable=True,
        command=_hitl_command,
        env={"HITL_PROCESS_DELAY": "0", "HITL_AUTH": "none"},  # the baselines sign no one in
        about="hitl serve (Quart on hypercorn, SQLite store in a temp dir)",
    ),
    "hitl-token": ServerSpec(
        "hitl-token",
        durable=True,
        command=_hitl_command,
        env={"HITL_PROCESS_DELAY": "0", "HITL_AUTH": "accounts"},
        about="hitl serve with sign-in on: every request carries an API token",
        signs_in=True,
    ),
    "asgi": ServerSpec(
        "asgi",
        durable=False,
        command=_module_command("bench.baselines.asgi_app"),
        about="(a) bare ASGI app on hypercorn, in memory",
    ),
    "fastapi": ServerSpec(
        "fastapi",
        durable=False,
        command=_module_command("bench.baselines.fastapi_app"),
        about="(b) FastAPI + sse-starlette on uvicorn, in memory",
    ),
}


def hitl_available() -> bool:
    """Whether ``hitl serve`` can be started here (console script or ``python -m hitl``)."""
    argv = [*_hitl_base(), "serve", "--help"]
    try:
        done = subprocess.run(argv, cwd=REPO, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc/*/stat."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    pids, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        pids += frontier
    return pids


def rss_bytes(pid: int) -> int:
    """VmRSS of a process and its descendants, from /proc/<pid>/status."""
    total = 0
    for one in _tree_pids(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


class Server:
    """One server under test. ``restart()`` keeps the port and the database file."""

    def __init__(self, spec: ServerSpec, workdir: Path) -> None:
        self.spec, self.workdir = spec, workdir
        self.port = free_port()
        self.db = workdir / f"{spec.name}.db"
        self.log_path = workdir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token: str | None = None  # with sign-in on: the API token every request sends

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    async def start(self, timeout: float = 60.0) -> float:
        """Start, then wait for ``GET /healthz`` to answer 200; returns the seconds taken."""
        t0 = time.perf_counter()
        env = {**os.environ, **self.spec.env, "PYTHONUNBUFFERED": "1"}
        use_token(self._token(env) if self.spec.signs_in else None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.spec.command(self.port, self.db),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited at start:\n{self.log_tail()}")
            try:
                status, _ = await request_json(self.port, "GET", "/healthz", timeout=5)
                if status == 200:
                    return time.perf_counter() - t0
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                pass
            await asyncio.sleep(0.05)
        await self.stop()
        raise RuntimeError(f"{self.spec.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def _token(self, env: Mapping[str, str]) -> str:
        """An admin's API token in this server's database, made once (a restart keeps it)."""
        if self.token is None:
            base = _hitl_base()
            db = ["--db", str(self.db)]
            subprocess.run([*base, "users", "add", "bench", "--role", "admin", *db], cwd=REPO,
                           env=env, check=True, capture_output=True, timeout=60)
            made = subprocess.run([*base, "tokens", "create", "--user", "bench", *db], cwd=REPO,
                                  env=env, check=True, capture_output=True, text=True, timeout=60)
            self.token = made.stdout.strip().splitlines()[-1]
        return self.token

    async def stop(self, timeout: float = 20.0) -> tuple[float, bool]:
        """SIGTERM, then SIGKILL after ``timeout``; returns (seconds to exit, exited gracefully)."""
        proc, t0 = self.proc, time.perf_counter()
        if proc is None or proc.poll() is not None:
            return 0.0, True
        proc.send_signal(signal.SIGTERM)
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                return time.perf_counter() - t0, True
            await asyncio.sleep(0.02)
        proc.kill()
        proc.wait(10)
        return time.perf_counter() - t0, False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"
