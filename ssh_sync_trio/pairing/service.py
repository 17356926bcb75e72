"""`Pairings`: runs the sides of pairings on this node, and counts them.

It owns what is per node rather than per pairing: the MAX_PENDING limit,
the log lines that open and close each pairing, and statistics that tests
use to check that nothing outlives a pairing.
"""

from __future__ import annotations

import logging
import time

import attrs

from ssh_sync_trio.bus import Bus
from ssh_sync_trio.config import Settings
from ssh_sync_trio.pairing import handshake
from ssh_sync_trio.pairing.handshake import PairingFailed, PhraseQuota, Side, Timeouts
from ssh_sync_trio.storage import Store

log = logging.getLogger("ssh_sync_trio.pairing")


@attrs.frozen
class PairingStatistics:
    """Sides running now on this node, and outcomes so far."""

    challengers: int
    responders: int
    completed: int
    failed: int


@attrs.define(eq=False)
class Pairings:
    """The pairing service of one node."""

    settings: Settings
    store: Store
    bus: Bus
    challengers: int = 0
    responders: int = 0
    completed: int = 0
    failed: int = 0
    quota: PhraseQuota = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.quota = PhraseQuota(self.settings.max_pending)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            self.settings.challenge_timeout, self.settings.pairing_step_timeout
        )

    def statistics(self) -> PairingStatistics:
        return PairingStatistics(
            self.challengers, self.responders, self.completed, self.failed
        )

    async def run_challenger(self, mailbox_side: Side) -> str | None:
        """Run machine B's side; returns the error sent to the client, if any."""
        self.challengers += 1
        started = time.perf_counter()
        pairing = mailbox_side.mailbox.address.mailbox
        try:
            username = await handshake.challenger(mailbox_side, self.store, self.quota)
        except PairingFailed as failure:
            return await self._failed(mailbox_side, pairing, failure, started)
        finally:
            self.challengers -= 1
        self._ended(pairing, f"completed for user {username}", started)
        return None

    async def run_responder(self, side: Side, username: str) -> str | None:
        """Run machine A's side for `username`; returns the client's error."""
        self.responders += 1
        started = time.perf_counter()
        try:
            challenger = await handshake.responder(side, username)
        except PairingFailed as failure:
            pairing = side.mailbox.peer.mailbox if side.mailbox.peer else "-"
            return await self._failed(side, pairing, failure, started, role="responder")
        finally:
            self.responders -= 1
        log.info(
            "pairing %s responder for user %s sent the master key (%.0f ms)",
            challenger.mailbox,
            username,
            (time.perf_counter() - started) * 1000,
        )
        return None

    async def _failed(
        self,
        side: Side,
        pairing: str,
        failure: PairingFailed,
        started: float,
        role: str = "new",
    ) -> str | None:
        self.failed += 1
        if failure.peer_reason is not None:
            await handshake.notify_peer(side, failure.peer_reason)
        self._ended(pairing, f"failed ({role} side): {failure.outcome}", started)
        return failure.message

    def _ended(self, pairing: str, outcome: str, started: float) -> None:
        if outcome.startswith("completed"):
            self.completed += 1
        log.info(
            "pairing %s %s after %.0f ms",
            pairing,
            outcome,
            (time.perf_counter() - started) * 1000,
        )
