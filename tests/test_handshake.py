"""The handshake and the memory bus as pure logic, on trio's test clock.

Rules: no socket and no database here: the client is a list that records
what the side sent, storage is a fake answering the three queries a
challenger makes, so `autojump_clock` can run the real default deadlines
(30 s) in no time. What sockets add is tested in test_pairing.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from ssh_sync_trio.bus import Accepted, ChallengerKey, MemoryBus
from ssh_sync_trio.bus.mailboxes import MAILBOX_CAPACITY
from ssh_sync_trio.model import Machine, User
from ssh_sync_trio.pairing import handshake
from ssh_sync_trio.pairing.handshake import (
    ClientMessage,
    PairingFailed,
    PhraseQuota,
    Side,
    Timeouts,
)
from ssh_sync_trio.storage import queries

DEFAULTS = Timeouts(challenge=30.0, step=30.0)


@attrs.define
class RecordingLink:
    """A client that keeps what it was sent."""

    sent: list[dict[str, Any]] = attrs.field(factory=list)

    async def send(self, data: dict[str, Any]) -> None:
        self.sent.append(data)


@attrs.define
class FakeStore:
    """Answers a challenger's queries: the user exists, the name is free."""

    async def call(self, query: Any, *args: Any) -> Any:
        if query is queries.find_user:
            return User(uuid.uuid4(), args[0])
        if query is queries.machine_exists:
            return False
        if query is queries.add_machine:
            return Machine(uuid.uuid4(), args[0], args[1].name, args[1].public_key)
        raise AssertionError(f"unexpected query {query.__name__}")


async def test_default_challenge_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = MemoryBus("n", max_pending_per_user=5)
    link = RecordingLink()
    async with bus.open_mailbox() as mailbox:
        side = Side("new", mailbox, link, bus, DEFAULTS)
        hello = {"username": "ada", "machine_name": "desktop"}
        mailbox.local_sender().send_nowait(ClientMessage(hello))
        started = trio.current_time()
        with pytest.raises(PairingFailed) as failed:
            await handshake.challenger(side, FakeStore(), PhraseQuota(10))  # type: ignore[arg-type]
        assert trio.current_time() - started == pytest.approx(30.0)
    assert failed.value.message == "Challenge timed out"
    assert len(link.sent) == 1 and link.sent[0]["message"].count("-") == 2
    assert bus.statistics().phrases == 0


async def test_default_step_timeout(autojump_clock: trio.testing.MockClock) -> None:
    bus = MemoryBus("n", max_pending_per_user=5)
    async with bus.open_mailbox() as challenger, bus.open_mailbox() as responder:
        await bus.register("a-b-c", "ada", challenger.address, ttl=35)
        side = Side("existing", responder, RecordingLink(), bus, DEFAULTS)
        responder.local_sender().send_nowait(ClientMessage({"challenge": " A-B-C "}))
        started = trio.current_time()
        with pytest.raises(PairingFailed) as failed:
            await handshake.responder(side, "ada")
        assert trio.current_time() - started == pytest.approx(30.0)
        # The challenger was told where the responder listens.
        accepted = challenger.receive.receive_nowait()
        assert accepted == Accepted(responder.address)
    assert failed.value.message == "Pairing timed out waiting for the other machine"
    assert failed.value.peer_reason == "The existing machine timed out"


async def test_claim_is_single_use_and_per_user() -> None:
    bus = MemoryBus("n", max_pending_per_user=5)
    async with bus.open_mailbox() as mailbox:
        await bus.register("a-b-c", "ada", mailbox.address, ttl=30)
        assert await bus.claim("a-b-c", "bob") is None
        assert await bus.claim("a-b-c", "ada") == mailbox.address
        assert await bus.claim("a-b-c", "ada") is None
        assert await bus.release("a-b-c") is True
    stats = bus.statistics()
    assert (stats.mailboxes, stats.phrases, stats.claims) == (0, 0, 0)


async def test_claim_after_expiry_fails(autojump_clock: trio.testing.MockClock) -> None:
    bus = MemoryBus("n", max_pending_per_user=5)
    async with bus.open_mailbox() as mailbox:
        await bus.register("a-b-c", "ada", mailbox.address, ttl=30)
        await trio.sleep(30)
        assert await bus.claim("a-b-c", "ada") is None
        await bus.release("a-b-c")


async def test_full_mailbox_drops_and_counts() -> None:
    bus = MemoryBus("n", max_pending_per_user=5)
    async with bus.open_mailbox() as mailbox:
        for _ in range(MAILBOX_CAPACITY + 2):
            await bus.send(mailbox.address, ChallengerKey(b"k", None))
        assert bus.mailboxes.drops == {"mailbox_full": 2}
    await bus.send(mailbox.address, ChallengerKey(b"k", None))
    assert bus.mailboxes.drops["no_mailbox"] == 1
    assert bus.statistics().dropped == 3
