"""Bring a database's schema up to date with Alembic.

On PostgreSQL the upgrade runs under an advisory lock, so that nodes starting
together migrate once: the first takes the lock and upgrades, the others wait
for it and then find nothing to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

log = logging.getLogger("ssh_sync_trio.storage")

MIGRATIONS = Path(__file__).with_name("migrations")

# An arbitrary constant naming this project's lock among advisory locks.
ADVISORY_LOCK_KEY = 0x55_53_59_4E_43  # "SSYNC"
LOCK_TIMEOUT_SECONDS = 120


def upgrade(engine: Engine) -> str | None:
    """Apply every missing revision; return the revision the database is at."""
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # A node that waits longer than this for another's migration
            # fails to start rather than hanging.
            connection.execute(text(f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'"))
            connection.execute(
                text("SELECT pg_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY}
            )
        try:
            _upgrade(connection)
        finally:
            if connection.dialect.name == "postgresql":
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY}
                )
                connection.commit()
        return current_revision(connection)


def current_revision(connection: Connection) -> str | None:
    """The revision recorded in the database, or None before the first."""
    return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision this code knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def _upgrade(connection: Connection) -> None:
    before = current_revision(connection)
    if before == head_revision():
        log.info("database schema is current (revision %s)", before)
        return
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    connection.commit()
    log.info(
        "database schema upgraded from %s to %s", before, current_revision(connection)
    )


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config
