"""The queries, each a plain function of a `Connection` run by `Store.call`.

Each function is one unit of work inside the transaction `Store` opens;
upserts use the dialect's INSERT ... ON CONFLICT so that two uploads racing
on PostgreSQL cannot both insert the same row.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, Table, and_, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from ssh_sync_trio.model import (
    KnownHost,
    Machine,
    NewMachine,
    SshConfig,
    SshKey,
    Upload,
    User,
    UserData,
)
from ssh_sync_trio.storage.store import Conflict, NotFound, NotYours, RotationPending
from ssh_sync_trio.storage.tables import (
    known_hosts,
    machines,
    master_key_rotations,
    ssh_configs,
    ssh_keys,
    users,
)


def utcnow() -> dt.datetime:
    """Now in UTC, naive, as the Go schema's `timestamp` columns hold it."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# Users and machines


def find_user(conn: Connection, username: str) -> User | None:
    """The user called `username`, if any."""
    row = conn.execute(select(users).where(users.c.username == username)).first()
    return User(row.id, row.username) if row else None


def find_caller(conn: Connection, username: str, machine_name: str) -> Machine | None:
    """The machine `machine_name` of user `username`: whom a token names."""
    row = conn.execute(
        select(machines)
        .join(users, users.c.id == machines.c.user_id)
        .where(users.c.username == username, machines.c.name == machine_name)
    ).first()
    return _machine(row) if row else None


def list_machines(conn: Connection, user_id: uuid.UUID) -> list[Machine]:
    """The user's machines, by name."""
    rows = conn.execute(
        select(machines).where(machines.c.user_id == user_id).order_by(machines.c.name)
    )
    return [_machine(row) for row in rows]


def find_machine(
    conn: Connection, user_id: uuid.UUID, machine_id: uuid.UUID
) -> Machine:
    """One of the user's machines by id; `NotFound` for anyone else's."""
    row = conn.execute(
        select(machines).where(
            machines.c.user_id == user_id, machines.c.id == machine_id
        )
    ).first()
    if row is None:
        raise NotFound("machine")
    return _machine(row)


def machine_exists(conn: Connection, username: str, machine_name: str) -> bool:
    """Whether the user already has a machine of that name."""
    return find_caller(conn, username, machine_name) is not None


def create_user(conn: Connection, username: str, first: NewMachine) -> Machine:
    """A new user with its first machine; `Conflict` if the name is taken."""
    user_id = uuid.uuid4()
    inserted = conn.execute(
        _insert(conn, users)
        .values(id=user_id, username=username)
        .on_conflict_do_nothing()
        .returning(users.c.id)
    ).first()
    if inserted is None:
        raise Conflict("user exists")
    return add_machine(conn, user_id, first)


def add_machine(conn: Connection, user_id: uuid.UUID, new: NewMachine) -> Machine:
    """Register `new` for the user; `Conflict` if the name is taken."""
    machine_id = uuid.uuid4()
    inserted = conn.execute(
        _insert(conn, machines)
        .values(
            id=machine_id,
            user_id=user_id,
            name=new.name,
            public_key=new.public_key,
            encapsulation_key=new.encapsulation_key,
        )
        .on_conflict_do_nothing()
        .returning(machines.c.id)
    ).first()
    if inserted is None:
        raise Conflict("machine exists")
    return Machine(machine_id, user_id, new.name, new.public_key, new.encapsulation_key)


def delete_machine(conn: Connection, user_id: uuid.UUID, name: str) -> None:
    """Remove the user's machine `name` and its pending rotation."""
    machine_id = conn.execute(
        select(machines.c.id).where(
            machines.c.user_id == user_id, machines.c.name == name
        )
    ).scalar()
    if machine_id is None:
        raise NotFound("machine")
    # The Go schema may lack ON DELETE CASCADE: remove dependants explicitly.
    conn.execute(
        delete(master_key_rotations).where(
            master_key_rotations.c.machine_id == machine_id
        )
    )
    conn.execute(delete(machines).where(machines.c.id == machine_id))


def replace_machine_key(
    conn: Connection,
    machine_id: uuid.UUID,
    public_key: bytes,
    encapsulation_key: bytes | None,
) -> None:
    """Give the machine a new public key; keep its encapsulation key if none."""
    values: dict[str, Any] = {"public_key": public_key}
    if encapsulation_key is not None:
        values["encapsulation_key"] = encapsulation_key
    conn.execute(update(machines).where(machines.c.id == machine_id).values(**values))


# Synced data


def user_data(conn: Connection, user: User) -> UserData:
    """Everything the user has synced: keys, config entries, known hosts."""
    keys = conn.execute(
        select(ssh_keys)
        .where(ssh_keys.c.user_id == user.id)
        .order_by(ssh_keys.c.filename)
    )
    configs = conn.execute(
        select(ssh_configs)
        .where(ssh_configs.c.user_id == user.id)
        .order_by(ssh_configs.c.host)
    )
    hosts = conn.execute(
        select(known_hosts)
        .where(known_hosts.c.user_id == user.id)
        .order_by(known_hosts.c.host_pattern, known_hosts.c.key_type)
    )
    return UserData(
        user=user,
        keys=[SshKey(r.id, r.user_id, r.filename, r.data, r.updated_at) for r in keys],
        ssh_config=[_config(r) for r in configs],
        known_hosts=[
            KnownHost(r.host_pattern, r.key_type, r.key_data, r.marker) for r in hosts
        ],
    )


def store_upload(conn: Connection, machine: Machine, upload: Upload) -> list[SshKey]:
    """Upsert all of `upload`; `RotationPending` if the machine must download first.

    Rows are written in the order of their unique keys, whatever the order
    of the upload: two uploads of one user that lock the same rows in
    opposite orders deadlock on PostgreSQL, and one of them fails. The sort
    is stable, so of two entries for one host the last still wins.
    """
    if _pending_rotation(conn, machine.id) is not None:
        raise RotationPending()
    for entry in sorted(upload.ssh_config, key=lambda c: c.host):
        upsert_config(conn, machine.user_id, entry)
    hosts = sorted(upload.known_hosts, key=lambda h: (h.host_pattern, h.key_type))
    _upsert_known_hosts(conn, machine.user_id, hosts)
    return _upsert_keys(conn, machine.user_id, dict(sorted(upload.keys.items())))


def upsert_config(conn: Connection, user_id: uuid.UUID, entry: SshConfig) -> SshConfig:
    """Insert or replace the user's config entry for `entry.host`."""
    row = conn.execute(
        _insert(conn, ssh_configs)
        .values(
            id=uuid.uuid4(),
            user_id=user_id,
            host=entry.host,
            values=entry.values,
            identity_files=entry.identity_files,
        )
        .on_conflict_do_update(
            index_elements=[ssh_configs.c.user_id, ssh_configs.c.host],
            set_={"values": entry.values, "identity_files": entry.identity_files},
        )
        .returning(ssh_configs)
    ).one()
    return _config(row)


def delete_config(conn: Connection, user_id: uuid.UUID, config_id: uuid.UUID) -> None:
    """Remove one of the user's config entries; `NotFound` for anyone else's."""
    _delete_owned(conn, ssh_configs, user_id, config_id)


def delete_key(conn: Connection, user_id: uuid.UUID, key_id: uuid.UUID) -> None:
    """Remove one of the user's keys; `NotFound` for anyone else's."""
    _delete_owned(conn, ssh_keys, user_id, key_id)


# Master key rotation


def store_rotation(
    conn: Connection, user_id: uuid.UUID, keys: Sequence[tuple[uuid.UUID, bytes]]
) -> None:
    """For each machine, replace its pending key; all or nothing.

    `NotYours` if any machine id is not one of the user's machines.
    """
    wanted = {machine_id for machine_id, _ in keys}
    if not wanted:
        return
    owned = set(
        conn.execute(
            select(machines.c.id).where(
                machines.c.user_id == user_id, machines.c.id.in_(wanted)
            )
        ).scalars()
    )
    if owned != wanted:
        raise NotYours()
    now = utcnow()
    # In id order, so that two rotations at once cannot deadlock.
    for machine_id, key in sorted(dict(keys).items()):
        conn.execute(
            _insert(conn, master_key_rotations)
            .values(
                id=uuid.uuid4(),
                machine_id=machine_id,
                encrypted_master_key=key,
                created_at=now,
            )
            .on_conflict_do_update(
                index_elements=[master_key_rotations.c.machine_id],
                set_={"encrypted_master_key": key, "created_at": now},
            )
        )


def pending_rotation(conn: Connection, machine_id: uuid.UUID) -> bytes:
    """The master key waiting for this machine; `NotFound` if none."""
    key = _pending_rotation(conn, machine_id)
    if key is None:
        raise NotFound("pending rotation")
    return key


def clear_rotation(conn: Connection, machine_id: uuid.UUID) -> None:
    """Acknowledge the rotation: nothing waits for this machine any more."""
    conn.execute(
        delete(master_key_rotations).where(
            master_key_rotations.c.machine_id == machine_id
        )
    )


def count_rows(conn: Connection) -> dict[str, int]:
    """Rows per table: a fingerprint that tests compare before and after."""
    tables = (users, machines, ssh_configs, ssh_keys, known_hosts, master_key_rotations)
    return {
        t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
        for t in tables
    }


# Helpers


def _insert(conn: Connection, table: Table) -> Any:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _machine(row: Any) -> Machine:
    return Machine(
        row.id,
        row.user_id,
        row.name,
        bytes(row.public_key),
        _bytes(row.encapsulation_key),
    )


def _bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _config(row: Any) -> SshConfig:
    return SshConfig(row.host, row.values or {}, row.identity_files, row.id)


def _pending_rotation(conn: Connection, machine_id: uuid.UUID) -> bytes | None:
    key = conn.execute(
        select(master_key_rotations.c.encrypted_master_key).where(
            master_key_rotations.c.machine_id == machine_id
        )
    ).scalar()
    return _bytes(key)


# What a row of each table is called in an error message.
_WHAT = {ssh_keys.name: "key", ssh_configs.name: "config entry"}


def _delete_owned(
    conn: Connection, table: Table, user_id: uuid.UUID, row_id: uuid.UUID
) -> None:
    result = conn.execute(
        delete(table).where(and_(table.c.user_id == user_id, table.c.id == row_id))
    )
    if result.rowcount == 0:
        raise NotFound(_WHAT[table.name])


def _upsert_known_hosts(
    conn: Connection, user_id: uuid.UUID, hosts: Iterable[KnownHost]
) -> None:
    for host in hosts:
        conn.execute(
            _insert(conn, known_hosts)
            .values(
                id=uuid.uuid4(),
                user_id=user_id,
                host_pattern=host.host_pattern,
                key_type=host.key_type,
                key_data=host.key_data,
                marker=host.marker,
            )
            .on_conflict_do_update(
                index_elements=[
                    known_hosts.c.user_id,
                    known_hosts.c.host_pattern,
                    known_hosts.c.key_type,
                ],
                set_={"key_data": host.key_data, "marker": host.marker},
            )
        )


def _upsert_keys(
    conn: Connection, user_id: uuid.UUID, keys: dict[str, bytes]
) -> list[SshKey]:
    now = utcnow()
    stored = []
    for filename, data in keys.items():
        row = conn.execute(
            _insert(conn, ssh_keys)
            .values(
                id=uuid.uuid4(),
                user_id=user_id,
                filename=filename,
                data=data,
                updated_at=now,
            )
            .on_conflict_do_update(
                index_elements=[ssh_keys.c.user_id, ssh_keys.c.filename],
                set_={"data": data, "updated_at": now},
            )
            .returning(ssh_keys.c.id)
        ).one()
        stored.append(SshKey(row.id, user_id, filename, data, now))
    return stored
