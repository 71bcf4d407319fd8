"""The state a room export carries beside its window (SPEC §35): ``extensions``.

``"reactions"``: the tracked reactions of the exported window's messages, by
message identity, each as the reactions hash holds it (without the version it
was last reacted at, which means nothing under the importer's new epoch)::

    {"<message id>": [[emoji, shown as, [users...]], ...]}   # order first seen

``"deferred"``: the events waiting for messages the room does not hold yet, by
the identity they wait for, in arrival order, each with the lifetime it had
LEFT when exported (not its absolute expiry: the importing workers' clocks need
not agree with the exporter's, and an event must neither outlive its lifetime
nor die at once because two clocks differ)::

    {"<message id>": [{"keep_ms": int, "event": {"k": ...}}, ...]}

Each is present only when the room has some, so an export of a room without
them still imports into an engine that knows neither. Both are checked here as
strictly as the events that made them (emoji, users, limits): a hostile export
must not be able to store what no platform event could.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from .._deferred import (
    DELETE,
    EDIT,
    MAX_DEFERRED_EVENT_BYTES,
    MAX_DEFERRED_MESSAGES,
    MAX_DEFERRED_PER_MESSAGE,
    PATCH,
    REACT,
    identity_field,
)
from .._entries import check_new_content, normalise_message_id
from .._errors import InvalidExport, InvalidMessage
from .._reactions import (
    ADD,
    CLEAR_ALL,
    CLEAR_EMOJI,
    MAX_EMOJI_PER_MESSAGE,
    MAX_REACTIONS_PER_MESSAGE,
    REMOVE,
    Emoji,
    normalise_emoji,
    normalise_user_id,
)

logger = logging.getLogger(__name__)

REACTIONS: Final = "reactions"
DEFERRED: Final = "deferred"
#: The longest lifetime an imported event may have left (ten years): far past any
#: sensible ``defer_unknown_events_seconds``, and far inside what PEXPIRE takes.
MAX_KEEP_MS: Final = 10 * 365 * 24 * 3600 * 1000
#: Text a deferred delete or reactions patch carries (what the markers take).
_MAX_MARKER_CHARS: Final = 2000
_CUSTOM_KEY_RE: Final = re.compile(r"<:[0-9]{1,25}>")
_CUSTOM_DISPLAY_RE: Final = re.compile(r":[A-Za-z0-9_]{1,64}:")
_EVENT_FIELDS: Final = {
    EDIT: {"k", "c"},
    DELETE: {"k", "t"},
    PATCH: {"k", "s"},
    REACT: {"k", "a", "e", "d", "u"},
}


# ------------------------------------------------------------------ export


def export_reactions(identities: Sequence[str], stored: Sequence[bytes | None]) -> dict[str, Any]:
    """The reactions extension from the hash's values for ``identities`` (HMGET order)."""
    out: dict[str, Any] = {}
    for identity, value in zip(identities, stored, strict=True):
        if value is None:
            continue
        try:
            out[identity] = orjson.loads(value.partition(b"|")[2])
        except orjson.JSONDecodeError:
            # Not importable anyway; the row's tag still shows what it counted.
            logger.warning("room export: message %s has corrupt tracked reactions", identity)
    return out


def export_deferred(stored: Mapping[bytes, bytes], now_ms: int) -> dict[str, Any]:
    """The deferred extension from the hash (HGETALL), lifetimes left as of ``now_ms``."""
    out: dict[str, Any] = {}
    for field, value in stored.items():
        try:
            identity = orjson.loads(field)
            if not isinstance(identity, str):
                raise ValueError(field)
            events = []
            for line in value.split(b"\n"):
                if not line:
                    continue
                expiry, _, event = line.partition(b" ")
                left = int(expiry) - now_ms
                if left > 0:  # an expired event is gone already, whoever reads it
                    events.append({"keep_ms": left, "event": orjson.loads(event)})
        except (orjson.JSONDecodeError, ValueError):
            logger.warning("room export: corrupt deferred events for %r", field[:80])
            continue
        if events:
            out[identity] = events
    return out


# ------------------------------------------------------------------ import


@dataclass(frozen=True, slots=True)
class ParsedExtensions:
    """What ``lua/import.lua`` writes beside the rows: ``reactions`` (identity, JSON
    state) and ``deferred`` (field as rows start with it, [(lifetime ms, event)])."""

    reactions: list[tuple[str, bytes]]
    deferred: list[tuple[bytes, list[tuple[int, bytes]]]]

    def deferred_values(self, now_ms: int) -> tuple[list[bytes], int]:
        """The deferred hash's fields and values (as ``lua/defer.lua`` writes them, with
        expiries on the importer's clock), and how long the hash must live."""
        flat: list[bytes] = []
        longest = 0
        for field, events in self.deferred:
            lines = [b"%d %s" % (now_ms + keep, event) for keep, event in events]
            flat += [field, b"\n".join(lines)]
            longest = max([longest, *(keep for keep, _ in events)])
        return flat, longest


def parse_extensions(extensions: Mapping[str, Any], identities: set[str]) -> ParsedExtensions:
    """Check both extensions against the export's entries (``identities``: theirs)."""
    return ParsedExtensions(
        _reactions(extensions.get(REACTIONS, {}), identities),
        _deferred(extensions.get(DEFERRED, {}), identities),
    )


def _reactions(value: object, identities: set[str]) -> list[tuple[str, bytes]]:
    if not isinstance(value, Mapping):
        raise InvalidExport("must be an object", where="extensions.reactions")
    out = []
    for identity, emoji in value.items():
        where = f"extensions.reactions[{identity!r:.80}]"
        if identity not in identities:
            raise InvalidExport("names no message of the export's entries", where=where)
        out.append((identity, orjson.dumps(_message_reactions(emoji, where))))
    return out


def _message_reactions(emoji: object, where: str) -> list[list[Any]]:
    if not isinstance(emoji, list) or not emoji:
        raise InvalidExport("must be a non-empty list of [emoji, shown as, users]", where=where)
    if len(emoji) > MAX_EMOJI_PER_MESSAGE:
        raise InvalidExport(f"more than {MAX_EMOJI_PER_MESSAGE} distinct emoji", where=where)
    seen: set[str] = set()
    total = 0
    out = []
    for index, item in enumerate(emoji):
        at = f"{where}[{index}]"
        if not isinstance(item, list) or len(item) != 3:
            raise InvalidExport("must be [emoji, shown as, users]", where=at)
        key, display, users = item
        _check_emoji(key, display, at)
        if key in seen:
            raise InvalidExport(f"emoji {key!r} appears twice", where=at)
        seen.add(key)
        if not isinstance(users, list) or not users:
            raise InvalidExport("users must be a non-empty list", where=at)
        for user in users:
            _check_user(user, at)
        if len(set(users)) != len(users):
            raise InvalidExport("a user appears twice (a reaction counts once)", where=at)
        total += len(users)
        out.append([key, display, list(users)])
    if total > MAX_REACTIONS_PER_MESSAGE:
        raise InvalidExport(f"more than {MAX_REACTIONS_PER_MESSAGE} reactions", where=where)
    return out


def _check_emoji(key: object, display: object, where: str) -> None:
    """An emoji as ``normalise_emoji`` would have stored it, and nothing else."""
    if not isinstance(key, str) or not isinstance(display, str):
        raise InvalidExport("emoji and how it shows must be strings", where=where)
    if _CUSTOM_KEY_RE.fullmatch(key):
        if not _CUSTOM_DISPLAY_RE.fullmatch(display):
            raise InvalidExport(f"custom emoji {key!r} shows as {display!r:.80}", where=where)
        return
    try:
        normalised = normalise_emoji(key)
    except InvalidMessage as exc:
        raise InvalidExport(f"emoji {key!r:.80}: {exc}", where=where) from exc
    if normalised != Emoji(key, display):
        raise InvalidExport(f"emoji {key!r:.80} shows as {display!r:.80}", where=where)


def _check_user(user: object, where: str) -> None:
    try:
        if normalise_user_id(user) == user:
            return
    except InvalidMessage as exc:
        raise InvalidExport(f"user {user!r:.80}: {exc}", where=where) from exc
    raise InvalidExport(f"user {user!r:.80} must be a string", where=where)


def _deferred(value: object, identities: set[str]) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
    if not isinstance(value, Mapping):
        raise InvalidExport("must be an object", where="extensions.deferred")
    if len(value) > MAX_DEFERRED_MESSAGES:
        raise InvalidExport(
            f"events for {len(value)} messages; a room keeps them for at most "
            f"{MAX_DEFERRED_MESSAGES}",
            where="extensions.deferred",
        )
    out = []
    for identity, events in value.items():
        where = f"extensions.deferred[{identity!r:.80}]"
        try:
            if normalise_message_id(identity) != identity:
                raise InvalidMessage("must be stored as it was (trimmed, a string)")
        except InvalidMessage as exc:
            raise InvalidExport(f"not a message identity: {exc}", where=where) from exc
        if identity in identities:
            # Only a message the room lacks has events waiting: these could never apply.
            raise InvalidExport("waits for a message the export's entries hold", where=where)
        if not isinstance(events, list) or not events:
            raise InvalidExport("must be a non-empty list of events", where=where)
        if len(events) > MAX_DEFERRED_PER_MESSAGE:
            raise InvalidExport(f"more than {MAX_DEFERRED_PER_MESSAGE} events", where=where)
        parsed = [_waiting(event, f"{where}[{index}]") for index, event in enumerate(events)]
        out.append((identity_field(identity), parsed))
    return out


def _waiting(item: object, where: str) -> tuple[int, bytes]:
    if not isinstance(item, Mapping) or set(item) != {"keep_ms", "event"}:
        raise InvalidExport('must be {"keep_ms": int, "event": object}', where=where)
    keep = item["keep_ms"]
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 < keep <= MAX_KEEP_MS:
        raise InvalidExport(f"keep_ms must be an int in [1, {MAX_KEEP_MS}]", where=where)
    event = item["event"]
    kind = event.get("k") if isinstance(event, Mapping) else None
    if not isinstance(kind, str) or kind not in _EVENT_FIELDS or set(event) != _EVENT_FIELDS[kind]:
        raise InvalidExport("not an edit, delete, patch or reaction event", where=where)
    try:
        if kind == EDIT:
            check_new_content(event["c"])
        elif kind in (DELETE, PATCH):
            text = event["t" if kind == DELETE else "s"]
            if not isinstance(text, str) or len(text) > _MAX_MARKER_CHARS:
                raise InvalidMessage(f"must be a str of at most {_MAX_MARKER_CHARS} characters")
        else:
            _check_reaction_event(event, where)
    except InvalidMessage as exc:
        raise InvalidExport(str(exc), where=where) from exc
    raw = orjson.dumps(event)
    if len(raw) > MAX_DEFERRED_EVENT_BYTES:
        raise InvalidExport(f"an event over {MAX_DEFERRED_EVENT_BYTES} bytes", where=where)
    return keep, raw


def _check_reaction_event(event: Mapping[str, Any], where: str) -> None:
    action, key, display, user = event["a"], event["e"], event["d"], event["u"]
    if action not in (ADD, REMOVE, CLEAR_EMOJI, CLEAR_ALL):
        raise InvalidExport(f"unknown reaction action {action!r:.20}", where=where)
    if action == CLEAR_ALL:
        if (key, display, user) != ("", "", ""):
            raise InvalidExport("clearing all reactions names no emoji or user", where=where)
        return
    _check_emoji(key, display, where)
    if action == CLEAR_EMOJI:
        if user != "":
            raise InvalidExport("clearing an emoji names no user", where=where)
        return
    _check_user(user, where)
