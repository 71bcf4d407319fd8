"""What every integration needs from ``ConversationManager``, through its public API."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from .._errors import ConfigurationError, TemplateError
from .._manager import ConversationManager
from ..blocking import BlockingConversationManager

T = TypeVar("T")

Manager = ConversationManager | BlockingConversationManager

#: The window of an adapter built by ``from_url``, in messages (``max_history=``
#: overrides it): framework stores keep what they are given, 100 would cut them.
DEFAULT_MAX_HISTORY: Final = 10_000

#: The fields of an OpenAI chat entry that ``ConversationManager.append`` takes.
ENTRY_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def require_window_only(manager: ConversationManager, room_id: str) -> None:
    """Refuse a manager that puts a rendered system prompt in front of the window.

    Framework histories hold the stored turns only (the framework adds its own
    instructions), so integrations take a manager built with
    ``prompt_renderer=None``, whose reads return exactly the window. The check
    uses public calls with no await between them, so nothing can slip in: a
    renderer shows as one message more than the room holds. It also validates
    the room id.
    """
    try:
        shown = len(manager.get_messages(room_id))
    except TemplateError as exc:
        raise ConfigurationError(_RENDERER_MESSAGE) from exc
    if shown != manager.get_history_message_count(room_id):
        raise ConfigurationError(_RENDERER_MESSAGE)


_RENDERER_MESSAGE = (
    "integrations need a ConversationManager built with prompt_renderer=None, whose reads "
    "return the stored turns only; it can share the Redis client and key_prefix of the "
    "bot's own manager, and both see the same rooms"
)


async def append_entries(
    manager: ConversationManager, room_id: str, entries: Sequence[Mapping[str, Any]]
) -> None:
    """Append entries in order, all or nothing, and return once Redis holds them."""
    await manager.append_many_async(room_id, entries, durable=True)


def check_window_only(manager: Manager, room_id: str) -> None:
    """``require_window_only`` for either kind of manager."""
    if isinstance(manager, BlockingConversationManager):
        manager.run(_window_only(room_id))
    else:
        require_window_only(manager, room_id)


def _window_only(room_id: str) -> Callable[[ConversationManager], Awaitable[None]]:
    async def check(manager: ConversationManager) -> None:
        require_window_only(manager, room_id)

    return check


async def run_on(manager: Manager, work: Callable[[ConversationManager], Awaitable[T]]) -> T:
    """Await ``work(manager)`` on the engine's loop, from whatever loop the caller runs.

    A ``BlockingConversationManager`` runs it on its own thread (so a caller may
    use a new loop per call, or several loops at once); a ``ConversationManager``
    runs it here, under the §26 rules of loops.
    """
    if isinstance(manager, BlockingConversationManager):
        return await asyncio.wrap_future(manager.submit(work))
    return await work(manager)


class _Engines:
    """The shared engines, by (URL, settings), and the lock that guards them."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str], BlockingConversationManager] = {}
        self.lock = threading.Lock()

    def new_lock_after_fork(self) -> None:
        # Another thread may have held the lock at the fork: the child's copy would
        # never be released. The child's engines are rebuilt (the parent's count
        # as closed there).
        self.lock = threading.Lock()


_engines = _Engines()
os.register_at_fork(after_in_child=_engines.new_lock_after_fork)


def shared_engine(url: str, settings: dict[str, Any]) -> BlockingConversationManager:
    """One engine per (URL, settings) per process, for the adapters' ``from_url``.

    Frameworks build a history or session per call (``RunnableWithMessageHistory``
    does, per invocation); each engine is a thread and a connection pool, so
    they are shared, and flushed when the program exits. A forked child (a
    pre-fork server's worker) gets engines of its own: the parent's thread did
    not survive the fork.
    """
    settings.setdefault("max_history", DEFAULT_MAX_HISTORY)
    key = (url, repr(sorted(settings.items())))
    with _engines.lock:
        engine = _engines.by_key.get(key)
        if engine is None or engine.closed:
            engine = BlockingConversationManager.from_url(url, **settings)
            _engines.by_key[key] = engine
        return engine
