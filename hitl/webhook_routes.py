"""``/api/webhooks``: admins list, add and remove webhook endpoints.

Thin routes: the guard has found who asks (401 if no one); :class:`hitl.webhooks.Webhooks`
asks the policy (403 unless an admin) and checks what is given (400 naming it).
"""

from __future__ import annotations

from typing import cast

from pydantic import BaseModel, Field
from quart import Blueprint, current_app
from quart_schema import validate_request

from .delivery import Dispatcher
from .openapi import answers
from .responses import NewWebhookOut, WebhookListOut
from .routes import who
from .schemas import MessageOut
from .webhooks import MAX_URL

hooks = Blueprint("webhooks", __name__)


class WebhookIn(BaseModel):
    url: str = Field(max_length=MAX_URL, description="where events are POSTed")
    events: list[str] = Field(default_factory=list, max_length=16,
                              description="the event types to send (none: all)")
    secret: str | None = Field(None, max_length=200,
                               description="whsec_<base64>; default: a new one")


def dispatcher() -> Dispatcher:
    return cast(Dispatcher, current_app.extensions["webhooks"])


@hooks.get("/api/webhooks")
@answers(ok={200: WebhookListOut})
async def list_webhooks() -> dict[str, object]:
    """Every endpoint (no secrets) with its latest delivery attempts."""
    return {"webhooks": await dispatcher().webhooks.listing(by=who())}


@hooks.post("/api/webhooks")
@validate_request(WebhookIn)
@answers(415, ok={201: NewWebhookOut})
async def add_webhook(data: WebhookIn) -> tuple[dict[str, object], int]:
    """Register an endpoint; the answer holds its secret, shown this once."""
    endpoint = await dispatcher().webhooks.add(data.url, data.events, data.secret, by=who())
    await dispatcher().sync()
    return {**endpoint.to_json(), "secret": endpoint.secret}, 201


@hooks.delete("/api/webhooks/<endpoint_id>")
@answers(404, ok={200: MessageOut})
async def remove_webhook(endpoint_id: str) -> dict[str, object]:
    """Remove an endpoint: no more deliveries to it."""
    await dispatcher().webhooks.remove(endpoint_id[:100], by=who())
    await dispatcher().sync()
    return {"message": f"webhook {endpoint_id} removed"}
