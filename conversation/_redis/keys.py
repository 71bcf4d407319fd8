"""Every Redis key the engine uses, built in one place.

All of a room's keys share the hash tag ``{<room_id>}`` so that a room lives in
one Redis Cluster slot and each Lua script touches a single slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .._errors import InvalidRoomId

MAX_ROOM_ID_BYTES = 512

#: Suffixes of a room's companion keys (``RoomKeys`` gives scripts their order).
WINDOW, META, LOG, IDEM, ARCHIVE, LEASE = "", ":meta", ":log", ":idem", ":archive", ":lease"
REACTIONS, DEFERRED = ":reactions", ":deferred"
#: The room's named change-feed cursors (a HASH: name -> cursor).
CURSORS = ":cursors"
#: The room's change-notice channel (not a key): every mutating script SPUBLISHes
#: "<epoch> <version>" there (lua/_lib.lua notify(), which appends this suffix to
#: the window key); under the room's hash tag, so a Cluster shards it to the room's slot.
NOTICE = ":notice"


def glob_escape(text: str) -> str:
    """``text`` as a Redis glob pattern that matches exactly itself."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def validate_room_id(room_id: object) -> str:
    if not isinstance(room_id, str):
        raise InvalidRoomId(room_id, f"must be a str, not {type(room_id).__name__}")
    if not room_id:
        raise InvalidRoomId(room_id, "must not be empty")
    if "{" in room_id or "}" in room_id:
        raise InvalidRoomId(room_id, "must not contain '{' or '}' (they would break the hash tag)")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in room_id):
        raise InvalidRoomId(room_id, "must not contain newlines or other control characters")
    try:
        size = len(room_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidRoomId(room_id, "is not valid Unicode (lone surrogate)") from exc
    if size > MAX_ROOM_ID_BYTES:
        raise InvalidRoomId(room_id, f"is {size} bytes; the limit is {MAX_ROOM_ID_BYTES}")
    return room_id


@dataclass(frozen=True, slots=True)
class RoomKeys:
    """The keys of one room, in the order the Lua scripts take them as KEYS."""

    window: str
    meta: str
    log: str
    idem: str
    archive: str
    reactions: str
    deferred: str
    # Only touch() uses it: room writes refresh the named cursors' TTL with the room's.
    cursors: str

    def as_list(self) -> list[str]:
        return [
            self.window,
            self.meta,
            self.log,
            self.idem,
            self.archive,
            self.reactions,
            self.deferred,
            self.cursors,
        ]


class KeySpace:
    """Builds key names under a user-settable prefix."""

    def __init__(self, prefix: str = "sg") -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"key prefix {prefix!r} must be non-empty and free of braces")
        self.prefix = prefix

    def room_base(self, room_id: str) -> str:
        return f"{self.prefix}:conversation:{{{room_id}}}"

    def room(self, room_id: str) -> RoomKeys:
        base = self.room_base(room_id)
        return RoomKeys(
            base + WINDOW,
            base + META,
            base + LOG,
            base + IDEM,
            base + ARCHIVE,
            base + REACTIONS,
            base + DEFERRED,
            base + CURSORS,
        )

    def archive(self, room_id: str) -> str:
        return self.room_base(room_id) + ARCHIVE

    def cursors(self, room_id: str) -> str:
        return self.room_base(room_id) + CURSORS

    def lease(self, room_id: str) -> str:
        return self.room_base(room_id) + LEASE

    def notices(self, room_id: str) -> bytes:
        """The room's change-notice channel (``freshness="push"``), as the subscriber names it."""
        return (self.room_base(room_id) + NOTICE).encode()

    def meta_pattern(self, room_glob: str = "*") -> str:
        """SCAN pattern matching the meta key of every room whose id matches ``room_glob``.

        The prefix is matched literally: ``bot[eu]`` is a name, not a character class.
        """
        return f"{glob_escape(self.prefix)}:conversation:{{{room_glob}}}{META}"

    def room_from_meta_key(self, key: str) -> str | None:
        head = f"{self.prefix}:conversation:{{"
        tail = "}" + META
        if key.startswith(head) and key.endswith(tail):
            return key[len(head) : -len(tail)]
        return None
