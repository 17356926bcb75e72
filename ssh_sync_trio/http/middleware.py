"""ASGI middleware: the body size limit and the access log.

Both are plain ASGI so that they see every request, WebSocket upgrades
included, before Starlette does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ssh_sync_trio.http.errors import BodyTooLarge, error_response

access_log = logging.getLogger("ssh_sync_trio.access")


# How long a request answered early may go on sending a body that the
# server will not use; see `LimitBody`.
DRAIN_SECONDS = 5.0


@attrs.define(eq=False)
class LimitBody:
    """Refuse bodies over `limit` bytes with 413, without reading them all.

    A declared Content-Length over the limit is refused before a byte is
    read; a chunked body is counted as it streams, and the request fails
    with 413 the moment it passes the limit.

    A request answered before its body was read to the end (a 413, or a
    401 before an upload) has the rest of its body read and discarded
    before the response's last message goes out, for at most
    DRAIN_SECONDS. Hypercorn ends the request when the response is
    complete, and does so by queueing a disconnect for the application
    behind the body chunks it holds: with the queue full, the response
    never completes and the connection hangs; with unread data on it, the
    socket is reset and a client still sending (httpx, curl) loses the
    response.

    Known shortcoming: a client that is still sending after DRAIN_SECONDS
    can still fill that queue and leave its connection hung until the
    server stops; only hypercorn can fix that, by not blocking on the
    queue when it ends a request.
    """

    app: ASGIApp
    limit: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = _RequestBody(receive)

        async def send_when_read(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get(
                "more_body", False
            ):
                await body.drain()
            await send(message)

        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            refusal = error_response(413, str(BodyTooLarge(self.limit)))
            await refusal(scope, body.receive, send_when_read)
            return

        async def counted() -> Message:
            message = await body.receive()
            if body.seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send_when_read)


@attrs.define(eq=False)
class _RequestBody:
    """One request's body as received: bytes so far, and whether all came."""

    raw_receive: Receive
    seen: int = 0
    finished: bool = False

    async def receive(self) -> Message:
        message = await self.raw_receive()
        self.seen += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            self.finished = True
        return message

    async def drain(self) -> None:
        """Discard the rest of the body, for at most DRAIN_SECONDS."""
        with trio.move_on_after(DRAIN_SECONDS):
            while not self.finished:
                await self.receive()


@attrs.define(eq=False)
class AccessLog:
    """One line per request: method, path, status, duration, client address."""

    app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[Any] = ["-"]

        async def watched(message: Message) -> None:
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status[0] = message["status"]
            elif kind == "websocket.accept":
                status[0] = 101
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            client = scope.get("client") or ("-", 0)
            method = scope.get("method", "GET") if scope["type"] == "http" else "WS"
            access_log.info(
                "%s %s %s %.1fms %s",
                method,
                scope.get("path", ""),
                status[0],
                (time.perf_counter() - started) * 1000,
                client[0],
            )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
