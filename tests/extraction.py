"""A memory-extraction worker for the multi-process cursor test (spawned children
import it): it shares one named cursor with its peers and commits each batch's
results only once it has won the compare-and-set that moves the cursor."""

from __future__ import annotations

import asyncio
import os
import time
from functools import partial

import redis.asyncio as aioredis

from conversation import ConversationManager
from conversation.testing import wait_until

CRASH_TURN = "crash-here"
LAST_TURN = "end"
EXIT_CRASHED = 3


def extract(port: int, room: str, cursor_name: str, crasher: bool) -> None:
    asyncio.run(_extract(port, room, cursor_name, crasher))


async def _extract(port: int, room: str, name: str, crasher: bool) -> None:
    client = aioredis.Redis(port=port, socket_timeout=10)
    manager = ConversationManager(None, redis=client, max_history=1000)
    memories, crashed = f"memories:{room}", f"crashed:{room}"
    await client.incr(f"ready:{room}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        start = await manager.get_cursor(room, name)
        changes, end = await manager.read_since(room, start)
        turns = [c.message_id for c in changes if c.kind == "append" and c.message_id]
        if CRASH_TURN in turns and not crasher and not await client.exists(crashed):
            # Let the other worker die inside this very batch, then read it again
            # from the shared cursor: the batch must not be lost with it.
            await wait_until(partial(_exists, client, crashed), what="the other worker's crash")
            continue
        done: list[str] = []
        for turn in turns:
            if crasher and turn == CRASH_TURN:
                await client.set(crashed, 1)
                os._exit(EXIT_CRASHED)  # mid-batch: earlier turns done, nothing committed
            done.append(turn)
        if turns and await manager.set_cursor(room, name, end, expected=start or ""):
            await client.rpush(memories, *done)
            await client.incr(f"commits:{room}:{os.getpid()}")
        elif not turns:
            if LAST_TURN.encode() in await client.lrange(memories, -1, -1):
                break
            await asyncio.sleep(0.02)  # an idle extraction worker's poll
    await manager.aclose()
    await client.aclose()


async def _exists(client: aioredis.Redis, key: str) -> bool:
    return bool(await client.exists(key))
