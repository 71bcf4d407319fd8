"""Issue 12: the edges users hit first, each against a real redis-server (and fakeredis).

Idempotency keys through batching (SPEC §27), callers settled at shutdown
(§28), the loss of single companion keys (§29), and the archive's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer
from support import stored_ids, wait_for, window_key

from conversation import (
    BacklogFull,
    ConfigurationError,
    ConsolidationConfig,
    ConversationManager,
    DrainTimeout,
    PersistError,
)

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]


# ------------------------------------------------- idempotency keys name one write


async def test_a_recall_sharing_a_batch_with_a_sync_append_is_stored_once(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "first", message_id="a", idempotency_key="key-a")
    # The sync append starts the room's persist task; the recall queues behind it,
    # so both go out in ONE script call.
    manager.append(room, "user", "second", message_id="b")
    await manager.append_async(room, "user", "first", message_id="a", idempotency_key="key-a")
    await manager.drain()
    assert await stored_ids(any_client, room) == ["a", "b"]
    other = make_manager(any_client)
    await other.ensure_fresh_from_redis(room)
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in manager.get_messages(room)] == ["first", "second"]
    assert other.get_messages(room) == manager.get_messages(room)


async def test_a_replay_at_the_head_of_a_batch_is_skipped_alone(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
    state = manager._room(room)
    async with state.lock:  # hold the room's sender so the next writes queue up
        manager.append(room, "user", "x", message_id="x")
        await wait_for(lambda: state.inflight is not None, "the first batch to be taken")
        recall = asyncio.create_task(
            manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
        )
        await wait_for(lambda: len(state.pending) == 2, "the recall to queue")
        manager.append(room, "user", "c", message_id="c")
        manager.append(room, "user", "d", message_id="d")
    await recall
    await manager.drain()
    # The batch after x is [recall of a, c, d]: only a is skipped.
    assert await stored_ids(any_client, room) == ["a", "x", "c", "d"]
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in manager.get_messages(room)] == ["a", "x", "c", "d"]


async def test_one_batch_holding_the_same_key_twice_stores_it_once(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    manager.append(room, "user", "x", message_id="x")
    await asyncio.gather(
        *(
            manager.append_async(room, "user", "k", message_id="k", idempotency_key="same")
            for _ in range(3)
        )
    )
    await manager.drain()
    assert await stored_ids(any_client, room) == ["x", "k"]
    await manager.ensure_fresh_from_redis(room)
    assert [m["message_id"] for m in _entries(manager, room)] == ["x", "k"]


async def test_a_cancelled_recall_of_a_confirmed_write_is_never_served_twice(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    # Bug K of docs/reliability.md: the recall's rows went into the view on top of
    # the synced copy, and a read that could not reach Redis in time served both.
    manager = make_manager(any_client, command_timeout=0.2)
    await manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
    state = manager._room(room)
    async with state.lock:  # the room's sender stalls, as on a blackholed connection
        recall = asyncio.create_task(
            manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
        )
        await wait_for(lambda: len(state.pending) == 1, "the recall to queue")
        recall.cancel()  # the caller goes away; the re-send goes on in the background
        with contextlib.suppress(asyncio.CancelledError):
            await recall
        manager.append(room, "user", "b", message_id="b")
        # The catch-up cannot take the room within command_timeout: memory is served.
        served = await manager.get_messages_async(room)
        assert manager.stats()["stale_reads"] == 1
        assert [m["content"] for m in served] == ["a", "b"]
    await manager.drain()
    assert await stored_ids(any_client, room) == ["a", "b"]
    assert [m["content"] for m in await manager.get_messages_async(room)] == ["a", "b"]


async def test_a_recall_queued_behind_its_own_first_send_is_never_shown_twice(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    state = manager._room(room)

    def send() -> asyncio.Task[None]:
        return asyncio.create_task(
            manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
        )

    async with state.lock:  # the first send is taken before the recall queues
        first = send()
        await wait_for(lambda: state.inflight is not None, "the first send to be taken")
        recall = send()
        await wait_for(lambda: len(state.pending) == 2, "the recall to queue")
    await first
    # Confirmed, and the recall's re-send not answered yet: the view holds it once.
    assert [e["message_id"] for e in _entries(manager, room)] == ["a"]
    await recall
    assert await stored_ids(any_client, room) == ["a"]
    assert [e["message_id"] for e in _entries(manager, room)] == ["a"]


async def test_a_recall_of_a_key_redis_forgot_lands_and_joins_the_view(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    # The other side of the fix: this worker took the recall as already stored, but
    # Redis lost the key (its idempotency set deleted), so the re-send is stored
    # again; the view must then show it, as Redis does (SPEC §29 accepts the copy).
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
    await any_client.delete(f"{window_key(room)}:idem")
    await manager.append_async(room, "user", "a", message_id="a", idempotency_key="key-a")
    assert await stored_ids(any_client, room) == ["a", "a"]
    assert [m["content"] for m in manager.get_messages(room)] == ["a", "a"]


def _entries(manager: ConversationManager, room: str) -> list[dict[str, object]]:
    return [orjson.loads(row) for row in manager._room(room).view.window.rows]


async def test_the_append_script_reports_each_write_on_its_own(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "a", message_id="a", idempotency_key="ka")
    store, state = manager._store, manager._room(room).synced
    assert store is not None
    rows = [b'{"message_id":"%s","role":"user","content":"%s"}' % (c, c) for c in (b"b", b"c")]
    reply, flags = await store.append(
        manager._room(room).keys, state, "e", [("ka", [b"dup"]), ("kb", rows[:1]), ("kc", rows[1:])]
    )
    assert flags == "211"
    assert await stored_ids(any_client, room) == ["a", "b", "c"]
    reply, flags = await store.append(manager._room(room).keys, state, "e", [("kb", rows[:1])])
    assert flags == "2" and reply.status == 2
    assert await stored_ids(any_client, room) == ["a", "b", "c"]


# ----------------------------------------------------- nobody waits forever


@pytest.fixture
async def server_and_client(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, aioredis.Redis]]:
    # AOF, fsync'd on every write: a restart keeps what was acknowledged.
    server = RedisServer(
        tmp_path / "redis", extra=("--appendonly", "yes", "--appendfsync", "always")
    ).start()
    client = aioredis.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop()


async def test_aclose_that_gives_up_fails_every_awaiting_caller_naming_the_room(
    server_and_client: tuple[RedisServer, aioredis.Redis], room: str
) -> None:
    server, client = server_and_client
    manager = ConversationManager(
        None, redis=client, command_timeout=0.5, retry_backoff=(0.01, 0.05)
    )
    await manager.append_async(room, "user", "landed", message_id="1")
    server.stop()
    waiting = [
        asyncio.create_task(manager.append_async(room, "user", f"t{i}", message_id=f"w{i}"))
        for i in range(3)
    ]
    await wait_for(lambda: len(manager._room(room).pending) == 3, "the writes to queue")
    with pytest.raises(DrainTimeout) as drained:
        await manager.aclose(timeout=0.3)
    assert drained.value.unflushed == {room: 3}
    for task in waiting:
        with pytest.raises(PersistError) as failed:
            await asyncio.wait_for(task, 5)
        assert failed.value.room_id == room and room in str(failed.value)
        assert failed.value.idempotency_key


async def test_drain_that_gives_up_fails_waiters_and_the_write_still_lands_once(
    server_and_client: tuple[RedisServer, aioredis.Redis], room: str
) -> None:
    server, client = server_and_client
    manager = ConversationManager(
        None, redis=client, command_timeout=0.5, retry_backoff=(0.01, 0.05)
    )
    try:
        await manager.append_async(room, "user", "landed", message_id="1")
        server.stop()
        waiting = asyncio.create_task(manager.append_async(room, "user", "late", message_id="2"))
        await wait_for(lambda: bool(manager._room(room).pending), "the write to queue")
        with pytest.raises(DrainTimeout):
            await manager.drain(timeout=0.3)
        with pytest.raises(PersistError) as failed:
            await asyncio.wait_for(waiting, 5)
        key = failed.value.idempotency_key
        assert key is not None
        server.start()
        await manager.drain(timeout=30)  # the queued write lands in the background
        await manager.append_async(room, "user", "late", message_id="2", idempotency_key=key)
        assert await stored_ids(client, room) == ["1", "2"]
    finally:
        await manager.aclose(timeout=5)


# ------------------------------------------------------------ partial key loss


async def _two_workers_in_step(
    client: aioredis.Redis, make_manager: Make, room: str, **settings: object
) -> tuple[ConversationManager, ConversationManager]:
    a = make_manager(client, **settings)
    b = make_manager(client, **settings)
    for i in range(8):
        await a.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    await b.ensure_fresh_from_redis(room)
    return a, b


async def _assert_both_equal_redis(
    client: aioredis.Redis, room: str, *workers: ConversationManager
) -> None:
    rows = list(await client.lrange(window_key(room), 0, -1))
    for worker in workers:
        await worker.ensure_fresh_from_redis(room)
        assert worker._room(room).synced.window.rows == rows
        assert worker._room(room).view.window.rows == rows


async def test_losing_only_the_log_never_serves_an_old_edit(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a, b = await _two_workers_in_step(any_client, make_manager, room)
    assert await a.update_message_async(room, 3, "[Message ID: 3] edited")
    await any_client.delete(window_key(room) + ":log")  # evicted on its own
    await b.ensure_fresh_from_redis(room)
    texts = [m["content"] for m in b.get_messages(room)]
    assert "[Message ID: 3] edited" in texts
    await _assert_both_equal_redis(any_client, room, a, b)
    # Writes heal the log: later edits are patched incrementally again.
    await a.append_async(room, "user", "[Message ID: 8] more")
    await b.ensure_fresh_from_redis(room)
    before = b.stats()["reloads"]
    assert await a.update_message_async(room, 5, "[Message ID: 5] again")
    await b.ensure_fresh_from_redis(room)
    assert b.stats()["reloads"] == before
    await _assert_both_equal_redis(any_client, room, a, b)


@pytest.mark.parametrize("suffix", [":log", ":meta", ":idem", ":archive"])
async def test_losing_one_companion_key_leaves_every_worker_equal_to_redis(
    any_client: aioredis.Redis, make_manager: Make, room: str, suffix: str
) -> None:
    config = ConsolidationConfig(keep_recent=4, min_fold=2)
    a, b = await _two_workers_in_step(any_client, make_manager, room, consolidation=config)
    result = await a.consolidate(room)
    assert result.outcome == "folded"
    await b.ensure_fresh_from_redis(room)
    assert await b.update_message_async(room, 6, "[Message ID: 6] edit by b")
    await a.append_async(room, "user", "[Message ID: 20] before the loss")
    assert await any_client.delete(window_key(room) + suffix) == 1
    # Both keep writing after the loss, each unaware of it.
    assert await a.update_message_async(room, 7, "[Message ID: 7] edit by a")
    await b.append_async(room, "user", "[Message ID: 21] after the loss")
    await asyncio.gather(
        a.patch_reactions_async(room, 20, "x 1"),
        b.mark_deleted_async(room, 21, "2026-12-02T10:00:00Z"),
    )
    await _assert_both_equal_redis(any_client, room, a, b)
    texts = " ".join(str(m["content"]) for m in a.get_messages(room))
    for expected in ("edit by a", "[Reactions: x 1]", "[deleted at 2026-12-02T10:00:00Z]"):
        assert expected in texts
    if suffix != ":meta":  # a lost meta starts a new epoch: b's edit is still stored
        assert "edit by b" in texts


# ------------------------------------------------------------- the archive's TTL


@pytest.mark.parametrize(("archive_ttl", "expected"), [(None, 100_000), (500.0, 500_000)])
async def test_later_writes_refresh_the_archive_ttl(
    any_client: aioredis.Redis,
    make_manager: Make,
    room: str,
    archive_ttl: float | None,
    expected: int,
) -> None:
    """An archive written by a fold long ago never expires under a room still in use.

    Writes refresh the room's keys together once a quarter of the TTL has gone by
    (an archive with a TTL of its own: on every write), so "long ago" is every key
    of the room close to expiring."""
    config = ConsolidationConfig(keep_recent=2, min_fold=2, archive_ttl_seconds=archive_ttl)
    manager = make_manager(any_client, ttl_seconds=100, consolidation=config)
    for i in range(6):
        await manager.append_async(room, "user", f"[Message ID: {i}] t{i}")
    assert (await manager.consolidate(room)).outcome == "folded"
    archive = window_key(room) + ":archive"

    async def as_if_long_ago() -> None:
        for suffix in ("", ":meta", ":log", ":idem", ":archive"):
            await any_client.pexpire(window_key(room) + suffix, 2000)

    await as_if_long_ago()
    await manager.append_async(room, "user", "[Message ID: 9] a later turn")
    assert expected // 2 < await any_client.pttl(archive) <= expected
    await as_if_long_ago()
    assert await manager.patch_reactions_async(room, 9, "ok 1")
    assert expected // 2 < await any_client.pttl(archive) <= expected


# ------------------------------------------------------------------- the backlog


async def test_max_pending_writes_refuses_the_next_write_and_keeps_memory(
    server_and_client: tuple[RedisServer, aioredis.Redis], room: str
) -> None:
    server, client = server_and_client
    manager = ConversationManager(
        None, redis=client, command_timeout=0.5, retry_backoff=(0.01, 0.05), max_pending_writes=5
    )
    try:
        await manager.append_async(room, "user", "0", message_id="0")
        server.stop()
        for i in range(1, 6):
            manager.append(room, "user", str(i), message_id=str(i))
        with pytest.raises(BacklogFull) as refused:
            manager.append(room, "user", "6", message_id="6")
        assert refused.value.room_id == room and "max_pending_writes=5" in str(refused.value)
        assert [m["content"] for m in manager.get_messages(room)] == [str(i) for i in range(6)]
        server.start()
        await manager.drain(timeout=30)
        assert await stored_ids(client, room) == [str(i) for i in range(6)]
    finally:
        await manager.aclose(timeout=5)


def test_max_pending_writes_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="max_pending_writes"):
        ConversationManager(None, max_pending_writes=0)


# ------------------------------------------------------------------ event loops


def test_a_manager_outlives_its_loop_with_the_same_client(redis_server: RedisServer) -> None:
    """asyncio.run per request (Agents SDK run_sync, many web handlers) keeps working."""
    client = aioredis.Redis(port=redis_server.port)
    manager = ConversationManager(None, redis=client)
    room = "loops:1"

    async def first() -> None:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        # A sync write whose persist task dies with this loop: it must still land.
        manager.append(room, "user", "[Message ID: 2] two")

    async def second() -> list[str]:
        assert await manager.update_message_async(room, 1, "[Message ID: 1] one, edited")
        await manager.append_async(room, "assistant", "three")
        await manager.ensure_fresh_from_redis(room)
        return [str(m["content"]) for m in await manager.get_messages_async(room)]

    async def third() -> list[bytes]:
        await manager.drain()
        rows: list[bytes] = await client.lrange(window_key(room), 0, -1)  # type: ignore[assignment]
        await manager.aclose()
        await client.aclose()
        return rows

    asyncio.run(first())
    contents = asyncio.run(second())
    assert contents == ["[Message ID: 1] one, edited", "[Message ID: 2] two", "three"]
    rows = asyncio.run(third())
    assert [orjson.loads(row)["content"] for row in rows] == contents


async def test_reads_from_another_live_loop_are_refused_and_harm_nothing(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    refused: list[str] = []

    def elsewhere() -> None:
        async def calls() -> None:
            for call in (
                lambda: manager.get_messages_async(room),
                lambda: manager.ensure_fresh_from_redis(room),
                lambda: manager.update_message_async(room, 1, "[Message ID: 1] hijack"),
            ):
                try:
                    await call()
                except ConfigurationError as exc:
                    refused.append(str(exc))
            try:
                manager.get_messages(room)
            except ConfigurationError as exc:
                refused.append(str(exc))

        asyncio.run(calls())

    await asyncio.to_thread(elsewhere)
    assert len(refused) == 4 and all("another event loop" in r for r in refused)
    # The owning loop's writes and reads of that room are unharmed.
    assert await manager.update_message_async(room, 1, "[Message ID: 1] edited")
    await manager.append_async(room, "user", "[Message ID: 2] more")
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in manager.get_messages(room)] == [
        "[Message ID: 1] edited",
        "[Message ID: 2] more",
    ]


# ----------------------------------------------------------- reads during a stall


async def test_a_read_behind_a_stalled_persist_waits_one_command_timeout(
    redis_server: RedisServer, room: str
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    control = aioredis.Redis(port=redis_server.port)
    manager = ConversationManager(None, redis=client, command_timeout=2.0)
    try:
        await manager.append_async(room, "user", "[Message ID: 1] before")
        await control.execute_command("CLIENT", "PAUSE", 20_000, "ALL")  # type: ignore[no-untyped-call]
        manager.append(room, "user", "[Message ID: 2] during")
        state = manager._room(room)
        await wait_for(state.lock.locked, "the persist to hold the room")
        loop = asyncio.get_running_loop()
        started = loop.time()
        messages = await manager.get_messages_async(room)
        waited = loop.time() - started
        # Memory, own write included, after at most one timeout (the old code waited
        # for the persist's timeout, then its own: about twice as long).
        assert [m["content"] for m in messages][-1] == "[Message ID: 2] during"
        assert waited < 3.0, waited
        assert manager.stats()["stale_reads"] == 1
    finally:
        await control.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
        await manager.aclose(timeout=30)
        await client.aclose()
        await control.aclose()


# ------------------------------------------------------------ a long outage


async def test_a_long_queue_drains_in_order_with_the_view_intact(
    server_and_client: tuple[RedisServer, aioredis.Redis], room: str
) -> None:
    server, client = server_and_client
    manager = ConversationManager(
        None, redis=client, command_timeout=0.5, retry_backoff=(0.01, 0.05), max_history=50
    )
    other_client = aioredis.Redis(port=server.port)
    other = ConversationManager(None, redis=other_client, max_history=50)
    try:
        await manager.append_async(room, "user", "[Message ID: 0] start")
        server.stop()
        for i in range(1, 3000):
            manager.append(room, "user", f"[Message ID: {i}] t{i}")
            if i % 700 == 0:
                assert manager.update_message(room, i, f"[Message ID: {i}] edited {i}")
        server.start()
        await other.append_async(room, "user", "[Message ID: other] from another worker")
        await manager.drain(timeout=60)
        await manager.ensure_fresh_from_redis(room)
        await other.ensure_fresh_from_redis(room)
        ids = await stored_ids(client, room)
        assert ids == [f"{i}" for i in range(2950, 3000)]
        assert manager.get_messages(room) == other.get_messages(room)
    finally:
        await manager.aclose(timeout=5)
        await other.aclose(timeout=5)
        await other_client.aclose()
