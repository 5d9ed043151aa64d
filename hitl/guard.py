"""The one check every request passes before it is answered, whichever path answers it.

Quart runs :meth:`Guard.check_request` before every request it answers (a
``before_request`` hook), and the lean stream path before it opens a stream
(:mod:`hitl.sse_asgi`): a check added here (who is asking, may they) guards every
endpoint. It takes the ASGI scope, which both paths have and which holds everything a
request says about itself (method, path, headers, client, server).

Today it checks the ``Host`` header, so that a page on another site cannot reach a local
hitl through DNS rebinding (``evil.example`` re-resolved to 127.0.0.1): its requests
carry ``Host: evil.example``. Host names are matched without their port, as Django and
Starlette do (a port gives such a page nothing), unless an allowed entry names one.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

from quart import Quart, request

from . import policy
from .accounts import Identity
from .config import Config
from .errors import Invalid
from .identity import Authenticator, Forbidden, Unauthorized

LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
EVERY_INTERFACE = ("0.0.0.0", "::", "")


@dataclass(frozen=True, slots=True)
class AllowedHosts:
    """The ``Host`` header values a request may carry."""

    names: frozenset[str]  # "name" (any port) or "name:port"; IPv6 in brackets
    any_address: bool = False  # any IP address: an address is never a rebinding page's
    any_host: bool = False

    @classmethod
    def of(cls, config: Config) -> AllowedHosts:
        """``--allowed-hosts``; by default the listen host and the loopback names.

        Listening on every interface, the machine is reached by its names and addresses:
        its host name and FQDN are added, and any IP address is allowed.
        """
        if config.allowed_hosts:
            entries = set(config.allowed_hosts)
            return cls(frozenset(lowered(map(bracketed, entries - {"*"}))),
                       any_host="*" in entries)
        if config.host in EVERY_INTERFACE:
            names = {socket.gethostname(), socket.getfqdn()}
            return cls(frozenset(lowered(names, LOOPBACK)), any_address=True)
        return cls(frozenset(lowered([bracketed(config.host)], LOOPBACK)))

    def allow(self, host: str | None) -> bool:
        if self.any_host:
            return True
        if not host:
            return False
        host = host.lower()
        name, port = split_port(host)
        if port is not None and not (port.isascii() and port.isdigit()):
            return False
        return name in self.names or host in self.names or (
            self.any_address and is_address(name))


PUBLIC = ("/login", "/healthz", "/openapi.json")  # and what starts with PUBLIC_PREFIXES
PUBLIC_PREFIXES = ("/login/once/", "/static/")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
IDENTITY = "hitl.identity"  # where a checked request keeps who is asking, in its scope


class Guard:
    """Decides whether a request is answered at all, and who is asking; kept in
    ``app.extensions["guard"]``."""

    def __init__(self, config: Config, authenticator: Authenticator) -> None:
        self.hosts = AllowedHosts.of(config)
        self.authenticator = authenticator

    def init_app(self, app: Quart) -> None:
        app.extensions["guard"] = self

        @app.before_request
        async def check() -> None:
            identity = await self.check_request(cast(MutableMapping[str, Any], request.scope))
            if request.method in SAFE_METHODS or request.routing_exception is not None:
                return  # no route answers it (a 404 or 405 follows): it changes nothing
            if identity is None:  # a visitor's post (only the sign-in form takes one)
                self.check_origin(request.scope)  # another site must not sign them in
                return
            form = await request.form if request.mimetype in FORM_TYPES else None
            self.check_cross_site(request.scope, identity,
                                  form.get("csrf_token") if form is not None else None)

    async def check_request(self, scope: MutableMapping[str, Any]) -> Identity | None:
        """Who is asking, once this request may be answered; else raise the HitlError
        that says why (a bad Host, 401 not signed in). The identity is also kept in the
        scope (:func:`identity_of`)."""
        host = header(scope, b"host")
        if not self.hosts.allow(host):
            shown = "no Host header" if host is None else f"Host {host[:100]!r}"
            raise Invalid(f"{shown} is not one this service answers to (see --allowed-hosts)")
        identity = await self.authenticator.identify(scope)
        scope[IDENTITY] = identity
        if identity is None:
            if not is_public(scope["path"]):
                raise Unauthorized("sign in first (a session, or Authorization: Bearer <token>)")
        else:
            policy.can_reach(identity, scope["path"]).require()  # the metrics token: /metrics
        return identity

    def check_origin(self, scope: Mapping[str, Any]) -> None:
        """Refuse a request whose ``Origin`` names another origin than ours (none: not a
        browser's cross-origin request, as browsers always send it on those)."""
        origin = header(scope, b"origin")
        own = f"{self.scheme(scope)}://{header(scope, b'host')}"
        if origin is not None and origin.lower() != own.lower():
            raise Forbidden(f"cross-site request refused: Origin {origin[:100]!r} is not {own}")

    def scheme(self, scope: Mapping[str, Any]) -> str:
        """How the browser reached us: behind a trusted proxy that ends TLS, its
        ``X-Forwarded-Proto``; else the request's own scheme."""
        scheme = str(scope.get("scheme", "http"))
        if self.authenticator.from_trusted_proxy(scope):
            forwarded = (header(scope, b"x-forwarded-proto") or "").split(",")[0].strip()
            if forwarded.lower() in ("http", "https"):
                return forwarded.lower()
        return scheme

    def check_cross_site(self, scope: Mapping[str, Any], identity: Identity,
                         form_token: str | None) -> None:
        """A browser's state-changing request must come from a page of this origin.

        A token proves a program, not a browser: nothing to check. Otherwise an ``Origin``
        naming another origin is refused (another port is another origin, though browsers
        send it SameSite=Lax cookies; every browser sends Origin on a cross-origin POST),
        and a form post must also carry the session's token (in the form or, from htmx,
        the ``X-CSRF-Token`` header). JSON needs a CORS preflight across sites, which hitl
        never allows.
        """
        if identity.method == "token":
            return
        self.check_origin(scope)
        content_type = (header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type not in FORM_TYPES:  # no form: the Origin check above is the guard
            return
        token = header(scope, b"x-csrf-token") or form_token
        if not token or identity.csrf is None or not hmac.compare_digest(
                token.encode(), identity.csrf.encode()):  # str: ASCII only, else TypeError
            raise Forbidden("the form is missing its CSRF token or it is stale: reload the "
                            "page and send it again")


FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def is_public(path: str) -> bool:
    """Whether ``path`` is answered to visitors too (sign-in, health, static files, and
    /openapi.json: a client reads it before it has signed in)."""
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


def acts_for_the_user(scope: Mapping[str, Any]) -> bool:
    """Whether a browser's GET was the user's own doing, so that it may change something
    small for them (``GET /next`` reserves the task it opens): not a link followed from
    another site, nor a prefetch. Browsers say so in Fetch Metadata (``Sec-Fetch-Site``,
    ``Sec-Purpose``); a program sends neither and acts for itself."""
    site = header(scope, b"sec-fetch-site")
    return site in (None, "same-origin", "none") and header(scope, b"sec-purpose") is None


def identity_of(scope: Mapping[str, Any]) -> Identity | None:
    """Who is asking, as the guard found (None on public paths for visitors)."""
    return cast(Identity | None, scope.get(IDENTITY))


def header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def split_port(host: str) -> tuple[str, str | None]:
    """``("[::1]", "8000")`` from ``[::1]:8000``; no port, None."""
    if host.rfind(":") > host.rfind("]"):
        name, _, port = host.rpartition(":")
        return name, port
    return host, None


def bracketed(host: str) -> str:
    """An IPv6 address as a Host header writes it: ``[::1]``."""
    return f"[{host}]" if host.count(":") > 1 and not host.startswith("[") else host


def is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True


def lowered(*groups: Iterable[str]) -> set[str]:
    return {name.lower() for group in groups for name in group if name}
