"""Alembic environment: migrations run on the connection `migrate` hands in."""

from alembic import context

from ssh_sync_trio.storage.tables import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata)
with context.begin_transaction():
    context.run_migrations()
