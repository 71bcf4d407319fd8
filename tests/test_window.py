"""The decoded window: reads hand out the caller's own copies, big replies decode
in slices that let the loop run, and rows another writer spelled differently
still take edits (SPEC §2, §3)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from support import window_key

from conversation import ConversationManager
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]

CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 4000}}


async def write_mixed(manager: ConversationManager, room: str) -> None:
    parts: list[Any] = [{"type": "text", "text": "[Message ID: 1] look"}, copy.deepcopy(IMAGE)]
    metadata: dict[str, Any] = {"platform": {"author": "ann", "roles": ["admin"]}, "n": 1}
    await manager.append_async(room, "user", parts, metadata=metadata)
    # The caller's own objects stay the caller's: changing them later changes nothing.
    parts[1]["image_url"]["url"] = "changed"
    parts.append({"type": "text", "text": "added"})
    metadata["platform"]["roles"].append("owner")
    calls: list[Any] = [copy.deepcopy(CALL)]
    await manager.append_async(room, "assistant", "", tool_calls=calls)
    calls[0]["function"]["name"] = "g"
    await manager.append_async(room, "tool", "42", tool_call_id="c1")
    await manager.append_async(room, "user", "[Message ID: 2] plain")


EXPECTED: list[dict[str, Any]] = [
    {
        "role": "user",
        "content": [{"type": "text", "text": "[Message ID: 1] look"}, IMAGE],
        "metadata": {"platform": {"author": "ann", "roles": ["admin"]}, "n": 1},
    },
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "42", "tool_call_id": "c1"},
    {"role": "user", "content": "[Message ID: 2] plain"},
]


def vandalise(messages: list[dict[str, Any]]) -> None:
    """Change every container a caller could reach, at every depth."""
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content[0]["text"] = "rewritten"
            content[1]["image_url"]["url"] = "gone"
            content.append({"type": "text", "text": "more"})
        for call in message.get("tool_calls", []):
            call["function"]["arguments"] = "{}"
            call["id"] = "other"
        if "tool_calls" in message:
            message["tool_calls"].append(dict(CALL))
        if "metadata" in message:
            message["metadata"]["platform"]["roles"].append("root")
            message["metadata"]["n"] = 2
        message["content"] = "replaced"
        message["extra"] = True
    messages.append({"role": "user", "content": "appended"})


def without_metadata(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k != "metadata"} for m in messages]


async def test_a_read_hands_out_copies_nothing_a_caller_does_reaches_the_window(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(any_client)
    await write_mixed(manager, room)
    stored_before = await any_client.lrange(window_key(room), 0, -1)
    for _ in range(2):
        vandalise(manager.get_messages(room, include_metadata=True))
        vandalise(manager.get_messages(room))
        vandalise(await manager.get_messages_async(room, include_metadata=True))
    assert manager.get_messages(room, include_metadata=True) == EXPECTED
    assert await manager.get_messages_async(room) == without_metadata(EXPECTED)
    assert await any_client.lrange(window_key(room), 0, -1) == stored_before
    # The rows the window writes back for an edit's compare are still Redis's own.
    conflicts = manager.stats()["conflicts"]
    assert await manager.update_message_async(room, "1", "[Message ID: 1] new text")
    assert manager.stats()["conflicts"] == conflicts
    edited = manager.get_messages(room, include_metadata=True)[0]
    assert edited["content"] == [{"type": "text", "text": "[Message ID: 1] new text"}, IMAGE]
    assert edited["metadata"] == EXPECTED[0]["metadata"]
    other = make_manager(any_client)
    assert await other.get_messages_async(room, include_metadata=True) == [
        edited,
        *EXPECTED[1:],
    ]


async def test_a_memory_only_window_hands_out_copies_too(make_manager: Make, room: str) -> None:
    manager = make_manager(None)
    await write_mixed(manager, room)
    vandalise(manager.get_messages(room, include_metadata=True))
    vandalise(await manager.get_messages_async(room))
    assert manager.get_messages(room, include_metadata=True) == EXPECTED


async def test_rows_another_writer_spelled_its_own_way_read_and_take_edits(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """Rows orjson would write otherwise (spacing, field order) keep their bytes."""
    manager = make_manager(redis_client)
    await manager.append_async(room, "user", "[Message ID: 1] first")
    spelled = [
        b'{"message_id": "2", "role": "user", "content": "[Message ID: 2] spaced"}',
        b'{"role":"assistant","message_id":"3","content":"[Message ID: 3] reordered"}',
        b'{"message_id":"4","role":"user","content":"[Message ID: 4] caf\\u00e9"}',
    ]
    await redis_client.rpush(window_key(room), *spelled)
    # A raw RPUSH bumps no version: a fresh worker reads the window whole.
    reader = make_manager(redis_client)
    messages = await reader.get_messages_async(room)
    assert [m["content"] for m in messages] == [
        "[Message ID: 1] first",
        "[Message ID: 2] spaced",
        "[Message ID: 3] reordered",
        "[Message ID: 4] café",
    ]
    for identity in ("2", "3", "4"):
        assert await reader.update_message_async(room, identity, f"[Message ID: {identity}] ok")
    assert reader.stats()["conflicts"] == 0
    rows = await redis_client.lrange(window_key(room), 0, -1)
    assert [orjson.loads(row)["content"] for row in rows[1:]] == [
        f"[Message ID: {i}] ok" for i in ("2", "3", "4")
    ]


async def fill_images(manager: ConversationManager, room: str, count: int) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "B" * 100_000}}
    for index in range(count):
        text = f"[Message ID: {index}] turn {index}"
        content: Any = [{"type": "text", "text": text}, image] if index % 10 == 9 else text
        manager.append(room, "user" if index % 2 == 0 else "assistant", content)
        if index % 100 == 99:
            await manager.drain()
    await manager.drain()


async def test_a_cold_hydrate_of_images_decodes_in_slices_with_the_loop_running_between(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(redis_client, max_history=1000)
    await fill_images(writer, room, 1000)
    reader = make_manager(redis_client, max_history=1000)
    seen: set[int] = set()
    done = False

    async def ticker() -> None:
        while not done:
            seen.add(reader.stats()["decode_slices"])
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    messages = await reader.get_messages_async(room)
    done = True
    await task
    slices = reader.stats()["decode_slices"]
    assert slices >= 5  # about 10 MB of rows, 1 MiB a slice
    # After every slice but the last the loop ran other tasks (the ticker saw it).
    assert set(range(1, slices)) <= seen
    assert messages == writer.get_messages(room)
    assert len(messages) == 1000


async def test_a_big_reply_to_a_write_in_flight_converges_with_writes_made_meanwhile(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    a = make_manager(redis_client, max_history=1000)
    b = make_manager(redis_client, max_history=1000)
    await a.append_async(room, "user", "[Message ID: a0] from a")
    await b.get_messages_async(room)
    await b.clear_async(room)
    await fill_images(b, room, 300)  # 3 MB that a's next write brings back
    slices = a.stats()["decode_slices"]
    seen: list[int] = []

    async def meanwhile() -> None:
        # While a decodes that reply: more writes, and a read waiting its turn.
        started = lambda: a.stats()["decode_slices"] > slices  # noqa: E731
        await wait_until(started, interval=0, what="a's decoding of the reply")
        seen.append(a.stats()["decode_slices"])
        a.append(room, "user", "[Message ID: a2] while decoding")
        await a.append_async(room, "assistant", "[Message ID: a3] also")
        await a.get_messages_async(room)

    side = asyncio.create_task(meanwhile())
    await a.append_async(room, "user", "[Message ID: a1] in flight")
    await side
    await a.drain()
    assert seen and seen[0] > slices
    assert a.stats()["decode_slices"] - slices >= 3
    await a.ensure_fresh_from_redis(room)
    await b.ensure_fresh_from_redis(room)
    rows = await redis_client.lrange(window_key(room), 0, -1)
    stored = [orjson.loads(row) for row in rows]
    for entry in stored:
        del entry["message_id"]
    assert a.get_messages(room) == b.get_messages(room) == stored
    ids = [orjson.loads(row)["message_id"] for row in rows]
    assert ids[:300] == [str(i) for i in range(300)]
    assert ids[300:] == ["a1", "a2", "a3"]


async def test_cold_hydrates_of_a_big_window_beside_busy_writers_converge(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """A cold read's snapshot takes its rows from an LRANGE in the sync's MULTI
    (lua/sync.lua): header and rows must be of one version, or the readers'
    later catch-ups (patched from that version) would not land on Redis's rows."""
    writer = make_manager(redis_client, max_history=600)
    for index in range(600):
        writer.append(room, "user" if index % 2 == 0 else "assistant", f"[Message ID: w{index}] x")
    await writer.drain()
    executed = (await redis_client.info("commandstats")).get("cmdstat_exec", {}).get("calls", 0)
    stop = False

    async def write() -> None:
        index = 0
        while not stop:
            index += 1
            await writer.append_async(room, "user", f"[Message ID: n{index}] more")
            # An edit of an older row: only a reader at the right version is patched right.
            await writer.update_message_async(
                room, f"w{300 + index}", f"[Message ID: w{300 + index}] e"
            )

    task = asyncio.create_task(write())
    readers = []
    for _ in range(8):
        reader = make_manager(redis_client, max_history=600)
        assert len(await reader.get_messages_async(room)) == 600
        readers.append(reader)
        await asyncio.sleep(0)
    stop = True
    await task
    await writer.drain()
    stored = [orjson.loads(row) for row in await redis_client.lrange(window_key(room), 0, -1)]
    for entry in stored:
        del entry["message_id"]
    for reader in readers:
        await reader.ensure_fresh_from_redis(room)
        assert reader.get_messages(room) == stored
    after = (await redis_client.info("commandstats"))["cmdstat_exec"]["calls"]
    assert after - executed >= len(readers)  # each cold read went as one MULTI
