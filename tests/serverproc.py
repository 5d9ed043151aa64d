"""A ``hitl serve`` subprocess on a free port, for restart, crash and signal tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    db: Path
    python: str = sys.executable
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    stderr: Path | None = None  # where its stderr goes alone (else into the log, with stdout)
    database: str | None = None  # --db, when not the file ``db`` (a postgresql:// URL)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.python, "-m", "hitl", "serve", "--port", str(self.port),
                "--db", self.database or str(self.db), *self.extra]

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HITL_PROCESS_DELAY": "0",
               "HITL_RETRY_WAIT": "0", "HITL_AUTH": "none", **self.env}
        with (open(self.db.with_suffix(f".{self.port}.log"), "ab") as log,  # the child keeps it
              open(self.stderr or os.devnull, "ab") as errors):
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=env, stdout=log,
                                         stderr=errors if self.stderr else subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("server did not start: " + self.log())

    def log(self) -> str:
        paths = (self.db.with_suffix(f".{self.port}.log"), self.stderr)
        return "".join(path.read_text(errors="replace") for path in paths
                       if path is not None and path.exists())

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def run_cli(*args: str, python: str = sys.executable, timeout: float = 30,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "hitl", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, input=stdin,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
