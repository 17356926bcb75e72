"""Servers under test: each runs inside the test's own nursery.

`start_node` starts one node (hypercorn on 127.0.0.1, port 0) with
`nursery.start`, so the test continues only once the node listens, and the
node stops when the test's nursery is cancelled at the test's end.
"""

from __future__ import annotations

import functools
import inspect
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import attrs
import httpx
import trio

from ssh_sync_trio.config import Settings
from ssh_sync_trio.server import RunningServer, serve
from tests import sshclient

# Seconds any one test may take, unless it says otherwise.
CEILING = 30
F = TypeVar("F", bound=Callable[..., Any])


def settings(database_url: str, **overrides: Any) -> Settings:
    """Settings for a test node: loopback, an ephemeral port, quiet defaults."""
    base = Settings(
        host="127.0.0.1",
        port=0,
        database_url=database_url,
        node_id=overrides.pop("node_id", "test-node"),
        db_threads=4,
        shutdown_grace=1.0,
    )
    return attrs.evolve(base, **overrides)


async def start_node(
    nursery: trio.Nursery, database_url: str, **overrides: Any
) -> RunningServer:
    """One node of ssh-sync-trio in `nursery`, listening."""
    node: RunningServer = await nursery.start(
        partial(serve, settings(database_url, **overrides))
    )
    return node


def client(node: RunningServer) -> httpx.AsyncClient:
    """An HTTP client for `node`'s API; close it (use `async with`)."""
    return httpx.AsyncClient(base_url=node.url + "/api/v1", timeout=10)


def ws_url(node: RunningServer, path: str) -> str:
    """The WebSocket URL of `path` under `/api/v1` on `node`."""
    return node.url.replace("http://", "ws://") + "/api/v1" + path


async def register(http: httpx.AsyncClient, machine: sshclient.Machine) -> None:
    """Create the account and first machine of `machine`, as `ssh-sync setup`."""
    response = await http.post("/setup", **sshclient.setup_form(machine))
    assert response.status_code == 200, response.text


def ceiling(test: F) -> F:
    """Fail `test`, async or not, when it runs longer than CEILING seconds."""
    if inspect.iscoroutinefunction(test):

        @functools.wraps(test)
        async def bounded(*args: Any, **kwargs: Any) -> None:
            with trio.fail_after(CEILING):
                await test(*args, **kwargs)

        return bounded  # type: ignore[return-value]

    @functools.wraps(test)
    def timed(*args: Any, **kwargs: Any) -> None:
        with _alarm(CEILING):
            test(*args, **kwargs)

    return timed  # type: ignore[return-value]


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """SIGALRM after `seconds`: a ceiling for a test outside trio."""

    def expired(_signum: int, _frame: Any) -> None:
        raise TimeoutError(f"test took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
