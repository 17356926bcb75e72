"""Machine public keys: the two PEM families of docs/protocol.md §2.

A classic machine stores a `PUBLIC KEY` block (an EC SubjectPublicKeyInfo);
a post-quantum one stores an `ML-DSA PUBLIC KEY` block holding the raw
ML-DSA public key, whose size tells the parameter set.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

import attrs
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

_PEM = re.compile(
    rb"-----BEGIN (?P<label>[A-Z0-9][A-Z0-9 -]*?)-----\r?\n"
    rb"(?P<body>[A-Za-z0-9+/=\r\n]*?)"
    rb"-----END (?P=label)-----"
)

ML_DSA_BY_SIZE: dict[int, tuple[str, Any]] = {
    1312: ("ML-DSA-44", mldsa.MLDSA44PublicKey),
    1952: ("ML-DSA-65", mldsa.MLDSA65PublicKey),
    2592: ("ML-DSA-87", mldsa.MLDSA87PublicKey),
}

PublicKey = (
    ec.EllipticCurvePublicKey
    | mldsa.MLDSA44PublicKey
    | mldsa.MLDSA65PublicKey
    | mldsa.MLDSA87PublicKey
)


class InvalidKey(ValueError):
    """The bytes are not a public key of either family."""


@attrs.frozen
class MachineKey:
    """A parsed public key and the family (`EC` or an ML-DSA name) it is of."""

    family: str
    key: PublicKey


def parse_public_key(pem: bytes) -> MachineKey:
    """Parse a stored or uploaded public key; `InvalidKey` if it is neither."""
    match = _PEM.search(pem)
    if match is None:
        raise InvalidKey("no PEM block")
    label = match["label"]
    if label == b"PUBLIC KEY":
        return _ec_key(match.group(0))
    if label == b"ML-DSA PUBLIC KEY":
        return _ml_dsa_key(match["body"])
    raise InvalidKey("unknown PEM block")


def _ec_key(block: bytes) -> MachineKey:
    try:
        key = load_pem_public_key(block)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidKey("not a public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidKey("not an EC key")
    return MachineKey("EC", key)


def _ml_dsa_key(body: bytes) -> MachineKey:
    try:
        raw = base64.b64decode(b"".join(body.split()), validate=True)
    except binascii.Error:
        raise InvalidKey("bad base64") from None
    if len(raw) not in ML_DSA_BY_SIZE:
        raise InvalidKey("not an ML-DSA public key size")
    family, kind = ML_DSA_BY_SIZE[len(raw)]
    try:
        return MachineKey(family, kind.from_public_bytes(raw))
    except ValueError:
        raise InvalidKey("not an ML-DSA public key") from None
