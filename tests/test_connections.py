"""Connections that stall: every one ends, none is held forever.

Rules: a real node on 127.0.0.1, port 0, in the test's nursery; raw TCP
clients; short timeouts by configuration; a ceiling on every test.
"""

from __future__ import annotations

import gc
import logging
import warnings

import pytest
import trio

from ssh_sync_trio import server
from ssh_sync_trio.errors import StartupError
from ssh_sync_trio.storage import queries
from tests import harness

CEILING = 20
STALLED_UPLOAD = (
    b"POST /api/v1/setup HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
    b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n"
)


async def test_stalled_upload_is_closed(
    nursery: trio.Nursery,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A body that stops arriving ends at the read timeout, quietly."""
    monkeypatch.setattr(server, "READ_MARGIN", 0.5)
    with trio.fail_after(CEILING):
        node = await harness.start_node(
            nursery, sqlite_url, challenge_timeout=0.5, pairing_step_timeout=0.5
        )
        host, port = node.url.removeprefix("http://").rsplit(":", 1)
        async with await trio.open_tcp_stream(host, int(port)) as stream:
            await stream.send_all(STALLED_UPLOAD)
            started = trio.current_time()
            with trio.fail_after(4):
                while await stream.receive_some():
                    pass
            # The read timeout is max(0.5, 0.5) + 0.5 seconds of silence.
            assert trio.current_time() - started >= 0.9
        rows = await node.services.store.call(queries.count_rows)
        assert set(rows.values()) == {0}
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_port_in_use_refuses_to_start(
    nursery: trio.Nursery, sqlite_url: str
) -> None:
    with trio.fail_after(CEILING):
        node = await harness.start_node(nursery, sqlite_url)
        port = int(node.url.rsplit(":", 1)[1])
        with pytest.RaisesGroup(
            pytest.RaisesExc(
                StartupError, match="cannot listen on .*Address already in use"
            ),
            flatten_subgroups=True,
        ):
            await harness.start_node(nursery, sqlite_url, port=port)
    # Hypercorn leaves the socket it failed to bind for the collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.parametrize(("hops", "seen"), [(0, "127.0.0.1"), (1, "203.0.113.7")])
async def test_client_address_behind_a_proxy(
    nursery: trio.Nursery,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
    hops: int,
    seen: str,
) -> None:
    """X-Forwarded-For is believed only from TRUSTED_PROXY_HOPS proxies."""
    caplog.set_level(logging.INFO, logger="ssh_sync_trio.access")
    with trio.fail_after(CEILING):
        node = await harness.start_node(nursery, sqlite_url, trusted_proxy_hops=hops)
        async with harness.client(node) as http:
            response = await http.get("/", headers={"X-Forwarded-For": "203.0.113.7"})
            assert response.status_code == 200
        # The access line is written once the response has gone out.
        while True:
            if lines := _access_lines(caplog):
                break
            await trio.sleep(0.01)
    [line] = lines
    assert line.endswith(" " + seen)


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssh_sync_trio.access"]
