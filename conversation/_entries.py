"""Entries: validation, the stored row format, identity, and marker edits.

A stored row is the orjson encoding of one OpenAI-chat message with the
engine's identity field first::

    {"message_id":"1234","role":"user","content":"[Message ID: 1234] hi"}

Keeping ``message_id`` and ``role`` as the first two fields lets the Lua
scripts recognise a ``tool`` row without decoding JSON, and keeps rows readable
with ``LRANGE``. ``message_id`` is stripped from everything handed to callers.

A row may also carry ``metadata``, a JSON object the writer attaches for its
own reading back (integrations keep there what an OpenAI chat message has no
field for). It is stored last, survives edits, and is stripped from reads
unless the caller asks for it: what is sent to a model is OpenAI chat fields
only (SPEC §2).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import orjson

from ._errors import InvalidMessage

ROLES: Final = frozenset({"user", "assistant", "system", "tool"})
MAX_MESSAGE_ID_CHARS: Final = 256
MAX_TAG_CHARS: Final = 2000
#: The stored field of a row's private metadata (see the module's docstring).
METADATA_FIELD: Final = "metadata"
#: Identity prefix of the rolling summary entry that consolidation keeps at the
#: head of a window ("summary:<n>", role "system"). Users cannot forge one: a
#: marker typed into a message only ever yields a user/assistant/tool entry.
SUMMARY_ID_PREFIX: Final = "summary:"
SUMMARY_ROLE: Final = "system"

#: The identity marker bots write into the visible text.
MARKER_RE: Final = re.compile(r"\[Message ID: ([^\[\]\r\n]{1,256})\]")

# Engine-maintained tags live directly after the marker (" [tag]" each), or at
# the very start of the text ("[tag] " each) when the entry has no marker. Only
# that zone is ever read or rewritten, so tags a user types further on stay text.
_TAG_BODY = r"\[(?:deleted at (?P<deleted>[^\[\]\n]*)|Reactions: (?P<reactions>[^\[\]\n]*))\]"
_TAG_AFTER_MARKER: Final = re.compile(" " + _TAG_BODY)
_TAG_AT_START: Final = re.compile(_TAG_BODY + " ")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")

Entry = dict[str, Any]
Transform = Callable[[Entry, str], Entry]


def normalise_message_id(message_id: object) -> str:
    if isinstance(message_id, bool) or not isinstance(message_id, (str, int)):
        raise InvalidMessage(
            f"must be a str or int, not {type(message_id).__name__}", field="message_id"
        )
    text = str(message_id).strip()
    if not text:
        raise InvalidMessage("must not be empty", field="message_id")
    if len(text) > MAX_MESSAGE_ID_CHARS:
        raise InvalidMessage(f"longer than {MAX_MESSAGE_ID_CHARS} characters", field="message_id")
    if "[" in text or "]" in text or _CONTROL_RE.search(text):
        raise InvalidMessage("must not contain brackets or control characters", field="message_id")
    return text


def first_text(content: object) -> str | None:
    """The text an identity marker is read from: the content, or its first text part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                return text if isinstance(text, str) else None
    return None


def identity_from_content(content: object) -> str | None:
    text = first_text(content)
    if text is None:
        return None
    match = MARKER_RE.search(text)
    return match.group(1).strip() if match else None


def _check_content(content: object) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidMessage(
            f"must be a str or a list of content parts, not {type(content).__name__}",
            field="content",
        )
    for index, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidMessage(
                f"part {index} must be a dict with a string 'type'", field="content"
            )


def content_may_be_null(role: object, tool_calls: object) -> bool:
    """OpenAI sends ``content: null`` on an assistant turn that only calls tools."""
    return role == "assistant" and isinstance(tool_calls, list) and bool(tool_calls)


def build_entry(
    role: object,
    content: object,
    *,
    message_id: object = None,
    name: object = None,
    tool_calls: object = None,
    tool_call_id: object = None,
    metadata: object = None,
) -> Entry:
    """Validate the fields of one turn and return its entry (identity first)."""
    if role not in ROLES:
        raise InvalidMessage(f"role {role!r:.40} is not one of {sorted(ROLES)}", field="role")
    if not (content is None and content_may_be_null(role, tool_calls)):
        _check_content(content)
    identity = (
        normalise_message_id(message_id)
        if message_id is not None
        else identity_from_content(content)
    )
    entry: Entry = {"message_id": identity, "role": role, "content": content}
    if name is not None:
        if not isinstance(name, str):
            raise InvalidMessage("must be a str", field="name")
        entry["name"] = name
    if tool_calls is not None:
        if role != "assistant":
            raise InvalidMessage("only assistant entries carry tool_calls", field="tool_calls")
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise InvalidMessage("must be a list of dicts", field="tool_calls")
        entry["tool_calls"] = tool_calls
    if tool_call_id is not None:
        if not isinstance(tool_call_id, str):
            raise InvalidMessage("must be a str", field="tool_call_id")
        entry["tool_call_id"] = tool_call_id
    if metadata is not None:
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
            raise InvalidMessage("must be a dict with str keys", field="metadata")
        try:  # checked here, so the error names metadata, not the message's text
            orjson.dumps(metadata)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise InvalidMessage(f"cannot be serialised to JSON: {exc}", field="metadata") from exc
        if metadata:
            entry[METADATA_FIELD] = dict(metadata)
    return entry


def is_summary(identity: str | None, role: str | None) -> bool:
    """Whether a stored entry is a consolidation summary (identity AND role decide)."""
    return role == SUMMARY_ROLE and identity is not None and identity.startswith(SUMMARY_ID_PREFIX)


def encode(entry: Entry, max_bytes: int) -> bytes:
    try:
        row = orjson.dumps(entry)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidMessage(f"cannot be serialised to JSON: {exc}", field="content") from exc
    if len(row) > max_bytes:
        metadata = entry.get(METADATA_FIELD)
        if metadata is not None:
            # Name the part that made it too big: the caller's text may be short.
            own = len(orjson.dumps(metadata))
            if len(row) - own <= max_bytes:
                raise InvalidMessage(
                    f"makes the entry {len(row)} bytes serialised ({own} of them "
                    f"metadata); the limit is {max_bytes}",
                    field="metadata",
                )
        raise InvalidMessage(
            f"is {len(row)} bytes serialised; the limit is {max_bytes}", field="content"
        )
    # orjson hands back its whole output buffer (4 KiB at least, about 10x the
    # size for larger rows) and rows live as long as the window: keep an exact copy.
    return memoryview(row).tobytes()


def _checked(row: bytes) -> tuple[Entry, str | None, str] | None:
    """The decoded row with its identity and role, or None when the row is corrupt."""
    try:
        entry = orjson.loads(row)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(entry, dict):
        return None
    identity, role = entry.get("message_id"), entry.get("role")
    if role not in ROLES or not isinstance(identity, (str, type(None))):
        return None
    content = entry.get("content")
    if not isinstance(content, (str, list)) and not (content is None and role == "assistant"):
        return None
    return entry, identity, _ROLE_NAMES[role]


def decode_row(row: bytes) -> tuple[str | None, str] | None:
    """(identity, role) of a stored row, or None when the row is corrupt."""
    checked = _checked(row)
    return None if checked is None else checked[1:]


# --- rows held decoded -------------------------------------------------------------

# One str object per role, whatever row it was read from.
_ROLE_NAMES: Final = {role: role for role in ROLES}
_HEAD_FIELDS: Final = ("message_id", "role", "content")


#: A canonical row that is more than a string of text, as a window holds it: its
#: content, then the fields after it in the row's order, flat (``name``,
#: ``tool_calls``, ``tool_call_id``, ``metadata``): ``(content, key, value, ...)``.
#: A tuple, the smallest container (a row with a ``name`` costs 64 bytes more
#: than its strings). Never mutated: handing it out rebuilds the containers.
Decoded = tuple[Any, ...]

#: How a window holds one row. Identity and role are held beside it, so:
#: ``str``: the content of a row that is exactly ``{"message_id", "role", "content"}``;
#: ``Decoded`` (a tuple): any other row orjson writes back byte for byte;
#: ``bytes``: the row as Redis holds it, for a row orjson would write otherwise
#: (another writer's spacing or field order: edits compare the exact bytes) and
#: for a corrupt row (kept for its position, never handed out).
Cell = str | Decoded | bytes


def decode_cell(row: bytes) -> tuple[Cell, str | None, str] | None:
    """A stored row as a window holds it, with its identity and role; None: corrupt.

    A row is held decoded only if ``orjson.dumps`` gives its bytes back exactly
    (checked here, a few microseconds even for an image), so ``row_of`` can
    rebuild the bytes an edit compares instead of keeping a second copy. The
    rules of ``_checked``, inlined: this runs for every row a snapshot brings.
    """
    try:
        entry = _loads(row)
    except orjson.JSONDecodeError:
        return None
    if type(entry) is not dict:
        return None
    if len(entry) == 3 and tuple(entry) == _HEAD_FIELDS:
        # Most rows: a text turn. The same answer as below, in fewer steps (a
        # snapshot runs this a thousand times).
        identity, role, content = entry.values()
        if (
            type(content) is str
            and type(role) is str
            and role in _ROLE_NAMES
            and (identity is None or type(identity) is str)
        ):
            return (content if _dumps(entry) == row else row), identity, _ROLE_NAMES[role]
    identity = entry.get("message_id")
    role = entry.get("role")
    if type(role) is not str or role not in _ROLE_NAMES:
        return None
    role = _ROLE_NAMES[role]
    if identity is not None and type(identity) is not str:
        return None
    content = entry.get("content")
    kind = type(content)
    if kind is not str and kind is not list and not (content is None and role == "assistant"):
        return None
    fields = iter(entry)
    if (
        next(fields) != "message_id"
        or next(fields, None) != "role"
        or next(fields, None) != "content"
        or _dumps(entry) != row
    ):
        return row, identity, role
    if type(content) is str and len(entry) == 3:
        return content, identity, role
    held = [content]
    for key, value in entry.items():
        if key not in _HEAD_FIELDS:
            held += (key, value)
    return tuple(held), identity, role


_loads, _dumps = orjson.loads, orjson.dumps


def row_of(cell: Cell, identity: str | None, role: str | None) -> bytes:
    """The exact bytes Redis holds for a held row."""
    if type(cell) is bytes:
        return cell
    if type(cell) is str:
        return orjson.dumps({"message_id": identity, "role": role, "content": cell})
    assert type(cell) is tuple
    entry = {"message_id": identity, "role": role, "content": cell[0]}
    for at in range(1, len(cell), 2):
        entry[cell[at]] = cell[at + 1]
    return orjson.dumps(entry)


def cell_bytes(cell: Cell) -> int:
    """About the serialised size of a held row (exact but for its identity and role)."""
    if type(cell) is str or type(cell) is bytes:
        return len(cell)
    return len(row_of(cell, None, ""))


def fresh(value: Any) -> Any:
    """``value`` with every dict and list rebuilt and every leaf (str, number,
    bool, None: immutable) shared: a copy the caller may mutate at no risk."""
    kind = type(value)
    if kind is list:
        return [fresh(item) for item in value]
    if kind is dict:
        return {key: fresh(item) for key, item in value.items()}
    return value


def message_of(cell: Cell, role: str, *, metadata: bool = False) -> Entry:
    """A fresh, caller-owned OpenAI-chat message for a held (healthy) row."""
    if type(cell) is str:
        return {"role": role, "content": cell}
    if type(cell) is bytes:
        message: Entry = orjson.loads(cell)
        message.pop("message_id", None)
        if not metadata:
            message.pop(METADATA_FIELD, None)
        return message
    assert type(cell) is tuple
    content = cell[0]
    message = {"role": role, "content": content if type(content) is str else fresh(content)}
    for at in range(1, len(cell), 2):
        key, value = cell[at], cell[at + 1]
        if key != METADATA_FIELD or metadata:
            message[key] = value if type(value) is str else fresh(value)
    return message


def entry_of(cell: Cell, identity: str | None, role: str) -> Entry:
    """The whole stored entry of a held row (identity first), caller-owned."""
    if type(cell) is bytes:
        entry: Entry = orjson.loads(cell)
        return entry
    return {"message_id": identity, **message_of(cell, role, metadata=True)}


_JOIN_LIMIT = 64 * 1024


def to_messages(rows: Iterable[bytes], *, metadata: bool = False) -> list[Entry]:
    """Fresh, caller-owned OpenAI-chat messages for stored rows (no deepcopy).

    ``metadata``: keep each row's private ``metadata`` field (where it has one).

    Small rows are parsed together (one ``orjson.loads`` of a joined array);
    rows with media are parsed alone, so a window of images is never copied
    into one big buffer first (that copy cost more than the parse).
    """
    messages: list[Entry] = []
    batch: list[bytes] = []
    size = 0
    for row in rows:
        if len(row) >= _JOIN_LIMIT:
            if batch:
                messages.extend(orjson.loads(b"[" + b",".join(batch) + b"]"))
                batch, size = [], 0
            messages.append(orjson.loads(row))
            continue
        batch.append(row)
        size += len(row)
        if size >= _JOIN_LIMIT:
            messages.extend(orjson.loads(b"[" + b",".join(batch) + b"]"))
            batch, size = [], 0
    if batch:
        messages.extend(orjson.loads(b"[" + b",".join(batch) + b"]"))
    for message in messages:
        del message["message_id"]
        if not metadata:
            message.pop(METADATA_FIELD, None)
    return messages


# Above this many bytes rows are decoded in slices, yielding to the loop between
# them, so one huge window never stalls every other coroutine of the worker.
_ASYNC_DECODE_SLICE = 256 * 1024


async def to_messages_yielding(rows: list[bytes], *, metadata: bool = False) -> list[Entry]:
    """``to_messages``, a slice of about 256 KB of rows per step of the loop."""
    total = sum(map(len, rows))
    if total <= _ASYNC_DECODE_SLICE:
        return to_messages(rows, metadata=metadata)
    messages: list[Entry] = []
    start, size = 0, 0
    for index, row in enumerate(rows):
        size += len(row)
        if size >= _ASYNC_DECODE_SLICE:
            messages.extend(to_messages(rows[start : index + 1], metadata=metadata))
            start, size = index + 1, 0
            await asyncio.sleep(0)
    messages.extend(to_messages(rows[start:], metadata=metadata))
    return messages


# --- marker edits -----------------------------------------------------------------


def clean_tag_value(value: object, what: str) -> str:
    """Tag values come from platform users: brackets and control characters are neutralised."""
    if not isinstance(value, str):
        raise InvalidMessage(f"must be a str, not {type(value).__name__}", field=what)
    cleaned = _CONTROL_RE.sub(" ", value).replace("[", "(").replace("]", ")").strip()
    if len(cleaned) > MAX_TAG_CHARS:
        raise InvalidMessage(f"longer than {MAX_TAG_CHARS} characters", field=what)
    return cleaned


def _read_tags(text: str, identity: str) -> tuple[int, int, bool, dict[str, str]]:
    """Where the tag zone starts and ends, whether it follows a marker, and its tags."""
    # The marker as the bot wrote it: identities are read stripped, so a padded
    # "[Message ID: 42 ]" is the marker of "42" and its tags go after it.
    marker = next((m for m in MARKER_RE.finditer(text) if m.group(1).strip() == identity), None)
    after_marker = marker is not None
    start = marker.end() if marker is not None else 0
    pattern = _TAG_AFTER_MARKER if after_marker else _TAG_AT_START
    tags: dict[str, str] = {}
    end = start
    while (match := pattern.match(text, end)) is not None:
        for kind in ("deleted", "reactions"):
            if match.group(kind) is not None:
                tags.setdefault(kind, match.group(kind))
        end = match.end()
    return start, end, after_marker, tags


def _write_tags(text: str, identity: str, changes: Mapping[str, str | None]) -> str:
    start, end, after_marker, tags = _read_tags(text, identity)
    for kind, value in changes.items():
        if value:
            tags[kind] = value
        else:
            tags.pop(kind, None)
    rendered = []
    if "deleted" in tags:
        rendered.append(f"[deleted at {tags['deleted']}]")
    if "reactions" in tags:
        rendered.append(f"[Reactions: {tags['reactions']}]")
    zone = (
        "".join(f" {t}" for t in rendered) if after_marker else "".join(f"{t} " for t in rendered)
    )
    return text[:start] + zone + text[end:]


def _map_first_text(entry: Entry, change: Callable[[str], str]) -> Entry:
    content = entry["content"]
    if content is None:
        return {**entry, "content": change("")}
    if isinstance(content, str):
        return {**entry, "content": change(content)}
    parts = list(content)
    for index, part in enumerate(parts):
        if (
            isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ):
            parts[index] = {**part, "text": change(part["text"])}
            return {**entry, "content": parts}
    parts.insert(0, {"type": "text", "text": change("")})
    return {**entry, "content": parts}


def deleted_transform(deleted_at_iso: str) -> Transform:
    def apply(entry: Entry, identity: str) -> Entry:
        def change(text: str) -> str:
            if "deleted" in _read_tags(text, identity)[3]:
                return text  # idempotent: the first deletion time stands
            return _write_tags(text, identity, {"deleted": deleted_at_iso})

        return _map_first_text(entry, change)

    return apply


def reactions_transform(summary: str) -> Transform:
    def apply(entry: Entry, identity: str) -> Entry:
        return _map_first_text(
            entry, lambda text: _write_tags(text, identity, {"reactions": summary})
        )

    return apply


def edit_transform(new_content: str | list[Any]) -> Transform:
    """Replace the content; a text-only edit of a media post keeps the media parts."""

    def apply(entry: Entry, identity: str) -> Entry:
        old = entry["content"]
        old_text = first_text(old) or ""
        old_tags = _read_tags(old_text, identity)[3]
        media = (
            [p for p in old if not (isinstance(p, dict) and p.get("type") == "text")]
            if isinstance(new_content, str) and isinstance(old, list)
            else []
        )
        content: str | list[Any] = (
            [{"type": "text", "text": new_content}, *media] if media else new_content
        )
        updated = {**entry, "content": content}
        # Reactions and a deletion tag belong to the platform message, not to its
        # text: an edit that does not restate them keeps them.
        new_tags = _read_tags(first_text(content) or "", identity)[3]
        carried = {k: v for k, v in old_tags.items() if k not in new_tags}
        if carried:
            updated = _map_first_text(updated, lambda text: _write_tags(text, identity, carried))
        return updated

    return apply


def check_new_content(new_content: object) -> str | list[Any]:
    _check_content(new_content)
    assert isinstance(new_content, (str, list))
    return new_content


def rows_to_drop(
    size: int, limit: int, is_tool: Callable[[int], bool], *, keep_first: bool = False
) -> int:
    """How many of the oldest rows a trim to ``limit`` removes: the rule the Lua
    scripts keep (``trim`` in lua/_lib.lua and lua/session_lib.lua).

    Down to ``limit`` rows, then on past any tool results that would be left at
    the front without their assistant call. ``keep_first``: row 0 (a
    consolidation summary) stays, and the count is of the rows after it.
    """
    if size <= limit:
        return 0
    drop = size - limit
    next_kept = drop + 1 if keep_first else drop
    while next_kept < size and is_tool(next_kept):
        drop += 1
        next_kept += 1
    return drop
