"""An OpenAI Agents SDK session backed by the engine (extra ``openai-agents``).

``EngineSession(manager, session_id)`` implements the SDK's ``Session``
protocol (``agents.memory.session.Session``) over one room, by default
``agents:<session_id>``. Items are Responses-API input items; each is stored as
one engine entry:

- a plain chat message, exactly ``{"role": "user"|"assistant"|"system",
  "content": "<text>"}``, is stored as that chat entry, unchanged;
- every other item (messages with content parts, ids or a status, function
  calls and their outputs, reasoning, hosted tool calls, ...) is stored whole,
  as the only content part of its entry, ``{"type": "x-openai-agents-item",
  "item": {...}}``: a part type the engine passes through untouched, so the
  item comes back exactly as it was given (JSON types round-trip losslessly).
  The entry's role is a label for the engine: ``user``/``assistant``/``system``
  after the item's own role (``developer`` -> ``system``), ``tool`` for
  ``*_output`` items (so the engine's trim rule drops a call's output left at
  the front of the window without its call), ``user`` for an MCP approval
  response, ``assistant`` for everything else.

``pop_item`` needs no engine primitive. It appends a *pop marker*, an entry
(role ``tool``) whose only part is ``{"type": "x-openai-agents-pop", "token":
...}``, and the session's items are the room's entries replayed as a stack: an
item entry pushes, a marker pops. Redis orders every append of every worker, so
concurrent pops from any number of workers each remove a different item (or
find the session empty), and each learns which item it removed by replaying the
window up to its own marker. A marker left at the front of the window by
trimming can only refer to an item already trimmed away, so trimming keeps the
replay right. Markers take window slots: a room holds ``max_history`` entries,
items and markers together.

A session room belongs to its session: the bot's chat workers should not read
it (its private parts are not chat content parts). Entries written into it by
other means come back as the OpenAI chat dicts they are.

The manager must be built with ``prompt_renderer=None`` (the agent has its own
instructions). ``get_items`` catches up with other workers first; ``add_items``
returns once Redis holds every item; ``pop_item`` syncs with Redis first and
raises ``RedisUnavailable`` when it cannot.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import orjson
from agents import SessionSettings, TResponseInputItem

from .._errors import InvalidMessage
from .._manager import ConversationManager
from ._common import append_entries, require_window_only

__all__ = ["ITEM_PART", "POP_PART", "EngineSession"]

logger = logging.getLogger(__name__)

#: The content-part type that carries one whole input item.
ITEM_PART: Final = "x-openai-agents-item"
#: The content-part type of a pop marker.
POP_PART: Final = "x-openai-agents-pop"

_CHAT_ROLES: Final = frozenset({"user", "assistant", "system"})
_ROLE_LABELS: Final = {
    "user": "user",
    "assistant": "assistant",
    "system": "system",
    "developer": "system",
}

Item = dict[str, Any]


class EngineSession:
    """The items of one Agents SDK session, kept in a room of a ``ConversationManager``."""

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        manager: ConversationManager,
        session_id: str,
        *,
        room_id: str | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.session_settings = (
            session_settings if session_settings is not None else SessionSettings()
        )
        self.room_id = room_id if room_id is not None else f"agents:{session_id}"
        require_window_only(manager, self.room_id)
        self.manager = manager

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The session's items, oldest first, after catching up with other workers.

        ``limit`` (or else ``session_settings.limit``) keeps the latest N;
        a limit of 0 or less returns nothing.
        """
        if limit is None and self.session_settings is not None:
            limit = self.session_settings.limit
        items, _ = _replay(await self.manager.get_messages_async(self.room_id))
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return cast("list[TResponseInputItem]", items)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append the items in order; returns once Redis holds all of them.

        Every item is checked (a dict that serialises to JSON) before any is written.
        """
        entries = [_entry_for(item) for item in items]
        await append_entries(self.manager, self.room_id, entries)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the most recent item, or ``None`` if the session is empty."""
        manager, room_id = self.manager, self.room_id
        await manager.ensure_fresh_from_redis(room_id)
        items, _ = _replay(manager.get_messages(room_id))
        if not items:
            return None  # nothing to pop as of a moment after this call began
        token = uuid.uuid4().hex
        await manager.append_async(room_id, "tool", [{"type": POP_PART, "token": token}])
        # The append's reply brought this worker up to date with everything Redis
        # ordered before the marker; replaying up to it names the item it removed.
        _, popped = _replay(manager.get_messages(room_id), until=token)
        if popped is None:
            logger.debug("room %s: pop marker %s removed no item", room_id, token)
        return cast("TResponseInputItem | None", popped)

    async def clear_session(self) -> None:
        """Remove every item, for every worker; returns once Redis has done it."""
        await self.manager.clear_async(self.room_id)


def _entry_for(item: object) -> dict[str, Any]:
    """The engine entry (``append`` fields) that stores one input item."""
    if not isinstance(item, Mapping):
        raise InvalidMessage(f"an input item must be a dict, not {type(item).__name__}")
    role, content = item.get("role"), item.get("content")
    if (
        len(item) == 2
        and isinstance(role, str)
        and role in _CHAT_ROLES
        and isinstance(content, str)
    ):
        return {"role": role, "content": content}
    raw = dict(item)
    try:
        orjson.dumps(raw)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidMessage(f"an input item is not JSON: {exc}", field="content") from exc
    return {"role": _role_label(raw), "content": [{"type": ITEM_PART, "item": raw}]}


def _role_label(item: Item) -> str:
    role = item.get("role")
    if isinstance(role, str) and role in _ROLE_LABELS:
        return _ROLE_LABELS[role]
    kind = item.get("type")
    if isinstance(kind, str) and kind.endswith("_output"):
        return "tool"
    if kind == "mcp_approval_response":
        return "user"
    return "assistant"


def _single_part(entry: Mapping[str, Any], part_type: str) -> dict[str, Any] | None:
    content = entry.get("content")
    if isinstance(content, list) and len(content) == 1:
        part = content[0]
        if isinstance(part, dict) and part.get("type") == part_type:
            return part
    return None


def _replay(
    entries: Sequence[dict[str, Any]], until: str | None = None
) -> tuple[list[Item], Item | None]:
    """Replay entries as a stack: the live items, and what the marker ``until`` popped."""
    stack: list[Item] = []
    for entry in entries:
        marker = _single_part(entry, POP_PART)
        if marker is None:
            part = _single_part(entry, ITEM_PART)
            item = part.get("item") if part is not None else None
            stack.append(item if isinstance(item, dict) else entry)
            continue
        popped = stack.pop() if stack else None
        if until is not None and marker.get("token") == until:
            return stack, popped
    return stack, None
