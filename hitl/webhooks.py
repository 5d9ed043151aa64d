"""Webhook endpoints: who is told of which task events, and how a delivery is signed.

The store's message log is the outbox: every change a webhook reports is already stored,
in the same commit as the change, as one message. An endpoint is a cursor into that log
(the last message it has handled) plus its URL, its events and its secret; the worker in
:mod:`hitl.delivery` moves each cursor on. Every rule lives in the store (a cursor moves
only by a conditional UPDATE from where it was), so a second process sharing the
database cannot move one twice. Its SQL sits here, on the store's own connections, like
:mod:`hitl.accounts`.

Deliveries follow Standard Webhooks (https://www.standardwebhooks.com): headers
``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` (``v1,`` and the base64
HMAC-SHA256 of ``<id>.<timestamp>.<body>``, keyed with the secret's base64-decoded bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import policy
from .accounts import Identity
from .errors import Invalid, NotFound
from .models import iso
from .store import NOW, Store

EVENTS = ("task.waiting_for_review", "task.vote", "task.completed", "task.failed",
          "task.cancelled", "task.timed_out")
SECRET_PREFIX = "whsec_"
SECRET_BYTES = (24, 64)  # the sizes Standard Webhooks asks of a secret
MAX_URL = 2000
RECENT_ATTEMPTS = 50  # attempts kept per endpoint, for `hitl webhooks list` and the API

# The statuses whose messages may be events: the rest (running, progress) are passed over
# in SQL, and each message's event type is found in SQL too, so a large output is never read.
_EVENT_STATUSES = "('waiting_for_review', 'completed', 'failed', 'cancelled', " \
                  "'processing_feedback')"
_EVENT_TYPE = """
    CASE WHEN {timed_out} THEN 'task.timed_out'
         WHEN messages.status = 'waiting_for_review' THEN
              CASE WHEN {votes} > 0 THEN 'task.vote' ELSE 'task.waiting_for_review' END
         WHEN messages.status IN ('completed', 'failed', 'cancelled')
              THEN 'task.' || messages.status
    END
"""
_PENDING = """
    SELECT messages.gid, messages.task_id, messages.status, {type} AS type,
           coalesce({attempt}, tasks.attempt) AS attempt,
           tasks.title AS title, tasks.metadata AS metadata
      FROM messages JOIN tasks USING (task_id)
     WHERE messages.gid > :after AND messages.gid <= :upto
       AND messages.status IN """ + _EVENT_STATUSES + """
     ORDER BY messages.gid LIMIT :limit
"""
# The JSON of a message's data, per engine: SQLite's json_extract, PostgreSQL's operators
# (a text column cast to json; a votes value that is not an array counts as none).
_PENDING_BY_DIALECT = {
    "sqlite": _PENDING.format(type=_EVENT_TYPE.format(
        timed_out="json_extract(messages.data, '$.timed_out')",
        votes="coalesce(json_array_length(messages.data, '$.votes'), 0)"),
        attempt="json_extract(messages.data, '$.attempt')"),
    "postgresql": _PENDING.format(type=_EVENT_TYPE.format(
        timed_out="coalesce((messages.data::json ->> 'timed_out') = 'true', false)",
        votes="""CASE WHEN json_typeof(messages.data::json -> 'votes') = 'array'
                      THEN json_array_length(messages.data::json -> 'votes') ELSE 0 END"""),
        attempt="(messages.data::json ->> 'attempt')::integer"),
}
# The last message numbered, read in the endpoint's own commit: it is told of later ones.
_LATEST_GID = {
    "sqlite": "coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0)",
    "postgresql": "(SELECT value FROM counters WHERE name = 'gid')",
}
# An endpoint's lease (a shared store): taken when free, lapsed, or this process's own, and
# renewed, in one conditional statement each; the database's clock decides.
_HOLD = f"""
    UPDATE webhooks SET holder = :me, holder_until = {NOW} + :lease
     WHERE id = :id AND (holder IS NULL OR holder = :me OR holder_until < {NOW})
    RETURNING id
"""
_RENEW = f"""UPDATE webhooks SET holder_until = {NOW} + :lease WHERE holder = :me
             RETURNING id"""
_LET_GO = "UPDATE webhooks SET holder = NULL, holder_until = NULL WHERE holder = :me"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One registered receiver, and where it stands in the message log."""

    id: str
    url: str
    events: tuple[str, ...]  # () means every event
    secret: str
    cursor: int  # the last message handled (delivered, skipped, or not one of its events)
    created_at: float
    retry_gid: int | None = None  # the message being retried, if one is
    retry_since: float | None = None  # when it was first tried
    retry_tries: int = 0
    next_retry: float | None = None

    def wants(self, event_type: str) -> bool:
        return not self.events or event_type in self.events

    def to_json(self) -> dict[str, Any]:
        """Everything but the secret, which is shown once, when the endpoint is added."""
        return {"id": self.id, "url": self.url, "events": list(self.events) or list(EVENTS),
                "all_events": not self.events, "created_at": iso(self.created_at),
                "cursor": self.cursor,
                "retrying": None if self.retry_gid is None else {
                    "message": self.retry_gid, "tries": self.retry_tries,
                    "since": iso(self.retry_since) if self.retry_since else None,
                    "next_retry": iso(self.next_retry) if self.next_retry else None}}


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One delivery attempt, as ``hitl webhooks list`` and the API show it."""

    message_id: str
    gid: int
    type: str
    try_number: int
    at: float
    status_code: int | None
    error: str | None
    outcome: str  # delivered, failed (a retry follows), skipped (retried for too long)
    next_retry: float | None

    def to_json(self) -> dict[str, Any]:
        return {"webhook_id": self.message_id, "message": self.gid, "type": self.type,
                "try": self.try_number, "at": iso(self.at), "status_code": self.status_code,
                "error": self.error, "outcome": self.outcome,
                "next_retry": iso(self.next_retry) if self.next_retry else None}


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored message that may be an event for an endpoint."""

    gid: int
    task_id: str
    status: str
    type: str | None  # None: not an event (a human's decision, say)
    attempt: int
    title: str | None
    metadata: Any


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; Invalid if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise Invalid(f"secret: must be of the form {SECRET_PREFIX}<base64>")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(f"secret: the part after {SECRET_PREFIX} is not base64") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise Invalid(f"secret: must decode to {low} to {high} bytes, not {len(key)}")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<base64 HMAC-SHA256>``."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def checked_url(url: str) -> str:
    """An http(s) URL that httpx can send to: checked here, so a bad one is a 400 now
    rather than an endpoint that can never be delivered to."""
    url = url.strip()
    wrong = Invalid(f"url: must be an http or https URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL):
        raise wrong from None
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
        raise wrong
    if any(char.isspace() for char in url):
        raise Invalid("url: must not contain spaces")
    return url


def checked_events(events: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise Invalid(f"events: unknown {', '.join(map(repr, unknown))}; choose from "
                      f"{', '.join(EVENTS)}")
    return tuple(dict.fromkeys(events)) if set(events) != set(EVENTS) else ()


class Webhooks:
    """The endpoints, kept in the store; each change is checked against the policy."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def add(self, url: str, events: list[str] | tuple[str, ...] = (),
                  secret: str | None = None, *, by: Identity | None = None) -> Endpoint:
        """Register an endpoint; it is told of the events stored from now on."""
        if by is not None:
            policy.can_manage(by).require()
        secret = secret or new_secret()
        secret_key(secret)
        endpoint = Endpoint("wh_" + secrets.token_hex(8), checked_url(url),
                            checked_events(events), secret, 0, time.time())
        async with self.store.transaction() as conn:
            await conn.execute(
                f"""INSERT INTO webhooks (id, url, events, secret, cursor, created_at)
                    VALUES (:id, :url, :events, :secret,
                            {_LATEST_GID[self.store.dialect]}, :created_at)""",
                {"id": endpoint.id, "url": endpoint.url, "events": json.dumps(endpoint.events),
                 "secret": endpoint.secret, "created_at": endpoint.created_at})
        added = await self.get(endpoint.id)
        assert added is not None
        return added

    async def remove(self, endpoint_id: str, *, by: Identity | None = None) -> None:
        if by is not None:
            policy.can_manage(by).require()
        async with self.store.transaction() as conn:
            cursor = await conn.execute("DELETE FROM webhooks WHERE id = :id",
                                        {"id": endpoint_id})
            if cursor.rowcount == 0:
                raise NotFound(f"no webhook with id {endpoint_id!r}")

    async def endpoints(self, *, by: Identity | None = None) -> list[Endpoint]:
        if by is not None:
            policy.can_manage(by).require()
        rows = await self.store.reader.execute_fetchall(
            "SELECT * FROM webhooks ORDER BY created_at, id")
        return [_endpoint(row) for row in rows]

    async def get(self, endpoint_id: str) -> Endpoint | None:
        rows = await self.store.reader.execute_fetchall(
            "SELECT * FROM webhooks WHERE id = :id", {"id": endpoint_id})
        return next((_endpoint(row) for row in rows), None)

    async def attempts(self, endpoint_id: str, limit: int = 10) -> list[AttemptRecord]:
        """An endpoint's latest delivery attempts, newest first."""
        rows = await self.store.reader.execute_fetchall(
            """SELECT message_id, gid, type, try, at, status_code, error, outcome, next_retry
                 FROM webhook_attempts WHERE webhook_id = :id ORDER BY id DESC LIMIT :limit""",
            {"id": endpoint_id, "limit": limit})
        return [AttemptRecord(row["message_id"], row["gid"], row["type"], row["try"], row["at"],
                              row["status_code"], row["error"], row["outcome"],
                              row["next_retry"]) for row in rows]

    async def listing(self, *, by: Identity | None = None) -> list[dict[str, Any]]:
        """Every endpoint with its recent attempts, as the API and the CLI show them."""
        return [{**endpoint.to_json(),
                 "attempts": [a.to_json() for a in await self.attempts(endpoint.id)]}
                for endpoint in await self.endpoints(by=by)]

    async def horizon(self) -> int:
        """The last message stored: every message up to it is committed (or deleted)."""
        rows = await self.store.reader.execute_fetchall(
            "SELECT coalesce(max(gid), 0) FROM messages")
        return int(next(iter(rows))[0])

    async def pending(self, after: int, upto: int, limit: int) -> list[Pending]:
        """The messages after ``after`` up to ``upto`` that may be events, oldest first."""
        rows = await self.store.reader.execute_fetchall(
            _PENDING_BY_DIALECT[self.store.dialect],
            {"after": after, "upto": upto, "limit": limit})
        return [Pending(row["gid"], row["task_id"], row["status"], row["type"],
                        int(row["attempt"]), row["title"], _json(row["metadata"]))
                for row in rows]

    def _held(self, holder: str | None) -> str:
        """The condition that ``holder`` (a process, on a shared store) holds the endpoint."""
        return "" if holder is None else "AND holder = :holder"

    async def advance(self, endpoint: Endpoint, to: int,
                      attempts: Sequence[AttemptRecord] = (), *,
                      holder: str | None = None) -> bool:
        """Move the cursor from where ``endpoint`` saw it to ``to`` (ending any retry), and
        log the attempts that did it, in one transaction. False when the cursor had moved
        meanwhile (another process), the endpoint is gone, or (given ``holder``) it is no
        longer that process's: nothing is changed then."""
        async with self.store.transaction() as conn:
            cursor = await conn.execute(
                f"""UPDATE webhooks SET cursor = :to, retry_gid = NULL, retry_since = NULL,
                                        retry_tries = 0, next_retry = NULL
                     WHERE id = :id AND cursor = :from {self._held(holder)}""",
                {"id": endpoint.id, "from": endpoint.cursor, "to": to, "holder": holder})
            if cursor.rowcount == 0:
                return False
            if attempts:
                await self._log(conn, endpoint.id, attempts)
            return True

    async def retrying(self, endpoint: Endpoint, attempt: AttemptRecord, since: float, *,
                       holder: str | None = None) -> bool:
        """Record a failed attempt and when the next one is due; False as :meth:`advance`."""
        async with self.store.transaction() as conn:
            cursor = await conn.execute(
                f"""UPDATE webhooks SET retry_gid = :gid, retry_since = :since,
                                        retry_tries = :tries, next_retry = :next
                     WHERE id = :id AND cursor = :from {self._held(holder)}""",
                {"id": endpoint.id, "from": endpoint.cursor, "gid": attempt.gid,
                 "since": since, "tries": attempt.try_number, "next": attempt.next_retry,
                 "holder": holder})
            if cursor.rowcount == 0:
                return False
            await self._log(conn, endpoint.id, [attempt])
            return True

    # Leases (a shared store only: SQLite's one process always holds every endpoint).

    async def hold(self, endpoint_id: str, holder: str, lease: float) -> bool:
        """Take the endpoint for ``holder`` for ``lease`` seconds, or renew it: whether it is
        ``holder``'s now (not while another's lease runs)."""
        async with self.store.transaction() as conn:
            return bool(await conn.execute_fetchall(
                _HOLD, {"id": endpoint_id, "me": holder, "lease": lease}))

    async def renew(self, holder: str, lease: float) -> set[str]:
        """Renew every endpoint ``holder`` holds; their ids (one taken over is not there)."""
        async with self.store.transaction() as conn:
            rows = await conn.execute_fetchall(_RENEW, {"me": holder, "lease": lease})
        return {str(row[0]) for row in rows}

    async def let_go(self, holder: str) -> None:
        """``holder`` is stopping: its endpoints may be taken at once."""
        async with self.store.transaction() as conn:
            await conn.execute(_LET_GO, {"me": holder})

    @staticmethod
    async def _log(conn: Any, endpoint_id: str, attempts: Sequence[AttemptRecord]) -> None:
        await conn.executemany(
            """INSERT INTO webhook_attempts (webhook_id, message_id, gid, type, try, at,
                                             status_code, error, outcome, next_retry)
               VALUES (:webhook_id, :message_id, :gid, :type, :try, :at, :status_code,
                       :error, :outcome, :next_retry)""",
            [{"webhook_id": endpoint_id, "message_id": attempt.message_id, "gid": attempt.gid,
              "type": attempt.type, "try": attempt.try_number, "at": attempt.at,
              "status_code": attempt.status_code, "error": attempt.error,
              "outcome": attempt.outcome, "next_retry": attempt.next_retry}
             for attempt in attempts[-RECENT_ATTEMPTS:]])
        await conn.execute(  # keep the latest few: the log stays small however long it runs
            """DELETE FROM webhook_attempts WHERE webhook_id = :id AND id <= (
                   SELECT id FROM webhook_attempts WHERE webhook_id = :id
                    ORDER BY id DESC LIMIT 1 OFFSET :keep)""",
            {"id": endpoint_id, "keep": RECENT_ATTEMPTS})


def _endpoint(row: Any) -> Endpoint:
    return Endpoint(row["id"], row["url"], tuple(json.loads(row["events"])), row["secret"],
                    int(row["cursor"]), row["created_at"], row["retry_gid"],
                    row["retry_since"], int(row["retry_tries"]), row["next_retry"])


def _json(text: Any) -> Any:
    """A JSON column's value (metadata), or the text itself if it is not JSON."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text
