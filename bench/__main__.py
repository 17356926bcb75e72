"""Pairing latency: one node against a cluster behind one address.

Starts, side by side in one run and on one machine:

- `single`: one `ssh-sync-trio serve` process, SQLite, in-memory bus;
- `single+redis`: one process on PostgreSQL with the Redis bus;
- `proxy+redis`: the same process, reached through the benchmark's TCP
  proxy, to tell the proxy's share of the cluster's time;
- `cluster`: two processes on PostgreSQL and Redis behind that round-robin
  proxy on one port, so that the two machines of a pairing land on
  different nodes, as behind a load balancer without sticky sessions.

Each setup runs the same number of complete pairings one after another
(the new machine's socket, then the existing machine's, through the proxy
for the cluster) and reports the median and 90th percentile of the time
from the new machine's first message to its last. The machine is shared
and noisy: read the ratios to `single`, measured in the same run, not the
absolute figures.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import httpx
import trio

from tests import sshclient
from tests.pairing import pair
from tests.servers import PostgresServer, RedisServer, free_port


class Remote:
    """A server reached by URL only (what `tests.pairing` needs of a node)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"


@contextmanager
def spawned(folder: Path, name: str, port: int, **env: str) -> Iterator[Remote]:
    """One `ssh-sync-trio serve` process; SIGTERM on exit."""
    variables = {**os.environ, "NO_DOTENV": "1", "HOST": "127.0.0.1", "PORT": str(port)}
    variables.update({"NODE_ID": name, "LOG_LEVEL": "WARNING", **env})
    with (folder / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ssh_sync_trio", "serve"],
            env=variables,
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Remote(port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


async def wait_ready(node: Remote) -> None:
    """Until the node answers `GET /api/v1/`, at most 20 s."""
    with trio.fail_after(20):
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(node.url + "/api/v1/")).status_code == 200:
                        return
                except httpx.TransportError:
                    await trio.sleep(0.05)


@asynccontextmanager
async def round_robin(ports: list[int]) -> AsyncIterator[Remote]:
    """A TCP proxy on a free port, sending each connection to the next node."""
    upstream = itertools.cycle(ports)

    async def relay(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            async for chunk in source:
                await sink.send_all(chunk)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", next(upstream))
        async with client, server, trio.open_nursery() as both:
            both.start_soon(relay, client, server)
            both.start_soon(relay, server, client)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
        )
        yield Remote(listeners[0].socket.getsockname()[1])
        nursery.cancel_scope.cancel()


async def measure(
    b_node: Remote, a_node: Remote, count: int, label: str
) -> list[float]:
    """`count` pairings in a row; seconds each."""
    existing = sshclient.Machine.classic(f"bench-{label}", "laptop")
    async with httpx.AsyncClient(base_url=a_node.url + "/api/v1") as http:
        response = await http.post("/setup", **sshclient.setup_form(existing))
        response.raise_for_status()
    times = []
    for i in range(count):
        new = sshclient.Machine.classic(existing.username, f"m{i}")
        started = trio.current_time()
        await pair(b_node, a_node, new, existing)  # type: ignore[arg-type]
        times.append(trio.current_time() - started)
    return times


def report(label: str, times: list[float], baseline: float | None) -> None:
    median = statistics.median(times) * 1000
    p90 = statistics.quantiles(times, n=10)[-1] * 1000
    ratio = f"{median / baseline:5.2f}x" if baseline else "  1.00x"
    print(f"{label:14s} median {median:7.2f} ms  p90 {p90:7.2f} ms  {ratio} of single")


async def run(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        postgres = PostgresServer.start(folder / "pg")
        redis = RedisServer.start(folder / "redis")
        try:
            await _run_all(folder, postgres, redis, count)
        finally:
            redis.stop()
            postgres.stop()


async def _run_all(
    folder: Path, postgres: PostgresServer, redis: RedisServer, count: int
) -> None:
    ports = [free_port() for _ in range(4)]
    cluster_db = postgres.create_database("bench_cluster")
    single_redis_db = postgres.create_database("bench_single")
    with (
        spawned(
            folder, "single", ports[0], DATABASE_URL=f"sqlite:///{folder / 'one.db'}"
        ) as single,
        spawned(
            folder, "solo", ports[1], DATABASE_URL=single_redis_db, REDIS_URL=redis.url
        ) as solo,
        spawned(
            folder, "node-1", ports[2], DATABASE_URL=cluster_db, REDIS_URL=redis.url
        ),
        spawned(
            folder, "node-2", ports[3], DATABASE_URL=cluster_db, REDIS_URL=redis.url
        ),
    ):
        for node in (single, solo, Remote(ports[2]), Remote(ports[3])):
            await wait_ready(node)
        async with (
            round_robin(ports[1:2]) as proxied,
            round_robin(ports[2:]) as balanced,
        ):
            setups = {
                "single": single,
                "single+redis": solo,
                "proxy+redis": proxied,
                "cluster": balanced,
            }
            # Warm every path up, then measure the setups in turns, so that
            # noise on the machine falls on all of them alike.
            for label, node in setups.items():
                await measure(node, node, 3, f"warm-{label}")
            results: dict[str, list[float]] = {label: [] for label in setups}
            for round_ in range(5):
                for label, node in setups.items():
                    results[label] += await measure(
                        node, node, count // 5, f"{label}{round_}"
                    )
    print(f"pairing latency, {count} pairings per setup, one after another")
    baseline = statistics.median(results["single"]) * 1000
    for label, times in results.items():
        report(label, times, None if label == "single" else baseline)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--pairings", type=int, default=100, help="per setup (100)")
    args = parser.parse_args()
    trio.run(run, args.pairings)


if __name__ == "__main__":
    main()
