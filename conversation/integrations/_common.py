"""What every integration needs from ``ConversationManager``, through its public API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._errors import ConfigurationError, TemplateError
from .._manager import ConversationManager

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
    await manager.append_many_async(room_id, entries)
