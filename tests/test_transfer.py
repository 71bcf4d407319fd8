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
    ConfigurationError,
    ConsolidationConfig,
    ConversationManager,
    InvalidExport,
    RoomNotEmpty,
    SessionExists,
    SessionNotFound,
    SessionStore,
)
from conversation._redis.keys import KeySpace
from conversation.testing import wait_until

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
    ("unknown extension", lambda d: {**d, "extensions": {"polls": {}}}, "cannot import"),
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


def _with(name: str, value: object) -> Callable[[dict[str, Any]], object]:
    return lambda d: {**d, "extensions": {**d["extensions"], name: value}}


def _waiting(event: object, keep_ms: object = 60_000) -> dict[str, Any]:
    return {"7": [{"keep_ms": keep_ms, "event": event}]}


THUMBS = [["👍", "👍", ["ann"]]]
BAD += [
    ("reactions not an object", _with("reactions", []), "extensions.reactions"),
    ("reactions of a message not exported", _with("reactions", {"99": THUMBS}), "names no message"),
    ("forged emoji", _with("reactions", {"1": [["x]", "x]", ["ann"]]]}), "must not contain"),
    ("emoji shown otherwise", _with("reactions", {"1": [["👍", "🔥", ["ann"]]]}), "shows as"),
    ("custom emoji forged", _with("reactions", {"1": [["<:12>", ":a]:", ["ann"]]]}), "shows as"),
    ("counted twice", _with("reactions", {"1": [["👍", "👍", ["ann", "ann"]]]}), "twice"),
    ("user control chars", _with("reactions", {"1": [["👍", "👍", ["a\x00"]]]}), "control"),
    ("no users", _with("reactions", {"1": [["👍", "👍", []]]}), "non-empty"),
    (
        "too many emoji",
        _with("reactions", {"1": [[f"e{i}", f"e{i}", ["a"]] for i in range(65)]}),
        "distinct emoji",
    ),
    (
        "deferred for a held message",
        _with("deferred", {"1": _waiting({"k": "patch", "s": "x"})["7"]}),
        "entries hold",
    ),
    ("deferred kind", _with("deferred", _waiting({"k": "boom"})), "not an edit"),
    (
        "deferred extra field",
        _with("deferred", _waiting({"k": "patch", "s": "x", "z": 1})),
        "not an edit",
    ),
    ("deferred lifetime", _with("deferred", _waiting({"k": "patch", "s": "x"}, 0)), "keep_ms"),
    (
        "deferred lifetime bool",
        _with("deferred", _waiting({"k": "patch", "s": "x"}, True)),
        "keep_ms",
    ),
    ("deferred edit", _with("deferred", _waiting({"k": "edit", "c": 5})), "content"),
    (
        "deferred reaction",
        _with("deferred", _waiting({"k": "react", "a": "+", "e": "[", "d": "[", "u": "ann"})),
        "must not contain",
    ),
    (
        "deferred action",
        _with("deferred", _waiting({"k": "react", "a": "?", "e": "", "d": "", "u": ""})),
        "action",
    ),
    (
        "deferred identity",
        _with("deferred", {"[7]": _waiting({"k": "patch", "s": "x"})["7"]}),
        "not a message identity",
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


async def test_a_damaged_extension_after_a_good_one_writes_nothing_into_a_replaced_room(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    await manager.add_reaction_async(room, 1, "👍", "ann")
    export = await manager.export_room(room)
    export["extensions"]["deferred"] = _waiting(
        {"k": "react", "a": "+", "e": "👍", "d": "👍", "u": "\x07"}
    )
    keys = KEYS.room(room)
    before = (
        await redis_client.lrange(keys.window, 0, -1),
        await redis_client.hgetall(keys.reactions),
    )
    with pytest.raises(InvalidExport, match=r"extensions\.deferred\['7'\]\[0\]"):
        await manager.import_room(room, export, replace=True)
    after = (
        await redis_client.lrange(keys.window, 0, -1),
        await redis_client.hgetall(keys.reactions),
    )
    assert after == before
    assert not await redis_client.exists(keys.deferred)


async def _content(manager: ConversationManager, room: str, marker: str) -> str:
    (content,) = [
        m["content"] for m in await manager.get_messages_async(room) if marker in str(m["content"])
    ]
    return str(content)


async def test_reactions_and_waiting_events_move_with_an_export_and_keep_counting_exactly(
    redis_client: aioredis.Redis, other_server: aioredis.Redis, make_manager: Make, room: str
) -> None:
    source = make_manager(redis_client)
    for i in (1, 2, 3):
        await source.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    for user in ("ann", "bob"):
        assert await source.add_reaction_async(room, 1, "👍", user)
    assert await source.add_reaction_async(room, 2, "<:party:123>", "cy")
    # Events for a message not appended yet wait for it.
    assert not await source.add_reaction_async(room, 50, "🔥", "dee")
    assert not await source.update_message_async(room, 50, "[Message ID: 50] edited")
    export = await source.export_room(room)
    assert export["extensions"]["reactions"] == {
        "1": [["👍", "👍", ["ann", "bob"]]],
        "2": [["<:123>", ":party:", ["cy"]]],
    }
    (react, edit) = export["extensions"]["deferred"]["50"]
    assert react["event"]["k"] == "react" and edit["event"] == {
        "k": "edit",
        "c": "[Message ID: 50] edited",
    }
    assert 0 < edit["keep_ms"] <= 600_000  # the lifetime left, not a clock reading

    target = make_manager(other_server)
    await target.import_room(room, json.loads(json.dumps(export)))
    assert "👍 2" in await _content(target, room, "turn 1")
    assert await target.add_reaction_async(room, 1, "👍", "eve")
    assert "[Reactions: 👍 3]" in await _content(target, room, "turn 1")
    assert await target.add_reaction_async(room, 1, "👍", "ann")  # a redelivery
    assert await target.add_reaction_async(room, 2, "<:party:123>", "cy")
    assert "[Reactions: 👍 3]" in await _content(target, room, "turn 1")
    assert "[Reactions: :party: 1]" in await _content(target, room, "turn 2")
    assert await target.remove_reaction_async(room, 1, "👍", "bob")
    assert "[Reactions: 👍 2]" in await _content(target, room, "turn 1")

    await target.append_async(room, "user", "[Message ID: 50] original")
    applied = await _content(target, room, "Message ID: 50")
    assert "edited" in applied and "[Reactions: 🔥 1]" in applied
    assert await target.add_reaction_async(room, 50, "🔥", "dee")  # applied once, tracked
    assert "[Reactions: 🔥 1]" in await _content(target, room, "Message ID: 50")
    assert not await other_server.exists(KEYS.room(room).deferred)  # consumed


async def test_a_reaction_between_the_window_read_and_the_reactions_read_is_exported_with_its_tag(
    redis_client: aioredis.Redis,
    make_manager: Make,
    room: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exporter, reactor = make_manager(redis_client), make_manager(redis_client)
    await exporter.append_async(room, "user", "[Message ID: 1] hi")
    assert await reactor.add_reaction_async(room, 1, "👍", "ann")
    hmget = redis_client.hmget
    reacted: list[bool] = []

    async def react_first(*args: Any) -> Any:
        # The window read saw one reaction; another worker adds one before this read.
        if not reacted:
            reacted.append(await reactor.add_reaction_async(room, 1, "👍", "bob"))
        return await hmget(*args)

    monkeypatch.setattr(redis_client, "hmget", react_first)
    export = await exporter.export_room(room)
    assert reacted == [True]
    assert export["extensions"]["reactions"] == {"1": [["👍", "👍", ["ann", "bob"]]]}
    assert "[Reactions: 👍 2]" in export["entries"][0]["content"]


async def test_a_memory_only_manager_refuses_export_and_import_like_the_feed(
    make_manager: Make, room: str
) -> None:
    manager = make_manager(None)
    manager.append(room, "user", "[Message ID: 1] hi")
    manager.add_reaction(room, 1, "👍", "ann")
    with pytest.raises(ConfigurationError, match="memory-only"):
        await manager.export_room(room)
    with pytest.raises(ConfigurationError, match="memory-only"):
        await manager.import_room(room, {"format": "conversation-room"})


async def test_an_imported_waiting_event_still_expires(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client)
    await manager.append_async(room, "user", "[Message ID: 1] hi")
    export = await manager.export_room(room)
    export["extensions"]["deferred"] = _waiting({"k": "edit", "c": "[Message ID: 7] late"}, 150)
    await manager.import_room(room, export, replace=True)
    deferred = KEYS.room(room).deferred
    assert 0 < await redis_client.pttl(deferred) <= 150
    await wait_until(lambda: _gone(redis_client, deferred), what="the hash to expire")
    await manager.append_async(room, "user", "[Message ID: 7] original")
    assert await _content(manager, room, "Message ID: 7") == "[Message ID: 7] original"


async def _gone(redis: aioredis.Redis, key: str) -> bool:
    return not await redis.exists(key)


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
