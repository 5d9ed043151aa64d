"""The application factory: it only wires the parts together."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import quart_schema.conversion
from pydantic import TypeAdapter
from quart import Quart, Request, Response, redirect, request
from quart.typing import ResponseReturnValue
from quart_schema import RequestSchemaValidationError
from quart_schema.validation import QuerystringValidationError, RequestHeadersValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestTimeout
from werkzeug.routing import RequestRedirect

from . import openapi
from .asgi import ANSWERS_IN_SERVER_TASK, Edge, QuartHTTPConnection
from .auth_pages import auth
from .broker import Broker
from .config import Config
from .delivery import Dispatcher
from .errors import BODY_TIMEOUT_ERROR, INTERNAL_ERROR, HitlError, Invalid, error_body, plain
from .exporter import Exporter
from .guard import Guard
from .identity import Authenticator, Unauthorized
from .journal import Journal
from .pages import error_page, pages, wants_html
from .processors import Processor
from .queue import ReviewQueue
from .redis_news import make_backend
from .routes import api
from .runner import Runner
from .sse_asgi import answer_refused
from .store import open_store
from .ui_streams import FragmentCache
from .webhook_routes import hooks
from .work import WorkQueue
from .work_routes import work as work_api

log = logging.getLogger(__name__)

# quart-schema builds a new pydantic TypeAdapter for every conversion, each request body and
# each dict returned (profiled: ~10 and ~50 us); one per type, kept, does the same work.
quart_schema.conversion.TypeAdapter = functools.cache(TypeAdapter)  # type: ignore[attr-defined,assignment]


def create_app(config: Config | None = None, *, processor: Processor | None = None) -> Quart:
    """Build the hitl app; ``processor`` overrides ``config.processor`` (handy in tests)."""
    config = config or Config()
    app = Quart(__name__)
    app.request_class = JsonRequest
    if ANSWERS_IN_SERVER_TASK:  # Quart 0.23 answers in its own task differently: keep it
        app.asgi_http_class = QuartHTTPConnection
    # No 60 s wrapper task around every response: ours are small JSON, pages, or streams
    # that must never be cut (measured: one task less per request).
    app.config.update(MAX_CONTENT_LENGTH=config.max_body, RESPONSE_TIMEOUT=None, HITL=config)
    openapi.init_app(app, config)

    store = open_store(config.db, lease=config.flow_lease)
    broker = Broker(make_backend(config.broker, store), queue_size=config.queue_size,
                    queue_bytes=config.queue_bytes, history_size=config.history_size,
                    history_bytes=config.history_bytes, heartbeat=config.heartbeat)
    journal = Journal(store, broker)
    work = WorkQueue(config, store, broker)
    runner = Runner(config, store, journal, broker, processor, work)
    broker.loader = store.load_history
    authenticator = Authenticator(config, store)
    for part in (Guard(config, authenticator), store, authenticator, broker, journal, runner,
                 Dispatcher(config, store, journal), FragmentCache(),
                 ReviewQueue(config, store, broker), work, Exporter(store)):
        part.init_app(app)

    app.before_request(answer_refused)  # after the guard's check: see hitl.sse_asgi
    app.register_blueprint(api)
    app.register_blueprint(hooks)
    app.register_blueprint(work_api)
    app.register_blueprint(pages)
    app.register_blueprint(auth)
    register_error_handlers(app)
    app.asgi_app = Edge(app, app.asgi_app)  # type: ignore[method-assign,assignment]
    return app


class JsonRequest(Request):
    """Quart's request, refusing a JSON body that is not UTF-8 like any malformed one, and
    one nested too deeply for Python's parser (Quart lets both escape as a 500)."""

    async def get_data(  # type: ignore[override]
        self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False
    ) -> str | bytes:
        """Quart's, waiting for the body under ``asyncio.timeout``: Quart's ``wait_for``
        costs a task per request body on Python 3.11 (profiled: ~10 us of a POST)."""
        if parse_form_data:
            await self._load_form_data()
        try:
            async with asyncio.timeout(self.body_timeout):
                data: bytes = await self.body
        except TimeoutError as error:
            raise RequestTimeout() from error
        if not cache:
            self.body.clear()
        return data.decode() if as_text else data

    async def get_json(self, force: bool = False, silent: bool = False,
                       cache: bool = True) -> Any:
        try:
            return await super().get_json(force, silent, cache)
        except UnicodeDecodeError as error:
            return None if silent else self.on_json_loading_failed(error)
        except RecursionError:
            if silent:
                return None
            raise Invalid("request body is nested too deeply") from None


async def error_response(message: str, status: int) -> ResponseReturnValue:
    """``{"error": "..."}`` for the API; a readable page (or htmx fragment) for the browser UI."""
    if wants_html():
        return await error_page(message, status)
    return Response(error_body(message), status, content_type="application/json")


def register_error_handlers(app: Quart) -> None:
    """Every error becomes a 4xx with a message (5xx only for our bugs)."""

    @app.before_request
    async def local_redirect() -> ResponseReturnValue | None:
        """werkzeug's redirect to a canonical URL (``/tasks//x`` to ``/tasks/x``) names the
        request's Host, and Quart sends it past every error handler: send the path only."""
        error = request.routing_exception
        if not isinstance(error, RequestRedirect):
            return None
        url = urlsplit(error.new_url)
        return redirect(urlunsplit(("", "", "/" + url.path.lstrip("/"), url.query, "")),
                        error.code)

    @app.errorhandler(HitlError)
    async def domain_error(error: HitlError) -> ResponseReturnValue:
        if isinstance(error, Unauthorized) and wants_html() and request.method == "GET":
            return redirect(f"/login?{urlencode({'next': request.full_path.rstrip('?')})}",
                            303)  # a page: sign in, then come back here
        return await error_response(error.message, error.status)

    @app.errorhandler(RequestSchemaValidationError)
    async def invalid_body(error: RequestSchemaValidationError) -> ResponseReturnValue:
        is_body = not isinstance(error, QuerystringValidationError | RequestHeadersValidationError)
        if is_body and request.method in ("POST", "PUT") and not request.is_json:
            return await error_response(
                "request body must be JSON (Content-Type: application/json)", 415)
        return await error_response(describe_validation(error.validation_error), 400)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> ResponseReturnValue:
        status = error.code or 500
        message = {400: "malformed request body (invalid JSON?)", 408: BODY_TIMEOUT_ERROR,
                   413: "request body is too large"}.get(status, error.description or error.name)
        response = await app.make_response(await error_response(message, status))
        if isinstance(error, MethodNotAllowed) and error.valid_methods:  # RFC 9110: say which
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> ResponseReturnValue:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return await error_response(INTERNAL_ERROR, 500)


def describe_validation(error: Exception) -> str:
    """Turn pydantic's error list into one readable line: 'data: must not be empty'."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    parts = []
    for item in errors():
        field = ".".join(str(part) for part in item.get("loc", ())) or "body"
        parts.append(f"{field}: {plain(item)}")
    return "; ".join(parts) or "invalid request body"
