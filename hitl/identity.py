"""Who is asking: resolved once per request, at the edge, the same way on every path.

:meth:`Authenticator.identify` takes the ASGI scope (which Quart's request and the lean
stream path both have) and returns the :class:`~hitl.accounts.Identity` it proves, by
mode (``--auth``):

- ``accounts``: an ``Authorization: Bearer`` API token, else the signed session cookie
  of a browser that signed in (Quart-Auth's cookie, holding a session id that the store
  can end);
- ``proxy``: ``X-Forwarded-User`` (with ``-Groups`` and ``-Email``), believed only from a
  ``--trusted-proxies`` address; tokens work too;
- ``none``: everyone is the one anonymous operator (loopback only).

In the first two, a bearer token equal to ``--metrics-token`` is :data:`SCRAPER`, whom
the policy lets read ``/metrics`` and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from http.cookies import CookieError, SimpleCookie
from typing import Any, cast

from quart import Quart, request
from quart_auth import QuartAuth

from .accounts import Accounts, Identity, Role, User, checked_login, checked_name
from .config import Config
from .errors import HitlError, Invalid
from .lifecycle import attach
from .store import Store

ANONYMOUS = User("", "anonymous", Role.ADMIN)  # --auth none: today's behaviour
# --metrics-token: a scraper, who reads /metrics and nothing else (hitl.policy.can_reach)
SCRAPER = Identity(User("", "metrics token", Role.VIEWER), "metrics")


class Unauthorized(HitlError):
    """Not signed in, or with a token that is unknown, revoked or expired."""

    status = 401


class Forbidden(HitlError):
    """Signed in, but not allowed to do this."""

    status = 403


class SessionCookie(QuartAuth):
    """Quart-Auth's cookie, marked Secure only when the request came over https (a cookie
    marked Secure on plain http is dropped by browsers other than for localhost)."""

    @property
    def cookie_secure(self) -> bool:
        try:
            return bool(request.is_secure)
        except RuntimeError:  # no request: as configured
            return False

    @cookie_secure.setter
    def cookie_secure(self, value: bool | None) -> None:
        pass


class Authenticator:
    """Resolves identities and signs sessions; ``app.extensions["identity"]``."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.mode = config.auth
        self.accounts = Accounts(store)
        self.trusted = [ipaddress.ip_network(cidr) for cidr in config.trusted_proxies]
        self.metrics_token = config.metrics_token.encode() if config.metrics_token else None
        self.cookie = SessionCookie(cookie_name="hitl_session", duration=30 * 86400)
        self.app: Quart | None = None

    def init_app(self, app: Quart) -> None:
        self.app = app
        self.cookie.init_app(app)
        attach(app, "identity", self, self.start, self.close)

    async def start(self) -> None:
        assert self.app is not None
        self.app.secret_key = self.config.secret_key or await self.accounts.secret_key()

    async def close(self) -> None:
        pass

    async def identify(self, scope: Mapping[str, Any]) -> Identity | None:
        """The identity this request proves, or None (not signed in).

        Raises :class:`Unauthorized` for a bearer token that proves nothing: a program
        with a bad token must hear so, not be treated as a visitor.
        """
        if self.mode == "none":
            return Identity(ANONYMOUS, "none", csrf=self.csrf_for("anonymous"))
        authorization = header(scope, b"authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                if self.is_metrics_token(token.strip()):
                    return SCRAPER
                identity = await self.accounts.by_token(token.strip())
                if identity is None:
                    raise Unauthorized("the API token is unknown, revoked or expired, or "
                                       "its user is disabled")
                return identity
        if self.mode == "proxy" and self.from_trusted_proxy(scope):
            return await self.from_proxy(scope)
        session_id = self.session_id(scope)
        return await self.accounts.by_session(session_id) if session_id else None

    def is_metrics_token(self, token: str) -> bool:
        """Whether ``token`` is the ``--metrics-token`` (compared in constant time)."""
        return self.metrics_token is not None and hmac.compare_digest(token.encode(),
                                                                      self.metrics_token)

    def session_id(self, scope: Mapping[str, Any]) -> str | None:
        """The session id in the request's signed cookie, if its signature holds."""
        raw = header(scope, b"cookie")
        if not raw:
            return None
        try:
            morsel = SimpleCookie(raw).get(cast(str, self.cookie.cookie_name))
        except CookieError:
            return None
        if morsel is None:
            return None
        return self.cookie.load_token(morsel.value, self.app)

    def from_trusted_proxy(self, scope: Mapping[str, Any]) -> bool:
        client = scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    async def from_proxy(self, scope: Mapping[str, Any]) -> Identity | None:
        name = header(scope, b"x-forwarded-user")
        if not name:
            return None
        try:
            login = checked_login(name.split("@", 1)[0] if "@" in name else name)
            groups = tuple(checked_login(group) for group in
                           (header(scope, b"x-forwarded-groups") or "").split(",")
                           if group.strip())
            email = header(scope, b"x-forwarded-email")
            display = checked_name(email or name, "display name")
        except Invalid as exc:
            raise Unauthorized(f"the proxy's X-Forwarded-User is not usable: {exc}") from None
        user = await self.accounts.provision(login, Role(self.config.proxy_default_role),
                                             groups, display)
        if user.disabled_at is not None:
            raise Unauthorized(f"user {user.name!r} is disabled")
        return Identity(user, "proxy", csrf=self.csrf_for(f"proxy:{user.name}"))

    def csrf_for(self, subject: str) -> str:
        """A cross-site form token for identities without a session of ours (proxy, none):
        derived from the signing key, so only a page of this origin can know it."""
        key = (self.app.secret_key if self.app is not None else None) or ""
        return hmac.new(str(key).encode(), subject.encode(), hashlib.sha256).hexdigest()


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None
