"""Tests of the client stand-in in tests/sshclient.py.

Rules: no server and no network. Signatures are checked here with
cryptography directly, not with sshclient's own code, and multipart
bodies are parsed by a small reader written here, so a mistake in
sshclient cannot confirm itself.
"""

from __future__ import annotations

import base64
import json
import re
import time
from typing import Any

import attrs
import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, utils

from tests.sshclient import (
    ISSUER,
    REMOVE,
    Machine,
    b64url,
    b64url_decode,
    client_message,
    data_upload_body,
    data_upload_form,
    decode_token,
    delete_machine_request,
    encode_token,
    key_rotation_request,
    key_update_body,
    key_update_form,
    pairing_public_keys,
    pem_decode,
    setup_body,
    setup_form,
    ssh_config_entry,
    sync_upload_form,
)

NOW = 1_767_000_000

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}
_MLDSA_PUBLIC: dict[str, tuple[Any, int]] = {
    "ML-DSA-44": (mldsa.MLDSA44PublicKey, 1312),
    "ML-DSA-65": (mldsa.MLDSA65PublicKey, 1952),
    "ML-DSA-87": (mldsa.MLDSA87PublicKey, 2592),
}

# (factory, alg, curve name or None, signature size)
VARIANTS = {
    "classic": (
        lambda: Machine.classic("alice", "laptop"),
        "ES512", "secp256r1", 64,
    ),
    "es256": (
        lambda: Machine.create("alice", "laptop", alg="ES256"),
        "ES256", "secp256r1", 64,
    ),
    "es512-p521": (
        lambda: Machine.create("alice", "laptop", alg="ES512"),
        "ES512", "secp521r1", 132,
    ),
    "ml-dsa-44": (
        lambda: Machine.create("alice", "laptop", alg="ML-DSA-44"),
        "ML-DSA-44", None, 2420,
    ),
    "post-quantum": (
        lambda: Machine.post_quantum("alice", "laptop"),
        "ML-DSA-65", None, 3309,
    ),
    "ml-dsa-87": (
        lambda: Machine.create("alice", "laptop", alg="ML-DSA-87"),
        "ML-DSA-87", None, 4627,
    ),
}


def verify(machine: Machine, token: str) -> None:
    """Check `token` against `machine.public_key_pem`, as a server would."""
    header_b64, claims_b64, sig_b64 = token.split(".")
    signed = f"{header_b64}.{claims_b64}".encode("ascii")
    signature = b64url_decode(sig_b64)
    alg = json.loads(b64url_decode(header_b64))["alg"]
    block_type, raw = pem_decode(machine.public_key_pem)
    if alg.startswith("ES"):
        assert block_type == "PUBLIC KEY"
        key = serialization.load_pem_public_key(machine.public_key_pem)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        half = len(signature) // 2
        der = utils.encode_dss_signature(
            int.from_bytes(signature[:half], "big"),
            int.from_bytes(signature[half:], "big"),
        )
        key.verify(der, signed, ec.ECDSA(_DIGESTS[alg]()))
    else:
        assert block_type == "ML-DSA PUBLIC KEY"
        public_type, size = _MLDSA_PUBLIC[alg]
        assert len(raw) == size
        public_type.from_public_bytes(raw).verify(signature, signed)


# --------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_verifies(variant: str) -> None:
    factory, alg, curve, sig_size = VARIANTS[variant]
    machine = factory()
    token = machine.token()
    header, _, signature = decode_token(token)

    assert header == {"alg": alg, "typ": "JWT"}
    assert len(signature) == sig_size
    verify(machine, token)
    if curve is not None:
        key = serialization.load_pem_public_key(machine.public_key_pem)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == curve


def test_classic_is_es512_over_p256() -> None:
    machine = Machine.classic("alice", "laptop")
    assert machine.alg == "ES512" and not machine.is_post_quantum
    assert machine.encapsulation_key_pem is None
    key = serialization.load_pem_public_key(machine.public_key_pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"


def test_claims_are_the_clients() -> None:
    machine = Machine.post_quantum("alice", "laptop")
    token = machine.token(now=NOW)
    header_b64, claims_b64, _ = token.split(".")

    # Compact, sorted keys, integers: byte for byte what Go writes.
    assert b64url_decode(header_b64) == b'{"alg":"ML-DSA-65","typ":"JWT"}'
    assert b64url_decode(claims_b64) == (
        b'{"exp":%d,"iat":%d,"iss":"github.com/therealpaulgg/ssh-sync",'
        b'"machine":"laptop","username":"alice"}' % (NOW + 120, NOW - 60)
    )
    assert "=" not in token


def test_claims_follow_the_clock() -> None:
    before = int(time.time())
    _, claims, _ = decode_token(Machine.classic("a", "b").token())
    after = int(time.time())
    assert before - 60 <= claims["iat"] <= after - 60
    assert before + 120 <= claims["exp"] <= after + 120
    assert claims["iss"] == ISSUER


def test_claim_overrides() -> None:
    machine = Machine.classic("alice", "laptop")
    token = machine.token(now=NOW, exp=REMOVE, username="mallory", extra=[1])
    _, claims, _ = decode_token(token)
    assert claims == {
        "extra": [1],
        "iat": NOW - 60,
        "iss": ISSUER,
        "machine": "laptop",
        "username": "mallory",
    }
    verify(machine, token)


def test_header_overrides_and_forged_alg() -> None:
    machine = Machine.classic("alice", "laptop")
    overrides = {"typ": REMOVE, "kid": "k"}
    token = machine.token(alg="ES256", header_overrides=overrides)
    header, _, signature = decode_token(token)
    assert header == {"alg": "ES256", "kid": "k"}
    assert len(signature) == 64
    verify(machine, token)  # an ES256 override also switches the digest

    forged = machine.token(alg="ML-DSA-65")
    assert decode_token(forged)[0]["alg"] == "ML-DSA-65"
    assert len(decode_token(forged)[2]) == 64  # still the EC signature


def test_forged_signatures() -> None:
    machine = Machine.post_quantum("alice", "laptop")
    signing_input = machine.signing_input(now=NOW)
    good = machine.sign(signing_input)
    token = f"{signing_input.decode()}.{b64url(good)}"
    verify(machine, token)

    tampered = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(InvalidSignature):
        verify(machine, f"{signing_input.decode()}.{b64url(tampered)}")

    header, claims, _ = decode_token(token)
    rebuilt = encode_token(header, claims, good)
    assert rebuilt == token
    assert encode_token({"alg": "none"}, claims, b"").endswith(".")


def test_headers() -> None:
    machine = Machine.classic("alice", "laptop")
    headers = machine.headers(now=NOW)
    assert list(headers) == ["Authorization"]
    scheme, token = headers["Authorization"].split(" ")
    assert scheme == "Bearer"
    verify(machine, token)


def test_go_json_escaping_in_claims() -> None:
    machine = Machine.classic("<b>&é", "laptop")
    _, claims_b64, _ = machine.token(now=NOW).split(".")
    raw = b64url_decode(claims_b64)
    assert b'"username":"\\u003cb\\u003e\\u0026\xc3\xa9"' in raw
    assert json.loads(raw)["username"] == "<b>&é"


# --------------------------------------------------------------------------
# Keys


def test_post_quantum_keys() -> None:
    machine = Machine.post_quantum("alice", "laptop")
    assert machine.is_post_quantum
    block_type, raw = pem_decode(machine.public_key_pem)
    assert (block_type, len(raw)) == ("ML-DSA PUBLIC KEY", 1952)
    assert machine.encapsulation_key_pem is not None
    block_type, raw = pem_decode(machine.encapsulation_key_pem)
    assert (block_type, len(raw)) == ("MLKEM768 ENCAPSULATION KEY", 1184)
    # Go's pem.Encode: 64-column lines, trailing newline.
    lines = machine.public_key_pem.decode().splitlines()
    assert {len(line) for line in lines[1:-2]} == {64}
    assert machine.public_key_pem.endswith(b"-----END ML-DSA PUBLIC KEY-----\n")


def test_seeds_make_keys_deterministic() -> None:
    master = bytes(range(96))
    a = Machine.post_quantum("a", "m", seed=master)
    b = Machine.post_quantum("b", "n", seed=master)
    assert a.public_key_pem == b.public_key_pem
    assert a.encapsulation_key_pem == b.encapsulation_key_pem

    c = Machine.post_quantum("a", "m", seed=master[:32])
    assert c.public_key_pem == a.public_key_pem
    assert c.encapsulation_key_pem != a.encapsulation_key_pem

    with pytest.raises(ValueError):
        Machine.post_quantum("a", "m", seed=b"short")


def test_rotate_to_post_quantum() -> None:
    old = Machine.classic("alice", "laptop")
    new = old.rotate_to_post_quantum()
    assert (new.username, new.machine_name) == ("alice", "laptop")
    assert new.alg == "ML-DSA-65" and new.is_post_quantum
    assert new.encapsulation_key_pem is not None
    assert new.public_key_pem != old.public_key_pem
    verify(new, new.token())


def test_variants_options() -> None:
    assert Machine.create("a", "m", alg="ML-DSA-44", kem=False).kem_key is None
    assert Machine.create("a", "m", alg="ES256", kem=True).kem_key is not None
    renamed = attrs.evolve(Machine.classic("a", "m"), machine_name="n")
    assert decode_token(renamed.token())[1]["machine"] == "n"
    with pytest.raises(ValueError):
        Machine.create("a", "m", alg="HS256")
    with pytest.raises(ValueError):
        Machine.create("a", "m", alg="ML-DSA-65", curve="P-256")


# --------------------------------------------------------------------------
# Multipart bodies


def parse_multipart(content: bytes, content_type: str) -> list[dict[str, Any]]:
    """Parts of a multipart/form-data body: headers, name, filename, data."""
    found = re.fullmatch(r"multipart/form-data; boundary=(\S+)", content_type)
    assert found is not None
    boundary = found.group(1).encode()
    assert content.endswith(b"\r\n--" + boundary + b"--\r\n")
    body = content[: -len(b"\r\n--" + boundary + b"--\r\n")]
    assert body.startswith(b"--" + boundary + b"\r\n")
    chunks = body[len(b"--" + boundary + b"\r\n") :].split(
        b"\r\n--" + boundary + b"\r\n"
    )
    parts = []
    for chunk in chunks:
        head, data = chunk.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines)
        disposition = headers["Content-Disposition"]
        name = re.search(r'; name="([^"]*)"', disposition)
        filename = re.search(r'; filename="([^"]*)"', disposition)
        assert name is not None
        parts.append({
            "headers": headers,
            "name": name.group(1),
            "filename": filename.group(1) if filename else None,
            "data": data,
        })
    return parts


def httpx_parts(form: dict[str, Any]) -> list[dict[str, Any]]:
    request = httpx.Request("POST", "http://server.test/api/v1/x", **form)
    return parse_multipart(request.read(), request.headers["Content-Type"])


def summary(parts: list[dict[str, Any]]) -> list[tuple[str, str | None, bytes]]:
    return [(p["name"], p["filename"], p["data"]) for p in parts]


def test_setup_body_is_byte_exact() -> None:
    machine = Machine.classic("alice", "laptop")
    body = setup_body(machine, boundary="XyZ")
    assert body.content_type == "multipart/form-data; boundary=XyZ"
    assert body.content == (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="key"; '
        b'filename="keypair.pub"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
        + machine.public_key_pem
        + b"\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="username"\r\n\r\n'
        b"alice"
        b"\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="machine_name"\r\n\r\n'
        b"laptop"
        b"\r\n--XyZ--\r\n"
    )


def test_default_boundary_is_gos() -> None:
    body = setup_body(Machine.classic("alice", "laptop"))
    boundary = body.content_type.split("boundary=")[1]
    assert re.fullmatch(r"[0-9a-f]{60}", boundary)


def test_setup_form_post_quantum() -> None:
    machine = Machine.post_quantum("alice", "laptop")
    expected = [
        ("key", "keypair.pub", machine.public_key_pem),
        ("encapsulation_key", "encapsulation_key.pub",
         machine.encapsulation_key_pem),
        ("username", None, b"alice"),
        ("machine_name", None, b"laptop"),
    ]
    via_httpx = httpx_parts(setup_form(machine))
    assert summary(via_httpx) == expected
    for part in via_httpx:
        content_type = part["headers"].get("Content-Type")
        is_file = part["filename"] is not None
        assert content_type == ("application/octet-stream" if is_file else None)
    body = setup_body(machine)
    assert summary(parse_multipart(body.content, body.content_type)) == expected


def test_key_update_form() -> None:
    old = Machine.classic("alice", "laptop")
    new = old.rotate_to_post_quantum()
    assert summary(httpx_parts(key_update_form(new))) == [
        ("key", "keypair.pub", new.public_key_pem),
        ("encapsulation_key", "encapsulation_key.pub",
         new.encapsulation_key_pem),
    ]
    body = key_update_body(old)
    assert summary(parse_multipart(body.content, body.content_type)) == [
        ("key", "keypair.pub", old.public_key_pem),
    ]


def test_data_upload_form() -> None:
    config = [
        ssh_config_entry("github.com", {"User": ["git"], "HostName": ["gh"]},
                         ["/.ssh/id_ed25519"]),
        ssh_config_entry("a&b"),
    ]
    known = [{"host_pattern": "h", "key_type": "ssh-ed25519",
              "key_data": "AAAA", "marker": ""}]
    form = data_upload_form(config, known, {"id_ed25519": b"\x00cipher",
                                            "id_rsa": b"x"})
    parts = httpx_parts(form)
    assert [(p["name"], p["filename"]) for p in parts] == [
        ("keys[]", "id_ed25519"),
        ("keys[]", "id_rsa"),
        ("ssh_config", None),
        ("known_hosts", None),
    ]
    assert parts[0]["data"] == b"\x00cipher"
    assert parts[2]["data"] == (
        b'[{"host":"github.com","identity_files":["/.ssh/id_ed25519"],'
        b'"values":{"HostName":["gh"],"User":["git"]}},'
        b'{"host":"a\\u0026b","identity_files":null,"values":{}}]'
    )
    assert json.loads(parts[3]["data"]) == known


def test_data_upload_without_keys_is_still_multipart() -> None:
    parts = httpx_parts(data_upload_form([]))
    assert summary(parts) == [("ssh_config", None, b"[]")]


def test_sync_upload_echoes_config() -> None:
    downloaded = [{"id": "00000000-0000-0000-0000-000000000000",
                   "host": "h", "values": {}, "identity_files": []}]
    keys = [("k", b"1"), ("k", b"2")]
    parts = httpx_parts(sync_upload_form(downloaded, keys))
    assert summary(parts)[:2] == [("keys[]", "k", b"1"), ("keys[]", "k", b"2")]
    assert [p["name"] for p in parts] == ["keys[]", "keys[]", "ssh_config"]
    assert json.loads(parts[2]["data"]) == downloaded


def test_go_escaping_of_file_names() -> None:
    body = data_upload_body([], keys={'dir\\a"b': b"x"}, boundary="B")
    assert b'name="keys[]"; filename="dir\\\\a\\"b"\r\n' in body.content
    kwargs = body.request_kwargs({"Authorization": "Bearer t"})
    assert kwargs["headers"] == {
        "Authorization": "Bearer t",
        "Content-Type": "multipart/form-data; boundary=B",
    }
    assert kwargs["content"] == body.content


# --------------------------------------------------------------------------
# JSON bodies and pairing messages


def test_json_bodies() -> None:
    request = delete_machine_request("laptop")
    assert request["content"] == b'{"machine_name":"laptop"}\n'
    assert request["headers"] == {"Content-Type": "application/json"}

    machine_id = "0b5a0c57-0000-4000-8000-000000000001"
    rotation = key_rotation_request({machine_id: b"\x01"})
    assert json.loads(rotation["content"]) == {
        "keys": [{"machine_id": machine_id, "encrypted_master_key": "AQ=="}]
    }


def test_pairing_messages() -> None:
    classic = Machine.classic("alice", "laptop")
    assert list(pairing_public_keys(classic)) == ["public_key"]
    machine = Machine.post_quantum("alice", "laptop")
    message = json.loads(client_message(pairing_public_keys(machine)))
    assert message["message"] == ""
    data = message["data"]
    assert base64.b64decode(data["public_key"]) == machine.public_key_pem
    assert base64.b64decode(data["encapsulation_key"]) == (
        machine.encapsulation_key_pem
    )
