"""Issue 5: reliability under faults and concurrency.

* the quick variant of the randomized multi-process checker (``chaos_checker``):
  20 seeds, each a round of 3 worker processes x 3 rooms under injected faults
  and companion-key losses, with recalls by idempotency key, sync and awaited
  writes in one loop tick, cancelled callers and managers moved to new loops;
* the checker's model on doctored logs (no servers);
* the fault proxy itself does what the checker relies on;
* targeted cases through the proxy: an ambiguous write (applied, reply lost)
  served twice by a read, late delivery of a timed-out command, durable writes
  that time out before and after Redis applied them, Redis out of memory, and
  a bounded ``aclose``.

The long variant is ``scripts/soak.py --soak SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from chaos_checker import (
    ChaosCluster,
    ChaosOptions,
    Held,
    KeyLoss,
    OpRecord,
    ViewEvent,
    check_round,
)
from fault_proxy import FaultProxy
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis_servers import RedisServer

import conversation
from conversation import ConversationManager, DrainTimeout, DurabilityError, PersistError

pytestmark = pytest.mark.real_server

QUICK_SEEDS = list(range(1, 21))
QUICK = ChaosOptions()  # 3 processes x 3 rooms x 40 operations per round


def window_key(room: str) -> str:
    return f"sg:conversation:{{{room}}}"


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait on a real condition, yielding to the loop (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def contents(client: aioredis.Redis, room: str) -> list[str]:
    rows = await client.lrange(window_key(room), 0, -1)
    return [orjson.loads(row)["content"] for row in rows]


# --------------------------------------------------------------- the checker


# Both freshness modes run the same rounds and the same checks (SPEC §37: push
# must keep every guarantee sync keeps; only a warm read's round trip goes).
@pytest.fixture(scope="module", params=["sync", "push"])
def chaos_cluster(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ChaosCluster]:
    options = replace(QUICK, freshness=request.param)
    with ChaosCluster(tmp_path_factory.mktemp(f"chaos-{request.param}"), options) as cluster:
        yield cluster


@pytest.mark.slow
@pytest.mark.parametrize("seed", QUICK_SEEDS)
def test_chaos_round_loses_duplicates_and_reorders_nothing(
    chaos_cluster: ChaosCluster, seed: int
) -> None:
    # Raises ChaosFailure naming the seed, a replay command and a dump of the round.
    report = chaos_cluster.run_round(seed)
    assert report.appends_acknowledged > 0
    assert sum(report.faults.values()) > 0
    assert report.faults["blackhole_replies"] >= 1  # the ambiguous case, every round
    # One key per room is lost after the drain, before the final sync.
    drops = sum(n for kind, n in report.faults.items() if kind.startswith("drop_"))
    assert drops >= QUICK.rooms
    # Each worker ran at least three event loops: operations, drain, final sync.
    assert report.loop_moves >= 2 * QUICK.processes


def test_checker_flags_loss_duplication_and_reordering() -> None:
    """The checks themselves: doctored Redis contents are caught (no servers needed)."""
    room = "r"
    log = [
        OpRecord(0, room, 0, "append", "async", 1.0, 1.1, target="a", value="a:a", role="user"),
        OpRecord(0, room, 1, "append", "async", 2.0, 2.1, target="b", value="a:b", role="user"),
        OpRecord(1, room, 0, "append", "sync", 3.0, target="c", value="a:c", role="user"),
    ]

    def row(ident: str) -> bytes:
        return f'{{"message_id":"{ident}","role":"user","content":"a:{ident}"}}'.encode()

    def problems(rows: list[bytes]) -> list[str]:
        expected = [{k: v for k, v in orjson.loads(r).items() if k != "message_id"} for r in rows]
        return check_round(
            [room],
            log,
            {room: rows},
            {room: 0},
            views=[{room: expected}, {room: expected}],
            view_limits=[{room: 50}, {room: 50}],
            drained_at=[5.0, 5.0],
            max_history=50,
        )

    assert problems([row("a"), row("b"), row("c")]) == []
    assert any(p.startswith("lost:") for p in problems([row("a"), row("c")]))
    assert any(p.startswith("lost:") for p in problems([row("b"), row("c")]))
    assert any(p.startswith("duplicated:") for p in problems([row("a"), row("b"), row("b")]))
    assert any(p.startswith("reordered:") for p in problems([row("b"), row("a"), row("c")]))
    assert any(p.startswith("phantom:") for p in problems([row("a"), row("x")]))


def _row(ident: str) -> bytes:
    return f'{{"message_id":"{ident}","role":"user","content":"a:{ident}"}}'.encode()


def _problems(
    log: list[OpRecord],
    rows: list[bytes],
    *,
    losses: tuple[KeyLoss, ...] = (),
    holds: tuple[Held, ...] = (),
    events: tuple[ViewEvent, ...] = (),
    limit: int = 0,
) -> list[str]:
    room = log[0].room
    expected = [{k: v for k, v in orjson.loads(r).items() if k != "message_id"} for r in rows]
    return check_round(
        [room],
        log,
        {room: rows},
        {room: limit},
        views=[{room: expected}],
        view_limits=[{room: limit or 50}],
        drained_at=[10.0],
        max_history=50,
        key_losses=losses,
        holds=holds,
        view_events=events,
    )


def _append(i: int, ident: str, inv: float, done: float | None, **kwargs: object) -> OpRecord:
    return OpRecord(
        0, "r", i, "append", "async", inv, done, target=ident, value=f"a:{ident}", role="user",
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_checker_model_of_recalls_cancellations_floating_and_key_losses() -> None:
    """What the model accepts (chaos_checker's docstring), on doctored logs."""
    a = _append(0, "p0r0n1", 1.0, 1.1, key="key:p0r0n1")
    recall = OpRecord(0, "r", 1, "recall", "keyed", 2.0, 2.1, target="p0r0n1", key="key:p0r0n1")
    b = _append(2, "p0r0n2", 3.0, 3.1)
    log = [a, recall, b]
    assert _problems(log, [_row("p0r0n1"), _row("p0r0n2")]) == []
    # A recall that added a row is a duplicate...
    assert any(
        p.startswith("duplicated:") for p in _problems(log, [_row("p0r0n1"), _row("p0r0n1")])
    )
    # ...unless the idempotency set was lost while the id could still be re-sent.
    lost_idem = KeyLoss("r", ":idem", 1.5, 1.6, True)
    doubled = [_row("p0r0n1"), _row("p0r0n2"), _row("p0r0n1")]
    assert _problems(log, doubled, losses=(lost_idem,)) == []
    too_early = KeyLoss("r", ":idem", 0.5, 0.6, True)
    assert any(p.startswith("duplicated:") for p in _problems(log, doubled, losses=(too_early,)))
    served_twice = ViewEvent(
        0, "r", "get_messages_async", 2.05, ["p0r0n1"], ["p0r0n1", "p0r0n2", "p0r0n1"]
    )
    flagged = _problems(log, [_row("p0r0n1"), _row("p0r0n2")], events=(served_twice,))
    assert any(p.startswith("duplicated: worker 0") for p in flagged)
    assert any(p.startswith("reordered: worker 0") for p in flagged)
    assert _problems(log, doubled, losses=(lost_idem,), events=(served_twice,)) == []

    # An attempt a blackhole held reaches Redis when it ends, maybe after the loss.
    plain_log = [_append(0, "p0r0n1", 1.0, 1.1), b]
    after_done = KeyLoss("r", ":idem", 1.5, 1.6, True)
    flagged = _problems(plain_log, doubled, losses=(after_done,))
    assert any(p.startswith("duplicated:") for p in flagged)
    held = Held(1.05, 1.8)
    assert _problems(plain_log, doubled, losses=(after_done,), holds=(held,)) == []

    # A cancelled plain append_async still lands; a cancelled durable one may not.
    plain = _append(1, "p0r0n3", 2.0, None, cancelled=True)
    durable = _append(1, "p0r0n3", 2.0, None, cancelled=True, floating=True)
    assert any(p.startswith("lost:") for p in _problems([a, plain], [_row("p0r0n1")]))
    assert _problems([a, durable], [_row("p0r0n1")]) == []
    # Floating: no place in the worker's order, only its times.
    late = _append(0, "p0r0n4", 1.0, None, floating=True, cancelled=True)
    after = _append(1, "p0r0n5", 2.0, 2.1)
    assert _problems([late, after], [_row("p0r0n5"), _row("p0r0n4")]) == []
    fixed = _append(0, "p0r0n4", 1.0, 1.5)
    flagged = _problems([fixed, after], [_row("p0r0n5"), _row("p0r0n4")])
    assert any(p.startswith("reordered:") for p in flagged)

    # A lost meta takes the limit back to the default.
    raised = OpRecord(0, "r", 1, "limit", "async", 2.0, 2.1, value="120")
    assert any(p.startswith("limit:") for p in _problems([a, raised], [_row("p0r0n1")]))
    lost_meta = KeyLoss("r", ":meta", 3.0, 3.1, True)
    assert _problems([a, raised], [_row("p0r0n1")], losses=(lost_meta,)) == []
    assert _problems([a, raised], [_row("p0r0n1")], limit=120) == []


# ----------------------------------------------------------------- the proxy


@pytest.fixture
async def proxy(redis_server: RedisServer) -> AsyncIterator[FaultProxy]:
    fault_proxy = await FaultProxy(redis_server.port).start()
    try:
        yield fault_proxy
    finally:
        await fault_proxy.stop()


def proxied(proxy: FaultProxy) -> aioredis.Redis:
    # No client-side retries: the engine's own retry loop is what is under test.
    return aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))


async def test_fault_proxy_latency_cut_and_blackholes(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    client = proxied(proxy)
    direct = aioredis.Redis(port=redis_server.port)
    try:
        assert await client.ping()
        loop = asyncio.get_running_loop()
        proxy.set_latency(0.1)
        started = loop.time()
        await client.set("k", "1")
        assert loop.time() - started >= 0.2  # request and reply each delayed
        proxy.set_latency(0)
        assert proxy.cut() == 1
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.get("k")
        assert await client.get("k") == b"1"  # a new connection works
        # Replies held: the server applies the command, the client times out.
        proxy.blackhole("replies")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.set("applied", "yes"), 0.2)
        assert await direct.get("applied") == b"yes"
        proxy.resume()
        # Everything held, then delivered late (after the client gave up). The
        # command goes out on a pooled connection (a new one would stall in its
        # handshake and never send it).
        assert await client.ping()
        proxy.blackhole("both")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.set("late", "yes"), 0.2)
        assert await direct.get("late") is None
        proxy.resume()
        await wait_for_key(direct, "late")
        # Everything held, then dropped.
        assert await client.ping()
        proxy.blackhole("both")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.set("lost", "yes"), 0.2)
        proxy.resume(drop=True)
        assert await client.get("late") == b"yes"
        assert await direct.get("lost") is None
    finally:
        await client.aclose()
        await direct.aclose()


async def wait_for_key(client: aioredis.Redis, key: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while await client.get(key) is None:
        assert loop.time() < deadline, f"{key} never arrived"
        await asyncio.sleep(0.01)


# ------------------------------------------------- targeted faults, one room


def manager_for(client: aioredis.Redis, **kwargs: object) -> ConversationManager:
    kwargs.setdefault("command_timeout", 0.2)
    kwargs.setdefault("retry_backoff", (0.02, 0.1))
    return ConversationManager(None, redis=client, **kwargs)  # type: ignore[arg-type]


async def test_a_read_never_serves_a_landed_write_twice(proxy: FaultProxy, room: str) -> None:
    """A write applied by Redis whose reply was lost is retried; meanwhile a read that
    catches up must not show the turn once from Redis and once more as still pending."""
    client = proxied(proxy)
    # A long backoff keeps the write unconfirmed while the read happens.
    manager = manager_for(client, retry_backoff=(1.0, 1.0))
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("replies")
        manager.append(room, "user", "[Message ID: 2] two")
        await wait_for(lambda: manager.stats()["persist_failures"] >= 1, "a timed-out persist")
        proxy.resume()
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        served = [m["content"] for m in await manager.get_messages_async(room)]
        assert served == ["[Message ID: 1] one", "[Message ID: 2] two"]
        await manager.drain(timeout=10)
        assert [m["content"] for m in manager.get_messages(room)] == served
        assert await contents(client, room) == served
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_a_read_never_serves_a_recalled_write_twice(proxy: FaultProxy, room: str) -> None:
    """A re-call with the key of a write that landed (a redelivered event, or the
    documented recovery from a DurabilityError whose attempt did land) queued behind
    another write: a read that catches up meanwhile must show the turn once."""
    client = proxied(proxy)
    manager = manager_for(client, retry_backoff=(1.0, 1.0))  # unconfirmed while we read
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one", idempotency_key="k1")
        proxy.blackhole("both")
        manager.append(room, "user", "[Message ID: 2] two")
        recall = asyncio.ensure_future(
            manager.append_async(room, "user", "[Message ID: 1] one", idempotency_key="k1")
        )
        await wait_for(lambda: manager.stats()["persist_failures"] >= 1, "a timed-out persist")
        proxy.resume(drop=True)
        served = [m["content"] for m in await manager.get_messages_async(room)]
        await recall
        await manager.drain(timeout=10)
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        assert served == ["[Message ID: 1] one", "[Message ID: 2] two"]
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_late_delivery_of_a_timed_out_write_never_duplicates(
    proxy: FaultProxy, room: str
) -> None:
    client = proxied(proxy)
    manager = manager_for(client)
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("both")
        manager.append(room, "user", "[Message ID: 2] two")
        assert manager.patch_reactions(room, 1, "👍")
        await wait_for(lambda: manager.stats()["persist_failures"] >= 3, "timed-out attempts")
        # The held attempts reach Redis now, after the engine gave up on them.
        proxy.resume()
        await manager.drain(timeout=10)
        expected = ["[Message ID: 1] [Reactions: 👍] one", "[Message ID: 2] two"]
        assert await contents(client, room) == expected
        await manager.ensure_fresh_from_redis(room)
        assert [m["content"] for m in manager.get_messages(room)] == expected
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_durable_write_that_timed_out_after_redis_applied_it(
    proxy: FaultProxy, room: str
) -> None:
    """DurabilityError is ambiguous; the documented recovery lands the turn exactly once."""
    client = proxied(proxy)
    manager = manager_for(client, durable_timeout=0.5)
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("replies")  # Redis applies it; the reply never comes
        with pytest.raises(DurabilityError) as info:
            await manager.append_async(room, "user", "[Message ID: 2] two", durable=True)
        assert info.value.room_id == room and info.value.idempotency_key
        assert isinstance(info.value, PersistError)
        assert [m["content"] for m in manager.get_messages(room)] == ["[Message ID: 1] one"]
        proxy.resume()
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        # Not retried behind the caller's back, so never doubled later either.
        await manager.drain(timeout=10)
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        for _ in range(2):
            await manager.append_async(
                room,
                "user",
                "[Message ID: 2] two",
                durable=True,
                idempotency_key=info.value.idempotency_key,
            )
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        await manager.ensure_fresh_from_redis(room)
        assert len(manager.get_messages(room)) == 2
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_durable_write_that_never_reached_redis(proxy: FaultProxy, room: str) -> None:
    client = proxied(proxy)
    manager = manager_for(client, durable_timeout=0.5)
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("both")
        with pytest.raises(DurabilityError) as info:
            await manager.append_async(room, "user", "[Message ID: 2] two", durable=True)
        proxy.resume(drop=True)  # every attempt is lost with its connection
        await manager.drain(timeout=10)
        assert await contents(client, room) == ["[Message ID: 1] one"]  # not silently kept
        await manager.append_async(
            room, "user", "[Message ID: 2] two", idempotency_key=info.value.idempotency_key
        )
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] two"]
        assert manager.stats()["durable_failures"] == 1
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_out_of_memory_writes_fail_counted_then_land_once_memory_is_freed(
    redis_server: RedisServer, room: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = aioredis.Redis(port=redis_server.port, retry=Retry(NoBackoff(), 0))
    manager = manager_for(client, durable_timeout=0.5)
    admin = redis_server.sync_client()
    other = room + ":durable"
    try:
        await manager.append_async(room, "user", "[Message ID: 1] before")
        await manager.append_async(other, "user", "[Message ID: 1] before")
        # 8 MiB of ballast over a limit 4 MiB above the baseline: every write fails
        # until the ballast goes (transient buffers never bridge the gap).
        baseline = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory-policy", "noeviction")
        admin.set("ballast", b"x" * (8 << 20))
        admin.config_set("maxmemory", baseline + (4 << 20))
        with caplog.at_level(logging.WARNING, logger="conversation"):
            manager.append(room, "user", "[Message ID: 2] during")
            assert manager.update_message(room, 1, "[Message ID: 1] edited")
            await wait_for(lambda: manager.stats()["persist_failures"] >= 2, "OOM failures")
            with pytest.raises(DurabilityError, match="OutOfMemoryError") as info:
                await manager.append_async(other, "user", "[Message ID: 2] durable", durable=True)
        assert isinstance(info.value.__cause__, redis.exceptions.OutOfMemoryError)
        assert any("OutOfMemoryError" in record.getMessage() for record in caplog.records)
        # Memory state stands (the view and the queue); Redis is untouched.
        assert [m["content"] for m in manager.get_messages(room)] == [
            "[Message ID: 1] edited",
            "[Message ID: 2] during",
        ]
        assert manager.stats()["pending_writes"] == 2
        assert await contents(client, room) == ["[Message ID: 1] before"]
        admin.delete("ballast")
        await manager.drain(timeout=10)
        assert await contents(client, room) == ["[Message ID: 1] edited", "[Message ID: 2] during"]
        key = info.value.idempotency_key
        for _ in range(2):
            await manager.append_async(
                other, "user", "[Message ID: 2] durable", idempotency_key=key
            )
        assert await contents(client, other) == [
            "[Message ID: 1] before",
            "[Message ID: 2] durable",
        ]
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_durable_write_queued_behind_a_retrying_write_still_raises_in_time(
    proxy: FaultProxy, room: str
) -> None:
    """durable_timeout bounds the durable call even when the room's queue is stuck."""
    client = proxied(proxy)
    manager = manager_for(client, durable_timeout=0.5)
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("both")
        manager.append(room, "user", "[Message ID: 2] retrying")
        await wait_for(lambda: manager.stats()["persist_failures"] >= 1, "a retrying write")
        with pytest.raises(DurabilityError):
            # 5 s: ten times the durable timeout, so a hang fails here, not at 120 s.
            await asyncio.wait_for(
                manager.append_async(room, "user", "[Message ID: 3] durable", durable=True), 5
            )
        assert [m["content"] for m in manager.get_messages(room)] == [
            "[Message ID: 1] one",
            "[Message ID: 2] retrying",
        ]
        proxy.resume(drop=True)
        await manager.drain(timeout=10)
        assert await contents(client, room) == ["[Message ID: 1] one", "[Message ID: 2] retrying"]
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


async def test_aclose_flushes_retrying_writes_once_redis_answers(
    proxy: FaultProxy, room: str
) -> None:
    client = proxied(proxy)
    manager = manager_for(client)
    try:
        await manager.append_async(room, "user", "[Message ID: 0] zero")
        proxy.blackhole("both")
        for i in range(1, 6):
            manager.append(room, "user", f"[Message ID: {i}] m")
        await wait_for(lambda: manager.stats()["persist_failures"] >= 2, "retrying writes")
        loop = asyncio.get_running_loop()
        started = loop.time()
        closing = asyncio.ensure_future(manager.aclose(timeout=10))
        proxy.resume(drop=True)
        await closing
        assert loop.time() - started < 10
        expected = ["[Message ID: 0] zero"] + [f"[Message ID: {i}] m" for i in range(1, 6)]
        assert await contents(client, room) == expected
        with pytest.raises(PersistError, match="closed"):
            manager.append(room, "user", "after close")
    finally:
        await client.aclose()


async def test_aclose_reports_what_it_could_not_flush_within_its_bound(
    proxy: FaultProxy, room: str
) -> None:
    client = proxied(proxy)
    manager = manager_for(client)
    other = room + ":b"
    try:
        await manager.append_async(room, "user", "[Message ID: 0] zero")
        proxy.blackhole("both")
        for i in range(1, 4):
            manager.append(room, "user", f"[Message ID: {i}] m")
        manager.append(other, "user", "x")
        assert manager.update_message(room, 0, "[Message ID: 0] edited")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DrainTimeout) as info:
            await manager.aclose(timeout=0.5)
        assert loop.time() - started < 0.5 + 0.2 + 1.0  # + command timeout + slack
        assert info.value.unflushed == {room: 4, other: 1}
        assert "5 write(s) in 2 room(s)" in str(info.value)
        proxy.resume(drop=True)
        assert await contents(client, room) == ["[Message ID: 0] zero"]
    finally:
        await client.aclose()


# ------------------------------------------- engine bugs the checker found


async def test_another_workers_limit_change_reaches_the_view_through_a_write(
    redis_server: RedisServer, room: str
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    a = manager_for(client)
    b = manager_for(client)
    try:
        for i in range(60):
            await a.append_async(room, "user", f"[Message ID: {i}] turn {i}")
        await b.ensure_fresh_from_redis(room)
        await a.set_channel_limit_async(room, 50)  # Redis trims the 10 oldest rows
        # b's own write brings the change back in its reply (no rows to send).
        await b.append_async(room, "user", "[Message ID: b] from b")
        await b.ensure_fresh_from_redis(room)
        stored = await contents(client, room)
        assert len(stored) == 50
        assert b.get_channel_limit(room) == 50
        assert [m["content"] for m in b.get_messages(room)] == stored
    finally:
        await a.aclose(timeout=10)
        await b.aclose(timeout=10)
        await client.aclose()


@pytest.mark.parametrize(
    "lost",
    [
        ":meta",
        ":log",
        ":archive",
    ],
)
async def test_a_read_never_serves_a_landed_write_twice_after_a_key_loss(
    proxy: FaultProxy, room: str, lost: str
) -> None:
    """test_a_read_never_serves_a_landed_write_twice, with one companion key lost
    (SPEC §29) between the write that landed and the read. (Losing the idempotency
    set itself forgets that the write landed: its retry may store it twice.)"""
    client = proxied(proxy)
    manager = manager_for(client, retry_backoff=(1.0, 1.0))
    try:
        await manager.append_async(room, "user", "[Message ID: 1] one")
        proxy.blackhole("replies")
        manager.append(room, "user", "[Message ID: 2] two")
        await wait_for(lambda: manager.stats()["persist_failures"] >= 1, "a timed-out persist")
        proxy.resume()
        await client.delete(window_key(room) + lost)
        served = [m["content"] for m in await manager.get_messages_async(room)]
        assert served == ["[Message ID: 1] one", "[Message ID: 2] two"]
        await manager.drain(timeout=10)
        assert await contents(client, room) == served
    finally:
        await manager.aclose(timeout=10)
        await client.aclose()


@contextlib.contextmanager
def _leftovers_of_closed_loops() -> Iterator[list[sys.UnraisableHookArgs]]:
    """Collects what raises while it is finalized, instead of failing the test at once.

    A loop closed with a connection in flight leaves a socket and asyncio's and
    redis-py's coroutines behind; collected later (the test collects on purpose),
    they warn or find their loop closed. Those are not the engine's to settle.
    """
    seen: list[sys.UnraisableHookArgs] = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        yield seen
    finally:
        sys.unraisablehook = previous


def _from_the_engine(unraisable: sys.UnraisableHookArgs) -> bool:
    """Whether the engine's own code raised it (or is the object being finalized)."""
    root = os.path.dirname(conversation.__file__)
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and code.co_filename.startswith(root):
        return True
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.startswith(root):
            return True
        tb = tb.tb_next
    return False


def test_a_persist_task_the_closed_loop_left_pending_never_strands_the_next_loop(
    redis_server: RedisServer, room: str
) -> None:
    import gc

    from fault_proxy import ThreadedFaultProxy

    with ThreadedFaultProxy(redis_server.port) as proxy:
        client = aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
        manager = manager_for(client, command_timeout=0.3)

        async def first() -> None:
            await manager.append_async(room, "user", "[Message ID: 1] one")
            proxy.blackhole("both")
            # A caller persisting its write inline when the loop ends: asyncio.run
            # cancels it, and the cancellation starts the room's persist task, still
            # pending (and destroyed) when the loop closes.
            asyncio.get_running_loop().create_task(
                manager.append_async(room, "user", "[Message ID: 2] two")
            )
            await wait_for(lambda: manager._room(room).inline is not None, "an inline persist")

        async def second() -> tuple[list[str], list[str]]:
            proxy.resume()
            manager.append(room, "user", "[Message ID: 3] three")  # rebinds the manager
            gc.collect()  # the destroyed task's coroutine is finalized now, not at random
            try:
                for i in range(4, 7):
                    await asyncio.wait_for(
                        manager.append_async(room, "user", f"[Message ID: {i}] more"), 3
                    )
                await manager.ensure_fresh_from_redis(room)
                view = [str(m["content"]) for m in manager.get_messages(room)]
                stored = await contents(client, room)
            finally:
                # Even when it hangs: nothing of this test may leak into the next.
                with contextlib.suppress(Exception):
                    await manager.aclose(timeout=2)
                await client.aclose()
            return view, stored

        asyncio.run(first())
        with _leftovers_of_closed_loops() as leftovers:
            try:
                view, stored = asyncio.run(second())
            finally:
                gc.collect()
        assert not [u for u in leftovers if _from_the_engine(u)]
        assert len(stored) == 6
        assert view == stored
