"""Named durable cursors (SPEC §34): compare-and-set under the room's hash tag, with
the room's TTL, and two extraction workers in separate processes that share one
cursor and process every turn exactly once, even when one dies mid-batch."""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import redis.asyncio as aioredis
from extraction import CRASH_TURN, EXIT_CRASHED, LAST_TURN, extract
from redis_servers import RedisServer

from conversation import (
    ConfigurationError,
    ConsolidationConfig,
    ConsolidationWorker,
    ConversationManager,
    InvalidCursor,
)
from conversation._redis.keys import KeySpace
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
KEYS = KeySpace("sg")


async def test_set_cursor_is_a_compare_and_set(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    _, first = await manager.read_since(room)
    await manager.append_async(room, "user", "[Message ID: 2] again")
    _, second = await manager.read_since(room, first)

    assert await manager.get_cursor(room, "memory") is None
    assert await manager.set_cursor(room, "memory", first, expected="")  # only if unset
    assert not await manager.set_cursor(room, "memory", second, expected="")
    assert await manager.get_cursor(room, "memory") == first
    assert not await manager.set_cursor(room, "memory", second, expected=second)
    assert await manager.set_cursor(room, "memory", second, expected=first)
    assert await manager.get_cursor(room, "memory") == second
    assert await manager.set_cursor(room, "memory", first)  # no expectation: always
    # Names are independent, and emoji or spaces are just names.
    assert await manager.get_cursor(room, "moderation 🚨") is None
    assert await manager.set_cursor(room, "moderation 🚨", second)
    assert await manager.get_cursor(room, "memory") == first


async def test_cursor_keys_share_the_room_hash_tag_and_its_ttl(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, ttl_seconds=600)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    _, cursor = await manager.read_since(room)
    assert await manager.set_cursor(room, "memory", cursor)
    key = KEYS.cursors(room)
    assert key == f"sg:conversation:{{{room}}}:cursors"
    assert 590_000 < int(await redis_client.pttl(key)) <= 600_000


async def test_room_writes_keep_the_cursors_alive_with_the_room(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """An extractor down longer than ttl_seconds must find its cursor while the room
    lives on: every write that refreshes the room's TTL refreshes the cursors'. (Writes
    refresh the room's keys together once a quarter of the TTL went by: "long gone"
    is the whole room close to expiring.) A clear keeps them (their next read gets
    the clear as a change)."""
    manager = make_manager(redis_client, ttl_seconds=600)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    # A room nobody reads by name gets no cursors key from its writes.
    assert not await redis_client.exists(KEYS.cursors(room))
    _, cursor = await manager.read_since(room)
    assert await manager.set_cursor(room, "memory", cursor)
    key = KEYS.cursors(room)
    writes: list[Callable[[], Awaitable[object]]] = [
        lambda: manager.append_async(room, "user", "[Message ID: 2] again"),
        lambda: manager.update_message_async(room, "2", "[Message ID: 2] edited"),
        lambda: manager.add_reaction_async(room, "2", "👍", "ann"),
        lambda: manager.set_channel_limit_async(room, 60),
        lambda: manager.clear_async(room),
    ]
    for write in writes:
        for decayed in (key, KEYS.room(room).meta):  # as if the extractor were long gone
            await redis_client.pexpire(decayed, 5_000)
        await write()
        assert 590_000 < int(await redis_client.pttl(key)) <= 600_000
    assert await manager.get_cursor(room, "memory") == cursor
    changes, _ = await manager.read_since(room, cursor)
    assert [change.kind for change in changes] == ["clear"]


async def test_bad_names_and_cursors_are_refused_and_nothing_is_stored(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    _, cursor = await manager.read_since(room)
    _, foreign = await manager.read_since(room + "-b")
    cases: list[tuple[object, object, str]] = [
        ("", cursor, "1 to 200"),
        ("x" * 201, cursor, "1 to 200"),
        ("a\nb", cursor, "control"),
        (7, cursor, "must be a str"),
        ("memory", "garbage", "does not start"),
        ("memory", foreign, "another room"),
        ("memory", None, "not None"),
    ]
    for name, value, reason in cases:
        with pytest.raises(InvalidCursor, match=reason):
            await manager.set_cursor(room, name, value)  # type: ignore[arg-type]
    assert not await any_client.exists(KEYS.cursors(room))


async def _count(client: aioredis.Redis, key: str, n: int) -> bool:
    return int(await client.get(key) or 0) >= n


async def _extracted(client: aioredis.Redis, room: str, n: int) -> bool:
    return int(await client.llen(f"memories:{room}")) >= n


async def test_two_workers_share_a_cursor_and_extract_each_turn_once_across_a_crash(
    redis_server: RedisServer, make_manager: Make, room: str
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    writer = make_manager(client, max_history=1000)
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=extract, args=(redis_server.port, room, "memory", crasher))
        for crasher in (False, True)
    ]
    for worker in workers:
        worker.start()
    try:
        turns = [f"t{i}" for i in range(40)]
        turns[25] = CRASH_TURN
        turns.append(LAST_TURN)
        await wait_until(
            lambda: _count(client, f"ready:{room}", 2), what="both workers to start reading"
        )
        for first in range(0, len(turns), 5):
            batch = turns[first : first + 5]
            await writer.append_many_async(
                room, [{"role": "user", "content": f"turn {t}", "message_id": t} for t in batch]
            )
            if CRASH_TURN not in turns[: first + 5]:
                # Batch by batch while both live, so both race for every batch.
                extracted = partial(_extracted, client, room, first + 5)
                await wait_until(extracted, what="the batch extracted")
        for worker in workers:
            await asyncio.to_thread(worker.join, 60)
        assert [w.exitcode for w in workers] == [0, EXIT_CRASHED]
        stored = await client.lrange(f"memories:{room}", 0, -1)
        memories = [m.decode() if isinstance(m, bytes) else m for m in stored]
        assert memories == turns  # every turn once, in order, none lost with the crash
        commits = [int(await client.get(f"commits:{room}:{w.pid}") or 0) for w in workers]
        assert commits[0] >= 1, commits
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
            worker.join()
        await client.aclose()


# ------------------------------------------- consolidation waits for cursors

HELD = ConsolidationConfig(max_turns=20, keep_recent=5, min_fold=2, wait_for_cursors=["memory"])


async def test_a_fold_waits_for_the_turns_a_named_cursor_has_not_read(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    worker = make_manager(redis_client, consolidation=HELD)
    extractor = make_manager(redis_client)
    for i in range(24):
        await worker.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    assert (await worker.consolidate(room)).outcome == "waiting_for_cursors"  # never read
    assert await redis_client.llen(KEYS.room(room).window) == 24

    changes, _ = await extractor.read_since(room)
    seen = [c.message_id for c in changes[:10]]  # the extractor got through 10 turns
    assert await extractor.set_cursor(room, "memory", changes[9].cursor, expected="")
    result = await worker.consolidate(room)
    assert result.outcome == "folded" and 0 < result.folded <= 10
    (batch,) = await worker.list_archives(room)
    assert {t["message_id"] for t in batch.turns} <= set(seen)

    # Resuming from its cursor, the extractor gets the fold and every turn it had not
    # read, raw: no turn went into a summary unseen.
    rest, _ = await extractor.read_since(room, changes[9].cursor)
    assert rest[0].kind == "fold"
    seen += [c.message_id for c in rest if c.kind == "append"]
    assert seen == [str(i) for i in range(24)]


async def test_a_cursor_of_another_epoch_holds_every_fold_back(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    worker = make_manager(redis_client, consolidation=HELD)
    for i in range(24):
        await worker.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    _, cursor = await worker.read_since(room)
    assert await worker.set_cursor(room, "memory", cursor)
    await worker.import_room(room, await worker.export_room(room), replace=True)  # new epoch
    assert (await worker.consolidate(room)).outcome == "waiting_for_cursors"


def test_wait_for_cursors_is_checked_and_needs_redis(make_manager: Make) -> None:
    with pytest.raises(ConfigurationError, match="list of cursor names"):
        ConsolidationConfig(wait_for_cursors="memory")
    with pytest.raises(InvalidCursor, match="control"):
        ConsolidationConfig(wait_for_cursors=["a\nb"])
    assert ConsolidationConfig(wait_for_cursors=["a"]).wait_for_cursors == ("a",)
    with pytest.raises(ConfigurationError, match="memory-only"):
        make_manager(None, consolidation=HELD)


async def test_a_fold_never_swallows_an_edit_the_named_cursor_has_not_read(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    worker = make_manager(redis_client, consolidation=HELD)
    extractor = make_manager(redis_client)
    for i in range(24):
        await worker.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    _, cursor = await extractor.read_since(room)
    assert await extractor.set_cursor(room, "memory", cursor, expected="")
    # Turn 3 is edited after the extractor read it: its new text is unread.
    await worker.update_message_async(room, "3", "[Message ID: 3] my name is Rob, not Bob")
    await worker.consolidate(room)
    rest, _ = await extractor.read_since(room, cursor)
    texts = [c.entry["content"] for c in rest if c.entry is not None and c.kind == "edit"]
    archived = [t["message_id"] for b in await worker.list_archives(room) for t in b.turns]
    # Either the edit reached the extractor, or the fold left turn 3 alone.
    assert "[Message ID: 3] my name is Rob, not Bob" in texts or "3" not in archived


async def test_a_background_worker_held_back_by_a_cursor_says_so(
    redis_client: aioredis.Redis,
    make_manager: Make,
    room: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The extractor died before it set its cursor: no fold can happen, and an
    # operator must see why, not a worker that silently does nothing for ever.
    manager = make_manager(redis_client, consolidation=HELD)
    for i in range(24):
        await manager.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    worker = ConsolidationWorker(manager, rooms=[room])
    with caplog.at_level("WARNING", logger="conversation"):
        [first] = await worker.run_once()
        [second] = await worker.run_once()
    assert first.outcome == second.outcome == "waiting_for_cursors"
    assert worker.stats.waiting_for_cursors == 2
    warnings = [r.getMessage() for r in caplog.records if "waits for" in r.getMessage()]
    assert len(warnings) == 1 and room in warnings[0] and "'memory'" in warnings[0]
