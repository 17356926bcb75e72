"""`Store`: runs storage queries in worker threads, one transaction each.

SQLAlchemy's engine is synchronous; every call runs in a worker thread
behind a `trio.CapacityLimiter` sized like the connection pool, so a burst of
requests queues in trio rather than in the pool. A call that is cancelled
waits for its thread to finish: the transaction is never left half done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Concatenate, ParamSpec, TypeVar

import attrs
import trio
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

log = logging.getLogger("ssh_sync_trio.storage")

P = ParamSpec("P")
R = TypeVar("R")

# How long SQLite waits for another writer before giving up, in seconds.
SQLITE_BUSY_TIMEOUT = 30


class StorageError(Exception):
    """Base of the errors a query raises on purpose."""


class Conflict(StorageError):
    """The user, machine or other unique thing already exists."""


class NotFound(StorageError):
    """Nothing matched, or it belongs to another user."""


class NotYours(StorageError):
    """A machine id in the request is not one of the caller's machines."""


class RotationPending(StorageError):
    """A master key rotation waits for this machine; it must download first."""


class Unavailable(StorageError):
    """The database could not be reached or failed."""


@attrs.define(eq=False)
class Store:
    """The database, for trio code: `await store.call(query, *args)`."""

    engine: Engine
    limiter: trio.CapacityLimiter

    async def call(
        self,
        query: Callable[Concatenate[Connection, P], R],
        *args: P.args,
        **kw: P.kwargs,
    ) -> R:
        """Run `query(connection, *args)` in one transaction, in a thread.

        Database failures become `Unavailable`; the errors a query raises
        on purpose (`StorageError`) pass through unchanged.
        """
        return await trio.to_thread.run_sync(
            self._transaction, query, args, kw, limiter=self.limiter
        )

    def _transaction(self, query: Callable[..., R], args: Any, kw: Any) -> R:
        try:
            with self.engine.begin() as connection:
                return query(connection, *args, **kw)
        except DBAPIError as error:
            log.error("database call %s failed: %s", query.__name__, error.orig)
            raise Unavailable(str(error.orig)) from error

    def statistics(self) -> trio.CapacityLimiterStatistics:
        """How many calls run and how many wait for a thread."""
        return self.limiter.statistics()


def make_engine(url: URL, *, pool_size: int) -> Engine:
    """An engine for `url`, set up for concurrent use from worker threads."""
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return create_engine(
        url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True, pool_timeout=30
    )


@contextmanager
def open_store(url: URL, *, threads: int) -> Iterator[Store]:
    """A `Store` on `url`, whose connections are closed on exit."""
    engine = make_engine(url, pool_size=threads)
    try:
        yield Store(engine, trio.CapacityLimiter(threads))
    finally:
        engine.dispose()


def describe(url: URL) -> str:
    """Where the data lives, for the log: never the password."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite file {url.database}"
    host = url.query.get("host") or url.host or "localhost"
    port = f":{url.port}" if url.port else ""
    return f"postgresql {host}{port}/{url.database or ''} as {url.username or ''}"


def _sqlite_engine(url: URL) -> Engine:
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, decide where a transaction
        # begins, so that the "begin" hook below is the only BEGIN.
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys = ON")
        dbapi_connection.execute("PRAGMA journal_mode = WAL")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Take the write lock up front: a deferred transaction that reads and
        # then writes fails at once with "database is locked" when another
        # thread wrote meanwhile, while BEGIN IMMEDIATE waits its turn.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
