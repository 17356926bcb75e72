"""The pairing bus: how the two sides of a pairing find and talk to each other.

The handshake speaks only in the terms of `Bus` (register, claim, send,
mailboxes); `MemoryBus` delivers inside one process, `RedisBus` across the
processes of a cluster.
"""

from ssh_sync_trio.bus.base import (
    PEER_NODE_GONE,
    UNAVAILABLE,
    Bus,
    BusStatistics,
    BusUnavailable,
    PeerUnreachable,
    PhraseTaken,
    TooManyPending,
)
from ssh_sync_trio.bus.events import (
    Aborted,
    Accepted,
    Address,
    ChallengerKey,
    EncryptedMasterKey,
    Event,
)
from ssh_sync_trio.bus.mailboxes import Mailbox, Mailboxes
from ssh_sync_trio.bus.memory import MemoryBus

__all__ = [
    "PEER_NODE_GONE",
    "UNAVAILABLE",
    "Aborted",
    "Accepted",
    "Address",
    "Bus",
    "BusStatistics",
    "BusUnavailable",
    "ChallengerKey",
    "EncryptedMasterKey",
    "Event",
    "Mailbox",
    "Mailboxes",
    "MemoryBus",
    "PeerUnreachable",
    "PhraseTaken",
    "TooManyPending",
]
