"""The Agents SDK's own session tests with the session constructor swapped for ``EngineSession``.

- ``SQLiteSession(session_id, db_path=":memory:", create_tables=False,
  session_settings=None)``: an ``EngineSession`` whose key prefix stands for
  the database (one file is one store; each ``:memory:`` session its own);
- the Redis suite's ``_create_redis_session`` / ``_create_test_session``
  helpers (its constructors): an ``EngineSession`` under a prefix per
  ``key_prefix``, cleared first where the helper clears.

The SDK's sessions have a ``close()``; the engine's are closed with their
engine (at exit), so the swapped class's ``close()`` does nothing.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agents import SessionSettings
from peer_engine import engine, fresh_prefix

from conversation.integrations.openai_agents import EngineSession

_RUN_PREFIX = fresh_prefix()


def _prefix_for(store: str) -> str:
    return "peer" + hashlib.blake2b(store.encode(), digest_size=6).hexdigest()


class SwappedSQLiteSession(EngineSession):
    def __init__(
        self,
        session_id: str,
        db_path: str | Path = ":memory:",
        create_tables: bool = False,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        **_ignored: Any,
    ) -> None:
        store = str(db_path)
        prefix = fresh_prefix() if store == ":memory:" else _prefix_for(store)
        super().__init__(engine(prefix), session_id, session_settings=session_settings)

    def close(self) -> None:
        return None


class SwappedRedisSession(EngineSession):
    """``RedisSession(session_id, *, redis_client, key_prefix, ttl, session_settings)``
    and ``RedisSession.from_url(session_id, *, url, ...)``: the client is the
    engine's own; a key prefix is a store."""

    def __init__(
        self,
        session_id: str,
        *,
        redis_client: Any = None,
        key_prefix: str = "agents:session:",
        ttl: int | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        **_ignored: Any,
    ) -> None:
        prefix = _prefix_for(_RUN_PREFIX + key_prefix)
        super().__init__(engine(prefix), session_id, session_settings=session_settings)

    @classmethod
    def from_url(  # type: ignore[override]
        cls, session_id: str, *, url: str, redis_kwargs: Any = None, **kwargs: Any
    ) -> SwappedRedisSession:
        return cls(session_id, **kwargs)

    async def close(self) -> None:
        return None


async def _create_redis_session(
    session_id: str, key_prefix: str = "test:", ttl: int | None = None
) -> EngineSession:
    return SwappedRedisSession(session_id, key_prefix=key_prefix, ttl=ttl)


async def _create_test_session(session_id: str | None = None) -> EngineSession:
    session = SwappedRedisSession(
        session_id if session_id is not None else f"test_session_{uuid.uuid4().hex[:8]}",
        key_prefix="test:",
    )
    await session.clear_session()
    return session


@pytest.fixture(autouse=True)
def _swap_session_constructors(request: pytest.FixtureRequest) -> Iterator[None]:
    module = request.module
    with pytest.MonkeyPatch.context() as patch:
        if hasattr(module, "SQLiteSession"):
            patch.setattr(module, "SQLiteSession", SwappedSQLiteSession)
        if hasattr(module, "RedisSession"):
            patch.setattr(module, "RedisSession", SwappedRedisSession)
        for name, helper in (
            ("_create_redis_session", _create_redis_session),
            ("_create_test_session", _create_test_session),
        ):
            if hasattr(module, name):
                patch.setattr(module, name, helper)
        yield
