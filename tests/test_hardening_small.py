"""Issue 12, items 4, 5, 10, 11, 13 and 14: the smaller edges users hit first.

Each test runs against a real redis-server and fakeredis (``any_client``) where
Redis is involved.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from support import window_key

from conversation import ConsolidationConfig, ConsolidationWorker, ConversationManager, SessionStore
from conversation._budget import estimate_tokens, fit_to_budget
from conversation._tools.reading import list_rooms
from conversation._tools.targets import RedisTarget

pytestmark = pytest.mark.real_server

MakeManager = Callable[..., ConversationManager]
CALL = [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]
FOLD_SMALL = ConsolidationConfig(max_turns=4, keep_recent=2, min_fold=1)


async def fill(manager: ConversationManager, room_id: str, count: int) -> None:
    for serial in range(count):
        await manager.append_async(room_id, "user", f"[Message ID: {serial}] turn {serial}")


# ------------------------------------------- 4: one bad room never stops a pass


async def test_a_room_of_the_wrong_type_is_counted_and_the_pass_goes_on(
    any_client: aioredis.Redis,
    make_manager: MakeManager,
    room: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = make_manager(any_client, consolidation=FOLD_SMALL)
    await fill(writer, room, 8)
    broken = f"{room}-broken"
    await any_client.set(window_key(broken), "not a list")
    await any_client.set(window_key(broken) + ":meta", "not a hash")
    worker_manager = make_manager(any_client, consolidation=FOLD_SMALL)
    worker = ConsolidationWorker(worker_manager, rooms=[broken, room])

    with caplog.at_level(logging.WARNING, logger="conversation"):
        results = await worker.run_once()

    assert [result.room_id for result in results] == [room]
    assert results[0].outcome == "folded"
    assert worker.stats.failures == 1
    assert any(broken in record.getMessage() for record in caplog.records)
    assert await any_client.get(window_key(broken)) == b"not a list"  # left as it was


async def test_a_room_that_breaks_during_its_visit_is_counted_and_the_pass_goes_on(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str
) -> None:
    # The LLEN pre-check passes (the window is a list) but the meta key is not a hash.
    writer = make_manager(any_client, consolidation=FOLD_SMALL)
    await fill(writer, room, 8)
    broken = f"{room}-broken"
    await fill(writer, broken, 8)
    await writer.drain()
    await any_client.delete(window_key(broken) + ":meta")
    await any_client.set(window_key(broken) + ":meta", "not a hash")
    worker_manager = make_manager(any_client, consolidation=FOLD_SMALL)
    worker = ConsolidationWorker(worker_manager, rooms=[broken, room])

    results = await worker.run_once()

    assert [result.room_id for result in results] == [room]
    assert worker.stats.failures == 1


# ------------------------------------------ 10: a check does not keep rooms resident


async def test_the_worker_does_not_keep_the_rooms_it_only_checks(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str
) -> None:
    writer = make_manager(any_client, consolidation=FOLD_SMALL)
    quiet = f"{room}-quiet"
    await fill(writer, quiet, 3)  # under the threshold: checked, not folded
    await fill(writer, room, 8)  # folded
    worker_manager = make_manager(any_client, consolidation=FOLD_SMALL)
    worker = ConsolidationWorker(worker_manager, rooms=[quiet, room])

    results = await worker.run_once()

    assert [result.outcome for result in results] == ["folded"]
    assert worker.stats.checked == 2
    assert worker_manager.stats()["rooms"] == 0
    # What it folded is in Redis, and a later read hydrates it again.
    messages = await worker_manager.get_messages_async(room)
    assert messages[-1]["content"] == "[Message ID: 7] turn 7"


async def test_a_visit_does_not_refresh_the_last_use_of_a_resident_room(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str
) -> None:
    manager = make_manager(any_client, consolidation=FOLD_SMALL)
    await fill(manager, room, 3)
    worker = ConsolidationWorker(manager, rooms=[room])
    await manager.drain()
    manager._room(room).last_used -= 120  # as if nobody had used it for two minutes

    await worker.run_once()

    assert worker.stats.checked == 1
    assert manager.stats()["rooms"] == 1  # it was resident, it stays resident
    assert manager.reap_stale(60) == 1  # and the visit did not make it look used


async def test_a_memory_only_worker_keeps_its_rooms(make_manager: MakeManager, room: str) -> None:
    manager = make_manager(None, consolidation=FOLD_SMALL)
    await fill(manager, room, 3)
    worker = ConsolidationWorker(manager)

    await worker.run_once()

    assert manager.get_history_message_count(room) == 3


# --------------------------------------------- 5: tool-only assistant turns in sessions


async def test_a_tool_calling_turn_without_content_round_trips_through_a_session(
    any_client: aioredis.Redis,
) -> None:
    store = SessionStore(any_client)
    session = await store.create_session("alice")
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": CALL},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 42."},
    ]
    await store.append_message(session, turns)

    loaded = await store.get_session("alice", session.session_id)

    assert loaded is not None
    assert loaded.messages == turns


@pytest.mark.parametrize(
    "message",
    [
        {"role": "user", "content": None},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": None, "tool_call_id": "c1"},
    ],
)
async def test_content_none_is_refused_on_every_other_shape(
    any_client: aioredis.Redis, message: dict[str, object]
) -> None:
    store = SessionStore(any_client)
    session = await store.create_session("alice")
    await store.append_message(session, {"role": "user", "content": "kept"})

    with pytest.raises(ValueError, match="content"):
        await store.append_message(session, message)

    loaded = await store.get_session("alice", session.session_id)
    assert loaded is not None and loaded.messages == [{"role": "user", "content": "kept"}]


# ------------------------------------------------ 11: the turn being answered survives


def conversation_of(first: str, middle: int, newest: str) -> list[dict[str, object]]:
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "You are a bot."},
        {"role": "user", "content": first},
    ]
    for index in range(middle):
        messages.append({"role": "assistant", "content": f"reply {index} " * 5})
    messages.append({"role": "user", "content": newest})
    return messages


def test_a_budget_that_fits_only_the_newest_user_turn_keeps_it() -> None:
    messages = conversation_of("the task, stated at length " * 20, 3, "and now?")
    budget = estimate_tokens(messages[0]) + estimate_tokens(messages[-1])

    fitted = fit_to_budget(messages, budget)

    assert fitted == [messages[0], messages[-1]]


def test_the_first_user_turn_is_kept_when_there_is_room_for_both() -> None:
    messages = conversation_of("the task", 3, "and now?")
    budget = sum(estimate_tokens(messages[i]) for i in (0, 1, -1))

    fitted = fit_to_budget(messages, budget)

    assert fitted == [messages[0], messages[1], messages[-1]]


def test_the_newest_user_turn_survives_behind_a_long_assistant_reply() -> None:
    messages = conversation_of("the task", 2, "and now?")
    messages.append({"role": "assistant", "content": "a very long answer " * 50})
    budget = estimate_tokens(messages[0]) + estimate_tokens(messages[-2])

    fitted = fit_to_budget(messages, budget)

    assert fitted == [messages[0], messages[-2]]


async def test_get_messages_async_with_a_tight_budget_ends_on_the_newest_user_turn(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    await manager.append_async(room, "assistant", "ok " * 20)
    newest = {"role": "user", "content": "[Message ID: 3] " + "the real question " * 20}
    await manager.append_async(room, "user", newest["content"])

    # Room for the newest turn, not for it and the first one.
    messages = await manager.get_messages_async(room, token_budget=estimate_tokens(newest) + 1)

    assert messages == [newest]


# ----------------------------------------- 13: prefixes with glob characters are names


async def test_a_prefix_with_glob_characters_hides_no_room(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str
) -> None:
    manager = make_manager(any_client, key_prefix="bot[eu]", consolidation=FOLD_SMALL)
    await fill(manager, room, 8)
    # A neighbour whose prefix the unescaped pattern would have matched instead.
    neighbour = make_manager(any_client, key_prefix="bote")
    await fill(neighbour, f"{room}-other", 1)
    await manager.drain()
    await neighbour.drain()

    worker = ConsolidationWorker(
        make_manager(any_client, key_prefix="bot[eu]", consolidation=FOLD_SMALL)
    )
    results = await worker.run_once()

    assert [result.room_id for result in results] == [room]
    target = RedisTarget(any_client, "test", cluster=False)
    assert await list_rooms(target, "bot[eu]") == [room]
    assert await list_rooms(target, "bote") == [f"{room}-other"]


# ------------------------------------------------------- 14: padded identity markers


@pytest.mark.parametrize("marker", ["[Message ID: 42 ]", "[Message ID:  42]", "[Message ID: 42]"])
async def test_tags_go_after_a_padded_marker(
    any_client: aioredis.Redis, make_manager: MakeManager, room: str, marker: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", f"{marker} hello")

    assert await manager.patch_reactions_async(room, 42, "👍 2")
    assert await manager.mark_deleted_async(room, "42", "2026-12-03T10:00:00Z")

    expected = f"{marker} [deleted at 2026-12-03T10:00:00Z] [Reactions: 👍 2] hello"
    other = make_manager(any_client)
    for reader in (manager, other):
        messages = await reader.get_messages_async(room)
        assert messages[-1]["content"] == expected
    # Clearing the reactions removes exactly the tag that was added.
    assert await manager.patch_reactions_async(room, 42, "")
    messages = await other.get_messages_async(room)
    assert messages[-1]["content"] == f"{marker} [deleted at 2026-12-03T10:00:00Z] hello"
