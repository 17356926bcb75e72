"""Shared pytest fixtures, in sections, each owned by one part of the suite."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ssh_sync_trio.server import RunningServer
from tests import harness
from tests.servers import PostgresServer, RedisServer

# --------------------------------------------------------------------------
# Throwaway servers (tests/servers.py)
#
# One PostgreSQL and one Redis per test session, started the first time a
# test asks for them and stopped when the session ends. Tests get a fresh
# database (`pg_url`) and an empty Redis (`redis_url`) each.


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, on 127.0.0.1, trust auth."""
    server = PostgresServer.start(tmp_path_factory.mktemp("postgres"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL of a new database, force-dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1], force=True)


@pytest.fixture(scope="session")
def redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RedisServer]:
    """The session's Redis server, on 127.0.0.1, no password."""
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the session's Redis, emptied before and after the test.

    A test that stops Redis need not restart it: this fixture does.
    """
    _fresh_redis(redis_server)
    try:
        yield redis_server.url
    finally:
        _fresh_redis(redis_server)


def _fresh_redis(server: RedisServer) -> None:
    if not server.running:
        server.start_again()
    server.flushall()


# End of the throwaway servers section.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Databases and nodes under test (tests/harness.py)
#
# `database_url` runs a test once on SQLite and once on the throwaway
# PostgreSQL; `sqlite_url` is SQLite alone, for tests about something else.


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: SQLite file or PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ssh-sync.sqlite3'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'ssh-sync.sqlite3'}"


@pytest.fixture
async def node(nursery: trio.Nursery, database_url: str) -> RunningServer:
    """One node on `database_url` with the in-memory bus, listening."""
    return await harness.start_node(nursery, database_url)


@pytest.fixture
async def http(node: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for `node`'s `/api/v1`."""
    async with harness.client(node) as client:
        yield client
