"""Pairing a new machine over real WebSockets, on one node (protocol §4).

Rules: the node listens on 127.0.0.1, port 0, inside the test's nursery;
both machines are real trio-websocket clients; every read has a deadline
(`pairing.READ_TIMEOUT`) and every test a ceiling (`CEILING`). Timeouts are
made fast by configuring the node with short ones, never by faking the
clock, since real sockets are involved. After every test the bus and the
pairing service must be empty: nothing outlives a pairing.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
import trio
from trio_websocket import ConnectionRejected

from ssh_sync_trio.model import NewMachine
from ssh_sync_trio.server import RunningServer
from ssh_sync_trio.storage import queries
from ssh_sync_trio.storage.store import Unavailable
from tests import harness, sshclient
from tests.pairing import (
    ask_for_phrase,
    existing_machine_socket,
    new_machine_socket,
    open_socket,
    pair,
    receive,
    send,
)

CEILING = 30
# How soon the surviving side must hear that its peer is gone.
PROMPT = 2.0


async def assert_idle(node: RunningServer) -> None:
    """Wait (briefly) until no mailbox, phrase, claim or side is left."""
    with trio.fail_after(PROMPT):
        while True:
            bus = node.bus.statistics()
            sides = node.services.pairings.statistics()
            if (bus.mailboxes, bus.phrases, bus.claims) == (0, 0, 0) and (
                sides.challengers,
                sides.responders,
            ) == (0, 0):
                return
            await trio.sleep(0.01)


@pytest.fixture
async def one_node(
    nursery: trio.Nursery, sqlite_url: str
) -> AsyncIterator[RunningServer]:
    node = await harness.start_node(nursery, sqlite_url)
    yield node
    await assert_idle(node)


async def account(node: RunningServer, machine: sshclient.Machine) -> None:
    async with harness.client(node) as http:
        await harness.register(http, machine)


@pytest.mark.parametrize(
    ("existing_kind", "new_kind"),
    [("classic", "post_quantum"), ("post_quantum", "classic")],
)
async def test_pairing_then_new_machine_downloads(
    nursery: trio.Nursery, database_url: str, existing_kind: str, new_kind: str
) -> None:
    with trio.fail_after(CEILING):
        node = await harness.start_node(nursery, database_url)
        existing = getattr(sshclient.Machine, existing_kind)("ada", "laptop")
        new = getattr(sshclient.Machine, new_kind)("ada", "desktop")
        async with harness.client(node) as http:
            await harness.register(http, existing)
            upload = sshclient.data_upload_form(
                [sshclient.ssh_config_entry("example", {"User": ["ada"]})],
                [
                    {
                        "host_pattern": "h",
                        "key_type": "ssh-ed25519",
                        "key_data": "AAAA",
                        "marker": "",
                    }
                ],
                {"id_ed25519": b"\x00sealed key bytes\xff"},
            )
            response = await http.post("/data", headers=existing.headers(), **upload)
            assert response.status_code == 200, response.text

            master_key = await pair(node, node, new, existing)
            assert master_key == b"the user's master key, sealed for the new machine"

            data = (await http.get("/data", headers=new.headers())).json()
            assert (
                base64.b64decode(data["keys"][0]["data"]) == b"\x00sealed key bytes\xff"
            )
            assert data["ssh_config"][0]["values"] == {"User": ["ada"]}
            keys = (
                await http.get("/machines/public-keys", headers=new.headers())
            ).json()
            stored = {m["name"]: m for m in keys["machines"]}
            assert (
                base64.b64decode(stored["desktop"]["public_key"]) == new.public_key_pem
            )
            if new.encapsulation_key_pem:
                assert (
                    base64.b64decode(stored["desktop"]["encapsulation_key"])
                    == new.encapsulation_key_pem
                )
            else:
                assert "encapsulation_key" not in stored["desktop"]
        await assert_idle(node)


async def test_unknown_user(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        async with new_machine_socket(one_node) as b:
            await send(b, {"username": "nobody", "machine_name": "x"})
            reply = await receive(b)
            assert (reply.error, reply.error_message) == (True, "User not found")
            assert reply.data == {"message": ""}


async def test_machine_already_exists(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            await send(b, {"username": "ada", "machine_name": "laptop"})
            reply = await receive(b)
            assert (reply.error, reply.error_message) == (
                True,
                "Machine already exists",
            )


async def test_challenge_times_out(nursery: trio.Nursery, sqlite_url: str) -> None:
    with trio.fail_after(CEILING):
        node = await harness.start_node(nursery, sqlite_url, challenge_timeout=0.3)
        await account(node, sshclient.Machine.classic("ada", "laptop"))
        async with new_machine_socket(node) as b:
            await ask_for_phrase(b, sshclient.Machine.classic("ada", "desktop"))
            reply = await receive(b, timeout=PROMPT)
            assert (reply.error, reply.error_message) == (True, "Challenge timed out")
        await assert_idle(node)


async def test_invalid_public_key_ends_both_sides(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
                junk = base64.b64encode(b"-----BEGIN PUBLIC KEY-----\nxx\n").decode()
                await send(b, {"public_key": junk})
                reply = await receive(b)
                assert (reply.error, reply.error_message) == (
                    True,
                    "Invalid public key format",
                )
                survivor = await receive(a, timeout=PROMPT)
                assert survivor.error and survivor.error_message
        await _no_machine(one_node, "ada", "desktop")


@pytest.mark.parametrize(
    "typed", ["{phrase}", "  {phrase}\n", "{upper}", " {upper} "], ids=str
)
async def test_phrase_matches_ignoring_case_and_space(
    one_node: RunningServer, typed: str
) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        new = sshclient.Machine.post_quantum("ada", "desktop")
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(b, new)
            words = phrase.split("-")
            assert len(words) == 3 and all(w.isalpha() and w.islower() for w in words)
            async with existing_machine_socket(one_node, existing) as a:
                await send(
                    a, {"challenge": typed.format(phrase=phrase, upper=phrase.upper())}
                )
                assert (await receive(b)).data == {"message": "Challenge accepted!"}


@pytest.mark.parametrize("answer", ["wrong-phrase-here", "", "other user"])
async def test_invalid_challenge_response(one_node: RunningServer, answer: str) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        other = sshclient.Machine.classic("bob", "pc")
        await account(one_node, other)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            # "other user": bob types ada's phrase; it must not pair him in.
            responder, typed = (
                (other, phrase) if answer == "other user" else (existing, answer)
            )
            async with existing_machine_socket(one_node, responder) as a:
                await send(a, {"challenge": typed})
                reply = await receive(a)
                assert (reply.error, reply.error_message) == (
                    True,
                    "Invalid challenge response.",
                )
            # The phrase is still good for its own user afterwards.
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}


async def test_used_phrase_is_refused(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
                async with existing_machine_socket(one_node, existing) as again:
                    await send(again, {"challenge": phrase})
                    reply = await receive(again)
                    assert reply.error_message == "Invalid challenge response."


async def test_responder_must_authenticate(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_socket(one_node, "/setup/challenge"):
                pass  # pragma: no cover - the upgrade is refused
        assert rejected.value.status_code == 401
        stranger = sshclient.Machine.classic("ghost", "pc")
        with pytest.raises(ConnectionRejected) as rejected:
            async with existing_machine_socket(one_node, stranger):
                pass  # pragma: no cover
        assert rejected.value.status_code == 401


# Disconnects: whichever side leaves, at whichever step, the other side hears
# of it within PROMPT seconds, and the phrase is gone.


async def test_new_machine_leaves_before_answer(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
        await assert_idle(one_node)
        async with existing_machine_socket(one_node, existing) as a:
            await send(a, {"challenge": phrase})
            assert (await receive(a)).error_message == "Invalid challenge response."


async def test_new_machine_leaves_after_accept(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with existing_machine_socket(one_node, existing) as a:
            async with new_machine_socket(one_node) as b:
                phrase = await ask_for_phrase(
                    b, sshclient.Machine.classic("ada", "desktop")
                )
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
            survivor = await receive(a, timeout=PROMPT)
            assert survivor.error
            assert survivor.error_message == "The new machine disconnected"
            assert survivor.data == {"public_key": None}


async def test_new_machine_leaves_while_key_is_sealed(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        new = sshclient.Machine.post_quantum("ada", "desktop")
        await account(one_node, existing)
        async with existing_machine_socket(one_node, existing) as a:
            async with new_machine_socket(one_node) as b:
                phrase = await ask_for_phrase(b, new)
                await send(a, {"challenge": phrase})
                await receive(b)
                await send(b, sshclient.pairing_public_keys(new))
                assert not (await receive(a)).error
            survivor = await receive(a, timeout=PROMPT)
            assert survivor.error_message == "The new machine disconnected"
        await _no_machine(one_node, "ada", "desktop")


async def test_existing_machine_leaves_after_answer(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                assert (await receive(b)).data == {"message": "Challenge accepted!"}
            survivor = await receive(b, timeout=PROMPT)
            assert survivor.error
            assert survivor.error_message == "The existing machine disconnected"
            assert survivor.data == {"message": ""}


async def test_existing_machine_leaves_before_sealing(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        new = sshclient.Machine.classic("ada", "desktop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(b, new)
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                await receive(b)
                await send(b, sshclient.pairing_public_keys(new))
                await receive(a)
            survivor = await receive(b, timeout=PROMPT)
            assert survivor.error_message == "The existing machine disconnected"
        await _no_machine(one_node, "ada", "desktop")


async def test_step_timeout_ends_both_sides(
    nursery: trio.Nursery, sqlite_url: str
) -> None:
    with trio.fail_after(CEILING):
        node = await harness.start_node(nursery, sqlite_url, pairing_step_timeout=0.3)
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(node, existing)
        async with new_machine_socket(node) as b:
            phrase = await ask_for_phrase(
                b, sshclient.Machine.classic("ada", "desktop")
            )
            async with existing_machine_socket(node, existing) as a:
                await send(a, {"challenge": phrase})
                await receive(b)
                # B never sends its key: its own step times out, A is told.
                mine = await receive(b, timeout=PROMPT)
                assert (
                    mine.error_message == "Pairing timed out waiting for this machine"
                )
                # A's own deadline for B's key runs out at about the same
                # time as B's: either way, A hears promptly.
                theirs = await receive(a, timeout=PROMPT)
                assert theirs.error
                assert theirs.error_message in (
                    "The new machine timed out",
                    "Pairing timed out waiting for the other machine",
                )
        await assert_idle(node)


async def test_name_taken_meanwhile(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        existing = sshclient.Machine.classic("ada", "laptop")
        new = sshclient.Machine.classic("ada", "desktop")
        await account(one_node, existing)
        async with new_machine_socket(one_node) as b:
            phrase = await ask_for_phrase(b, new)
            user = await one_node.services.store.call(queries.find_user, "ada")
            assert user is not None
            squatter = NewMachine(
                "desktop", sshclient.Machine.classic("ada", "x").public_key_pem
            )
            await one_node.services.store.call(queries.add_machine, user.id, squatter)
            async with existing_machine_socket(one_node, existing) as a:
                await send(a, {"challenge": phrase})
                await receive(b)
                await send(b, sshclient.pairing_public_keys(new))
                await receive(a)
                await send(a, {"encrypted_master_key": base64.b64encode(b"k").decode()})
            reply = await receive(b)
            assert (reply.error, reply.error_message) == (
                True,
                "Machine already exists",
            )


async def test_pending_limits(nursery: trio.Nursery, sqlite_url: str) -> None:
    with trio.fail_after(CEILING):
        node = await harness.start_node(
            nursery, sqlite_url, max_pending_per_user=2, max_pending=3
        )
        for user in ("ada", "bob"):
            await account(node, sshclient.Machine.classic(user, "laptop"))
        async with (
            new_machine_socket(node) as b1,
            new_machine_socket(node) as b2,
            new_machine_socket(node) as b3,
            new_machine_socket(node) as b4,
            new_machine_socket(node) as b5,
        ):
            await ask_for_phrase(b1, sshclient.Machine.classic("ada", "one"))
            await ask_for_phrase(b2, sshclient.Machine.classic("ada", "two"))
            await send(b3, {"username": "ada", "machine_name": "three"})
            reply = await receive(b3)
            assert (
                reply.error_message
                == "Too many pairings pending for this user, try again later"
            )
            await ask_for_phrase(b4, sshclient.Machine.classic("bob", "one"))
            await send(b5, {"username": "bob", "machine_name": "two"})
            reply = await receive(b5)
            assert (
                reply.error_message == "Too many pairings in progress, try again later"
            )
    await assert_idle(node)


async def test_oversized_message_is_refused(one_node: RunningServer) -> None:
    with trio.fail_after(CEILING):
        async with new_machine_socket(one_node) as b:
            await send(b, {"username": "x" * (1024 * 1024), "machine_name": "m"})
            reply = await receive(b)
            assert (reply.error, reply.error_message) == (True, "Message too large")


async def test_many_pairings_at_once(nursery: trio.Nursery, sqlite_url: str) -> None:
    count = 200
    with trio.fail_after(120):
        node = await harness.start_node(nursery, sqlite_url, max_pending_per_user=count)
        existing = sshclient.Machine.classic("ada", "laptop")
        await account(node, existing)
        done: list[bytes] = []

        async def one(i: int) -> None:
            new = sshclient.Machine.classic("ada", f"machine-{i}")
            done.append(await pair(node, node, new, existing, master_key=b"key %d" % i))

        async with trio.open_nursery() as pairings:
            for i in range(count):
                pairings.start_soon(one, i)
        assert sorted(done) == sorted(b"key %d" % i for i in range(count))
        async with harness.client(node) as http:
            listed = (await http.get("/machines/", headers=existing.headers())).json()
        assert len(listed) == count + 1
        await assert_idle(node)
        assert node.bus.statistics().dropped == 0


async def _no_machine(node: RunningServer, username: str, name: str) -> None:
    assert not await node.services.store.call(queries.machine_exists, username, name)


async def test_a_bug_still_ends_both_sides(
    one_node: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unexpected error in one side is logged and both clients hear."""

    def broken(*_args: object) -> None:
        raise RuntimeError("injected bug")

    monkeypatch.setattr(queries, "machine_exists", broken)
    with trio.fail_after(CEILING):
        await account(one_node, sshclient.Machine.classic("ada", "laptop"))
        async with new_machine_socket(one_node) as b:
            await send(b, {"username": "ada", "machine_name": "desktop"})
            reply = await receive(b)
            assert (reply.error, reply.error_message) == (
                True,
                "Internal server error, try again",
            )
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)


async def test_responder_refused_while_storage_is_down(
    one_node: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = sshclient.Machine.classic("ada", "laptop")
    await account(one_node, existing)

    def down(*_args: object) -> None:
        raise Unavailable("database unreachable")

    monkeypatch.setattr(queries, "find_caller", down)
    with trio.fail_after(CEILING), pytest.raises(ConnectionRejected) as rejected:
        async with existing_machine_socket(one_node, existing):
            pass  # pragma: no cover - the upgrade is refused
    assert rejected.value.status_code == 503
