"""Helpers shared by test modules, on top of the public ``conversation.testing``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import redis.asyncio as aioredis

from conversation.testing import room_keys, wait_until

__all__ = ["eventually", "stored_ids", "wait_for", "window_key"]


def window_key(room: str, prefix: str = "sg") -> str:
    return room_keys(room, prefix).window


async def stored_ids(client: aioredis.Redis, room: str, prefix: str = "sg") -> list[str | None]:
    """The identities of the rows Redis holds for ``room``, read directly."""
    rows = await client.lrange(window_key(room, prefix), 0, -1)
    return [orjson.loads(row).get("message_id") for row in rows]


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait on a real condition, yielding to the loop (never a fixed sleep)."""
    await wait_until(predicate, timeout=timeout, what=what)


async def eventually(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0
) -> None:
    """``wait_for`` for a condition that must be awaited (a Redis read, say)."""
    await wait_until(predicate, timeout=timeout, what=what)
