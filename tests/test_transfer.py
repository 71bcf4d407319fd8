"""Export and import of rooms (SPEC §35): a round trip to another server reads back
equal, identities included; a damaged or foreign file writes nothing."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer

from conversation import (
    ConsolidationConfig,
    ConversationManager,
    InvalidExport,
    RoomNotEmpty,
    SessionExists,
    SessionNotFound,
    SessionStore,
)
from conversation._redis.keys import KeySpace

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
KEYS = KeySpace("sg")
CONFIG = ConsolidationConfig(max_turns=20, keep_recent=5, min_fold=2)
IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.fixture
async def other_server(tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    server = RedisServer(tmp_path / "other").start()
    client = aioredis.Redis(port=server.port)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


async def populate(manager: ConversationManager, room: str) -> None:
    await manager.set_channel_limit_async(room, 60)
    for i in range(22):
        role = "user" if i % 2 == 0 else "assistant"
        await manager.append_async(room, role, f"[Message ID: {i}] turn {i} ✨", name=f"u{i % 3}")
    await manager.append_async(
        room, "user", [{"type": "text", "text": "[Message ID: 30] pic"}, IMAGE]
    )
    # A user typing someone else's marker: identity stays the explicit id.
    await manager.append_async(room, "user", "[Message ID: 31] hi [Message ID: 5]", message_id="x9")
    await manager.append_async(
        room,
        "assistant",
        None,  # type: ignore[arg-type]
        tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    )
    await manager.append_async(room, "tool", "42", tool_call_id="c1")
    await manager.update_message_async(room, 3, "[Message ID: 3] edited")
    assert (await manager.consolidate(room)).outcome == "folded"


def comparable(export: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(export)
    del out["exported_at"], out["source"]
    return out


async def test_an_export_imported_on_another_server_reads_back_equal_and_edits_keep_working(
    redis_client: aioredis.Redis, other_server: aioredis.Redis, make_manager: Make, room: str
) -> None:
    source = make_manager(redis_client, consolidation=CONFIG)
    await populate(source, room)
    export = await source.export_room(room)
    assert export["format"] == "conversation-room" and export["format_version"] == 1
    assert export["extensions"] == {}
    data = json.loads(json.dumps(export))  # what a file holds

    target = make_manager(other_server, consolidation=CONFIG)
    await target.import_room(room, data)
    again = await target.export_room(room)
    assert comparable(again) == comparable(export)
    assert await target.get_messages_async(room) == await source.get_messages_async(room)
    assert await target.list_archives(room) == await source.list_archives(room)
    assert target.get_channel_limit(room) == 60
    assert again["source"]["epoch"] != export["source"]["epoch"]  # a new epoch

    # Identities came along: edits by message id find the same entries.
    assert await target.update_message_async(room, 30, "[Message ID: 30] new caption")
    messages = await target.get_messages_async(room)
    assert messages[-4]["content"][0]["text"] == "[Message ID: 30] new caption"
    assert messages[-4]["content"][1] == IMAGE  # a text edit keeps the media part
    assert await target.mark_deleted_async(room, "x9", "2026-01-01T00:00:00Z")
    # The marker a user typed into x9 did not become an identity on the way in.
    await target.update_message_async(room, 5, "[Message ID: 5] changed")
    rows = [json.loads(r) for r in await other_server.lrange(KEYS.room(room).window, 0, -1)]
    (x9,) = [r for r in rows if r["message_id"] == "x9"]
    assert x9["content"] == "[deleted at 2026-01-01T00:00:00Z] [Message ID: 31] hi [Message ID: 5]"


async def test_an_export_without_archives_leaves_them_out(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client, consolidation=CONFIG)
    await populate(manager, room)
    assert (await manager.export_room(room, archives=False))["archive"] is None
    assert (await manager.export_room(room))["archive"]["elements"]


async def test_import_refuses_a_room_with_entries_unless_replace_and_every_worker_reloads(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client)
    other = make_manager(redis_client)
    await writer.append_async(room, "user", "[Message ID: 1] original")
    await other.get_messages_async(room)
    _, cursor = await other.read_since(room)
    export = await writer.export_room(room)
    export["entries"] = [{"message_id": "9", "role": "user", "content": "[Message ID: 9] new"}]
    before = await redis_client.lrange(KEYS.room(room).window, 0, -1)
    with pytest.raises(RoomNotEmpty, match="replace=True"):
        await writer.import_room(room, export)
    assert await redis_client.lrange(KEYS.room(room).window, 0, -1) == before

    await writer.import_room(room, export, replace=True)
    assert [m["content"] for m in await other.get_messages_async(room)] == ["[Message ID: 9] new"]
    changes, _ = await other.read_since(room, cursor)
    assert [c.kind for c in changes] == ["reset", "append"]


BAD: list[tuple[str, Callable[[dict[str, Any]], object], str]] = [
    ("not an object", lambda d: [d], "JSON object"),
    ("foreign format", lambda d: {**d, "format": "slack-export"}, "format is"),
    ("newer engine", lambda d: {**d, "format_version": 99}, "newer engine"),
    ("unknown extension", lambda d: {**d, "extensions": {"reactions": {}}}, "cannot import"),
    ("bad entry", lambda d: {**d, "entries": [{"role": "robot", "content": "x"}]}, "role"),
    (
        "entry field",
        lambda d: {**d, "entries": [{"role": "user", "content": "x", "x": 1}]},
        "unknown",
    ),
    ("entries", lambda d: {**d, "entries": "nope"}, "entries must be a list"),
    ("head", lambda d: {**d, "head": -3}, "head"),
    ("limit", lambda d: {**d, "limit": 7}, "limit"),
    (
        "archive",
        lambda d: {**d, "archive": {"elements": [{"role": "user", "content": "x"}]}},
        "inside a fold",
    ),
    ("tokens", lambda d: {**d, "idempotency_keys": ["ok", 7]}, r"idempotency_keys\[1\]"),
    (
        "bad id",
        lambda d: {**d, "entries": [{"message_id": "[x]", "role": "user", "content": "x"}]},
        "brackets",
    ),
]


@pytest.mark.parametrize(("case", "damage", "problem"), BAD, ids=[b[0] for b in BAD])
async def test_a_damaged_or_foreign_export_is_refused_and_nothing_is_written(
    redis_client: aioredis.Redis,
    make_manager: Make,
    room: str,
    case: str,
    damage: Callable[[dict[str, Any]], object],
    problem: str,
) -> None:
    manager = make_manager(redis_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    export = await manager.export_room(room)
    target = room + "-target"
    with pytest.raises(InvalidExport, match=problem):
        await manager.import_room(target, damage(export), replace=True)  # type: ignore[arg-type]
    assert await redis_client.keys(f"*{target}*") == []


# ------------------------------------------------------------------ sessions


@pytest.fixture(params=["redis", "memory"])
async def two_stores(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis, other_server: aioredis.Redis
) -> tuple[SessionStore, SessionStore]:
    if request.param == "memory":
        return SessionStore(None, max_messages=5), SessionStore(None, max_messages=5)
    return SessionStore(redis_client, max_messages=5), SessionStore(other_server, max_messages=5)


async def test_a_session_export_imported_elsewhere_reads_back_equal(
    two_stores: tuple[SessionStore, SessionStore],
) -> None:
    source, target = two_stores
    session = await source.create_session("ana", "s1")
    await source.append_message(
        session,
        [
            {"role": "user", "content": "hi 👋"},
            {"role": "assistant", "content": [{"type": "text", "text": "hello"}], "name": "bot"},
        ],
    )
    export = json.loads(json.dumps(await source.export_session("ana", "s1")))
    assert export["format"] == "conversation-session"
    imported = await target.import_session("ana", export)
    original = await source.get_session("ana", "s1")
    assert original is not None
    assert imported.messages == original.messages
    assert imported.created_at == pytest.approx(original.created_at, abs=0.001)
    await target.append_message(imported, {"role": "user", "content": "more"})  # a live handle
    with pytest.raises(SessionExists):
        await target.import_session("ana", export)
    replaced = await target.import_session("ana", export, replace=True)
    assert len(replaced.messages) == 2
    with pytest.raises(SessionNotFound):
        await target.append_message(imported, {"role": "user", "content": "old handle"})
    # Under another id, and refused whole when damaged.
    assert (await target.import_session("bo", export, session_id="copy")).user_id == "bo"
    bad = {**export, "messages": [*export["messages"], {"role": "robot", "content": "x"}]}
    with pytest.raises(InvalidExport, match=r"messages\[2\]"):
        await target.import_session("ana", bad, session_id="never")
    assert await target.get_session("ana", "never") is None
    with pytest.raises(InvalidExport, match="format"):
        await target.import_session("ana", {"format": "conversation-room"}, session_id="never")
    with pytest.raises(SessionNotFound):
        await source.export_session("ana", "missing")


async def test_a_session_export_carries_the_sessions_state_and_a_replace_keeps_none_of_the_old(
    two_stores: tuple[SessionStore, SessionStore],
) -> None:
    source, target = two_stores
    await source.create_session(
        "ana", "s1", state={"topic": "tides", "step": 2}, owner_state={"lang": "pt"}
    )
    export = json.loads(json.dumps(await source.export_session("ana", "s1")))
    # The user's state is shared by all of their sessions: not this session's to carry.
    assert export["state"] == {"topic": "tides", "step": 2}

    await target.create_session("ana", "s1", state={"stale": True, "topic": "old"})
    replaced = await target.import_session("ana", export, replace=True)
    assert replaced.state == {"topic": "tides", "step": 2}
    read_back = await target.get_session("ana", "s1")
    assert read_back is not None and read_back.state == {"topic": "tides", "step": 2}

    # An export written before sessions had state still imports, with none.
    legacy = {key: value for key, value in export.items() if key != "state"}
    assert (await target.import_session("ana", legacy, session_id="s2")).state == {}
    with pytest.raises(InvalidExport, match="state"):
        await target.import_session(
            "ana", {**export, "state": ["not", "a", "map"]}, session_id="s3"
        )
    assert await target.get_session("ana", "s3") is None


async def test_a_session_append_retried_after_the_session_moved_lands_once(
    two_stores: tuple[SessionStore, SessionStore],
) -> None:
    """A client whose append timed out retries it under its key; meanwhile the session
    was exported (with that append in it) and imported elsewhere: it lands once."""
    source, target = two_stores
    session = await source.create_session("ana", "s1")
    await source.append_message(session, {"role": "user", "content": "hi"}, idempotency_key="k1")
    await source.append_by_id("ana", "s1", {"role": "assistant", "content": "yo"})  # no key
    export = json.loads(json.dumps(await source.export_session("ana", "s1")))
    assert export["idempotency_keys"] == ["k1"]
    moved = await target.import_session("ana", export)
    await target.append_message(moved, {"role": "user", "content": "hi"}, idempotency_key="k1")
    await target.append_message(moved, {"role": "user", "content": "next"}, idempotency_key="k2")
    read_back = await target.get_session("ana", "s1")
    assert read_back is not None
    assert [m["content"] for m in read_back.messages] == ["hi", "yo", "next"]
    # Hostile or damaged keys are refused, naming where, and nothing is written.
    cases: list[tuple[object, str]] = [
        ("k1", "must be a list"),
        ([""], r"idempotency_keys\[0\]"),
        (["ok", 7], r"idempotency_keys\[1\]"),
        (["x" * 129], r"idempotency_keys\[0\]"),
        ([f"k{i}" for i in range(65)], "at most 64"),
    ]
    for keys, reason in cases:
        with pytest.raises(InvalidExport, match=reason):
            await target.import_session(
                "ana", {**export, "idempotency_keys": keys}, session_id="s9"
            )
        assert await target.get_session("ana", "s9") is None
    # An export from before sessions carried keys still imports, with none.
    legacy = {k: v for k, v in export.items() if k != "idempotency_keys"}
    old = await target.import_session("ana", legacy, session_id="s2")
    await target.append_message(old, {"role": "user", "content": "hi"}, idempotency_key="k1")
    assert len((await target.get_session("ana", "s2") or old).messages) == 3


async def test_import_refuses_rows_its_default_limit_would_trim(
    redis_client: aioredis.Redis, other_server: aioredis.Redis, make_manager: Make, room: str
) -> None:
    source = make_manager(redis_client, max_history=300)
    for i in range(150):
        await source.append_async(room, "user", f"turn {i}")
    export = await source.export_room(room)
    assert export["limit"] == 0  # "the default": 300 there
    small = make_manager(other_server, max_history=100)
    with pytest.raises(InvalidExport, match="150 entries, more than the window limit 100"):
        await small.import_room(room, export)
    assert await other_server.keys("*") == []
    large = make_manager(other_server, max_history=300)
    await large.import_room(room, export)
    assert len(await large.get_messages_async(room)) == 150


async def test_a_write_retried_after_its_room_moved_lands_once(
    redis_client: aioredis.Redis, other_server: aioredis.Redis, make_manager: Make, room: str
) -> None:
    # A client whose append timed out retries it under the same key; meanwhile the
    # room was exported (with that append in it) and imported on another server.
    source = make_manager(redis_client)
    await source.append_async(room, "user", "[Message ID: 1] hello", idempotency_key="send-1")
    export = await source.export_room(room)
    target = make_manager(other_server)
    await target.import_room(room, json.loads(json.dumps(export)))
    await target.append_async(room, "user", "[Message ID: 1] hello", idempotency_key="send-1")
    await target.append_async(room, "user", "[Message ID: 2] next", idempotency_key="send-2")
    contents = [m["content"] for m in await target.get_messages_async(room)]
    assert contents == ["[Message ID: 1] hello", "[Message ID: 2] next"]
    fresh = make_manager(other_server)  # what Redis holds, not the target's memory
    assert [m["content"] for m in await fresh.get_messages_async(room)] == contents


async def test_an_export_whose_head_leaves_no_room_to_grow_is_refused(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    # Cursors refuse positions past 2**53 (what a Redis/Lua number holds exactly): a
    # room imported at head 2**53 - 1 would break its change feed at its first trim.
    manager = make_manager(redis_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    export = {**await manager.export_room(room), "head": 2**53 - 1}
    target = room + "-huge"
    with pytest.raises(InvalidExport, match="head"):
        await manager.import_room(target, export)
    assert await redis_client.keys(f"*{target}*") == []
    export["head"] = 10**12  # a large head that leaves room works
    await manager.import_room(target, export)
    await manager.append_async(target, "user", "[Message ID: 2] after")
    changes, cursor = await make_manager(redis_client).read_since(target)
    assert [c.position for c in changes] == [10**12, 10**12 + 1]
    assert (await manager.read_since(target, cursor))[0] == []


async def test_a_session_export_of_a_million_messages_is_refused_before_any_work(
    two_stores: tuple[SessionStore, SessionStore],
) -> None:
    # max_messages is 5: checking and sending a million rows to keep five would stall
    # the event loop for seconds and build a Redis command of every row.
    _, target = two_stores
    export = {
        "format": "conversation-session",
        "format_version": 1,
        "session_id": "s1",
        "created_at": 1.0,
        "messages": [{"role": "user", "content": "x"}] * 1_000_000,
    }
    with pytest.raises(InvalidExport, match="1000000 messages"):
        await target.import_session("ana", export)
    assert await target.get_session("ana", "s1") is None
