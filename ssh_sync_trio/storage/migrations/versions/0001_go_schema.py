"""The Go server's six tables: create whichever are missing.

A database made by the Go server already has some or all of them and no
`alembic_version`; this revision adds only what is missing (tables, and the
nullable `machines.encapsulation_key` that older Go versions lacked) and
never touches a row. It is a snapshot of the schema at the time, on purpose
independent of `tables.py`, which may move on in later revisions.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Json = sa.JSON().with_variant(JSONB(), "postgresql")


def _owner() -> sa.Column:
    return sa.Column(
        "user_id",
        sa.Uuid,
        sa.ForeignKey("users.id", ondelete="CASCADE"),
        nullable=False,
    )


TABLES = {
    "users": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("username", sa.String(255), nullable=False, unique=True),
    ),
    "machines": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        _owner(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("encapsulation_key", sa.LargeBinary, nullable=True),
        sa.UniqueConstraint("user_id", "name"),
    ),
    "ssh_configs": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        _owner(),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("values", Json, nullable=False),
        sa.Column("identity_files", Json, nullable=True),
        sa.UniqueConstraint("user_id", "host"),
    ),
    "ssh_keys": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        _owner(),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint("user_id", "filename"),
    ),
    "known_hosts": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        _owner(),
        sa.Column("host_pattern", sa.Text, nullable=False),
        sa.Column("key_type", sa.Text, nullable=False),
        sa.Column("key_data", sa.Text, nullable=False),
        sa.Column("marker", sa.Text, nullable=False, server_default=""),
        sa.UniqueConstraint("user_id", "host_pattern", "key_type"),
    ),
    "master_key_rotations": lambda: (
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column(
            "machine_id",
            sa.Uuid,
            sa.ForeignKey("machines.id", ondelete="CASCADE"),
            nullable=False,
            unique=True,
        ),
        sa.Column("encrypted_master_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    ),
}


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())
    for name, columns in TABLES.items():
        if name not in existing:
            op.create_table(name, *columns())
    if "machines" in existing:
        present = {c["name"] for c in inspector.get_columns("machines")}
        if "encapsulation_key" not in present:
            op.add_column(
                "machines",
                sa.Column("encapsulation_key", sa.LargeBinary, nullable=True),
            )
