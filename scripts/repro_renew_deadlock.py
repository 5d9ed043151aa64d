"""Repro: a flow-lease renewal and a journal commit touching the same tasks in another order
deadlock in PostgreSQL (one is aborted after deadlock_timeout, and every other commit of the
fleet waits behind the counter row meanwhile).

Process A owns tasks; process B commits a batch changing two of them (detached decisions, say)
in the order the changes came; A's renewal locks its rows in heap order. Run:
    python scripts/repro_renew_deadlock.py postgresql://postgres@127.0.0.1:5432/SOMEDB
"""

from __future__ import annotations

import asyncio
import sys
import time

from hitl.errors import StorageUnavailable
from hitl.models import Status, Task, TaskEvent
from hitl.pg_store import PostgresStore
from hitl.store import Write


def change(task: Task) -> Write:
    task.last_seq += 1
    task.updated_at = time.time()
    event = TaskEvent.create(task.task_id, task.last_seq, 0,
                             {"task_id": task.task_id, "status": task.status.value})
    return Write(task.row(), event)


async def main(url: str) -> None:
    a, b = PostgresStore(url, lease=3), PostgresStore(url, lease=3)
    await a.open()
    await b.open()
    tasks = [Task(f"t{n:03}", "x", status=Status.WAITING_FOR_REVIEW) for n in range(40)]
    for task in tasks:
        task.created_at = task.updated_at = time.time()
    await a.write([change(task) for task in tasks])  # A owns all 40
    deadlocks = {"renew": 0, "write": 0}
    started = time.monotonic()
    for round_ in range(200):
        batch = [change(task) for task in reversed(tasks)]  # B: the newest first

        async def renew() -> None:
            try:
                await a.renew()
            except Exception as exc:
                if "deadlock" in str(exc):
                    deadlocks["renew"] += 1
                else:
                    raise

        async def write(batch: list[Write]) -> None:
            try:
                await b.write(batch)
            except StorageUnavailable as exc:
                if "deadlock" not in str(exc):
                    raise
                deadlocks["write"] += 1
                for task in tasks:  # not stored: the copies go back
                    task.last_seq -= 1

        await asyncio.gather(renew(), write(batch))
        if sum(deadlocks.values()) >= 1:
            print('first deadlock at round', round_)
            break
    print(f"deadlocks in {time.monotonic() - started:.1f} s: {deadlocks}")
    await a.close()
    await b.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
