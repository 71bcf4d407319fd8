"""SPEC §30-31: reactions as events, counted exactly across workers and rendered into
the tag; events that arrive before their message, kept until it comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis_servers import RedisServer
from support import backend_client, window_key

import conversation._reactions
from conversation import (
    ConfigurationError,
    ConversationManager,
    InvalidMessage,
    RedisUnavailable,
)
from conversation._deferred import MAX_DEFERRED_PER_MESSAGE
from conversation._reactions import MAX_EMOJI_PER_MESSAGE
from conversation.testing import room_keys, wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
Workers = Callable[[], ConversationManager]
IMAGE = {"type": "image_url", "image_url": {"url": "https://cdn.example/cat.png"}}


@pytest.fixture(params=["memory", "real", "fake"])
async def workers(
    request: pytest.FixtureRequest, make_manager: Make, tmp_path: Path
) -> AsyncIterator[Workers]:
    """Managers of one deployment: memory-only (one manager, the only copy), or
    several workers sharing a real redis-server or fakeredis."""
    if request.param == "memory":
        only = make_manager(None)
        yield lambda: only
        return
    async with backend_client(request.param, tmp_path) as client:
        yield lambda: make_manager(client)


async def text_of(manager: ConversationManager, room: str, index: int = 0) -> object:
    await manager.ensure_fresh_from_redis(room)
    turns = [m for m in await manager.get_messages_async(room) if m["role"] != "system"]
    return turns[index]["content"]


async def test_counts_order_and_redelivery(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 7] hello")
    assert await bot.add_reaction_async(room, 7, "😂", "ann")
    assert await bot.add_reaction_async(room, "7", "👍", "bob")
    assert await bot.add_reaction_async(room, "7", "👍", "cy")
    # A redelivered gateway event never counts twice.
    assert await bot.add_reaction_async(room, "7", "👍", "cy")
    assert await text_of(bot, room) == "[Message ID: 7] [Reactions: 👍 2, 😂 1] hello"
    # Ties keep the order first seen: 😂 was first.
    assert await bot.remove_reaction_async(room, "7", "👍", "bob")
    assert await bot.remove_reaction_async(room, "7", "👍", "bob")
    assert await text_of(bot, room) == "[Message ID: 7] [Reactions: 😂 1, 👍 1] hello"
    assert await bot.remove_reaction_async(room, "7", "👍", "cy")
    assert await bot.remove_reaction_async(room, "7", "😂", "ann")
    assert await text_of(bot, room) == "[Message ID: 7] hello"
    # An emoji that comes back after it went counts as first seen anew.
    await bot.add_reaction_async(room, "7", "😂", "ann")
    await bot.add_reaction_async(room, "7", "🎉", "ann")
    assert await text_of(bot, room) == "[Message ID: 7] [Reactions: 😂 1, 🎉 1] hello"


async def test_every_worker_counts_into_one_tag(workers: Workers, room: str) -> None:
    a, b, c = workers(), workers(), workers()
    await a.append_async(room, "user", "[Message ID: 1] vote")
    for manager in (b, c):
        await manager.ensure_fresh_from_redis(room)
    users = [f"u{i}" for i in range(30)]
    # Every worker receives every event (redelivery across workers), concurrently.
    await asyncio.gather(
        *(m.add_reaction_async(room, "1", "👍", user) for m in (a, b, c) for user in users),
        *(m.add_reaction_async(room, "1", "👎", user) for m in (a, b) for user in users[:4]),
    )
    await asyncio.gather(*(m.remove_reaction_async(room, "1", "👍", "u0") for m in (c, a)))
    for manager in (a, b, c):
        assert await text_of(manager, room) == "[Message ID: 1] [Reactions: 👍 29, 👎 4] vote"


async def test_sync_forms_persist_in_the_background(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 3] hi")
    assert bot.add_reaction(room, "3", "🔥", "ann")
    assert bot.add_reaction(room, "3", "🔥", "bob")
    assert bot.remove_reaction(room, "3", "🔥", "ann")
    await bot.drain()
    other = workers()
    assert await text_of(other, room) == "[Message ID: 3] [Reactions: 🔥 1] hi"


async def test_unknown_message_returns_false(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    assert not await bot.add_reaction_async(room, "2", "👍", "ann")
    assert not bot.add_reaction(room, "2", "👍", "ann")
    assert not await bot.clear_reactions_async(room, "2")
    assert await text_of(bot, room) == "[Message ID: 1] hi"


async def test_custom_emoji_render_by_name(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 5] gg")
    await bot.add_reaction_async(room, "5", "<:party_parrot:1122334455>", "ann")
    await bot.add_reaction_async(room, "5", "<a:spin:99>", "ann")
    await bot.add_reaction_async(room, "5", "<a:spin:99>", "bob")
    assert await text_of(bot, room) == "[Message ID: 5] [Reactions: :spin: 2, :party_parrot: 1] gg"


async def test_a_renamed_custom_emoji_is_still_one_emoji(workers: Workers, room: str) -> None:
    """Discord names a custom emoji by its id: a server admin may rename it (or a
    deleted one comes without a name) between a user's add and remove. The remove
    must still find the reaction, or the count stays up forever."""
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 5] gg")
    await bot.add_reaction_async(room, "5", "<:party:42>", "ann")
    await bot.add_reaction_async(room, "5", "<:fiesta:42>", "bob")  # renamed meanwhile
    await bot.add_reaction_async(room, "5", "<:fiesta:43>", "bob")  # another emoji
    assert await text_of(bot, room) == "[Message ID: 5] [Reactions: :party: 2, :fiesta: 1] gg"
    assert await bot.remove_reaction_async(room, "5", "<:fiesta:42>", "ann")
    assert await bot.remove_reaction_async(room, "5", "<a:emoji:42>", "bob")
    assert await text_of(bot, room) == "[Message ID: 5] [Reactions: :fiesta: 1] gg"
    assert await bot.clear_reactions_async(room, "5", "<:renamed:43>")
    assert await text_of(bot, room) == "[Message ID: 5] gg"


@pytest.mark.parametrize(
    ("emoji", "user", "field"),
    [
        ("👍]", "ann", "emoji"),
        ("[👍", "ann", "emoji"),
        ("👍, 😂 99", "ann", "emoji"),
        ("👍\n[Message ID: 1]", "ann", "emoji"),
        ('"', "ann", "emoji"),
        ("\u202e👍", "ann", "emoji"),
        ("<:bad name:1>", "ann", "emoji"),
        ("x" * 101, "ann", "emoji"),
        ("", "ann", "emoji"),
        (None, "ann", "emoji"),
        ("👍", "", "user_id"),
        ("👍", "a\nb", "user_id"),
        ("👍", "u" * 257, "user_id"),
        ("👍", True, "user_id"),
        ("👍", 1.5, "user_id"),
    ],
)
async def test_hostile_emoji_and_users_are_refused_and_nothing_changes(
    workers: Workers, room: str, emoji: object, user: object, field: str
) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    await bot.add_reaction_async(room, "1", "👍", "ann")
    before = await bot.get_messages_async(room)
    with pytest.raises(InvalidMessage) as caught:
        await bot.add_reaction_async(room, "1", emoji, user)  # type: ignore[arg-type]
    assert caught.value.field == field
    with pytest.raises(InvalidMessage):
        bot.remove_reaction(room, "1", emoji, user)  # type: ignore[arg-type]
    await bot.add_reaction_async(room, "1", "👍", "bob")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 👍 2] hi"
    assert before[-1]["content"] == "[Message ID: 1] [Reactions: 👍 1] hi"


async def test_too_many_distinct_emoji_is_refused_whole(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    for i in range(MAX_EMOJI_PER_MESSAGE):
        await bot.add_reaction_async(room, "1", f"e{i}", "ann")
    full = await text_of(bot, room)
    with pytest.raises(InvalidMessage, match="distinct emoji"):
        await bot.add_reaction_async(room, "1", "one_more", "ann")
    assert await text_of(workers(), room) == full
    # Adding to an emoji already there still counts.
    await bot.add_reaction_async(room, "1", "e5", "bob")
    assert "e5 2, e0 1" in str(await text_of(bot, room))


async def test_a_sync_reaction_refused_in_the_background_is_not_silent(
    workers: Workers, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sync form cannot know the room's count before Redis answers: when Redis
    refuses the event (the message is full) nobody awaits it, so it must be logged
    and counted, never dropped without a trace. Memory-only, it raises at once."""
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    for i in range(MAX_EMOJI_PER_MESSAGE):
        await bot.add_reaction_async(room, "1", f"e{i}", "ann")
    full = await text_of(bot, room)
    if bot._redis is None:
        with pytest.raises(InvalidMessage, match="distinct emoji"):
            bot.add_reaction(room, "1", "one_more", "ann")
    else:
        assert bot.add_reaction(room, "1", "one_more", "ann")
        await bot.drain()
        assert bot.stats()["writes_refused"] == 1
        assert any(
            room in r.getMessage() and "distinct emoji" in r.getMessage() for r in caplog.records
        )
    assert await text_of(workers(), room) == full
    assert await text_of(bot, room) == full


async def test_patch_reactions_forgets_tracked_reactions(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    await bot.add_reaction_async(room, "1", "👍", "ann")
    await bot.add_reaction_async(room, "1", "👍", "bob")
    assert await bot.patch_reactions_async(room, "1", "🔥 9")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 🔥 9] hi"
    # Counting starts again from the events that follow; the summary is replaced.
    await workers().add_reaction_async(room, "1", "👍", "ann")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 👍 1] hi"


async def test_clear_reactions_all_or_one_emoji(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    for emoji, user in [("👍", "a"), ("👍", "b"), ("😂", "a"), ("🎉", "c")]:
        await bot.add_reaction_async(room, "1", emoji, user)
    assert await bot.clear_reactions_async(room, "1", "👍")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 😂 1, 🎉 1] hi"
    assert await bot.clear_reactions_async(room, "1")
    assert await text_of(bot, room) == "[Message ID: 1] hi"
    await bot.add_reaction_async(room, "1", "👍", "a")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 👍 1] hi"


async def test_edits_deletes_and_media_keep_the_count(workers: Workers, room: str) -> None:
    bot, other = workers(), workers()
    await bot.append_async(
        room, "user", [{"type": "text", "text": "[Message ID: 9] look"}, IMAGE], name="ann"
    )
    await bot.add_reaction_async(room, "9", "👀", "bob")
    # A text-only edit keeps the image and the tag; the next reaction from another
    # worker (which saw neither) still counts from the stored state.
    assert await bot.update_message_async(room, "9", "[Message ID: 9] look again")
    assert await other.add_reaction_async(room, "9", "👀", "cy")
    assert await bot.mark_deleted_async(room, "9", "2026-01-01T00:00:00Z")
    assert await other.add_reaction_async(room, "9", "😮", "bob")
    assert await text_of(bot, room) == [
        {
            "type": "text",
            "text": "[Message ID: 9] [deleted at 2026-01-01T00:00:00Z] "
            "[Reactions: 👀 2, 😮 1] look again",
        },
        IMAGE,
    ]


async def test_entry_without_marker_gets_the_tag_first(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "assistant", "done", message_id="b1")
    await bot.add_reaction_async(room, "b1", "✅", "ann")
    assert await text_of(bot, room) == "[Reactions: ✅ 1] done"
    await bot.remove_reaction_async(room, "b1", "✅", "ann")
    assert await text_of(bot, room) == "done"


async def test_a_typed_marker_cannot_steal_reactions(workers: Workers, room: str) -> None:
    bot = workers()
    await bot.append_async(room, "user", "[Message ID: 1] real")
    await bot.append_async(room, "user", "[Message ID: 2] fake [Message ID: 1]")
    await bot.add_reaction_async(room, "1", "👍", "ann")
    messages = await bot.get_messages_async(room)
    assert messages[-2]["content"] == "[Message ID: 1] [Reactions: 👍 1] real"
    assert messages[-1]["content"] == "[Message ID: 2] fake [Message ID: 1]"


# ----------------------------------------------------------------- Redis only


async def test_one_round_trip_and_one_entry_per_event(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    bot, other = make_manager(redis_client), make_manager(redis_client)
    filler = "x" * 2000
    for i in range(100):
        await bot.append_async(room, "user", f"[Message ID: {i}] {filler}")
    await other.ensure_fresh_from_redis(room)
    row = len((await redis_client.lindex(window_key(room), 50)) or b"")
    await bot.add_reaction_async(room, "50", "👍", "warm-up")  # loads the scripts
    before = bot.stats()
    await bot.add_reaction_async(room, "50", "👍", "ann")
    after = bot.stats()
    assert after["round_trips"] - before["round_trips"] == 1
    # Up: the row cut open (about one entry); down: the re-rendered row.
    assert after["bytes_sent"] - before["bytes_sent"] < 2 * row
    assert after["bytes_received"] - before["bytes_received"] < 1.1 * row
    # The other worker catches up with that one row, not the window.
    before = other.stats()
    await other.ensure_fresh_from_redis(room)
    after = other.stats()
    assert after["bytes_received"] - before["bytes_received"] < 1.1 * row
    assert after["reloads"] == before["reloads"]


async def test_reactions_live_with_the_room(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    bot = make_manager(redis_client, ttl_seconds=600)
    await bot.append_async(room, "user", "[Message ID: 1] hi")
    await bot.add_reaction_async(room, "1", "👍", "ann")
    key = room_keys(room).reactions
    assert 0 < await redis_client.pttl(key) <= 600_000
    await bot.clear_async(room)
    assert not await redis_client.exists(key)
    await bot.append_async(room, "user", "[Message ID: 1] again")
    await bot.add_reaction_async(room, "1", "👍", "ann")
    assert await text_of(bot, room) == "[Message ID: 1] [Reactions: 👍 1] again"


async def test_memory_and_redis_render_the_same_rows(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    memory, shared = make_manager(None), make_manager(redis_client)
    events = [
        ("+", "1", "👍", "a"),
        ("+", "1", "<:x:1>", "b"),
        ("+", "2", "👨‍👩‍👧", "a"),
        ("+", "1", "<:x:1>", "a"),
        ("-", "1", "👍", "a"),
        ("+", "1", "👍", "c"),
        ("+", "2", "🏳️‍🌈", "b"),
    ]
    for manager in (memory, shared):
        await manager.append_async(room, "user", "[Message ID: 1] one")
        await manager.append_async(room, "user", "two", message_id="2", name="bo")
        for action, message, emoji, user in events:
            if action == "+":
                await manager.add_reaction_async(room, message, emoji, user)
            else:
                await manager.remove_reaction_async(room, message, emoji, user)
    assert await memory.get_messages_async(room) == await shared.get_messages_async(room)


# ------------------------------------------- SPEC §31: events before their message


async def test_events_before_their_message_apply_in_arrival_order(
    workers: Workers, room: str
) -> None:
    gateway, inference = workers(), workers()
    await inference.append_async(room, "user", "[Message ID: 1] earlier")
    assert not await gateway.update_message_async(room, "2", "[Message ID: 2] first edit")
    assert not await gateway.add_reaction_async(room, "2", "👍", "ann")
    assert not await gateway.update_message_async(room, "2", "[Message ID: 2] second edit")
    assert not await gateway.add_reaction_async(room, "2", "👍", "bob")
    assert not await gateway.add_reaction_async(room, "2", "👍", "bob")  # redelivered
    assert not await gateway.mark_deleted_async(room, "2", "2026-01-02T03:04:05Z")
    assert gateway.stats()["deferred_events"] == 6
    await inference.append_async(
        room, "user", [{"type": "text", "text": "[Message ID: 2] hi"}, IMAGE]
    )
    expected = [
        {
            "type": "text",
            "text": "[Message ID: 2] [deleted at 2026-01-02T03:04:05Z] [Reactions: 👍 2] "
            "second edit",
        },
        IMAGE,
    ]
    for manager in (inference, gateway, workers()):
        assert await text_of(manager, room, 1) == expected
    assert inference.stats()["deferred_applied"] == 6
    # The reactions that waited are tracked: the next event counts on from them.
    assert await gateway.add_reaction_async(room, "2", "👍", "cy")
    assert "[Reactions: 👍 3]" in str(await text_of(inference, room, 1))


async def test_sync_forms_keep_events_before_their_message(workers: Workers, room: str) -> None:
    """The sync forms answer False at once and keep the event in the background
    (from the manager's loop or from a plain thread), in arrival order; drain
    waits until it is kept, and whichever worker appends the message applies it."""
    gateway, inference = workers(), workers()
    await inference.append_async(room, "user", "[Message ID: 1] earlier")
    assert not gateway.update_message(room, "2", "[Message ID: 2] first edit")
    assert not await asyncio.to_thread(gateway.add_reaction, room, "2", "👍", "ann")
    assert not gateway.update_message(room, "2", "[Message ID: 2] second edit")
    assert not await asyncio.to_thread(gateway.mark_deleted, room, "2", "2026-01-02T03:04:05Z")
    await gateway.drain()
    assert gateway.stats()["deferred_events"] == 4
    await inference.append_async(room, "user", "[Message ID: 2] hi")
    expected = "[Message ID: 2] [deleted at 2026-01-02T03:04:05Z] [Reactions: 👍 1] second edit"
    for manager in (inference, gateway, workers()):
        assert await text_of(manager, room, 1) == expected
    assert inference.stats()["deferred_applied"] == 4


# Memory-only keeps the event synchronously: nothing can fail later there.
@pytest.mark.parametrize("workers", ["real", "fake"], indirect=True)
async def test_a_sync_event_that_cannot_be_kept_is_logged_and_counted(
    workers: Workers, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    bot = workers()
    assert bot._redis is not None
    await bot.append_async(room, "user", "[Message ID: 1] earlier")
    await bot._redis.set(room_keys(room).deferred, b"not a hash")
    assert not bot.update_message(room, "2", "[Message ID: 2] edited")
    await bot.drain()
    assert bot.stats()["deferred_failures"] == 1
    assert bot.stats()["deferred_events"] == 0
    assert any(room in r.getMessage() and "'2'" in r.getMessage() for r in caplog.records)


def test_a_sync_event_its_loop_stopped_is_counted_as_lost(
    redis_server: RedisServer, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``asyncio.run`` per request: the loop ends (cancelling its tasks) before the
    background task kept the event. Nothing can keep it now, but it is not silent."""
    client = aioredis.Redis(port=redis_server.port)
    manager = ConversationManager(None, redis=client)

    async def request() -> None:
        await manager.append_async(room, "user", "[Message ID: 1] earlier")
        assert not manager.update_message(room, "2", "[Message ID: 2] edited")

    async def next_request() -> None:
        assert manager.stats()["deferred_failures"] == 1
        assert manager.stats()["deferred_events"] == 0
        await manager.aclose()
        await client.aclose()

    asyncio.run(request())
    asyncio.run(next_request())
    assert any(room in r.getMessage() and "'2'" in r.getMessage() for r in caplog.records)


async def test_a_patch_and_reactions_that_waited_keep_their_order(
    workers: Workers, room: str
) -> None:
    bot = workers()
    await bot.add_reaction_async(room, "a", "👍", "ann")
    await bot.patch_reactions_async(room, "a", "🔥 9")
    await bot.patch_reactions_async(room, "b", "🔥 9")
    await bot.add_reaction_async(room, "b", "😂", "ann")
    await bot.append_async(room, "user", "[Message ID: a] A")
    await bot.append_async(room, "user", "[Message ID: b] B")
    assert await text_of(bot, room, 0) == "[Message ID: a] [Reactions: 🔥 9] A"
    assert await text_of(bot, room, 1) == "[Message ID: b] [Reactions: 😂 1] B"
    # The patch came last on a: nothing is tracked there, counting starts again.
    await bot.add_reaction_async(room, "a", "👍", "bob")
    assert await text_of(bot, room, 0) == "[Message ID: a] [Reactions: 👍 1] A"


async def test_queued_appends_take_their_waiting_events(workers: Workers, room: str) -> None:
    bot, gateway = workers(), workers()
    assert not await gateway.update_message_async(room, "m3", "[Message ID: m3] edited")
    for i in range(6):
        bot.append(room, "user", f"[Message ID: m{i}] turn {i}")
    await bot.drain()
    texts = [await text_of(gateway, room, i) for i in range(6)]
    assert texts == [
        "[Message ID: m3] edited" if i == 3 else f"[Message ID: m{i}] turn {i}" for i in range(6)
    ]


async def test_edits_racing_their_message_are_never_lost(workers: Workers, room: str) -> None:
    inference, agents = workers(), workers()
    for i in range(40):
        append = inference.append_async(room, "user", f"[Message ID: r{i}] original")
        edit = agents.update_message_async(room, f"r{i}", f"[Message ID: r{i}] edited")
        # Either may start first: the edit's look may come just before the append.
        await asyncio.gather(*((append, edit) if i % 2 else (edit, append)))
    for manager in (inference, agents):
        await manager.ensure_fresh_from_redis(room)
        assert [m["content"] for m in manager.get_messages(room)] == [
            f"[Message ID: r{i}] edited" for i in range(40)
        ]


async def test_events_kept_are_bounded_per_message(workers: Workers, room: str) -> None:
    bot = workers()
    for i in range(MAX_DEFERRED_PER_MESSAGE + 3):
        assert not await bot.add_reaction_async(room, "later", "👍", f"u{i}")
    stats = bot.stats()
    assert (stats["deferred_events"], stats["deferred_refused"]) == (MAX_DEFERRED_PER_MESSAGE, 3)
    await bot.append_async(room, "user", "[Message ID: later] hi")
    assert (
        await text_of(bot, room)
        == f"[Message ID: later] [Reactions: 👍 {MAX_DEFERRED_PER_MESSAGE}] hi"
    )


async def test_events_for_a_message_that_never_comes_expire(
    workers: Workers, make_manager: Make, room: str
) -> None:
    client = workers()._redis  # the deployment's client (None: memory-only)
    bot = make_manager(client, defer_unknown_events_seconds=0.2)
    kept_at = time.time()
    assert not await bot.update_message_async(room, "gone", "[Message ID: gone] edited")
    if client is not None:
        key = room_keys(room).deferred
        assert 0 < await client.pttl(key) <= 200
        await wait_until(lambda: _gone(client, key), what="the deferred events' expiry")
    else:
        await wait_until(lambda: time.time() > kept_at + 0.25, what="the event's expiry")
    await bot.append_async(room, "user", "[Message ID: gone] original")
    assert await text_of(bot, room) == "[Message ID: gone] original"
    assert bot.stats()["deferred_applied"] == 0


async def _gone(client: aioredis.Redis, key: str) -> bool:
    return not await client.exists(key)


async def test_deferring_can_be_turned_off(workers: Workers, make_manager: Make, room: str) -> None:
    client = workers()._redis
    bot = make_manager(client, defer_unknown_events_seconds=0)
    assert not await bot.update_message_async(room, "x", "[Message ID: x] edited")
    assert not await bot.add_reaction_async(room, "x", "👍", "ann")
    await bot.append_async(room, "user", "[Message ID: x] original")
    assert await text_of(bot, room) == "[Message ID: x] original"
    assert bot.stats()["deferred_events"] == 0
    with pytest.raises(ConfigurationError, match="defer_unknown_events_seconds"):
        make_manager(client, defer_unknown_events_seconds=-1)


async def test_clear_drops_the_events_that_wait(workers: Workers, room: str) -> None:
    bot = workers()
    assert not await bot.update_message_async(room, "x", "[Message ID: x] edited")
    await bot.clear_async(room)
    await bot.append_async(room, "user", "[Message ID: x] original")
    assert await text_of(bot, room) == "[Message ID: x] original"


async def test_an_append_between_the_look_and_the_keep_is_not_missed(
    any_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message lands after the gateway worker looked for it and before its event
    is kept: the keep must notice, and the edit apply now."""
    inference, gateway = make_manager(any_client), make_manager(any_client)
    store = gateway._store
    assert store is not None
    real_defer = store.defer

    async def defer_after_the_append(*args: Any, **kwargs: Any) -> Any:
        await inference.append_async(room, "user", "[Message ID: late] original")
        return await real_defer(*args, **kwargs)

    monkeypatch.setattr(store, "defer", defer_after_the_append)
    assert await gateway.update_message_async(room, "late", "[Message ID: late] edited")
    assert gateway.stats()["deferred_events"] == 0
    assert await text_of(inference, room) == "[Message ID: late] edited"


async def test_an_event_waits_for_a_message_that_comes_by_backfill(
    workers: Workers, room: str
) -> None:
    """The message an edit and a reaction wait for arrives as older platform history
    (a worker backfilling after a restart), not as an append: they apply to it."""
    gateway, restarted = workers(), workers()
    await restarted.append_async(room, "user", "[Message ID: new] newest")
    assert not await gateway.update_message_async(room, "old", "[Message ID: old] edited")
    assert not await gateway.add_reaction_async(room, "old", "👍", "ann")
    await restarted.backfill_async(
        room, [{"role": "user", "content": "[Message ID: old] original"}]
    )
    for manager in (restarted, gateway, workers()):
        assert await text_of(manager, room, 0) == "[Message ID: old] [Reactions: 👍 1] edited"
        assert await text_of(manager, room, 1) == "[Message ID: new] newest"
    assert restarted.stats()["deferred_applied"] == 2
    # The reaction that waited is tracked: the next one counts on from it.
    assert await gateway.add_reaction_async(room, "old", "👍", "bob")
    assert await text_of(restarted, room, 0) == "[Message ID: old] [Reactions: 👍 2] edited"


async def test_a_long_window_never_forgets_the_reactions_it_shows(
    workers: Workers, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_history`` has no upper bound: with a window longer than the messages a
    room tracks reactions for, a reaction on each shown message must not push the
    oldest one's out, or its next event would count from nothing. (The floor is
    lowered here so the test stays small; with the default 4096 a 4400-row window
    lost them.)"""
    monkeypatch.setattr(conversation._reactions, "MAX_TRACKED_MESSAGES", 16)
    bot = workers()  # max_history=100
    await bot.append_many_async(
        room, [{"role": "user", "content": f"[Message ID: {i}] m{i}"} for i in range(100)]
    )
    for i in range(100):
        assert await bot.add_reaction_async(room, str(i), "👍", "ann")
    assert await bot.add_reaction_async(room, "0", "👍", "bob")
    assert await text_of(bot, room, 0) == "[Message ID: 0] [Reactions: 👍 2] m0"
    # What left the window long ago is still forgotten: the state stays bounded.
    for i in range(100, 400):
        await bot.append_async(room, "user", f"[Message ID: {i}] m{i}")
        assert await bot.add_reaction_async(room, str(i), "👍", "ann")
    assert await text_of(bot, room, 0) == "[Message ID: 300] [Reactions: 👍 1] m300"
    client = bot._redis
    if client is not None:
        assert 200 <= await client.hlen(room_keys(room).reactions) <= 200 + 13


async def test_an_event_for_a_room_never_written_leaves_no_key_forever(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """Platforms send events for channels the bot never recorded (Discord sends
    reactions in every channel it can see): keeping one must not leave a key that
    outlives ttl_seconds."""
    bot = make_manager(redis_client, ttl_seconds=60)
    assert not await bot.add_reaction_async(room, "1", "👍", "ann")
    assert bot.stats()["deferred_events"] == 1
    keys = [key for key in room_keys(room).as_list() if await redis_client.exists(key)]
    assert keys, "the event is kept"
    for key in keys:
        assert 0 < await redis_client.pttl(key) <= 600_000, key


async def test_keeping_an_event_survives_a_dropped_connection(
    redis_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart, a failover or CLIENT KILL closes pooled connections: keeping the
    event takes another one, as a catch-up does. If Redis stays unreachable the
    caller gets RedisUnavailable, as from a catch-up, never a raw client error."""
    gateway = make_manager(redis_client)
    store = gateway._store
    assert store is not None
    real_defer = store.defer
    kills = 0

    async def defer_after_a_kill(*args: Any, **kwargs: Any) -> Any:
        nonlocal kills
        if kills == 0:
            kills += 1
            async with aioredis.Redis(
                port=redis_client.connection_pool.connection_kwargs["port"]
            ) as admin:
                await admin.client_kill_filter(_type="normal", skipme=True)
        return await real_defer(*args, **kwargs)

    monkeypatch.setattr(store, "defer", defer_after_a_kill)
    assert not await gateway.update_message_async(room, "x", "[Message ID: x] edited")
    assert gateway.stats()["deferred_events"] == 1

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(store, "defer", unreachable)
    with pytest.raises(RedisUnavailable, match=room):
        await gateway.add_reaction_async(room, "y", "👍", "ann")
