"""The two sides of a pairing, in domain terms: no sockets, no Redis.

Each side reads one ordered stream, its mailbox, which holds both what its
own client sent (fed by the WebSocket reader) and what the other side sent
through the bus. Every wait on that stream has a deadline. A side that ends
early tells the other side why, so no side waits on a peer that is gone.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import attrs
import trio

from ssh_sync_trio.auth.keys import InvalidKey, parse_public_key
from ssh_sync_trio.bus import (
    PEER_NODE_GONE,
    UNAVAILABLE,
    Aborted,
    Accepted,
    Bus,
    BusUnavailable,
    ChallengerKey,
    EncryptedMasterKey,
    Mailbox,
    PeerUnreachable,
    PhraseTaken,
    TooManyPending,
)
from ssh_sync_trio.bus.base import BusError
from ssh_sync_trio.model import NewMachine, User
from ssh_sync_trio.names import name_problem, storable
from ssh_sync_trio.pairing.phrases import make_phrase, normalise
from ssh_sync_trio.storage import Conflict, Store, queries
from ssh_sync_trio.storage.store import Unavailable

E = TypeVar("E")

log = logging.getLogger("ssh_sync_trio.pairing")

# The texts the client shows, from docs/protocol.md §4.
USER_NOT_FOUND = "User not found"
MACHINE_EXISTS = "Machine already exists"
CHALLENGE_TIMED_OUT = "Challenge timed out"
CHALLENGE_ACCEPTED = "Challenge accepted!"
INVALID_KEY = "Invalid public key format"
INVALID_CHALLENGE = "Invalid challenge response."
DONE = "Everything is done, you can now use ssh-sync"
# Ours, for what the protocol leaves open.
STEP_TIMED_OUT = "Pairing timed out waiting for the other machine"
CLIENT_TIMED_OUT = "Pairing timed out waiting for this machine"
STORAGE_UNAVAILABLE = "Storage unavailable, try again"
INTERNAL_ERROR = "Internal server error, try again"
TOO_MANY_FOR_USER = "Too many pairings pending for this user, try again later"
TOO_MANY_ON_NODE = "Too many pairings in progress, try again later"
UNEXPECTED = "Unexpected message"

# Tries at a fresh phrase when one is taken: with 7776**3 phrases, a second
# collision in a row means something else is wrong.
PHRASE_TRIES = 3
# How long a challenger that ends waits for the `Accepted` of a responder
# that claimed its phrase at the last moment, so as to tell it to stop.
LATE_ACCEPT_GRACE = 1.0
# Ceiling on the clean-up of a side: releasing a phrase, telling the peer.
CLEANUP_TIMEOUT = 2.0


class PairingFailed(Exception):
    """This side ends early.

    `message` goes to this side's client (None when it is gone);
    `peer_reason` goes to the other side (None when it already knows).
    """

    def __init__(
        self, outcome: str, message: str | None, peer_reason: str | None
    ) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.message = message
        self.peer_reason = peer_reason


@attrs.frozen
class ClientMessage:
    """One message from this side's client: its `data`, or what was wrong."""

    data: dict[str, Any] | None
    problem: str | None = None


@attrs.frozen
class ClientGone:
    """This side's client closed the connection."""


class ClientClosed(Exception):
    """Raised by a `ClientLink` whose client has gone while sending."""


class ClientLink(Protocol):
    """How a side writes to its own client (reading goes through the mailbox).

    `send` raises `ClientClosed` when the client is gone.
    """

    async def send(self, data: dict[str, Any]) -> None: ...


@attrs.frozen
class Timeouts:
    """The deadlines of a pairing, in seconds."""

    challenge: float
    step: float


@attrs.define(eq=False)
class Side:
    """One side's view: its mailbox, its client, the bus, its deadlines."""

    role: str
    mailbox: Mailbox
    client: ClientLink
    bus: Bus
    timeouts: Timeouts

    async def from_client(self, timeout: float | None = None) -> dict[str, Any]:
        """The client's next message, under the step deadline."""
        item = await self._next(timeout or self.timeouts.step, CLIENT_TIMED_OUT)
        if not isinstance(item, ClientMessage):
            raise PairingFailed("unexpected peer event", UNEXPECTED, UNEXPECTED)
        if item.data is None:
            raise PairingFailed(
                "bad client message", item.problem, self._peer_says("failed")
            )
        return item.data

    async def from_peer(self, kind: type[E], timeout: float, timeout_message: str) -> E:
        """The other side's next event, which must be a `kind`."""
        item = await self._next(timeout, timeout_message)
        if isinstance(item, ClientMessage):
            raise PairingFailed(
                "client spoke out of turn", UNEXPECTED, self._peer_says("failed")
            )
        if not isinstance(item, kind):
            raise PairingFailed(
                f"unexpected {type(item).__name__}", UNEXPECTED, UNEXPECTED
            )
        return item

    async def send(self, data: dict[str, Any]) -> None:
        """Send `data` to this side's client."""
        try:
            await self.client.send(data)
        except ClientClosed:
            raise PairingFailed(
                "client disconnected", None, self._peer_says("disconnected")
            ) from None

    async def tell_peer(self, event: Any) -> None:
        """Send to the other side; its address must be known."""
        assert self.mailbox.peer is not None
        await self.bus.send(self.mailbox.peer, event)

    async def _next(self, timeout: float, timeout_message: str) -> Any:
        with trio.move_on_after(timeout):
            item = await self.mailbox.get()
            if isinstance(item, ClientGone):
                raise PairingFailed(
                    "client disconnected", None, self._peer_says("disconnected")
                )
            if isinstance(item, Aborted):
                raise PairingFailed(f"peer ended: {item.reason}", item.reason, None)
            return item
        raise PairingFailed("timed out", timeout_message, self._peer_says("timed out"))

    @property
    def pairing_id(self) -> str:
        """The id that names this pairing in logs: the challenger's mailbox."""
        if self.role == "new":
            return self.mailbox.address.mailbox
        return self.mailbox.peer.mailbox if self.mailbox.peer else "-"

    def _peer_says(self, what: str) -> str:
        return f"The {self.role} machine {what}"


@attrs.define(eq=False)
class PhraseQuota:
    """The node's limit on open phrases (MAX_PENDING)."""

    limit: int
    held: int = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Count one open phrase for the block; `PairingFailed` when full."""
        if self.held >= self.limit:
            raise PairingFailed("node full", TOO_MANY_ON_NODE, None)
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1


async def challenger(side: Side, store: Store, quota: PhraseQuota) -> str:
    """Machine B's side, from its hello to its new master key.

    Returns its outcome, for the log; raises `PairingFailed` to end early.
    """
    hello = await side.from_client()
    username = _text(hello, "username")
    machine_name = _text(hello, "machine_name")
    user = await _storage(store.call(queries.find_user, username))
    if user is None:
        raise PairingFailed("unknown user", USER_NOT_FOUND, None)
    if await _storage(store.call(queries.machine_exists, username, machine_name)):
        raise PairingFailed("machine exists", MACHINE_EXISTS, None)

    with quota.hold():
        return await _offer_phrase(side, store, user, machine_name)


async def _offer_phrase(side: Side, store: Store, user: User, machine_name: str) -> str:
    username = user.username
    phrase = await _register(side, username)
    log.info("pairing %s started for user %s", side.pairing_id, username)
    failure: PairingFailed | None = None
    try:
        await side.send({"message": phrase})
        await _challenger_steps(side, store, user, machine_name)
    except PairingFailed as error:
        failure = error
        raise
    finally:
        with trio.move_on_after(CLEANUP_TIMEOUT) as cleanup:
            cleanup.shield = True
            claimed = await _release(side.bus, phrase)
            if (
                failure
                and failure.peer_reason
                and claimed
                and side.mailbox.peer is None
            ):
                await _await_late_accept(side)
    return f"completed: machine {machine_name!r} added for user {username}"


async def _challenger_steps(
    side: Side, store: Store, user: User, machine_name: str
) -> None:
    accepted = await side.from_peer(
        Accepted, side.timeouts.challenge, CHALLENGE_TIMED_OUT
    )
    side.mailbox.peer = accepted.responder
    await side.send({"message": CHALLENGE_ACCEPTED})

    keys = await side.from_client()
    public_key = _key_bytes(keys.get("public_key"))
    encapsulation_key = _optional_bytes(keys.get("encapsulation_key"))
    await _bus(side.tell_peer(ChallengerKey(public_key, encapsulation_key)))

    sealed = await side.from_peer(
        EncryptedMasterKey, side.timeouts.step, STEP_TIMED_OUT
    )
    new = NewMachine(machine_name, public_key, encapsulation_key)
    try:
        await _storage(store.call(queries.add_machine, user.id, new))
    except Conflict:
        raise PairingFailed("machine exists at the end", MACHINE_EXISTS, None) from None
    await side.send({"encrypted_master_key": _b64(sealed.key)})
    await side.send({"message": DONE})


async def responder(side: Side, username: str) -> str:
    """Machine A's side: answer the phrase, seal the master key for B.

    Returns its outcome, for the log.
    """
    answer = await side.from_client()
    typed = answer.get("challenge")
    # A phrase we made up is plain ASCII; anything Redis cannot key on
    # (a lone surrogate, say) is as wrong as any other typo.
    phrase = normalise(typed) if isinstance(typed, str) and storable(typed) else ""
    challenger_at = await _bus(side.bus.claim(phrase, username)) if phrase else None
    if challenger_at is None:
        raise PairingFailed("invalid phrase", INVALID_CHALLENGE, None)
    side.mailbox.peer = challenger_at
    await _bus(side.tell_peer(Accepted(side.mailbox.address)))

    keys = await side.from_peer(ChallengerKey, side.timeouts.step, STEP_TIMED_OUT)
    offer = {"public_key": _b64(keys.public_key)}
    if keys.encapsulation_key is not None:
        offer["encapsulation_key"] = _b64(keys.encapsulation_key)
    await side.send(offer)

    sealed = await side.from_client()
    key = _required_bytes(sealed.get("encrypted_master_key"), "encrypted_master_key")
    await _bus(side.tell_peer(EncryptedMasterKey(key)))
    return f"sent the master key for user {username}"


async def _register(side: Side, username: str) -> str:
    for _ in range(PHRASE_TRIES):
        phrase = make_phrase()
        try:
            await _bus(
                side.bus.register(
                    phrase,
                    username,
                    side.mailbox.address,
                    ttl=side.timeouts.challenge + 5,
                )
            )
        except PhraseTaken:
            continue
        except TooManyPending:
            raise PairingFailed(
                "too many pending for user", TOO_MANY_FOR_USER, None
            ) from None
        return phrase
    raise PairingFailed("no free phrase", UNAVAILABLE, None)


async def _release(bus: Bus, phrase: str) -> bool:
    try:
        return await bus.release(phrase)
    except BusUnavailable:
        # Redis is gone; its TTL removes the phrase when Redis comes back.
        return False


async def _await_late_accept(side: Side) -> None:
    """Learn where a responder that claimed at the last moment listens.

    A responder may claim the phrase just as this side ends, its `Accepted`
    still on the way; knowing its address lets `notify_peer` tell it to stop
    instead of leaving it to wait for its own deadline.
    """
    with trio.move_on_after(LATE_ACCEPT_GRACE):
        while side.mailbox.peer is None:
            item = await side.mailbox.get()
            if isinstance(item, Accepted):
                side.mailbox.peer = item.responder


async def notify_peer(side: Side, reason: str) -> None:
    """Tell the other side, if known, that this one ended; bounded, shielded."""
    if side.mailbox.peer is None:
        return
    with trio.move_on_after(CLEANUP_TIMEOUT) as scope:
        scope.shield = True
        with contextlib.suppress(BusError):
            await side.tell_peer(Aborted(reason))


async def _bus(call: Any) -> Any:
    try:
        return await call
    except BusUnavailable:
        raise PairingFailed("bus unavailable", UNAVAILABLE, UNAVAILABLE) from None
    except PeerUnreachable:
        raise PairingFailed("peer node gone", PEER_NODE_GONE, None) from None


async def _storage(call: Any) -> Any:
    try:
        return await call
    except Unavailable:
        raise PairingFailed(
            "storage unavailable", STORAGE_UNAVAILABLE, STORAGE_UNAVAILABLE
        ) from None


def _text(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if not isinstance(value, str) or not value:
        raise PairingFailed(f"missing {field}", f"Missing {field}", None)
    if name_problem(value):
        raise PairingFailed(f"bad {field}", f"Invalid {field}", None)
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _decode(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _key_bytes(value: Any) -> bytes:
    key = _decode(value)
    try:
        if not key:
            raise InvalidKey("empty")
        parse_public_key(key)
    except InvalidKey:
        raise PairingFailed(
            "invalid key", INVALID_KEY, "The new machine sent an invalid key"
        ) from None
    return key


def _optional_bytes(value: Any) -> bytes | None:
    if value is None or value == "":
        return None
    decoded = _decode(value)
    if decoded is None:
        raise PairingFailed(
            "invalid key", INVALID_KEY, "The new machine sent an invalid key"
        )
    return decoded


def _required_bytes(value: Any, field: str) -> bytes:
    decoded = _decode(value)
    if not decoded:
        raise PairingFailed(
            f"bad {field}", f"Invalid {field}", "The existing machine failed"
        )
    return decoded
