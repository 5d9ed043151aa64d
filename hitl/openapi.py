"""``/openapi.json``: quart-schema's document, completed with what every route answers.

Each route records its own answers next to it (:func:`answers`): its successes with
their bodies, and the errors its service raises. What any request may meet before or
around its route is added here once, as the guard and the error handlers give it
(:func:`edge_codes`): a bad Host (400), no sign-in (401, or for a page a 303 to
``/login``), the policy or a cross-site post (403), and for a request with a body its
timeout (408), size (413) and a store that cannot take changes (503). The two JSON
streams are answered in plain ASGI (:mod:`hitl.sse_asgi`) and have no Quart rule:
they are added at build time (:data:`PLAIN_ASGI`). ``tests/test_openapi.py`` holds every
rule to having answers, and runs schemathesis against a live server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel
from quart import Quart
from quart_schema import QuartSchema
from quart_schema.openapi import (
    APIKeySecurityScheme,
    HttpSecurityScheme,
    OpenAPIProvider,
    SecuritySchemeBase,
)
from werkzeug.routing.rules import Rule

from .config import Config
from .errors import API_BLUEPRINTS, BODY_TIMEOUT_ERROR
from .guard import is_public
from .responses import ErrorOut

F = TypeVar("F", bound=Callable[..., Any])
ANSWERS = "_hitl_answers"


@dataclass(frozen=True, slots=True)
class Media:
    """An answer that is not a JSON model: a page, a redirect, nothing, a stream."""

    content_type: str | None  # None: no body
    description: str
    headers: Mapping[str, str] = field(default_factory=dict)  # name: what it says
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})


PAGE = Media("text/html", "a page (for htmx, the fragment it swaps in)")
SEE_OTHER = Media(None, "go on to Location", {"Location": "where to go next"})
NO_CONTENT = Media(None, "nothing (no body)")
# One event of a stream, as an SSE client parses it (``data`` is JSON on the API's
# streams, an HTML fragment for htmx on the pages').
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string"}, "event": {"type": "string"},
                            "id": {"type": "string", "pattern": "^[0-9]+$"}}}
EVENTS = Media("text/event-stream", "Server-Sent Events, until the stream ends or the "
               "client leaves; a retry hint first, heartbeat comments while idle",
               schema=SSE_EVENT)
FILE = Media("*/*", "the file")
METRICS = Media("text/plain", "the Prometheus text format (version 0.0.4)")

Reply = type[BaseModel] | Media


@dataclass(frozen=True, slots=True)
class Answers:
    """What one route answers: its successes, and the errors its own service raises."""

    ok: Mapping[int, Reply]
    errors: tuple[int, ...] = ()


def answers(*errors: int, ok: Mapping[int, Reply] | None = None) -> Callable[[F], F]:
    """Record a route's answers for ``/openapi.json``: the errors its service raises, and
    its successes that quart-schema's decorators do not already give (the edge's are added
    to them)."""

    def record(func: F) -> F:
        setattr(func, ANSWERS, Answers(dict(ok or {}), errors))
        return func

    return record


ERRORS = {
    400: "bad request: a field, parameter or header named in the error, or a Host this "
         "service does not answer to (--allowed-hosts)",
    401: "not signed in: no session or token, or a token unknown, revoked or expired",
    403: "not allowed: the caller's role or the task's reviewers refuse it, or a "
         "cross-site request (Origin, a form's CSRF token)",
    404: "no such task (or one the caller may not see)",
    408: BODY_TIMEOUT_ERROR,
    409: "not in a state that allows it: already decided or finished, a stale attempt, "
         "a vote already cast, an Idempotency-Key used for another request",
    410: "the sign-in link is used, expired or unknown",
    413: "the request body is too large (--max-body)",
    415: "the request body must be JSON (Content-Type: application/json)",
    429: "too many failed sign-ins lately; Retry-After says when to try again",
    503: "the service is shutting down or cannot store changes now: send it again shortly",
}
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def renders(blueprint: str | None) -> tuple[str, ...]:
    """How an error is rendered on a blueprint's routes (:func:`hitl.pages.wants_html`)."""
    if blueprint in API_BLUEPRINTS:
        return ("application/json",)
    return ("text/html",) if blueprint == "pages" else ("application/json", "text/html")


def edge_codes(path: str, method: str, blueprint: str | None) -> set[int]:
    """What any request to ``path`` may meet outside its route: the guard's checks and the
    error handlers' (:meth:`hitl.guard.Guard.check_request`, ``register_error_handlers``)."""
    codes = {400, 401}  # a bad Host; a bearer token that proves nothing (public paths too)
    if method == "GET" and "text/html" in renders(blueprint):
        codes.add(303)  # a browser not signed in is sent to /login, not told 401
        if "application/json" not in renders(blueprint):
            codes.discard(401)
    if not is_public(path):
        codes.add(403)  # the policy (a worker is refused everything else)
    if method in BODY_METHODS:  # the guard may read a form body: its origin, time, size
        codes |= {403, 408, 413, 503}
    return codes


class Provider(OpenAPIProvider):
    """quart-schema's provider, with hitl's answers, security and plain-ASGI streams."""

    _built: dict[str, Any] | None = None  # the document, once built (see schema)

    def generate_rules(self) -> Iterable[Rule]:
        """Every rule, quart-schema's hidden static files and this document included."""
        return (rule for rule in self._app.url_map.iter_rules() if not rule.websocket)

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        func = self._app.view_functions[rule.endpoint]
        found = getattr(func, ANSWERS, BUILT_IN.get(rule.endpoint))
        blueprint = rule.endpoint.rpartition(".")[0] or None
        for path, item in paths.items():
            for method, operation in item.items():
                if found is not None:  # else quart-schema's alone: tests/test_openapi.py fails
                    self.complete(operation, found, path, method.upper(), blueprint,
                                  components)
                if is_public(rule.rule):
                    operation["security"] = []  # no sign-in needed
        return paths, components

    def complete(self, operation: dict[str, Any], found: Answers, path: str, method: str,
                 blueprint: str | None, components: dict[str, Any]) -> None:
        """Add a route's recorded answers and the edge's to quart-schema's ``responses``."""
        responses = dict(operation["responses"])
        for status, reply in found.ok.items():
            responses.setdefault(status, self.reply(reply, components))
        for status in sorted(edge_codes(path, method, blueprint) | set(found.errors)):
            if status == 303:
                responses.setdefault(303, media_object(SEE_OTHER))
            else:
                responses.setdefault(status, self.error(status, blueprint, components))
        operation["responses"] = {str(code): responses[code] for code in sorted(responses)}

    def reply(self, reply: Reply, components: dict[str, Any]) -> dict[str, Any]:
        if isinstance(reply, Media):
            return media_object(reply)
        body, definitions = self.build_response_object(reply, None)
        components.update(definitions)
        return body

    def error(self, status: int, blueprint: str | None,
              components: dict[str, Any]) -> dict[str, Any]:
        """An error as its blueprint renders it: ``{"error": "..."}``, a page, or either."""
        body, _ = self.build_response_object(ErrorOut, None)
        components["ErrorOut"] = body["content"]["application/json"]["schema"]
        schemas = {"application/json": {"$ref": "#/components/schemas/ErrorOut"},
                   "text/html": {"type": "string"}}
        content = {media: {"schema": schemas[media]} for media in renders(blueprint)}
        answer: dict[str, Any] = {"description": ERRORS.get(status, ""), "content": content}
        if status == 429:
            answer["headers"] = header_objects({"Retry-After": "seconds to wait"})
        return answer

    def schema(self) -> dict[str, Any]:
        """The document, built at the first request and kept: the routes never change
        once serving, and building it takes tens of milliseconds on the event loop of a
        path anyone may ask."""
        if self._built is None:
            schema = super().schema()
            for route in PLAIN_ASGI:
                operation = {**route.operation, "responses": {}}
                self.complete(operation, route.answers, route.path, "GET", "api",
                              schema["components"]["schemas"])
                schema["paths"][route.path] = {"get": operation}
            self._built = schema
        return self._built


def media_object(media: Media) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": media.description}
    if media.content_type is not None:
        answer["content"] = {media.content_type: {"schema": dict(media.schema)}}
    if media.headers:
        answer["headers"] = header_objects(media.headers)
    return answer


def header_objects(headers: Mapping[str, str]) -> dict[str, Any]:
    return {name: {"description": text, "schema": {"type": "string"}}
            for name, text in headers.items()}


# Quart's and quart-schema's own routes, which hitl does not decorate.
BUILT_IN = {"static": Answers({200: FILE}, (404,)),
            "openapi": Answers({200: Media("application/json", "this document")})}

LAST_EVENT_ID = [
    {"name": "Last-Event-ID", "in": "header", "required": False,
     "description": "the id of the last event received: the stream replays what came after",
     "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"}},
    {"name": "last_event_id", "in": "query", "required": False,
     "description": "the same, for a client that cannot set headers",
     "schema": {"type": "string", "pattern": "^[0-9]{0,18}$"}},
]
TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "description": "a task's id, or a unique prefix of it (8+ characters)",
           "schema": {"type": "string"}}



@dataclass(frozen=True, slots=True)
class PlainRoute:
    """A ``GET`` answered in plain ASGI, ahead of Quart (which has no rule for it)."""

    path: str
    operation: Mapping[str, Any]  # the OpenAPI operation, but for its responses
    answers: Answers


# The two JSON streams of hitl.sse_asgi.
PLAIN_ASGI = (
    PlainRoute("/stream", {
        "operationId": "get_stream", "summary": "Every task's messages, live.",
        "description": "Event ids are the global message numbers. A submitter's stream "
                       "carries only their own tasks' messages. It never ends by itself.",
        "parameters": LAST_EVENT_ID}, Answers({200: EVENTS})),
    PlainRoute("/stream/{task_id}", {
        "operationId": "get_task_stream", "summary": "One task's messages, live.",
        "description": "Event ids are the task's message numbers; without Last-Event-ID "
                       "the task's latest message comes first. It ends, with "
                       '`data: {"status":"stream_closed"}`, once the task has.',
        "parameters": [TASK_ID, *LAST_EVENT_ID]}, Answers({200: EVENTS}, (404,))),
)


def security(config: Config) -> dict[str, Any]:
    """quart-schema's security settings for the sign-in mode: none with ``--auth none``."""
    if config.auth == "none":
        return {}
    schemes: dict[str, SecuritySchemeBase] = {  # a token (hitl tokens create), a browser's
        "bearer": HttpSecurityScheme(scheme="bearer"),  # session from POST /login
        "session": APIKeySecurityScheme(name="hitl_session", in_="cookie")}
    if config.auth == "proxy":  # the user, named by a --trusted-proxies address
        schemes["proxy"] = APIKeySecurityScheme(name="X-Forwarded-User", in_="header")
    return {"security_schemes": schemes, "security": [{name: []} for name in schemes]}


def init_app(app: Quart, config: Config) -> QuartSchema:
    """quart-schema on ``app``, serving ``/openapi.json`` (its UIs would load from CDNs)."""
    return QuartSchema(app, info={"title": "hitl", "version": "0.1.0"},
                       swagger_ui_path=None, redoc_ui_path=None, scalar_ui_path=None,
                       openapi_provider_class=Provider, **security(config))

