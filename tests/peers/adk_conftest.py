"""Conftest for ADK's own session-service tests (run by scripts/peer_tests.py).

ADK's file builds its services in one function, ``get_session_service(type,
tmp_path)``, behind its ``session_service`` fixture. This conftest swaps that
one function so that every type it is asked for builds an
``EngineSessionService`` on a private real redis-server, flushed before each
test (scripts flushed too, so the reload path runs). The fixture is
parametrised over ADK's four backends; with the constructor swapped the four
runs are the same test, so only the first (``IN_MEMORY``) is kept.

``PEER_MODE`` (set by the runner): ``client`` builds
``EngineSessionService(client)``, on the test's own loop; ``url`` builds
``EngineSessionService.from_url(url)``, on its private loop thread.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(os.environ["CONVERSATION_ROOT"]) / "tests"))

from redis_servers import RedisServer

from conversation.integrations.adk import EngineSessionService

KEPT_BACKEND = "IN_MEMORY"
MODE = os.environ.get("PEER_MODE", "client")


@pytest.fixture(scope="session")
def peer_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
async def engine_constructor(
    request: pytest.FixtureRequest, peer_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    client = aioredis.Redis(port=peer_redis.port, socket_timeout=5)
    await client.flushall()
    await client.script_flush()

    built: list[EngineSessionService] = []

    def get_session_service(*_args: Any, **_kwargs: Any) -> EngineSessionService:
        if MODE == "url":
            built.append(EngineSessionService.from_url(f"redis://127.0.0.1:{peer_redis.port}/0"))
        else:
            built.append(EngineSessionService(client))
        return built[-1]

    monkeypatch.setattr(request.module, "get_session_service", get_session_service)
    try:
        yield
        if "session_service" in request.fixturenames:
            assert built, "the swap did not take: the test ran against ADK's own class"
    finally:
        for service in built:
            await service.close()
        await client.aclose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept: list[pytest.Item] = []
    repeats: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("session_service") if callspec is not None else None
        if backend is not None and getattr(backend, "value", backend) != KEPT_BACKEND:
            repeats.append(item)
        else:
            kept.append(item)
    if repeats:
        config.hook.pytest_deselected(items=repeats)
        items[:] = kept
