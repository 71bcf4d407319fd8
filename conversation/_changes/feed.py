"""The change feed: what changed in a room since a cursor, as typed ``Change``\\ s.

One call of ``lua/changes.lua`` per read: it patches a reader from the room's log
the way ``sync.lua`` patches a worker (folds included), or answers with a
snapshot and why (cleared, or a reset the log cannot bridge). A consumer applying
the changes to a map of position -> entry holds exactly the room's window:

- ``append`` / ``edit``: the entry at ``position`` is now ``entry``;
- ``trim``: every position below ``position`` left the window;
- ``fold``: the same, and ``entry`` (the summary) now stands at ``position``;
- ``clear``: everything is gone; the window now starts at ``position``;
- ``reset``: the cursor could not be served incrementally: forget everything; the
  whole window follows as appends. Never a silent gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .._entries import Entry, decode_row, is_summary
from .._errors import RedisUnavailable, describe_error
from .._redis.keys import KeySpace
from .._redis.retry import TRANSIENT_ERRORS, is_permanent
from .._redis.rooms import RoomStore
from .._stats import Stats
from .cursor import Cursor, decode_cursor

logger = logging.getLogger(__name__)

ChangeKind = Literal["append", "edit", "trim", "clear", "reset", "fold"]

#: ``changes()`` polls again this soon after a read that found something, and backs
#: off (doubling) to its ``poll_interval`` while the room is idle.
MIN_POLL_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a room, in order; ``cursor`` resumes right after it.

    ``entry`` is the OpenAI-chat message (``role``, ``content``, …; None for
    ``trim``, ``clear`` and ``reset``) and ``message_id`` its stored identity.
    Resuming from the cursor of a change inside a batch never skips a change; it
    may repeat the batch's edits, trims and folds (each is idempotent on a map of
    positions), never an append.
    """

    kind: ChangeKind
    position: int
    cursor: str
    entry: Entry | None = None
    message_id: str | None = None


@dataclass(slots=True)
class Batch:
    """One read: its changes, the cursor after all of them, and the room's settings."""

    changes: list[Change]
    cursor: str
    epoch: str
    version: int
    limit: int
    rebackfill: bool
    reason: str = "i"
    corrupt: int = 0
    rows: list[tuple[int, bytes]] = field(default_factory=list)


def _entry(row: bytes) -> tuple[Entry, str | None] | None:
    if decode_row(row) is None:
        return None
    entry: dict[str, Any] = orjson.loads(row)
    identity = entry.pop("message_id", None)
    return entry, identity


class ChangeFeed:
    """Reads rooms' changes through ``lua/changes.lua``."""

    def __init__(self, store: RoomStore, keyspace: KeySpace, stats: Stats) -> None:
        self._store = store
        self._keyspace = keyspace
        self._stats = stats
        self._closed = False

    def close(self) -> None:
        """The manager closed: every ``follow`` ends at its next poll (at most one
        ``poll_interval`` later) instead of reading Redis forever."""
        self._closed = True

    async def read(self, room_id: str, cursor: str | None) -> Batch:
        """What changed since ``cursor`` (None: the whole window, as appends)."""
        start = decode_cursor(room_id, cursor)
        try:
            reason, folded, reply = await self._store.changes(self._keyspace.room(room_id), start)
        except TRANSIENT_ERRORS as exc:
            raise RedisUnavailable(
                f"cannot read the changes of room {room_id!r}: {describe_error(exc)}",
                room_id=room_id,
            ) from exc
        self._stats.change_reads += 1
        if reply.kind == 0:
            end = Cursor(start.epoch, reply.version, start.head, start.size, reply.tag)
            return Batch([], end.encode(room_id), start.epoch, reply.version, 0, False)
        batch = Batch(
            [],
            "",
            reply.epoch if reply.kind == 2 else start.epoch,
            reply.version,
            reply.limit,
            reply.rebackfill,
            reason,
        )
        if reply.kind == 2:
            self._snapshot(room_id, start, reason, reply, batch)
        else:
            self._incremental(room_id, start, folded, reply.head, reply, batch)
        return batch

    def _snapshot(
        self,
        room_id: str,
        start: Cursor,
        reason: str,
        reply: Any,
        batch: Batch,
    ) -> None:
        epoch, version, tag = batch.epoch, batch.version, reply.tag
        head, rows = reply.head, reply.rows
        if reason == "c":
            cursor = Cursor(epoch, version, head, 0, tag).encode(room_id)
            batch.changes.append(Change("clear", head, cursor))
        elif not start.knows_nothing:
            cursor = Cursor(epoch, version, head, 0, tag).encode(room_id)
            batch.changes.append(Change("reset", head, cursor))
        for offset, row in enumerate(rows):
            cursor = Cursor(epoch, version, head, offset + 1, tag).encode(room_id)
            self._emit(batch, room_id, "append", head + offset, row, cursor)
        batch.cursor = Cursor(epoch, version, head, len(rows), tag).encode(room_id)

    def _incremental(
        self, room_id: str, start: Cursor, folded: bool, head: int, reply: Any, batch: Batch
    ) -> None:
        epoch, version = start.epoch, batch.version
        held_end = max(start.head + start.size, head)
        # Inside the batch a cursor keeps the old version: resuming from it asks for
        # the batch's replaced rows again (idempotent), never for appends it passed.
        between = Cursor(epoch, start.version, head, held_end - head, start.tag).encode(room_id)
        replaced = sorted(reply.replaced)
        tail = list(reply.rows)
        tail_start = held_end
        fold_row: bytes | None = None
        if folded and replaced and replaced[0][0] == head:
            fold_row = replaced[0][1]
        elif folded and tail and held_end == head:
            fold_row = tail[0]
        meta = decode_row(fold_row) if fold_row is not None else None
        if fold_row is not None and meta is not None and is_summary(*meta):
            # The summary now at the head stands for every turn before it.
            if replaced and replaced[0][0] == head:
                replaced = replaced[1:]
                at = between
            else:
                tail, tail_start = tail[1:], head + 1
                at = Cursor(epoch, start.version, head, 1, start.tag).encode(room_id)
            self._emit(batch, room_id, "fold", head, fold_row, at)
        elif head > start.head and start.size > 0:
            batch.changes.append(Change("trim", head, between))
        for position, row in replaced:
            self._emit(batch, room_id, "edit", position, row, between)
        for offset, row in enumerate(tail):
            size = tail_start - head + offset + 1
            cursor = Cursor(epoch, start.version, head, size, start.tag).encode(room_id)
            self._emit(batch, room_id, "append", tail_start + offset, row, cursor)
        final = Cursor(epoch, version, head, held_end - head + len(reply.rows), reply.tag).encode(
            room_id
        )
        batch.cursor = final
        if batch.changes:
            last = batch.changes[-1]
            batch.changes[-1] = Change(last.kind, last.position, final, last.entry, last.message_id)

    def _emit(
        self, batch: Batch, room_id: str, kind: ChangeKind, position: int, row: bytes, cursor: str
    ) -> None:
        batch.rows.append((position, row))
        decoded = _entry(row)
        if decoded is None:
            # Positions are absolute, so skipping a corrupt row shifts nothing.
            batch.corrupt += 1
            self._stats.corrupt_rows += 1
            logger.warning(
                "room %s: the change feed skips a corrupt row at %d (%d bytes)",
                room_id,
                position,
                len(row),
            )
            return
        entry, identity = decoded
        batch.changes.append(Change(kind, position, cursor, entry, identity))

    async def follow(
        self, room_id: str, since: str | None, poll_interval: float
    ) -> AsyncGenerator[Change, None]:
        """Every change from ``since`` on, waiting for more: a bounded poll that backs
        off to one read per ``poll_interval`` seconds while the room is idle. Ends
        when the manager closes."""
        cursor = since
        delay = MIN_POLL_SECONDS
        while not self._closed:
            try:
                batch = await self.read(room_id, cursor)
            except RedisUnavailable as exc:
                if exc.__cause__ is not None and is_permanent(exc.__cause__):
                    raise  # WRONGTYPE, a script error: waiting cannot fix it
                logger.warning("room %s: change feed waits for Redis: %s", room_id, exc)
                await asyncio.sleep(poll_interval)
                continue
            cursor = batch.cursor
            for change in batch.changes:
                yield change
            delay = MIN_POLL_SECONDS if batch.changes else min(delay * 2, poll_interval)
            await asyncio.sleep(delay)
