"""This node's mailboxes: one bounded channel per waiting side of a pairing.

Delivery never blocks. Whoever delivers (the memory bus directly, the Redis
listener from its thread through `trio.from_thread`) calls `deliver`, which
uses `send_nowait`: a pairing that is slow, finished or gone must not stall
delivery for every other pairing on the node. A full or closed mailbox, or
an unknown mailbox id, drops the event; each kind of drop is logged and
counted.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from ssh_sync_trio.bus.events import Aborted, Address, Event

log = logging.getLogger("ssh_sync_trio.bus")

# A side waits for one input at a time (a client message or a peer event)
# and each is sent once; room for a few covers an `Aborted` racing a normal
# event, or a client message arriving while a peer event is pending.
MAILBOX_CAPACITY = 4


@attrs.define(eq=False)
class Mailbox:
    """A waiting side's end of its mailbox."""

    address: Address
    receive: trio.MemoryReceiveChannel[Any]
    _send: trio.MemorySendChannel[Any]
    peer: Address | None = None

    async def get(self) -> Any:
        """The next item, in arrival order; waits, so call it under a deadline."""
        return await self.receive.receive()

    def local_sender(self) -> trio.MemorySendChannel[Any]:
        """A sender for this node's own inputs to the same side.

        The WebSocket reader feeds the client's messages through it, so the
        side reads its client and its peer from one stream, in order. Local
        senders wait when the mailbox is full (back-pressure on the client's
        socket); only bus delivery drops.
        """
        return self._send.clone()


@attrs.define(eq=False)
class Mailboxes:
    """The mailboxes open on this node, by id."""

    node: str
    _open: dict[str, tuple[trio.MemorySendChannel[Any], Mailbox]] = attrs.field(
        factory=dict
    )
    drops: Counter[str] = attrs.field(factory=Counter)

    @contextmanager
    def open(self) -> Iterator[Mailbox]:
        """A new mailbox with a fresh id; it is gone when the block ends."""
        send, receive = trio.open_memory_channel[Any](MAILBOX_CAPACITY)
        mailbox_id = secrets.token_hex(8)
        mailbox = Mailbox(Address(self.node, mailbox_id), receive, send)
        self._open[mailbox_id] = (send, mailbox)
        try:
            yield mailbox
        finally:
            del self._open[mailbox_id]
            send.close()
            receive.close()

    def deliver(self, mailbox_id: str, event: Event) -> bool:
        """Hand `event` to the mailbox without waiting; False if dropped."""
        entry = self._open.get(mailbox_id)
        if entry is None:
            return self._drop("no_mailbox", mailbox_id, event)
        try:
            entry[0].send_nowait(event)
        except trio.WouldBlock:
            return self._drop("mailbox_full", mailbox_id, event)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return self._drop("mailbox_closed", mailbox_id, event)
        return True

    def abort_all(self, reason: str) -> int:
        """Tell every waiting side on this node that its pairing is over."""
        for mailbox_id in list(self._open):
            self.deliver(mailbox_id, Aborted(reason))
        return len(self._open)

    def abort_where_peer_on(self, node: str, reason: str) -> int:
        """Abort the pairings whose other side lives on `node`."""
        ids = [
            i
            for i, (_, box) in self._open.items()
            if box.peer and box.peer.node == node
        ]
        for mailbox_id in ids:
            self.deliver(mailbox_id, Aborted(reason))
        return len(ids)

    def peer_nodes(self) -> set[str]:
        """The other nodes that this node's pairings currently depend on."""
        return {
            b.peer.node
            for _, b in self._open.values()
            if b.peer and b.peer.node != self.node
        }

    def __len__(self) -> int:
        return len(self._open)

    def _drop(self, why: str, mailbox_id: str, event: Event) -> bool:
        self.drops[why] += 1
        # Expected after a pairing ends (a late Aborted); worth a line all
        # the same, since a steady stream of drops means a bug or an attack.
        log.info("dropped %s for mailbox %s: %s", type(event).__name__, mailbox_id, why)
        return False
