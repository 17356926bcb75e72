"""Logging set-up: console or JSON lines, access lines apart from the rest.

Loggers: `ssh_sync_trio.*` for lifecycle and outcomes, `ssh_sync_trio.access`
for one line per request, `hypercorn.error` for the HTTP server itself.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str, fmt: str) -> None:
    """Send every record to stderr in `fmt` (`console` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    else:
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library chatter that says nothing an operator can act on.
    for noisy in ("sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
