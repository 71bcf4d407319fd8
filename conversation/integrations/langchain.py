"""A LangChain chat message history backed by the engine (extra ``langchain``).

``EngineChatMessageHistory`` is a
``langchain_core.chat_history.BaseChatMessageHistory`` over one room, shared by
every worker. Two ways to build one:

- ``EngineChatMessageHistory.from_url(url, session_id, **settings)``: for any
  program, sync or async. The engine runs on a private thread
  (``conversation.blocking``); histories of the same URL and settings share one
  engine per process, flushed when the program exits. The window defaults to
  ``DEFAULT_MAX_HISTORY`` (10,000) messages, not the engine's 100: a LangChain
  history keeps everything it is given, and a chain re-reads it on every turn.
- ``EngineChatMessageHistory(manager, room_id)``, over the bot's own
  ``ConversationManager`` (built with ``prompt_renderer=None``) or a
  ``BlockingConversationManager``.

Every member writes through and raises on failure: ``add_messages`` and
``aadd_messages`` return once Redis holds every message (durable writes:
``DurabilityError`` after ``durable_timeout``), ``clear``/``aclear`` likewise,
and reading (``messages``, ``aget_messages``) catches up with the other workers
first, raising ``RedisUnavailable`` when Redis cannot be reached. Over an async
``ConversationManager`` the sync members hand their work to the manager's loop
when it runs in another thread (``TimeoutError`` if that loop does not take it
within ``sync_timeout``: blocked or stopped), or run it on a loop of their own (one
``asyncio.run`` each; the manager moves to it, SPEC §26) when no loop runs.
Called on the manager's own loop thread, where blocking would stall it, they
fall back to its sync forms: ``messages`` is this worker's memory and writes
persist in the background. Use the ``a*`` members there.

Storage: each message is one chat entry, as ``convert_to_openai_messages``
gives it (``role``, ``content``, ``name``, ``tool_calls``, ``tool_call_id``), so
the room stays an ordinary chat room the bot's own manager reads and sends to a
model. What that entry cannot hold (``id``, ``additional_kwargs``,
``response_metadata``, ``usage_metadata``, ``invalid_tool_calls``, a tool
message's ``artifact`` and ``status``, LangChain's own content blocks) goes in
the entry's private ``metadata`` (``conversation.blocking``'s and the manager's
``metadata=``): the message as LangChain serialises it (``message_to_dict``,
defaults left out, the content left out when the chat entry's content is the
same). Plain reads never return metadata, so none of it reaches a model. A
message reads back equal to what was added; after a platform edit of its
content (``update_message``), it carries the edited content.

A ``developer`` system message is stored as ``system`` (and reads back as it
was added). A ``FunctionMessage`` (role ``function``) or a ``ChatMessage``
with a role OpenAI chat does not have is refused with ``InvalidMessage``.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar, cast

import orjson
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    BaseMessage,
    convert_to_messages,
    convert_to_openai_messages,
    messages_from_dict,
)

from .._errors import InvalidMessage
from .._manager import ConversationManager, engine_loop, hand_off_timeout
from ..blocking import BlockingConversationManager
from ._common import (
    DEFAULT_MAX_HISTORY,
    ENTRY_FIELDS,
    Manager,
    check_window_only,
    run_on,
    shared_engine,
)

__all__ = ["DEFAULT_MAX_HISTORY", "EngineChatMessageHistory", "from_entries", "to_entries"]

T = TypeVar("T")

#: Where in an entry's metadata the LangChain message is kept.
METADATA_KEY: Final = "langchain"

_ROLES: Final = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "tool": "tool",
}


class EngineChatMessageHistory(BaseChatMessageHistory):
    """The turns of one room of a ``ConversationManager``, as LangChain messages."""

    def __init__(self, manager: Manager, room_id: str) -> None:
        super().__init__()
        check_window_only(manager, room_id)
        self.manager = manager
        self.room_id = room_id

    @classmethod
    def from_url(cls, url: str, session_id: str, **settings: Any) -> EngineChatMessageHistory:
        """The history of ``session_id`` (its room id) on the Redis at ``url``.

        ``settings`` are ``ConversationManager``'s (``key_prefix``,
        ``ttl_seconds``, ``max_history``, ...); ``max_history`` defaults to
        ``DEFAULT_MAX_HISTORY``.
        """
        return cls(shared_engine(url, settings), session_id)

    # ------------------------------------------------------------------ reads

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The room after catching up with every other worker (one round trip)."""
        return from_entries(self._blocking(_read(self.room_id), _memory_read(self.room_id)))

    async def aget_messages(self) -> list[BaseMessage]:
        """The room after catching up with every other worker (one round trip)."""
        return from_entries(await self._async(_read(self.room_id)))

    # ----------------------------------------------------------------- writes

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append in order, all or nothing; returns once Redis holds every message."""
        entries = to_entries(messages)
        if entries:
            self._blocking(_append(self.room_id, entries), _append_later(self.room_id, entries))

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append in order, all or nothing; returns once Redis holds every message."""
        entries = to_entries(messages)
        if entries:
            await self._async(_append(self.room_id, entries))

    def clear(self) -> None:
        """Clear the room for every worker; returns once Redis has done it."""
        self._blocking(_clear(self.room_id), _clear_later(self.room_id))

    async def aclear(self) -> None:
        """Clear the room for every worker; returns once Redis has done it."""
        await self._async(_clear(self.room_id))

    # --------------------------------------------------------------- plumbing

    def _blocking(
        self,
        work: Callable[[ConversationManager], Awaitable[T]],
        on_own_loop: Callable[[ConversationManager], T],
    ) -> T:
        manager = self.manager
        if isinstance(manager, BlockingConversationManager):
            return manager.run(work)
        loop = engine_loop(manager)
        if loop is None:
            if _running_loop() is None:
                return asyncio.run(_call(work, manager))  # no loop anywhere: one of our own
            return on_own_loop(manager)  # the manager's next call binds it to this loop
        if _running_loop() is loop:
            return on_own_loop(manager)  # blocking here would stall the loop itself
        return _hand_off(work, manager, loop)

    async def _async(self, work: Callable[[ConversationManager], Awaitable[T]]) -> T:
        return await run_on(self.manager, work)


# ------------------------------------------------------------- the calls


def _read(room_id: str) -> Callable[[ConversationManager], Awaitable[list[dict[str, Any]]]]:
    async def read(manager: ConversationManager) -> list[dict[str, Any]]:
        await manager.ensure_fresh_from_redis(room_id)
        return manager.get_messages(room_id, include_metadata=True)

    return read


def _memory_read(room_id: str) -> Callable[[ConversationManager], list[dict[str, Any]]]:
    return lambda manager: manager.get_messages(room_id, include_metadata=True)


def _append(
    room_id: str, entries: list[dict[str, Any]]
) -> Callable[[ConversationManager], Awaitable[None]]:
    return lambda manager: manager.append_many_async(room_id, entries, durable=True)


def _append_later(
    room_id: str, entries: list[dict[str, Any]]
) -> Callable[[ConversationManager], None]:
    def append(manager: ConversationManager) -> None:
        for entry in entries:
            manager.append(room_id, **entry)

    return append


def _clear(room_id: str) -> Callable[[ConversationManager], Awaitable[None]]:
    return lambda manager: manager.clear_async(room_id, durable=True)


def _clear_later(room_id: str) -> Callable[[ConversationManager], None]:
    return lambda manager: manager.clear(room_id)


async def _call(
    work: Callable[[ConversationManager], Awaitable[T]], manager: ConversationManager
) -> T:
    return await work(manager)


def _hand_off(
    work: Callable[[ConversationManager], Awaitable[T]],
    manager: ConversationManager,
    loop: asyncio.AbstractEventLoop,
) -> T:
    """Run ``work`` on the manager's loop from another thread, and wait for it.

    The loop must take the work within ``sync_timeout``: one that is blocked
    (by sync code on it, perhaps waiting for this very call) or stopped would
    otherwise keep this thread waiting for ever. Taking the work and giving up
    on it are decided under one lock, so work is either done in full or never
    begun. Once started, it is bounded by the engine's own timeouts.
    """
    decided = threading.Lock()
    taken = threading.Event()
    abandoned = False

    async def run() -> T | None:
        with decided:
            if abandoned:
                return None
            taken.set()
        return await work(manager)

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    timeout = hand_off_timeout(manager)
    if not taken.wait(timeout):
        with decided:
            abandoned = not taken.is_set()
        if abandoned:
            future.cancel()
            raise TimeoutError(
                f"the manager's event loop did not take this call within sync_timeout "
                f"({timeout} s): it is blocked (sync code running on it, perhaps waiting "
                "for this call) or no longer running; call the a* members from that loop"
            )
    return cast("T", future.result())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# ------------------------------------------------------------ conversion


def to_entries(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Engine entries (``append`` fields, ``metadata`` included) for LangChain messages.

    Every message is converted before any is written, so a message the engine
    cannot store is refused before the others are appended.
    """
    entries: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, BaseMessage):
            raise InvalidMessage(f"not a LangChain message: {type(message).__name__}")
        converted = convert_to_openai_messages([message])
        if len(converted) != 1:
            raise InvalidMessage(
                f"a {type(message).__name__} that LangChain converts to {len(converted)} "
                "OpenAI chat messages cannot be stored as one entry"
            )
        chat = converted[0]
        role = _ROLES.get(chat["role"])
        if role is None:
            raise InvalidMessage(
                f"LangChain role {chat['role']!r:.40} has no engine equivalent", field="role"
            )
        entry = {key: chat[key] for key in ENTRY_FIELDS if chat.get(key) is not None}
        entry["role"] = role
        entry.setdefault("content", "")
        entry["metadata"] = {METADATA_KEY: _saved(message, entry["content"])}
        entries.append(entry)
    return entries


def _saved(message: BaseMessage, visible: object) -> dict[str, Any]:
    """What ``from_entries`` needs to rebuild ``message`` exactly."""
    data = message.model_dump(exclude_defaults=True)
    saved: dict[str, Any] = {"type": message.type}
    if data.get("content") == visible:
        del data["content"]  # the entry's own content, edits included
    else:
        # LangChain's content blocks differ from the chat form: kept, with a
        # digest of the chat form to tell whether a platform edit replaced it.
        data.setdefault("content", "")
        saved["digest"] = _digest(visible)
    saved["data"] = data
    return saved


def _digest(content: object) -> str:
    return hashlib.blake2b(orjson.dumps(content), digest_size=12).hexdigest()


def from_entries(entries: Sequence[dict[str, Any]]) -> list[BaseMessage]:
    """LangChain messages for engine entries (``get_messages`` output, with or
    without ``include_metadata``): the saved message where one was kept, else
    LangChain's conversion of the chat entry."""
    out: list[BaseMessage] = []
    for raw in entries:
        entry = dict(raw)
        metadata = entry.pop("metadata", None)
        saved = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
        message = _restored(saved, entry) if isinstance(saved, dict) else None
        out.append(message if message is not None else convert_to_messages([entry])[0])
    return out


def _restored(saved: dict[str, Any], entry: dict[str, Any]) -> BaseMessage | None:
    data = saved.get("data")
    kind = saved.get("type")
    if not isinstance(data, dict) or not isinstance(kind, str):
        return None
    data = dict(data)
    visible = entry.get("content")
    if "content" not in data or saved.get("digest") != _digest(visible):
        data["content"] = visible if visible is not None else ""
    try:
        return messages_from_dict([{"type": kind, "data": data}])[0]
    except (ValueError, TypeError):  # a damaged or foreign record: the chat entry stands
        return None
