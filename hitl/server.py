"""Serving the app with hypercorn, configured in code, with a clean shutdown.

On SIGTERM or SIGINT the SSE streams are ended first (with a ``retry:`` hint already
sent, browsers come back), because hypercorn alone waits for open streams forever on
Python 3.12+ (hypercorn issue #308). A second signal exits at once.

HTTP/1.1 is served with hitl's subclass of hypercorn's protocol (:mod:`hitl.protocol`):
hypercorn's own answers to broken requests are hitl's JSON errors with the security
headers, and a request pipelined behind a stream ends the stream.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
from typing import cast

import hypercorn.protocol
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from quart import Quart

from .broker import Broker
from .config import Config
from .protocol import H11Protocol
from .runner import Runner
from .work import WorkQueue

log = logging.getLogger(__name__)


class BoundedSendConfig(HypercornConfig):
    """hypercorn's config, listening with a bounded kernel send buffer (``--send-buffer``).

    A client that stops reading looks like any other until the kernel refuses to queue
    more for it: with the send buffer left to grow, that was a megabyte or more per
    client, each message sent to it as to a reader (1,000 such clients took the others'
    p99 from 6 to 130 ms). Bounded, its writes soon wait, its messages then only queue
    in the broker, and it is dropped. Accepted connections inherit the listener's size.
    """

    send_buffer = 64 * 1024

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer)
        return sockets


def hypercorn_config(config: Config) -> HypercornConfig:
    settings = BoundedSendConfig()
    settings.send_buffer = config.send_buffer
    settings.bind = [f"[{config.host}]:{config.port}" if ":" in config.host
                     else f"{config.host}:{config.port}"]
    settings.backlog = config.backlog
    settings.graceful_timeout = config.shutdown_timeout
    settings.accesslog = None
    settings.errorlog = logging.getLogger("hypercorn.error")
    settings.keep_alive_timeout = 75
    settings.read_timeout = None
    return settings


async def serve(app: Quart, config: Config, *, stop: asyncio.Event | None = None,
                bind: list[str] | None = None, same_signal_within: float = 0.0) -> None:
    """Serve until ``stop`` is set (by default: on SIGTERM or SIGINT), then shut down in order.

    Streams end first, then hypercorn drains connections, then the app's parts close
    (flows stop unfailed, queued writes commit, the database closes). ``bind``: hypercorn
    binds instead of ``--host``/``--port`` (``fd://N``: a socket already listening).
    ``same_signal_within``: see :func:`stop_on_signals`.
    """
    if stop is None:
        stop = asyncio.Event()
        stop_on_signals(stop, same_signal_within)
    settings = hypercorn_config(config)
    if bind:
        settings.bind = bind

    async def shutdown_trigger() -> None:
        await stop.wait()
        cast(Runner, app.extensions["runner"]).accepting = False
        cast(WorkQueue, app.extensions["work"]).stop_waiting()  # long polls answer 204
        await cast(Broker, app.extensions["broker"]).close()

    tune_gc()
    hypercorn.protocol.H11Protocol = H11Protocol  # type: ignore[attr-defined]
    # Quart.__call__ only awaits app.asgi_app: serving that directly saves a frame per
    # open stream (hitl.asgi.Edge, the app's entry, is outermost there).
    await hypercorn_serve(app.asgi_app, settings, shutdown_trigger=shutdown_trigger,
                          mode="asgi")  # Edge is a plain callable returning coroutines


def tune_gc() -> None:
    """Keep the garbage collector off the latency path of thousands of open streams.

    Freezing moves the objects of start-up (Quart, pydantic, Jinja and their modules) out
    of every future collection, and a larger first-generation threshold collects less
    often while connections pile up: the fan-out bench connects 5,000 watchers in 3.7 s
    instead of 5.1 s with this, at the same memory.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)


def stop_on_signals(stop: asyncio.Event, same_signal_within: float = 0.0) -> None:
    """First SIGTERM/SIGINT sets ``stop``; a second one exits at once.

    A child of ``hitl serve --workers`` takes a second signal that comes within
    ``same_signal_within`` seconds of the first as the same request: Ctrl-C in a terminal
    (or systemd's stop) signals every process of the group, and the parent passes the
    signal on as well, which must not turn a graceful shutdown into an abrupt one.
    """
    loop = asyncio.get_running_loop()
    first: list[float] = []

    def on_signal(signum: int) -> None:
        if stop.is_set() and loop.time() - first[0] < same_signal_within:
            log.debug("signal %s again at once: the same request", signal.Signals(signum).name)
            return
        if stop.is_set():
            log.warning("second signal: exiting at once")
            os._exit(128 + signum)
        log.info("signal %s: shutting down", signal.Signals(signum).name)
        first.append(loop.time())
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
