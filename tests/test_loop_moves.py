"""SPEC §26: a manager or a session store outlives the event loop that first used it.

Each test is a plain function that runs ``asyncio.run`` several times, as a
program that runs one loop per request does (the Agents SDK's ``run_sync``,
many web handlers). The client and its connection pool are shared across the
loops, which is where the dead loop's connections used to break the next call.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer

from conversation import ConfigurationError, ConversationManager, SessionStore

pytestmark = pytest.mark.real_server


def test_a_session_store_serves_one_asyncio_run_after_another(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    store = SessionStore(client)
    session = asyncio.run(store.create_session("ann"))

    async def turn(n: int) -> list[str]:
        await store.append_message(session, {"role": "user", "content": f"turn {n}"})
        loaded = await store.get_session("ann", session.session_id)
        if n == 2:
            await client.aclose()  # on the loop that owns its connections
        assert loaded is not None
        return [m["content"] for m in loaded.messages]

    for n in range(3):
        assert asyncio.run(turn(n)) == [f"turn {i}" for i in range(n + 1)]


def test_a_manager_and_a_store_sharing_a_client_both_move(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    manager = ConversationManager(None, redis=client)
    store = SessionStore(client)

    async def turn(n: int) -> tuple[int, int]:
        # Each rebinds in turn; the second must not close what the first opened.
        await manager.append_async("room", "user", f"turn {n}")
        session = await store.create_session("bob", f"s{n}")
        await store.append_message(session, {"role": "user", "content": "x"})
        await manager.append_async("room", "assistant", f"answer {n}")
        counts = (
            len(await manager.get_messages_async("room")),
            len(await store.list_sessions("bob")),
        )
        if n == 2:
            await manager.aclose()
            await client.aclose()
        return counts

    for n in range(3):
        assert asyncio.run(turn(n)) == (2 * (n + 1), n + 1)


def test_a_store_refuses_another_loop_while_its_own_is_open(redis_server: RedisServer) -> None:
    client = aioredis.Redis(port=redis_server.port)
    store = SessionStore(client)
    owner = asyncio.new_event_loop()
    try:
        session = owner.run_until_complete(store.create_session("cy"))
        outcome: list[BaseException] = []

        def elsewhere() -> None:
            try:
                asyncio.run(store.get_session("cy", session.session_id))
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
        assert len(outcome) == 1 and isinstance(outcome[0], ConfigurationError)
        # The owner's state was not touched: it goes on working.
        loaded = owner.run_until_complete(store.get_session("cy", session.session_id))
        assert loaded is not None
    finally:
        owner.run_until_complete(client.aclose())
        owner.close()
