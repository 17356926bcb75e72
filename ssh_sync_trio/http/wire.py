"""The client's JSON: Go `encoding/json` conventions, both directions.

Bytes are standard base64 with padding, UUIDs lowercase and hyphenated,
timestamps RFC 3339 with an offset, empty lists `[]` rather than null.
Parsing checks shapes and types and raises `BadRequest` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from typing import Any

from ssh_sync_trio.http.errors import BadRequest
from ssh_sync_trio.model import KnownHost, Machine, SshConfig, SshKey, UserData
from ssh_sync_trio.names import MAX_NAME, has_control, name_problem, storable

# Out


def b64(data: bytes) -> str:
    """Standard base64 with padding, as Go encodes `[]byte`."""
    return base64.b64encode(data).decode("ascii")


def timestamp(moment: dt.datetime | None) -> str | None:
    """RFC 3339 with an offset; stored times are naive UTC."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.isoformat()


def key_json(key: SshKey, *, with_data: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(key.id),
        "user_id": str(key.user_id),
        "filename": key.filename,
    }
    if with_data:
        body["data"] = b64(key.data)
    body["updated_at"] = timestamp(key.updated_at)
    return body


def config_json(entry: SshConfig) -> dict[str, Any]:
    return {
        "id": str(entry.id),
        "host": entry.host,
        "values": entry.values,
        "identity_files": entry.identity_files
        if entry.identity_files is not None
        else [],
    }


def known_host_json(host: KnownHost) -> dict[str, Any]:
    return {
        "host_pattern": host.host_pattern,
        "key_type": host.key_type,
        "key_data": host.key_data,
        "marker": host.marker,
    }


def data_json(data: UserData) -> dict[str, Any]:
    """The client's `DataDto`."""
    return {
        "id": str(data.user.id),
        "username": data.user.username,
        "keys": [key_json(k) for k in data.keys],
        "ssh_config": [config_json(c) for c in data.ssh_config],
        "known_hosts": [known_host_json(h) for h in data.known_hosts],
        "machines": [],
    }


def machine_keys_json(machine: Machine) -> dict[str, Any]:
    body = {
        "machine_id": str(machine.id),
        "name": machine.name,
        "public_key": b64(machine.public_key),
    }
    if machine.encapsulation_key:
        body["encapsulation_key"] = b64(machine.encapsulation_key)
    return body


# In


def parse_json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack allows.
        raise BadRequest(f"{what} is not valid JSON") from None


def need_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def need_list(value: Any, what: str, *, null_ok: bool = False) -> list[Any]:
    if value is None and null_ok:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a JSON list")
    return value


def need_str(value: Any, what: str, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string")
    if not storable(value):
        # NUL or a lone surrogate: no ssh file has a use for either.
        raise BadRequest(f"{what} holds a NUL character or a lone surrogate")
    if not empty_ok and not value:
        raise BadRequest(f"{what} must not be empty")
    return value


def need_b64(value: Any, what: str) -> bytes:
    text = need_str(value, what)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} must be standard base64") from None


def need_uuid(value: Any, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(need_str(value, what))
    except ValueError:
        raise BadRequest(f"{what} is not a UUID") from None


def need_name(value: Any, what: str) -> str:
    """A user or machine name: 1 to 255 characters, no control character or `/`."""
    name = need_str(value, what)
    problem = name_problem(name)
    if problem:
        raise BadRequest(f"{what} {problem}")
    return name


def parse_config(value: Any, what: str = "ssh_config entry") -> SshConfig:
    """One config entry; any `id` is ignored, entries match by `host`."""
    entry = need_object(value, what)
    host = need_str(entry.get("host"), f"{what} host", empty_ok=False)
    if len(host) > MAX_NAME:
        raise BadRequest(f"{what} host longer than {MAX_NAME} characters")
    values = need_object(
        entry.get("values") if entry.get("values") is not None else {}, f"{what} values"
    )
    for key, items in values.items():
        need_str(key, f"{what} values key", empty_ok=False)
        for item in need_list(items, f"{what} values.{key}", null_ok=True):
            need_str(item, f"{what} values.{key}")
    identity_files = entry.get("identity_files")
    if identity_files is not None:
        for item in need_list(identity_files, f"{what} identity_files"):
            need_str(item, f"{what} identity_files")
    normalised = {k: list(v or []) for k, v in values.items()}
    return SshConfig(host, normalised, identity_files)


def parse_known_host(value: Any) -> KnownHost:
    entry = need_object(value, "known_hosts entry")
    return KnownHost(
        host_pattern=need_str(
            entry.get("host_pattern"), "known_hosts host_pattern", empty_ok=False
        ),
        key_type=need_str(
            entry.get("key_type"), "known_hosts key_type", empty_ok=False
        ),
        key_data=need_str(entry.get("key_data", ""), "known_hosts key_data"),
        marker=need_str(entry.get("marker") or "", "known_hosts marker"),
    )


def key_filename(raw: str | None) -> str:
    """The stored name of an uploaded key: the part's final path component.

    Both `/` and `\\` separate components, since the name goes back to
    Windows clients too; `.`, `..`, empty names and control characters are
    refused.
    """
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    if name in ("", ".", "..") or has_control(name):
        raise BadRequest("invalid key file name")
    if len(name) > MAX_NAME:
        raise BadRequest(f"key file name longer than {MAX_NAME} characters")
    return name
