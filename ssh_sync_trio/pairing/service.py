"""`Pairings`: runs the sides of pairings on this node, and counts them.

It owns what is per node rather than per pairing: the MAX_PENDING limit,
the log lines that open and close each pairing, and statistics that tests
use to check that nothing outlives a pairing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable

import attrs

from ssh_sync_trio.bus import Bus
from ssh_sync_trio.config import Settings
from ssh_sync_trio.pairing import handshake
from ssh_sync_trio.pairing.handshake import (
    INTERNAL_ERROR,
    PairingFailed,
    PhraseQuota,
    Side,
    Timeouts,
)
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

    async def run_challenger(self, side: Side) -> str | None:
        """Run machine B's side; returns the error sent to the client, if any."""
        self.challengers += 1
        try:
            return await self._run(
                side, handshake.challenger(side, self.store, self.quota)
            )
        finally:
            self.challengers -= 1

    async def run_responder(self, side: Side, username: str) -> str | None:
        """Run machine A's side for `username`; returns the client's error."""
        self.responders += 1
        try:
            return await self._run(side, handshake.responder(side, username))
        finally:
            self.responders -= 1

    async def _run(self, side: Side, steps: Awaitable[str]) -> str | None:
        started = time.perf_counter()
        try:
            outcome = await steps
        except PairingFailed as failure:
            return await self._failed(side, failure, started)
        except Exception:
            # A bug, not a refusal: keep the traceback, and still end both
            # sides cleanly rather than leave the peer to its deadline.
            log.exception(
                "pairing %s (%s side) failed unexpectedly", side.pairing_id, side.role
            )
            crash = PairingFailed("internal error", INTERNAL_ERROR, INTERNAL_ERROR)
            return await self._failed(side, crash, started)
        if side.role == "new":
            self.completed += 1
        self._ended(side, outcome, started)
        return None

    async def _failed(
        self, side: Side, failure: PairingFailed, started: float
    ) -> str | None:
        self.failed += 1
        if failure.peer_reason is not None:
            await handshake.notify_peer(side, failure.peer_reason)
        self._ended(side, f"failed: {failure.outcome}", started)
        return failure.message

    def _ended(self, side: Side, outcome: str, started: float) -> None:
        log.info(
            "pairing %s (%s side) %s after %.0f ms",
            side.pairing_id,
            side.role,
            outcome,
            (time.perf_counter() - started) * 1000,
        )
