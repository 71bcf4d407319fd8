"""A LlamaIndex chat store backed by the engine's ``SessionStore`` (extra ``llama-index``).

``EngineChatStore.from_url(url)`` is a
``llama_index.core.storage.chat_store.BaseChatStore``: chat histories by key,
shared by every worker through Redis, for ``ChatMemoryBuffer``,
``Memory`` and the chat engines. Nothing is kept in this process: every
call reads or writes Redis.

Mapping: the store's keys are the sessions of one store owner, the
``namespace`` (default ``"default"``), so ``get_keys`` answers from that
owner's index, never by scanning the keyspace. Each ``ChatMessage`` is one row,
``{"role": <label>, "content": [{"type": "x-llama-index-message", "message":
<ChatMessage as JSON>}]}``: the whole message (role, blocks, additional_kwargs)
round-trips, and positional changes (``add_message(idx=...)``,
``delete_message``, ``delete_last_message``, ``set_messages``) are one script
each (``session_splice.lua``), atomic against other workers.

Sync and async: the store runs on the event-loop thread of a
``conversation.blocking.BlockingConversationManager`` (anyio's blocking portal),
so the sync methods work in a plain sync program and from any thread, and the
async ones (``aget_messages``, ``async_add_message``, ...) from any event loop,
all on one connection pool. Every method returns once Redis has answered and
raises when it could not (``PersistError`` for a write, ``RedisUnavailable``
for a read), as LlamaIndex's own Redis store does.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from llama_index.core.llms import ChatMessage
from llama_index.core.storage.chat_store.base import BaseChatStore
from pydantic import PrivateAttr
from redis.asyncio import Redis

from .._errors import ConfigurationError
from .._manager import ConversationManager
from .._sessions.store import SessionStore, validate_user_id
from ..blocking import BlockingConversationManager

__all__ = ["MESSAGE_PART", "EngineChatStore"]

#: The content-part type that carries one whole ``ChatMessage``.
MESSAGE_PART: Final = "x-llama-index-message"
#: The key family of the chat store's keys: ``{prefix}:llamaindex:{<namespace>}:...``.
KEY_FAMILY: Final = "llamaindex"
#: ``insert`` at this position appends (the script clamps it to the list).
_END: Final = sys.maxsize

_LABELS: Final = {"user": "user", "system": "system", "developer": "system"}

T = TypeVar("T")


class EngineChatStore(BaseChatStore):
    """LlamaIndex chat histories in Redis, shared by every worker.

    ``client_factory`` builds the ``redis.asyncio`` client, on the store's
    loop thread (``None``: this process's memory only, for tests); use
    ``from_url(url)`` for a URL. ``namespace`` names the set of keys that
    ``get_keys`` lists (one store owner, one hash tag: one cluster slot).
    ``idle_ttl_seconds``: a history nobody reads or writes expires after this
    long (default 30 days); ``max_messages``: the oldest messages of a longer
    history fall off (default 10,000). ``close()`` closes the client and the
    loop thread (a program that forgets is closed at exit).
    """

    namespace: str = "default"

    _engine: BlockingConversationManager = PrivateAttr()
    _store: SessionStore = PrivateAttr()
    _client: Any = PrivateAttr(default=None)

    def __init__(
        self,
        client_factory: Callable[[], Any] | None = None,
        *,
        namespace: str = "default",
        key_prefix: str = "sg",
        idle_ttl_seconds: float = 30 * 24 * 3600,
        max_messages: int = 10_000,
        max_message_bytes: int = 8 * 1024 * 1024,
        command_timeout: float | None = 10.0,
    ) -> None:
        super().__init__()
        self.namespace = validate_user_id(namespace)
        if client_factory is not None and not callable(client_factory):
            raise ConfigurationError(
                "client_factory must build a redis.asyncio client (or be None); "
                "use EngineChatStore.from_url(url) for a URL"
            )
        # The engine is only the loop thread here: the store lives on its loop.
        engine = BlockingConversationManager(None)

        async def build(_: ConversationManager) -> tuple[Any, SessionStore]:
            client = client_factory() if client_factory is not None else None
            store = SessionStore(
                client,
                key_prefix=key_prefix,
                idle_ttl_seconds=idle_ttl_seconds,
                max_messages=max_messages,
                max_message_bytes=max_message_bytes,
                command_timeout=command_timeout,
                key_family=KEY_FAMILY,
            )
            return client, store

        try:
            self._client, self._store = engine.run(build)
        except BaseException:
            engine.close()
            raise
        self._engine = engine

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> EngineChatStore:
        """A chat store on a ``redis.asyncio.Redis.from_url(url)`` client."""
        if not isinstance(url, str) or not url:
            raise ConfigurationError(f"a Redis URL is a non-empty string, got {url!r:.80}")
        return cls(lambda: Redis.from_url(url), **settings)

    @classmethod
    def class_name(cls) -> str:
        return "EngineChatStore"

    def close(self) -> None:
        """Close the Redis client and stop the store's loop thread (twice is a no-op)."""
        if self._engine.closed:
            return
        try:
            if self._client is not None:
                client = self._client

                async def close_client(_: ConversationManager) -> None:
                    await client.aclose()

                self._engine.run(close_client)
        finally:
            self._engine.close()

    def __enter__(self) -> EngineChatStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sync

    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        """Replace the key's history (creating it) in one atomic step."""
        self._run(self._set(key, messages))

    def get_messages(self, key: str) -> list[ChatMessage]:
        """The key's history, oldest first ([] for an unknown key)."""
        return self._run(self._get(key))

    def add_message(self, key: str, message: ChatMessage, idx: int | None = None) -> None:
        """Append the message, or insert it before position ``idx`` (as ``list.insert``)."""
        self._run(self._add(key, message, idx))

    def delete_messages(self, key: str) -> list[ChatMessage] | None:
        """Delete the key and return its history (None when there was none)."""
        return self._run(self._take(key))

    def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        """Remove and return the message at ``idx`` (negative from the end), or None."""
        return self._run(self._remove(key, "remove", idx))

    def delete_last_message(self, key: str) -> ChatMessage | None:
        """Remove and return the last message, or None when the history is empty."""
        return self._run(self._remove(key, "pop", 0))

    def get_keys(self) -> list[str]:
        """The namespace's live keys, oldest first (in the order they were created)."""
        return self._run(self._keys())

    # ----------------------------------------------------------------- async

    async def aset_messages(self, key: str, messages: list[ChatMessage]) -> None:
        await self._arun(self._set(key, messages))

    async def aget_messages(self, key: str) -> list[ChatMessage]:
        return await self._arun(self._get(key))

    async def async_add_message(
        self, key: str, message: ChatMessage, idx: int | None = None
    ) -> None:
        await self._arun(self._add(key, message, idx))

    async def adelete_messages(self, key: str) -> list[ChatMessage] | None:
        return await self._arun(self._take(key))

    async def adelete_message(self, key: str, idx: int) -> ChatMessage | None:
        return await self._arun(self._remove(key, "remove", idx))

    async def adelete_last_message(self, key: str) -> ChatMessage | None:
        return await self._arun(self._remove(key, "pop", 0))

    async def aget_keys(self) -> list[str]:
        return await self._arun(self._keys())

    # ------------------------------------------------------------- internals

    def _run(self, work: Callable[[SessionStore], Awaitable[T]]) -> T:
        async def on_loop(_: ConversationManager) -> T:
            return await work(self._store)

        return self._engine.run(on_loop)

    async def _arun(self, work: Callable[[SessionStore], Awaitable[T]]) -> T:
        async def on_loop(_: ConversationManager) -> T:
            return await work(self._store)

        return await asyncio.wrap_future(self._engine.submit(on_loop))

    def _set(
        self, key: str, messages: Sequence[ChatMessage]
    ) -> Callable[[SessionStore], Awaitable[None]]:
        rows = [_row(m) for m in messages]  # checked here, before anything is sent

        async def work(store: SessionStore) -> None:
            await store.splice(self.namespace, key, "set", messages=rows)

        return work

    def _get(self, key: str) -> Callable[[SessionStore], Awaitable[list[ChatMessage]]]:
        async def work(store: SessionStore) -> list[ChatMessage]:
            session = await store.get_session(self.namespace, key)
            return [] if session is None else _messages(session.messages)

        return work

    def _add(
        self, key: str, message: ChatMessage, idx: int | None
    ) -> Callable[[SessionStore], Awaitable[None]]:
        rows = [_row(message)]

        async def work(store: SessionStore) -> None:
            position = _END if idx is None else idx
            await store.splice(self.namespace, key, "insert", position=position, messages=rows)

        return work

    def _take(self, key: str) -> Callable[[SessionStore], Awaitable[list[ChatMessage] | None]]:
        async def work(store: SessionStore) -> list[ChatMessage] | None:
            done = await store.splice(self.namespace, key, "take")
            return None if done is None else _messages(done[1])

        return work

    def _remove(
        self, key: str, op: str, idx: int
    ) -> Callable[[SessionStore], Awaitable[ChatMessage | None]]:
        async def work(store: SessionStore) -> ChatMessage | None:
            done = await store.splice(self.namespace, key, op, position=idx)
            removed = [] if done is None else _messages(done[1])
            return removed[0] if removed else None

        return work

    def _keys(self) -> Callable[[SessionStore], Awaitable[list[str]]]:
        async def work(store: SessionStore) -> list[str]:
            listed = await store.list_sessions(self.namespace)  # newest first
            return [info.session_id for info in reversed(listed)]

        return work


def _row(message: object) -> dict[str, Any]:
    if not isinstance(message, ChatMessage):
        raise TypeError(f"a chat store holds ChatMessage objects, not {type(message).__name__}")
    data = message.model_dump(mode="json")
    label = _LABELS.get(str(data.get("role")), "assistant")
    return {"role": label, "content": [{"type": MESSAGE_PART, "message": data}]}


def _messages(rows: Sequence[dict[str, Any]]) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    for row in rows:
        content = row.get("content")
        part = content[0] if isinstance(content, list) and len(content) == 1 else None
        if isinstance(part, dict) and part.get("type") == MESSAGE_PART:
            messages.append(ChatMessage.model_validate(part["message"]))
        else:  # a plain chat row written by other means: still a message
            messages.append(ChatMessage(role=row.get("role", "user"), content=content))
    return messages
