"""A Python client of hitl's HTTP API, blocking (:class:`Client`) or asyncio
(:class:`AsyncClient`), with the same methods::

    from hitl.client import Client

    with Client("http://127.0.0.1:8000", token="hitl_...") as hitl:
        task = hitl.submit("Summarise this article: ...", title="Weekly summary")
        done = hitl.wait(task.task_id, timeout=3600)
        print(done.status, done.final_result)

It needs only httpx and httpx-sse: importing it loads nothing of the server.
"""

from .aio import AsyncClient
from .calls import SubmitOptions
from .errors import Conflict, Forbidden, HitlError, Invalid, NotFound, Unauthorized, Unavailable
from .models import Event, Review, Task, TaskPage
from .sync import Client

__all__ = ["AsyncClient", "Client", "Conflict", "Event", "Forbidden", "HitlError", "Invalid",
           "NotFound", "Review", "SubmitOptions", "Task", "TaskPage", "Unauthorized",
           "Unavailable"]
