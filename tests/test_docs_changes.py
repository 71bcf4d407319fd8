"""The memory-extraction worker of docs/changes.md runs as written."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer

from conversation import ConversationManager

pytestmark = pytest.mark.real_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "changes.md"


def worker_source() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## A memory-extraction worker", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/changes.md lost its worker"
    return match.group(1)


def test_the_documented_worker_is_about_thirty_lines() -> None:
    code = [line for line in worker_source().splitlines() if line.strip()]
    assert len(code) <= 36


async def run_worker(path: Path, url: str, room: str) -> None:
    env = {**os.environ, "REDIS_URL": url, "ROOM": room, "EXIT_WHEN_IDLE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(path), env=env, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()


async def test_the_documented_worker_extracts_each_turn_once(
    redis_server: RedisServer, redis_client: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "worker.py"
    path.write_text(worker_source(), encoding="utf-8")
    room = "discord:docs"
    manager = ConversationManager(None, redis=redis_client)
    for i in range(3):
        await manager.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    # Two replicas at once, then one more run after new turns: each turn once.
    await asyncio.gather(*(run_worker(path, redis_server.url, room) for _ in range(2)))
    await manager.append_async(room, "assistant", "[Message ID: 3] turn 3")
    await run_worker(path, redis_server.url, room)
    stored = await redis_client.lrange(f"memories:{room}", 0, -1)
    memories = [m.decode() if isinstance(m, bytes) else m for m in stored]
    assert memories == [f"remember: [Message ID: {i}] turn {i}" for i in range(4)]
    await manager.aclose()
