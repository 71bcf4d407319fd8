"""LlamaIndex's own chat-store tests with ``SimpleChatStore`` swapped for ``EngineChatStore``.

LlamaIndex's file builds ``SimpleChatStore()`` in each test. This plugin swaps
that one name so that it builds an ``EngineChatStore`` on the runner's private
redis-server, flushed before each test. The tests are sync; ``PEER_MODE``:

- ``plain``: as written, a plain sync program with no event loop anywhere
  (the store's own loop thread aside);
- ``threaded``: each test body runs in a worker thread while an asyncio event
  loop runs in the main thread (an async app calling the sync API through
  ``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from peer_engine import MODE, URL, note_built

from conversation.integrations.llama_index import EngineChatStore


@pytest.fixture(autouse=True)
def _swap_chat_store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    with redis.Redis.from_url(URL) as admin:
        admin.flushall()
        admin.script_flush()
    built: list[EngineChatStore] = []

    def simple_chat_store(*_args: Any, **_kwargs: Any) -> EngineChatStore:
        built.append(EngineChatStore(lambda: aioredis.Redis.from_url(URL, socket_timeout=5)))
        note_built()
        return built[-1]

    if hasattr(request.module, "SimpleChatStore"):
        monkeypatch.setattr(request.module, "SimpleChatStore", simple_chat_store)
    try:
        yield
    finally:
        for store in built:
            store.close()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if MODE != "threaded":
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        assert asyncio.get_running_loop().is_running()
        await asyncio.to_thread(pyfuncitem.obj, **kwargs)

    asyncio.run(main())
    return True
