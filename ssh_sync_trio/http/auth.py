"""Who is calling: the machine a request's token proves."""

from __future__ import annotations

import attrs
from starlette.requests import HTTPConnection

from ssh_sync_trio.auth.tokens import Unauthorized, parse_bearer, verify_signature
from ssh_sync_trio.model import Machine, User
from ssh_sync_trio.services import Services
from ssh_sync_trio.storage import queries


@attrs.frozen
class Caller:
    """The machine a request's token proved, and its user."""

    user: User
    machine: Machine


def services(connection: HTTPConnection) -> Services:
    """The running server's services, for a request or a WebSocket."""
    return connection.app.state.services  # type: ignore[no-any-return]


async def authenticate(connection: HTTPConnection) -> Caller:
    """The calling machine, proven by its token; `Unauthorized` otherwise."""
    token = parse_bearer(connection.headers.get("authorization"))
    store = services(connection).store
    machine = await store.call(queries.find_caller, token.username, token.machine)
    if machine is None:
        raise Unauthorized()
    verify_signature(token, machine.public_key)
    return Caller(User(machine.user_id, token.username), machine)
