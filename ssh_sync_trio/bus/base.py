"""What a bus promises, whichever process or store backs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

import attrs

from ssh_sync_trio.bus.events import Address, Event
from ssh_sync_trio.bus.mailboxes import Mailbox, Mailboxes


class BusError(Exception):
    """Base of the bus's refusals."""


class PhraseTaken(BusError):
    """The phrase is already registered; make up another."""


class TooManyPending(BusError):
    """The user already has as many open phrases as allowed."""


class BusUnavailable(BusError):
    """The bus cannot serve pairings right now (Redis is unreachable)."""


class PeerUnreachable(BusError):
    """No node listens where the event was sent: the peer's node is gone."""


# What a pairing's user reads when the bus fails under it.
UNAVAILABLE = "pairing service unavailable, try again"
SHUTTING_DOWN = "The server is restarting, try again"
PEER_NODE_GONE = "The other machine's server went away, try again"


@attrs.frozen
class BusStatistics:
    """A snapshot of a bus's state and of what it dropped, for tests and ops."""

    mailboxes: int
    phrases: int
    claims: int
    dropped: int
    malformed: int = 0
    unknown: int = 0
    healthy: bool = True


@attrs.define(eq=False)
class NodeBus:
    """What every bus shares: the node's id, limits and local mailboxes."""

    node_id: str
    max_pending_per_user: int
    mailboxes: Mailboxes = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.mailboxes = Mailboxes(self.node_id)

    @asynccontextmanager
    async def open_mailbox(self) -> AsyncIterator[Mailbox]:
        """A bounded mailbox on this node, gone when the block ends."""
        with self.mailboxes.open() as mailbox:
            yield mailbox

    def abort_local(self, reason: str) -> int:
        """End every pairing side waiting on this node, telling it why."""
        return self.mailboxes.abort_all(reason)


class Bus(Protocol):
    """How the two sides of a pairing meet and exchange events.

    - `register(phrase, username, challenger)`: the phrase is new, belongs to
      `username`, and expires after `ttl` seconds; raises `PhraseTaken`,
      `TooManyPending` or `BusUnavailable`.
    - `claim(phrase, username)`: atomic and single use; returns the
      challenger's address, or None for an unknown, expired, claimed or
      other user's phrase.
    - `release(phrase)`: the challenger is done; the phrase and claim go.
      Returns whether the phrase had been claimed.
    - `send(to, event)`: deliver to a mailbox on any node; never waits for
      the receiving side; raises `PeerUnreachable` when no node listens
      where `to` lives.
    - `open_mailbox()`: a bounded mailbox on this node, gone on exit.
    - `abort_local(reason)`: end every side waiting on this node.
    """

    node_id: str

    def open_mailbox(self) -> AbstractAsyncContextManager[Mailbox]: ...

    async def register(
        self, phrase: str, username: str, challenger: Address, *, ttl: float
    ) -> None: ...

    async def claim(self, phrase: str, username: str) -> Address | None: ...

    async def release(self, phrase: str) -> bool: ...

    async def send(self, to: Address, event: Event) -> None: ...

    def abort_local(self, reason: str) -> int: ...

    def statistics(self) -> BusStatistics: ...
