"""The pairing WebSockets: Starlette endpoints around the handshake.

Each connection gets a nursery that owns its side of the pairing: a reader
task turns the client's frames into mailbox items (so the side reads its
client and its peer from one ordered stream, and sees a disconnect as the
next item), and the side itself runs the protocol steps. When the side ends
the reader is cancelled; when the client goes, the side reads `ClientGone`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import attrs
import trio
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ssh_sync_trio.auth.tokens import Unauthorized
from ssh_sync_trio.http.auth import authenticate, services
from ssh_sync_trio.pairing.handshake import (
    ClientClosed,
    ClientGone,
    ClientMessage,
    Side,
)
from ssh_sync_trio.pairing.service import Pairings
from ssh_sync_trio.storage.store import Unavailable

log = logging.getLogger("ssh_sync_trio.pairing")

# docs/protocol-notes.md: larger client messages are refused. The server
# (hypercorn) drops a connection whose messages are far larger still.
MAX_MESSAGE_BYTES = 1024 * 1024
TOO_LARGE = "Message too large"
# The zero value of the `data` the client expects at each side, sent with
# an error as the Go server did.
NEW_MACHINE_ZERO: dict[str, Any] = {"message": ""}
EXISTING_MACHINE_ZERO: dict[str, Any] = {"public_key": None}
CLOSE_TIMEOUT = 2.0


@attrs.define(eq=False)
class WebSocketLink:
    """Writes the server's binary JSON frames to one client."""

    socket: WebSocket

    async def send(self, data: dict[str, Any]) -> None:
        await self._frame({"data": data, "error": False, "error_message": ""})

    async def fail(self, message: str, zero: dict[str, Any]) -> None:
        """Send an error frame; the caller closes the socket next."""
        await self._frame({"data": zero, "error": True, "error_message": message})

    async def _frame(self, body: dict[str, Any]) -> None:
        # The client skips text frames: every frame must be binary.
        try:
            await self.socket.send_bytes(json.dumps(body).encode())
        except (WebSocketDisconnect, OSError, RuntimeError):
            raise ClientClosed() from None


async def new_machine(socket: WebSocket) -> None:
    """`GET /api/v1/setup/existing`: machine B's side, no authentication."""
    await socket.accept()
    await _run(socket, services(socket).pairings, "new", NEW_MACHINE_ZERO, None)


async def existing_machine(socket: WebSocket) -> None:
    """`GET /api/v1/setup/challenge`: machine A, authenticated before the upgrade."""
    try:
        caller = await authenticate(socket)
    except Unauthorized:
        await socket.send_denial_response(
            JSONResponse({"message": "unauthorized"}, 401)
        )
        return
    except Unavailable:
        await socket.send_denial_response(
            JSONResponse({"message": "storage unavailable, try again"}, 503)
        )
        return
    await socket.accept()
    await _run(
        socket,
        services(socket).pairings,
        "existing",
        EXISTING_MACHINE_ZERO,
        caller.user.username,
    )


async def _run(
    socket: WebSocket,
    pairings: Pairings,
    role: str,
    zero: dict[str, Any],
    username: str | None,
) -> None:
    link = WebSocketLink(socket)
    error: str | None = None
    async with pairings.bus.open_mailbox() as mailbox, trio.open_nursery() as nursery:
        nursery.start_soon(_read_client, socket, mailbox.local_sender())
        side = Side(role, mailbox, link, pairings.bus, pairings.timeouts)
        if username is None:
            error = await pairings.run_challenger(side)
        else:
            error = await pairings.run_responder(side, username)
        nursery.cancel_scope.cancel()
    if error is not None:
        await _end(socket, error, zero)
    else:
        await _close(socket)


async def _read_client(socket: WebSocket, inbox: trio.MemorySendChannel[Any]) -> None:
    """Feed the client's messages, then its departure, into the mailbox."""
    async with inbox:
        try:
            while True:
                message = await socket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await inbox.send(_parse(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the side has ended and closed its mailbox
        try:
            await inbox.send(ClientGone())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


def _parse(message: Mapping[str, Any]) -> ClientMessage:
    raw = message.get("bytes")
    if raw is None:
        raw = (message.get("text") or "").encode()
    if len(raw) > MAX_MESSAGE_BYTES:
        return ClientMessage(None, TOO_LARGE)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack allows.
        return ClientMessage(None, "Message is not valid JSON")
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict):
        return ClientMessage(None, "Message has no data object")
    return ClientMessage(data)


async def _end(socket: WebSocket, message: str, zero: dict[str, Any]) -> None:
    try:
        await WebSocketLink(socket).fail(message, zero)
    except ClientClosed:
        return
    await _close(socket)


async def _close(socket: WebSocket) -> None:
    if socket.application_state != WebSocketState.CONNECTED:
        return
    with trio.move_on_after(CLOSE_TIMEOUT):
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            await socket.close(code=1000)
