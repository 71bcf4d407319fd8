"""The engine behind the swapped constructors, as the runner's environment says.

``PEER_REDIS_URL`` names the private Redis the runner started. ``PEER_MODE``:

- ``plain``: adapters over a ``BlockingConversationManager`` (what ``from_url``
  builds): a sync test runs in a thread with no event loop anywhere in it;
- ``threaded``: adapters over an async ``ConversationManager`` whose loop runs
  in another thread for the whole session; a sync test calls it from the main
  thread, while that loop runs (only sync tests run in this mode).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid

import redis.asyncio as aioredis

from conversation import ConversationManager
from conversation.blocking import BlockingConversationManager

MODE = os.environ.get("PEER_MODE", "plain")
URL = os.environ["PEER_REDIS_URL"]
# Peer tests keep whole histories (1000-message tests are not unusual).
MAX_HISTORY = 10_000

_blocking: dict[str, BlockingConversationManager] = {}
_threaded: dict[str, ConversationManager] = {}
_lock = threading.Lock()


class _Counts:
    #: Adapters built by the swapped constructors (the report shows it: proof of the swap).
    built = 0


counts = _Counts()
_state: dict[str, asyncio.AbstractEventLoop] = {}


def note_built() -> None:
    """Counts an adapter a plugin built itself (not through ``engine``)."""
    with _lock:
        counts.built += 1


def fresh_prefix() -> str:
    return f"peer{uuid.uuid4().hex[:10]}"


def engine(key_prefix: str) -> BlockingConversationManager | ConversationManager:
    """The engine of one peer "store" (a database file, a key prefix)."""
    with _lock:
        counts.built += 1
        if MODE == "threaded":
            return _threaded_engine(key_prefix)
        manager = _blocking.get(key_prefix)
        if manager is None:
            manager = _blocking[key_prefix] = BlockingConversationManager.from_url(
                URL, key_prefix=key_prefix, max_history=MAX_HISTORY
            )
        return manager


def _threaded_engine(key_prefix: str) -> ConversationManager:
    loop = _state.get("loop")
    if loop is None:
        loop = _state["loop"] = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="peer-engine-loop", daemon=True).start()
    manager = _threaded.get(key_prefix)
    if manager is None:

        async def build() -> ConversationManager:
            client = aioredis.Redis.from_url(URL)
            built = ConversationManager(
                None, redis=client, key_prefix=key_prefix, max_history=MAX_HISTORY
            )
            built.get_messages("peer:bind")  # binds the manager to this running loop
            return built

        manager = asyncio.run_coroutine_threadsafe(build(), loop).result()
        _threaded[key_prefix] = manager
    return manager
