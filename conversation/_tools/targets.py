"""Connecting the operator tools to a Redis server or cluster, with redacted URLs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .terminal import EXIT_USAGE, CliError, Progress

logger = logging.getLogger(__name__)
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "sg"

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)


# ---------------------------------------------------------------- connecting


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass
class RedisTarget:
    """A connected client (plain or Cluster) plus what the commands need to know of it."""

    client: Any
    url: str
    cluster: bool

    def nodes(self) -> list[Any]:
        """The nodes to scan: every primary of a Cluster, else just the one server."""
        if self.cluster:
            return list(self.client.get_primaries())
        return [None]

    async def scan(self, match: str, progress: Progress | None = None) -> AsyncIterator[bytes]:
        seen = 0
        for node in self.nodes():
            cursor: Any = 0
            while True:
                if node is None:
                    cursor, keys = await self.client.scan(cursor, match=match, count=1000)
                else:
                    reply, keys = await self.client.scan(
                        cursor, match=match, count=1000, target_nodes=node
                    )
                    cursor = next(iter(reply.values())) if isinstance(reply, dict) else reply
                for key in keys:
                    yield key
                seen += len(keys)
                if progress is not None:
                    progress.update(f"scanning… {seen} room(s) found")
                if int(cursor) == 0:
                    break

    async def execute_on(self, node: Any, *args: Any) -> Any:
        if node is None:
            return await self.client.execute_command(*args)
        return await self.client.execute_command(*args, target_nodes=node)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


def make_client(url: str, *, cluster: bool, timeout: float = 5.0) -> Any:
    """A ``redis.asyncio`` client for ``url`` (bytes in and out, as the engine needs)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": max(timeout * 2, 10.0),
        "decode_responses": False,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def connect(url: str, *, timeout: float = 5.0) -> RedisTarget:
    """Connect, check the server answers, and detect a Redis Cluster.

    Raises ``CliError`` (exit code 3) when Redis cannot be reached, with the
    URL (password redacted) and the reason in the message.
    """
    shown = redact_url(url)
    try:
        client = make_client(url, cluster=False, timeout=timeout)
    except ValueError as exc:
        raise CliError(f"invalid Redis URL {shown}: {exc}", EXIT_USAGE) from exc
    try:
        await client.ping()
        cluster = await _cluster_enabled(client)
    except UNREACHABLE as exc:
        await _close_quietly(client)
        raise CliError(f"cannot reach Redis at {shown}: {error_reason(exc)}") from exc
    except RedisError as exc:
        await _close_quietly(client)
        raise CliError(f"Redis at {shown} refused the connection: {error_reason(exc)}") from exc
    if not cluster:
        return RedisTarget(client, shown, cluster=False)
    await _close_quietly(client)
    cluster_client = make_client(url, cluster=True, timeout=timeout)
    try:
        await cluster_client.initialize()
    except (*UNREACHABLE, RedisError) as exc:
        await _close_quietly(cluster_client)
        raise CliError(f"cannot reach Redis Cluster at {shown}: {error_reason(exc)}") from exc
    return RedisTarget(cluster_client, shown, cluster=True)


async def _cluster_enabled(client: Any) -> bool:
    try:
        info = await client.info("cluster")
    except ResponseError:  # servers without INFO (fakeredis) are not clusters
        return False
    return bool(int(info.get("cluster_enabled", 0) or 0))


async def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


def error_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
