"""Tests of the schema: migrations, and adopting a Go server's database.

Rules:

- Real databases: a fresh SQLite file and a fresh database of the
  throwaway PostgreSQL (`database_url`); adoption is PostgreSQL only, the
  Go server's only database (`pg_url`).
- The Go server's schema is written here in plain SQL, as the Go server
  created it, independently of tables.py and of our migrations; so is the
  data put in it.
- Nodes listen on 127.0.0.1, port 0, and are reached over HTTP with the
  client stand-in of tests/sshclient.py.
- Blocking database work runs in a worker thread that the test abandons at
  its ceiling, so every test has one (`ceiling`, a `trio.fail_after`);
  subprocesses are killed at theirs.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
import trio
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from ssh_sync_trio.storage import migrate, queries, tables
from ssh_sync_trio.storage.store import make_engine
from tests import harness, sshclient
from tests.harness import ceiling
from tests.sshclient import Machine

R = TypeVar("R")

SSH_SYNC_TRIO = Path(sys.executable).with_name("ssh-sync-trio")
TABLES = (
    "users",
    "machines",
    "ssh_configs",
    "ssh_keys",
    "known_hosts",
    "master_key_rotations",
)


async def in_thread(work: Callable[..., R], *args: Any) -> R:
    """`work(*args)` in a worker thread, given up on at the test's ceiling."""
    return await trio.to_thread.run_sync(work, *args, abandon_on_cancel=True)


def engine_for(url: str) -> sa.Engine:
    return make_engine(sa.make_url(url), pool_size=1)


# --------------------------------------------------------------------------
# Migrations on a fresh database


def schema_differences(engine: sa.Engine) -> list[Any]:
    """What autogenerate would change to make the database match tables.py.

    Server defaults are compared by value: SQLite reflects the empty string
    default of `known_hosts.marker` as the SQL expression `('')`.
    """
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_type": True, "compare_server_default": True},
        )
        found = compare_metadata(context, tables.metadata)
    return [d for d in found if not _same_default(d)]


def _same_default(difference: Any) -> bool:
    if not (isinstance(difference, list) and difference):
        return False
    kind, *rest = difference[0]
    if kind != "modify_default":
        return False
    reflected, wanted = rest[-2], rest[-1]

    def value(default: Any) -> str | None:
        if default is None:
            return None
        arg = getattr(default, "arg", default)
        text = str(getattr(arg, "text", arg))
        while text.startswith("(") and text.endswith(")"):
            text = text[1:-1]
        return text[1:-1] if text.startswith("'") and text.endswith("'") else text

    return value(reflected) == value(wanted)


@ceiling
async def test_fresh_database_matches_the_tables(database_url: str) -> None:
    engine = engine_for(database_url)
    try:
        revision = await in_thread(migrate.upgrade, engine)
        assert revision == migrate.head_revision()
        assert await in_thread(schema_differences, engine) == []
        names = set(await in_thread(lambda: sa.inspect(engine).get_table_names()))
        assert names == {*TABLES, "alembic_version"}
    finally:
        engine.dispose()


def snapshot(engine: sa.Engine) -> dict[str, Any]:
    """Tables, columns, indexes and the recorded revision: the whole schema."""
    inspector = sa.inspect(engine)
    schema: dict[str, Any] = {}
    for name in sorted(inspector.get_table_names()):
        schema[name] = (
            [
                (c["name"], str(c["type"]), c["nullable"])
                for c in inspector.get_columns(name)
            ],
            sorted(
                str(u["column_names"]) for u in inspector.get_unique_constraints(name)
            ),
            sorted(str(i["column_names"]) for i in inspector.get_indexes(name)),
        )
    with engine.connect() as connection:
        schema["revision"] = (
            connection.execute(sa.text("SELECT version_num FROM alembic_version"))
            .scalars()
            .all()
        )
        schema["rows"] = queries.count_rows(connection)
    return schema


@ceiling
async def test_migrating_twice_changes_nothing(
    nursery: trio.Nursery, database_url: str
) -> None:
    engine = engine_for(database_url)
    try:
        first = await in_thread(migrate.upgrade, engine)
        # Some data, through the API, so that a second run has rows to keep.
        node = await harness.start_node(nursery, database_url)
        machine = Machine.classic("alice", "laptop")
        async with harness.client(node) as http:
            await harness.register(http, machine)
            body = sshclient.data_upload_body(
                [sshclient.ssh_config_entry("h")], None, {"k": b"v"}
            )
            response = await http.post(
                "/data", **body.request_kwargs(machine.headers())
            )
            assert response.status_code == 200
        before = await in_thread(snapshot, engine)
        assert await in_thread(migrate.upgrade, engine) == first
        assert await in_thread(snapshot, engine) == before
        assert before["revision"] == [first]
    finally:
        engine.dispose()


# --------------------------------------------------------------------------
# Adopting the Go server's PostgreSQL database

GO_SCHEMA = {
    "users": """
        CREATE TABLE users (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            username varchar(255) UNIQUE NOT NULL
        )""",
    "machines": """
        CREATE TABLE machines (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid REFERENCES users (id),
            name varchar(255),
            public_key bytea,
            encapsulation_key bytea NULL,
            UNIQUE (user_id, name)
        )""",
    "ssh_configs": """
        CREATE TABLE ssh_configs (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid,
            host varchar(255),
            "values" jsonb,
            identity_files jsonb,
            UNIQUE (user_id, host)
        )""",
    "ssh_keys": """
        CREATE TABLE ssh_keys (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid REFERENCES users (id),
            filename varchar(255),
            data bytea,
            updated_at timestamp,
            UNIQUE (user_id, filename)
        )""",
    "known_hosts": """
        CREATE TABLE known_hosts (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            user_id uuid,
            host_pattern text,
            key_type text,
            key_data text,
            marker text,
            UNIQUE (user_id, host_pattern, key_type)
        )""",
    "master_key_rotations": """
        CREATE TABLE master_key_rotations (
            id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
            machine_id uuid UNIQUE REFERENCES machines (id),
            encrypted_master_key bytea,
            created_at timestamp
        )""",
}

KEY_DATA = os.urandom(300)
KEY_TIME = "2024-03-05 06:07:08.123456"


def create_go_database(
    url: str, machines: list[Machine], *, older: bool
) -> dict[str, Any]:
    """The Go server's schema and one user's data, in plain SQL.

    `older` leaves out what older Go versions lacked: the
    `machines.encapsulation_key` column and the `master_key_rotations`
    table. Returns the ids the database made.
    """
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for name, ddl in GO_SCHEMA.items():
                if older and name == "master_key_rotations":
                    continue
                if older and name == "machines":
                    ddl = ddl.replace("encapsulation_key bytea NULL,", "")
                connection.exec_driver_sql(ddl)
            user_id = connection.exec_driver_sql(
                "INSERT INTO users (username) VALUES (%(u)s) RETURNING id",
                {"u": machines[0].username},
            ).scalar_one()
            for machine in machines:
                connection.exec_driver_sql(
                    "INSERT INTO machines (user_id, name, public_key)"
                    " VALUES (%(u)s, %(n)s, %(k)s)",
                    {
                        "u": user_id,
                        "n": machine.machine_name,
                        "k": machine.public_key_pem,
                    },
                )
            key_id = connection.exec_driver_sql(
                "INSERT INTO ssh_keys (user_id, filename, data, updated_at)"
                " VALUES (%(u)s, 'id_ed25519', %(d)s, %(t)s) RETURNING id",
                {"u": user_id, "d": KEY_DATA, "t": KEY_TIME},
            ).scalar_one()
            config_id = connection.exec_driver_sql(
                'INSERT INTO ssh_configs (user_id, host, "values", identity_files)'
                " VALUES (%(u)s, 'github.com', %(v)s, %(i)s) RETURNING id",
                {
                    "u": user_id,
                    "v": '{"HostName": ["github.com"], "User": ["git"]}',
                    "i": '["~/.ssh/id_ed25519"]',
                },
            ).scalar_one()
            connection.exec_driver_sql(
                "INSERT INTO known_hosts"
                " (user_id, host_pattern, key_type, key_data, marker)"
                " VALUES (%(u)s, 'github.com', 'ssh-ed25519', 'AAAAC3Nz', '')",
                {"u": user_id},
            )
    finally:
        engine.dispose()
    return {"user": str(user_id), "key": str(key_id), "config": str(config_id)}


def all_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the Go tables, sorted: to check that none changed."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            present = set(sa.inspect(connection).get_table_names())
            result = {}
            for name in TABLES:
                if name in present:
                    rows = connection.exec_driver_sql(f"SELECT * FROM {name}")
                    result[name] = sorted(tuple(map(repr, row)) for row in rows)
            return result
    finally:
        engine.dispose()


def columns(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


@pytest.mark.postgres
@ceiling
async def test_adopting_a_go_database(nursery: trio.Nursery, pg_url: str) -> None:
    laptop = Machine.classic("alice", "laptop")
    ids = await in_thread(lambda: create_go_database(pg_url, [laptop], older=False))
    before = await in_thread(all_rows, pg_url)

    node = await harness.start_node(nursery, pg_url)
    assert await in_thread(all_rows, pg_url) == before
    async with harness.client(node) as http:
        response = await http.get("/data", headers=laptop.headers())
        assert response.status_code == 200, response.text
        assert response.json() == {
            "id": ids["user"],
            "username": "alice",
            "keys": [
                {
                    "id": ids["key"],
                    "user_id": ids["user"],
                    "filename": "id_ed25519",
                    "data": base64.b64encode(KEY_DATA).decode(),
                    "updated_at": "2024-03-05T06:07:08.123456+00:00",
                }
            ],
            "ssh_config": [
                {
                    "id": ids["config"],
                    "host": "github.com",
                    "values": {"HostName": ["github.com"], "User": ["git"]},
                    "identity_files": ["~/.ssh/id_ed25519"],
                }
            ],
            "known_hosts": [
                {
                    "host_pattern": "github.com",
                    "key_type": "ssh-ed25519",
                    "key_data": "AAAAC3Nz",
                    "marker": "",
                }
            ],
            "machines": [],
        }
        response = await http.get("/machines/public-keys", headers=laptop.headers())
        [entry] = response.json()["machines"]
        assert set(entry) == {"machine_id", "name", "public_key"}
        assert base64.b64decode(entry["public_key"]) == laptop.public_key_pem

        # Uploads upsert into the Go tables, by their unique constraints.
        body = sshclient.data_upload_body(
            [sshclient.ssh_config_entry("github.com", {"User": ["me"]})],
            [
                {
                    "host_pattern": "gitlab.com",
                    "key_type": "ssh-rsa",
                    "key_data": "AAAAB3",
                    "marker": "",
                }
            ],
            {"id_ed25519": b"new bytes", "id_rsa": b"rsa"},
        )
        response = await http.post("/data", **body.request_kwargs(laptop.headers()))
        assert response.status_code == 200, response.text
        data = (await http.get("/data", headers=laptop.headers())).json()
        keys = {k["filename"]: k for k in data["keys"]}
        assert keys["id_ed25519"]["id"] == ids["key"]
        assert base64.b64decode(keys["id_ed25519"]["data"]) == b"new bytes"
        assert base64.b64decode(keys["id_rsa"]["data"]) == b"rsa"
        assert data["ssh_config"] == [
            {
                "id": ids["config"],
                "host": "github.com",
                "values": {"User": ["me"]},
                "identity_files": [],
            }
        ]
        assert len(data["known_hosts"]) == 2

        # A new account, and a rotation, in the Go tables.
        bob = Machine.post_quantum("bob", "desktop")
        await harness.register(http, bob)
        request = sshclient.key_rotation_request({entry["machine_id"]: b"sealed"})
        request["headers"].update(laptop.headers())
        response = await http.post("/key-rotation", **request)
        assert response.status_code == 200
        response = await http.get("/key-rotation", headers=laptop.headers())
        assert base64.b64decode(response.json()["encrypted_master_key"]) == b"sealed"
        counts = await node.services.store.call(queries.count_rows)
    assert counts == {
        "users": 2,
        "machines": 2,
        "ssh_configs": 1,
        "ssh_keys": 2,
        "known_hosts": 2,
        "master_key_rotations": 1,
    }


@pytest.mark.postgres
@ceiling
async def test_adopting_an_older_go_database(
    nursery: trio.Nursery, pg_url: str
) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.classic("alice", "desktop")
    await in_thread(lambda: create_go_database(pg_url, [laptop, desktop], older=True))
    before = await in_thread(all_rows, pg_url)
    assert "master_key_rotations" not in before
    assert "encapsulation_key" not in await in_thread(columns, pg_url, "machines")

    node = await harness.start_node(nursery, pg_url)
    after = await in_thread(all_rows, pg_url)
    assert after.pop("master_key_rotations") == []
    # The new column is there, NULL on every old row; nothing else changed.
    new_column = [row[-1] for row in after["machines"]]
    after["machines"] = [row[:-1] for row in after["machines"]]
    assert after == before
    assert new_column == ["None", "None"]
    assert "encapsulation_key" in await in_thread(columns, pg_url, "machines")

    async with harness.client(node) as http:
        data = (await http.get("/data", headers=desktop.headers())).json()
        assert [k["filename"] for k in data["keys"]] == ["id_ed25519"]
        # What the new column and table are for: migration and rotation.
        migrated = laptop.rotate_to_post_quantum()
        body = sshclient.key_update_body(migrated)
        response = await http.put(
            "/machines/key", **body.request_kwargs(laptop.headers())
        )
        assert response.status_code == 200, response.text
        response = await http.get("/machines/public-keys", headers=migrated.headers())
        by_name = {m["name"]: m for m in response.json()["machines"]}
        kem = base64.b64decode(by_name["laptop"]["encapsulation_key"])
        assert kem == migrated.encapsulation_key_pem
        request = sshclient.key_rotation_request(
            {by_name["desktop"]["machine_id"]: b"sealed"}
        )
        request["headers"].update(migrated.headers())
        assert (await http.post("/key-rotation", **request)).status_code == 200
        response = await http.get("/key-rotation", headers=desktop.headers())
        assert base64.b64decode(response.json()["encrypted_master_key"]) == b"sealed"
        # The Go tables have no ON DELETE CASCADE: the pending rotation
        # must go first, or the delete fails.
        request = sshclient.delete_machine_request("desktop")
        request["headers"].update(migrated.headers())
        response = await http.request("DELETE", "/machines/", **request)
        assert response.status_code == 200, response.text
        listed = await http.get("/machines/", headers=migrated.headers())
        assert listed.json() == [{"machine_name": "laptop"}]

    # Once adopted, migrating again is a no-op.
    engine = engine_for(pg_url)
    try:
        before_again = await in_thread(all_rows, pg_url)
        assert await in_thread(migrate.upgrade, engine) == migrate.head_revision()
        assert await in_thread(all_rows, pg_url) == before_again
    finally:
        engine.dispose()


# --------------------------------------------------------------------------
# The migrate command


@ceiling
async def test_migrate_command(database_url: str, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": database_url,
        "NO_DOTENV": "1",
    }
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    outputs = []
    for _ in range(2):
        result = await trio.run_process(
            [str(SSH_SYNC_TRIO), "migrate"],
            env=env,
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        log = result.stderr.decode()
        assert result.returncode == 0, log
        outputs.append(log)
    head = migrate.head_revision()
    assert head is not None
    assert f"schema revision {head}" in outputs[0]
    assert "current" in outputs[1]
    # The URL given is the only database: no default file in the cwd.
    assert list(cwd.iterdir()) == []

    engine = engine_for(database_url)
    try:
        assert await in_thread(schema_differences, engine) == []
    finally:
        engine.dispose()
