"""`MemoryBus`: both sides of every pairing in this one process.

Phrases live in a dict, each with a deadline on trio's clock; a claim is a
check-and-set inside one trio task step, so it is atomic without a lock.
"""

from __future__ import annotations

import attrs
import trio

from ssh_sync_trio.bus.base import BusStatistics, NodeBus, PhraseTaken, TooManyPending
from ssh_sync_trio.bus.events import Address, Event


@attrs.define(eq=False)
class _Phrase:
    username: str
    challenger: Address
    deadline: float
    claimed: bool = False


@attrs.define(eq=False)
class MemoryBus(NodeBus):
    """The single-node bus; see `Bus` for what each operation promises."""

    _phrases: dict[str, _Phrase] = attrs.field(init=False, factory=dict)

    async def register(
        self, phrase: str, username: str, challenger: Address, *, ttl: float
    ) -> None:
        now = trio.current_time()
        if phrase in self._phrases:
            raise PhraseTaken()
        if (
            sum(p.username == username for p in self._phrases.values())
            >= self.max_pending_per_user
        ):
            raise TooManyPending()
        self._phrases[phrase] = _Phrase(username, challenger, now + ttl)

    async def claim(self, phrase: str, username: str) -> Address | None:
        entry = self._phrases.get(phrase)
        if entry is None or entry.claimed or entry.username != username:
            return None
        if trio.current_time() >= entry.deadline:
            return None
        entry.claimed = True
        return entry.challenger

    async def release(self, phrase: str) -> bool:
        entry = self._phrases.pop(phrase, None)
        return entry is not None and entry.claimed

    async def send(self, to: Address, event: Event) -> None:
        # One process: every address is local, whatever node it names.
        self.mailboxes.deliver(to.mailbox, event)

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            mailboxes=len(self.mailboxes),
            phrases=len(self._phrases),
            claims=sum(p.claimed for p in self._phrases.values()),
            dropped=sum(self.mailboxes.drops.values()),
        )
