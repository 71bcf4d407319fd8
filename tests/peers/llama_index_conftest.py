"""Conftest for LlamaIndex's own chat-store tests (run by scripts/peer_tests.py).

LlamaIndex's file builds ``SimpleChatStore()`` in each test. This conftest
swaps that one name so that it builds an ``EngineChatStore`` on a private real
redis-server, flushed before each test. The tests are sync; the runner runs
the file twice, as ``PEER_MODE`` says:

- ``sync``: as written, a plain sync program with no event loop anywhere
  (the store's own loop thread aside);
- ``thread``: each test body runs in a worker thread while an asyncio event
  loop runs in the main thread (an async app calling the sync API through
  ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(os.environ["CONVERSATION_ROOT"]) / "tests"))

from redis_servers import RedisServer

from conversation.integrations.llama_index import EngineChatStore

MODE = os.environ.get("PEER_MODE", "sync")


@pytest.fixture(scope="session")
def peer_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def engine_constructor(
    request: pytest.FixtureRequest, peer_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    with redis.Redis(port=peer_redis.port) as admin:
        admin.flushall()
        admin.script_flush()
    built: list[EngineChatStore] = []

    def simple_chat_store(*_args: Any, **_kwargs: Any) -> EngineChatStore:
        built.append(
            EngineChatStore(lambda: aioredis.Redis(port=peer_redis.port, socket_timeout=5))
        )
        return built[-1]

    monkeypatch.setattr(request.module, "SimpleChatStore", simple_chat_store)
    try:
        yield
        assert built, "the swap did not take: the test ran against LlamaIndex's own class"
    finally:
        for store in built:
            store.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if MODE != "thread":
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        assert asyncio.get_running_loop().is_running()
        await asyncio.to_thread(pyfuncitem.obj, **kwargs)

    asyncio.run(main())
    return True
