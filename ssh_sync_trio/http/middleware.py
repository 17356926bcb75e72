"""ASGI middleware: the body size limit and the access log.

Both are plain ASGI so that they see every request, WebSocket upgrades
included, before Starlette does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ssh_sync_trio.http.errors import BodyTooLarge, error_response

access_log = logging.getLogger("ssh_sync_trio.access")


@attrs.define(eq=False)
class LimitBody:
    """Refuse bodies over `limit` bytes with 413, without reading them all.

    A declared Content-Length over the limit is refused before a byte is
    read; a chunked body is counted as it streams, and the request fails
    with 413 the moment it passes the limit.
    """

    app: ASGIApp
    limit: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await error_response(413, str(BodyTooLarge(self.limit)))(
                scope, receive, send
            )
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


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
