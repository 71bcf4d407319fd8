"""The scripts tier: each Lua family through its ``RoomStore`` method, on real Redis
(Lua 5.1) and fakeredis (Lua 5.4), starting from an empty script cache so the
NOSCRIPT reload path runs first.

These pin the contract the engine relies on (``lua/_lib.lua``): every reply is
a catch-up from the caller's (epoch, version) to the room's, and a write's
token makes a resent write a no-op.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from conversation._engine.window import RoomState, apply_reply
from conversation._redis.keys import KeySpace, RoomKeys
from conversation._redis.replies import SyncReply
from conversation._redis.rooms import RoomStore
from conversation._stats import Stats

pytestmark = pytest.mark.real_server

EPOCH = "e0e0e0e0e0e0"


def row(identity: str, role: str = "user") -> bytes:
    return orjson.dumps(
        {"message_id": identity, "role": role, "content": f"[Message ID: {identity}] hi"}
    )


@pytest.fixture
async def store(any_client: aioredis.Redis) -> AsyncIterator[RoomStore]:
    await any_client.script_flush()
    store = RoomStore(any_client, Stats(), ttl_ms=0, default_limit=50, command_timeout=5.0)
    yield store
    await store.wait_idle()


@pytest.fixture
def keys(room: str) -> RoomKeys:
    return KeySpace("sg").room(room)


def absorb(
    state: RoomState,
    reply: SyncReply,
    room: str,
    own: list[tuple[bytes, str | None, str]] | None = None,
) -> None:
    assert apply_reply(state, reply, room, own or []) == 0


async def appended(
    store: RoomStore, keys: RoomKeys, state: RoomState, *writes: tuple[str, list[bytes]]
) -> str:
    """Append as the engine does: the reply omits the caller's own rows it pushed."""
    reply, flags = await store.append(keys, state, EPOCH, list(writes))
    pushed = [
        (r, orjson.loads(r)["message_id"], orjson.loads(r)["role"])
        for (_token, rows), flag in zip(writes, flags, strict=True)
        if flag == "1"
        for r in rows
    ]
    absorb(state, reply, keys.window, pushed)
    return flags


def ids(state: RoomState) -> list[str | None]:
    return list(state.window.ids)


async def test_sync_of_a_missing_room_is_an_empty_snapshot(
    store: RoomStore, keys: RoomKeys
) -> None:
    state = RoomState()
    reply = await store.sync(keys, state)
    absorb(state, reply, keys.window)
    assert (len(state.window), state.version) == (0, 0)


async def test_append_pushes_each_write_and_skips_a_replayed_token_alone(
    store: RoomStore, keys: RoomKeys
) -> None:
    state = RoomState()
    assert await appended(store, keys, state, ("t1", [row("1")]), ("t2", [row("2")])) == "11"
    # t1 again beside a new write: only the new one lands.
    assert await appended(store, keys, state, ("t1", [row("1")]), ("t3", [row("3")])) == "21"
    assert ids(state) == ["1", "2", "3"]
    assert await store.redis.llen(keys.window) == 3


async def test_a_second_reader_catches_up_with_only_what_changed(
    store: RoomStore, keys: RoomKeys
) -> None:
    writer, reader = RoomState(), RoomState()
    await appended(store, keys, writer, ("t1", [row("1"), row("2")]))
    absorb(reader, await store.sync(keys, reader), keys.window)
    await appended(store, keys, writer, ("t2", [row("3")]))

    reply = await store.sync(keys, reader)

    assert reply.kind == 1 and reply.rows == [row("3")]
    absorb(reader, reply, keys.window)
    assert ids(reader) == ids(writer) == ["1", "2", "3"]
    idle = await store.sync(keys, reader)
    assert (idle.kind, idle.rows) == (0, [])


async def test_replace_edits_one_row_and_refuses_a_stale_base(
    store: RoomStore, keys: RoomKeys
) -> None:
    state = RoomState()
    await appended(store, keys, state, ("t1", [row("1"), row("2")]))
    edited = orjson.dumps({"message_id": "2", "role": "user", "content": "edited"})

    reply = await store.replace(keys, state, "r1", state.head + 1, row("2"), edited)
    assert reply.status == 1
    absorb(state, reply, keys.window)
    stale = await store.replace(keys, state, "r2", state.head + 1, row("2"), b'{"x":1}')

    assert stale.status == 0  # the row is no longer what the caller based its edit on
    assert await store.redis.lindex(keys.window, 1) == edited


async def test_clear_empties_the_room_and_the_version_moves_on(
    store: RoomStore, keys: RoomKeys
) -> None:
    state = RoomState()
    await appended(store, keys, state, ("t1", [row("1")]))
    before = state.version

    absorb(state, await store.clear(keys, state, "c1", EPOCH), keys.window)

    assert len(state.window) == 0 and state.version > before
    assert await store.redis.llen(keys.window) == 0


async def test_set_limit_trims_without_leaving_an_orphan_tool_result(
    store: RoomStore, keys: RoomKeys
) -> None:
    state = RoomState()
    rows = [row(str(i)) for i in range(60)]
    rows[10] = orjson.dumps({"message_id": None, "role": "tool", "content": "r"})
    await appended(store, keys, state, ("t1", rows))

    reply = await store.set_limit(keys, state, "l1", EPOCH, 50, None)
    absorb(state, reply, keys.window)

    assert state.limit == 50
    stored = [orjson.loads(r) for r in await store.redis.lrange(keys.window, 0, -1)]
    assert len(stored) == 49 and stored[0]["role"] != "tool"  # row 10 went with row 9
    assert ids(state) == [s["message_id"] for s in stored]


async def test_rewrite_is_a_compare_and_set_on_the_version(
    store: RoomStore, keys: RoomKeys
) -> None:
    state, other = RoomState(), RoomState()
    await appended(store, keys, state, ("t1", [row("2")]))
    absorb(other, await store.sync(keys, other), keys.window)
    await appended(store, keys, state, ("t2", [row("3")]))

    refused = await store.rewrite(keys, other, "w1", EPOCH, [row("1"), row("2")])
    assert refused.status == 0  # another write landed since `other`'s version
    absorb(other, refused, keys.window)
    done = await store.rewrite(keys, other, "w2", EPOCH, [row("1"), row("2"), row("3")])

    assert done.status != 0
    assert [
        orjson.loads(r)["message_id"] for r in await store.redis.lrange(keys.window, 0, -1)
    ] == [
        "1",
        "2",
        "3",
    ]


async def test_the_lease_scripts_release_and_renew_only_for_their_holder(
    store: RoomStore, keys: RoomKeys
) -> None:
    lease = keys.window + ":lease"
    assert await store.lease_acquire(lease, "me", 10_000)
    assert not await store.lease_acquire(lease, "you", 10_000)
    assert not await store.lease_renew(lease, "you", 10_000)
    assert not await store.lease_release(lease, "you")
    assert await store.lease_renew(lease, "me", 20_000)
    assert await store.lease_release(lease, "me")
    assert await store.redis.get(lease) is None


async def test_after_a_reset_cold_and_stale_callers_get_a_snapshot_of_exactly_the_new_rows(
    store: RoomStore, keys: RoomKeys
) -> None:
    writer, stale = RoomState(), RoomState()
    await appended(store, keys, writer, ("t1", [row("1"), row("2")]))
    absorb(stale, await store.sync(keys, stale), keys.window)
    absorb(writer, await store.clear(keys, writer, "c1", EPOCH), keys.window)
    await appended(store, keys, writer, ("t2", [row("3")]))

    # A cold caller's rows come from the LRANGE in its MULTI, a stale one's from
    # the script: the same snapshot either way.
    cold = RoomState()
    for state in (cold, stale):
        reply = await store.sync(keys, state)
        assert reply.kind == 2 and reply.rows == [row("3")]
        assert (reply.epoch, reply.version, reply.tag) == (writer.epoch, writer.version, writer.tag)
        absorb(state, reply, keys.window)
        assert ids(state) == ["3"]
        assert (await store.sync(keys, state)).kind == 0


def test_a_header_only_snapshot_needs_the_rows_of_its_lrange() -> None:
    header = [0, 3, EPOCH, 4, "abcd1234", 2, 0, 0]
    with pytest.raises(ValueError, match="without its rows"):
        SyncReply.parse(list(header))
    reply = SyncReply.parse(list(header), [row("3")])
    assert (reply.kind, reply.version, reply.head, reply.rows) == (2, 4, 2, [row("3")])
