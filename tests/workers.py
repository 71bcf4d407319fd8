"""Bodies of the multi-process tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from conversation import ConversationManager


def _manager(port: int, **kwargs: Any) -> tuple[ConversationManager, aioredis.Redis]:
    client = aioredis.Redis(port=port, socket_timeout=10)
    return ConversationManager(None, redis=client, **kwargs), client


def append_many(index: int, barrier: Any, port: int, room: str, count: int) -> list[str]:
    """Append ``count`` uniquely-identified turns, half sync, half awaited."""

    async def body() -> list[str]:
        manager, client = _manager(port, max_history=1000)
        barrier.wait()
        for i in range(count):
            content = f"[Message ID: p{index}-{i}] from process {index}"
            if i % 2:
                await manager.append_async(room, "user", content)
            else:
                manager.append(room, "user", content)
            if i % 25 == 0:
                await asyncio.sleep(0)  # let the persist task interleave with others
        await manager.drain()
        barrier.wait()  # every process is done writing: now all must converge
        await manager.ensure_fresh_from_redis(room)
        window = [m["content"] for m in manager.get_messages(room)]
        await manager.aclose()
        await client.aclose()
        return window

    return asyncio.run(body())


def edit_repeatedly(index: int, barrier: Any, port: int, room: str, count: int) -> dict[str, Any]:
    async def body() -> dict[str, Any]:
        manager, client = _manager(port, max_history=1000)
        await manager.ensure_fresh_from_redis(room)
        barrier.wait()
        for i in range(count):
            assert await manager.update_message_async(
                room, "target", f"[Message ID: target] edit {i}"
            )
        stats = manager.stats()
        barrier.wait()
        await manager.ensure_fresh_from_redis(room)
        window = [m["content"] for m in manager.get_messages(room)]
        await manager.aclose()
        await client.aclose()
        return {"stats": stats, "window": window}

    return asyncio.run(body())


def append_tight(index: int, barrier: Any, port: int, room: str, count: int) -> dict[str, Any]:
    async def body() -> dict[str, Any]:
        manager, client = _manager(port, max_history=1000)
        barrier.wait()
        for i in range(count):
            await manager.append_async(room, "user", f"[Message ID: b{i}] tight loop")
        barrier.wait()
        await manager.ensure_fresh_from_redis(room)
        window = [m["content"] for m in manager.get_messages(room)]
        await manager.aclose()
        await client.aclose()
        return {"stats": manager.stats(), "window": window}

    return asyncio.run(body())


def react_storm(
    index: int, barrier: Any, port: int, room: str, deliveries: list[tuple[str, str, str, str]]
) -> dict[str, Any]:
    """Feed ``deliveries`` ((action, message, emoji, user), in order) as reaction
    events: process 0 with the sync forms (queued, persisted in the background),
    the others awaiting each one, as a gateway handler would."""

    async def body() -> dict[str, Any]:
        manager, client = _manager(port)
        await manager.ensure_fresh_from_redis(room)
        barrier.wait()
        for number, (action, message, emoji, user) in enumerate(deliveries):
            if index == 0:
                call = manager.add_reaction if action == "add" else manager.remove_reaction
                assert call(room, message, emoji, user)
                if number % 10 == 0:
                    await asyncio.sleep(0)  # let the persist task interleave with others
            else:
                call_async = (
                    manager.add_reaction_async if action == "add" else manager.remove_reaction_async
                )
                assert await call_async(room, message, emoji, user)
        await manager.drain()
        stats = manager.stats()
        barrier.wait()  # every process is done: now all must converge
        await manager.ensure_fresh_from_redis(room)
        window = [m["content"] for m in manager.get_messages(room)]
        await manager.aclose()
        await client.aclose()
        return {"stats": stats, "window": window}

    return asyncio.run(body())
