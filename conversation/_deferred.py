"""Events that arrive before their message (SPEC §31).

Gateway events reach workers out of order: an edit, a delete or a reaction can
arrive before the worker that appends the message has appended it. Such an
event is kept (in the room's deferred hash with Redis, ``lua/defer.lua``; in
the room's memory otherwise) and applied, in arrival order, to the row when its
message is appended: the append script hands the waiting events to the
appending worker, which applies them here and sends the rows again, and the
script pushes them only if they are still exactly the events waiting.

An event is an orjson object, ``k`` naming its kind; what it carries was
checked when it was made, and is checked again when it is applied (an event
that no longer fits, such as an edit that would outgrow the row limit, is
skipped with a warning: the message itself is never refused for it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ._entries import (
    Entry,
    check_new_content,
    deleted_transform,
    edit_transform,
    encode,
    reactions_transform,
)
from ._errors import InvalidMessage
from ._reactions import Emoji, MessageReactions, ReactionEvent

logger = logging.getLogger(__name__)

#: Messages a room keeps events for, and events one message may have waiting;
#: beyond either an event is refused (counted as ``deferred_refused``).
MAX_DEFERRED_MESSAGES: Final = 256
MAX_DEFERRED_PER_MESSAGE: Final = 32

EDIT, DELETE, PATCH, REACT = "edit", "delete", "patch", "react"


def identity_field(identity: str) -> bytes:
    """The identity as a stored row starts with it (its JSON), which names it in Redis."""
    return orjson.dumps(identity)


#: An event bigger than this is not kept (the call still returns False).
MAX_DEFERRED_EVENT_BYTES: Final = 256 * 1024


def edit_event(content: str | list[Any]) -> bytes:
    try:
        return orjson.dumps({"k": EDIT, "c": content})
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidMessage(f"cannot be serialised to JSON: {exc}", field="content") from exc


def delete_event(deleted_at_iso: str) -> bytes:
    return orjson.dumps({"k": DELETE, "t": deleted_at_iso})


def patch_event(summary: str) -> bytes:
    return orjson.dumps({"k": PATCH, "s": summary})


def reaction_event(event: ReactionEvent) -> bytes:
    action, key, display, user = event.as_args()
    return orjson.dumps({"k": REACT, "a": action, "e": key, "d": display, "u": user})


def stored_events(value: bytes) -> list[bytes]:
    """The events of one message as the deferred hash holds them (``<expiry> <event>`` lines)."""
    return [line.partition(b" ")[2] for line in value.split(b"\n") if line]


@dataclass(slots=True)
class Applied:
    """A row with its waiting events applied, and what became of its reactions:
    ``reactions`` the tracked state the events built (None: no reaction event),
    ``forget``: a patch came after the last reaction event (nothing is tracked)."""

    row: bytes
    reactions: MessageReactions | None
    forget: bool

    def reaction_state(self) -> str:
        """The state as ``lua/append.lua`` stores it: '' none, '-' forget, else JSON."""
        if self.reactions is not None and self.reactions.emoji:
            return orjson.dumps([list(e) for e in self.reactions.emoji]).decode()
        return "-" if self.forget or self.reactions is not None else ""


def apply_events(row: bytes, identity: str, events: Sequence[bytes], max_bytes: int) -> Applied:
    """``row`` with ``events`` applied in order."""
    entry: Entry = orjson.loads(row)
    tracked: MessageReactions | None = None
    forget = False
    for payload in events:
        try:
            event = orjson.loads(payload)
            kind = event["k"]
            trial = tracked
            if kind == EDIT:
                candidate = edit_transform(check_new_content(event["c"]))(entry, identity)
            elif kind == DELETE:
                candidate = deleted_transform(str(event["t"]))(entry, identity)
            elif kind == PATCH:
                candidate = reactions_transform(str(event["s"]))(entry, identity)
                trial, forget = None, True
            elif kind == REACT:
                base = tracked.emoji if tracked is not None else []
                trial = MessageReactions([(k, d, list(u)) for k, d, u in base])
                emoji = Emoji(str(event["e"]), str(event["d"])) if event["e"] else None
                trial.apply(ReactionEvent(str(event["a"]), emoji, str(event["u"])))
                candidate = reactions_transform(trial.summary())(entry, identity)
                forget = False
            else:
                raise InvalidMessage(f"unknown deferred event kind {kind!r:.20}")
            encode(candidate, max_bytes)  # an event that makes the row too big is skipped
        except (InvalidMessage, KeyError, TypeError, ValueError) as exc:
            logger.warning("message %s: skipping a deferred event that no longer applies (%s)",
                           identity, exc)  # fmt: skip
            continue
        entry, tracked = candidate, trial
    return Applied(encode(entry, max_bytes), tracked, forget)
