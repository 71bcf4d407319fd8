"""From a caller's arguments to a write: validated, encoded once, ready to queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._deferred import delete_event, edit_event, patch_event
from .._entries import (
    Transform,
    build_entry,
    check_new_content,
    clean_tag_value,
    deleted_transform,
    edit_transform,
    encode,
    normalise_message_id,
    reactions_transform,
)
from .._errors import InvalidMessage
from .._reactions import (
    ADD,
    CLEAR_ALL,
    CLEAR_EMOJI,
    REMOVE,
    ReactionEvent,
    normalise_emoji,
    normalise_user_id,
)
from .ops import AppendOp, EditOp, LimitOp, ReactionOp, Row

MIN_CHANNEL_LIMIT, MAX_CHANNEL_LIMIT = 50, 1000
MAX_IDEMPOTENCY_KEY_CHARS = 128
_MESSAGE_FIELDS = frozenset({"message_id", "name", "tool_calls", "tool_call_id", "metadata"})


class Writes:
    """Builds the engine's writes; every check that input passes happens here."""

    def __init__(self, max_entry_bytes: int) -> None:
        self.max_entry_bytes = max_entry_bytes

    def row(
        self,
        role: object,
        content: object,
        message_id: object = None,
        name: object = None,
        tool_calls: object = None,
        tool_call_id: object = None,
        metadata: object = None,
    ) -> Row:
        entry = build_entry(
            role,
            content,
            message_id=message_id,
            name=name,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
            metadata=metadata,
        )
        return encode(entry, self.max_entry_bytes), entry["message_id"], entry["role"]

    def row_from_mapping(self, message: Mapping[str, Any]) -> Row:
        fields = dict(message)
        try:
            role, content = fields.pop("role"), fields.pop("content")
        except KeyError as exc:
            raise InvalidMessage(f"message lacks {exc.args[0]!r}") from exc
        unknown = set(fields) - _MESSAGE_FIELDS
        if unknown:
            raise InvalidMessage(f"unknown field(s) {sorted(unknown)}")
        return self.row(role, content, **fields)

    def append(self, rows: list[Row], idempotency_key: str | None = None) -> AppendOp:
        op = AppendOp(rows, self.max_entry_bytes)
        if idempotency_key is not None:
            if (
                not isinstance(idempotency_key, str)
                or not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
            ):
                raise InvalidMessage(
                    f"must be a non-empty str of at most {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                    field="idempotency_key",
                )
            op.token, op.keyed = idempotency_key, True
        return op

    def edit(self, message_id: object, transform: Transform) -> EditOp:
        return EditOp(normalise_message_id(message_id), transform, self.max_entry_bytes)

    def update(self, message_id: object, new_content: object) -> EditOp:
        content = check_new_content(new_content)
        op = self.edit(message_id, edit_transform(content))
        op.event = edit_event(content)
        return op

    def deleted(self, message_id: object, deleted_at_iso: object) -> EditOp:
        when = clean_tag_value(deleted_at_iso, "deleted_at_iso")
        op = self.edit(message_id, deleted_transform(when))
        op.event = delete_event(when)
        return op

    def reactions(self, message_id: object, reactions_str: object) -> EditOp:
        summary = clean_tag_value(reactions_str, "reactions_str")
        op = self.edit(message_id, reactions_transform(summary))
        op.forgets_reactions = True
        op.event = patch_event(summary)
        return op

    def reaction(
        self, message_id: object, emoji: object, user_id: object, *, added: bool, local: bool
    ) -> ReactionOp:
        """One user's reaction added (or removed); ``local``: a memory-only room."""
        event = ReactionEvent(
            ADD if added else REMOVE, normalise_emoji(emoji), normalise_user_id(user_id)
        )
        return ReactionOp(normalise_message_id(message_id), event, self.max_entry_bytes, local)

    def clear_reactions(self, message_id: object, emoji: object, *, local: bool) -> ReactionOp:
        """Every reaction of the message (``emoji`` None), or every one with ``emoji``."""
        event = (
            ReactionEvent(CLEAR_ALL)
            if emoji is None
            else ReactionEvent(CLEAR_EMOJI, normalise_emoji(emoji))
        )
        return ReactionOp(normalise_message_id(message_id), event, self.max_entry_bytes, local)


def clamp_limit(limit: object) -> int:
    """A per-room window limit, clamped to [50, 1000]; not an int is a TypeError."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"channel limit must be an int, not {type(limit).__name__}")
    return max(MIN_CHANNEL_LIMIT, min(MAX_CHANNEL_LIMIT, limit))


def limit_write(limit: object) -> tuple[LimitOp, int]:
    clamped = clamp_limit(limit)
    return LimitOp(clamped, None), clamped
