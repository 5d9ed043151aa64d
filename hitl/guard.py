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

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from quart import Quart, request

from .config import Config
from .errors import Invalid

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


class Guard:
    """Decides whether a request is answered at all; kept in ``app.extensions["guard"]``."""

    def __init__(self, config: Config) -> None:
        self.hosts = AllowedHosts.of(config)

    def init_app(self, app: Quart) -> None:
        app.extensions["guard"] = self

        @app.before_request
        async def check() -> None:
            self.check_request(request.scope)

    def check_request(self, scope: Mapping[str, Any]) -> None:
        """Return if this request may be answered; else raise the HitlError that says why."""
        host = header(scope, b"host")
        if not self.hosts.allow(host):
            shown = "no Host header" if host is None else f"Host {host[:100]!r}"
            raise Invalid(f"{shown} is not one this service answers to (see --allowed-hosts)")


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
