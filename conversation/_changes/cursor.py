"""Change-feed cursors: where a reader stands in a room, as an opaque string.

A cursor says "I hold the rows [head, head + length) of this room as they were at
(epoch, version)": exactly what ``lua/changes.lua`` needs to send only what
changed since. It is ``c1.`` and the URL-safe base64 of a small JSON array (the
room's fingerprint, epoch, version, head, length, and the lineage tag of that
version, which lets the script tell a history a failover lost; a cursor of an
older engine has no tag, and is answered with a reset once). Cursors come back from users,
workers and files, so decoding trusts nothing: a string that is not one, or one
made for another room, is an ``InvalidCursor``; one that is well formed but does
not fit the room any more is the script's business (it answers with a reset).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import orjson

from .._errors import InvalidCursor

PREFIX = "c1."
#: Longest cursor accepted: an epoch is 12 hex digits, a tag 8 (see lua/_lib.lua).
MAX_CURSOR_CHARS = 256
MAX_EPOCH_CHARS = 64
#: Versions, heads and lengths are Redis integers; anything past this is forged.
MAX_NUMBER = 2**53


def room_fingerprint(room_id: str) -> str:
    """8 hex digits naming the room, so a cursor is refused by any other room."""
    return hashlib.blake2b(room_id.encode("utf-8"), digest_size=4).hexdigest()


@dataclass(frozen=True, slots=True)
class Cursor:
    """A decoded cursor; it is also the ``SyncedState`` that ``changes.lua`` is told."""

    epoch: str = ""
    version: int = 0
    head: int = 0
    size: int = 0
    tag: str = ""

    def encode(self, room_id: str) -> str:
        fields: list[object] = [
            room_fingerprint(room_id),
            self.epoch,
            self.version,
            self.head,
            self.size,
        ]
        if self.tag:
            fields.append(self.tag)
        body = orjson.dumps(fields)
        return PREFIX + base64.urlsafe_b64encode(body).rstrip(b"=").decode("ascii")

    @property
    def knows_nothing(self) -> bool:
        return not self.epoch and self.size == 0


START = Cursor()


def decode_cursor(room_id: str, cursor: object) -> Cursor:
    """The cursor ``cursor`` names for ``room_id`` (``None``: the start of the room)."""
    if cursor is None:
        return START
    if not isinstance(cursor, str):
        raise InvalidCursor(cursor, f"must be a str or None, not {type(cursor).__name__}")
    if len(cursor) > MAX_CURSOR_CHARS:
        raise InvalidCursor(cursor, f"longer than {MAX_CURSOR_CHARS} characters")
    if not cursor.startswith(PREFIX):
        raise InvalidCursor(cursor, f"does not start with {PREFIX!r}: not a cursor of this engine")
    text = cursor[len(PREFIX) :]
    try:
        body = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        fields = orjson.loads(body)
    except (binascii.Error, ValueError, orjson.JSONDecodeError) as exc:
        raise InvalidCursor(cursor, "is damaged (not the encoding a cursor has)") from exc
    if not (isinstance(fields, list) and len(fields) in (5, 6)):
        raise InvalidCursor(cursor, "is damaged (wrong shape)")
    fingerprint, epoch, version, head, size = fields[:5]
    tag = fields[5] if len(fields) == 6 else ""
    if not isinstance(fingerprint, str) or not isinstance(epoch, str) or not isinstance(tag, str):
        raise InvalidCursor(cursor, "is damaged (wrong field types)")
    for text in (epoch, tag):
        # '/' separates the two in what the scripts are sent.
        if (
            len(text) > MAX_EPOCH_CHARS
            or not text.isascii()
            or not text.isprintable()
            or "/" in text
        ):
            raise InvalidCursor(cursor, "is damaged (not an epoch)")
    for value in (version, head, size):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_NUMBER:
            raise InvalidCursor(cursor, "is damaged (positions must be small non-negative ints)")
    if fingerprint != room_fingerprint(room_id):
        raise InvalidCursor(cursor, f"was made for another room, not {room_id!r:.80}")
    return Cursor(epoch, version, head, size, tag)
