"""A guard around one race in hypercorn 0.18's trio TCP server.

When the application closes a WebSocket at the moment the client's own
close frame arrives, hypercorn's reader answers the close frame
(`send_all`, under its send lock) while the closing task half-closes the
stream (`send_eof`, outside that lock). Hypercorn expects the clash on the
`send_eof` side and ignores it there; on the `send_all` side it raises
`trio.BusyResourceError`, which escapes the connection's task group and
takes the whole server down. Here that clash means what hypercorn already
assumes on the other side: the connection is closing, so it is treated as
closed.

Known shortcoming: this replaces the class that `hypercorn.trio.run` uses,
because hypercorn offers no hook for it; drop it once hypercorn handles the
clash itself.
"""

from __future__ import annotations

import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event
from hypercorn.trio.tcp_server import TCPServer


class GuardedTCPServer(TCPServer):
    """Hypercorn's TCP server, with a clash of two senders taken as a close."""

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())


def install() -> None:
    """Make hypercorn's trio worker use `GuardedTCPServer`."""
    hypercorn.trio.run.TCPServer = GuardedTCPServer  # type: ignore[misc]
