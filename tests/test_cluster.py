"""Cluster mode: nodes on one database and one real Redis, pairing across.

Rules: every node is a real server on 127.0.0.1, port 0, in the test's
nursery, with its own `RedisBus`; Redis and PostgreSQL are the throwaway
servers of the test suite (no fake Redis). Every test has a ceiling, and
ends by checking that no key of this server is left in Redis beyond the
liveness keys of nodes still running, and that every node's bus is empty.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import trio

from ssh_sync_trio.bus import redis as redis_bus
from ssh_sync_trio.errors import StartupError
from ssh_sync_trio.server import RunningServer, serve
from tests import harness, sshclient
from tests.pairing import (
    ask_for_phrase,
    existing_machine_socket,
    new_machine_socket,
    pair,
    receive,
    send,
)
from tests.servers import RedisServer, free_port

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

CEILING = 40
PROMPT = 2.0


async def assert_clean(redis_server: RedisServer, *nodes: RunningServer) -> None:
    """No mailbox or phrase on any node, no key but live nodes' in Redis."""
    live = {redis_bus.node_key(n.services.settings.node_id) for n in nodes}
    with trio.fail_after(PROMPT + 1):
        while True:
            idle = all(
                (s.mailboxes, s.phrases) == (0, 0)
                for s in (n.bus.statistics() for n in nodes)
            )
            keys = set(await trio.to_thread.run_sync(redis_server.keys, "sshsync:*"))
            if idle and keys <= live:
                return
            await trio.sleep(0.05)


@pytest.fixture
async def cluster(
    nursery: trio.Nursery, pg_url: str, redis_url: str, redis_server: RedisServer
) -> AsyncIterator[list[RunningServer]]:
    """Three nodes on one PostgreSQL database and one Redis."""
    nodes = await start_nodes(nursery, pg_url, redis_url, "node-1", "node-2", "node-3")
    yield nodes
    await assert_clean(redis_server, *nodes)


async def start_nodes(
    nursery: trio.Nursery, database_url: str, redis_url: str, *node_ids: str
) -> list[RunningServer]:
    """One node per id, on one database and one Redis, started in turn."""
    return [
        await harness.start_node(
            nursery, database_url, redis_url=redis_url, node_id=node_id
        )
        for node_id in node_ids
    ]


async def account(node: RunningServer, machine: sshclient.Machine) -> None:
    async with harness.client(node) as http:
        await harness.register(http, machine)


async def test_pairing_in_every_direction(cluster: list[RunningServer]) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.post_quantum("ada", "laptop")
        await account(cluster[0], existing)
        count = itertools.count()
        for node_b, node_a in itertools.permutations(cluster, 2):
            for kind in ("classic", "post_quantum"):
                new = getattr(sshclient.Machine, kind)("ada", f"m{next(count)}")
                sealed = await pair(
                    node_b, node_a, new, existing, master_key=new.machine_name.encode()
                )
                assert sealed == new.machine_name.encode()
                async with harness.client(node_a) as http:
                    response = await http.get("/data", headers=new.headers())
                    assert response.status_code == 200


async def test_two_nodes_classic_responder(
    nursery: trio.Nursery, pg_url: str, redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(CEILING):
        one, two = await start_nodes(nursery, pg_url, redis_url, "one", "two")
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one, existing)
        await pair(one, two, sshclient.Machine.post_quantum("ada", "b1"), existing)
        await pair(two, one, sshclient.Machine.classic("ada", "b2"), existing)
        await assert_clean(redis_server, one, two)


async def test_racing_responders_one_wins(cluster: list[RunningServer]) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(cluster[0], existing)
        async with new_machine_socket(cluster[0]) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            outcomes: list[str] = []

            async def answer(node: RunningServer) -> None:
                async with existing_machine_socket(node, existing) as a:
                    await send(a, {"challenge": phrase})
                    reply = await receive(a)
                    outcomes.append(reply.error_message if reply.error else "won")

            async with trio.open_nursery() as racers:
                racers.start_soon(answer, cluster[1])
                racers.start_soon(answer, cluster[2])
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
                new = sshclient.Machine.classic("ada", "desktop")
                await send(b, sshclient.pairing_public_keys(new))
            # The winner got B's key and left without sealing: B hears it.
            reply = await receive(b, timeout=PROMPT)
            assert reply.error_message == "The existing machine disconnected"
        assert sorted(outcomes) == ["Invalid challenge response.", "won"]


async def test_redis_lost_then_back(
    cluster: list[RunningServer], redis_server: RedisServer
) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(cluster[0], existing)
        async with new_machine_socket(cluster[0]) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            async with existing_machine_socket(cluster[1], existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
                await trio.to_thread.run_sync(redis_server.stop)
                for side in (a, b):
                    reply = await receive(side, timeout=PROMPT)
                    assert (
                        reply.error_message == "pairing service unavailable, try again"
                    )

        # New pairings are refused while Redis is away; the API still works.
        async with new_machine_socket(cluster[2]) as b:
            await send(b, {"username": "ada", "machine_name": "other"})
            reply = await receive(b)
            assert reply.error_message == "pairing service unavailable, try again"
        async with harness.client(cluster[2]) as http:
            response = await http.get("/machines/", headers=existing.headers())
            assert response.status_code == 200

        await trio.to_thread.run_sync(redis_server.start_again)
        await _healthy(cluster)
        await pair(
            cluster[2],
            cluster[0],
            sshclient.Machine.post_quantum("ada", "new"),
            existing,
        )


async def test_probe_loss_is_redis_loss(
    cluster: list[RunningServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pub/sub that silently stops delivering counts as Redis lost."""
    with trio.fail_after(CEILING):
        bus = cluster[0].bus
        assert isinstance(bus, redis_bus.RedisBus)
        # Fault injection: this node's subscription delivers nothing, while
        # its connection stays up, as seen after some Redis failovers.
        deaf = {bus}
        deliver = redis_bus.RedisBus._on_message

        def maybe_deliver(self: redis_bus.RedisBus, raw: bytes) -> None:
            if self not in deaf:
                deliver(self, raw)

        monkeypatch.setattr(redis_bus.RedisBus, "_on_message", maybe_deliver)
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(cluster[1], existing)
        async with new_machine_socket(cluster[0]) as b:
            await ask_for_phrase(b, sshclient.Machine.classic("ada", "desktop"))
            reply = await receive(
                b, timeout=redis_bus.PROBE_DEADLINE + 2 * redis_bus.TICK
            )
            assert reply.error_message == "pairing service unavailable, try again"
        assert not bus.healthy
        deaf.clear()
        await _healthy(cluster)
        await pair(
            cluster[0], cluster[1], sshclient.Machine.classic("ada", "d2"), existing
        )


async def test_node_dies_mid_pairing(
    nursery: trio.Nursery, pg_url: str, redis_url: str, redis_server: RedisServer
) -> None:
    with trio.fail_after(CEILING):
        survivor = await harness.start_node(
            nursery, pg_url, redis_url=redis_url, node_id="s"
        )
        doomed_scope = trio.CancelScope()
        doomed_nursery = await _child_nursery(nursery, doomed_scope)
        doomed = await harness.start_node(
            doomed_nursery, pg_url, redis_url=redis_url, node_id="doomed"
        )
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(survivor, existing)
        new = sshclient.Machine.classic("ada", "desktop")
        async with new_machine_socket(survivor) as b:
            phrase = await ask_for_phrase(b, new)
            async with existing_machine_socket(doomed, existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
                await send(b, sshclient.pairing_public_keys(new))
                await receive(a)
                doomed_scope.cancel()
                reply = await receive(b, timeout=PROMPT + redis_bus.TICK)
                assert reply.error
        await assert_clean(redis_server, survivor)


async def test_redis_down_at_start(nursery: trio.Nursery, sqlite_url: str) -> None:
    with trio.fail_after(CEILING):
        dead = f"redis://127.0.0.1:{free_port()}/0"
        with pytest.RaisesGroup(StartupError, flatten_subgroups=True):
            await nursery.start(serve, harness.settings(sqlite_url, redis_url=dead))


async def test_node_id_must_be_unique(
    nursery: trio.Nursery,
    sqlite_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_bus, "NODE_TTL", 1.0)
    with trio.fail_after(CEILING):
        await harness.start_node(
            nursery, sqlite_url, redis_url=redis_url, node_id="twin"
        )
        with pytest.RaisesGroup(
            pytest.RaisesExc(StartupError, match="held by another live node"),
            flatten_subgroups=True,
        ):
            await harness.start_node(
                nursery, sqlite_url, redis_url=redis_url, node_id="twin"
            )


async def test_redis_password_and_db(
    nursery: trio.Nursery, sqlite_url: str, tmp_path: Path
) -> None:
    secured = RedisServer.start(tmp_path, password="s3cret pass")
    try:
        with trio.fail_after(CEILING):
            url = secured.url.rsplit("/", 1)[0] + "/3"
            one, two = await start_nodes(nursery, sqlite_url, url, "p1", "p2")
            existing = sshclient.Machine.classic("ada", "laptop")
            await account(one, existing)
            await pair(one, two, sshclient.Machine.classic("ada", "desktop"), existing)
            with redis.Redis.from_url(url) as check:
                keys = check.keys("sshsync:*")
            assert sorted(keys) == [b"sshsync:node:p1", b"sshsync:node:p2"]
            nursery.cancel_scope.cancel()
    finally:
        secured.stop()


def test_two_processes_pair(
    tmp_path: Path, pg_url: str, redis_url: str, redis_server: RedisServer
) -> None:
    """Two real `ssh-sync-trio serve` processes, one database, one Redis."""
    ports = [free_port(), free_port()]
    processes = [
        _spawn_node(tmp_path, pg_url, redis_url, f"proc-{i}", port)
        for i, port in enumerate(ports)
    ]
    try:
        trio.run(_pair_across_processes, ports)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=10) for p in processes]
    assert codes == [0, 0]
    assert redis_server.keys("sshsync:*") == []
    log = (tmp_path / "proc-0.log").read_text()
    assert "listening on" in log and "bus: redis" in log


async def _pair_across_processes(ports: list[int]) -> None:
    with trio.fail_after(CEILING):
        nodes = [await _wait_for_process(port) for port in ports]
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(nodes[0], existing)
        sealed = await pair(
            nodes[0], nodes[1], sshclient.Machine.post_quantum("ada", "pc"), existing
        )
        assert sealed
        async with harness.client(nodes[1]) as http:
            listed = (await http.get("/machines/", headers=existing.headers())).json()
        assert sorted(m["machine_name"] for m in listed) == ["laptop", "pc"]


async def _wait_for_process(port: int) -> RunningServer:
    import httpx

    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(20):
        while True:
            try:
                async with httpx.AsyncClient() as http:
                    if (await http.get(url + "/api/v1/")).status_code == 200:
                        return _Remote(url)  # type: ignore[return-value]
            except httpx.TransportError:
                await trio.sleep(0.1)


class _Remote:
    """Just enough of `RunningServer` for the test helpers: its URL."""

    def __init__(self, url: str) -> None:
        self.url = url


def _spawn_node(
    tmp_path: Path, database_url: str, redis_url: str, node_id: str, port: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NO_DOTENV": "1",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "NODE_ID": node_id,
        "PORT": str(port),
        "HOST": "127.0.0.1",
    }
    with (tmp_path / f"{node_id}.log").open("wb") as log:
        # The child keeps its own copy of the file descriptor.
        return subprocess.Popen(
            [sys.executable, "-m", "ssh_sync_trio", "serve"],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _healthy(nodes: list[RunningServer]) -> None:
    with trio.fail_after(redis_bus.RECONNECT_MAX + 2 * redis_bus.PROBE_DEADLINE):
        while True:
            if all(n.bus.statistics().healthy for n in nodes):
                return
            await trio.sleep(0.05)


async def _child_nursery(parent: trio.Nursery, scope: trio.CancelScope) -> trio.Nursery:
    """A nursery inside `scope`, run by a task of `parent`, for a node to die in."""

    async def host(task_status: trio.TaskStatus[trio.Nursery]) -> None:
        with scope:
            async with trio.open_nursery() as child:
                task_status.started(child)
                await trio.sleep_forever()

    return await parent.start(host)


async def test_nodes_starting_together_migrate_once(
    nursery: trio.Nursery,
    pg_url: str,
    redis_url: str,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ssh_sync_trio.storage")
    with trio.fail_after(CEILING):
        nodes: list[RunningServer] = []

        async def start(i: int) -> None:
            nodes.append(
                await harness.start_node(
                    nursery, pg_url, redis_url=redis_url, node_id=f"together-{i}"
                )
            )

        async with trio.open_nursery() as starting:
            for i in range(4):
                starting.start_soon(start, i)
        upgrades = [r for r in caplog.records if "upgraded from" in r.getMessage()]
        current = [r for r in caplog.records if "schema is current" in r.getMessage()]
        assert (len(upgrades), len(current)) == (1, 3)
        await assert_clean(redis_server, *nodes)
