"""Sessions service (SPEC §4.19) on a real redis-server, fakeredis, and memory-only.

Scenarios shared by every backend are plain coroutines taking a store factory;
each runs on both Redis backends through ``any_client`` (real Redis runs Lua
5.1, fakeredis 5.4) and once memory-only. Redis-specific checks (no SCAN, key
TTLs, one slot per user, script reload, eviction debris) follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis_servers import free_port
from support import eventually as wait_for

from conversation import (
    ConfigurationError,
    InvalidMessage,
    InvalidSessionId,
    PersistError,
    RedisUnavailable,
    Session,
    SessionExists,
    SessionInfo,
    SessionNotFound,
    SessionStore,
)
from conversation._redis.scripts import SESSION_SCRIPT_NAMES as SESSION_SCRIPTS
from conversation._resources import data_dir

pytestmark = pytest.mark.real_server

Factory = Callable[..., SessionStore]
Scenario = Callable[[Factory], Awaitable[None]]


def factory(redis: aioredis.Redis | None) -> Factory:
    """Stores sharing one backend, as several workers share a Redis.

    Memory-only stores share nothing, so there the same settings give the same
    store: several callers of one process-local store.
    """
    memory: dict[str, SessionStore] = {}

    def make(**kwargs: Any) -> SessionStore:
        if redis is not None:
            return SessionStore(redis, **kwargs)
        return memory.setdefault(repr(sorted(kwargs.items())), SessionStore(None, **kwargs))

    return make


def user(name: str) -> dict[str, str]:
    return {"role": "user", "content": name}


def contents(session: Session | None) -> list[Any]:
    assert session is not None
    return [m["content"] for m in session.messages]


# ------------------------------------------------------------ shared scenarios


async def lifecycle(make: Factory) -> None:
    store = make()
    created = await store.create_session("alice", "chat-1")
    assert (created.user_id, created.session_id) == ("alice", "chat-1")
    assert created.messages == [] and created.message_count == 0
    assert created.created_at <= created.updated_at < created.expires_at

    info = await store.append_message(created, user("hello"))
    assert isinstance(info, SessionInfo) and info.message_count == 1
    batch: list[dict[str, Any]] = [
        {"role": "assistant", "content": "hi!", "name": "bot"},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url",
                                     "image_url": {"url": "https://x/y.png"}}]},
    ]  # fmt: skip
    info = await store.append_message(created, batch)
    assert info.message_count == 3
    info = await store.append_system_message("alice", "chat-1", "be brief")
    assert info.message_count == 4 and info.created_at == created.created_at

    got = await store.get_session("alice", "chat-1")
    assert got is not None
    assert got.messages == [user("hello"), *batch, {"role": "system", "content": "be brief"}]
    got.messages.clear()  # caller-owned: changing it changes nothing stored
    again = await store.get_session("alice", "chat-1")
    assert again is not None and again.message_count == 4
    assert again.created_at == created.created_at and again.expires_at >= info.expires_at

    generated = await store.create_session("alice")
    assert re.fullmatch(r"[0-9a-f]{32}", generated.session_id)

    assert await store.delete_session("alice", "chat-1") is True
    assert await store.get_session("alice", "chat-1") is None
    assert await store.delete_session("alice", "chat-1") is False
    with pytest.raises(SessionNotFound):
        await store.append_message(again, user("too late"))
    with pytest.raises(SessionNotFound):
        await store.append_system_message("alice", "chat-1", "too late")
    assert [s.session_id for s in await store.list_sessions("alice")] == [generated.session_id]


async def duplicate_ids(make: Factory) -> None:
    store = make()
    first = await store.create_session("alice", "same")
    await store.append_message(first, user("kept"))
    with pytest.raises(SessionExists) as caught:
        await store.create_session("alice", "same")
    assert (caught.value.user_id, caught.value.session_id) == ("alice", "same")
    assert contents(await store.get_session("alice", "same")) == ["kept"]
    # Another user may use the same id; a deleted id may be reused, empty.
    await store.create_session("bob", "same")
    await store.delete_session("alice", "same")
    reborn = await store.create_session("alice", "same")
    assert reborn.messages == [] and contents(await store.get_session("alice", "same")) == []


async def listing(make: Factory) -> None:
    store = make()
    assert await store.list_sessions("alice") == []
    ids = [f"s{i}" for i in range(5)]
    for sid in ids:
        await store.create_session("alice", sid)
    await store.create_session("bob", "not-alice's")
    session = await store.get_session("alice", "s1")
    assert session is not None
    await store.append_message(session, [user("a"), user("b")])
    listed = await store.list_sessions("alice")
    assert [s.session_id for s in listed] == ids[::-1]  # newest created first
    assert all(type(s) is SessionInfo for s in listed)  # no messages in a listing
    assert {s.session_id: s.message_count for s in listed}["s1"] == 2
    assert all(s.user_id == "alice" and s.expires_at > s.updated_at for s in listed)
    await store.delete_session("alice", "s3")
    assert [s.session_id for s in await store.list_sessions("alice")] == ["s4", "s2", "s1", "s0"]


async def cap(make: Factory) -> None:
    store = make(max_messages=4)
    session = await store.create_session("alice", "capped")
    for i in range(6):
        await store.append_message(session, user(f"m{i}"))
    assert contents(await store.get_session("alice", "capped")) == ["m2", "m3", "m4", "m5"]

    # The cap falls inside a tool-call group: its orphaned results go too.
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
    results = [{"role": "tool", "content": f"r{i}", "tool_call_id": "c1"} for i in range(3)]
    info = await store.append_message(session, [call, *results])
    got = await store.get_session("alice", "capped")
    assert got is not None and got.messages == [call, *results]
    assert info.message_count == 4
    info = await store.append_message(session, {"role": "assistant", "content": "done"})
    got = await store.get_session("alice", "capped")
    assert contents(got) == ["done"]  # never a leading tool result without its call
    assert info.message_count == 1

    # A batch larger than the cap keeps its newest messages, same rule.
    batch: list[dict[str, Any]] = [user("x"), call, *results, user("y"), user("z")]
    info = await store.append_message(session, batch)
    assert contents(await store.get_session("alice", "capped")) == ["y", "z"]
    assert info.message_count == 2


async def isolation(make: Factory) -> None:
    store = make()
    alice = await store.create_session("alice", "diary")
    await store.append_message(alice, user("alice's secret"))
    bob = await store.create_session("bob", "own")

    # Bob's user id reaches only Bob's keys.
    assert await store.get_session("bob", "diary") is None
    assert await store.delete_session("bob", "diary") is False
    with pytest.raises(SessionNotFound):
        await store.append_system_message("bob", "diary", "injected")
    assert [s.session_id for s in await store.list_sessions("bob")] == ["own"]

    # Forged handles: re-labelled, hand-built, or pointed at another session.
    forgeries = [
        dataclasses.replace(alice, user_id="bob", session_id="own"),
        dataclasses.replace(bob, session_id="diary", user_id="alice"),
        Session("alice", "diary", 0.0, 0.0, 0.0, 0, [], "guessed-token"),
        Session("alice", "diary", 0.0, 0.0, 0.0, 0, [], ""),
    ]
    for forged in forgeries:
        with pytest.raises(SessionNotFound):
            await store.append_message(forged, user("forged"))
    with pytest.raises(TypeError):
        await store.append_message(dataclasses.asdict(alice), user("x"))  # type: ignore[arg-type]
    assert contents(await store.get_session("alice", "diary")) == ["alice's secret"]
    assert contents(await store.get_session("bob", "own")) == []

    # A handle kept across delete and re-create is stale: it cannot write the new one.
    await store.delete_session("alice", "diary")
    fresh = await store.create_session("alice", "diary")
    with pytest.raises(SessionNotFound):
        await store.append_message(alice, user("stale"))
    await store.append_message(fresh, user("fresh"))
    assert contents(await store.get_session("alice", "diary")) == ["fresh"]

    # Ids that look like other keys' suffixes stay inside their own session.
    odd = await store.create_session("alice:meta", "x:msgs:diary")
    await store.append_message(odd, user("odd"))
    assert contents(await store.get_session("alice", "diary")) == ["fresh"]
    assert contents(await store.get_session("alice:meta", "x:msgs:diary")) == ["odd"]


async def bad_input(make: Factory) -> None:
    store = make(max_message_bytes=1024)
    session = await store.create_session("alice", "s")
    bad_ids: list[object] = ["", "a{b", "a}b", "new\nline", "tab\t", "x" * 600, 42, None, "\ud800"]
    for bad in bad_ids:
        with pytest.raises(InvalidSessionId) as caught:
            await store.create_session(bad, "s")  # type: ignore[arg-type]
        assert caught.value.field == "user_id"
        with pytest.raises(InvalidSessionId):
            await store.get_session(bad, "s")  # type: ignore[arg-type]
        with pytest.raises(InvalidSessionId):
            await store.list_sessions(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidSessionId) as caught:
            await store.get_session("alice", bad)  # type: ignore[arg-type]
        assert caught.value.field == "session_id"
        with pytest.raises(InvalidSessionId):
            await store.delete_session("alice", bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidSessionId):
            await store.append_system_message("alice", bad, "x")  # type: ignore[arg-type]
    with pytest.raises(InvalidSessionId):
        await store.create_session("alice", "s" * 257)  # session ids: 256 bytes
    with pytest.raises(InvalidSessionId):
        await store.append_message(dataclasses.replace(session, session_id="{x}"), user("x"))
    assert isinstance(InvalidSessionId("user_id", "", "r"), ValueError)

    bad_messages: list[object] = [
        "just text",
        {"role": "robot", "content": "x"},
        {"role": "user"},
        {"content": "x"},
        {"role": "user", "content": None},
        {"role": "user", "content": [{"no": "type"}]},
        {"role": "user", "content": "x", "message_id": "1"},
        {"role": "user", "content": "x", "tool_calls": []},
        {"role": "tool", "content": "x", "tool_call_id": 7},
        {"role": "user", "content": "x" * 2000},
        {"role": "user", "content": {1, 2}},
    ]
    for bad in bad_messages:
        with pytest.raises(InvalidMessage):
            await store.append_message(session, bad)  # type: ignore[arg-type]
        # One bad message refuses the whole batch: nothing is stored.
        with pytest.raises(InvalidMessage):
            await store.append_message(session, [user("ok"), bad])  # type: ignore[list-item]
    with pytest.raises(InvalidMessage):
        await store.append_system_message("alice", "s", 42)  # type: ignore[arg-type]
    assert contents(await store.get_session("alice", "s")) == []
    # None-valued extras (as SDK model dumps carry) are ignored, not stored.
    await store.append_message(session, {"role": "assistant", "content": "ok", "refusal": None})
    got = await store.get_session("alice", "s")
    assert got is not None and got.messages == [{"role": "assistant", "content": "ok"}]


async def concurrent_writers(make: Factory) -> None:
    """Several stores (as in several workers) append to one session at once."""
    stores = [make(max_messages=1000) for _ in range(4)]
    await stores[0].create_session("alice", "busy")
    per_writer = 25

    async def writer(w: int) -> None:
        store = stores[w]
        handle = await store.get_session("alice", "busy")
        assert handle is not None
        for i in range(per_writer):
            if i % 5 == 4:
                await store.append_system_message("alice", "busy", f"w{w}:{i}")
            else:
                await store.append_message(handle, user(f"w{w}:{i}"))

    await asyncio.gather(*(writer(w) for w in range(len(stores))))
    got = contents(await stores[1].get_session("alice", "busy"))
    assert len(got) == len(set(got)) == per_writer * len(stores)
    for w in range(len(stores)):  # each writer's messages, in its order
        assert [c for c in got if c.startswith(f"w{w}:")] == [
            f"w{w}:{i}" for i in range(per_writer)
        ]

    # With a small cap, concurrent writers still leave exactly the cap.
    small = [make(max_messages=10) for _ in range(3)]
    capped = await small[0].create_session("alice", "capped")
    await asyncio.gather(
        *(small[w].append_message(capped, user(f"c{w}:{i}")) for w in range(3) for i in range(20))
    )
    listed = await small[1].list_sessions("alice")
    assert listed[0].session_id == "capped" and listed[0].message_count == 10
    assert len(contents(await small[2].get_session("alice", "capped"))) == 10


async def idle_expiry(make: Factory) -> None:
    """A session kept in use outlives its TTL; left alone, it expires and leaves the index."""
    ttl = 1.0
    store = make(idle_ttl_seconds=ttl)
    await store.create_session("alice", "idle")
    await store.create_session("alice", "busy")

    async def remaining(sid: str) -> float | None:
        # list_sessions does not refresh TTLs, so it can watch them run down.
        for info in await store.list_sessions("alice"):
            if info.session_id == sid:
                return info.expires_at - time.time()
        return None

    async def aged() -> bool:
        left = await remaining("busy")
        assert left is not None, "a session in use expired"
        return left < ttl - 0.25

    started = time.monotonic()
    uses = 0
    while time.monotonic() - started < ttl * 1.2:
        await wait_for(aged, "the busy session's TTL to run down")
        before = await remaining("busy")
        # Reads refresh too: an agent that only reads its session keeps it.
        assert await store.get_session("alice", "busy") is not None
        after = await remaining("busy")
        assert before is not None and after is not None and after > before
        uses += 1
    assert uses >= 2

    async def idle_gone() -> bool:
        return await remaining("idle") is None

    await wait_for(idle_gone, "the idle session to expire")
    assert time.monotonic() - started >= ttl * 0.9
    assert await store.get_session("alice", "idle") is None
    assert await store.get_session("alice", "busy") is not None
    with pytest.raises(SessionNotFound):
        await store.append_system_message("alice", "idle", "late")
    await store.create_session("alice", "idle")  # an expired id is free again


SCENARIOS: list[Scenario] = [
    lifecycle,
    duplicate_ids,
    listing,
    cap,
    isolation,
    bad_input,
    concurrent_writers,
    idle_expiry,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario_redis(any_client: aioredis.Redis, scenario: Scenario) -> None:
    await scenario(factory(any_client))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_scenario_memory(scenario: Scenario) -> None:
    await scenario(factory(None))


# ------------------------------------------------------------ Redis specifics


async def test_list_uses_the_index_not_the_keyspace(any_client: aioredis.Redis) -> None:
    store = SessionStore(any_client)
    for sid in ("a", "b", "c"):
        await store.create_session("alice", sid)
    # A big unrelated keyspace, plus other users' sessions: listing stays per user.
    pipe = any_client.pipeline(transaction=False)
    for i in range(5000):
        pipe.set(f"unrelated:{i}", b"x")
    await pipe.execute()
    for i in range(20):
        await store.create_session(f"user-{i}", "s")
    assert [s.session_id for s in await store.list_sessions("alice")] == ["c", "b", "a"]
    # The listing comes from the index alone: without it, the sessions are not seen.
    await any_client.delete(store.keys.index("alice"))
    assert await store.list_sessions("alice") == []
    assert await store.get_session("alice", "a") is not None  # the sessions are still there


async def test_list_issues_no_scan_or_keys(redis_client: aioredis.Redis) -> None:
    """commandstats count every command, also those run inside scripts."""
    store = SessionStore(redis_client)
    for sid in ("a", "b"):
        await store.create_session("alice", sid)
    fill = "for i = 1, 50000 do redis.call('SET', 'unrelated:' .. i, 'x') end"
    await redis_client.eval(fill, 0)
    await redis_client.config_resetstat()
    assert len(await store.list_sessions("alice")) == 2
    stats = await redis_client.info("commandstats")
    assert not {"cmdstat_scan", "cmdstat_keys"} & set(stats)
    assert "cmdstat_zrange" in stats and {"cmdstat_fcall", "cmdstat_evalsha"} & set(stats)


async def test_keys_of_a_user_share_one_slot(any_client: aioredis.Redis) -> None:
    store = SessionStore(any_client, key_prefix="app")
    for sid in ("s1", "s2", "weird:msgs:id"):
        session = await store.create_session("discord:42", sid)
        await store.append_message(session, user("x"))
    keys = [k for k in await any_client.keys("app:session:*") if isinstance(k, bytes)]
    assert len(keys) == 2 + 3 * 3  # index, seq, and meta + messages + idem per session
    assert len({key_slot(k) for k in keys}) == 1
    assert all(k.startswith(b"app:session:{discord:42}:") for k in keys)


async def test_ttl_is_refreshed_on_use_and_keys_share_one_deadline(
    any_client: aioredis.Redis,
) -> None:
    store = SessionStore(any_client, idle_ttl_seconds=60)
    session = await store.create_session("alice", "s")
    await store.append_message(session, user("x"))
    meta, msgs = store.keys.meta("alice", "s"), store.keys.messages("alice", "s")
    idem, index, seq = (
        store.keys.idem("alice", "s"),
        store.keys.index("alice"),
        store.keys.seq("alice"),
    )

    async def pttl() -> int:
        return int(await any_client.pttl(meta))

    async def aged() -> bool:
        return await pttl() < 59_900

    for use in ("get", "append", "system"):
        await wait_for(aged, "the TTL to run down")
        before = await pttl()
        await store.list_sessions("alice")  # listing is not a use
        assert await pttl() <= before
        if use == "get":
            await store.get_session("alice", "s")
        elif use == "append":
            await store.append_message(session, user("y"))
        else:
            await store.append_system_message("alice", "s", "z")
        assert await pttl() > before
        # Every key of the session, and its index score, move to one deadline.
        keys = (meta, msgs, idem, index, seq)
        deadlines = {int(await any_client.pexpiretime(k)) for k in keys}
        score = await any_client.zscore(index, "s")
        assert deadlines == {score}
        assert score is not None and abs(score / 1000 - time.time() - 60) < 5


async def test_expired_sessions_leave_nothing_behind(any_client: aioredis.Redis) -> None:
    store = SessionStore(any_client, idle_ttl_seconds=0.2)
    for sid in ("a", "b"):
        session = await store.create_session("alice", sid)
        await store.append_message(session, user("x"))

    async def keyspace_empty() -> bool:
        return not await any_client.keys("sg:session:*")

    await wait_for(keyspace_empty, "every session key to expire")
    assert await store.list_sessions("alice") == []
    again = await store.create_session("alice", "a")
    assert again.messages == []


async def test_index_prunes_sessions_that_lost_their_keys(any_client: aioredis.Redis) -> None:
    """Eviction or a manual DEL: the index and the leftovers are cleaned, never adopted."""
    store = SessionStore(any_client)
    for sid in ("a", "b", "c"):
        session = await store.create_session("alice", sid)
        await store.append_message(session, user(f"old {sid}"))
    await any_client.delete(store.keys.meta("alice", "a"), store.keys.meta("alice", "b"))
    assert [s.session_id for s in await store.list_sessions("alice")] == ["c"]
    assert await any_client.zrange(store.keys.index("alice"), 0, -1) == [b"c"]
    assert await store.get_session("alice", "a") is None
    assert not await any_client.exists(store.keys.messages("alice", "a"))
    reborn = await store.create_session("alice", "b")  # debris of "b" is not inherited
    assert contents(await store.get_session("alice", "b")) == []
    with pytest.raises(SessionNotFound):
        await store.append_message(dataclasses.replace(reborn, session_id="a"), user("x"))


async def test_retried_commands_apply_once(
    any_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py resends a command after a connection error; the first may have landed."""
    store = SessionStore(any_client)
    original = any_client.evalsha

    async def twice(*args: Any) -> Any:
        await original(*args)  # ran on the server, but the reply was "lost"
        return await original(*args)

    monkeypatch.setattr(any_client, "evalsha", twice)
    session = await store.create_session("alice", "s")  # not SessionExists
    await store.append_message(session, [user("one"), user("two")])
    await store.append_system_message("alice", "s", "three")
    got = await store.get_session("alice", "s")
    assert contents(got) == ["one", "two", "three"]
    assert got is not None and got.created_at == session.created_at
    assert [s.session_id for s in await store.list_sessions("alice")] == ["s"]


async def test_idempotency_key_lands_once(any_client: aioredis.Redis) -> None:
    for store in (SessionStore(any_client, key_prefix="r"), SessionStore(None)):
        session = await store.create_session("alice", "s")
        for _ in range(3):
            info = await store.append_message(session, user("once"), idempotency_key="turn-1")
            assert info.message_count == 1
        await store.append_system_message("alice", "s", "sys", idempotency_key="turn-2")
        await store.append_system_message("alice", "s", "sys", idempotency_key="turn-2")
        await store.append_message(session, user("again"), idempotency_key="turn-3")
        assert contents(await store.get_session("alice", "s")) == ["once", "sys", "again"]
        for bad in ("", "k" * 129, 7):
            with pytest.raises(InvalidMessage):
                await store.append_message(session, user("x"), idempotency_key=bad)  # type: ignore[arg-type]


async def test_scripts_reload_after_script_flush(any_client: aioredis.Redis) -> None:
    store = SessionStore(any_client)
    session = await store.create_session("alice", "s")
    await any_client.script_flush()
    await any_client.function_flush()
    await store.append_message(session, user("after flush"))
    await any_client.script_flush()
    await any_client.function_flush()
    assert contents(await store.get_session("alice", "s")) == ["after flush"]
    assert store._backend.stats.script_reloads >= 2  # type: ignore[union-attr]


async def test_corrupt_rows_are_skipped(
    any_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = SessionStore(any_client)
    session = await store.create_session("alice", "s")
    await store.append_message(session, user("before"))
    msgs = store.keys.messages("alice", "s")
    await any_client.rpush(msgs, b"not json", b'{"role":"nobody","content":"x"}', b"[1]")
    await store.append_message(session, user("after"))
    with caplog.at_level(logging.WARNING, logger="conversation._sessions"):
        assert contents(await store.get_session("alice", "s")) == ["before", "after"]
    assert "3 corrupt row(s)" in caplog.text and "alice" in caplog.text
    assert "before" not in caplog.text  # never message content in logs


async def test_unreachable_redis_raises_engine_errors() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    store = SessionStore(client)
    try:
        with pytest.raises(PersistError) as write:
            await store.create_session("alice", "s")
        assert write.value.__cause__ is not None
        with pytest.raises(RedisUnavailable):
            await store.get_session("alice", "s")
        with pytest.raises(RedisUnavailable):
            await store.list_sessions("alice")
        with pytest.raises(PersistError):
            await store.append_system_message("alice", "s", "x")
        with pytest.raises(PersistError):
            await store.delete_session("alice", "s")
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_runs_on_a_real_cluster(tmp_path: Path) -> None:
    """3 primaries: users spread over slots, each user's keys in one; SCRIPT FLUSH survived."""
    from cluster_servers import LocalCluster
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    cluster = LocalCluster(tmp_path / "cluster", replicas_per_primary=0).start()
    client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
    try:
        store = SessionStore(client, max_messages=5)
        users = [f"user-{i}" for i in range(12)]
        sessions = await asyncio.gather(
            *(store.create_session(u, f"s{j}") for u in users for j in range(3))
        )
        await asyncio.gather(
            *(store.append_message(s, [user(str(k)) for k in range(7)]) for s in sessions)
        )
        for port in cluster.primary_ports():
            async with aioredis.Redis(port=port) as node:
                await node.script_flush()
        await asyncio.gather(*(store.append_system_message(u, "s0", "sys") for u in users))
        for listed in await asyncio.gather(*(store.list_sessions(u) for u in users)):
            assert sorted(s.session_id for s in listed) == ["s0", "s1", "s2"]
            assert [s.created_at for s in listed] == sorted(
                (s.created_at for s in listed), reverse=True
            )
        got = await store.get_session("user-3", "s0")
        assert contents(got) == ["3", "4", "5", "6", "sys"]
        assert await store.delete_session("user-3", "s1") is True
        assert store._backend.stats.script_reloads >= 1  # type: ignore[union-attr]
        owners = {cluster.slot_owner(key_slot(store.keys.index(u).encode())).port for u in users}
        assert len(owners) > 1  # the users really are spread over the primaries
    finally:
        await client.aclose()
        cluster.stop()


def test_configuration_is_checked() -> None:
    bad_settings: list[dict[str, Any]] = [
        {"idle_ttl_seconds": 0},
        {"idle_ttl_seconds": -1},
        {"idle_ttl_seconds": float("inf")},
        {"max_messages": 0},
        {"max_messages": True},
        {"max_message_bytes": 0},
    ]
    for bad in bad_settings:
        with pytest.raises(ConfigurationError):
            SessionStore(None, **bad)
    with pytest.raises(ValueError, match="prefix"):
        SessionStore(None, key_prefix="a{b}")


def test_every_script_has_its_header() -> None:
    lua = data_dir("lua")
    for name in SESSION_SCRIPTS:
        text = (lua / f"{name}.lua").read_text(encoding="utf-8")
        header = text.split("\nlocal ", 1)[0]
        for word in ("KEYS:", "ARGV:", "Returns", "Invariant"):
            assert word in header, f"{name}.lua: header lacks {word}"
    lib = (lua / "session_lib.lua").read_text(encoding="utf-8")
    assert "redis.sha1hex" not in lib  # fakeredis lacks it
