"""SPEC §2-§3 behaviour of ConversationManager, on a real redis-server and on fakeredis."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from support import window_key

from conversation import (
    ConfigurationError,
    ConversationManager,
    InvalidMessage,
    InvalidRoomId,
    PersistError,
)

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


async def redis_rows(client: aioredis.Redis, room: str) -> list[bytes]:
    return list(await client.lrange(window_key(room), 0, -1))  # type: ignore[arg-type]


async def test_append_and_read_back_only_openai_fields(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi", name="ann")
    await manager.append_async(
        room,
        "assistant",
        "",
        tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    )
    await manager.append_async(room, "tool", "42", tool_call_id="c1")
    other = make_manager(any_client)
    messages = await other.get_messages_async(room)
    assert messages == [
        {"role": "user", "content": "[Message ID: 1] hi", "name": "ann"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert other.last_history_role(room) == "tool"
    assert other.get_history_message_count(room) == 3


async def test_callers_may_mutate_what_they_get(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", [{"type": "text", "text": "[Message ID: 1] a"}, IMAGE])
    got = await manager.get_messages_async(room)
    got[0]["content"][0]["text"] = "changed"
    got[0]["content"].append({"type": "text", "text": "extra"})
    got.clear()
    again = manager.get_messages(room)
    assert again[0]["content"] == [{"type": "text", "text": "[Message ID: 1] a"}, IMAGE]


async def test_forged_marker_cannot_redirect_an_edit(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 42] the real message")
    await manager.append_async(room, "user", "[Message ID: 43] [Message ID: 42] forged by a user")
    assert await manager.update_message_async(room, 42, "[Message ID: 42] edited")
    other = make_manager(any_client)
    contents = [m["content"] for m in await other.get_messages_async(room)]
    assert contents == [
        "[Message ID: 42] edited",
        "[Message ID: 43] [Message ID: 42] forged by a user",
    ]


async def test_identity_survives_an_edit_without_the_marker(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 9] first")
    assert await manager.update_message_async(room, 9, "no marker any more")
    assert await manager.mark_deleted_async(room, 9, "2026-11-22T00:00:00Z")
    other = make_manager(any_client)
    assert [m["content"] for m in await other.get_messages_async(room)] == [
        "[deleted at 2026-11-22T00:00:00Z] no marker any more"
    ]


async def test_text_only_edit_of_image_post_keeps_image_for_every_worker(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer, reader = make_manager(any_client), make_manager(any_client)
    await writer.append_async(
        room, "user", [{"type": "text", "text": "[Message ID: 5] a cat"}, IMAGE]
    )
    assert await reader.update_message_async(room, "5", "[Message ID: 5] a fat cat")
    await writer.ensure_fresh_from_redis(room)
    expected = [{"type": "text", "text": "[Message ID: 5] a fat cat"}, IMAGE]
    assert writer.get_messages(room)[0]["content"] == expected


async def test_delete_and_reactions_markers(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    assert await manager.patch_reactions_async(room, 1, "👍x2")
    assert await manager.mark_deleted_async(room, 1, "T1")
    assert await manager.mark_deleted_async(room, 1, "T2")
    assert await manager.patch_reactions_async(room, 1, "👍x3")
    assert not await manager.patch_reactions_async(room, 2, "nope")
    other = make_manager(any_client)
    assert (await other.get_messages_async(room))[0]["content"] == (
        "[Message ID: 1] [deleted at T1] [Reactions: 👍x3] hi"
    )


async def test_edits_of_a_cold_room_find_the_entry_after_catching_up(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    await make_manager(any_client).append_async(room, "user", "[Message ID: 1] hi")
    cold = make_manager(any_client)
    assert not cold.patch_reactions(room, 1, "x")  # sync form: memory only
    assert await cold.patch_reactions_async(room, 1, "x")


async def test_trimming_never_orphans_tool_results(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, max_history=4)
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        for i in range(2)
    ]
    await manager.append_async(room, "user", "q")
    await manager.append_async(room, "assistant", "", tool_calls=calls)
    await manager.append_async(room, "tool", "r0", tool_call_id="c0")
    await manager.append_async(room, "tool", "r1", tool_call_id="c1")
    # One more turn pushes the user out; the front would then be the assistant
    # call with both results, which is fine.
    await manager.append_async(room, "assistant", "done")
    assert [m["role"] for m in manager.get_messages(room)] == [
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    # Next turn drops the assistant call: its results must go with it.
    await manager.append_async(room, "user", "next")
    assert [m["role"] for m in manager.get_messages(room)] == ["assistant", "user"]
    other = make_manager(any_client, max_history=4)
    assert [m["content"] for m in await other.get_messages_async(room)] == ["done", "next"]
    assert len(await redis_rows(any_client, room)) == 2


async def test_window_limit_in_memory_and_redis(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, max_history=5)
    for i in range(12):
        manager.append(room, "user", f"[Message ID: {i}] m{i}")
    await manager.drain()
    assert [m["content"][-3:] for m in manager.get_messages(room)] == [
        " m7",
        " m8",
        " m9",
        "m10",
        "m11",
    ]
    assert len(await redis_rows(any_client, room)) == 5


async def test_channel_limit_clamps_trims_and_flags_rebackfill(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, max_history=100)
    for i in range(80):
        manager.append(room, "user", f"m{i}")
    assert manager.set_channel_limit(room, 10) == 50  # clamped up to the floor
    assert manager.get_history_message_count(room) == 50
    assert not manager.is_rebackfill_requested(room)
    await manager.drain()
    assert len(await redis_rows(any_client, room)) == 50
    assert manager.set_channel_limit(room, 5000) == 1000
    assert manager.is_rebackfill_requested(room)
    await manager.drain()
    other = make_manager(any_client)
    await other.ensure_fresh_from_redis(room)
    assert other.get_channel_limit(room) == 1000
    assert other.is_rebackfill_requested(room)
    other.discard_rebackfill_request(room)
    await other.drain()
    await manager.ensure_fresh_from_redis(room)
    assert not manager.is_rebackfill_requested(room)
    with pytest.raises(TypeError):
        manager.set_channel_limit(room, "100")  # type: ignore[arg-type]


async def test_backfill_prepends_older_history_and_keeps_new_turns(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 3] three")
    manager.set_channel_limit(room, 200)
    older = [{"role": "user", "content": f"[Message ID: {i}] old {i}"} for i in (1, 2, 3)]
    other = make_manager(any_client)
    await other.append_async(room, "assistant", "meanwhile")
    await manager.backfill_async(room, older)
    reader = make_manager(any_client)
    contents = [m["content"] for m in await reader.get_messages_async(room)]
    assert contents == [
        "[Message ID: 1] old 1",
        "[Message ID: 2] old 2",
        "[Message ID: 3] three",
        "meanwhile",
    ]
    assert not reader.is_rebackfill_requested(room)


async def test_clear_reaches_every_worker_and_version_never_goes_back(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a, b = make_manager(any_client), make_manager(any_client)
    await a.append_async(room, "user", "one")
    await b.get_messages_async(room)
    before = int(await any_client.hget(window_key(room) + ":meta", "version"))  # type: ignore[arg-type]
    await a.clear_async(room)
    after = int(await any_client.hget(window_key(room) + ":meta", "version"))  # type: ignore[arg-type]
    assert after > before
    assert b.get_messages(room)  # b has not synced yet
    assert await b.get_messages_async(room) == []
    await b.append_async(room, "user", "two")
    assert [m["content"] for m in await a.get_messages_async(room)] == ["two"]


async def test_remote_reset_is_treated_as_reset(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a, b = make_manager(any_client), make_manager(any_client)
    for i in range(3):
        await a.append_async(room, "user", f"old {i}")
    await b.get_messages_async(room)
    await any_client.flushall()
    # Same number of writes after the flush: a version-only check would be fooled.
    for i in range(3):
        await a.append_async(room, "user", f"new {i}")
    assert [m["content"] for m in await b.get_messages_async(room)] == ["new 0", "new 1", "new 2"]
    await any_client.flushall()
    assert await b.get_messages_async(room) == []


async def test_ttl_is_set_and_refreshed_on_writes(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, ttl_seconds=100)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    for suffix in ("", ":meta", ":idem"):
        assert 0 < await any_client.pttl(window_key(room) + suffix) <= 100_000
    await any_client.pexpire(window_key(room), 5000)
    await any_client.pexpire(window_key(room) + ":meta", 5000)
    await manager.patch_reactions_async(room, 1, "x")
    assert await any_client.pttl(window_key(room)) > 50_000
    assert await any_client.pttl(window_key(room) + ":log") > 50_000


async def test_keys_made_between_refreshes_get_the_ttl(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """Writes refresh TTLs only once a quarter of it went by, so a key a write makes
    in between (the first edit's log, the first reaction, a set evicted alone) gets
    its TTL from that write: no key of a room outlives it."""
    manager = make_manager(any_client, ttl_seconds=100)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    await manager.append_async(room, "user", "[Message ID: 2] there")
    await any_client.delete(window_key(room) + ":idem")
    await manager.update_message_async(room, 1, "[Message ID: 1] hello")
    await manager.patch_reactions_async(room, 2, "x 1")
    await manager.append_async(room, "user", "[Message ID: 3] again")
    for suffix in ("", ":meta", ":log", ":idem"):
        assert 0 < await any_client.pttl(window_key(room) + suffix) <= 100_000, suffix


async def test_reads_do_not_refresh_ttl_and_reap_leaves_redis_alone(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, ttl_seconds=100)
    await manager.append_async(room, "user", "hi")
    await any_client.pexpire(window_key(room), 5000)
    await manager.get_messages_async(room)
    assert await any_client.pttl(window_key(room)) <= 5000
    assert manager.reap_stale(max_idle_seconds=0) == 1
    assert manager.stats()["rooms"] == 0
    assert len(await redis_rows(any_client, room)) == 1
    assert [m["content"] for m in await manager.get_messages_async(room)] == ["hi"]


async def test_corrupt_rows_are_skipped_and_counted(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(any_client)
    await writer.append_async(room, "user", "[Message ID: 1] one")
    await any_client.rpush(window_key(room), b"{not json", b'{"message_id":null,"role":"x"}')
    await writer.append_async(room, "user", "[Message ID: 2] two")
    reader = make_manager(any_client)
    assert [m["content"] for m in await reader.get_messages_async(room)] == [
        "[Message ID: 1] one",
        "[Message ID: 2] two",
    ]
    assert reader.stats()["corrupt_rows"] == 2
    assert await reader.patch_reactions_async(room, 2, "ok")
    await writer.ensure_fresh_from_redis(room)
    assert writer.get_messages(room)[-1]["content"] == "[Message ID: 2] [Reactions: ok] two"


async def test_bad_input_changes_nothing(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, max_entry_bytes=1000)
    await manager.append_async(room, "user", "[Message ID: 1] keep me")
    with pytest.raises(InvalidRoomId, match="control characters"):
        manager.append("evil\nroom", "user", "x")
    with pytest.raises(InvalidRoomId, match="hash tag"):
        await manager.append_async("a}{b", "user", "x")
    with pytest.raises(InvalidMessage, match="role"):
        manager.append(room, "hacker", "x")
    with pytest.raises(InvalidMessage, match="serialised"):
        manager.append(room, "user", [{"type": "text", "text": {1, 2}}])
    with pytest.raises(InvalidMessage, match="limit is 1000"):
        manager.append(room, "user", "x" * 2000)
    with pytest.raises(InvalidMessage, match="limit is 1000"):
        manager.update_message(room, 1, "y" * 2000)
    with pytest.raises(InvalidMessage, match="reactions_str"):
        manager.patch_reactions(room, 1, None)  # type: ignore[arg-type]
    await manager.drain()
    assert [m["content"] for m in manager.get_messages(room)] == ["[Message ID: 1] keep me"]
    assert await redis_rows(any_client, room) == [
        b'{"message_id":"1","role":"user","content":"[Message ID: 1] keep me"}'
    ]


async def test_decoding_client_is_refused(any_client: aioredis.Redis) -> None:
    kwargs = any_client.connection_pool.connection_kwargs
    decoding = aioredis.Redis(port=kwargs.get("port", 6379), decode_responses=True)
    try:
        with pytest.raises(ConfigurationError, match="decode_responses"):
            ConversationManager(None, redis=decoding)
    finally:
        await decoding.aclose()


async def test_sync_write_from_a_thread_reaches_redis(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 0] from the loop")
    results: list[Any] = []

    def worker() -> None:
        manager.append(room, "user", "[Message ID: 1] from a thread")
        results.append(manager.patch_reactions(room, 0, "👍"))

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join)
    assert results == [True]
    await manager.drain()
    rows = await redis_rows(any_client, room)
    assert len(rows) == 2 and b"from a thread" in rows[1] and b"Reactions" in rows[0]


def test_sync_write_with_no_loop_raises_instead_of_skipping(room: str) -> None:
    import fakeredis

    manager = ConversationManager(None, redis=fakeredis.FakeAsyncRedis())
    with pytest.raises(PersistError, match="no running event loop"):
        manager.append(room, "user", "lost?")
    assert manager.get_messages(room) == []


async def test_memory_only_mode(make_manager: Make, room: str) -> None:
    manager = make_manager(None, max_history=3)
    for i in range(5):
        manager.append(room, "user", f"[Message ID: {i}] m")
    assert manager.patch_reactions(room, 4, "x")
    assert not manager.patch_reactions(room, 0, "x")
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in await manager.get_messages_async(room)] == [
        "[Message ID: 2] m",
        "[Message ID: 3] m",
        "[Message ID: 4] [Reactions: x] m",
    ]
    manager.clear(room)
    assert manager.get_messages(room) == []


async def test_catch_up_moves_only_what_changed(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a, b = (
        make_manager(redis_client, max_history=1000),
        make_manager(redis_client, max_history=1000),
    )
    for i in range(1000):
        a.append(room, "user", f"[Message ID: {i}] " + "x" * 400)
    await a.drain()
    await b.get_messages_async(room)
    before = b.stats()
    for i in range(1000, 1010):
        await a.append_async(room, "user", f"[Message ID: {i}] " + "y" * 400)
    new_rows = (await redis_rows(redis_client, room))[-10:]
    await b.ensure_fresh_from_redis(room)
    after = b.stats()
    assert after["round_trips"] - before["round_trips"] == 1
    assert after["bytes_received"] - before["bytes_received"] == sum(map(len, new_rows))
    assert b.get_messages(room) == a.get_messages(room)
    # One edit elsewhere: catch-up carries that one entry.
    assert await a.patch_reactions_async(room, 500, "👍")
    (edited,) = [r for r in await redis_rows(redis_client, room) if b"[Message ID: 500]" in r]
    before = b.stats()
    await b.ensure_fresh_from_redis(room)
    after = b.stats()
    assert after["bytes_received"] - before["bytes_received"] == len(edited)
    assert b.get_messages(room) == a.get_messages(room)


async def test_edit_sends_one_entry_and_does_not_conflict_with_appends(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    editor = make_manager(redis_client, max_history=1000)
    appender = make_manager(redis_client, max_history=1000)
    for i in range(1000):
        editor.append(room, "user", f"[Message ID: {i}] " + "x" * 400)
    await editor.drain()
    entry_size = len((await redis_rows(redis_client, room))[500])
    assert await editor.patch_reactions_async(room, 499, "warm")  # loads the script once
    before = editor.stats()
    await appender.append_async(room, "user", "[Message ID: new] concurrent")
    assert await editor.patch_reactions_async(room, 500, "🎉x1")
    after = editor.stats()
    assert after["conflicts"] == before["conflicts"]
    assert after["bytes_sent"] - before["bytes_sent"] < entry_size + 300
    await appender.ensure_fresh_from_redis(room)
    await editor.ensure_fresh_from_redis(room)
    assert appender.get_messages(room) == editor.get_messages(room)
    assert appender.get_messages(room)[-1]["content"] == "[Message ID: new] concurrent"


async def test_concurrent_edits_of_one_entry_both_apply(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a, b = make_manager(any_client), make_manager(any_client)
    await a.append_async(room, "user", "[Message ID: 1] hi")
    await b.get_messages_async(room)
    # Both workers base their edit on the same bytes; the second must see the first.
    results = await asyncio.gather(
        a.patch_reactions_async(room, 1, "👍x1"), b.mark_deleted_async(room, 1, "T")
    )
    assert list(results) == [True, True]
    reader = make_manager(any_client)
    assert (await reader.get_messages_async(room))[0]["content"] == (
        "[Message ID: 1] [deleted at T] [Reactions: 👍x1] hi"
    )
    assert a.stats()["conflicts"] + b.stats()["conflicts"] == 1


async def test_ensure_fresh_waits_for_this_workers_writes(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    for i in range(50):
        manager.append(room, "user", f"m{i}")
    await manager.ensure_fresh_from_redis(room)
    assert manager.stats()["pending_writes"] == 0
    assert len(await redis_rows(any_client, room)) == 50
    assert len(manager.get_messages(room)) == 50


async def test_append_many_is_all_or_nothing(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    batch = [
        {"role": "user", "content": "[Message ID: 1] a"},
        {"role": "assistant", "content": "b"},
        {"role": "robot", "content": "refused"},
    ]
    with pytest.raises(InvalidMessage, match="role"):
        await manager.append_many_async(room, batch)
    assert manager.get_messages(room) == []
    await manager.append_many_async(room, batch[:2])
    assert len(await redis_rows(any_client, room)) == 2
    assert manager.stats()["persists"] == 1


async def test_trim_keeps_a_consolidation_summary_at_the_head(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer, reader = (
        make_manager(any_client, max_history=4),
        make_manager(any_client, max_history=4),
    )
    await writer.append_async(room, "system", "summary of older turns", message_id="summary:1")
    for i in range(3):
        await writer.append_async(room, "user", f"[Message ID: {i}] m{i}")
    await reader.get_messages_async(room)
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    await writer.append_many_async(
        room,
        [
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "r", "tool_call_id": "c"},
            {"role": "user", "content": "[Message ID: 9] after"},
            {"role": "user", "content": "[Message ID: 10] later"},
        ],
    )
    # Trimming to 4 would leave [summary, tool, user, user]: the orphaned tool
    # result goes, the summary stays.
    expected = ["summary of older turns", "[Message ID: 9] after", "[Message ID: 10] later"]
    assert [m["content"] for m in writer.get_messages(room)] == expected
    before = reader.stats()
    assert [m["content"] for m in await reader.get_messages_async(room)] == expected
    assert reader.stats()["reloads"] == before["reloads"]  # caught up incrementally
    rows = await redis_rows(any_client, room)
    assert len(rows) == 3 and rows[0].startswith(b'{"message_id":"summary:1","role":"system"')


async def test_versions_an_older_engine_wrote_are_trusted_on_their_epoch(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """During a rolling deploy an older engine writes versions without a lineage tag:
    a worker of this engine catches up on them incrementally, once, instead of
    reloading on every sync because its version has no tag to check."""
    writer, reader = make_manager(any_client), make_manager(any_client)
    await writer.append_async(room, "user", "[Message ID: 1] tagged")
    await reader.get_messages_async(room)
    meta = window_key(room) + ":meta"
    # What an older engine's append does to the keys: a row, and the version moves.
    await any_client.rpush(
        window_key(room), b'{"message_id":"2","role":"user","content":"[Message ID: 2] old"}'
    )
    await any_client.hincrby(meta, "version", 1)
    before = reader.stats()["reloads"]
    for _ in range(3):
        await reader.ensure_fresh_from_redis(room)
    assert [m["content"] for m in reader.get_messages(room)] == [
        "[Message ID: 1] tagged",
        "[Message ID: 2] old",
    ]
    assert reader.stats()["reloads"] == before
    await writer.append_async(room, "user", "[Message ID: 3] tagged again")
    await reader.ensure_fresh_from_redis(room)
    assert len(reader.get_messages(room)) == 3
