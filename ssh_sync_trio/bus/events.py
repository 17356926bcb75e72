"""The events one side of a pairing sends the other, and where they go.

Events are frozen values with a JSON form, so that the Redis bus can carry
them between processes exactly as the memory bus hands them over.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import attrs


@attrs.frozen
class Address:
    """Where a waiting side's mailbox lives: a node and a mailbox id there."""

    node: str
    mailbox: str


@attrs.frozen
class Accepted:
    """To the challenger: a responder claimed the phrase; here it listens."""

    responder: Address


@attrs.frozen
class ChallengerKey:
    """To the responder: the new machine's public keys, as it sent them."""

    public_key: bytes
    encapsulation_key: bytes | None


@attrs.frozen
class EncryptedMasterKey:
    """To the challenger: the user's master key, encrypted for the new machine."""

    key: bytes


@attrs.frozen
class Aborted:
    """To either side: the other side ended; `reason` is shown to its user."""

    reason: str


Event = Accepted | ChallengerKey | EncryptedMasterKey | Aborted


class MalformedEvent(ValueError):
    """Bytes from the bus that are not an event this code understands."""


class UnknownEvent(MalformedEvent):
    """A well-formed message whose type this node does not know."""


def encode(to: Address, event: Event) -> bytes:
    """The bus wire form of `event` for mailbox `to`."""
    body: dict[str, Any] = {"to": to.mailbox, "type": type(event).__name__}
    if isinstance(event, Accepted):
        body["node"], body["mailbox"] = event.responder.node, event.responder.mailbox
    elif isinstance(event, ChallengerKey):
        body["public_key"] = _b64(event.public_key)
        body["encapsulation_key"] = _b64(event.encapsulation_key)
    elif isinstance(event, EncryptedMasterKey):
        body["key"] = _b64(event.key)
    else:
        body["reason"] = event.reason
    return json.dumps(body, separators=(",", ":")).encode()


def decode(raw: bytes) -> tuple[str, Event]:
    """The mailbox id and event that `encode` made; raises `MalformedEvent`."""
    try:
        body = json.loads(raw)
        kind, to = body["type"], body["to"]
        if not isinstance(to, str):
            raise MalformedEvent("mailbox id is not a string")
        return to, _event(kind, body)
    except MalformedEvent:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        # RecursionError: nesting deeper than the JSON parser's stack.
        raise MalformedEvent(type(error).__name__) from None


def _event(kind: Any, body: dict[str, Any]) -> Event:
    if kind == "Accepted":
        return Accepted(Address(str(body["node"]), str(body["mailbox"])))
    if kind == "ChallengerKey":
        return ChallengerKey(
            _bytes(body["public_key"]), _optional(body.get("encapsulation_key"))
        )
    if kind == "EncryptedMasterKey":
        return EncryptedMasterKey(_bytes(body["key"]))
    if kind == "Aborted":
        return Aborted(str(body["reason"]))
    raise UnknownEvent(f"unknown event type {kind!r}")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _bytes(text: Any) -> bytes:
    if not isinstance(text, str):
        raise MalformedEvent("bytes field is not a string")
    return base64.b64decode(text, validate=True)


def _optional(text: Any) -> bytes | None:
    return None if text is None else _bytes(text)
