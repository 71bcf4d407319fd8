"""The change feed (SPEC §33): a reader that applies every ``Change`` holds exactly
the room's window, whatever happened, and a gap of any kind shows as a reset."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from cluster_servers import link_down
from redis_servers import RedisServer

from conversation import (
    Change,
    ConsolidationConfig,
    ConversationManager,
    InvalidCursor,
    InvalidRoomId,
    RedisUnavailable,
)
from conversation._redis.keys import KeySpace
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
KEYS = KeySpace("sg")
Model = dict[int, tuple[str | None, Any]]


def apply(model: Model, changes: list[Change]) -> None:
    """What a consumer does with changes: a map of absolute position -> entry."""
    for change in changes:
        if change.kind in ("append", "edit"):
            assert change.entry is not None
            model[change.position] = (change.message_id, change.entry["content"])
        elif change.kind in ("trim", "fold"):
            for position in [p for p in model if p < change.position]:
                del model[position]
            if change.kind == "fold":
                assert change.entry is not None
                model[change.position] = (change.message_id, change.entry["content"])
        else:  # clear, reset
            model.clear()


async def window(client: aioredis.Redis, room: str) -> Model:
    keys = KEYS.room(room)
    head = int(await client.hget(keys.meta, "head") or 0)
    rows = await client.lrange(keys.window, 0, -1)
    out: Model = {}
    for offset, row in enumerate(rows):
        entry = orjson.loads(row)
        out[head + offset] = (entry.get("message_id"), entry["content"])
    return out


class Reader:
    """A change reader that checks after every read that it mirrors the room."""

    def __init__(self, manager: ConversationManager, client: aioredis.Redis, room: str) -> None:
        self.manager, self.client, self.room = manager, client, room
        self.model: Model = {}
        self.cursor: str | None = None

    async def read(self) -> list[Change]:
        changes, self.cursor = await self.manager.read_since(self.room, self.cursor)
        apply(self.model, changes)
        assert self.model == await window(self.client, self.room)
        if changes:
            assert changes[-1].cursor == self.cursor
        return changes


async def say(manager: ConversationManager, room: str, i: int) -> None:
    role = "user" if i % 2 == 0 else "assistant"
    await manager.append_async(room, role, f"[Message ID: {i}] turn {i}", message_id=i)


async def test_appends_edits_and_trims_arrive_in_order_with_absolute_positions(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(any_client)
    reader = Reader(make_manager(any_client), any_client, room)
    assert await reader.read() == []  # a room nobody wrote: nothing, no reset
    for i in range(3):
        await say(writer, room, i)
    changes = await reader.read()
    assert [(c.kind, c.position, c.message_id) for c in changes] == [
        ("append", 0, "0"),
        ("append", 1, "1"),
        ("append", 2, "2"),
    ]
    assert changes[0].entry == {"role": "user", "content": "[Message ID: 0] turn 0"}
    assert await reader.read() == []

    await writer.update_message_async(room, 1, "[Message ID: 1] edited")
    await say(writer, room, 3)
    changes = await reader.read()
    assert [(c.kind, c.position) for c in changes] == [("edit", 1), ("append", 3)]

    await writer.set_channel_limit_async(room, 50)
    for i in range(4, 60):
        await say(writer, room, i)
    changes = await reader.read()
    assert changes[0].kind == "trim" and changes[0].position == 10
    # Turns 4..9 fell off before anyone read them: a trimmed window, not a gap.
    assert [c.position for c in changes[1:]] == list(range(10, 60))


async def test_a_cursor_inside_a_batch_resumes_without_repeating_or_missing_an_append(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    manager = make_manager(redis_client)
    for i in range(4):
        await say(writer, room, i)
    first, _ = await manager.read_since(room)
    await writer.update_message_async(room, 0, "[Message ID: 0] edited")
    for i in range(4, 8):
        await say(writer, room, i)
    batch, end = await manager.read_since(room, first[-1].cursor)
    middle = batch[2]  # edit, append 4, append 5, ...
    assert (middle.kind, middle.position) == ("append", 5)
    resumed, resumed_end = await manager.read_since(room, middle.cursor)
    assert [(c.kind, c.position) for c in resumed] == [
        ("edit", 0),  # an edit of the batch may come again: idempotent
        ("append", 6),
        ("append", 7),
    ]
    assert await manager.read_since(room, resumed_end) == ([], resumed_end)
    assert await manager.read_since(room, end) == ([], end)


async def test_a_fold_arrives_as_one_fold_change_and_the_reader_still_mirrors_the_room(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    config = ConsolidationConfig(max_turns=20, keep_recent=5, min_fold=2)
    worker = make_manager(redis_client, consolidation=config)
    reader = Reader(make_manager(redis_client), redis_client, room)
    for i in range(24):
        await say(worker, room, i)
    await reader.read()
    await worker.update_message_async(room, 22, "[Message ID: 22] edited before the fold")
    result = await worker.consolidate(room)
    assert result.outcome == "folded"
    await say(worker, room, 24)
    changes = await reader.read()
    kinds = [c.kind for c in changes]
    assert kinds == ["fold", "edit", "append"]
    fold = changes[0]
    assert fold.message_id == "summary:1" and fold.position == min(reader.model)
    # A reader that held nothing of the folded part (it started late) sees it too.
    late = Reader(reader.manager, redis_client, room)
    await late.read()
    await worker.update_message_async(room, 23, "[Message ID: 23] edited after")
    assert [c.kind for c in await reader.read()] == ["edit"]


async def test_a_clear_arrives_as_clear_then_what_the_room_holds_since(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = Reader(make_manager(redis_client), redis_client, room)
    for i in range(3):
        await say(writer, room, i)
    await reader.read()
    await writer.clear_async(room)
    await say(writer, room, 10)
    changes = await reader.read()
    assert [(c.kind, c.position) for c in changes] == [("clear", 0), ("append", 0)]
    assert changes[1].message_id == "10"


async def test_a_log_trimmed_past_the_cursor_gives_one_reset_then_the_whole_window(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = Reader(make_manager(redis_client), redis_client, room)
    for i in range(3):
        await say(writer, room, i)
    await reader.read()
    for n in range(300):  # more edits than the log keeps (256)
        await writer.update_message_async(room, 1, f"[Message ID: 1] edit {n}")
    changes = await reader.read()
    assert [c.kind for c in changes] == ["reset", "append", "append", "append"]
    assert changes[2].entry is not None
    assert changes[2].entry["content"] == "[Message ID: 1] edit 299"


async def test_losing_the_log_key_alone_gives_a_reset_not_a_stale_edit(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = Reader(make_manager(redis_client), redis_client, room)
    for i in range(3):
        await say(writer, room, i)
    await reader.read()
    await writer.update_message_async(room, 0, "[Message ID: 0] edited")
    await redis_client.delete(KEYS.room(room).log)
    assert [c.kind for c in await reader.read()] == ["reset", "append", "append", "append"]


async def test_flushall_and_a_new_epoch_give_a_reset(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = Reader(make_manager(redis_client), redis_client, room)
    for i in range(3):
        await say(writer, room, i)
    await reader.read()
    await redis_client.flushall()
    changes = await reader.read()
    assert [c.kind for c in changes] == ["reset"]  # the room is gone
    await say(make_manager(redis_client), room, 7)
    changes = await reader.read()
    # From "gone" to a new epoch: the reader held nothing, so no second reset.
    assert [(c.kind, c.message_id) for c in changes] == [("append", "7")]


async def test_a_failover_gives_a_reset_only_to_readers_of_lost_writes(
    redis_server: RedisServer, tmp_path: Path, make_manager: Make, room: str
) -> None:
    """A cursor carries the lineage tag of its version: after a failover to a replica
    that lost the last writes (whose versions new writes then reuse), a reader that
    saw them gets a reset; one that did not goes on incrementally, as it would
    after a failover that lost nothing."""
    replica = RedisServer(
        tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(redis_server.port))
    ).start()
    try:
        replica.wait_replica_synced()
        primary = aioredis.Redis(port=redis_server.port)
        writer = make_manager(primary)
        for i in range(3):
            await say(writer, room, i)
        _, before = await writer.read_since(room)
        promoted = aioredis.Redis(port=replica.port)
        await wait_until(
            lambda: _replicated(promoted, room, 3), what="the replica to hold the room"
        )
        with link_down(redis_server, replica):
            for i in range(3, 5):
                await say(writer, room, i)
            _, saw_lost = await writer.read_since(room, before)
            await promoted.replicaof("NO", "ONE")
        after = make_manager(promoted)
        for i in range(5, 7):
            await say(after, room, i)
        changes, _ = await after.read_since(room, saw_lost)
        assert [(c.kind, c.message_id) for c in changes] == [
            ("reset", None),
            *(("append", str(i)) for i in (0, 1, 2, 5, 6)),
        ]
        changes, _ = await after.read_since(room, before)
        assert [(c.kind, c.message_id) for c in changes] == [("append", "5"), ("append", "6")]
        await primary.aclose()
        await promoted.aclose()
    finally:
        replica.stop()


async def _replicated(client: aioredis.Redis, room: str, n: int) -> bool:
    return int(await client.llen(KEYS.room(room).window)) == n


def forged(cursor: str, fields: list[Any]) -> str:
    """A cursor-shaped string with any fields (a hostile or buggy client's)."""
    return "c1." + base64.urlsafe_b64encode(orjson.dumps(fields)).decode().rstrip("=")


async def test_garbage_and_foreign_cursors_are_refused_by_name_and_change_nothing(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await say(manager, room, 1)
    _, cursor = await manager.read_since(room)
    _, other = await manager.read_since(room + "-other")
    before = await window(any_client, room)
    bad: list[tuple[object, str]] = [
        ("", "does not start"),
        ("hello", "does not start"),
        ("c1.!!!!", "damaged"),
        ("c1." + "A" * 300, "longer than"),
        (forged(cursor, [1, 2]), "wrong shape"),
        (forged(cursor, ["x", "e", -1, 0, 0]), "non-negative"),
        (forged(cursor, ["x", "e", True, 0, 0]), "non-negative"),
        (forged(cursor, ["x", "e\n", 1, 0, 0]), "epoch"),
        (other, "another room"),
        (42, "must be a str"),
    ]
    for value, reason in bad:
        with pytest.raises(InvalidCursor, match=reason):
            await manager.read_since(room, value)  # type: ignore[arg-type]
    assert await window(any_client, room) == before
    # A well-formed cursor that does not fit the room (forged numbers): a reset.
    fingerprint = orjson.loads(base64.urlsafe_b64decode(cursor[3:] + "=="))[0]
    changes, _ = await manager.read_since(room, forged(cursor, [fingerprint, "zz", 9, 9, 9]))
    assert [c.kind for c in changes] == ["reset", "append"]


async def test_changes_yields_what_other_workers_write_and_waits_cheaply(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = make_manager(redis_client)
    seen: list[Change] = []

    async def follow() -> None:
        async for change in reader.changes(room, poll_interval=0.2):
            seen.append(change)

    task = asyncio.create_task(follow())
    try:
        for i in range(3):
            await say(writer, room, i)
        await wait_until(lambda: len(seen) == 3, what="three appends")
        reads = reader.stats()["change_reads"]
        await say(writer, room, 3)
        await wait_until(lambda: len(seen) == 4, what="the fourth append")
        assert reader.stats()["change_reads"] - reads <= 10  # polls back off, no busy loop
    finally:
        task.cancel()
    assert [c.message_id for c in seen] == ["0", "1", "2", "3"]
    with pytest.raises(InvalidCursor):
        reader.changes(room, since="nope")  # refused at the call, before any poll
    with pytest.raises(InvalidRoomId):
        await reader.read_since("evil{room}")


async def test_a_memory_only_manager_says_the_feed_needs_redis(make_manager: Make) -> None:
    from conversation import ConfigurationError

    with pytest.raises(ConfigurationError, match="memory-only"):
        await make_manager(None).read_since("room")


async def test_changes_ends_when_its_manager_closes(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    reader = make_manager(redis_client)
    writer = make_manager(redis_client)
    seen: list[Change] = []

    async def follow() -> None:
        async for change in reader.changes(room, poll_interval=0.05):
            seen.append(change)

    task = asyncio.create_task(follow())
    try:
        await say(writer, room, 0)
        await wait_until(lambda: len(seen) == 1, what="the append")
        await reader.aclose()
        # The consumer's loop ends: a closed manager does not poll Redis forever.
        await wait_until(task.done, what="the change feed to end")
        assert task.exception() is None and len(seen) == 1
    finally:
        task.cancel()


async def test_a_consumer_that_breaks_out_or_is_cancelled_leaves_nothing_running(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    reader = make_manager(redis_client)
    await say(writer, room, 0)
    await writer.drain()
    baseline = asyncio.all_tasks()

    feed = reader.changes(room, poll_interval=0.05)
    async for change in feed:
        assert change.kind == "append"
        break
    await feed.aclose()  # what `async with contextlib.aclosing(...)` does

    async def follow() -> None:
        async for _change in reader.changes(room, poll_interval=0.05):
            pass

    task = asyncio.create_task(follow())
    await wait_until(lambda: reader.stats()["change_reads"] >= 3, what="an idle poll or two")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert asyncio.all_tasks() <= baseline


async def test_changes_raises_a_refusal_retrying_cannot_fix_instead_of_polling_forever(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    # Someone SET the room's window key to a string: every read answers WRONGTYPE.
    # Waiting for Redis cannot help; the consumer must hear of it, not spin warnings.
    await redis_client.set(KEYS.room(room).window, "not a list")
    reader = make_manager(redis_client)
    with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
        async with asyncio.timeout(5):
            async for _change in reader.changes(room, poll_interval=0.05):
                pass
