"""Helpers shared by test modules: key names and waiting on real conditions."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis

__all__ = ["eventually", "stored_ids", "wait_for", "window_key"]


def window_key(room: str, prefix: str = "sg") -> str:
    return f"{prefix}:conversation:{{{room}}}"


async def stored_ids(client: aioredis.Redis, room: str, prefix: str = "sg") -> list[str | None]:
    """The identities of the rows Redis holds for ``room``, read directly."""
    rows = await client.lrange(window_key(room, prefix), 0, -1)
    return [orjson.loads(row).get("message_id") for row in rows]


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait on a real condition, yielding to the loop (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def eventually(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """``wait_for`` for a condition that must be awaited (a Redis read, say)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
