"""SPEC §4.21 consolidation: fold old turns into a rolling summary, archive them atomically."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer
from support import window_key

import conversation._consolidation.plan as consolidation_module
from conversation import (
    ConfigurationError,
    ConsolidationConfig,
    ConsolidationError,
    ConsolidationWorker,
    ConversationManager,
    ExtractiveSummarizer,
    format_transcript,
)
from conversation._entries import Cell, cell_bytes, first_text

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
Turn = dict[str, Any]
MARKER = re.compile(r"\[Message ID: ([^\]]+)\]")
PREFIX = ConsolidationConfig().summary_prefix
CONFIG = ConsolidationConfig(max_turns=20, keep_recent=5, min_fold=2)


async def redis_state(client: aioredis.Redis, room: str) -> tuple[list[bytes], Any, list[bytes]]:
    base = window_key(room)
    rows = await client.lrange(base, 0, -1)
    meta = await client.hgetall(base + ":meta")
    archive = await client.lrange(base + ":archive", 0, -1)
    return list(rows), meta, list(archive)  # type: ignore[arg-type]


async def fill(manager: ConversationManager, room: str, ids: range) -> None:
    for i in ids:
        role = "user" if i % 2 == 0 else "assistant"
        await manager.append_async(room, role, f"[Message ID: {i}] turn {i}. We will meet at {i}.")


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    """Wait on a real condition, yielding to the loop (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def stored_ids(manager: ConversationManager, room: str) -> list[str | None]:
    return list(manager._room(room).view.window.ids)


async def all_ids(manager: ConversationManager, room: str) -> list[str]:
    """Archived turns then live turns (summary left out): the whole history, in order."""
    archived = [t["message_id"] for batch in await manager.list_archives(room) for t in batch.turns]
    await manager.ensure_fresh_from_redis(room)
    live = [i for i in stored_ids(manager, room) if i is not None and not i.startswith("summary:")]
    return archived + live


class Recorder:
    """A summariser that records its calls and can run a hook while it 'thinks'."""

    def __init__(self, hook: Callable[[int], Any] | None = None) -> None:
        self.requests: list[tuple[str, list[Turn]]] = []
        self.hook = hook

    async def __call__(self, prompt: str, turns: list[Turn]) -> str:
        self.requests.append((prompt, turns))
        if self.hook is not None:
            await self.hook(len(self.requests))
        ids = [(MARKER.findall(str(t["content"])) or ["?"])[0] for t in turns]
        return f"summary {len(self.requests)} of {','.join(ids)}"


# ------------------------------------------------------------------ the fold itself


async def test_fold_replaces_the_head_by_one_summary_and_archives_exactly_those_turns(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    reader = make_manager(any_client)
    await fill(manager, room, range(24))
    await reader.get_messages_async(room)
    reloads = reader.stats()["reloads"]
    rows_before, meta_before, _ = await redis_state(any_client, room)
    assert manager.should_consolidate(room)
    result = await manager.consolidate(room, Recorder())
    assert (result.outcome, result.folded, result.seq, result.attempts) == ("folded", 19, 1, 1)
    assert result.summary_id == "summary:1"

    rows, meta, archive = await redis_state(any_client, room)
    assert rows[1:] == rows_before[19:]
    assert orjson.loads(rows[0]) == {
        "message_id": "summary:1",
        "role": "system",
        "content": PREFIX + "summary 1 of " + ",".join(map(str, range(19))),
    }
    assert int(meta[b"version"]) == int(meta_before[b"version"]) + 1
    assert int(meta[b"base"]) == int(meta[b"version"])  # every other worker reloads
    # The archive: its header (lua/_lib.lua), the folded rows as the window held them,
    # then the fold's commit record, which counts them.
    assert archive[0].startswith(b"~a2|") and archive[1:-1] == rows_before[:19]
    assert orjson.loads(archive[-1])["rows"] == 19
    [batch] = await manager.list_archives(room)
    assert [orjson.dumps(turn) for turn in batch.turns] == rows_before[:19]
    assert (batch.seq, batch.summary_id, batch.replaces) == (1, "summary:1", None)
    assert batch.summary == "summary 1 of " + ",".join(map(str, range(19)))

    # Other workers see the summary first, as a plain system message.
    messages = await reader.get_messages_async(room)
    assert messages[0] == {"role": "system", "content": PREFIX + batch.summary}
    assert [m["content"] for m in messages[1:]] == [
        f"[Message ID: {i}] turn {i}. We will meet at {i}." for i in range(19, 24)
    ]
    assert reader.stats()["reloads"] == reloads + 1
    assert manager.stats()["folds"] == 1
    assert not manager.should_consolidate(room)
    assert (await manager.consolidate(room, Recorder())).outcome == "nothing_to_fold"


async def test_rolling_summary_is_fed_forward_and_stays_alone_at_the_head(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    summarize = Recorder()
    await fill(manager, room, range(12))
    assert (await manager.consolidate(room, summarize)).seq == 1
    await fill(manager, room, range(12, 30))
    result = await manager.consolidate(room, summarize)
    assert (result.outcome, result.seq, result.folded) == ("folded", 2, 18)
    prompt, turns = summarize.requests[1]
    first_summary = "summary 1 of " + ",".join(map(str, range(7)))
    assert f"<summary>\n{first_summary}\n</summary>" in prompt  # the consolidation template
    assert turns[0]["content"].startswith("[Message ID: 7]")
    ids = stored_ids(manager, room)
    assert ids[0] == "summary:2"
    assert sum(1 for i in ids if i and i.startswith("summary:")) == 1
    batches = await manager.list_archives(room)
    assert [(b.seq, b.replaces) for b in batches] == [(1, None), (2, "summary:1")]
    assert await all_ids(manager, room) == [str(i) for i in range(30)]


async def test_tool_call_groups_are_never_split(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    pending = {"id": "c2", "type": "function", "function": {"name": "wait", "arguments": "{}"}}
    await fill(manager, room, range(6))
    await manager.append_async(room, "assistant", "", tool_calls=[call], message_id="a1")
    await manager.append_async(room, "tool", "42", tool_call_id="c1", message_id="t1")
    await manager.append_async(room, "tool", "43", tool_call_id="c1", message_id="t2")
    await fill(manager, room, range(6, 8))
    # keep_recent=3 would cut between the call and its two results: the group stays.
    result = await manager.consolidate(room, Recorder(), keep_recent=3)
    assert result.folded == 6
    assert stored_ids(manager, room) == ["summary:1", "a1", "t1", "t2", "6", "7"]
    # A call still waiting for its results is not folded either.
    await manager.append_async(room, "assistant", "", tool_calls=[pending], message_id="a2")
    result = await manager.consolidate(room, Recorder(), keep_recent=0)
    assert result.folded == 5
    assert stored_ids(manager, room) == ["summary:2", "a2"]


async def test_pinned_first_user_message_stays_after_the_summary(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    config = ConsolidationConfig(max_turns=20, keep_recent=3, min_fold=2, pin_first_user=True)
    manager = make_manager(any_client, consolidation=config)
    await manager.append_async(room, "assistant", "[Message ID: hello] welcome")
    await fill(manager, room, range(10))
    await manager.consolidate(room, Recorder())
    assert stored_ids(manager, room) == ["summary:1", "0", "7", "8", "9"]
    await fill(manager, room, range(10, 16))
    await manager.consolidate(room, Recorder())
    assert stored_ids(manager, room) == ["summary:2", "0", "13", "14", "15"]
    archived = [t["message_id"] for b in await manager.list_archives(room) for t in b.turns]
    assert archived == ["hello", *map(str, range(1, 13))]
    other = make_manager(any_client)
    assert [m["role"] for m in await other.get_messages_async(room)][:2] == ["system", "user"]


async def test_fold_script_refuses_a_stale_plan_and_changes_nothing(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """The script on its own (Lua 5.1 on Redis, 5.4 on fakeredis): head, rows, tool check."""
    manager = make_manager(any_client)
    await fill(manager, room, range(6))
    await manager.append_async(room, "tool", "r", tool_call_id="c", message_id="t")
    await manager.ensure_fresh_from_redis(room)
    store = manager._store
    assert store is not None
    state = manager._room(room).synced
    rows = state.window.rows
    before = await redis_state(any_client, room)

    async def fold(head: int, n: int, keep: int = -1, fold_rows: list[bytes] | None = None) -> int:
        reply = await store.fold(
            manager._room(room).keys, state, "", epoch=state.epoch, tag=state.tag, head=head,
            rows=rows[:n] if fold_rows is None else fold_rows, keep=keep,
            summary_row=b'{"message_id":"summary:1","role":"system","content":"s"}',
            record=b'{"seq":1}', archive_cap=10,
        )  # fmt: skip
        return reply.status

    assert await fold(head=state.head + 1, n=3) == 0  # the head moved
    assert await fold(head=state.head, n=3, fold_rows=[rows[0], rows[2], rows[1]]) == 0
    assert await fold(head=state.head, n=6) == 0  # a tool result would start the window
    assert await fold(head=state.head, n=3, keep=3) == 0  # keep outside the fold
    assert await fold(head=state.head, n=1, keep=0) == 0  # nothing would leave the window
    assert await redis_state(any_client, room) == before
    assert await fold(head=state.head, n=3, keep=1) == 1
    after, _, records = await redis_state(any_client, room)
    assert after == [after[0], rows[1], *rows[3:]]
    # After the header: the folded rows (not the kept one), then the commit record.
    assert records[1:] == [rows[0], rows[2], b'{"seq":1,"rows":2}']


async def test_archive_is_capped_expires_and_summaries_carry_no_markers(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    config = ConsolidationConfig(
        max_turns=20, keep_recent=2, min_fold=2, archive_max_batches=2, archive_ttl_seconds=500
    )
    manager = make_manager(any_client, consolidation=config, ttl_seconds=100)

    async def marked(prompt: str, turns: list[Turn]) -> str:
        return "  [Message ID: 5] was promised  "

    for batch in range(3):
        await fill(manager, room, range(batch * 10, batch * 10 + 10))
        assert (await manager.consolidate(room, marked)).seq == batch + 1
    batches = await manager.list_archives(room)
    assert [b.seq for b in batches] == [2, 3]  # the oldest record went first
    assert batches[0].summary == "(msg 5) was promised"
    assert 100_000 < await any_client.pttl(window_key(room) + ":archive") <= 500_000
    assert 0 < await any_client.pttl(window_key(room)) <= 100_000


# --------------------------------------------------------- failures change nothing


async def test_a_failing_or_cancelled_summariser_changes_nothing(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    await fill(manager, room, range(24))
    before = await redis_state(redis_client, room)
    messages = manager.get_messages(room)

    async def broken(prompt: str, turns: list[Turn]) -> str:
        raise RuntimeError("model overloaded")

    with pytest.raises(ConsolidationError) as caught:
        await manager.consolidate(room, broken)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert caught.value.room_id == room

    async def empty(prompt: str, turns: list[Turn]) -> str:
        return "   "

    with pytest.raises(ConsolidationError):
        await manager.consolidate(room, empty)

    started, never = asyncio.Event(), asyncio.Event()

    async def slow(prompt: str, turns: list[Turn]) -> str:
        started.set()
        await never.wait()
        return "too late"

    task = asyncio.create_task(manager.consolidate(room, slow))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await redis_state(redis_client, room) == before
    assert manager.get_messages(room) == messages
    assert await manager.list_archives(room) == []
    assert (await manager.consolidate(room, Recorder())).outcome == "folded"


async def test_an_edit_of_a_folded_turn_during_the_summary_is_not_lost(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    editor = make_manager(redis_client)
    await fill(manager, room, range(24))

    async def edit_once(call: int) -> None:
        if call == 1:
            assert await editor.update_message_async(room, 3, "[Message ID: 3] edited")

    summarize = Recorder(edit_once)
    result = await manager.consolidate(room, summarize)
    assert (result.outcome, result.attempts, result.summarizer_calls) == ("folded", 2, 2)
    assert summarize.requests[1][1][3]["content"] == "[Message ID: 3] edited"
    [batch] = await manager.list_archives(room)
    assert batch.turns[3]["content"] == "[Message ID: 3] edited"
    assert manager.stats()["conflicts"] == 1
    # Once folded, the turn has left the window: a later edit finds nothing.
    assert not await editor.update_message_async(room, 3, "[Message ID: 3] too late")
    assert (await manager.list_archives(room))[0].turns[3]["content"] == "[Message ID: 3] edited"


async def test_a_clear_during_the_summary_gives_up_cleanly(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    other = make_manager(redis_client)
    await fill(manager, room, range(24))

    async def clear(call: int) -> None:
        await other.clear_async(room)

    result = await manager.consolidate(room, Recorder(clear))
    assert (result.outcome, result.attempts, result.folded) == ("nothing_to_fold", 1, 0)
    rows, _, archive = await redis_state(redis_client, room)
    assert rows == archive == []
    assert manager.get_messages(room) == []


async def test_turns_appended_during_the_summary_stay_in_order(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    other = make_manager(redis_client)
    await fill(manager, room, range(24))

    async def append(call: int) -> None:
        await fill(other, room, range(24, 30))

    result = await manager.consolidate(room, Recorder(append))
    assert (result.outcome, result.attempts, result.folded) == ("folded", 1, 19)
    assert stored_ids(manager, room) == ["summary:1", *map(str, range(19, 30))]
    assert await all_ids(other, room) == [str(i) for i in range(30)]


async def test_a_room_that_keeps_changing_is_given_up_without_writing(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    editor = make_manager(redis_client)
    await fill(manager, room, range(24))

    async def edit(call: int) -> None:
        assert await editor.patch_reactions_async(room, 0, f"x{call}")

    result = await manager.consolidate(room, Recorder(edit))
    assert (result.outcome, result.attempts, result.summarizer_calls) == ("conflict", 3, 3)
    assert await manager.list_archives(room) == []
    assert len(await redis_client.lrange(window_key(room), 0, -1)) == 24


# ------------------------------------------------------------ many workers at once


def _writer(port: int, room: str, first: int, count: int, out: str) -> None:
    """Another process: appends turns and edits recent ones while the test folds."""
    import asyncio

    import redis.asyncio as aioredis

    from conversation import ConversationManager

    async def main() -> list[tuple[int, str, bool]]:
        client = aioredis.Redis(port=port)
        manager = ConversationManager(None, max_history=1000, redis=client)
        rng = random.Random(7)
        edits = []
        for i in range(first, first + count):
            role = "user" if i % 2 == 0 else "assistant"
            await manager.append_async(room, role, f"[Message ID: {i}] turn {i}.")
            if i % 3 == 0:
                target = rng.randrange(max(0, i - 30), i)
                text = f"[Message ID: {target}] edited at {i}"
                edits.append((target, text, await manager.update_message_async(room, target, text)))
        await manager.aclose()
        await client.aclose()
        return edits

    Path(out).write_text(json.dumps(asyncio.run(main())))


@pytest.mark.slow
async def test_fold_while_another_process_appends_and_edits(
    redis_server: RedisServer, make_manager: Make, room: str, tmp_path: Path
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    try:
        await _fold_while_another_process_writes(client, make_manager, redis_server, room, tmp_path)
    finally:
        await client.aclose()


async def _fold_while_another_process_writes(
    client: aioredis.Redis, make_manager: Make, redis_server: RedisServer, room: str, tmp_path: Path
) -> None:
    manager = make_manager(client, max_history=1000, consolidation=CONFIG)
    await fill(manager, room, range(30))
    originals = {str(i): f"[Message ID: {i}] turn {i}. We will meet at {i}." for i in range(30)}
    originals.update({str(i): f"[Message ID: {i}] turn {i}." for i in range(30, 230)})
    out = tmp_path / "edits.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_writer, args=(redis_server.port, room, 30, 200, str(out))
    )

    async def turns_arrive(count: int) -> None:
        """Wait until the other process appended ``count`` more turns (or exited)."""
        length = await client.llen(window_key(room))

        async def grown() -> bool:
            now = await client.llen(window_key(room))
            return now >= length + count or not process.is_alive()

        await until(grown, "turns from the other process")

    calls: list[int] = []

    async def while_turns_arrive(prompt: str, turns: list[Turn]) -> str:
        calls.append(len(turns))
        if len(calls) == 1:  # the other process appends and edits while we "think"
            await turns_arrive(3)
        return f"{len(turns)} turns"

    process.start()
    outcomes = []
    try:
        while process.is_alive():
            calls.clear()
            result = await manager.consolidate(room, while_turns_arrive, keep_recent=5)
            outcomes.append((result.outcome, result.attempts))
            await turns_arrive(8)
    finally:
        await asyncio.to_thread(process.join, 60)
    assert process.exitcode == 0
    await manager.consolidate(room, while_turns_arrive, keep_recent=5)
    # Edits that land inside the rows being folded make whole consolidations give
    # up (max_attempts conflicts in a row: seen on a loaded machine, before issue
    # 15 too); what must hold is that folds still land while the other process
    # writes, and (below) that nothing is lost, doubled or reordered.
    assert sum(outcome == "folded" for outcome, _ in outcomes) >= 1, outcomes

    # Nothing lost, nothing twice, in order: archive batches then the live window.
    assert await all_ids(manager, room) == [str(i) for i in range(230)]
    expected = dict(originals)
    for target, text, applied in json.loads(out.read_text()):
        if applied:
            expected[str(target)] = text
    batches = await manager.list_archives(room)
    final = {t["message_id"]: t["content"] for b in batches for t in b.turns}
    rows = manager._room(room).synced.window.rows
    final.update({e["message_id"]: e["content"] for e in map(orjson.loads, rows)})
    assert {k: final[k] for k in expected} == expected


async def test_two_workers_racing_on_one_room_fold_each_batch_once(
    redis_client: aioredis.Redis, redis_server: RedisServer, make_manager: Make, room: str
) -> None:
    second_client = aioredis.Redis(port=redis_server.port)
    a = make_manager(redis_client, consolidation=CONFIG)
    b = make_manager(second_client, consolidation=CONFIG)
    await fill(a, room, range(24))
    inside, go = asyncio.Event(), asyncio.Event()

    async def blocked(prompt: str, turns: list[Turn]) -> str:
        inside.set()
        await go.wait()
        return "from a"

    worker_a = ConsolidationWorker(a, blocked, rooms=[room])
    worker_b = ConsolidationWorker(b, Recorder(), rooms=[room])
    run_a = asyncio.create_task(worker_a.run_once())
    await inside.wait()
    assert await worker_b.run_once() == []  # the room is leased by a
    assert worker_b.stats.leased_elsewhere == 1
    go.set()
    [result] = await run_a
    assert result.outcome == "folded"
    assert await redis_client.exists(window_key(room) + ":lease") == 0  # released
    assert await worker_b.run_once() == []  # below the threshold now

    # Without the lease (direct calls), the fold script alone lets one fold land.
    await fill(a, room, range(24, 48))
    both_inside = asyncio.Barrier(2)

    async def together(prompt: str, turns: list[Turn]) -> str:
        await both_inside.wait()
        return f"{len(turns)} turns"

    results = await asyncio.gather(a.consolidate(room, together), b.consolidate(room, together))
    assert sorted(r.outcome for r in results) == ["folded", "nothing_to_fold"]
    batches = await a.list_archives(room)
    assert len(batches) == 2
    assert await all_ids(b, room) == [str(i) for i in range(48)]
    await second_client.aclose()


async def test_a_crashed_workers_lease_expires_and_only_its_holder_releases_it(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    await fill(manager, room, range(24))
    store = manager._store
    assert store is not None
    lease = window_key(room) + ":lease"
    assert await store.lease_acquire(lease, "crashed", 300)
    assert not await store.lease_acquire(lease, "other", 300)
    assert not await store.lease_release(lease, "other")
    assert not await store.lease_renew(lease, "other", 60_000)
    worker = ConsolidationWorker(manager, Recorder(), rooms=lambda: [room])
    assert await worker.run_once() == []

    async def expired() -> bool:
        return not await redis_client.exists(lease)

    await until(expired, "the crashed worker's lease to expire")
    [result] = await worker.run_once()
    assert result.outcome == "folded"
    assert await store.lease_acquire(lease, "me", 60_000)
    assert await store.lease_renew(lease, "me", 60_000)
    assert await store.lease_release(lease, "me")
    assert not await redis_client.exists(lease)


async def test_worker_finds_rooms_in_redis_and_folds_those_past_the_threshold(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(any_client)
    await fill(writer, room + ":big", range(24))
    await fill(writer, room + ":small", range(8))
    tokens = "word " * 20_000
    await writer.append_async(room + ":heavy", "user", "[Message ID: 0] " + tokens)
    await fill(writer, room + ":heavy", range(1, 10))
    worker_manager = make_manager(any_client, consolidation=CONFIG)
    worker = ConsolidationWorker(worker_manager)
    results = await worker.run_once()
    assert sorted((r.room_id, r.outcome) for r in results) == [
        (room + ":big", "folded"),
        (room + ":heavy", "folded"),
    ]
    assert await worker.run_once() == []
    stop, looper = asyncio.Event(), ConsolidationWorker(worker_manager, interval=60)
    looping = asyncio.create_task(looper.run(stop))

    async def passed() -> bool:
        return looper.stats.passes >= 1

    await until(passed, "a first pass of the worker loop")
    stop.set()
    await asyncio.wait_for(looping, 10)  # the stop event wakes it, no interval wait


@pytest.mark.slow
async def test_consolidation_on_a_real_cluster(tmp_path: Path) -> None:
    """3 primaries: each fold touches one slot, SCAN finds rooms on every node, NOSCRIPT heals."""
    from cluster_servers import LocalCluster
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.crc import key_slot

    cluster = LocalCluster(tmp_path / "cluster", replicas_per_primary=0).start()
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
    writer = ConversationManager(None, redis=client)
    manager = ConversationManager(None, redis=client, consolidation=CONFIG)
    try:
        rooms = [f"cluster-{i}" for i in range(6)]
        owners = {cluster.slot_owner(key_slot(window_key(r).encode())).port for r in rooms}
        assert len(owners) > 1
        for room in rooms:
            await fill(writer, room, range(24))
        for port in cluster.primary_ports():
            async with aioredis.Redis(port=port) as node:
                await node.script_flush()
                await node.function_flush()
        # Several rooms at once: their syncs and folds share loop ticks, which on a
        # cluster go out concurrently, each to its slot's primary.
        results = await ConsolidationWorker(manager, concurrency=6).run_once()
        assert sorted(r.room_id for r in results if r.outcome == "folded") == rooms
        for room in rooms:
            assert await all_ids(writer, room) == [str(i) for i in range(24)]
    finally:
        await manager.aclose()
        await writer.aclose()
        await client.aclose()
        cluster.stop()


# ------------------------------------------- bounded folds of big windows (issue 12)

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 60_000}}
#: Bytes of rows per archive call in these tests: a 40-turn window of images takes ten.
CALL_BYTES = 200_000


async def fill_images(manager: ConversationManager, room: str, ids: range) -> None:
    for i in ids:
        role = "user" if i % 2 == 0 else "assistant"
        text = f"[Message ID: {i}] picture {i}. We will meet at {i}."
        await manager.append_async(room, role, [{"type": "text", "text": text}, IMAGE])


class FoldCalls:
    """Records the rows each script call of a fold archives; runs a hook after a stage."""

    def __init__(
        self, manager: ConversationManager, rows: list[bytes], after_stage: Any = None
    ) -> None:
        store = manager._store
        assert store is not None
        self.rows = rows
        self.staged: list[int] = []  # bytes of rows per stage call
        self.folds: list[tuple[int, int, int]] = []  # (bytes archived, status, reply kind)
        self.after_stage = after_stage
        real_stage, real_fold = store.stage, store.fold

        async def stage(*args: Any, **kwargs: Any) -> bool:
            self.staged.append(self.size(kwargs["ranges"]))
            accepted = await real_stage(*args, **kwargs)
            if self.after_stage is not None:
                await self.after_stage(len(self.staged))
            return accepted

        async def fold(*args: Any, **kwargs: Any) -> Any:
            reply = await real_fold(*args, **kwargs)
            self.folds.append((self.size(kwargs["archived"]), reply.status, reply.kind))
            return reply

        store.stage = stage  # type: ignore[method-assign]
        store.fold = fold  # type: ignore[method-assign]

    def size(self, ranges: Any) -> int:
        return sum(len(self.rows[i]) for first, last in ranges for i in range(first, last + 1))


async def test_a_big_image_window_folds_in_bounded_calls_and_archives_every_row_in_order(
    any_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consolidation_module, "ARCHIVE_CALL_BYTES", CALL_BYTES)
    manager = make_manager(any_client, consolidation=CONFIG)
    await fill_images(manager, room, range(40))
    rows_before, _, _ = await redis_state(any_client, room)
    calls = FoldCalls(manager, rows_before)
    sent = manager.stats()["bytes_sent"]

    result = await manager.consolidate(room, Recorder())
    assert (result.outcome, result.folded, result.attempts) == ("folded", 35, 1)
    # Every call archived at most CALL_BYTES of rows (three of these): eleven staged
    # them before the fold script itself, which archived the last two.
    assert len(calls.staged) == 11 and len(calls.folds) == 1
    assert max([*calls.staged, calls.folds[0][0]]) <= CALL_BYTES
    assert sum(calls.staged) + calls.folds[0][0] == sum(map(len, rows_before[:35]))
    # The rows never travel back to Redis: the script checks the log, not their bytes.
    assert manager.stats()["bytes_sent"] - sent < 10_000

    rows, _, archive = await redis_state(any_client, room)
    assert rows[1:] == rows_before[35:]
    assert archive[0].startswith(b"~a2|")
    assert archive[1:-1] == rows_before[:35]  # one element per row, in order
    assert orjson.loads(archive[-1])["rows"] == 35
    [batch] = await manager.list_archives(room)
    assert [orjson.dumps(turn) for turn in batch.turns] == rows_before[:35]
    assert batch.summary == "summary 1 of " + ",".join(map(str, range(35)))
    # The folding worker was patched by the fold's reply, not sent the kept window.
    assert calls.folds[0][1:] == (1, 1)
    assert manager._room(room).synced.window.rows == rows
    other = make_manager(any_client)
    messages = await other.get_messages_async(room)
    assert messages == manager.get_messages(room)
    assert messages[0]["content"] == PREFIX + batch.summary
    assert await all_ids(other, room) == [str(i) for i in range(40)]


async def test_writes_during_a_big_fold_are_kept_and_an_edit_of_a_folded_row_restarts_it(
    any_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consolidation_module, "ARCHIVE_CALL_BYTES", CALL_BYTES)
    manager = make_manager(any_client, consolidation=CONFIG)
    other = make_manager(any_client)
    await fill_images(manager, room, range(40))
    rows_before, _, _ = await redis_state(any_client, room)

    async def between_stages(count: int) -> None:
        if count == 1:  # appends and edits of kept turns never conflict with a fold
            await fill(other, room, range(40, 43))
            assert await other.update_message_async(room, 38, "[Message ID: 38] kept, edited")
            assert await other.patch_reactions_async(room, 41, "👍 2")
        elif count == 3:  # an edit of a folded turn while its rows are being staged
            assert await other.update_message_async(room, 3, "[Message ID: 3] folded, edited")

    calls = FoldCalls(manager, rows_before, between_stages)
    summarize = Recorder()
    result = await manager.consolidate(room, summarize)
    assert (result.outcome, result.attempts, result.summarizer_calls) == ("folded", 2, 2)
    # The first attempt stopped at the stage call after the edit and wrote nothing
    # that counts; the second summarised the edited turn.
    assert calls.folds == [(calls.folds[0][0], 1, 1)]
    assert first_text(summarize.requests[1][1][3]["content"]) == "[Message ID: 3] folded, edited"
    [batch] = await manager.list_archives(room)
    assert first_text(batch.turns[3]["content"]) == "[Message ID: 3] folded, edited"
    _, _, archive = await redis_state(any_client, room)
    # The second plan folds the 3 turns appended meanwhile too (5 are kept), and no row
    # staged by the abandoned attempt is left.
    assert [t["message_id"] for t in batch.turns] == [str(i) for i in range(38)]
    assert len(archive) == 1 + 38 + 1
    assert await all_ids(other, room) == [str(i) for i in range(43)]
    texts = [first_text(m["content"]) or "" for m in await other.get_messages_async(room)]
    assert "[Message ID: 38] kept, edited" in texts
    assert any("[Reactions: 👍 2]" in text for text in texts)
    assert await other.get_messages_async(room) == manager.get_messages(room)


async def test_a_worker_behind_when_its_fold_lands_is_patched_to_match_redis(
    any_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consolidation_module, "ARCHIVE_CALL_BYTES", CALL_BYTES)
    manager = make_manager(any_client, consolidation=CONFIG)
    other = make_manager(any_client)
    await fill_images(manager, room, range(40))
    rows_before, _, _ = await redis_state(any_client, room)

    async def write_once(count: int) -> None:
        if count == 1:  # the folding worker does not see these before its fold lands
            await fill(other, room, range(40, 42))
            assert await other.update_message_async(room, 37, "[Message ID: 37] kept, edited")

    calls = FoldCalls(manager, rows_before, write_once)
    result = await manager.consolidate(room, Recorder())
    assert (result.outcome, result.attempts) == ("folded", 1)
    assert calls.folds[0][1:] == (1, 1)  # an incremental reply: the edit and the new rows
    rows, _, _ = await redis_state(any_client, room)
    assert manager._room(room).synced.window.rows == rows
    assert manager.get_messages(room) == await other.get_messages_async(room)
    assert await all_ids(other, room) == [str(i) for i in range(42)]


async def test_an_edit_while_a_big_window_is_summarised_refuses_the_fold_as_before(
    any_client: aioredis.Redis, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consolidation_module, "ARCHIVE_CALL_BYTES", CALL_BYTES)
    manager = make_manager(any_client, consolidation=CONFIG)
    editor = make_manager(any_client)
    await fill_images(manager, room, range(40))
    rows_before, _, _ = await redis_state(any_client, room)
    calls = FoldCalls(manager, rows_before)

    async def edit_once(call: int) -> None:
        if call == 1:
            assert await editor.update_message_async(room, 0, "[Message ID: 0] edited")

    result = await manager.consolidate(room, Recorder(edit_once))
    assert (result.outcome, result.attempts, result.summarizer_calls) == ("folded", 2, 2)
    assert calls.staged[0] > 0 and manager.stats()["conflicts"] == 1
    [batch] = await manager.list_archives(room)
    assert first_text(batch.turns[0]["content"]) == "[Message ID: 0] edited"
    assert [t["message_id"] for t in batch.turns] == [str(i) for i in range(35)]


async def test_staged_rows_of_an_abandoned_fold_never_count_and_the_next_fold_drops_them(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    await fill(manager, room, range(24))
    store = manager._store
    assert store is not None
    state = manager._room(room).synced
    # A worker that staged rows for its fold and crashed before the fold script.
    assert await store.stage(
        manager._room(room).keys, state, epoch=state.epoch, tag=state.tag, head=state.head,
        version=state.version, n=19, fold_id="crashed", before=0, ranges=[(0, 9)],
    )  # fmt: skip
    _, _, archive = await redis_state(any_client, room)
    assert len(archive) == 1 + 10
    assert await manager.list_archives(room) == []  # staged, never committed
    result = await manager.consolidate(room, Recorder())
    assert result.outcome == "folded"
    _, _, archive = await redis_state(any_client, room)
    assert len(archive) == 1 + 19 + 1
    [batch] = await manager.list_archives(room)
    assert [t["message_id"] for t in batch.turns] == [str(i) for i in range(19)]
    # A stage call planned on a window that has changed since is refused.
    assert not await store.stage(
        manager._room(room).keys, state, epoch=state.epoch, tag=state.tag, head=state.head,
        version=state.version, n=19, fold_id="late", before=0, ranges=[(0, 9)],
    )  # fmt: skip
    assert (await redis_state(any_client, room))[2] == archive


async def test_a_damaged_fold_in_the_archive_is_skipped_and_counted(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    for batch in range(3):
        await fill(manager, room, range(batch * 20, batch * 20 + 20))
        await manager.consolidate(room, Recorder())
    # Element 0 is the header; 1 is the first row of the first fold.
    await any_client.lset(window_key(room) + ":archive", 1, b"not json")  # type: ignore[arg-type]
    before = manager.stats()["corrupt_rows"]
    assert [b.seq for b in await manager.list_archives(room)] == [2, 3]
    assert manager.stats()["corrupt_rows"] == before + 1


async def test_the_archive_is_capped_in_bytes_oldest_folds_first(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    small = ConsolidationConfig(max_turns=20, keep_recent=2, min_fold=2, archive_max_bytes=2_500)
    manager = make_manager(any_client, consolidation=small)
    sizes = []
    for batch in range(4):
        await fill(manager, room, range(batch * 10, batch * 10 + 10))
        assert (await manager.consolidate(room, Recorder())).seq == batch + 1
        _, _, archive = await redis_state(any_client, room)
        sizes.append(sum(map(len, archive[1:])))
    batches = await manager.list_archives(room)
    assert [b.seq for b in batches] == [3, 4]  # about 1 KB a fold: two fit
    assert max(sizes) <= 2_500
    assert await all_ids(manager, room) == [str(i) for i in range(18, 40)]
    # The newest fold stays even when it alone is over the cap.
    tiny = ConsolidationConfig(max_turns=20, keep_recent=2, min_fold=2, archive_max_bytes=100)
    other_room = room + ":tiny"
    manager = make_manager(any_client, consolidation=tiny)
    for batch in range(2):
        await fill(manager, other_room, range(batch * 10, batch * 10 + 10))
        await manager.consolidate(other_room, Recorder())
    assert [b.seq for b in await manager.list_archives(other_room)] == [2]
    _, _, archive = await redis_state(any_client, other_room)
    assert archive[0].split(b"|")[4] == b"1"  # the header counts one fold


async def test_a_memory_only_archive_has_the_same_caps(make_manager: Make, room: str) -> None:
    config = ConsolidationConfig(max_turns=20, keep_recent=2, min_fold=2, archive_max_bytes=2_500)
    manager = make_manager(None, consolidation=config)
    for batch in range(4):
        await fill(manager, room, range(batch * 10, batch * 10 + 10))
        await manager.consolidate(room, Recorder())
    assert [b.seq for b in await manager.list_archives(room)] == [3, 4]
    assert await all_ids(manager, room) == [str(i) for i in range(18, 40)]


async def test_archives_of_the_previous_engine_stay_readable_and_count_towards_the_cap(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    old_turn = {"message_id": "old", "role": "user", "content": "[Message ID: old] hello"}
    old = {"seq": 7, "summary_id": "summary:7", "summary": "before", "replaces": None,
           "folded_at": "2026-01-01T00:00", "corrupt_rows": 0, "turns": [old_turn]}  # fmt: skip
    await any_client.rpush(window_key(room) + ":archive", orjson.dumps(old))
    config = ConsolidationConfig(max_turns=20, keep_recent=2, min_fold=2, archive_max_batches=2)
    manager = make_manager(any_client, consolidation=config)
    await fill(manager, room, range(10))
    await manager.consolidate(room, Recorder())
    batches = await manager.list_archives(room)
    assert (batches[0].seq, batches[0].summary) == (7, "before")
    assert batches[0].turns == [old_turn] and batches[1].seq == 1
    # Another engine's record pushed after ours is adopted as a fold, not discarded.
    await any_client.rpush(window_key(room) + ":archive", orjson.dumps({**old, "seq": 8}))
    assert [b.seq for b in await manager.list_archives(room)] == [7, 1]  # not committed here
    await fill(manager, room, range(10, 20))
    await manager.consolidate(room, Recorder())
    assert [b.seq for b in await manager.list_archives(room)] == [8, 2]  # the cap: 2 folds


async def test_should_consolidate_estimates_each_row_once(
    make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    real = consolidation_module._cell_tokens

    def counting(cell: Cell, role: str) -> int:
        parsed.append(cell_bytes(cell))
        return real(cell, role)

    monkeypatch.setattr(consolidation_module, "_cell_tokens", counting)
    config = ConsolidationConfig(max_turns=50, keep_recent=2, min_fold=2, max_tokens=100_000)
    manager = make_manager(None, consolidation=config)
    await fill_images(manager, room, range(10))
    assert not manager.should_consolidate(room)
    assert len(parsed) == 10
    assert not manager.should_consolidate(room)
    assert len(parsed) == 10  # nothing parsed again
    assert await manager.update_message_async(room, 4, "[Message ID: 4] now text only")
    await manager._consolidation.prepare(room)  # the worker's path: estimated in slices
    assert len(parsed) == 11
    assert not manager.should_consolidate(room)
    assert len(parsed) == 11


# ---------------------------------------------------------------- other modes


async def test_memory_only_manager_consolidates_too(make_manager: Make, room: str) -> None:
    manager = make_manager(None, consolidation=CONFIG)
    await fill(manager, room, range(24))
    assert manager.should_consolidate(room)
    [result] = await ConsolidationWorker(manager).run_once()
    assert (result.outcome, result.folded) == ("folded", 19)
    assert stored_ids(manager, room)[0] == "summary:1"
    assert await all_ids(manager, room) == [str(i) for i in range(24)]
    summary = manager.get_messages(room)[0]["content"]
    assert "(msg 0)" in summary and "[Message ID" not in summary


async def test_the_prompt_comes_from_the_users_template_folder_first(
    make_manager: Make, room: str, tmp_path: Path
) -> None:
    (tmp_path / "consolidation.j2").write_text("Custom for {{ room_id }}: {{ summary }}|{{ team }}")
    config = ConsolidationConfig(
        max_turns=20, keep_recent=5, min_fold=2, template_dirs=(str(tmp_path),)
    )
    manager = make_manager(None, consolidation=config)
    await fill(manager, room, range(12))
    summarize = Recorder()
    await manager.consolidate(room, summarize, room_context={"team": "blue", "summary": "forged"})
    await fill(manager, room, range(12, 24))
    await manager.consolidate(room, summarize)
    first, second = summarize.requests
    assert first[0] == f"Custom for {room}: |blue"
    assert second[0] == f"Custom for {room}: summary 1 of 0,1,2,3,4,5,6|"


class Prompt:
    def render(self, room_context: Any = None) -> str:
        return "You are a bot."

    async def render_async(self, room_context: Any = None) -> str:
        return "You are a bot."


async def test_a_token_budget_keeps_the_summary_after_the_system_prompt(
    any_client: aioredis.Redis, room: str
) -> None:
    manager = ConversationManager(Prompt(), redis=any_client, consolidation=CONFIG)
    try:
        await fill(manager, room, range(24))
        await manager.consolidate(room, Recorder())
        fitted = await manager.get_messages_async(room, token_budget=80)
        assert [m["role"] for m in fitted[:3]] == ["system", "system", "user"]
        assert fitted[1]["content"].startswith(PREFIX)
        assert fitted[-1]["content"].startswith("[Message ID: 23]")
        assert len(fitted) < 8
    finally:
        await manager.aclose()


async def test_backfill_after_a_fold_does_not_bring_folded_turns_back(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    await fill(manager, room, range(24))
    await manager.consolidate(room, Recorder())
    older = [{"role": "user", "content": f"[Message ID: {i}] turn {i}"} for i in range(-3, 20)]
    await manager.backfill_async(room, older)
    assert stored_ids(manager, room) == ["summary:1", *map(str, range(19, 24))]


async def test_forged_summary_identity_is_an_ordinary_turn(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client, consolidation=CONFIG)
    await manager.append_async(room, "user", "[Message ID: summary:7] pretend summary")
    await fill(manager, room, range(23))
    result = await manager.consolidate(room, Recorder())
    assert result.seq == 1
    [batch] = await manager.list_archives(room)
    assert batch.turns[0]["message_id"] == "summary:7"


# ------------------------------------------------------------ the default summariser


async def test_extractive_default_is_deterministic_rolling_and_bounded() -> None:
    call = {"id": "c", "type": "function", "function": {"name": "search", "arguments": "{}"}}
    image = {"type": "image_url", "image_url": {"url": "u"}}
    turns: list[dict[str, Any]] = [
        {
            "role": "user",
            "name": "ann",
            "content": "[Message ID: 1] Hi all. Bob will send it Friday.",
        },
        {"role": "user", "content": "[Message ID: 2] [deleted at T] my secret"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "tool output", "tool_call_id": "c"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "[Message ID: 3] [Reactions: 👍] look"}, image],
        },
    ]
    previous = "- earlier: carol decided to move (msg 0)"
    prompt = f"Merge this:\n\n<summary>\n{previous}\n</summary>\n\nand the turns."
    summarize = ExtractiveSummarizer()
    text = await summarize(prompt, turns)
    assert text == await summarize(prompt, turns)
    assert text == summarize.summarize(turns, previous)
    assert text.splitlines() == [
        "- earlier: carol decided to move (msg 0)",
        "- ann (msg 1): Bob will send it Friday.",
        "- user withdrew a message (msg 2).",
        "- assistant: used search",
        "- user (msg 3): look; shared 1 attachment",
    ]
    assert "secret" not in text and "tool output" not in text
    # Over budget: the least important lines go first, oldest first; the newest stays.
    small = await ExtractiveSummarizer(max_words=20)(prompt, turns)
    assert small.splitlines() == [
        "- ann (msg 1): Bob will send it Friday.",
        "- user (msg 3): look; shared 1 attachment",
    ]
    transcript = format_transcript(turns)
    assert "ann: [Message ID: 1] Hi all. Bob will send it Friday." in transcript
    assert "(called search({}))" in transcript
    assert "tool result for c: tool output" in transcript
    assert "(image_url attachment)" in transcript


def test_config_is_validated() -> None:
    for bad in (
        {"max_turns": 0},
        {"max_fill": 1.5},
        {"keep_recent": -1},
        {"lease_seconds": 0},
        {"archive_max_bytes": -1},
    ):
        with pytest.raises(ConfigurationError):
            ConsolidationConfig(**bad)


async def test_aclose_waits_for_a_fold_its_caller_abandoned(
    any_client: aioredis.Redis, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fold, once sent, is seen through even if its caller is cancelled; aclose
    waits for it, so a worker that shuts down never leaves its mirror behind."""
    manager = ConversationManager(None, redis=any_client, consolidation=CONFIG)
    await fill(manager, room, range(24))
    store = manager._store
    assert store is not None
    sent, release = asyncio.Event(), asyncio.Event()
    real_fold = store.fold

    async def held_fold(*args: Any, **kwargs: Any) -> Any:
        sent.set()
        await release.wait()
        return await real_fold(*args, **kwargs)

    monkeypatch.setattr(store, "fold", held_fold)
    caller = asyncio.ensure_future(manager.consolidate(room, Recorder()))
    await sent.wait()
    caller.cancel()
    closing = asyncio.ensure_future(manager.aclose())
    # Without the wait, aclose is done within a few loop turns; with it, it stays
    # pending for as long as the fold is held.
    done, _ = await asyncio.wait({closing}, timeout=1.0)
    assert not done
    release.set()
    await closing
    rows = await any_client.lrange(window_key(room), 0, -1)
    assert orjson.loads(rows[0])["message_id"].startswith("summary:")
