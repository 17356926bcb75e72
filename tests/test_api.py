"""End-to-end tests of the HTTP API: docs/protocol.md sections 1 to 3.

Rules:

- Real sockets: every test talks to a node listening on 127.0.0.1, port 0,
  started in the test's own nursery (the `node` and `http` fixtures, or
  `harness.start_node` where a test needs other settings).
- Where storage is involved, a test runs twice: on a fresh SQLite file and
  on a fresh database of the throwaway PostgreSQL (`database_url`).
- Requests are built by tests/sshclient.py exactly as the Go client builds
  them; what the client never sends is forged here, next to its test.
- Exact outcomes: each status is asserted, 200 and nothing else for a
  success, and every error body too. Redirects are never followed, and a
  3xx is a failure.
- Bad input changes nothing: row counts (`queries.count_rows`) and the
  downloaded data are compared before and after.
- Every test runs under a ceiling (`ceiling`, a `trio.fail_after`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import attrs
import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ssh_sync_trio.model import NewMachine
from ssh_sync_trio.server import RunningServer
from ssh_sync_trio.storage import queries
from tests import harness, pairing, sshclient
from tests.harness import ceiling
from tests.sshclient import REMOVE, Machine, Part, b64url, b64url_decode

# Seconds any one test may take, start of its node excluded.

UNAUTHORIZED = {"message": "unauthorized"}
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
LOWER_UUID = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
ZERO_UUID = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
async def sqlite_http(
    nursery: trio.Nursery, sqlite_url: str
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a node on SQLite, for tests that store nothing."""
    node = await harness.start_node(nursery, sqlite_url)
    async with harness.client(node) as client:
        yield client


async def rows(node: RunningServer) -> dict[str, int]:
    """Rows per table: compared before and after refused requests."""
    return await node.services.store.call(queries.count_rows)


async def add_machine(node: RunningServer, machine: Machine) -> None:
    """Register one more machine of an existing user, straight in storage.

    Pairing has its own tests; here it would only slow down tests of other
    routes. The full flows below pair for real.
    """
    store = node.services.store
    user = await store.call(queries.find_user, machine.username)
    assert user is not None
    new = NewMachine(
        machine.machine_name, machine.public_key_pem, machine.encapsulation_key_pem
    )
    await store.call(queries.add_machine, user.id, new)


async def download(http: httpx.AsyncClient, machine: Machine) -> dict[str, Any]:
    """`GET /data` as `machine`; it must succeed."""
    response = await http.get("/data", headers=machine.headers())
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def machine_ids(http: httpx.AsyncClient, machine: Machine) -> dict[str, str]:
    """Machine name to id, from `GET /machines/public-keys`."""
    response = await http.get("/machines/public-keys", headers=machine.headers())
    assert response.status_code == 200, response.text
    return {m["name"]: m["machine_id"] for m in response.json()["machines"]}


async def upload(
    http: httpx.AsyncClient,
    machine: Machine,
    ssh_config: list[dict[str, Any]],
    known_hosts: list[dict[str, Any]] | None = None,
    keys: dict[str, bytes] | None = None,
) -> httpx.Response:
    """`POST /data` byte for byte as `ssh-sync upload` sends it."""
    body = sshclient.data_upload_body(ssh_config, known_hosts, keys)
    return await http.post("/data", **body.request_kwargs(machine.headers()))


def multipart(parts: Iterable[Part], headers: dict[str, str]) -> dict[str, Any]:
    """httpx kwargs of a multipart body encoded as Go encodes it."""
    return sshclient.encode_multipart(parts).request_kwargs(headers)


def assert_empty_ok(response: httpx.Response) -> None:
    """The client's idea of success without a body: 200, nothing in it."""
    assert response.status_code == 200, response.text
    assert response.content == b""


def assert_error(response: httpx.Response, status: int) -> None:
    """An error of `status` with the `{"message": text}` body of every error."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["message"], body
    assert isinstance(body["message"], str) and body["message"], body


def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 timestamp with an offset, as the Go client parses it."""
    assert RFC3339.match(text), text
    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert moment.tzinfo is not None
    return moment


def known_host(
    host_pattern: str, key_type: str, key_data: str, marker: str = ""
) -> dict[str, str]:
    """One known-hosts entry as the client uploads it."""
    return {
        "host_pattern": host_pattern,
        "key_type": key_type,
        "key_data": key_data,
        "marker": marker,
    }


def forged_headers(
    machine: Machine, header: dict[str, Any], claims_json: str
) -> dict[str, str]:
    """A token the client would never make: raw claims text, any header.

    The JSON is ASCII with escapes, so it can carry what UTF-8 cannot (a
    lone surrogate). It is signed with `machine`'s key, so that only the
    forged part can be the reason for a refusal.
    """
    head = b64url(json.dumps(header).encode("ascii"))
    body = b64url(claims_json.encode("ascii"))
    signing_input = f"{head}.{body}"
    alg = header.get("alg")
    signature = machine.sign(
        signing_input.encode(), alg=alg if isinstance(alg, str) else None
    )
    return {"Authorization": f"Bearer {signing_input}.{b64url(signature)}"}


def with_signature(token: str, change: Callable[[bytes], bytes]) -> dict[str, str]:
    """`token` with its signature bytes changed by `change`."""
    head, body, signature = token.split(".")
    new = b64url(change(b64url_decode(signature)))
    return {"Authorization": f"Bearer {head}.{body}.{new}"}


def flip_last_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def other_public_keys() -> dict[str, bytes]:
    """PEM public keys that are not keys of either family, by what they are."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    openssh = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    kem = Machine.post_quantum("x", "y").encapsulation_key_pem
    assert kem is not None
    return {
        "RSA SPKI": rsa_key.public_key().public_bytes(pem, spki),
        "Ed25519 SPKI": ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(pem, spki),
        "OpenSSH line": openssh + b" user@host\n",
        "not a PEM": b"hello\n",
        "PUBLIC KEY of garbage": sshclient.pem_encode("PUBLIC KEY", b"garbage"),
        "ML-DSA of 1000 bytes": sshclient.pem_encode(
            "ML-DSA PUBLIC KEY", os.urandom(1000)
        ),
        "ML-DSA of 1953 bytes": sshclient.pem_encode(
            "ML-DSA PUBLIC KEY", os.urandom(1953)
        ),
        "ML-DSA, bad base64": b"-----BEGIN ML-DSA PUBLIC KEY-----\n@@@@\n"
        b"-----END ML-DSA PUBLIC KEY-----\n",
        "encapsulation key": kem,
        "EC private key": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }


# --------------------------------------------------------------------------
# Public routes


@ceiling
async def test_root_answers_text(sqlite_http: httpx.AsyncClient) -> None:
    for path in ("/", ""):
        response = await sqlite_http.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/")
        assert response.text


@ceiling
async def test_user_lookup(http: httpx.AsyncClient) -> None:
    assert_error(await http.get("/users/alice"), 404)
    await harness.register(http, Machine.classic("alice", "laptop"))

    response = await http.get("/users/alice")
    assert response.status_code == 200
    assert response.json() == {"username": "alice", "machines": []}
    assert_error(await http.get("/users/bob"), 404)
    assert_error(await http.get("/users/ALICE"), 404)
    # NUL cannot even be compared by PostgreSQL: still a plain 404.
    assert_error(await http.get("/users/alice%00"), 404)


# --------------------------------------------------------------------------
# POST /setup


def setup_parts(
    *,
    username: str | None = "alice",
    machine_name: str | None = "laptop",
    key: bytes | None = None,
    encapsulation_key: bytes | None = None,
) -> list[Part]:
    """The parts of a setup body, in the client's order; None leaves one out."""
    parts = []
    if key is not None:
        parts.append(Part("key", key, "keypair.pub"))
    if encapsulation_key is not None:
        parts.append(
            Part("encapsulation_key", encapsulation_key, "encapsulation_key.pub")
        )
    if username is not None:
        parts.append(Part("username", username.encode("utf-8")))
    if machine_name is not None:
        parts.append(Part("machine_name", machine_name.encode("utf-8")))
    return parts


@ceiling
async def test_setup_classic_and_post_quantum(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    classic = Machine.classic("alice", "laptop")
    quantum = Machine.post_quantum("bob", "desktop")
    for machine in (classic, quantum):
        body = sshclient.setup_body(machine)
        assert_empty_ok(await http.post("/setup", **body.request_kwargs()))

    response = await http.get("/machines/public-keys", headers=quantum.headers())
    [stored] = response.json()["machines"]
    assert base64.b64decode(stored["public_key"]) == quantum.public_key_pem
    kem = base64.b64decode(stored["encapsulation_key"])
    assert kem == quantum.encapsulation_key_pem
    # The httpx encoding of the same form works as well.
    carol = Machine.classic("carol", "laptop")
    assert_empty_ok(await http.post("/setup", **sshclient.setup_form(carol)))
    assert (await rows(node))["machines"] == 3


@ceiling
async def test_setup_name_limits_accepted(http: httpx.AsyncClient) -> None:
    for username, machine_name in (
        ("u" * 255, "m" * 255),
        ("ålice dé", "laptop (work) ünï"),
        ("a", "b"),
    ):
        machine = Machine.classic(username, machine_name)
        assert_empty_ok(await http.post("/setup", **sshclient.setup_form(machine)))
        response = await http.get(f"/users/{username}")
        assert response.status_code == 200
        assert response.json()["username"] == username
        listed = await http.get("/machines/", headers=machine.headers())
        assert listed.json() == [{"machine_name": machine_name}]


@ceiling
async def test_setup_refuses_each_bad_part(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    good = Machine.post_quantum("alice", "laptop")
    good_key = good.public_key_pem
    kem = good.encapsulation_key_pem
    cases: dict[str, list[Part]] = {
        "no username": setup_parts(username=None, key=good_key),
        "no machine_name": setup_parts(machine_name=None, key=good_key),
        "no key": setup_parts(),
        "encapsulation key only": setup_parts(encapsulation_key=kem),
        "empty key": setup_parts(key=b""),
        "no parts at all": [],
    }
    for what, key in other_public_keys().items():
        cases[f"key: {what}"] = setup_parts(key=key, encapsulation_key=kem)
    for field in ("username", "machine_name"):
        for what, bad in (
            ("empty", ""),
            ("256 characters", "x" * 256),
            ("a control character", "al\x01ice"),
            ("a newline", "al\nice"),
            ("a tab", "al\tice"),
            ("DEL", "al\x7fice"),
            ("NUL", "alice\x00"),
            ("a slash", "al/ice"),
        ):
            names = {"username": "alice", "machine_name": "laptop", field: bad}
            cases[f"{field} {what}"] = setup_parts(**names, key=good_key)

    before = await rows(node)
    for what, parts in cases.items():
        response = await http.post("/setup", **multipart(parts, {}))
        assert response.status_code == 400, (what, response.status_code, response.text)
        assert_error(response, 400)
    not_multipart = await http.post("/setup", json={"username": "alice"})
    assert_error(not_multipart, 400)
    assert await rows(node) == before
    assert_error(await http.get("/users/alice"), 404)


@ceiling
async def test_setup_conflicts(node: RunningServer, http: httpx.AsyncClient) -> None:
    await harness.register(http, Machine.classic("alice", "laptop"))
    before = await rows(node)
    for again in (
        Machine.classic("alice", "desktop"),
        Machine.post_quantum("alice", "laptop"),
    ):
        assert_error(await http.post("/setup", **sshclient.setup_form(again)), 409)
    assert await rows(node) == before


# --------------------------------------------------------------------------
# Authentication (docs/protocol.md §2)


@ceiling
async def test_every_token_family_authenticates(http: httpx.AsyncClient) -> None:
    machines = [
        Machine.create("es256", "p256", alg="ES256", curve="P-256"),
        Machine.classic("classic", "es512-on-p256"),
        Machine.create("es512", "p521", alg="ES512", curve="P-521"),
        # The curve never has to match alg.
        Machine.create("es256", "p384", alg="ES256", curve="P-384"),
        Machine.create("es512", "p384", alg="ES512", curve="P-384"),
        Machine.create("mldsa44", "m", alg="ML-DSA-44"),
        Machine.post_quantum("mldsa65", "m"),
        Machine.create("mldsa87", "m", alg="ML-DSA-87"),
        Machine.create("mldsa87", "no-kem", alg="ML-DSA-87", kem=False),
    ]
    for machine in machines:
        # One account each, named after the variant.
        machine = attrs.evolve(
            machine, username=f"{machine.username}-{machine.machine_name}"
        )
        await harness.register(http, machine)
        response = await http.get("/machines/", headers=machine.headers())
        assert response.status_code == 200, (machine, response.text)
        assert response.json() == [{"machine_name": machine.machine_name}]


@ceiling
async def test_every_bad_token_is_the_same_401(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    classic = Machine.classic("alice", "laptop")
    quantum = Machine.post_quantum("bob", "desktop")
    await harness.register(http, classic)
    await harness.register(http, quantum)
    now = int(time.time())
    good_claims = classic.claims()

    def claims_with(**changes: Any) -> str:
        return json.dumps({**good_claims, **changes})

    hs256_input = classic.signing_input(alg="HS256")
    hs256 = hmac.new(classic.public_key_pem, hs256_input, hashlib.sha256).digest()
    classic_token = classic.token()
    classic_input = classic_token.rsplit(".", 1)[0].encode()
    assert isinstance(classic.signing_key, ec.EllipticCurvePrivateKey)
    der = classic.signing_key.sign(classic_input, ec.ECDSA(hashes.SHA512()))
    quantum_input = quantum.token().rsplit(".", 1)[0]
    impostor = Machine.post_quantum("bob", "desktop")
    impostor_signature = b64url(impostor.sign(quantum_input.encode()))
    cases: dict[str, dict[str, str] | dict[str, bytes]] = {
        "no header": {},
        "not Bearer": {"Authorization": f"Basic {classic.token()}"},
        "Bearer alone": {"Authorization": "Bearer"},
        "three empty parts": {"Authorization": "Bearer .."},
        "2 parts": {
            "Authorization": "Bearer " + ".".join(classic.token().split(".")[:2])
        },
        "4 parts": {"Authorization": f"Bearer {classic.token()}.AAAA"},
        "bad base64": {"Authorization": "Bearer !!!!.@@@@.####"},
        "header not JSON": {"Authorization": f"Bearer {b64url(b'not json')}.e30.AAAA"},
        "header a JSON list": {"Authorization": f"Bearer {b64url(b'[]')}.e30.AAAA"},
        "claims not JSON": forged_headers(classic, classic.header(), "{nope"),
        "claims a JSON list": forged_headers(classic, classic.header(), "[1]"),
        "claims nested deep": forged_headers(classic, classic.header(), "[" * 3000),
        "non-ASCII header": {"Authorization": b"Bearer \xe9\xe9.e30.AAAA"},
        "alg none": {
            "Authorization": "Bearer "
            + classic.signing_input(alg="none").decode()
            + "."
        },
        "alg none, signed": classic.headers(alg="none"),
        "HS256 keyed with the public key": {
            "Authorization": f"Bearer {hs256_input.decode()}.{b64url(hs256)}"
        },
        "ES384": classic.headers(alg="ES384"),
        "alg missing": classic.headers(header_overrides={"alg": REMOVE}),
        "alg a list": forged_headers(
            classic, {"alg": ["ES512"], "typ": "JWT"}, json.dumps(good_claims)
        ),
        "alg an object": forged_headers(
            classic, {"alg": {"ES512": 1}, "typ": "JWT"}, json.dumps(good_claims)
        ),
        "EC key, ML-DSA alg": classic.headers(alg="ML-DSA-65"),
        "ML-DSA-65 key, ML-DSA-44 alg": quantum.headers(alg="ML-DSA-44"),
        "ML-DSA-65 key, ML-DSA-87 alg": quantum.headers(alg="ML-DSA-87"),
        "ML-DSA key, ES512 alg": quantum.headers(alg="ES512"),
        "bad EC signature": with_signature(classic.token(), flip_last_bit),
        "bad ML-DSA signature": with_signature(quantum.token(), flip_last_bit),
        "truncated EC signature": with_signature(classic.token(), lambda s: s[:-1]),
        "truncated ML-DSA signature": with_signature(quantum.token(), lambda s: s[:-1]),
        "empty signature": with_signature(classic.token(), lambda s: b""),
        "DER signature": with_signature(classic_token, lambda s: der),
        "another key's signature": {
            "Authorization": f"Bearer {quantum_input}.{impostor_signature}"
        },
        "expired": classic.headers(now=now - 3600),
        "exp missing": classic.headers(exp=REMOVE),
        "exp a string": classic.headers(exp=str(now + 120)),
        "exp true": classic.headers(exp=True),
        "exp NaN": classic.headers(exp=float("nan")),
        "exp Infinity": classic.headers(exp=float("inf")),
        "exp null": classic.headers(exp=None),
        "username missing": classic.headers(username=REMOVE),
        "username empty": classic.headers(username=""),
        "username a number": classic.headers(username=5),
        "username with NUL": classic.headers(username="alice\x00"),
        "username a lone surrogate": forged_headers(
            classic, classic.header(), claims_with(username="\ud800")
        ),
        "machine missing": classic.headers(machine=REMOVE),
        "machine empty": classic.headers(machine=""),
        "machine with NUL": classic.headers(machine="laptop\x00"),
        "machine a lone surrogate": forged_headers(
            classic, classic.header(), claims_with(machine="\udc80")
        ),
        "unknown user": classic.headers(username="carol"),
        "unknown machine": classic.headers(machine="desktop"),
        "user and machine of another user": classic.headers(
            username="bob", machine="desktop"
        ),
    }

    before = await rows(node)
    outcomes = {}
    for what, headers in cases.items():
        response = await http.get("/machines/", headers=headers)
        outcomes[what] = (response.status_code, response.content)
    wrong = {k: v for k, v in outcomes.items() if v[0] != 401}
    assert not wrong, wrong
    bodies = {body for _, body in outcomes.values()}
    assert len(bodies) == 1, bodies
    assert json.loads(bodies.pop()) == UNAUTHORIZED
    assert await rows(node) == before
    # And the genuine tokens still work.
    for machine in (classic, quantum):
        response = await http.get("/machines/", headers=machine.headers())
        assert response.status_code == 200


@ceiling
async def test_every_authenticated_route_needs_a_token(http: httpx.AsyncClient) -> None:
    classic = Machine.classic("alice", "laptop")
    await harness.register(http, classic)
    some_id = str(uuid.uuid4())
    routes = [
        ("GET", "/machines/"),
        ("GET", f"/machines/{some_id}"),
        ("GET", "/machines/public-keys"),
        ("DELETE", "/machines/"),
        ("PUT", "/machines/key"),
        ("GET", "/data"),
        ("POST", "/data"),
        ("DELETE", f"/data/key/{some_id}"),
        ("POST", "/data/config"),
        ("DELETE", f"/data/config/{some_id}"),
        ("POST", "/key-rotation"),
        ("GET", "/key-rotation"),
        ("DELETE", "/key-rotation"),
    ]
    expired = classic.headers(now=int(time.time()) - 3600)
    for method, path in routes:
        for headers in ({}, expired):
            response = await http.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, response.text)
            assert response.json() == UNAUTHORIZED


# --------------------------------------------------------------------------
# Machines


@ceiling
async def test_list_and_get_machines(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.post_quantum("alice", "desktop")
    other = Machine.classic("bob", "laptop")
    await harness.register(http, laptop)
    await add_machine(node, desktop)
    await harness.register(http, other)

    # The client's GET /machines/: slash, JSON content type, no body.
    headers = {**laptop.headers(), "Content-Type": "application/json"}
    response = await http.get("/machines/", headers=headers)
    assert response.status_code == 200
    listed = sorted(response.json(), key=lambda m: m["machine_name"])
    assert listed == [{"machine_name": "desktop"}, {"machine_name": "laptop"}]

    ids = await machine_ids(http, laptop)
    for name, machine_id in ids.items():
        response = await http.get(f"/machines/{machine_id}", headers=laptop.headers())
        assert response.status_code == 200
        assert response.json() == {"machine_name": name}
    uppercase = await http.get(
        f"/machines/{ids['desktop'].upper()}", headers=laptop.headers()
    )
    assert uppercase.json() == {"machine_name": "desktop"}

    [bobs] = (await machine_ids(http, other)).values()
    for bad, status in (
        ("not-a-uuid", 400),
        ("1234", 400),
        (str(uuid.uuid4()), 404),
        (bobs, 404),
    ):
        response = await http.get(f"/machines/{bad}", headers=laptop.headers())
        assert_error(response, status)


@ceiling
async def test_bodies_are_read_only_where_the_protocol_has_one(
    http: httpx.AsyncClient,
) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    json_garbage = {
        "content": b"{not json at all",
        "headers": {**machine.headers(), "Content-Type": "application/json"},
    }
    for method, path, status in (
        ("GET", "/machines/", 200),
        ("GET", "/machines/public-keys", 200),
        ("GET", "/data", 200),
        ("GET", "/key-rotation", 404),
        ("DELETE", "/key-rotation", 200),
    ):
        response = await http.request(method, path, **json_garbage)
        assert response.status_code == status, (method, path, response.text)


@ceiling
async def test_machine_public_keys(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.post_quantum("alice", "desktop")
    await harness.register(http, laptop)
    await add_machine(node, desktop)
    await harness.register(http, Machine.classic("bob", "phone"))

    response = await http.get("/machines/public-keys", headers=desktop.headers())
    assert response.status_code == 200
    body = response.json()
    assert list(body) == ["machines"]
    by_name = {m["name"]: m for m in body["machines"]}
    assert set(by_name) == {"laptop", "desktop"}
    for machine in (laptop, desktop):
        entry = by_name[machine.machine_name]
        assert LOWER_UUID.match(entry["machine_id"])
        assert (
            base64.b64decode(entry["public_key"], validate=True)
            == machine.public_key_pem
        )
    assert set(by_name["laptop"]) == {"machine_id", "name", "public_key"}
    kem = base64.b64decode(by_name["desktop"]["encapsulation_key"], validate=True)
    assert kem == desktop.encapsulation_key_pem
    # Each id names that machine for GET /machines/{id}.
    for name, entry in by_name.items():
        one = await http.get(
            f"/machines/{entry['machine_id']}", headers=laptop.headers()
        )
        assert one.json() == {"machine_name": name}


@ceiling
async def test_delete_machine(node: RunningServer, http: httpx.AsyncClient) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.post_quantum("alice", "desktop")
    bob = Machine.classic("bob", "laptop")
    await harness.register(http, laptop)
    await add_machine(node, desktop)
    await harness.register(http, bob)

    before = await rows(node)
    bad_bodies = [
        b"",
        b"not json",
        b"[]",
        b'"desktop"',
        b"{}",
        b'{"machine_name": 5}',
        b'{"machine_name": ""}',
        b'{"machine_name": null}',
        b'{"machine_name": "desk\\u0000top"}',
        b'{"machine_name": "\\ud800"}',
        b"[" * 3000,
    ]
    for body in bad_bodies:
        response = await http.request(
            "DELETE",
            "/machines/",
            content=body,
            headers={**laptop.headers(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, (body, response.text)
        assert_error(response, 400)
    for unknown in ("phone", "Desktop"):
        response = await http.request(
            "DELETE",
            "/machines/",
            **_with_auth(sshclient.delete_machine_request(unknown), laptop),
        )
        assert_error(response, 404)
    assert await rows(node) == before

    # A pending rotation goes with its machine.
    ids = await machine_ids(http, laptop)
    rotation = sshclient.key_rotation_request({ids["desktop"]: b"sealed"})
    assert_empty_ok(await http.post("/key-rotation", **_with_auth(rotation, laptop)))
    request = sshclient.delete_machine_request("desktop")
    assert_empty_ok(
        await http.request("DELETE", "/machines/", **_with_auth(request, laptop))
    )
    after = await rows(node)
    assert after["machines"] == before["machines"] - 1
    assert after["master_key_rotations"] == 0
    listed = await http.get("/machines/", headers=laptop.headers())
    assert listed.json() == [{"machine_name": "laptop"}]
    assert_error(await http.get("/data", headers=desktop.headers()), 401)
    # Bob's laptop shares the name, not the owner.
    assert (await http.get("/machines/", headers=bob.headers())).status_code == 200


def _with_auth(request: dict[str, Any], machine: Machine) -> dict[str, Any]:
    """sshclient's request kwargs with `machine`'s token added."""
    headers = {**request.get("headers", {}), **machine.headers()}
    return {**request, "headers": headers}


@ceiling
async def test_migrate_classic_to_post_quantum(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    classic = Machine.classic("alice", "laptop")
    await harness.register(http, classic)
    old_token = classic.headers()
    migrated = classic.rotate_to_post_quantum()

    # The client signs the key update with the keys it is replacing.
    body = sshclient.key_update_body(migrated)
    response = await http.put("/machines/key", **body.request_kwargs(old_token))
    assert_empty_ok(response)
    assert_error(await http.get("/machines/", headers=old_token), 401)
    assert_error(await http.get("/machines/", headers=classic.headers()), 401)
    response = await http.get("/machines/public-keys", headers=migrated.headers())
    assert response.status_code == 200
    [entry] = response.json()["machines"]
    assert base64.b64decode(entry["public_key"]) == migrated.public_key_pem
    kem = migrated.encapsulation_key_pem
    assert base64.b64decode(entry["encapsulation_key"]) == kem

    # A new signing key alone keeps the stored encapsulation key.
    again = Machine.create("alice", "laptop", alg="ML-DSA-65", kem=False)
    response = await http.put(
        "/machines/key", **sshclient.key_update_form(again), headers=migrated.headers()
    )
    assert_empty_ok(response)
    response = await http.get("/machines/public-keys", headers=again.headers())
    [entry] = response.json()["machines"]
    assert base64.b64decode(entry["public_key"]) == again.public_key_pem
    assert base64.b64decode(entry["encapsulation_key"]) == kem

    before = await rows(node)
    bad: dict[str, list[Part]] = {
        "no key": [Part("encapsulation_key", kem or b"", "encapsulation_key.pub")],
        "empty key": [Part("key", b"", "keypair.pub")],
        "no parts": [],
    }
    for what, key in other_public_keys().items():
        bad[what] = [Part("key", key, "keypair.pub")]
    for what, parts in bad.items():
        response = await http.put("/machines/key", **multipart(parts, again.headers()))
        assert response.status_code == 400, (what, response.text)
        assert_error(response, 400)
    not_multipart = await http.put("/machines/key", json={}, headers=again.headers())
    assert_error(not_multipart, 400)
    assert await rows(node) == before
    response = await http.get("/machines/public-keys", headers=again.headers())
    [entry] = response.json()["machines"]
    assert base64.b64decode(entry["public_key"]) == again.public_key_pem


# --------------------------------------------------------------------------
# Data


@ceiling
async def test_fresh_account_has_empty_lists(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    response = await http.get("/data", headers=machine.headers())
    assert response.status_code == 200
    user = await node.services.store.call(queries.find_user, "alice")
    assert user is not None
    # Byte-level check: lists are [] on the wire, never null.
    assert response.json() == {
        "id": str(user.id),
        "username": "alice",
        "keys": [],
        "ssh_config": [],
        "known_hosts": [],
        "machines": [],
    }
    assert LOWER_UUID.match(response.json()["id"])
    assert b"null" not in response.content


@ceiling
async def test_upload_then_download_byte_for_byte(http: httpx.AsyncClient) -> None:
    machine = Machine.post_quantum("alice", "laptop")
    await harness.register(http, machine)
    keys = {
        "id_ed25519": os.urandom(400),
        "id_ed25519.pub": b"ssh-ed25519 AAAA alice@laptop\n",
        "work key": bytes(range(256)) * 4,
        "empty": b"",
    }
    config = [
        sshclient.ssh_config_entry(
            "github.com",
            {"HostName": ["github.com"], "User": ["git"]},
            ["~/.ssh/id_ed25519"],
        ),
        sshclient.ssh_config_entry("*.internal", {"ProxyJump": ["bastion"]}),
        sshclient.ssh_config_entry("bare"),
        sshclient.ssh_config_entry(
            "ünïcode <&>", {"SendEnv": ["LANG", "LC_*"], "LocalForward": []}
        ),
    ]
    hosts = [
        known_host("github.com", "ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIOMq"),
        known_host("github.com", "ssh-rsa", "AAAAB3NzaC1yc2EAAAADAQABAAAB"),
        known_host("*.corp", "ssh-ed25519", "AAAAC3Nz", "@cert-authority"),
        known_host(
            "|1|aGFzaA==|c2FsdA==", "ecdsa-sha2-nistp256", "AAAAE2Vj", "@revoked"
        ),
    ]
    started = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)

    response = await upload(http, machine, config, hosts, keys)
    assert response.status_code == 200, response.text
    uploaded = response.json()
    assert sorted(k["filename"] for k in uploaded) == sorted(keys)
    times = {}
    for entry in uploaded:
        assert {"filename", "updated_at"} <= set(entry)
        times[entry["filename"]] = parse_time(entry["updated_at"])
        assert started <= times[entry["filename"]] <= dt.datetime.now(dt.UTC)

    data = await download(http, machine)
    assert set(data) == {
        "id",
        "username",
        "keys",
        "ssh_config",
        "known_hosts",
        "machines",
    }
    assert data["username"] == "alice"
    assert data["machines"] == []
    assert {
        k["filename"]: base64.b64decode(k["data"], validate=True) for k in data["keys"]
    } == keys
    for key in data["keys"]:
        assert set(key) == {"id", "user_id", "filename", "data", "updated_at"}
        assert LOWER_UUID.match(key["id"])
        assert key["user_id"] == data["id"]
        # The client sets file times from the upload's answer; the
        # download must tell the same time.
        assert parse_time(key["updated_at"]) == times[key["filename"]]

    assert len(data["ssh_config"]) == len(config)
    by_host = {c["host"]: c for c in data["ssh_config"]}
    for sent in config:
        got = by_host[sent["host"]]
        assert set(got) == {"id", "host", "values", "identity_files"}
        assert LOWER_UUID.match(got["id"])
        assert got["values"] == sent["values"]
        assert got["identity_files"] == (sent["identity_files"] or [])
    assert sorted(data["known_hosts"], key=str) == sorted(hosts, key=str)

    # The httpx encoding of the same upload gives the same data.
    form = sshclient.data_upload_form(config, hosts, keys)
    again = await http.post("/data", **form, headers=machine.headers())
    assert again.status_code == 200, again.text
    second = await download(http, machine)
    assert _without_times(second) == _without_times(data)


def _without_times(data: dict[str, Any]) -> dict[str, Any]:
    keys = [{k: v for k, v in key.items() if k != "updated_at"} for key in data["keys"]]
    return {**data, "keys": sorted(keys, key=lambda k: k["filename"])}


@ceiling
async def test_upload_upserts_and_deletes_nothing(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    first = await upload(
        http,
        machine,
        [
            sshclient.ssh_config_entry("a", {"User": ["one"]}, ["~/.ssh/a"]),
            sshclient.ssh_config_entry("b", {"User": ["two"]}),
        ],
        [
            known_host("h1", "ssh-ed25519", "OLD"),
            known_host("h1", "ssh-rsa", "RSA"),
        ],
        {"k1": b"old one", "k2": b"two"},
    )
    assert first.status_code == 200
    before = await download(http, machine)
    old = {c["host"]: c["id"] for c in before["ssh_config"]}
    old_keys = {k["filename"]: k for k in before["keys"]}
    await trio.sleep(0.01)  # so that a new updated_at differs

    second = await upload(
        http,
        machine,
        [
            sshclient.ssh_config_entry("a", {"User": ["changed"]}),
            sshclient.ssh_config_entry("c", {"Port": ["2222"]}),
        ],
        [
            known_host("h1", "ssh-ed25519", "NEW", "@cert-authority"),
            known_host("h2", "ssh-ed25519", "H2"),
        ],
        {"k1": b"new one"},
    )
    assert second.status_code == 200
    assert [k["filename"] for k in second.json()] == ["k1"]
    after = await download(http, machine)

    configs = {c["host"]: c for c in after["ssh_config"]}
    assert set(configs) == {"a", "b", "c"}
    assert configs["a"]["values"] == {"User": ["changed"]}
    assert configs["a"]["identity_files"] == []
    assert configs["a"]["id"] == old["a"]
    assert configs["b"]["values"] == {"User": ["two"]}
    assert configs["b"]["id"] == old["b"]
    assert sorted(after["known_hosts"], key=str) == sorted(
        [
            known_host("h1", "ssh-ed25519", "NEW", "@cert-authority"),
            known_host("h1", "ssh-rsa", "RSA"),
            known_host("h2", "ssh-ed25519", "H2"),
        ],
        key=str,
    )
    keys = {k["filename"]: k for k in after["keys"]}
    assert set(keys) == {"k1", "k2"}
    assert base64.b64decode(keys["k1"]["data"]) == b"new one"
    assert keys["k1"]["id"] == old_keys["k1"]["id"]
    assert parse_time(keys["k1"]["updated_at"]) > parse_time(
        old_keys["k1"]["updated_at"]
    )
    assert keys["k2"] == old_keys["k2"]
    counts = await rows(node)
    assert (counts["ssh_configs"], counts["known_hosts"], counts["ssh_keys"]) == (
        3,
        3,
        2,
    )

    # The same key twice in one upload: the last one wins.
    body = sshclient.data_upload_body([], None, [("k2", b"first"), ("k2", b"last")])
    response = await http.post("/data", **body.request_kwargs(machine.headers()))
    assert response.status_code == 200
    assert [k["filename"] for k in response.json()] == ["k2"]
    keys = {k["filename"]: k for k in (await download(http, machine))["keys"]}
    assert base64.b64decode(keys["k2"]["data"]) == b"last"


@ceiling
async def test_sync_echoes_config_with_ids(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    config = [
        sshclient.ssh_config_entry("a", {"User": ["git"]}, ["~/.ssh/id"]),
        sshclient.ssh_config_entry("b"),
    ]
    assert (
        await upload(http, machine, config, [known_host("h", "t", "d")])
    ).status_code == 200
    downloaded = (await download(http, machine))["ssh_config"]

    form = sshclient.sync_upload_form(downloaded, {"id_new": b"fresh"})
    response = await http.post("/data", **form, headers=machine.headers())
    assert response.status_code == 200, response.text
    assert [k["filename"] for k in response.json()] == ["id_new"]
    # The Go server's zero UUID, and ids that are no UUID at all: ignored.
    for fake_id in (ZERO_UUID, "not-a-uuid", str(uuid.uuid4())):
        echoed = [{**entry, "id": fake_id} for entry in downloaded]
        form = sshclient.sync_upload_form(echoed, {})
        response = await http.post("/data", **form, headers=machine.headers())
        assert response.status_code == 200, response.text
        assert response.json() == []
    after = await download(http, machine)
    assert after["ssh_config"] == downloaded
    assert len(after["known_hosts"]) == 1
    assert (await rows(node))["ssh_configs"] == 2


@ceiling
async def test_null_lists_are_empty_lists(http: httpx.AsyncClient) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    # Go marshals an empty slice as null; the client may send that.
    parts = [
        Part("keys[]", b"k", "id_rsa"),
        Part("ssh_config", b"null"),
        Part("known_hosts", b"null"),
    ]
    response = await http.post("/data", **multipart(parts, machine.headers()))
    assert response.status_code == 200, response.text
    parts = [
        Part("ssh_config", b'[{"host":"a","values":null,"identity_files":null}]'),
        Part("known_hosts", b""),
    ]
    response = await http.post("/data", **multipart(parts, machine.headers()))
    assert response.status_code == 200, response.text
    data = await download(http, machine)
    assert data["ssh_config"] == [
        {
            "id": data["ssh_config"][0]["id"],
            "host": "a",
            "values": {},
            "identity_files": [],
        }
    ]
    assert data["known_hosts"] == []
    assert [k["filename"] for k in data["keys"]] == ["id_rsa"]


@ceiling
async def test_key_names(node: RunningServer, http: httpx.AsyncClient) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)

    for sent, stored in (
        ("a/b/id_rsa", "id_rsa"),
        ("C:\\Users\\x\\.ssh\\id_rsa", "id_rsa"),
        ("..\\..\\id_rsa", "id_rsa"),
        ("/etc/passwd", "passwd"),
        ("dir\\sub/id_ecdsa", "id_ecdsa"),
        ("...", "..."),
        (".hidden", ".hidden"),
        ("k" * 255, "k" * 255),
    ):
        body = sshclient.data_upload_body([], None, {sent: sent.encode()})
        response = await http.post("/data", **body.request_kwargs(machine.headers()))
        assert response.status_code == 200, (sent, response.text)
        assert [k["filename"] for k in response.json()] == [stored]
    data = await download(http, machine)
    names = {k["filename"]: base64.b64decode(k["data"]) for k in data["keys"]}
    assert set(names) == {"id_rsa", "passwd", "id_ecdsa", "...", ".hidden", "k" * 255}
    assert names["id_rsa"] == b"..\\..\\id_rsa"

    before = await rows(node)
    for bad in (
        "..",
        ".",
        "",
        "a/..",
        "a\\.",
        "x/",
        "C:\\",
        "id\x01rsa",
        "id\trsa",
        "id\x7frsa",
        "id\x00rsa",
        "k" * 256,
    ):
        parts = [
            Part("keys[]", b"good", "fine_key"),
            Part("keys[]", b"bad", bad),
            Part("ssh_config", sshclient.go_json([sshclient.ssh_config_entry("new")])),
        ]
        response = await http.post("/data", **multipart(parts, machine.headers()))
        assert response.status_code == 400, (bad, response.text)
        assert_error(response, 400)
    assert await rows(node) == before
    assert await download(http, machine) == data


@ceiling
async def test_delete_key(node: RunningServer, http: httpx.AsyncClient) -> None:
    alice = Machine.classic("alice", "laptop")
    bob = Machine.post_quantum("bob", "laptop")
    for machine in (alice, bob):
        await harness.register(http, machine)
        keys = {"id_rsa": machine.username.encode(), "id_ed25519": b"x"}
        assert (await upload(http, machine, [], None, keys)).status_code == 200
    alices = {k["filename"]: k["id"] for k in (await download(http, alice))["keys"]}
    bobs = {k["filename"]: k["id"] for k in (await download(http, bob))["keys"]}

    before = await rows(node)
    for bad, status in (
        ("not-a-uuid", 400),
        (str(uuid.uuid4()), 404),
        (bobs["id_rsa"], 404),
    ):
        assert_error(
            await http.delete(f"/data/key/{bad}", headers=alice.headers()), status
        )
    assert await rows(node) == before

    response = await http.delete(
        f"/data/key/{alices['id_rsa']}", headers=alice.headers()
    )
    assert_empty_ok(response)
    left = (await download(http, alice))["keys"]
    assert [k["filename"] for k in left] == ["id_ed25519"]
    again = await http.delete(f"/data/key/{alices['id_rsa']}", headers=alice.headers())
    assert_error(again, 404)
    assert {k["filename"] for k in (await download(http, bob))["keys"]} == set(bobs)


@ceiling
async def test_config_extension(node: RunningServer, http: httpx.AsyncClient) -> None:
    alice = Machine.classic("alice", "laptop")
    bob = Machine.classic("bob", "laptop")
    await harness.register(http, alice)
    await harness.register(http, bob)

    entry = {
        "host": "db",
        "values": {"User": ["admin"]},
        "identity_files": ["~/.ssh/db"],
    }
    response = await http.post("/data/config", json=entry, headers=alice.headers())
    assert response.status_code == 200, response.text
    created = response.json()
    assert LOWER_UUID.match(created["id"])
    assert created == {**entry, "id": created["id"]}
    changed = {"host": "db", "values": {"Port": ["5432"]}}
    response = await http.post("/data/config", json=changed, headers=alice.headers())
    assert response.json() == {**changed, "identity_files": [], "id": created["id"]}
    [stored] = (await download(http, alice))["ssh_config"]
    assert stored == {**changed, "identity_files": [], "id": created["id"]}

    before = await rows(node)
    for body in (
        b"not json",
        b"[]",
        b"{}",
        b'{"values": {}}',
        b'{"host": ""}',
        b'{"host": 5}',
        b'{"host": "x", "values": []}',
        b'{"host": "x", "identity_files": "id"}',
        b'{"host": "x\\u0000"}',
    ):
        response = await http.post(
            "/data/config",
            content=body,
            headers={**alice.headers(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, (body, response.text)
        assert_error(response, 400)
    for bad, status in (("nope", 400), (str(uuid.uuid4()), 404), (created["id"], 404)):
        who = bob if bad == created["id"] else alice
        assert_error(
            await http.delete(f"/data/config/{bad}", headers=who.headers()), status
        )
    assert await rows(node) == before

    response = await http.delete(
        f"/data/config/{created['id']}", headers=alice.headers()
    )
    assert_empty_ok(response)
    assert (await download(http, alice))["ssh_config"] == []
    again = await http.delete(f"/data/config/{created['id']}", headers=alice.headers())
    assert_error(again, 404)


# --------------------------------------------------------------------------
# Bad input


def _upload_parts(
    ssh_config: bytes | None,
    known_hosts: bytes | None = None,
    *,
    as_files: bool = False,
) -> list[Part]:
    """An upload with a good key and the given raw JSON fields."""
    parts = [Part("keys[]", b"must not be stored", "id_new")]
    filename = "field.json" if as_files else None
    if ssh_config is not None:
        parts.append(Part("ssh_config", ssh_config, filename))
    if known_hosts is not None:
        parts.append(Part("known_hosts", known_hosts, filename))
    return parts


def _entry(**fields: Any) -> bytes:
    return json.dumps([{"host": "new", **fields}]).encode()


BAD_SSH_CONFIG = {
    "not JSON": b"[{",
    "an object": b'{"host": "new"}',
    "a string": b'"new"',
    "a number": b"5",
    "true": b"true",
    "an entry not an object": b'["new"]',
    "an entry without host": b'[{"values": {}}]',
    "an empty host": b'[{"host": ""}]',
    "a host not a string": b'[{"host": 5}]',
    "a host of 256 characters": _entry(host="h" * 256),
    "values a list": _entry(values=[["User", "x"]]),
    "values a string": _entry(values="User x"),
    "a value not a list": _entry(values={"User": "x"}),
    "a value list of numbers": _entry(values={"Port": [22]}),
    "a value list of lists": _entry(values={"Port": [["22"]]}),
    "an empty values key": _entry(values={"": ["x"]}),
    "identity_files a string": _entry(identity_files="~/.ssh/id"),
    "identity_files an object": _entry(identity_files={"a": "b"}),
    "identity_files of numbers": _entry(identity_files=[1]),
    "NUL in host": _entry(host="new\x00"),
    "NUL in a value": _entry(values={"User": ["a\x00b"]}),
    "NUL in a values key": _entry(values={"Us\x00er": ["a"]}),
    "NUL in identity_files": _entry(identity_files=["~/.ssh/\x00"]),
    "a lone surrogate in host": b'[{"host": "new\\ud800"}]',
    "a lone surrogate in a value": b'[{"host": "new", "values": {"U": ["\\udfff"]}}]',
    "nested deeper than the parser goes": b"[" * 5000,
}

BAD_KNOWN_HOSTS = {
    "not JSON": b"{",
    "an object": b'{"host_pattern": "h"}',
    "a string": b'"h ssh-rsa AAAA"',
    "an entry not an object": b'["h ssh-rsa AAAA"]',
    "no host_pattern": b'[{"key_type": "ssh-rsa", "key_data": "A"}]',
    "no key_type": b'[{"host_pattern": "h", "key_data": "A"}]',
    "key_type a number": b'[{"host_pattern": "h", "key_type": 5}]',
    "key_data a list": b'[{"host_pattern": "h", "key_type": "t", "key_data": []}]',
    "NUL in key_data": b'[{"host_pattern": "h", "key_type": "t", "key_data": "\\u0000"}]',
    "a lone surrogate": b'[{"host_pattern": "\\ud800", "key_type": "t"}]',
}


@ceiling
async def test_bad_uploads_change_nothing(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    keys = {"id_rsa": b"secret"}
    config = [sshclient.ssh_config_entry("old", {"User": ["me"]})]
    assert (
        await upload(http, machine, config, [known_host("h", "t", "d")], keys)
    ).status_code == 200
    data = await download(http, machine)
    before = await rows(node)
    auth = machine.headers()
    good_config = sshclient.go_json(config)

    cases: dict[str, dict[str, Any]] = {}
    for what, raw in BAD_SSH_CONFIG.items():
        cases[f"ssh_config {what}"] = multipart(_upload_parts(raw), auth)
    for what, raw in BAD_KNOWN_HOSTS.items():
        cases[f"known_hosts {what}"] = multipart(_upload_parts(good_config, raw), auth)
    cases["no ssh_config"] = multipart(_upload_parts(None, b"[]"), auth)
    cases["ssh_config as a file"] = multipart(
        _upload_parts(good_config, as_files=True), auth
    )
    cases["known_hosts as a file"] = multipart(
        [*_upload_parts(good_config), Part("known_hosts", b"[]", "hosts.json")], auth
    )
    whole = sshclient.encode_multipart(_upload_parts(good_config))
    cases["truncated multipart"] = {
        "content": whole.content[: len(whole.content) // 3],
        "headers": {**auth, "Content-Type": whole.content_type},
    }
    cases["JSON instead of multipart"] = {
        "content": b'{"ssh_config": []}',
        "headers": {**auth, "Content-Type": "application/json"},
    }
    cases["no content type"] = {"content": whole.content, "headers": auth}
    cases["multipart garbage"] = {
        "content": b"garbage\r\n--x",
        "headers": {**auth, "Content-Type": "multipart/form-data; boundary=xyz"},
    }
    cases["multipart without boundary"] = {
        "content": whole.content,
        "headers": {**auth, "Content-Type": "multipart/form-data"},
    }
    cases["part without a name"] = {
        "content": b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n",
        "headers": {**auth, "Content-Type": "multipart/form-data; boundary=b"},
    }
    cases["empty body"] = {
        "content": b"",
        "headers": {**auth, "Content-Type": whole.content_type},
    }

    outcomes = {}
    for what, request in cases.items():
        response = await http.post("/data", **request)
        outcomes[what] = (response.status_code, response.text)
        if response.status_code == 400:
            assert_error(response, 400)
    wrong = {k: v for k, v in outcomes.items() if v[0] != 400}
    assert not wrong, wrong
    assert await rows(node) == before
    assert await download(http, machine) == data


@ceiling
async def test_body_limit(nursery: trio.Nursery, database_url: str) -> None:
    limit = 64 * 1024
    node = await harness.start_node(nursery, database_url, max_upload_bytes=limit)
    async with harness.client(node) as http:
        machine = Machine.classic("alice", "laptop")
        await harness.register(http, machine)
        before = await rows(node)

        # Several MiB: more than socket buffers and the server's queues.
        big = sshclient.data_upload_body([], None, {"id_rsa": os.urandom(3 << 20)})

        async def chunked() -> AsyncIterator[bytes]:
            for start in range(0, len(big.content), 16 * 1024):
                yield big.content[start : start + 16 * 1024]

        chunked_headers = {**machine.headers(), "Content-Type": big.content_type}
        for attempt in ("with Content-Length", "chunked"):
            if attempt == "chunked":
                response = await http.post(
                    "/data", content=chunked(), headers=chunked_headers
                )
            else:
                response = await http.post(
                    "/data", **big.request_kwargs(machine.headers())
                )
            assert response.status_code == 413, (attempt, response.text)
            assert_error(response, 413)
        # A body the server would not read anyway (the token is refused).
        refused = {**chunked_headers, **machine.headers(now=int(time.time()) - 3600)}
        response = await http.post("/data", content=chunked(), headers=refused)
        assert_error(response, 401)
        response = await http.post("/setup", content=chunked(), headers=chunked_headers)
        assert_error(response, 413)
        assert await rows(node) == before

        # Just under the limit is fine, on the same client.
        small = {"id_rsa": os.urandom(limit - 1024)}
        assert (await upload(http, machine, [], None, small)).status_code == 200
        [key] = (await download(http, machine))["keys"]
        assert base64.b64decode(key["data"]) == small["id_rsa"]


@ceiling
async def test_a_large_config_field_is_accepted(http: httpx.AsyncClient) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    config = [
        sshclient.ssh_config_entry(f"host{i}", {"Comment": ["x" * (1 << 20)]})
        for i in range(5)
    ]
    body = sshclient.data_upload_body(config)
    assert len(body.content) > 5 * 10**6
    response = await http.post("/data", **body.request_kwargs(machine.headers()))
    assert response.status_code == 200, response.text[:200]
    stored = (await download(http, machine))["ssh_config"]
    assert {c["host"]: c["values"] for c in stored} == {
        c["host"]: c["values"] for c in config
    }


@ceiling
async def test_concurrent_requests_of_one_user(http: httpx.AsyncClient) -> None:
    machine = Machine.classic("alice", "laptop")
    await harness.register(http, machine)
    names = [f"key{i:02}" for i in range(30)]
    hosts = [sshclient.ssh_config_entry(f"host{i:02}") for i in range(30)]
    statuses: list[int] = []

    async def upload_in_order(forward: bool) -> None:
        # Two machines list their files in different orders; the rows they
        # touch are the same.
        order = 1 if forward else -1
        keys = [(name, name.encode()) for name in names[::order]]
        body = sshclient.data_upload_body(hosts[::order], None, keys)
        response = await http.post("/data", **body.request_kwargs(machine.headers()))
        statuses.append(response.status_code)

    for _ in range(3):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(upload_in_order, i % 2 == 0)
    assert statuses == [200] * 18
    data = await download(http, machine)
    assert sorted(k["filename"] for k in data["keys"]) == names
    assert len(data["ssh_config"]) == 30

    # The same new account, asked for at once: one wins, the others are told.
    setups: list[int] = []

    async def set_up(name: str) -> None:
        new = Machine.classic("bob", name)
        response = await http.post("/setup", **sshclient.setup_form(new))
        setups.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(set_up, f"machine{i}")
    assert sorted(setups) == [200, 409, 409, 409, 409, 409]


# --------------------------------------------------------------------------
# Master key rotation


@ceiling
async def test_key_rotation(node: RunningServer, http: httpx.AsyncClient) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.post_quantum("alice", "desktop")
    phone = Machine.post_quantum("alice", "phone")
    await harness.register(http, laptop)
    for machine in (desktop, phone):
        await add_machine(node, machine)
    ids = await machine_ids(http, laptop)

    assert_error(await http.get("/key-rotation", headers=laptop.headers()), 404)
    sealed = {ids["desktop"]: b"for the desktop", ids["phone"]: os.urandom(1200)}
    request = sshclient.key_rotation_request(sealed)
    assert_empty_ok(await http.post("/key-rotation", **_with_auth(request, laptop)))

    for machine in (desktop, phone):
        response = await http.get("/key-rotation", headers=machine.headers())
        assert response.status_code == 200
        assert response.json() == {
            "encrypted_master_key": base64.b64encode(
                sealed[ids[machine.machine_name]]
            ).decode()
        }
    assert_error(await http.get("/key-rotation", headers=laptop.headers()), 404)

    # Uploading is refused while the new master key waits.
    before = await rows(node)
    response = await upload(
        http, desktop, [sshclient.ssh_config_entry("x")], None, {"k": b"v"}
    )
    assert_error(response, 409)
    assert "download" in response.json()["message"]
    assert await rows(node) == before
    # The machine that rotated has nothing pending and may upload.
    assert (await upload(http, laptop, [], None, {"k": b"v"})).status_code == 200

    assert_empty_ok(await http.delete("/key-rotation", headers=desktop.headers()))
    assert_error(await http.get("/key-rotation", headers=desktop.headers()), 404)
    assert_empty_ok(await http.delete("/key-rotation", headers=desktop.headers()))
    assert_empty_ok(await http.delete("/key-rotation", headers=laptop.headers()))
    assert (await upload(http, desktop, [], None, {"k": b"w"})).status_code == 200
    assert_error(await upload(http, phone, [], None, {"k": b"x"}), 409)

    # A new rotation replaces the pending one.
    request = sshclient.key_rotation_request({ids["phone"]: b"newer"})
    assert_empty_ok(await http.post("/key-rotation", **_with_auth(request, desktop)))
    response = await http.get("/key-rotation", headers=phone.headers())
    assert response.json() == {
        "encrypted_master_key": base64.b64encode(b"newer").decode()
    }
    assert (await rows(node))["master_key_rotations"] == 1


@ceiling
async def test_key_rotation_refusals(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    laptop = Machine.classic("alice", "laptop")
    desktop = Machine.post_quantum("alice", "desktop")
    bob = Machine.classic("bob", "laptop")
    await harness.register(http, laptop)
    await add_machine(node, desktop)
    await harness.register(http, bob)
    ids = await machine_ids(http, laptop)
    [bobs] = (await machine_ids(http, bob)).values()
    before = await rows(node)

    for foreign in (bobs, str(uuid.uuid4())):
        # All or nothing: the desktop's key is not stored either.
        request = sshclient.key_rotation_request({ids["desktop"]: b"k", foreign: b"k"})
        response = await http.post("/key-rotation", **_with_auth(request, laptop))
        assert_error(response, 403)
    assert await rows(node) == before
    assert_error(await http.get("/key-rotation", headers=desktop.headers()), 404)

    good = ids["desktop"]
    for body in (
        b"",
        b"not json",
        b"[]",
        b'{"keys": "all"}',
        b'{"keys": {}}',
        b'{"keys": [5]}',
        json.dumps(
            {"keys": [{"machine_id": "nope", "encrypted_master_key": "AA=="}]}
        ).encode(),
        json.dumps(
            {"keys": [{"machine_id": 5, "encrypted_master_key": "AA=="}]}
        ).encode(),
        json.dumps({"keys": [{"encrypted_master_key": "AA=="}]}).encode(),
        json.dumps({"keys": [{"machine_id": good}]}).encode(),
        json.dumps(
            {"keys": [{"machine_id": good, "encrypted_master_key": "!!"}]}
        ).encode(),
        json.dumps(
            {"keys": [{"machine_id": good, "encrypted_master_key": "AAA"}]}
        ).encode(),
        # URL-safe base64 is not what Go writes.
        json.dumps(
            {"keys": [{"machine_id": good, "encrypted_master_key": "-_-_"}]}
        ).encode(),
        json.dumps(
            {"keys": [{"machine_id": good, "encrypted_master_key": 5}]}
        ).encode(),
        b"[" * 3000,
    ):
        response = await http.post(
            "/key-rotation",
            content=body,
            headers={**laptop.headers(), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, (body, response.text)
        assert_error(response, 400)
    assert await rows(node) == before

    request = sshclient.key_rotation_request({})
    assert request["content"] == b'{"keys":[]}'
    assert_empty_ok(await http.post("/key-rotation", **_with_auth(request, laptop)))
    assert await rows(node) == before


# --------------------------------------------------------------------------
# Whole flows, as the "done when" lists them


@pytest.mark.parametrize("kind", ["classic", "post-quantum"])
@ceiling
async def test_full_flow(
    node: RunningServer, http: httpx.AsyncClient, kind: str
) -> None:
    make = Machine.classic if kind == "classic" else Machine.post_quantum
    laptop = make("alice", "laptop")
    desktop = make("alice", "desktop")

    # ssh-sync setup
    body = sshclient.setup_body(laptop)
    assert_empty_ok(await http.post("/setup", **body.request_kwargs()))
    assert (await http.get("/users/alice")).json() == {
        "username": "alice",
        "machines": [],
    }

    # ssh-sync upload, then download byte for byte on the same machine
    keys = {"id_ed25519": os.urandom(464), "id_ed25519.pub": b"ssh-ed25519 AAAA\n"}
    config = [
        sshclient.ssh_config_entry(
            "github.com", {"User": ["git"]}, ["~/.ssh/id_ed25519"]
        )
    ]
    hosts = [known_host("github.com", "ssh-ed25519", "AAAAC3Nz")]
    response = await upload(http, laptop, config, hosts, keys)
    assert response.status_code == 200
    data = await download(http, laptop)
    assert {k["filename"]: base64.b64decode(k["data"]) for k in data["keys"]} == keys

    # A second machine joins by pairing, and downloads the same data.
    master = await pairing.pair(node, node, desktop, laptop)
    assert master == pairing.MASTER_KEY
    listed = await http.get(
        "/machines/", headers={**desktop.headers(), "Content-Type": "application/json"}
    )
    assert sorted(m["machine_name"] for m in listed.json()) == ["desktop", "laptop"]
    assert await download(http, desktop) == data

    # ssh-sync sync from the desktop: echoed config, one changed key.
    changed = {"id_ed25519": os.urandom(464)}
    form = sshclient.sync_upload_form(data["ssh_config"], changed)
    assert (
        await http.post("/data", **form, headers=desktop.headers())
    ).status_code == 200
    data = await download(http, laptop)
    assert {k["filename"]: base64.b64decode(k["data"]) for k in data["keys"]} == {
        **keys,
        **changed,
    }

    # Delete a key.
    [pub] = [k["id"] for k in data["keys"] if k["filename"] == "id_ed25519.pub"]
    assert_empty_ok(await http.delete(f"/data/key/{pub}", headers=laptop.headers()))
    assert [k["filename"] for k in (await download(http, desktop))["keys"]] == [
        "id_ed25519"
    ]

    # Migrate the laptop to post-quantum keys (a no-op change of family
    # for a machine that already is post-quantum).
    migrated = laptop.rotate_to_post_quantum()
    update = sshclient.key_update_body(migrated)
    assert_empty_ok(
        await http.put("/machines/key", **update.request_kwargs(laptop.headers()))
    )
    assert_error(await http.get("/data", headers=laptop.headers()), 401)
    laptop = migrated
    assert (await http.get("/data", headers=laptop.headers())).status_code == 200

    # Full master key rotation, from the laptop.
    response = await http.get("/machines/public-keys", headers=laptop.headers())
    machines = response.json()["machines"]
    assert all("encapsulation_key" in m for m in machines if m["name"] == "laptop")
    others = {
        m["machine_id"]: f"sealed for {m['name']}".encode()
        for m in machines
        if m["name"] != "laptop"
    }
    request = sshclient.key_rotation_request(others)
    assert_empty_ok(await http.post("/key-rotation", **_with_auth(request, laptop)))
    assert_error(await upload(http, desktop, config, None, {"x": b"y"}), 409)
    response = await http.get("/key-rotation", headers=desktop.headers())
    assert (
        base64.b64decode(response.json()["encrypted_master_key"])
        == b"sealed for desktop"
    )
    await download(http, desktop)
    assert_empty_ok(await http.delete("/key-rotation", headers=desktop.headers()))
    assert (await upload(http, desktop, config, None, {"x": b"y"})).status_code == 200

    # List and delete machines.
    request = sshclient.delete_machine_request("desktop")
    assert_empty_ok(
        await http.request("DELETE", "/machines/", **_with_auth(request, laptop))
    )
    listed = await http.get("/machines/", headers=laptop.headers())
    assert listed.json() == [{"machine_name": "laptop"}]
    assert_error(await http.get("/data", headers=desktop.headers()), 401)


# --------------------------------------------------------------------------
# Paths with and without the trailing slash


@ceiling
async def test_every_path_with_and_without_slash(
    node: RunningServer, http: httpx.AsyncClient
) -> None:
    alice = Machine.classic("alice", "laptop")
    await harness.register(http, alice)
    for name in ("m1", "m2"):
        await add_machine(node, Machine.classic("alice", name))
    keys = {f"k{i}": b"x" for i in range(2)}
    assert (await upload(http, alice, [], None, keys)).status_code == 200
    key_ids = [k["id"] for k in (await download(http, alice))["keys"]]
    config_ids = []
    for host in ("c1", "c2"):
        response = await http.post(
            "/data/config", json={"host": host}, headers=alice.headers()
        )
        config_ids.append(response.json()["id"])
    ids = await machine_ids(http, alice)

    def checks(slash: int) -> list[tuple[str, str, dict[str, Any], int]]:
        """(method, path, request kwargs, status) of every route."""
        new = Machine.classic(f"user{slash}", "laptop")
        body = sshclient.data_upload_body([], None, {"k": b"v"})
        rotation = sshclient.key_rotation_request({ids["m2"]: b"k"})
        return [
            ("GET", "/", {}, 200),
            ("GET", "/users/alice", {}, 200),
            ("POST", "/setup", sshclient.setup_body(new).request_kwargs(), 200),
            ("GET", "/machines", {"headers": alice.headers()}, 200),
            ("GET", f"/machines/{ids['laptop']}", {"headers": alice.headers()}, 200),
            ("GET", "/machines/public-keys", {"headers": alice.headers()}, 200),
            (
                "PUT",
                "/machines/key",
                sshclient.key_update_body(alice).request_kwargs(alice.headers()),
                200,
            ),
            ("GET", "/data", {"headers": alice.headers()}, 200),
            ("POST", "/data", body.request_kwargs(alice.headers()), 200),
            (
                "DELETE",
                f"/data/key/{key_ids[slash]}",
                {"headers": alice.headers()},
                200,
            ),
            (
                "POST",
                "/data/config",
                {"json": {"host": "c"}, "headers": alice.headers()},
                200,
            ),
            (
                "DELETE",
                f"/data/config/{config_ids[slash]}",
                {"headers": alice.headers()},
                200,
            ),
            ("POST", "/key-rotation", _with_auth(rotation, alice), 200),
            ("GET", "/key-rotation", {"headers": alice.headers()}, 404),
            ("DELETE", "/key-rotation", {"headers": alice.headers()}, 200),
            (
                "DELETE",
                "/machines",
                _with_auth(sshclient.delete_machine_request(f"m{slash + 1}"), alice),
                200,
            ),
        ]

    for slash in (0, 1):
        for method, path, kwargs, status in checks(slash):
            target = path.rstrip("/") + ("/" if slash else "")
            response = await http.request(
                method, target, follow_redirects=False, **kwargs
            )
            assert response.status_code == status, (method, target, response.text)
            assert "location" not in response.headers
    assert_error(await http.get("/no-such-route", follow_redirects=False), 404)
