"""The `ssh-sync-trio` command: `serve` (the default) and `migrate`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import trio

from ssh_sync_trio import __version__, logs
from ssh_sync_trio.config import ConfigError, Settings, load_dotenv_unless_disabled

log = logging.getLogger("ssh_sync_trio.server")

ENVIRONMENT = """\
environment variables (also read from ./.env unless NO_DOTENV is set):
  PORT                  port to listen on (3000)
  HOST                  address to listen on (0.0.0.0)
  DATABASE_URL          sqlite:///path or postgresql://user:pass@host:port/db;
                        default: ssh-sync.sqlite3 in the working directory
  DATABASE_HOST         PostgreSQL host[:port], as for the Go server; with
  DATABASE_USERNAME,    DATABASE_PASSWORD and DATABASE_NAME
  REDIS_URL             redis://[:password@]host:port/db or rediss://...;
                        setting it (or REDIS_ADDR) turns on cluster mode
  REDIS_ADDR            Redis host:port, as for the Go server; with
  REDIS_PASSWORD,       REDIS_DB (0)
  NODE_ID               this node's id in a cluster (the host name)
  LOG_LEVEL             DEBUG, INFO, WARNING or ERROR (INFO)
  LOG_FORMAT            console or json (console)
  MAX_UPLOAD_BYTES      largest request body accepted (33554432)
  CHALLENGE_TIMEOUT     seconds a new machine waits for its phrase (30)
  PAIRING_STEP_TIMEOUT  seconds each later pairing step may take (30)
  MAX_PENDING_PER_USER  open pairing phrases per user (5)
  MAX_PENDING           open pairing phrases per node (10000)
  DB_THREADS            database worker threads and connections (8)
  SHUTDOWN_GRACE        seconds open connections get at shutdown (5)
  TRUSTED_PROXY_HOPS    proxies in front whose X-Forwarded-For is believed,
                        for the client address in the access log (0)
  NO_DOTENV             set to skip reading .env
"""


def parser() -> argparse.ArgumentParser:
    """The command line: every option overrides its environment variable."""
    top = argparse.ArgumentParser(
        prog="ssh-sync-trio",
        description="A server for the ssh-sync client: one process on SQLite, "
        "or a cluster on PostgreSQL and Redis.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = top.add_subparsers(dest="command", metavar="{serve,migrate}")
    serve = commands.add_parser(
        "serve",
        help="migrate the database, then serve HTTP and WebSocket (the default)",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for command in (
        serve,
        commands.add_parser(
            "migrate",
            help="bring the database schema up to date, then exit",
            epilog=ENVIRONMENT,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
    ):
        command.add_argument(
            "--database-url", metavar="URL", help="overrides DATABASE_URL"
        )
    serve.add_argument("--host", help="overrides HOST")
    serve.add_argument("--port", help="overrides PORT")
    serve.add_argument("--redis-url", metavar="URL", help="overrides REDIS_URL")
    serve.add_argument("--node-id", help="overrides NODE_ID")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script and of `python -m ssh_sync_trio`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "migrate", "-h", "--help", "--version"):
        argv.insert(0, "serve")  # `serve` is the default, options and all
    args = parser().parse_args(argv)
    load_dotenv_unless_disabled()
    for option, variable in (
        ("database_url", "DATABASE_URL"),
        ("host", "HOST"),
        ("port", "PORT"),
        ("redis_url", "REDIS_URL"),
        ("node_id", "NODE_ID"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            os.environ[variable] = value
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        sys.exit(f"ssh-sync-trio: configuration error: {error}")
    logs.configure(settings.log_level, settings.log_format)
    if args.command == "migrate":
        sys.exit(_migrate(settings))
    sys.exit(trio.run(_serve_until_signal, settings))


def _migrate(settings: Settings) -> int:
    from sqlalchemy.exc import DBAPIError

    from ssh_sync_trio.errors import first_line
    from ssh_sync_trio.storage import migrate
    from ssh_sync_trio.storage.store import describe, make_engine

    engine = make_engine(settings.database, pool_size=1)
    try:
        revision = migrate.upgrade(engine)
    except DBAPIError as error:
        place = describe(settings.database)
        log.critical("cannot migrate %s: %s", place, first_line(error.orig))
        return 1
    finally:
        engine.dispose()
    log.info(
        "database %s is at schema revision %s", describe(settings.database), revision
    )
    return 0


async def _serve_until_signal(settings: Settings) -> int:
    from ssh_sync_trio.errors import StartupError
    from ssh_sync_trio.server import serve

    shutdown = trio.Event()
    refused: list[BaseException] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _wait_for_signals, signals, shutdown, nursery.cancel_scope
            )
            try:
                await serve(settings, shutdown=shutdown)
            except* StartupError as errors:
                refused.extend(errors.exceptions)
            finally:
                nursery.cancel_scope.cancel()
    for error in refused:
        log.critical("not starting: %s", error)
    return 1 if refused else 0


async def _wait_for_signals(
    signals: AsyncIterator[int], shutdown: trio.Event, everything: trio.CancelScope
) -> None:
    """The first signal stops gracefully; a second one stops at once."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if not shutdown.is_set():
            log.info("received %s, stopping (send it again to stop at once)", name)
            shutdown.set()
        else:
            log.warning("received %s again, stopping at once", name)
            everything.cancel()
