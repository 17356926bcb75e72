"""Both sides of a pairing, driven over real WebSockets as the client does.

Every read has a deadline (`READ_TIMEOUT`), so a server that leaves a side
waiting fails the test instead of hanging it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionRejected, WebSocketConnection, wrap_client_stream

from ssh_sync_trio.server import RunningServer
from tests import sshclient

READ_TIMEOUT = 10.0
MASTER_KEY = b"the user's master key, sealed for the new machine"


@attrs.frozen
class Reply:
    """One server message: its data, and the error fields."""

    data: dict[str, Any]
    error: bool
    error_message: str


async def send(ws: WebSocketConnection, data: dict[str, Any]) -> None:
    """One client message, as one binary frame."""
    await ws.send_message(sshclient.client_message(data))


async def receive(ws: WebSocketConnection, timeout: float = READ_TIMEOUT) -> Reply:
    """The next server message; it must be a binary frame of JSON."""
    with trio.fail_after(timeout):
        raw = await ws.get_message()
    assert isinstance(raw, bytes), "the client skips text frames"
    body = json.loads(raw)
    return Reply(body["data"], body["error"], body["error_message"])


@asynccontextmanager
async def open_socket(
    node: RunningServer, path: str, headers: list[tuple[str, str]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket to `path` under `/api/v1`, on a TCP stream we own.

    trio-websocket's own `open_websocket_url` never closes its TCP stream
    when the server closes first (it waits for the server's TCP close, then
    forgets the socket), which leaks a socket per test; owning the stream
    here closes it whatever happened.
    """
    host, port = node.url.removeprefix("http://").rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        async with stream, trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery, stream, host, "/api/v1" + path, extra_headers=headers or []
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(READ_TIMEOUT) as cleanup:
                    cleanup.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* ConnectionRejected as rejected:
        # Raised in the connection's reader task; tests expect it bare.
        raise rejected.exceptions[0] from None


def new_machine_socket(node: RunningServer) -> Any:
    """Machine B's socket: `/setup/existing`, no authentication."""
    return open_socket(node, "/setup/existing")


def existing_machine_socket(node: RunningServer, machine: sshclient.Machine) -> Any:
    """Machine A's socket: `/setup/challenge`, token in the upgrade request."""
    return open_socket(node, "/setup/challenge", list(machine.headers().items()))


async def ask_for_phrase(ws: WebSocketConnection, new: sshclient.Machine) -> str:
    """B's steps 1-2: say who it is, get the phrase."""
    await send(ws, {"username": new.username, "machine_name": new.machine_name})
    reply = await receive(ws)
    assert not reply.error, reply.error_message
    return str(reply.data["message"])


async def pair(
    node_b: RunningServer,
    node_a: RunningServer,
    new: sshclient.Machine,
    existing: sshclient.Machine,
    master_key: bytes = MASTER_KEY,
) -> bytes:
    """A whole pairing, B on `node_b` and A on `node_a`; B's master key."""
    async with new_machine_socket(node_b) as b:
        phrase = await ask_for_phrase(b, new)
        async with existing_machine_socket(node_a, existing) as a:
            await send(a, {"challenge": phrase})
            accepted = await receive(b)
            assert accepted.data == {"message": "Challenge accepted!"}, accepted
            await send(b, sshclient.pairing_public_keys(new))
            offered = await receive(a)
            assert not offered.error, offered.error_message
            assert base64.b64decode(offered.data["public_key"]) == new.public_key_pem
            sealed = base64.b64encode(master_key).decode()
            await send(a, {"encrypted_master_key": sealed})
        got = await receive(b)
        assert not got.error, got.error_message
        done = await receive(b)
        assert done.data == {"message": "Everything is done, you can now use ssh-sync"}
        return base64.b64decode(got.data["encrypted_master_key"])
