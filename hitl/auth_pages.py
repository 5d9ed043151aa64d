"""Signing in with a browser: ``/login``, ``POST /logout`` and one-time links.

A sign-in starts a session in the store and gives the browser Quart-Auth's signed cookie
holding its id (see :mod:`hitl.identity`). Failed sign-ins are throttled per account and
per client address, and a failure never says whether the user exists: the same message,
and the same work (:meth:`~hitl.accounts.Accounts.verify_password` hashes against a
dummy). A sign-in form posted from another origin is refused by the guard (login CSRF).
"""

from __future__ import annotations

import ipaddress
import math
from typing import cast
from urllib.parse import urlsplit

from quart import Blueprint, Response, current_app, redirect, render_template, request, url_for
from quart.typing import ResponseReturnValue
from quart_auth import AuthUser, login_user, logout_user
from quart_schema import DataSource, document_querystring, document_request
from werkzeug.urls import iri_to_uri

from .accounts import Identity, Method, User
from .errors import HitlError, error_body
from .forms import CsrfForm, LoginForm, LoginQuery
from .guard import identity_of
from .identity import Authenticator
from .openapi import PAGE, SEE_OTHER, answers
from .pages import error_page, wants_html

auth = Blueprint("auth", __name__)

WRONG = "Wrong user name or password."
MAX_NEXT = 2000
MAX_LINK = 200  # a link's token is 43 characters


class SignInRefused(HitlError):
    """A wrong name or password (401), or too many failures lately (429)."""

    status = 401

    def __init__(self, message: str, status: int = 401, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def authenticator() -> Authenticator:
    return cast(Authenticator, current_app.extensions["identity"])


def local_path(target: str | None) -> str:
    """``target`` if it is a path on this site, else ``/``: never another site, whatever
    a browser makes of it (``//host``, ``/\\host``, a tab or newline it drops, a scheme);
    ASCII only, as a header must be."""
    if (not target or len(target) > MAX_NEXT or not target.startswith("/")
            or target[1:2] in ("/", "\\") or "\\" in target
            or any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in target)):
        return "/"
    parts = urlsplit(target)
    return iri_to_uri(target) if not parts.scheme and not parts.netloc else "/"


def throttle_keys(name: str) -> list[str]:
    """What failures are counted by: the account named, and the client's address (an
    IPv6 client by its /64, which one machine usually has whole)."""
    keys = [f"user:{name.strip().lower()[:64]}"]
    client = request.scope.get("client")
    try:
        address = ipaddress.ip_address(client[0]) if client else None
    except ValueError:
        address = None
    if address is not None and address.version == 6:
        keys.append(f"addr:{ipaddress.ip_network(f'{address}/64', strict=False)}")
    elif address is not None:
        keys.append(f"addr:{address}")
    return keys


async def verify_sign_in(name: str, password: str) -> User:
    """The user, if the name and password are theirs; else SignInRefused (401 or 429)."""
    accounts = authenticator().accounts
    keys = throttle_keys(name)
    wait = await accounts.throttled(keys)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise SignInRefused(f"Too many failed sign-ins: try again in {seconds} seconds.",
                            429, seconds)
    user = await accounts.verify_password(name, password)
    if user is None:
        await accounts.record_failure(keys)
        raise SignInRefused(WRONG)
    return user


async def start_session(user: User, method: Method) -> None:
    """A new session for ``user``; the browser's previous one, if any, ends."""
    identity = authenticator()
    previous = identity.session_id(request.scope)
    if previous:
        await identity.accounts.end_session(previous)
    session_id = await identity.accounts.start_session(user, method)
    login_user(AuthUser(session_id))  # Quart-Auth writes the cookie on the way out


async def login_form(next_path: str, name: str = "", error: str | None = None,
                     status: int = 200) -> Response:
    html = await render_template("login.html", next=next_path, name=name, error=error)
    return Response(html, status, content_type="text/html; charset=utf-8")


@auth.get("/login")
@document_querystring(LoginQuery)
@answers(ok={200: PAGE, 303: SEE_OTHER})
async def login() -> ResponseReturnValue:
    """The sign-in form; a browser signed in already (or with sign-in off) goes on."""
    next_path = local_path(request.args.get("next"))
    if identity_of(request.scope) is not None:
        return redirect(next_path, 303)
    return await login_form(next_path)


@auth.post("/login")
@document_request(LoginForm, source=DataSource.FORM)
@answers(401, 429, ok={303: SEE_OTHER})
async def sign_in() -> ResponseReturnValue:
    """Check the password, start a session, and go where the browser was going (303)."""
    form = await request.form
    name, next_path = form.get("username", ""), local_path(form.get("next"))
    if authenticator().mode == "none":
        return redirect(next_path, 303)
    try:
        user = await verify_sign_in(name, form.get("password", ""))
    except SignInRefused as refused:
        response = (await login_form(next_path, name[:64], refused.message, refused.status)
                    if wants_html() else
                    Response(error_body(refused.message), refused.status,
                             content_type="application/json"))
        if refused.retry_after is not None:
            response.headers["Retry-After"] = str(refused.retry_after)
        return response
    await start_session(user, "password")
    return redirect(next_path, 303)


@auth.post("/logout")
@document_request(CsrfForm, source=DataSource.FORM)
@answers(ok={303: SEE_OTHER})
async def logout() -> ResponseReturnValue:
    """End this browser's session (a form post with its token, like every other)."""
    identity = authenticator()
    session_id = identity.session_id(request.scope)
    if session_id:
        await identity.accounts.end_session(session_id)
    logout_user()
    return redirect(url_for("auth.login"), 303)


@auth.get("/login/once/<token>")
@answers(410, ok={303: SEE_OTHER})
async def sign_in_once(token: str) -> ResponseReturnValue:
    """Spend a one-time sign-in link (``hitl serve``'s first start, ``hitl users link``)."""
    if authenticator().mode == "none":
        return redirect("/", 303)
    if len(token) > MAX_LINK:
        return await error_page("This is not a sign-in link.", 400)
    user = await authenticator().accounts.use_link(token)
    if user is None:
        return await error_page("This sign-in link is used, expired or unknown: a link works "
                                "once, within 15 minutes. Ask for a new one (hitl users "
                                "link NAME).", 410)
    await start_session(user, "link")
    return redirect("/", 303)


@auth.app_template_global("signed_in")
def signed_in() -> Identity | None:
    """Who the page's header names: anyone signed in (nobody with sign-in off)."""
    identity = identity_of(request.scope)
    return identity if identity is not None and identity.method != "none" else None
