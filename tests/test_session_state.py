"""SessionStore's state, group and positional operations (what the ADK and
LlamaIndex adapters stand on), the same on real Redis, fakeredis and memory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import backend_client

from conversation import InvalidMessage, SessionStore

pytestmark = pytest.mark.real_server


@pytest.fixture(params=["real", "fake", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    if request.param == "memory":
        yield SessionStore(max_messages=5)
        return
    async with backend_client(request.param, tmp_path) as client:
        yield SessionStore(client, max_messages=5)


def _msg(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


async def test_state_lands_with_appends_and_only_once(store: SessionStore) -> None:
    s = await store.create_session("ann", "s1", state={"a": 1}, owner_state={"lang": "fr"})
    assert (s.state, s.owner_state) == ({"a": 1}, {"lang": "fr"})
    await store.append_by_id(
        "ann",
        "s1",
        [_msg("hi")],
        state={"a": 2, "b": [1]},
        owner_state={"lang": "de"},
        idempotency_key="k1",
    )
    await store.append_by_id("ann", "s1", [_msg("hi")], state={"a": 3}, idempotency_key="k1")
    got = await store.get_session("ann", "s1")
    assert got is not None
    assert (got.state, got.owner_state, got.message_count) == (
        {"a": 2, "b": [1]},
        {"lang": "de"},
        1,
    )
    # The user's state is shared by their sessions, and outlives a deleted one.
    other = await store.create_session("ann", "s2")
    assert other.state == {}
    assert (await store.get_session("ann", "s2")).owner_state == {"lang": "de"}  # type: ignore[union-attr]
    assert await store.delete_session("ann", "s1")
    assert await store.get_owner_state("ann") == {"lang": "de"}
    assert await store.get_owner_state("bob") == {}


async def test_latest_rows_and_reads_that_are_not_a_use(store: SessionStore) -> None:
    await store.create_session("u", "s")
    await store.append_by_id("u", "s", [_msg(f"m{i}") for i in range(4)])
    last = await store.get_session("u", "s", last=2)
    assert [m["content"] for m in last.messages] == ["m2", "m3"]  # type: ignore[union-attr]
    assert (await store.get_session("u", "s", last=0)).messages == []  # type: ignore[union-attr]
    before = (await store.get_session("u", "s", refresh=False)).expires_at  # type: ignore[union-attr]
    again = (await store.get_session("u", "s", refresh=False)).expires_at  # type: ignore[union-attr]
    assert again == before
    with pytest.raises(ValueError, match="last"):
        await store.get_session("u", "s", last=-1)


async def test_group_state_and_members(store: SessionStore) -> None:
    assert (await store.use_group("app")).state == {}
    await store.use_group("app", member="ann", state={"banner": "sale"})
    await store.use_group("app", member="bob", state={"x": {"y": None}})
    got = await store.use_group("app", list_members=True)
    assert got.state == {"banner": "sale", "x": {"y": None}}
    assert sorted(got.members) == ["ann", "bob"]
    assert (await store.use_group("other", list_members=True)).members == []


async def test_splice_changes_rows_by_position(store: SessionStore) -> None:
    assert await store.splice("u", "k", "pop") is None  # nothing there: nothing created
    assert await store.list_sessions("u") == []
    assert await store.splice("u", "k", "set", messages=[_msg("a"), _msg("c")]) == (2, [])
    await store.splice("u", "k", "insert", position=1, messages=[_msg("b")])
    await store.splice("u", "k", "insert", position=-100, messages=[_msg("0")])
    await store.splice("u", "k", "insert", position=10**9, messages=[_msg("d")])
    rows = (await store.get_session("u", "k")).messages  # type: ignore[union-attr]
    assert [m["content"] for m in rows] == ["0", "a", "b", "c", "d"]
    assert await store.splice("u", "k", "remove", position=-4) == (4, [_msg("a")])
    assert await store.splice("u", "k", "remove", position=4) is None
    assert await store.splice("u", "k", "pop", idempotency_key="p") == (3, [_msg("d")])
    assert await store.splice("u", "k", "pop", idempotency_key="p") == (-1, [])  # a retry
    # The cap (5) keeps the newest rows.
    await store.splice("u", "k", "insert", position=0, messages=[_msg(f"n{i}") for i in range(4)])
    assert (await store.get_session("u", "k")).message_count == 5  # type: ignore[union-attr]
    taken = await store.splice("u", "k", "take")
    assert taken is not None and len(taken[1]) == 5
    assert await store.get_session("u", "k") is None


async def test_bad_state_and_ops_write_nothing(store: SessionStore) -> None:
    await store.create_session("u", "s")
    with pytest.raises(InvalidMessage, match="state"):
        await store.append_by_id("u", "s", [_msg("x")], state={"k": object()})
    with pytest.raises(InvalidMessage, match="state"):
        await store.append_by_id("u", "s", [_msg("x")], state={1: "not a str key"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="op"):
        await store.splice("u", "s", "shuffle")
    got = await store.get_session("u", "s")
    assert got is not None and (got.message_count, got.state) == (0, {})
