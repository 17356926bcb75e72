"""`serve`: one node of ssh-sync-trio, from start to graceful stop.

The top-level nursery owns everything: the bus (with its listener task, on
Redis) and hypercorn with its connection tasks. The node reports ready
through `task_status` only once it listens, handing back a `RunningServer`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.middleware import ProxyFixMiddleware
from sqlalchemy.exc import DBAPIError

from ssh_sync_trio.bus import Bus, MemoryBus
from ssh_sync_trio.bus.base import SHUTTING_DOWN
from ssh_sync_trio.config import Settings
from ssh_sync_trio.errors import StartupError, first_line
from ssh_sync_trio.http import hypercorn_fix
from ssh_sync_trio.http.app import build_app
from ssh_sync_trio.pairing.service import Pairings
from ssh_sync_trio.services import Services
from ssh_sync_trio.storage import migrate
from ssh_sync_trio.storage.store import describe, open_store

log = logging.getLogger("ssh_sync_trio.server")

hypercorn_fix.install()

# Hypercorn drops a connection whose WebSocket message passes this; below
# it, the pairing code refuses messages over 1 MiB with an error message.
WEBSOCKET_HARD_LIMIT = 4 * 1024 * 1024
# How long before the end of SHUTDOWN_GRACE the pairings still running are
# ended, so that their error frames go out before hypercorn cancels them.
GRACE_MARGIN = 0.5
# Seconds of silence a connection gets beyond the longest pairing wait.
READ_MARGIN = 30.0


@attrs.frozen
class RunningServer:
    """A node that listens: where, and its services (for tests and probes)."""

    url: str
    services: Services

    @property
    def bus(self) -> Bus:
        return self.services.pairings.bus


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one node until `shutdown` is set or the caller cancels."""
    shutdown = shutdown if shutdown is not None else trio.Event()
    with open_store(settings.database, threads=settings.db_threads) as store:
        try:
            revision = await trio.to_thread.run_sync(migrate.upgrade, store.engine)
        except DBAPIError as error:
            raise StartupError(
                f"database {describe(settings.database)}: {first_line(error.orig)}"
            ) from None
        log.info("database: %s (schema %s)", describe(settings.database), revision)
        async with open_bus(settings) as bus:
            services = Services(settings, store, Pairings(settings, store, bus))
            async with trio.open_nursery() as nursery:
                binds = await _start_http(nursery, services, settings, shutdown)
                nursery.start_soon(
                    _end_pairings_at_grace_end, shutdown, bus, settings.shutdown_grace
                )
                log.info("listening on %s", ", ".join(binds))
                log.info("node id: %s", settings.node_id)
                task_status.started(RunningServer(_local_url(binds[0]), services))
        log.info("stopped")


async def _start_http(
    nursery: trio.Nursery, services: Services, settings: Settings, shutdown: trio.Event
) -> list[str]:
    try:
        return await nursery.start(  # type: ignore[no-any-return]
            partial(
                hypercorn.trio.serve,
                _behind_proxies(build_app(services), settings.trusted_proxy_hops),
                hypercorn_config(settings),
                shutdown_trigger=shutdown.wait,
            )
        )
    except* OSError as errors:
        # Hypercorn binds inside its own nurseries: the error comes grouped.
        first = _leaf(errors)
        raise StartupError(
            f"cannot listen on {settings.host}:{settings.port}: {first}"
        ) from None


async def _end_pairings_at_grace_end(
    shutdown: trio.Event, bus: Bus, grace: float
) -> None:
    """End the pairings still running just before the grace period does.

    Pairings under way may finish during the grace period; those still
    running near its end (a phrase nobody typed yet, say) are ended with a
    message to both machines, instead of having their sockets dropped when
    hypercorn cancels what is left.
    """
    await shutdown.wait()
    await trio.sleep(max(0.0, grace - min(GRACE_MARGIN, grace / 2)))
    ended = bus.abort_local(SHUTTING_DOWN)
    if ended:
        log.info("stopping: ended %d pairings in progress", ended)


@asynccontextmanager
async def open_bus(settings: Settings) -> AsyncIterator[Bus]:
    """The bus this node pairs through: Redis when configured, else memory."""
    if settings.redis_url:
        from ssh_sync_trio.bus.redis import open_redis_bus

        async with open_redis_bus(settings) as bus:
            yield bus
        return
    log.info("bus: in memory (single node)")
    yield MemoryBus(settings.node_id, settings.max_pending_per_user)


def _behind_proxies(app: Any, hops: int) -> Any:
    """`app`, reading the client's address from X-Forwarded-For when it sits
    behind `hops` trusted proxies (hypercorn's ProxyFixMiddleware)."""
    if hops == 0:
        return app
    return ProxyFixMiddleware(app, mode="legacy", trusted_hops=hops)


def _leaf(group: BaseExceptionGroup[OSError]) -> OSError:
    """The first error inside `group`, however deeply nested."""
    found = group.exceptions[0]
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn's settings for one node."""
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = None  # ours, in http.middleware, has the client address
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = settings.shutdown_grace
    config.websocket_max_message_size = WEBSOCKET_HARD_LIMIT
    # A connection that sends nothing for this long is closed, so that a
    # half-sent request cannot hold a connection forever. A pairing socket
    # is legitimately silent for up to the longer of its waits.
    longest = max(settings.challenge_timeout, settings.pairing_step_timeout)
    config.read_timeout = math.ceil(longest + READ_MARGIN)
    config.include_server_header = False
    return config


def _local_url(bind: str) -> str:
    # Hypercorn reports what it bound; a wildcard address is reached on loopback.
    return bind.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
