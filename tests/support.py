"""Helpers shared by test modules, on top of the public ``conversation.testing``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis
from cluster_servers import LocalCluster
from redis_servers import RedisServer

from conversation.testing import room_keys, wait_until

__all__ = [
    "backend_client",
    "eventually",
    "running_cluster",
    "stored_ids",
    "wait_for",
    "window_key",
]


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


@asynccontextmanager
async def backend_client(kind: str, tmp_path: Path) -> AsyncIterator[aioredis.Redis]:
    """A client of a private redis-server (``kind == "real"``, scripts flushed) or of
    fakeredis (any other kind); closed, and the server stopped, on exit."""
    server: RedisServer | None = None
    if kind == "real":
        server = RedisServer(tmp_path / "redis").start()
        client: aioredis.Redis = aioredis.Redis(port=server.port, socket_timeout=5)
        await client.script_flush()
        await client.function_flush()
    else:
        client = fakeredis.FakeAsyncRedis()
    try:
        yield client
    finally:
        await client.aclose()
        if server is not None:
            server.stop()


def running_cluster(
    tmp_path_factory: pytest.TempPathFactory, **options: Any
) -> Iterator[LocalCluster]:
    """The body of a module-scoped cluster fixture: ``yield from running_cluster(...)``
    starts a local Redis Cluster (``options`` go to ``LocalCluster``) and stops it after."""
    deployment = LocalCluster(tmp_path_factory.mktemp("cluster"), **options).start()
    try:
        yield deployment
    finally:
        deployment.stop()
