"""Connections that stall: every one ends, none is held forever.

Rules: a real node on 127.0.0.1, port 0, in the test's nursery; raw TCP
clients; short timeouts by configuration; a ceiling on every test.
"""

from __future__ import annotations

import pytest
import trio

from ssh_sync_trio import server
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
