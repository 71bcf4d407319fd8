"""Named durable cursors (watermarks): a worker's place in a room's change feed,
kept in Redis under the room's hash tag, moved by compare-and-set."""

from __future__ import annotations

from .._errors import InvalidCursor, RedisUnavailable, describe_error
from .._redis.keys import KeySpace
from .._redis.retry import TRANSIENT_ERRORS
from .._redis.rooms import RoomStore
from .cursor import decode_cursor

MAX_NAME_CHARS = 200


def validate_name(name: object) -> str:
    if not isinstance(name, str):
        raise InvalidCursor(name, f"a cursor name must be a str, not {type(name).__name__}")
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidCursor(name, f"a cursor name must have 1 to {MAX_NAME_CHARS} characters")
    if not name.isprintable():
        raise InvalidCursor(name, "a cursor name must not contain control characters")
    return name


class NamedCursors:
    def __init__(self, store: RoomStore, keyspace: KeySpace) -> None:
        self._store = store
        self._keyspace = keyspace

    async def get(self, room_id: str, name: str) -> str | None:
        validate_name(name)
        try:
            value = await self._store.cursor_get(self._keyspace.cursors(room_id), name)
        except TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(
                f"cannot read cursor {name!r} of room {room_id!r}: {describe_error(exc)}",
                room_id=room_id,
            ) from exc
        return None if value is None else value.decode("utf-8", "replace")

    async def set(self, room_id: str, name: str, cursor: str, expected: str | None) -> bool:
        validate_name(name)
        if cursor is None:
            raise InvalidCursor(cursor, "set_cursor needs a cursor, not None")
        decode_cursor(room_id, cursor)
        if expected is None:
            mode, wanted = "any", ""
        elif expected == "":
            mode, wanted = "absent", ""
        elif isinstance(expected, str):
            mode, wanted = "equal", expected
        else:
            raise InvalidCursor(expected, "expected must be a cursor, '' (unset) or None")
        try:
            return await self._store.cursor_set(
                self._keyspace.cursors(room_id), name, cursor, mode=mode, expected=wanted
            )
        except TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(
                f"cannot set cursor {name!r} of room {room_id!r}: {describe_error(exc)}",
                room_id=room_id,
            ) from exc
