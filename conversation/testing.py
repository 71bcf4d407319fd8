"""What the tests of a bot built on the engine need (and what this project's own suite uses).

* ``memory_manager(...)``: a ``ConversationManager`` with no Redis, for unit
  tests of bot logic;
* ``room_keys(room_id)``: the Redis keys of a room, to inspect or damage them
  in an integration test;
* ``wait_until(condition)``: wait on a real condition (sync or async) instead of
  sleeping and hoping.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from ._manager import ConversationManager, Renderer
from ._redis.keys import KeySpace, RoomKeys

__all__ = ["RoomKeys", "memory_manager", "room_keys", "wait_until"]


def memory_manager(
    prompt_renderer: Renderer | None = None, max_history: int = 100, **settings: Any
) -> ConversationManager:
    """A manager that keeps every room in this process's memory (no Redis)."""
    if settings.get("redis") is not None:
        raise TypeError("memory_manager() takes no redis client; build a ConversationManager")
    settings.pop("redis", None)
    return ConversationManager(prompt_renderer, max_history, None, **settings)


def room_keys(room_id: str, key_prefix: str = "sg") -> RoomKeys:
    """The keys the engine keeps for ``room_id`` under ``key_prefix``: ``.window``
    (the list of rows), ``.meta``, ``.log``, ``.idem``, ``.archive``, ``.reactions``
    and ``.deferred``."""
    return KeySpace(key_prefix).room(room_id)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float = 20.0,
    what: str = "the condition",
    interval: float = 0.005,
) -> None:
    """Return once ``condition()`` (a plain or an async callable) is true.

    Raises ``AssertionError`` naming ``what`` after ``timeout`` seconds, so a test
    fails with a reason rather than hanging.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = condition()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
