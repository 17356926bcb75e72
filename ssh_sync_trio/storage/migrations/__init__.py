"""Alembic migrations; run through `ssh_sync_trio.storage.migrate`."""
