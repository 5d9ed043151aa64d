"""``hitl serve --workers N``: refused without a shared database and broker; on PostgreSQL
and Redis, N children serve one port, a killed one is replaced, ``/metrics`` adds them up,
and a signal to the parent stops them all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from .serverproc import ROOT, free_port, run_cli

pytestmark = pytest.mark.slow  # server processes


def test_more_than_one_worker_on_sqlite_is_refused_with_one_line(tmp_path: Path) -> None:
    result = run_cli("serve", "--workers", "3", "--db", str(tmp_path / "hitl.db"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--workers 3 needs a shared database and broker" in result.stderr
    assert "--db postgresql://" in result.stderr and "--broker redis://" in result.stderr
    assert not (tmp_path / "hitl.db").exists()  # stopped before touching it


def test_more_than_one_worker_on_the_memory_broker_is_refused() -> None:
    result = run_cli("serve", "--workers", "2", "--db", "postgresql://nobody@127.0.0.1:1/x")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--workers 2 needs a shared database and broker" in result.stderr


def test_workers_on_a_database_that_cannot_be_reached_stop_with_one_line() -> None:
    result = run_cli("serve", "--workers", "2", "--db", "postgresql://nobody@127.0.0.1:1/x",
                     "--broker", "redis://127.0.0.1:1/0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("hitl: error: cannot use database"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # no child was started


def test_workers_on_a_port_in_use_stop_with_one_line(postgres_url: str, redis_url: str) -> None:
    pytest.importorskip("hitl.pg_store")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--workers", "2", "--db", postgres_url, "--broker", redis_url,
                         "--auth", "none", "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"hitl: error: cannot listen on 127.0.0.1:{port}: "
                                     "Address already in use"), result.stderr


def test_a_bad_broker_url_stops_start_up_with_one_line() -> None:
    result = run_cli("serve", "--broker", "redis://127.0.0.1:6379/zero")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--broker='redis://127.0.0.1:6379/zero' is not a valid broker URL" in result.stderr


class Fleet:
    """``hitl serve --workers N`` as a subprocess, and its children, found with psutil."""

    def __init__(self, db: str, broker: str, workers: int, log: Path) -> None:
        self.port = free_port()
        self.workers = workers
        self.log_path = log
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HITL_PROCESS_DELAY": "0",
               "HITL_AUTH": "none", "HITL_SHUTDOWN_TIMEOUT": "2"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the parent makes one for its children
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hitl", "serve", "--workers", str(workers),
                 "--port", str(self.port), "--db", db, "--broker", broker],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return [child for child in psutil.Process(self.proc.pid).children()
                    if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
        except psutil.NoSuchProcess:
            return []

    def wait_ready(self, timeout: float = 30) -> list[int]:
        """Until N children run and the port answers; their pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}: {self.log()}"
            pids = [child.pid for child in self.children()]
            if len(pids) == self.workers and self.log().count("Running on") >= self.workers:
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        return pids
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError("workers did not start: " + self.log())

    def stop(self) -> None:
        pids = [child.pid for child in self.children()]
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:  # (they would get SIGTERM from the parent's death; be sure)
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def fleet(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    pytest.importorskip("hitl.pg_store")
    fleet = Fleet(postgres_url, redis_url, 3, tmp_path / "fleet.log")
    try:
        yield fleet
    finally:
        fleet.stop()


def serving_pid(sock: socket.socket, pids: list[int], timeout: float = 5) -> int:
    """Which of ``pids`` holds the other end of the connection ``sock``."""
    here = sock.getsockname()[:2]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in pids:
            with_it = [c for c in psutil.Process(pid).net_connections("tcp")
                       if c.raddr and tuple(c.raddr) == here]
            if with_it:
                return pid
        time.sleep(0.02)
    raise AssertionError(f"no worker holds the connection from {here}")


def request(port: int, path: str) -> tuple[socket.socket, bytes]:
    """A GET on a connection of its own, kept open; the start of the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock, sock.recv(65536)


def spread(fleet: Fleet, pids: list[int], path: str, at_least: int, most: int = 300
           ) -> tuple[list[socket.socket], dict[int, int]]:
    """Open connections asking ``path`` until ``at_least`` of the workers hold one; the
    connections (still open) and how many each worker holds."""
    held: list[socket.socket] = []
    per: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(per) < at_least and len(held) < most and time.monotonic() < deadline:
        sock, answer = request(fleet.port, path)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        held.append(sock)
        pid = serving_pid(sock, pids)
        per[pid] = per.get(pid, 0) + 1
    return held, per


def test_the_workers_share_one_port_and_a_killed_one_is_replaced(fleet: Fleet) -> None:
    pids = fleet.wait_ready()
    held, per = spread(fleet, pids, "/healthz", at_least=3)
    for sock in held:
        sock.close()
    assert sorted(per) == sorted(pids), f"answered by {per} of {pids}"  # every one answers

    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = [child.pid for child in fleet.children()]
        if len(now) == 3 and pids[0] not in now:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the killed worker was not replaced: " + fleet.log())
    assert re.search(rf"worker \d \(pid {pids[0]}\) exited with SIGKILL", fleet.log())
    new = fleet.wait_ready()
    assert set(new) - set(pids)
    # the queued connections of the restart were not refused; the new one serves too
    held, per = spread(fleet, new, "/healthz", at_least=3)
    for sock in held:
        sock.close()
    assert sorted(per) == sorted(new)


def test_metrics_add_up_every_worker(fleet: Fleet) -> None:
    pids = fleet.wait_ready()
    streams, per = spread(fleet, pids, "/stream", at_least=2)  # the all-tasks stream
    try:
        for _ in range(10):  # each scrape on a new connection: any worker may answer
            body = httpx.get(fleet.url + "/metrics", headers={"Connection": "close"},
                             timeout=10).text
            assert f"hitl_open_streams {float(len(streams))}" in body, (per, body)
            assert "process_cpu_seconds_total" not in body  # multi-process mode
    finally:
        for sock in streams:
            sock.close()


def test_sigterm_to_the_parent_stops_every_worker(fleet: Fleet) -> None:
    pids = fleet.wait_ready()
    started = time.monotonic()
    fleet.proc.send_signal(signal.SIGTERM)
    code = fleet.proc.wait(20)
    assert code == 0, fleet.log()
    assert time.monotonic() - started < 10
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                    timeout=5)
    assert not alive, alive
    log = fleet.log()
    assert "second signal" not in log and "Traceback" not in log, log
    assert log.count("signal SIGTERM: shutting down") == 3, log


def test_workers_do_not_outlive_a_killed_parent(fleet: Fleet) -> None:
    pids = fleet.wait_ready()
    fleet.proc.kill()
    fleet.proc.wait(10)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)],
                                 timeout=15)
    assert not alive, alive
