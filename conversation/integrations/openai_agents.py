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

Build it with ``EngineSession.from_url(url, session_id)`` (the engine on a
thread of its own: any loop, any thread, ``asyncio.run`` per call and
``Runner.run_sync`` from worker threads all work), or over a manager: a
``BlockingConversationManager`` (the same), or the bot's own
``ConversationManager``, built with ``prompt_renderer=None`` (the agent has
its own instructions), which follows the SPEC §26 rules: one running loop at
a time, and a new loop once the previous one has closed.

``get_items`` catches up with other workers first; ``add_items``,
``pop_item`` and ``clear_session`` return once Redis confirmed them and raise
``DurabilityError`` when it does not within ``durable_timeout``; ``pop_item``
syncs with Redis first and raises ``RedisUnavailable`` when it cannot.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast

import orjson
from agents import SessionSettings, TResponseInputItem
from agents.memory.session_settings import coerce_session_settings, resolve_session_limit

from .._errors import InvalidMessage
from .._manager import ConversationManager
from ._common import Manager, append_entries, check_window_only, run_on, shared_engine

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
        manager: Manager,
        session_id: str,
        *,
        room_id: str | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
    ) -> None:
        self.session_id = session_id
        # A dict is checked and normalised as the SDK's own sessions do it.
        self.session_settings = (
            coerce_session_settings(session_settings)
            if session_settings is not None
            else SessionSettings()
        )
        self.room_id = room_id if room_id is not None else f"agents:{session_id}"
        check_window_only(manager, self.room_id)
        self.manager = manager

    @classmethod
    def from_url(
        cls,
        url: str,
        session_id: str,
        *,
        room_id: str | None = None,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        **settings: Any,
    ) -> EngineSession:
        """The session on the Redis at ``url``, usable from any loop and any thread.

        The engine runs on a thread of its own, shared by every ``from_url``
        session of the same URL and settings in the process: ``asyncio.run`` per
        call, ``Runner.run_sync`` from any thread, and several loops at once all
        work. ``settings`` are ``ConversationManager``'s; ``max_history``
        (items and pop markers together) defaults to 10,000.
        """
        engine = shared_engine(url, settings)
        return cls(engine, session_id, room_id=room_id, session_settings=session_settings)

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The session's items, oldest first, after catching up with other workers.

        ``limit`` (or else ``session_settings.limit``) keeps the latest N;
        a limit of 0 or less returns nothing.
        """
        limit = resolve_session_limit(limit, self.session_settings)
        room_id = self.room_id

        async def read(manager: ConversationManager) -> list[Item]:
            return _replay(await manager.get_messages_async(room_id))[0]

        items = await run_on(self.manager, read)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return cast("list[TResponseInputItem]", items)

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append the items in order; returns once Redis holds all of them.

        Every item is checked (a dict that serialises to JSON) before any is
        written. Raises ``DurabilityError`` when Redis does not confirm them
        within ``durable_timeout`` (none of them is kept then).
        """
        entries = [_entry_for(item) for item in items]
        if not entries:
            return
        room_id = self.room_id
        await run_on(self.manager, lambda manager: append_entries(manager, room_id, entries))

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the most recent item, or ``None`` if the session is empty."""
        room_id = self.room_id

        async def pop(manager: ConversationManager) -> Item | None:
            await manager.ensure_fresh_from_redis(room_id)
            items, _ = _replay(manager.get_messages(room_id))
            if not items:
                return None  # nothing to pop as of a moment after this call began
            token = uuid.uuid4().hex
            marker = [{"type": POP_PART, "token": token}]
            await manager.append_async(room_id, "tool", marker, durable=True)
            # The append's reply brought this worker up to date with everything
            # Redis ordered before the marker; replaying up to it names the item.
            _, popped = _replay(manager.get_messages(room_id), until=token)
            if popped is None:
                logger.debug("room %s: pop marker %s removed no item", room_id, token)
            return popped

        return cast("TResponseInputItem | None", await run_on(self.manager, pop))

    async def clear_session(self) -> None:
        """Remove every item, for every worker; returns once Redis has done it."""
        room_id = self.room_id
        await run_on(self.manager, lambda manager: manager.clear_async(room_id, durable=True))


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
