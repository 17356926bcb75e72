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
from trio_websocket import WebSocketConnection, open_websocket_url

from ssh_sync_trio.server import RunningServer
from tests import harness, sshclient

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
async def new_machine_socket(node: RunningServer) -> AsyncIterator[WebSocketConnection]:
    """Machine B's socket: `/setup/existing`, no authentication."""
    async with open_websocket_url(harness.ws_url(node, "/setup/existing")) as ws:
        yield ws


@asynccontextmanager
async def existing_machine_socket(
    node: RunningServer, machine: sshclient.Machine
) -> AsyncIterator[WebSocketConnection]:
    """Machine A's socket: `/setup/challenge`, token in the upgrade request."""
    headers = [(k, v) for k, v in machine.headers().items()]
    url = harness.ws_url(node, "/setup/challenge")
    async with open_websocket_url(url, extra_headers=headers) as ws:
        yield ws


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
