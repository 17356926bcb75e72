"""`RedisBus`: pairings whose two sides live on different nodes.

Each node subscribes to its own channel; an event for a mailbox is
published on the channel of the mailbox's node. Phrases and their claims
are Redis keys with a TTL, changed only by Lua scripts, so that a claim is
atomic across nodes. Phrases are stored under a hash of the phrase: whoever
can read Redis still cannot answer a pairing.

Concurrency: redis-py's synchronous client runs in worker threads. One
long-lived task (`_listen`) owns a thread that reads the subscription and
hands each message to trio with `trio.from_thread.run_sync`, where
`Mailboxes.deliver` uses `send_nowait`: the reading thread never waits for a
handshake. A second task (`_keep_alive`) refreshes this node's liveness key,
publishes a probe to its own channel and checks that the probes come back,
and watches the nodes that local pairings depend on. Whenever Redis is
lost, every local pairing is aborted at once, new ones are refused, and the
listener reconnects with backoff.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar

import attrs
import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from ssh_sync_trio.bus.base import (
    PEER_NODE_GONE,
    UNAVAILABLE,
    BusStatistics,
    BusUnavailable,
    NodeBus,
    PeerUnreachable,
    PhraseTaken,
    TooManyPending,
)
from ssh_sync_trio.bus.events import (
    Address,
    Event,
    MalformedEvent,
    UnknownEvent,
    decode,
    encode,
)
from ssh_sync_trio.config import Settings
from ssh_sync_trio.errors import StartupError

log = logging.getLogger("ssh_sync_trio.bus")

T = TypeVar("T")

PREFIX = "sshsync:"
# A node's liveness key lives this long unless refreshed every tick.
NODE_TTL = 6.0
# Probe and refresh period; the subscription counts as lost when no probe
# came back for PROBE_DEADLINE.
TICK = 1.0
PROBE_DEADLINE = 3.0
# How long the reading thread blocks in one read before it checks whether
# it was cancelled or asked to resubscribe: bounds shutdown time.
READ_SLICE = 0.1
# Every Redis command gives up after this long; no call waits forever.
COMMAND_TIMEOUT = 2.0
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 5.0
# Worker threads (and pooled connections) for commands, apart from the
# listener's own thread and connection.
COMMAND_THREADS = 8

_REGISTER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'taken' end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 'full' end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'node', ARGV[2], 'mailbox', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[4]), KEYS[1])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 'ok'
"""

_CLAIM = """
local entry = redis.call('HMGET', KEYS[1], 'user', 'node', 'mailbox', 'claimed')
if not entry[1] or entry[1] ~= ARGV[1] or entry[4] then return false end
redis.call('HSET', KEYS[1], 'claimed', '1')
return {entry[2], entry[3]}
"""

_RELEASE = """
local claimed = redis.call('HGET', KEYS[1], 'claimed')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], KEYS[1])
if claimed then return 1 else return 0 end
"""

_DELETE_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def phrase_key(phrase: str) -> str:
    """Where a phrase lives: a hash of it, never the phrase itself."""
    return f"{PREFIX}phrase:{hashlib.sha256(phrase.encode()).hexdigest()}"


def user_key(username: str) -> str:
    """The sorted set of a user's open phrases, for MAX_PENDING_PER_USER."""
    return f"{PREFIX}user:{username}"


def node_key(node: str) -> str:
    """A node's liveness key: present while the node runs."""
    return f"{PREFIX}node:{node}"


def channel(node: str) -> str:
    """The pub/sub channel a node reads its events from."""
    return f"{PREFIX}events:{node}"


@attrs.define(eq=False)
class RedisBus(NodeBus):
    """The cluster bus; see `Bus` for what each operation promises."""

    client: redis.Redis
    listener_client: redis.Redis
    healthy: bool = False
    malformed: int = 0
    unknown: int = 0
    lost_count: int = 0
    _token: str = attrs.field(factory=lambda: secrets.token_hex(8))
    _limiter: trio.CapacityLimiter = attrs.field(
        factory=lambda: trio.CapacityLimiter(COMMAND_THREADS)
    )
    _phrases: dict[str, str] = attrs.field(factory=dict)
    _unreleased: set[tuple[str, str]] = attrs.field(factory=set)
    _probe_back: float = 0.0
    _resubscribe: threading.Event = attrs.field(factory=threading.Event)
    _subscribed: bool = False

    # The Bus operations

    async def register(
        self, phrase: str, username: str, challenger: Address, *, ttl: float
    ) -> None:
        self._require_healthy()
        key = phrase_key(phrase)
        outcome = await self._command(
            self.client.eval,
            _REGISTER,
            2,
            key,
            user_key(username),
            username,
            challenger.node,
            challenger.mailbox,
            int(ttl * 1000),
            self.max_pending_per_user,
        )
        if outcome == b"taken":
            raise PhraseTaken()
        if outcome == b"full":
            raise TooManyPending()
        self._phrases[phrase] = username

    async def claim(self, phrase: str, username: str) -> Address | None:
        self._require_healthy()
        found = await self._command(
            self.client.eval, _CLAIM, 1, phrase_key(phrase), username
        )
        if not found:
            return None
        node, mailbox = (part.decode() for part in found)
        return Address(node, mailbox)

    async def release(self, phrase: str) -> bool:
        username = self._phrases.pop(phrase, None)
        if username is None:
            return False
        key = phrase_key(phrase)
        try:
            claimed = await self._command(
                self.client.eval, _RELEASE, 2, key, user_key(username)
            )
        except BusUnavailable:
            # Deleted on reconnect; its TTL removes it if this node dies first.
            self._unreleased.add((key, username))
            raise
        return bool(claimed)

    async def send(self, to: Address, event: Event) -> None:
        if to.node == self.node_id and self.healthy:
            # Our own mailbox: no need for a round trip through Redis.
            self.mailboxes.deliver(to.mailbox, event)
            return
        self._require_healthy()
        receivers = await self._command(
            self.client.publish, channel(to.node), encode(to, event)
        )
        if receivers == 0:
            raise PeerUnreachable(to.node)

    def statistics(self) -> BusStatistics:
        """Local state: mailboxes and phrases this node registered.

        Claims live in Redis only; tests check Redis itself for them.
        """
        return BusStatistics(
            mailboxes=len(self.mailboxes),
            phrases=len(self._phrases),
            claims=0,
            dropped=sum(self.mailboxes.drops.values()),
            malformed=self.malformed,
            unknown=self.unknown,
            healthy=self.healthy,
        )

    # Lifecycle

    async def start(self, nursery: trio.Nursery) -> None:
        """Take this node's id, subscribe, and prove a probe comes back."""
        await self._take_node_id()
        try:
            await nursery.start(self._listen)
            with trio.move_on_after(PROBE_DEADLINE):
                while not self.healthy:
                    await self._probe()
                    await trio.sleep(0.05)
        except (redis.RedisError, BusUnavailable) as error:
            raise StartupError(f"Redis unreachable: {error}") from None
        if not self.healthy:
            raise StartupError(
                "Redis accepted the subscription but delivers no message"
            )
        nursery.start_soon(self._keep_alive)
        log.info("bus: redis, subscribed to %s", channel(self.node_id))

    async def stop(self) -> None:
        """Remove this node's keys; the caller's nursery ends the tasks."""
        with trio.move_on_after(COMMAND_TIMEOUT) as scope:
            scope.shield = True
            for phrase in list(self._phrases):
                await self._quietly(self.release(phrase))
            await self._quietly(
                self._command(
                    self.client.eval,
                    _DELETE_IF_MINE,
                    1,
                    node_key(self.node_id),
                    self._token,
                )
            )

    # Tasks

    async def _listen(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the reading thread for as long as the bus runs."""
        await trio.to_thread.run_sync(self._read_forever, task_status.started)

    async def _keep_alive(self) -> None:
        """Refresh liveness, probe the subscription, watch peer nodes."""
        while True:
            await trio.sleep(TICK)
            try:
                await self._refresh_node_key()
                await self._probe()
                await self._check_peer_nodes()
            except BusUnavailable:
                continue
            overdue = trio.current_time() - self._probe_back > PROBE_DEADLINE
            if self.healthy and overdue:
                self._lost("probes stopped coming back")

    # The reading thread

    def _read_forever(self, report_started: Callable[[], None]) -> None:
        backoff = RECONNECT_FIRST
        first = True
        while True:
            trio.from_thread.check_cancelled()
            try:
                with self.listener_client.pubsub(
                    ignore_subscribe_messages=True
                ) as pubsub:
                    pubsub.subscribe(channel(self.node_id))
                    trio.from_thread.run_sync(self._on_subscribed)
                    if first:
                        first = False
                        trio.from_thread.run_sync(report_started)
                    backoff = RECONNECT_FIRST
                    self._read_until_broken(pubsub)
            except redis.RedisError as error:
                trio.from_thread.run_sync(self._lost, f"subscription failed: {error}")
                if first:
                    raise
            self._sleep_in_thread(backoff)
            backoff = min(RECONNECT_MAX, backoff * 2 * random.uniform(0.8, 1.2))

    def _read_until_broken(self, pubsub: Any) -> None:
        self._resubscribe.clear()
        while not self._resubscribe.is_set():
            trio.from_thread.check_cancelled()
            message = pubsub.get_message(timeout=READ_SLICE)
            if message is not None and message.get("type") == "message":
                trio.from_thread.run_sync(self._on_message, message["data"])

    def _sleep_in_thread(self, seconds: float) -> None:
        # In slices, so that cancellation is noticed within READ_SLICE.
        left = seconds
        while left > 0:
            trio.from_thread.check_cancelled()
            time.sleep(min(READ_SLICE, left))
            left -= READ_SLICE

    # Run in trio, called from the reading thread

    def _on_subscribed(self) -> None:
        self._subscribed = True
        if self.lost_count:
            log.info(
                "bus: resubscribed to %s, waiting for a probe", channel(self.node_id)
            )

    def _on_message(self, raw: bytes) -> None:
        probe = _probe_nonce(raw)
        if probe is not None:
            if probe == self._token:
                self._probe_back = trio.current_time()
                if not self.healthy and self._subscribed:
                    self._recovered()
            return
        try:
            mailbox_id, event = decode(raw)
        except UnknownEvent as error:
            self.unknown += 1
            log.warning(
                "bus: unknown event type on %s: %s", channel(self.node_id), error
            )
            return
        except MalformedEvent as error:
            self.malformed += 1
            log.warning("bus: malformed event on %s: %s", channel(self.node_id), error)
            return
        self.mailboxes.deliver(mailbox_id, event)

    def _lost(self, why: str) -> None:
        # Whatever failed, start over from a fresh subscription: recovery is
        # declared only once a probe comes back through it.
        self._subscribed = False
        self._resubscribe.set()
        if not self.healthy:
            return
        self.healthy = False
        self.lost_count += 1
        aborted = self.mailboxes.abort_all(UNAVAILABLE)
        log.error("bus: Redis lost (%s); %d pairings ended, reconnecting", why, aborted)

    def _recovered(self) -> None:
        was_lost = self.lost_count > 0
        self.healthy = True
        if was_lost:
            log.info("bus: Redis reconnected, pairing available again")

    # Commands

    async def _command(self, method: Callable[..., T], *args: Any, **kw: Any) -> T:
        try:
            return await trio.to_thread.run_sync(
                lambda: method(*args, **kw), limiter=self._limiter
            )
        except redis.RedisError as error:
            self._lost(f"{type(error).__name__}: {error}")
            raise BusUnavailable(str(error)) from None

    async def _quietly(self, call: Any) -> None:
        with suppress(BusUnavailable):
            await call

    def _require_healthy(self) -> None:
        if not self.healthy:
            raise BusUnavailable("Redis is not available")

    async def _probe(self) -> None:
        body = json.dumps({"probe": self._token}).encode()
        await self._command(self.client.publish, channel(self.node_id), body)

    async def _take_node_id(self) -> None:
        key = node_key(self.node_id)
        # A node that stopped uncleanly holds its id until its key expires.
        waited = False
        with trio.move_on_after(NODE_TTL + TICK):
            while True:
                taken = await self._startup_command(
                    self.client.set, key, self._token, nx=True, px=int(NODE_TTL * 1000)
                )
                if taken:
                    return
                if not waited:
                    waited = True
                    log.warning(
                        "bus: NODE_ID %r is held; waiting up to %.0f s for it to expire",
                        self.node_id,
                        NODE_TTL + TICK,
                    )
                await trio.sleep(TICK / 2)
        raise StartupError(
            f"NODE_ID {self.node_id!r} is held by another live node; give each node its own"
        )

    async def _startup_command(
        self, method: Callable[..., T], *args: Any, **kw: Any
    ) -> T:
        try:
            return await trio.to_thread.run_sync(
                lambda: method(*args, **kw), limiter=self._limiter
            )
        except redis.RedisError as error:
            raise StartupError(f"Redis unreachable: {error}") from None

    async def _refresh_node_key(self) -> None:
        key, ttl = node_key(self.node_id), int(NODE_TTL * 1000)
        refreshed = await self._command(
            self.client.set, key, self._token, xx=True, px=ttl
        )
        if not refreshed:
            # Redis restarted empty: take the id back.
            await self._command(self.client.set, key, self._token, nx=True, px=ttl)
        if self._unreleased and self.healthy:
            for key, username in list(self._unreleased):
                await self._command(
                    self.client.eval, _RELEASE, 2, key, user_key(username)
                )
                self._unreleased.discard((key, username))

    async def _check_peer_nodes(self) -> None:
        """End the pairings whose other side's node stopped listening.

        A node that stops cleanly deletes its liveness key; one that dies
        drops its subscription at once (its connection closes) and its key
        expires within NODE_TTL. Either way its pairings here end.
        """
        peers = sorted(self.mailboxes.peer_nodes())
        if not peers:
            return
        listening = dict(
            await self._command(self.client.pubsub_numsub, *(channel(p) for p in peers))
        )
        for node in peers:
            alive = listening.get(channel(node).encode(), 0) > 0
            if alive:
                alive = bool(await self._command(self.client.exists, node_key(node)))
            if not alive:
                ended = self.mailboxes.abort_where_peer_on(node, PEER_NODE_GONE)
                log.warning("bus: node %s is gone; %d pairings ended", node, ended)


def _probe_nonce(raw: bytes) -> str | None:
    if not raw.startswith(b'{"probe"'):
        return None
    try:
        nonce = json.loads(raw)["probe"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return nonce if isinstance(nonce, str) else None


def make_clients(url: str) -> tuple[redis.Redis, redis.Redis]:
    """A pooled client for commands and a single one for the subscription."""
    options: dict[str, Any] = {
        "socket_timeout": COMMAND_TIMEOUT,
        "socket_connect_timeout": COMMAND_TIMEOUT,
        "health_check_interval": 0,
        # Reconnecting is the bus's job, with its own backoff; a command
        # retried inside redis-py would hold a pairing past its deadline.
        "retry": Retry(NoBackoff(), 0),
    }
    commands = redis.Redis(
        connection_pool=redis.BlockingConnectionPool.from_url(
            url, max_connections=COMMAND_THREADS, timeout=COMMAND_TIMEOUT, **options
        )
    )
    listener = redis.Redis.from_url(url, **options)
    return commands, listener


def describe(url: str) -> str:
    """The Redis server, for the log: never the password."""
    from redis.connection import parse_url

    parts = parse_url(url)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 6379)}/{parts.get('db', 0)}"


@asynccontextmanager
async def open_redis_bus(settings: Settings) -> AsyncIterator[RedisBus]:
    """A running `RedisBus` for this node; its tasks and keys end on exit."""
    assert settings.redis_url
    commands, listener = make_clients(settings.redis_url)
    bus = RedisBus(settings.node_id, settings.max_pending_per_user, commands, listener)
    log.info(
        "bus: connecting to redis %s as node %s",
        describe(settings.redis_url),
        settings.node_id,
    )
    try:
        async with trio.open_nursery() as nursery:
            await bus.start(nursery)
            try:
                yield bus
            finally:
                await bus.stop()
                nursery.cancel_scope.cancel()
    finally:
        commands.close()
        listener.close()
        log.info("bus: redis connections closed")
