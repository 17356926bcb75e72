"""The client's per-request tokens: compact JWS, verified by hand.

Generic JWT libraries cannot serve this client: classic clients sign
`ES512` with a P-256 key, which those libraries reject, and none knows the
ML-DSA algorithms. The rules are docs/protocol.md §2. Every failure is the
same `Unauthorized`, so a caller cannot learn which check failed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from typing import Any, TypeGuard

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ssh_sync_trio.auth.keys import InvalidKey, MachineKey, parse_public_key
from ssh_sync_trio.names import storable

EC_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "ES256": hashes.SHA256,
    "ES512": hashes.SHA512,
}
ML_DSA_ALGORITHMS = ("ML-DSA-44", "ML-DSA-65", "ML-DSA-87")

# Seconds of clock skew forgiven on `exp`.
LEEWAY = 30


class Unauthorized(Exception):
    """The request does not prove it comes from a registered machine."""


@attrs.frozen
class Token:
    """A token that parsed and has not expired; its signature is unchecked."""

    alg: str
    username: str
    machine: str
    signing_input: bytes
    signature: bytes


def parse_bearer(header: str | None, *, now: float | None = None) -> Token:
    """Parse an `Authorization` header value into a `Token`."""
    if not header or not header.startswith("Bearer "):
        raise Unauthorized()
    parts = header.removeprefix("Bearer ").strip().split(".")
    if len(parts) != 3:
        raise Unauthorized()
    head = _json_part(parts[0])
    claims = _json_part(parts[1])
    alg = head.get("alg")
    # Not a string (a list, say) is as unknown as any other name.
    if not isinstance(alg, str) or (
        alg not in EC_DIGESTS and alg not in ML_DSA_ALGORITHMS
    ):
        raise Unauthorized()
    _check_expiry(claims.get("exp"), time.time() if now is None else now)
    username, machine = claims.get("username"), claims.get("machine")
    if not _storable_name(username) or not _storable_name(machine):
        raise Unauthorized()
    return Token(
        alg=alg,
        username=username,
        machine=machine,
        signing_input=f"{parts[0]}.{parts[1]}".encode("ascii"),
        signature=_b64url(parts[2]),
    )


def verify_signature(token: Token, public_key_pem: bytes) -> None:
    """Check `token`'s signature against the machine's stored key."""
    try:
        stored = parse_public_key(public_key_pem)
    except InvalidKey:
        raise Unauthorized() from None
    try:
        _verify(token, stored)
    except InvalidSignature:
        raise Unauthorized() from None


def _verify(token: Token, stored: MachineKey) -> None:
    if token.alg in EC_DIGESTS:
        if not isinstance(stored.key, ec.EllipticCurvePublicKey):
            raise Unauthorized()
        # The curve need not match `alg`: classic clients sign ES512 on P-256.
        half = (stored.key.curve.key_size + 7) // 8
        if len(token.signature) != 2 * half:
            raise Unauthorized()
        r = int.from_bytes(token.signature[:half], "big")
        s = int.from_bytes(token.signature[half:], "big")
        digest = EC_DIGESTS[token.alg]()
        stored.key.verify(
            encode_dss_signature(r, s), token.signing_input, ec.ECDSA(digest)
        )
        return
    if stored.family != token.alg:
        raise Unauthorized()
    assert not isinstance(stored.key, ec.EllipticCurvePublicKey)
    stored.key.verify(token.signature, token.signing_input)


def _storable_name(value: Any) -> TypeGuard[str]:
    """Whether `value` can name a stored user or machine at all: looking up
    one that cannot would fail in the database, not as a missing machine."""
    return isinstance(value, str) and bool(value) and storable(value)


def _check_expiry(exp: Any, now: float) -> None:
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise Unauthorized()
    # NaN compares false with everything, so it would never expire.
    if isinstance(exp, float) and not math.isfinite(exp):
        raise Unauthorized()
    if exp + LEEWAY < now:
        raise Unauthorized()


def _b64url(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise Unauthorized() from None


def _json_part(part: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url(part))
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the parser's stack allows.
        raise Unauthorized() from None
    if not isinstance(value, dict):
        raise Unauthorized()
    return value
