"""One typed configuration: CLI flags, then ``HITL_*`` environment variables, then defaults.

Every setting is declared once, in :data:`SETTINGS`; the CLI options, the environment
lookup and the README's configuration table are all derived from that list.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError


def default_db_path() -> str:
    """Where ``hitl serve`` keeps its data when no ``--db`` is given (XDG data dir)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "hitl" / "hitl.db")


@dataclass(frozen=True, slots=True)
class Setting:
    """How one config field is named, parsed and explained."""

    name: str
    parse: Callable[[str], Any]
    help: str
    kind: str  # human name of the type, for error messages


def _number(text: str) -> float:
    value = float(text)
    if value < 0 or value != value:
        raise ValueError("must be zero or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _lease(text: str) -> float:
    value = float(text)
    if not 1 <= value <= 3600:
        raise ValueError("must be between 1 and 3600 seconds")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be between 0 and 65535")
    return value


def _hosts(text: str) -> tuple[str, ...]:
    hosts = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not hosts:
        raise ValueError("name at least one host, or '*' for any")
    for host in hosts:
        if any(char.isspace() or char in "/@?#" for char in host):
            raise ValueError(f"{host!r} is not a host name (nor host:port)")
    return hosts


def _optional_days(text: str) -> float | None:
    return None if text.strip().lower() in ("", "off", "none", "0") else _number(text)


def _optional_seconds(text: str) -> float | None:
    value = _optional_days(text)
    return value or None


# What a review timeout does by default; "escalate" needs a task's own escalate_to.
DEFAULT_OUTCOMES = ("fail", "reject", "approve")


def _outcome(text: str) -> str:
    if text not in DEFAULT_OUTCOMES:
        raise ValueError(f"must be one of {', '.join(DEFAULT_OUTCOMES)} (escalate is given "
                         "per task, with its escalate_to)")
    return text


AUTH_MODES = ("accounts", "proxy", "none")
ROLES = ("admin", "reviewer", "submitter", "viewer", "worker")


def _auth_mode(text: str) -> str:
    if text not in AUTH_MODES:
        raise ValueError(f"must be one of {', '.join(AUTH_MODES)}")
    return text


def _role(text: str) -> str:
    if text not in ROLES:
        raise ValueError(f"must be one of {', '.join(ROLES)}")
    return text


LOG_FORMATS = ("text", "json")


def _log_format(text: str) -> str:
    if text not in LOG_FORMATS:
        raise ValueError(f"must be one of {', '.join(LOG_FORMATS)}")
    return text


def _token(text: str) -> str:
    """A bearer secret: 16 to 256 printable ASCII characters, no spaces (a short one is
    guessed; a space would not survive an Authorization header)."""
    if not 16 <= len(text) <= 256:
        raise ValueError("must be 16 to 256 characters (e.g. python3 -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))')")
    if not all("!" <= char <= "~" for char in text):
        raise ValueError("must be printable ASCII with no spaces")
    return text


def _networks(text: str) -> tuple[str, ...]:
    """Comma-separated CIDRs (or addresses), each checked; kept in their canonical form."""
    return tuple(str(ipaddress.ip_network(part.strip(), strict=False))
                 for part in text.split(",") if part.strip())


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
REDIS_SCHEMES = ("redis", "rediss")
_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def _broker(text: str) -> str:
    """``memory`` or ``redis[s]://[user:password@]HOST[:PORT][/DB][?prefix=NAME]``, checked
    now, so a mistyped URL stops start-up with one line rather than a Redis error later."""
    if text == "memory":
        return text
    try:
        url = urlsplit(text)
        port = url.port  # ValueError when not a number in range
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if url.scheme not in REDIS_SCHEMES:
        raise ValueError("must be 'memory' or a redis://HOST:PORT/DB URL (rediss:// for TLS)")
    if not url.hostname:
        raise ValueError("a redis:// URL needs a host: redis://HOST:PORT/DB")
    del port
    database = url.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database is a number (redis://HOST:PORT/0), not {database!r}")
    if url.fragment:
        raise ValueError("a redis:// URL has no #fragment")
    for key, value in parse_qsl(url.query, keep_blank_values=True):
        if key != "prefix":
            raise ValueError(f"unknown parameter {key!r} (only ?prefix=NAME)")
        if not _PREFIX.fullmatch(value):
            raise ValueError("prefix must be 1 to 100 letters, digits or . _ : -")
    return text


def is_postgres(db: str) -> bool:
    """Whether ``--db`` names a PostgreSQL database (a URL) rather than an SQLite file."""
    return db.startswith(POSTGRES_SCHEMES)


def is_shared(config: Config) -> bool:
    """Whether several processes can serve this configuration as one service: the state in
    PostgreSQL and the news between processes on a broker that crosses them (Redis).
    SQLite is one process's file, and the memory broker reaches only its own watchers."""
    return is_postgres(config.db) and config.broker != "memory"


SETTINGS: tuple[Setting, ...] = (
    Setting("host", str, "interface to listen on", "text"),
    Setting("port", _port, "TCP port to listen on", "port number"),
    Setting("allowed_hosts", _hosts, "Host header values served, comma-separated ('*': any); "
            "default: the listen host, localhost, 127.0.0.1, [::1]", "list of hosts"),
    Setting("db", str, "SQLite database file (':memory:' keeps nothing) or a postgresql:// URL",
            "path"),
    Setting("broker", _broker, "how processes tell each other of changes: memory (this "
            "process alone) or redis://HOST:PORT/DB[?prefix=NAME] (rediss:// for TLS)",
            "broker URL"),
    Setting("workers", _positive_int, "processes serving one port; more than 1 needs a "
            "shared database and broker (a postgresql:// and a redis:// URL)", "integer"),
    Setting("process_delay", _number, "seconds the built-in simulated processor takes", "number"),
    Setting("processor", str, "processor as 'package.module:callable' (sync or async), or "
            "'external': each attempt is a job for an external worker (POST /api/work/claim)",
            "text"),
    Setting("lease", _lease, "external work: seconds a claimed job stays its worker's "
            "without a heartbeat, when the claim gives no lease", "number"),
    Setting("flow_lease", _lease, "a shared database: seconds a task's flow stays its "
            "process's without renewal; a dead process's tasks move on within about this "
            "and a third", "number"),
    Setting("max_attempts", _positive_int, "attempts before a task fails unapproved (a task's "
            "max_attempts overrides it)", "integer"),
    Setting("quorum", _positive_int, "distinct approvals an attempt needs, when its task "
            "gives no quorum", "integer"),
    Setting("review_timeout", _optional_seconds, "seconds a review may wait, when its task "
            "gives no review_timeout; off by default", "number"),
    Setting("on_timeout", _outcome, "what a review timeout does, when its task does not say: "
            "fail, reject or approve", "outcome"),
    Setting("retries", _positive_int, "tries per attempt when the processor raises", "integer"),
    Setting("retry_wait", _number, "seconds between processor retries", "number"),
    Setting("heartbeat", _number, "seconds between SSE heartbeat comments", "number"),
    Setting("max_body", _positive_int, "largest accepted request body, bytes", "integer"),
    Setting("queue_size", _positive_int, "messages a slow watcher may lag before it is dropped",
            "integer"),
    Setting("queue_bytes", _positive_int, "bytes a slow watcher may lag before it is dropped",
            "integer"),
    Setting("history_size", _positive_int, "messages per task kept in memory for replay",
            "integer"),
    Setting("history_bytes", _positive_int,
            "bytes per task kept in memory for replay (the all-tasks stream: 4 times as much)",
            "integer"),
    Setting("send_buffer", _positive_int,
            "kernel send buffer per connection, bytes: what a client that stops reading "
            "holds before the server sees it", "integer"),
    Setting("backlog", _positive_int, "listen backlog (raise net.core.somaxconn to match)",
            "integer"),
    Setting("shutdown_timeout", _number, "seconds to wait for connections on shutdown", "number"),
    Setting("retain_days", _optional_days, "delete finished tasks older than this; off by default",
            "number"),
    Setting("log_level", str, "logging level (debug, info, warning, error)", "text"),
    Setting("log_format", _log_format, "log lines: text (readable) or json (one object a "
            "line, for log collectors)", "log format"),
    Setting("metrics_token", _token, "bearer token that may read /metrics and nothing else "
            "(admins may too); off by default", "token"),
    Setting("auth", _auth_mode, "sign-in: accounts, proxy (trusted X-Forwarded-User) or none "
            "(loopback only)", "mode"),
    Setting("trusted_proxies", _networks, "proxy mode: comma-separated CIDRs whose "
            "X-Forwarded-User is believed", "list of CIDRs"),
    Setting("proxy_default_role", _role, "proxy mode: the role of a user first seen",
            "role"),
    Setting("reservation", _number, "seconds a task handed out by the review queue (next) "
            "stays reserved for its reviewer", "number"),
    Setting("secret_key", str, "key that signs session cookies; default: one kept in the "
            "database", "text"),
    Setting("public_url", str, "the address people reach hitl at, for links in webhook "
            "events; off: http://HOST:PORT", "text"),
    Setting("webhook_timeout", _number, "seconds a webhook delivery may take", "number"),
    Setting("webhook_first_retry", _number, "seconds before a failed webhook delivery's first "
            "retry; each next wait doubles", "number"),
    Setting("webhook_max_backoff", _number, "longest wait between webhook retries, seconds",
            "number"),
    Setting("webhook_retry_for", _number, "seconds a webhook event is retried before it is "
            "skipped", "number"),
    Setting("webhook_poll", _number, "seconds between looks for new webhook endpoints and "
            "events when nothing wakes the worker", "number"),
)


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting of the service; build it with :meth:`load`."""

    host: str = "127.0.0.1"
    port: int = 8000
    allowed_hosts: tuple[str, ...] = ()  # () is the default list, derived from ``host``
    db: str = ":memory:"
    broker: str = "memory"
    workers: int = 1
    process_delay: float = 2.0
    processor: str = "hitl.processors:simulate"
    lease: float = 30.0
    flow_lease: float = 9.0
    max_attempts: int = 5
    quorum: int = 1
    review_timeout: float | None = None
    on_timeout: str = "fail"
    retries: int = 3
    retry_wait: float = 0.5
    heartbeat: float = 15.0
    max_body: int = 1024 * 1024
    queue_size: int = 1024
    queue_bytes: int = 1024 * 1024
    history_size: int = 1000
    history_bytes: int = 4 * 1024 * 1024
    send_buffer: int = 64 * 1024
    backlog: int = 2048
    shutdown_timeout: float = 5.0
    retain_days: float | None = None
    log_level: str = "info"
    log_format: str = "text"
    metrics_token: str | None = None
    auth: str = "accounts"
    trusted_proxies: tuple[str, ...] = ()
    proxy_default_role: str = "reviewer"
    reservation: float = 600.0
    secret_key: str | None = None
    public_url: str | None = None  # None: http://HOST:PORT
    webhook_timeout: float = 10.0
    webhook_first_retry: float = 1.0
    webhook_max_backoff: float = 600.0
    webhook_retry_for: float = 24 * 3600.0
    webhook_poll: float = 2.0

    @classmethod
    def load(
        cls,
        flags: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
        **defaults: Any,
    ) -> Config:
        """Build from CLI ``flags`` (raw strings), then ``HITL_*`` in ``environ``, then defaults.

        Raises :class:`ConfigError` with a one-line message for a bad value.
        """
        flags = flags or {}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = dict(defaults)
        for setting in SETTINGS:
            env_name = env_var(setting.name)
            if flags.get(setting.name) is not None:
                raw, source = flags[setting.name], "--" + setting.name.replace("_", "-")
            elif env_name in environ:
                raw, source = environ[env_name], env_name
            else:
                continue
            try:
                values[setting.name] = setting.parse(str(raw))
            except ValueError as exc:
                message = f"{source}={raw!r} is not a valid {setting.kind}: {exc}"
                raise ConfigError(message) from None
        return cls(**values).checked()

    def checked(self) -> Config:
        """Settings that only make sense together; ConfigError names what is wrong."""
        if self.auth == "none" and not is_loopback(self.host):
            raise ConfigError(f"--auth none turns sign-in off, so it is allowed only on a "
                              f"loopback address, not --host {self.host!r}")
        if self.auth == "proxy" and not self.trusted_proxies:
            raise ConfigError("--auth proxy needs --trusted-proxies: the addresses whose "
                              "X-Forwarded-User is believed")
        return self

    def with_changes(self, **changes: Any) -> Config:
        return replace(self, **changes)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def env_var(name: str) -> str:
    return "HITL_" + name.upper()


def default_of(name: str) -> Any:
    return next(f.default for f in fields(Config) if f.name == name)
