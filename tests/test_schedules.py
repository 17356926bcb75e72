"""Property-based schedules: many pairings at once, some sides leaving.

Rules: each example starts its own node (SQLite, memory bus, 127.0.0.1,
port 0) and drives real WebSockets; hypothesis picks how many pairings run
together, where each one's sides leave, and small delays between steps, so
the interleavings differ from run to run. Every example has a ceiling.

The properties, for every schedule:

- a pairing whose sides both stay completes, and its machine exists;
- when one side leaves, the other hears an error within `PROMPT` seconds
  (never a hang), and no machine is created;
- afterwards no mailbox, phrase, claim or running side is left.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssh_sync_trio.server import RunningServer
from ssh_sync_trio.storage import queries
from tests import harness, sshclient
from tests.pairing import (
    ask_for_phrase,
    existing_machine_socket,
    new_machine_socket,
    receive,
    send,
)
from tests.test_pairing import assert_idle

PROMPT = 2.0
CEILING = 30

# Where a side may leave: after the step of that name.
LEAVE_POINTS = (
    "stays",
    "new leaves after phrase",
    "new leaves after accept",
    "new leaves after key",
    "existing leaves after answer",
    "existing leaves after offer",
)


@attrs.frozen
class Plan:
    """One pairing of a schedule: where a side leaves, and step delays."""

    leave: str
    delays: tuple[float, ...]


plans = st.builds(
    Plan,
    leave=st.sampled_from(LEAVE_POINTS),
    delays=st.tuples(*[st.sampled_from([0.0, 0.0, 0.001, 0.005, 0.02])] * 4),
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=st.lists(plans, min_size=1, max_size=8))
async def test_schedules_of_pairings(schedule: list[Plan]) -> None:
    with trio.fail_after(CEILING), tempfile.TemporaryDirectory() as folder:
        url = f"sqlite:///{Path(folder) / 'db.sqlite3'}"
        async with trio.open_nursery() as nursery:
            node = await harness.start_node(
                nursery, url, challenge_timeout=5.0, max_pending_per_user=len(schedule)
            )
            existing = sshclient.Machine.classic("ada", "laptop")
            async with harness.client(node) as http:
                await harness.register(http, existing)

            outcomes: dict[int, str] = {}
            async with trio.open_nursery() as pairings:
                for i, plan in enumerate(schedule):
                    pairings.start_soon(_run_plan, node, existing, i, plan, outcomes)

            for i, plan in enumerate(schedule):
                created = await node.services.store.call(
                    queries.machine_exists, "ada", f"m{i}"
                )
                assert created == (plan.leave == "stays"), (plan, outcomes[i])
                assert outcomes[i] == (
                    "completed" if plan.leave == "stays" else "heard"
                )
            await assert_idle(node)
            nursery.cancel_scope.cancel()


async def _run_plan(
    node: RunningServer,
    existing: sshclient.Machine,
    index: int,
    plan: Plan,
    outcomes: dict[int, str],
) -> None:
    new = sshclient.Machine.classic("ada", f"m{index}")
    pause = iter(plan.delays)
    async with new_machine_socket(node) as b:
        phrase = await ask_for_phrase(b, new)
        if plan.leave == "new leaves after phrase":
            await b.aclose()
            outcomes[index] = "heard"  # nobody is left to hear
            return
        await trio.sleep(next(pause))
        async with existing_machine_socket(node, existing) as a:
            await send(a, {"challenge": phrase})
            assert (await receive(b)).data == {"message": "Challenge accepted!"}
            if plan.leave == "new leaves after accept":
                await b.aclose()
                outcomes[index] = await _heard(a)
                return
            if plan.leave == "existing leaves after answer":
                await a.aclose()
                outcomes[index] = await _heard(b)
                return
            await trio.sleep(next(pause))
            await send(b, sshclient.pairing_public_keys(new))
            offer = await receive(a)
            assert not offer.error, offer.error_message
            if plan.leave == "new leaves after key":
                await b.aclose()
                outcomes[index] = await _heard(a)
                return
            if plan.leave == "existing leaves after offer":
                await a.aclose()
                outcomes[index] = await _heard(b)
                return
            await trio.sleep(next(pause))
            sealed = base64.b64encode(b"master %d" % index).decode()
            await send(a, {"encrypted_master_key": sealed})
        got = await receive(b)
        done = await receive(b)
        assert not got.error and not done.error, (got, done)
        outcomes[index] = "completed"


async def _heard(survivor: object) -> str:
    reply = await receive(survivor, timeout=PROMPT)  # type: ignore[arg-type]
    assert reply.error and reply.error_message, reply
    return "heard"
