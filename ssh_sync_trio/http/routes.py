"""The HTTP routes of docs/protocol.md §3, and the config extension.

Each handler parses and validates its whole request before it calls
storage, so a bad request never changes stored data.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ssh_sync_trio.auth.keys import InvalidKey, parse_public_key
from ssh_sync_trio.http import wire
from ssh_sync_trio.http.auth import authenticate, services
from ssh_sync_trio.http.errors import ApiError, BadRequest
from ssh_sync_trio.model import NewMachine, Upload
from ssh_sync_trio.names import storable
from ssh_sync_trio.storage import queries

# Enough parts for a large ~/.ssh; each part may be as big as the body.
MAX_FORM_PARTS = 10_000


def ok() -> Response:
    """The empty 200 the client expects where there is nothing to say."""
    return Response(status_code=200)


# Public routes


async def root(_request: Request) -> Response:
    return PlainTextResponse("ssh-sync-trio\n")


async def get_user(request: Request) -> Response:
    username = request.path_params["username"]
    if not storable(username):
        # No user is called that, and the database cannot even compare it.
        raise ApiError(404, "user not found")
    user = await services(request).store.call(queries.find_user, username)
    if user is None:
        raise ApiError(404, "user not found")
    return JSONResponse({"username": user.username, "machines": []})


async def setup(request: Request) -> Response:
    async with read_form(request) as form:
        username = wire.need_name(text_field(form, "username"), "username")
        machine_name = wire.need_name(text_field(form, "machine_name"), "machine_name")
        public_key = await public_key_part(form, "key")
        encapsulation_key = await optional_file(form, "encapsulation_key")
    first = NewMachine(machine_name, public_key, encapsulation_key)
    await services(request).store.call(queries.create_user, username, first)
    return ok()


# Machines


async def list_machines(request: Request) -> Response:
    caller = await authenticate(request)
    found = await services(request).store.call(queries.list_machines, caller.user.id)
    return JSONResponse([{"machine_name": m.name} for m in found])


async def get_machine(request: Request) -> Response:
    caller = await authenticate(request)
    machine_id = path_uuid(request, "id")
    machine = await services(request).store.call(
        queries.find_machine, caller.user.id, machine_id
    )
    return JSONResponse({"machine_name": machine.name})


async def machine_public_keys(request: Request) -> Response:
    caller = await authenticate(request)
    found = await services(request).store.call(queries.list_machines, caller.user.id)
    return JSONResponse({"machines": [wire.machine_keys_json(m) for m in found]})


async def delete_machine(request: Request) -> Response:
    caller = await authenticate(request)
    body = wire.need_object(wire.parse_json(await request.body(), "body"), "body")
    name = wire.need_str(body.get("machine_name"), "machine_name", empty_ok=False)
    await services(request).store.call(queries.delete_machine, caller.user.id, name)
    return ok()


async def replace_machine_key(request: Request) -> Response:
    caller = await authenticate(request)
    async with read_form(request) as form:
        public_key = await public_key_part(form, "key")
        encapsulation_key = await optional_file(form, "encapsulation_key")
    await services(request).store.call(
        queries.replace_machine_key, caller.machine.id, public_key, encapsulation_key
    )
    return ok()


# Data


async def get_data(request: Request) -> Response:
    caller = await authenticate(request)
    data = await services(request).store.call(queries.user_data, caller.user)
    return JSONResponse(wire.data_json(data))


async def post_data(request: Request) -> Response:
    caller = await authenticate(request)
    async with read_form(request) as form:
        upload = await parse_upload(form)
    stored = await services(request).store.call(
        queries.store_upload, caller.machine, upload
    )
    return JSONResponse([wire.key_json(key, with_data=False) for key in stored])


async def delete_key(request: Request) -> Response:
    caller = await authenticate(request)
    key_id = path_uuid(request, "id")
    await services(request).store.call(queries.delete_key, caller.user.id, key_id)
    return ok()


async def post_config(request: Request) -> Response:
    caller = await authenticate(request)
    entry = wire.parse_config(wire.parse_json(await request.body(), "body"), "body")
    stored = await services(request).store.call(
        queries.upsert_config, caller.user.id, entry
    )
    return JSONResponse(wire.config_json(stored))


async def delete_config(request: Request) -> Response:
    caller = await authenticate(request)
    config_id = path_uuid(request, "id")
    await services(request).store.call(queries.delete_config, caller.user.id, config_id)
    return ok()


# Master key rotation


async def post_rotation(request: Request) -> Response:
    caller = await authenticate(request)
    body = wire.need_object(wire.parse_json(await request.body(), "body"), "body")
    keys = []
    for item in wire.need_list(body.get("keys"), "keys", null_ok=True):
        entry = wire.need_object(item, "keys entry")
        machine_id = wire.need_uuid(entry.get("machine_id"), "machine_id")
        key = wire.need_b64(entry.get("encrypted_master_key"), "encrypted_master_key")
        keys.append((machine_id, key))
    await services(request).store.call(queries.store_rotation, caller.user.id, keys)
    return ok()


async def get_rotation(request: Request) -> Response:
    caller = await authenticate(request)
    key = await services(request).store.call(
        queries.pending_rotation, caller.machine.id
    )
    return JSONResponse({"encrypted_master_key": wire.b64(key)})


async def delete_rotation(request: Request) -> Response:
    caller = await authenticate(request)
    await services(request).store.call(queries.clear_rotation, caller.machine.id)
    return ok()


# Request parts


def read_form(request: Request) -> Any:
    """The multipart form, any part up to MAX_UPLOAD_BYTES; close it after."""
    limit = services(request).settings.max_upload_bytes
    return request.form(
        max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS, max_part_size=limit
    )


def text_field(form: FormData, name: str) -> str:
    """A required text part of a multipart form.

    Known shortcoming: Starlette has already decoded the part, falling back
    to Latin-1 for bytes that are not UTF-8, so such text is stored garbled
    rather than refused; the raw bytes are not available here.
    """
    value = form.get(name)
    if value is None:
        raise BadRequest(f"missing field {name}")
    if not isinstance(value, str):
        raise BadRequest(f"field {name} must not be a file")
    return value


async def file_part(form: FormData, name: str) -> bytes | None:
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode()
    return await value.read()


async def optional_file(form: FormData, name: str) -> bytes | None:
    data = await file_part(form, name)
    return data or None


async def public_key_part(form: FormData, name: str) -> bytes:
    data = await file_part(form, name)
    if not data:
        raise BadRequest(f"missing file {name}")
    try:
        parse_public_key(data)
    except InvalidKey:
        raise BadRequest("invalid public key") from None
    return data


async def parse_upload(form: FormData) -> Upload:
    """The parts of `POST /data`: config, known hosts, and the key files."""
    raw_config = text_field(form, "ssh_config")
    configs = wire.need_list(
        wire.parse_json(raw_config, "ssh_config"), "ssh_config", null_ok=True
    )
    raw_hosts = form.get("known_hosts")
    hosts: list[Any] = []
    if isinstance(raw_hosts, str) and raw_hosts.strip():
        hosts = wire.need_list(
            wire.parse_json(raw_hosts, "known_hosts"), "known_hosts", null_ok=True
        )
    elif raw_hosts is not None and not isinstance(raw_hosts, str):
        raise BadRequest("field known_hosts must not be a file")
    keys: dict[str, bytes] = {}
    for _, value in form.multi_items():
        if isinstance(value, UploadFile):
            keys[wire.key_filename(value.filename)] = await value.read()
    return Upload(
        ssh_config=[wire.parse_config(c) for c in configs],
        known_hosts=[wire.parse_known_host(h) for h in hosts],
        keys=keys,
    )


def path_uuid(request: Request, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(request.path_params[name])
    except ValueError:
        raise BadRequest(f"{name} is not a UUID") from None
