"""The ``jobs`` table's statements (``--processor external``), and why a report was refused.

Every rule of the job queue is a condition in one of these statements, run in a write
transaction of the store: a claim takes the oldest job that is queued, or claimed under a
lease that has expired, of a task still running that attempt (``UPDATE ... WHERE ...
RETURNING``), so a second process sharing the database could not hand a job out twice. A
heartbeat, a progress report, a completion or a failure changes the job only while the
reporting worker's lease holds (:data:`HELD`); anything else is refused, and
:func:`refusal` says which condition failed. :mod:`hitl.work` runs them and does the
waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import Conflict, NotFound
from .models import TERMINAL, Status, iso

# A job for this attempt: new (try 1); or, after a failed try with tries left, the next
# try, queued again (both return the job's state); any other job (claimed, queued, done)
# is kept as it is (a restart), and returns nothing: JOB_STATE reads it.
ENQUEUE = """
    INSERT INTO jobs (task_id, attempt, state, tries, queued_at)
    VALUES (:task_id, :attempt, 'queued', 1, :now)
    ON CONFLICT (task_id, attempt) DO UPDATE SET
        state = 'queued', tries = jobs.tries + 1, queued_at = :now, worker = NULL,
        worker_user = NULL, lease_id = NULL, lease_seconds = NULL, lease_expires = NULL,
        claimed_at = NULL, error = NULL
     WHERE jobs.state = 'failed' AND jobs.tries < :retries
    RETURNING state, tries, output, error
"""
JOB_STATE = """SELECT state, tries, output, error FROM jobs
                WHERE task_id = :task_id AND attempt = :attempt"""
# A job a worker may take: queued, or claimed under an expired lease; of a task still
# running that attempt (a cancelled or finished task's job is never handed out).
_OPEN = "jobs.state IN ('queued', 'claimed')"  # as the partial index jobs_open: a claim
# reads the open jobs alone, however many done ones the table keeps
_TAKEABLE = f"""{_OPEN}
               AND (jobs.state = 'queued'
                    OR (jobs.lease_expires < :now AND jobs.tries < :retries))
               AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
                              AND tasks.attempt = jobs.attempt AND tasks.status = 'running')"""
_TASK = "FROM tasks WHERE tasks.task_id = jobs.task_id"
# The claim, and what its worker gets of the task, in one statement. ``taken_over`` is set
# from the job's old state: 1 when it was still claimed (under a lease that had expired),
# and then the claim is the job's next try. Which job is ``{pick}``: SQLite's one writer
# at a time picks by rowid; PostgreSQL's concurrent claims each lock the job they pick and
# pass over those locked by another (SKIP LOCKED), so two never take one job, and neither
# comes back empty while another job is free.
_CLAIM = f"""
    UPDATE jobs SET state = 'claimed', worker = :worker, worker_user = :user,
                    lease_id = :lease_id, lease_seconds = :lease,
                    lease_expires = CAST(:now AS DOUBLE PRECISION) + :lease, claimed_at = :now,
                    taken_over = CASE WHEN jobs.state = 'claimed' THEN 1 ELSE 0 END,
                    tries = jobs.tries + CASE WHEN jobs.state = 'claimed' THEN 1 ELSE 0 END
     WHERE {{pick}}
       AND {_TAKEABLE}
    RETURNING task_id, attempt, lease_expires, taken_over,
              (SELECT task_input {_TASK}) AS task_input, (SELECT title {_TASK}) AS title,
              (SELECT metadata {_TASK}) AS metadata
"""
_OLDEST = "ORDER BY queued_at, task_id, attempt LIMIT 1"
CLAIM = _CLAIM.format(pick=f"rowid = (SELECT rowid FROM jobs WHERE {_TAKEABLE} {_OLDEST})")
CLAIM_PG = _CLAIM.format(pick=f"""(task_id, attempt) IN (
        SELECT task_id, attempt FROM jobs WHERE {_TAKEABLE} {_OLDEST} FOR UPDATE SKIP LOCKED)""")
# The jobs of the given tasks whose try ended while their task still runs that attempt (a
# job failed because its task ended is the runner's to stop, not a try to retry).
ENDED_TRIES = """
    SELECT jobs.task_id AS task_id, jobs.attempt AS attempt, jobs.state AS state,
           jobs.tries AS tries, jobs.output AS output, jobs.error AS error
      FROM jobs JOIN tasks ON tasks.task_id = jobs.task_id AND tasks.attempt = jobs.attempt
     WHERE jobs.state IN ('done', 'failed') AND tasks.status = 'running'
       AND jobs.task_id IN (SELECT value FROM json_each(:ids))
"""
# Whether any job may be taken now (a shared store's periodic look, before it wakes a claim).
ANY_TAKEABLE = f"SELECT 1 FROM jobs WHERE {_TAKEABLE} LIMIT 1"
# A job whose every try ended with its worker gone (the lease expired, taken over up to
# --retries tries): it fails, as a try that raised would, and is not handed out again.
GIVE_UP = f"""
    UPDATE jobs SET state = 'failed',
                    error = 'its worker stopped reporting (the lease expired) on each of '
                            || tries || ' tries'
     WHERE {_OPEN} AND state = 'claimed' AND lease_expires < :now AND tries >= :retries
    RETURNING task_id, attempt, error
"""
# When the next lease that could be taken over expires (a waiting claim wakes then).
SOONEST_EXPIRY = f"""
    SELECT min(lease_expires) FROM jobs
     WHERE {_OPEN} AND state = 'claimed' AND EXISTS (
           SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
              AND tasks.attempt = jobs.attempt AND tasks.status = 'running')
"""
# The reporting worker's lease holds: its job, attempt, lease and user; not expired; and
# the task still running that attempt.
HELD = """task_id = :task_id AND attempt = :attempt AND state = 'claimed'
          AND lease_id = :lease_id AND worker_user IS :user AND lease_expires >= :now
          AND EXISTS (SELECT 1 FROM tasks WHERE tasks.task_id = jobs.task_id
                         AND tasks.attempt = jobs.attempt AND tasks.status = 'running')"""
EXTEND = f"""
    UPDATE jobs SET lease_expires = CAST(:now AS DOUBLE PRECISION) + coalesce(:lease, lease_seconds)
     WHERE {HELD} RETURNING lease_expires
"""
COMPLETE = f"UPDATE jobs SET state = 'done', output = :output WHERE {HELD} RETURNING tries"
FAIL = f"UPDATE jobs SET state = 'failed', error = :error WHERE {HELD} RETURNING tries"
GIVE_BACK = f"""
    UPDATE jobs SET state = 'queued', worker = NULL, worker_user = NULL, lease_id = NULL,
                    lease_seconds = NULL, lease_expires = NULL, claimed_at = NULL
     WHERE {HELD} RETURNING tries
"""
# Why a report was refused: the task, and its job for the reported attempt.
WHY = """
    SELECT tasks.status AS status, tasks.attempt AS task_attempt, jobs.state AS state,
           jobs.lease_id AS lease_id, jobs.worker_user AS worker_user,
           jobs.worker AS worker, jobs.lease_expires AS lease_expires
      FROM tasks LEFT JOIN jobs ON jobs.task_id = tasks.task_id AND jobs.attempt = :attempt
     WHERE tasks.task_id = :task_id
"""


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job as a claim answers it."""

    task_id: str
    attempt: int
    lease_id: str
    lease_expires: float
    task_input: str
    title: str
    metadata: dict[str, Any] | None
    reviews: list[dict[str, Any]]
    previous_output: str | None  # the attempt before's output: what the reviews are about

    def to_json(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "attempt": self.attempt, "lease_id": self.lease_id,
                "lease_expires": iso(self.lease_expires), "task_input": self.task_input,
                "title": self.title, "metadata": self.metadata, "reviews": self.reviews,
                "previous_output": self.previous_output}


def refusal(task_id: str, attempt: int, lease_id: str, user: str, row: Any,
            now: float) -> Exception:
    """Why a worker's report on a job was refused (``row``: :data:`WHY`'s, or None): the
    worker must drop the job."""
    if row is None:
        return NotFound(f"no task with id {task_id!r}")
    status = Status(row["status"])
    drop = "drop this job"
    if status in TERMINAL:
        return Conflict(f"task {task_id} is {status}: {drop}")
    if row["task_attempt"] != attempt:
        return Conflict(f"attempt {attempt} of task {task_id} is stale (the task is on "
                        f"attempt {row['task_attempt']}): {drop}")
    if status is not Status.RUNNING:
        return Conflict(f"attempt {attempt} of task {task_id} is no longer being processed "
                        f"(the task is {status}): {drop}")
    state = row["state"]
    if state is None:
        return Conflict(f"attempt {attempt} of task {task_id} is not external work: {drop}")
    if state == "done":
        return Conflict(f"attempt {attempt} of task {task_id} was already completed: {drop}")
    if state == "failed":
        return Conflict(f"this try of attempt {attempt} of task {task_id} was already "
                        f"reported failed: {drop}")
    if state == "queued":
        return Conflict(f"the lease of attempt {attempt} of task {task_id} ended; the job "
                        f"is back in the queue: {drop}")
    if row["lease_id"] == lease_id and row["worker_user"] != user:
        return Conflict(f"the lease of attempt {attempt} of task {task_id} is another "
                        f"user's, not yours: {drop}")
    if row["lease_id"] != lease_id:
        return Conflict(f"the lease of attempt {attempt} of task {task_id} was taken over by "
                        f"another worker ({row['worker']}): {drop}")
    if row["lease_expires"] < now:
        return Conflict(f"the lease of attempt {attempt} of task {task_id} expired at "
                        f"{iso(row['lease_expires'])}; another worker may take it: {drop}")
    return Conflict(f"attempt {attempt} of task {task_id} changed meanwhile: {drop}")
