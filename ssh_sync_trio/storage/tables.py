"""The six tables, with the Go server's table and column names.

The names and shapes match the Go server's PostgreSQL schema so that its
database can be adopted as it is. On SQLite the same tables use portable
types: UUIDs as 32 hex characters, JSON as text, bytes as BLOB.
"""

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

# JSONB on PostgreSQL, as the Go server declared it; JSON text elsewhere.
Json = JSON().with_variant(JSONB(), "postgresql")

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("username", String(255), nullable=False, unique=True),
)

machines = Table(
    "machines",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("public_key", LargeBinary, nullable=False),
    Column("encapsulation_key", LargeBinary, nullable=True),
    UniqueConstraint("user_id", "name"),
)

ssh_configs = Table(
    "ssh_configs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("host", String(255), nullable=False),
    Column("values", Json, nullable=False),
    Column("identity_files", Json, nullable=True),
    UniqueConstraint("user_id", "host"),
)

ssh_keys = Table(
    "ssh_keys",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("filename", String(255), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("updated_at", DateTime, nullable=True),
    UniqueConstraint("user_id", "filename"),
)

known_hosts = Table(
    "known_hosts",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("host_pattern", Text, nullable=False),
    Column("key_type", Text, nullable=False),
    Column("key_data", Text, nullable=False),
    Column("marker", Text, nullable=False, server_default=""),
    UniqueConstraint("user_id", "host_pattern", "key_type"),
)

master_key_rotations = Table(
    "master_key_rotations",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column(
        "machine_id",
        Uuid,
        ForeignKey("machines.id", ondelete="CASCADE"),
        nullable=False,
        unique=True,
    ),
    Column("encrypted_master_key", LargeBinary, nullable=False),
    Column("created_at", DateTime, nullable=False),
)
