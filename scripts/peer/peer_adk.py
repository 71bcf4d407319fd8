"""ADK's own session-service tests with its constructor swapped for ``EngineSessionService``.

ADK's file builds its services in one function, ``get_session_service(type,
tmp_path)``, behind its ``session_service`` fixture. This plugin swaps that one
function so that every type it is asked for builds an ``EngineSessionService``
on the runner's private redis-server, flushed before each test (scripts
flushed too, so the reload path runs). The fixture is parametrised over ADK's
four backends; with the constructor swapped the four runs are the same test,
so only the first (``IN_MEMORY``) is kept.

``PEER_MODE``: ``client`` builds ``EngineSessionService(client)``, on the
test's own loop; ``url`` builds ``EngineSessionService.from_url(url)``, on its
private loop thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from peer_engine import MODE, URL, note_built

from conversation.integrations.adk import EngineSessionService

KEPT_BACKEND = "IN_MEMORY"


@pytest.fixture(autouse=True)
async def _swap_session_service(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[None]:
    client = aioredis.Redis.from_url(URL, socket_timeout=5)
    await client.flushall()
    await client.script_flush()
    built: list[EngineSessionService] = []

    def get_session_service(*_args: Any, **_kwargs: Any) -> EngineSessionService:
        if MODE == "url":
            built.append(EngineSessionService.from_url(URL))
        else:
            built.append(EngineSessionService(client))
        note_built()
        return built[-1]

    if hasattr(request.module, "get_session_service"):
        monkeypatch.setattr(request.module, "get_session_service", get_session_service)
    try:
        yield
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
