"""A stand-in for the ssh-sync command line client, for tests.

It holds a machine's keys and builds what the Go client puts on the wire:
the Bearer token of every authenticated request, and the multipart bodies
of ``POST /api/v1/setup``, ``POST /api/v1/data`` and
``PUT /api/v1/machines/key``. It needs no server.

What the client does, and this module reproduces:

- Classic machines hold a P-256 key and sign ``ES512`` with it: a SHA-512
  digest and a 64-byte ``R || S`` signature. Post-quantum machines sign
  ``ML-DSA-65`` (empty context) and also hold an ML-KEM-768 key; both come
  from a 96-byte master seed, 32 bytes for ML-DSA then 64 for ML-KEM.
- A token is ``header.payload.signature``, each part base64url without
  padding. The header is ``{"alg":...,"typ":"JWT"}``; the claims are
  ``exp``, ``iat``, ``iss``, ``machine``, ``username``, with ``iat`` one
  minute in the past and ``exp`` two minutes ahead, as integers. Both
  objects are compact JSON with sorted keys, escaped as Go escapes.
- Multipart parts come in the client's order: files first, then text
  fields. Files are ``application/octet-stream``; text fields carry no
  content type.

Tests forge what the client never sends through the keyword arguments of
`Machine.token`, `Machine.sign`, and `encode_token`.
"""

from __future__ import annotations

import base64
import enum
import json
import os
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import attrs
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa, mlkem, utils

__all__ = [
    "CURVES",
    "EC_ALGORITHMS",
    "ISSUER",
    "MLDSA_ALGORITHMS",
    "REMOVE",
    "Machine",
    "MultipartBody",
    "Part",
    "b64url",
    "b64url_decode",
    "client_message",
    "data_upload_body",
    "data_upload_form",
    "decode_token",
    "delete_machine_request",
    "encode_multipart",
    "encode_token",
    "go_json",
    "httpx_files",
    "key_rotation_request",
    "key_update_body",
    "key_update_form",
    "pairing_public_keys",
    "pem_decode",
    "pem_encode",
    "setup_body",
    "setup_form",
    "ssh_config_entry",
    "sync_upload_form",
]

#: The ``iss`` claim of every client token.
ISSUER = "github.com/therealpaulgg/ssh-sync"
#: Seconds before now that the client dates ``iat``.
ISSUED_BEFORE = 60
#: Seconds after now that the client's tokens expire.
EXPIRES_AFTER = 120
#: Size of the post-quantum client's master seed.
MASTER_SEED_SIZE = 96
#: Size of an ML-DSA seed (FIPS 204 xi).
MLDSA_SEED_SIZE = 32

OCTET_STREAM = "application/octet-stream"

EC_PUBLIC_KEY = "PUBLIC KEY"
MLDSA_PUBLIC_KEY = "ML-DSA PUBLIC KEY"
MLKEM_PUBLIC_KEY = "MLKEM768 ENCAPSULATION KEY"

#: JOSE ``ES*`` names and the digest each one means.
EC_ALGORITHMS: Mapping[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES384": hashes.SHA384,
    "ES512": hashes.SHA512,
}
#: JOSE curve names.
CURVES: Mapping[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
_STANDARD_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}

MLDSAPrivateKey: TypeAlias = (
    mldsa.MLDSA44PrivateKey | mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey
)
SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | MLDSAPrivateKey

#: ML-DSA parameter sets by their ``alg`` name.
MLDSA_ALGORITHMS: Mapping[str, type[MLDSAPrivateKey]] = {
    "ML-DSA-44": mldsa.MLDSA44PrivateKey,
    "ML-DSA-65": mldsa.MLDSA65PrivateKey,
    "ML-DSA-87": mldsa.MLDSA87PrivateKey,
}


class _Sentinel(enum.Enum):
    REMOVE = "REMOVE"


#: Pass as a claim override to leave that claim out of the token.
REMOVE = _Sentinel.REMOVE

ClaimValue: TypeAlias = Any


# --------------------------------------------------------------------------
# Encodings


def b64url(data: bytes) -> str:
    """Base64url without padding, as in every part of a compact JWS."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of `b64url`."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64std(data: bytes) -> str:
    # Go's encoding/json writes []byte as standard base64 with padding.
    return base64.b64encode(data).decode("ascii")


_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def go_json(value: Any) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it.

    Mappings keep the order given: pass sorted keys where Go marshals a
    map, struct order where it marshals a struct. Non-ASCII text stays
    UTF-8; ``<``, ``>``, ``&``, U+2028 and U+2029 become ``\\uXXXX``.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    # These characters can only occur inside JSON strings, so replacing
    # them in the whole text is safe.
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text.encode("utf-8")


def pem_encode(block_type: str, data: bytes) -> bytes:
    """A PEM block as Go's ``pem.Encode`` writes it (64-column lines)."""
    body = base64.b64encode(data).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    text = "\n".join([f"-----BEGIN {block_type}-----", *lines])
    return f"{text}\n-----END {block_type}-----\n".encode("ascii")


def pem_decode(pem: bytes) -> tuple[str, bytes]:
    """Return (block type, bytes) of the first PEM block in `pem`."""
    lines = pem.decode("ascii").strip().splitlines()
    begin, end = lines[0], lines[-1]
    if not (begin.startswith("-----BEGIN ") and end.startswith("-----END ")):
        raise ValueError("not a PEM block")
    block_type = begin.removeprefix("-----BEGIN ").removesuffix("-----")
    return block_type, base64.b64decode("".join(lines[1:-1]))


def encode_token(
    header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes
) -> str:
    """Assemble a compact JWS from its decoded parts, signed or forged."""
    signing_input = _signing_input(header, claims).decode("ascii")
    return f"{signing_input}.{b64url(signature)}"


def decode_token(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """Split a compact JWS into (header, claims, signature); no checks."""
    header, claims, signature = token.split(".")
    return (
        json.loads(b64url_decode(header)),
        json.loads(b64url_decode(claims)),
        b64url_decode(signature),
    )


def _signing_input(
    header: Mapping[str, Any], claims: Mapping[str, Any]
) -> bytes:
    parts = (b64url(go_json(header)), b64url(go_json(claims)))
    return ".".join(parts).encode("ascii")


def _sorted(mapping: Mapping[str, Any]) -> dict[str, Any]:
    # Both the JWT library of classic clients and json.Marshal of a Go map
    # write keys in sorted order.
    return dict(sorted(mapping.items()))


# --------------------------------------------------------------------------
# Machines


@attrs.define(frozen=True, eq=False)
class Machine:
    """One machine of one user, as the client knows it: names and keys.

    `alg` is what its tokens claim by default. Immutable: a key change
    (`rotate_to_post_quantum`) returns a new Machine; ``attrs.evolve``
    renames one.
    """

    username: str
    machine_name: str
    alg: str
    signing_key: SigningKey = attrs.field(repr=False)
    kem_key: mlkem.MLKEM768PrivateKey | None = attrs.field(
        default=None, repr=False
    )

    @classmethod
    def classic(cls, username: str, machine_name: str) -> Machine:
        """A machine set up with ``--classic``: P-256 key, ``ES512`` tokens."""
        return cls.create(username, machine_name, alg="ES512", curve="P-256")

    @classmethod
    def post_quantum(
        cls, username: str, machine_name: str, seed: bytes | None = None
    ) -> Machine:
        """A machine as set up by default: ML-DSA-65 plus ML-KEM-768.

        `seed` is either the client's 96-byte master seed (ML-DSA seed
        then ML-KEM seed), or a 32-byte ML-DSA seed alone, in which case
        the ML-KEM key is random. None makes both random.
        """
        return cls.create(username, machine_name, alg="ML-DSA-65", seed=seed)

    @classmethod
    def create(
        cls,
        username: str,
        machine_name: str,
        *,
        alg: str,
        curve: str | None = None,
        kem: bool | None = None,
        seed: bytes | None = None,
    ) -> Machine:
        """A machine of any variant the tests need.

        `alg` is ``ES256``, ``ES384``, ``ES512`` or ``ML-DSA-44/65/87``.
        For ``ES*``, `curve` (``P-256``, ``P-384``, ``P-521``) defaults to
        the curve JOSE pairs with `alg`. `kem` adds an ML-KEM-768 key; it
        defaults to True for ML-DSA, False for EC. `seed` is for ML-DSA
        only, as in `post_quantum`.
        """
        if alg in EC_ALGORITHMS:
            if seed is not None:
                raise ValueError("seed is for ML-DSA machines")
            key: SigningKey = _ec_key(curve or _STANDARD_CURVE[alg])
            return cls(username, machine_name, alg, key, _kem_key(kem, None))
        if alg not in MLDSA_ALGORITHMS:
            raise ValueError(f"unknown alg {alg!r}")
        if curve is not None:
            raise ValueError("curve is for EC machines")
        mldsa_seed, kem_seed = _split_seed(seed)
        key = MLDSA_ALGORITHMS[alg].from_seed_bytes(mldsa_seed)
        kem_key = _kem_key(True if kem is None else kem, kem_seed)
        return cls(username, machine_name, alg, key, kem_key)

    @property
    def is_post_quantum(self) -> bool:
        """Whether the machine signs with ML-DSA."""
        return not isinstance(self.signing_key, ec.EllipticCurvePrivateKey)

    @property
    def public_key_pem(self) -> bytes:
        """The public key as the client uploads it (``key`` part)."""
        key = self.signing_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            der = key.public_key().public_bytes(
                serialization.Encoding.DER,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            )
            return pem_encode(EC_PUBLIC_KEY, der)
        return pem_encode(MLDSA_PUBLIC_KEY, key.public_key().public_bytes_raw())

    @property
    def encapsulation_key_pem(self) -> bytes | None:
        """The ML-KEM-768 public key as uploaded, or None without one."""
        if self.kem_key is None:
            return None
        raw = self.kem_key.public_key().public_bytes_raw()
        return pem_encode(MLKEM_PUBLIC_KEY, raw)

    def header(self, alg: str | None = None) -> dict[str, Any]:
        """The JOSE header of this machine's tokens."""
        return {"alg": alg or self.alg, "typ": "JWT"}

    def claims(
        self, *, now: int | None = None, **overrides: ClaimValue
    ) -> dict[str, Any]:
        """The claims of a token made at `now` (default: the clock).

        Each override replaces a claim or adds one; `REMOVE` drops one.
        """
        now = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "exp": now + EXPIRES_AFTER,
            "iat": now - ISSUED_BEFORE,
            "iss": ISSUER,
            "machine": self.machine_name,
            "username": self.username,
        }
        claims.update(overrides)
        return _sorted({k: v for k, v in claims.items() if v is not REMOVE})

    def signing_input(
        self,
        *,
        alg: str | None = None,
        now: int | None = None,
        header_overrides: Mapping[str, Any] | None = None,
        **claim_overrides: ClaimValue,
    ) -> bytes:
        """The ASCII ``header.payload`` that a token's signature covers."""
        header = {**self.header(alg), **(header_overrides or {})}
        header = {k: v for k, v in header.items() if v is not REMOVE}
        claims = self.claims(now=now, **claim_overrides)
        return _signing_input(_sorted(header), claims)

    def sign(self, data: bytes, *, alg: str | None = None) -> bytes:
        """Sign `data` with this machine's key, as a JWS signature.

        EC keys hash with the digest `alg` names (default: the machine's
        own `alg`; a non-``ES*`` name also falls back to it) and return
        ``R || S``, each half the curve's size. ML-DSA keys ignore `alg`.
        """
        key = self.signing_key
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data)
        digest = EC_ALGORITHMS.get(alg or self.alg) or EC_ALGORITHMS[self.alg]
        der = key.sign(data, ec.ECDSA(digest()))
        r, s = utils.decode_dss_signature(der)
        size = (key.curve.key_size + 7) // 8
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    def token(
        self,
        *,
        alg: str | None = None,
        now: int | None = None,
        header_overrides: Mapping[str, Any] | None = None,
        **claim_overrides: ClaimValue,
    ) -> str:
        """A compact JWS exactly as the client builds it.

        `alg` changes the header's claim (and, for EC keys, the digest);
        `header_overrides` sets or (with `REMOVE`) drops header fields;
        claim overrides as in `claims`.
        """
        signing_input = self.signing_input(
            alg=alg, now=now, header_overrides=header_overrides,
            **claim_overrides,
        )
        signature = self.sign(signing_input, alg=alg)
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    def headers(self, **token_kwargs: Any) -> dict[str, str]:
        """The ``Authorization`` header of one request (see `token`)."""
        return {"Authorization": f"Bearer {self.token(**token_kwargs)}"}

    def rotate_to_post_quantum(self, seed: bytes | None = None) -> Machine:
        """The same machine after ``ssh-sync migrate``: fresh PQ keys."""
        return Machine.post_quantum(self.username, self.machine_name, seed)


def _ec_key(curve: str) -> ec.EllipticCurvePrivateKey:
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r}")
    return ec.generate_private_key(CURVES[curve]())


def _split_seed(seed: bytes | None) -> tuple[bytes, bytes | None]:
    """Return (ML-DSA seed, ML-KEM seed or None for a random key)."""
    if seed is None:
        seed = secrets.token_bytes(MASTER_SEED_SIZE)
    if len(seed) == MASTER_SEED_SIZE:
        return seed[:MLDSA_SEED_SIZE], seed[MLDSA_SEED_SIZE:]
    if len(seed) == MLDSA_SEED_SIZE:
        return seed, None
    raise ValueError(
        f"seed must be {MASTER_SEED_SIZE} or {MLDSA_SEED_SIZE} bytes"
    )


def _kem_key(
    wanted: bool | None, seed: bytes | None
) -> mlkem.MLKEM768PrivateKey | None:
    if not wanted:
        return None
    if seed is None:
        return mlkem.MLKEM768PrivateKey.generate()
    return mlkem.MLKEM768PrivateKey.from_seed_bytes(seed)


# --------------------------------------------------------------------------
# Multipart bodies


@attrs.frozen
class Part:
    """One part of a multipart body: a file when `filename` is not None."""

    name: str
    data: bytes
    filename: str | None = None


@attrs.frozen
class MultipartBody:
    """A multipart body byte for byte as Go's ``mime/multipart`` writes it."""

    content: bytes
    content_type: str

    def request_kwargs(
        self, headers: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """``content=`` and ``headers=`` for httpx, merged with `headers`."""
        merged = {**(headers or {}), "Content-Type": self.content_type}
        return {"content": self.content, "headers": merged}


def _go_quote(text: str) -> str:
    # Go's multipart writer escapes only backslash and double quote.
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _part_head(part: Part) -> bytes:
    disposition = f'form-data; name="{_go_quote(part.name)}"'
    lines = []
    if part.filename is None:
        lines.append(f"Content-Disposition: {disposition}")
    else:
        disposition += f'; filename="{_go_quote(part.filename)}"'
        lines.append(f"Content-Disposition: {disposition}")
        lines.append(f"Content-Type: {OCTET_STREAM}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def encode_multipart(
    parts: Iterable[Part], boundary: str | None = None
) -> MultipartBody:
    """Encode `parts` as Go's writer does (random 60-hex-digit boundary)."""
    boundary = boundary or os.urandom(30).hex()
    chunks = []
    for index, part in enumerate(parts):
        # Go writes the CRLF that ends a part just before the next boundary.
        lead = b"" if index == 0 else b"\r\n"
        delimiter = f"--{boundary}\r\n".encode()
        chunks += [lead, delimiter, _part_head(part), part.data]
    chunks.append(f"\r\n--{boundary}--\r\n".encode())
    content_type = f"multipart/form-data; boundary={boundary}"
    return MultipartBody(b"".join(chunks), content_type)


def httpx_files(parts: Iterable[Part]) -> list[tuple[str, Any]]:
    """`parts` as an httpx ``files=`` list, keeping their order.

    Text fields become ``(None, bytes)`` entries, which httpx writes
    without a file name or content type. httpx escapes names its own way
    (``"`` as ``%22``) and drops empty file names; use `encode_multipart`
    for names where that matters.
    """
    files: list[tuple[str, Any]] = []
    for part in parts:
        if part.filename is None:
            files.append((part.name, (None, part.data)))
        else:
            files.append((part.name, (part.filename, part.data, OCTET_STREAM)))
    return files


def _setup_parts(machine: Machine) -> list[Part]:
    parts = [Part("key", machine.public_key_pem, "keypair.pub")]
    parts += _encapsulation_part(machine)
    parts.append(Part("username", machine.username.encode("utf-8")))
    parts.append(Part("machine_name", machine.machine_name.encode("utf-8")))
    return parts


def _encapsulation_part(machine: Machine) -> list[Part]:
    pem = machine.encapsulation_key_pem
    if pem is None:
        return []
    return [Part("encapsulation_key", pem, "encapsulation_key.pub")]


def _key_update_parts(machine: Machine) -> list[Part]:
    key = Part("key", machine.public_key_pem, "keypair.pub")
    return [key, *_encapsulation_part(machine)]


def _upload_parts(
    ssh_config: Sequence[Mapping[str, Any]],
    known_hosts: Sequence[Mapping[str, Any]] | None,
    keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None,
) -> list[Part]:
    items = keys.items() if isinstance(keys, Mapping) else keys or ()
    parts = [Part("keys[]", data, name) for name, data in items]
    parts.append(Part("ssh_config", go_json(list(ssh_config))))
    if known_hosts is not None:
        parts.append(Part("known_hosts", go_json(list(known_hosts))))
    return parts


def setup_form(machine: Machine) -> dict[str, Any]:
    """httpx ``files=`` of ``POST /api/v1/setup`` for a new account.

    Parts: file ``key`` (``keypair.pub``), file ``encapsulation_key``
    (``encapsulation_key.pub``, post-quantum only), fields ``username``
    and ``machine_name``.
    """
    return {"files": httpx_files(_setup_parts(machine))}


def setup_body(
    machine: Machine, *, boundary: str | None = None
) -> MultipartBody:
    """`setup_form`, byte for byte as the client encodes it."""
    return encode_multipart(_setup_parts(machine), boundary)


def key_update_form(machine: Machine) -> dict[str, Any]:
    """httpx ``files=`` of ``PUT /api/v1/machines/key`` with `machine`'s keys.

    Sign the request with the machine's old keys: the migration rotates
    first and uploads with a token made before the rotation.
    """
    return {"files": httpx_files(_key_update_parts(machine))}


def key_update_body(
    machine: Machine, *, boundary: str | None = None
) -> MultipartBody:
    """`key_update_form`, byte for byte as the client encodes it."""
    return encode_multipart(_key_update_parts(machine), boundary)


def data_upload_form(
    ssh_config: Sequence[Mapping[str, Any]],
    known_hosts: Sequence[Mapping[str, Any]] | None = None,
    keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None = None,
) -> dict[str, Any]:
    """httpx ``files=`` of ``POST /api/v1/data`` (``ssh-sync upload``).

    `keys` maps file names to their (encrypted) bytes; pairs allow the
    same name twice. Each becomes a ``keys[]`` file part, before the
    ``ssh_config`` field (always sent) and the ``known_hosts`` field (sent
    unless None; the client leaves it out when it has no entries).
    """
    return {"files": httpx_files(_upload_parts(ssh_config, known_hosts, keys))}


def data_upload_body(
    ssh_config: Sequence[Mapping[str, Any]],
    known_hosts: Sequence[Mapping[str, Any]] | None = None,
    keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None = None,
    *,
    boundary: str | None = None,
) -> MultipartBody:
    """`data_upload_form`, byte for byte as the client encodes it."""
    parts = _upload_parts(ssh_config, known_hosts, keys)
    return encode_multipart(parts, boundary)


def sync_upload_form(
    downloaded_ssh_config: Sequence[Mapping[str, Any]],
    keys: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
) -> dict[str, Any]:
    """httpx ``files=`` of the ``POST /api/v1/data`` of ``ssh-sync sync``.

    The sync command uploads changed keys and echoes back the
    ``ssh_config`` list of its last ``GET /api/v1/data``, never
    ``known_hosts``.
    """
    return data_upload_form(downloaded_ssh_config, None, keys)


def ssh_config_entry(
    host: str,
    values: Mapping[str, list[str]] | None = None,
    identity_files: list[str] | None = None,
) -> dict[str, Any]:
    """One ``ssh_config`` upload entry as the client's config parser makes it.

    A host without ``IdentityFile`` lines has ``identity_files`` null.
    """
    return {
        "host": host,
        "identity_files": identity_files,
        "values": _sorted(values or {}),
    }


# --------------------------------------------------------------------------
# JSON bodies and pairing messages


def delete_machine_request(machine_name: str) -> dict[str, Any]:
    """httpx kwargs of the body of ``DELETE /api/v1/machines/``.

    The client's JSON encoder ends the body with a newline.
    """
    body = go_json({"machine_name": machine_name}) + b"\n"
    return {"content": body, "headers": {"Content-Type": "application/json"}}


def key_rotation_request(encrypted_keys: Mapping[str, bytes]) -> dict[str, Any]:
    """httpx kwargs of ``POST /api/v1/key-rotation``: machine id -> key."""
    keys = [
        {"machine_id": machine_id, "encrypted_master_key": _b64std(key)}
        for machine_id, key in encrypted_keys.items()
    ]
    body = go_json({"keys": keys})
    return {"content": body, "headers": {"Content-Type": "application/json"}}


def client_message(data: Mapping[str, Any]) -> bytes:
    """A pairing message from a client: send it as one binary frame."""
    return go_json({"message": "", "data": dict(data)})


def pairing_public_keys(machine: Machine) -> dict[str, Any]:
    """What a new machine sends at step 5 of pairing (PEM, base64).

    A classic machine has no ``encapsulation_key``: Go omits it when empty.
    """
    keys = {"public_key": _b64std(machine.public_key_pem)}
    if machine.encapsulation_key_pem is not None:
        keys["encapsulation_key"] = _b64std(machine.encapsulation_key_pem)
    return keys
