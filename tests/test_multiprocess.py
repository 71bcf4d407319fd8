"""SPEC §3.8-3.11 across real OS processes sharing one private redis-server."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from multiproc import run_in_processes
from redis_servers import RedisServer
from workers import append_many, append_tight, edit_repeatedly

from conversation import ConversationManager

pytestmark = pytest.mark.real_server


async def test_three_processes_append_without_loss_duplication_or_reordering(
    redis_server: RedisServer, room: str
) -> None:
    windows = run_in_processes(append_many, [(redis_server.port, room, 200)] * 3)
    client = aioredis.Redis(port=redis_server.port)
    try:
        stored = [row.decode() for row in await client.lrange(f"sg:conversation:{{{room}}}", 0, -1)]  # type: ignore[union-attr]
    finally:
        await client.aclose()
    assert len(stored) == 600
    contents = [s.split('"content":"')[1].rstrip('"}') for s in stored]
    assert len(set(contents)) == 600
    for index in range(3):
        mine = [c for c in contents if c.endswith(f"from process {index}")]
        assert mine == [f"[Message ID: p{index}-{i}] from process {index}" for i in range(200)]
    for window in windows:
        assert window == contents


async def test_edit_while_another_process_appends_needs_no_retries(
    redis_server: RedisServer, room: str
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    seeder = ConversationManager(None, redis=client)
    try:
        await seeder.append_async(room, "user", "[Message ID: target] original")
    finally:
        await seeder.aclose()
        await client.aclose()
    edit_result, append_result = run_in_processes(
        _race, [(redis_server.port, room, "edit"), (redis_server.port, room, "append")]
    )
    assert edit_result["stats"]["conflicts"] == 0
    assert edit_result["stats"]["persist_retries"] == 0
    assert edit_result["window"] == append_result["window"]
    window = append_result["window"]
    assert window[0] == "[Message ID: target] edit 99"
    assert window[1:] == [f"[Message ID: b{i}] tight loop" for i in range(300)]


def _race(index: int, barrier: Any, port: int, room: str, role: str) -> dict[str, Any]:
    if role == "edit":
        return edit_repeatedly(index, barrier, port, room, 100)
    return append_tight(index, barrier, port, room, 300)
