from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer

from conversation import ConversationManager

# Every test module's tier (see the markers in pyproject.toml). A new module
# must be placed here: collection fails until it is.
TIERS = {
    "unit": (
        "test_entries",
        "test_budget",
        "test_renderer",
        "test_layering",
        "test_failure_ladder",
    ),
    "scripts": ("test_scripts",),
    "engine": (
        "test_engine",
        "test_window",
        "test_hardening",
        "test_hardening_small",
        "test_consolidation",
        "test_sessions",
        "test_integrations",
        "test_changes",
        "test_cursors",
        "test_working_set",
        "test_push",
        "test_transfer",
        "test_blocking",
        "test_loop_moves",
        "test_langchain",
        "test_agents_session",
        "test_reactions",
        "test_platform_discord",
        "test_platform_slack",
        "test_platform_telegram",
    ),
    "faults": ("test_faults", "test_chaos", "test_replication", "test_sentinel"),
    "scale": ("test_cluster", "test_cluster_basics", "test_multiprocess", "test_reaction_storm"),
    "tools": (
        "test_cli",
        "test_cli_transfer",
        "test_docs_changes",
        "test_demo",
        "test_bench_smoke",
        "test_bench_peers",
        "test_wheel",
        "test_servers",
    ),
}
# The modules of the SessionStore-based adapters (Google ADK, LlamaIndex).
TIERS["engine"] += ("test_adk", "test_llama_index", "test_session_state")
TIERS["scale"] += ("test_adapters_cluster",)
TIERS["tools"] += ("test_quickstarts",)
_TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        if module not in _TIER_OF:
            raise pytest.UsageError(f"{module} has no tier: add it to TIERS in tests/conftest.py")
        item.add_marker(_TIER_OF[module])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    """The private server as a ``redis://`` URL (a module may override it to seed data)."""
    return f"redis://127.0.0.1:{redis_server.port}/0"


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    # Start every test with no scripts or functions loaded, so the reload path runs.
    await client.script_flush()
    await client.function_flush()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def fake_client() -> AsyncIterator[aioredis.Redis]:
    client = fakeredis.FakeAsyncRedis()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["real", "fake"])
async def any_client(request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """Both backends: fakeredis runs Lua 5.4, Redis runs 5.1; the scripts must suit both."""
    if request.param == "real":
        server = RedisServer(Path(request.getfixturevalue("tmp_path")) / "redis").start()
        client = aioredis.Redis(port=server.port, socket_timeout=5)
        await client.script_flush()
        await client.function_flush()
        try:
            yield client
        finally:
            await client.aclose()
            server.stop()
    else:
        client = fakeredis.FakeAsyncRedis()
        try:
            yield client
        finally:
            await client.aclose()


@pytest.fixture
def room() -> str:
    return f"test:{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_manager() -> AsyncIterator[object]:
    managers: list[ConversationManager] = []

    def make(redis: object = None, **kwargs: object) -> ConversationManager:
        kwargs.setdefault("max_history", 100)
        manager = ConversationManager(None, redis=redis, **kwargs)  # type: ignore[arg-type]
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.aclose(timeout=10)
