"""The domain's records: users, machines and what they sync.

These are frozen snapshots read from or written to storage; the wire layer
turns them into the client's JSON and back.
"""

from __future__ import annotations

import datetime as dt
import uuid

import attrs


@attrs.frozen
class User:
    """An account: a username and the machines registered under it."""

    id: uuid.UUID
    username: str


@attrs.frozen
class Machine:
    """A registered machine and the public keys it authenticates with."""

    id: uuid.UUID
    user_id: uuid.UUID
    name: str
    public_key: bytes
    encapsulation_key: bytes | None = None


@attrs.frozen
class NewMachine:
    """A machine about to be registered: its name and keys, no id yet."""

    name: str
    public_key: bytes
    encapsulation_key: bytes | None = None


@attrs.frozen
class SshKey:
    """One key file, stored as the client's opaque ciphertext."""

    id: uuid.UUID
    user_id: uuid.UUID
    filename: str
    data: bytes
    updated_at: dt.datetime | None


@attrs.frozen
class SshConfig:
    """One `Host` block of an ssh config, matched by `host`."""

    host: str
    values: dict[str, list[str]]
    identity_files: list[str] | None
    id: uuid.UUID | None = None


@attrs.frozen
class KnownHost:
    """One known_hosts line, matched by (`host_pattern`, `key_type`)."""

    host_pattern: str
    key_type: str
    key_data: str
    marker: str = ""


@attrs.frozen
class UserData:
    """Everything `GET /data` hands back for one user."""

    user: User
    keys: list[SshKey]
    ssh_config: list[SshConfig]
    known_hosts: list[KnownHost]


@attrs.frozen
class Upload:
    """What one `POST /data` brings: all of it is stored in one transaction."""

    ssh_config: list[SshConfig]
    known_hosts: list[KnownHost]
    keys: dict[str, bytes]
