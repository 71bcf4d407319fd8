"""A LangChain chat message history backed by the engine (extra ``langchain``).

``EngineChatMessageHistory(manager, room_id)`` is a
``langchain_core.chat_history.BaseChatMessageHistory`` over one room. Messages
are converted by LangChain's own converters, both ways:

- writing: ``convert_to_openai_messages`` turns ``HumanMessage``, ``AIMessage``
  (with ``tool_calls``), ``ToolMessage`` and ``SystemMessage`` into OpenAI chat
  entries, which the engine stores as they are, so the room stays an ordinary
  chat room that the bot's own manager reads too;
- reading: ``convert_to_messages`` turns the room's entries back into messages.

What an OpenAI chat entry has no field for is not stored: a message's ``id``,
``additional_kwargs``, ``response_metadata``, ``usage_metadata`` and
``invalid_tool_calls``. A ``developer`` system message is stored as ``system``.
A ``FunctionMessage`` (role ``function``, long deprecated by OpenAI) is refused
with ``InvalidMessage``.

The manager must be built with ``prompt_renderer=None``: a LangChain history is
the stored turns, and the chain adds its own system prompt. The sync members
(``messages``, ``add_messages``, ``clear``) use the engine's sync forms: they
read this worker's memory and persist in the background, and are safe inside the
manager's event loop or from a thread while that loop runs. The async members
(``aget_messages``, ``aadd_messages``, ``aclear``) use the ``_async`` forms:
``aget_messages`` catches up with the other workers first, and ``aadd_messages``
returns once Redis holds every message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import BaseMessage, convert_to_messages, convert_to_openai_messages

from .._errors import InvalidMessage
from .._manager import ConversationManager
from ._common import ENTRY_FIELDS, append_entries, require_window_only

__all__ = ["EngineChatMessageHistory", "from_entries", "to_entries"]

_ROLES = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",  # OpenAI's newer name for the system role
    "tool": "tool",
}


class EngineChatMessageHistory(BaseChatMessageHistory):
    """The turns of one room of a ``ConversationManager``, as LangChain messages."""

    def __init__(self, manager: ConversationManager, room_id: str) -> None:
        super().__init__()
        require_window_only(manager, room_id)
        self.manager = manager
        self.room_id = room_id

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        """The room as this worker holds it (memory only, no Redis round trip)."""
        return from_entries(self.manager.get_messages(self.room_id))

    async def aget_messages(self) -> list[BaseMessage]:
        """The room after catching up with every other worker (one round trip)."""
        return from_entries(await self.manager.get_messages_async(self.room_id))

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append now; each message reaches Redis in the engine's background persist."""
        for entry in to_entries(messages):
            self.manager.append(self.room_id, **entry)

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append and return once Redis holds every message."""
        await append_entries(self.manager, self.room_id, to_entries(messages))

    def clear(self) -> None:
        """Clear the room for every worker (persisted in the background)."""
        self.manager.clear(self.room_id)

    async def aclear(self) -> None:
        """Clear the room for every worker and return once Redis has done it."""
        await self.manager.clear_async(self.room_id)


def to_entries(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI chat entries for LangChain messages, ready for ``ConversationManager.append``.

    Every message is converted before any is written, so a message the engine
    cannot store is refused before the others are appended.
    """
    entries: list[dict[str, Any]] = []
    for message in convert_to_openai_messages(list(messages)):
        role = _ROLES.get(message["role"])
        if role is None:
            raise InvalidMessage(
                f"LangChain role {message['role']!r:.40} has no engine equivalent", field="role"
            )
        entry = {key: message[key] for key in ENTRY_FIELDS if message.get(key) is not None}
        entry["role"] = role
        entry.setdefault("content", "")
        entries.append(entry)
    return entries


def from_entries(entries: Sequence[dict[str, Any]]) -> list[BaseMessage]:
    """LangChain messages for OpenAI chat entries (what ``get_messages`` returns)."""
    return convert_to_messages(entries)
