"""Writes waiting to reach Redis: each knows its local and its remote effect.

Every write is applied at once to this worker's view (so the bot sees its own
turn immediately) and queued; the room's persist task sends the queue in order.
``apply`` is the optimistic local effect; ``send`` is the remote one, one script
call (or a few, on conflicts), whose reply brings the synced state up to date.
``gather`` says which queued writes may travel with this one.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import orjson

from .._entries import Entry, Transform, encode, is_summary
from .._errors import InvalidMessage, PersistError
from .._redis.keys import RoomKeys
from .._redis.replies import SyncReply
from .._redis.rooms import RoomStore
from .._stats import Stats
from .window import RoomState, Window

Row = tuple[bytes, str | None, str]  # stored bytes, identity, role

MAX_BATCH_ROWS = 512
# A compare-and-set write (an edit, a backfill) re-applies itself on top of what
# another worker changed at most this many times in a row.
MAX_CONFLICTS = 32


class Link(Protocol):
    """What a write's remote effect needs: its room's keys and synced state, and
    the replicator that absorbs each reply into them."""

    room_id: str
    keys: RoomKeys
    synced: RoomState
    store: RoomStore
    stats: Stats

    def absorb(self, reply: SyncReply, own_rows: Sequence[Row] = ()) -> None: ...

    def mark_view_stale(self) -> None: ...


def new_token() -> str:
    return secrets.token_hex(8)  # 64 random bits: half the bytes of a uuid4 on every write


@dataclass(eq=False, slots=True)
class Op:
    token: str = field(default_factory=new_token, kw_only=True)
    durable_deadline: float | None = field(default=None, kw_only=True)
    done: asyncio.Future[Any] | None = field(default=None, kw_only=True)
    # A catch-up found its token applied (a recall of a write that had landed, or
    # an attempt that timed out after Redis took it): the view must not apply it
    # again on top of a synced state that holds it.
    landed: bool = field(default=False, kw_only=True)

    # Whether each write of a batch keeps its own idempotency token in Redis
    # (lua/append.lua); other batches are sent, and remembered, under the first's.
    keeps_own_token: ClassVar[bool] = False

    def apply(self, state: RoomState, default_limit: int) -> bool:
        raise NotImplementedError

    def count(self, stats: Stats) -> None:
        """Count the write in ``stats`` as it is made."""

    def appended_rows(self) -> list[Row] | None:
        """The rows a plain append adds (a run of them is replayed at once), else None."""
        return None

    def gather(self, queue: Iterable[Op]) -> list[Op]:
        """This write and the queued ones right behind it that travel in its batch."""
        return [self]

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        """Persist ``batch`` (this write first); one result per write."""
        raise NotImplementedError


@dataclass(eq=False, slots=True)
class AppendOp(Op):
    rows: list[Row]
    # The caller named the write's key (idempotency_key=): re-sending that key
    # recalls this write, so the worker remembers the key once Redis confirms it.
    keyed: bool = field(default=False, kw_only=True)
    keeps_own_token: ClassVar[bool] = True

    def apply(self, state: RoomState, default_limit: int) -> bool:
        for row in self.rows:
            state.window.push(*row)
        state.window.trim(state.limit or default_limit)
        return True

    def count(self, stats: Stats) -> None:
        stats.appends += len(self.rows)

    def appended_rows(self) -> list[Row]:
        return self.rows

    def gather(self, queue: Iterable[Op]) -> list[Op]:
        ops: list[Op] = [self]
        if self.durable_deadline is not None:
            return ops
        rows = len(self.rows)
        for op in itertools.islice(queue, 1, None):
            if not isinstance(op, AppendOp) or op.durable_deadline is not None:
                break
            if rows + len(op.rows) > MAX_BATCH_ROWS:
                break
            rows += len(op.rows)
            ops.append(op)
        return ops

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        appends = [op for op in batch if isinstance(op, AppendOp)]
        writes = [(op.token, [row[0] for row in op.rows]) for op in appends]
        reply, flags = await link.store.append(link.keys, link.synced, epoch, writes, direct=direct)
        # Rows of a write whose token had applied are in Redis where its first
        # attempt put them (the reply carries them); only the others are ours now.
        pushed = [row for op, flag in zip(appends, flags, strict=True) if flag == "1"
                  for row in op.rows]  # fmt: skip
        link.absorb(reply, pushed)
        # A write taken as landed is not in the view; if Redis stored it after all
        # (its key was lost), synced now holds rows the view lacks.
        flagged = zip(appends, flags, strict=True)
        stored_again = any(op.landed and flag == "1" for op, flag in flagged)
        if stored_again or len(pushed) != sum(len(op.rows) for op in appends):
            link.mark_view_stale()
        return [True] * len(batch)


@dataclass(eq=False, slots=True)
class EditOp(Op):
    identity: str
    transform: Transform
    max_bytes: int
    # Transforms are pure: the same base row (the same bytes object: the view and
    # the synced window share rows) always gives the same edited row.
    _base: bytes | None = field(default=None, init=False, repr=False)
    _edited: bytes = field(default=b"", init=False, repr=False)

    def edited_row(self, row: bytes) -> bytes:
        if row is self._base:
            return self._edited
        entry: Entry = orjson.loads(row)
        edited = encode(self.transform(entry, self.identity), self.max_bytes)
        self._base, self._edited = row, edited
        return edited

    def apply(self, state: RoomState, default_limit: int) -> bool:
        window = state.window
        index = window.find_last(self.identity)
        if index is None:
            return False
        role = window.roles[index]
        window.set(index, self.edited_row(window.rows[index]), self.identity, role)
        return True

    def count(self, stats: Stats) -> None:
        stats.edits += 1

    def gather(self, queue: Iterable[Op]) -> list[Op]:
        # A reaction storm on one message becomes one replace of its row.
        ops: list[Op] = [self]
        if self.durable_deadline is not None:
            return ops
        for op in itertools.islice(queue, 1, None):
            if not isinstance(op, EditOp) or op.identity != self.identity:
                break
            ops.append(op)
        return ops

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        edits = [op for op in batch if isinstance(op, EditOp)]
        synced = link.synced
        for _attempt in range(MAX_CONFLICTS):
            index = synced.window.find_last(self.identity)
            if index is None:
                link.mark_view_stale()  # the view may still show the edit
                return [False] * len(edits)
            old_row = synced.window.rows[index]
            try:
                new_row = old_row
                for edit in edits:
                    new_row = edit.edited_row(new_row)
            except InvalidMessage as exc:
                return [exc] * len(edits)
            position = synced.head + index
            reply = await link.store.replace(
                link.keys, synced, self.token, position, old_row, new_row, direct=direct
            )
            link.absorb(reply)
            if reply.status == 1 and reply.kind == 1:
                here = position - synced.head
                if 0 <= here < len(synced.window):
                    synced.window.set(here, new_row, self.identity, synced.window.roles[here])
            if reply.status != 0:
                return [True] * len(edits)
            # Someone changed the entry since we last saw it: the reply brought us
            # up to date, so re-apply the edit on top of their version.
            link.stats.conflicts += 1
        error = PersistError(
            f"room {link.room_id}: edit of {self.identity} kept conflicting", room_id=link.room_id
        )
        return [error] * len(edits)


@dataclass(eq=False, slots=True)
class ClearOp(Op):
    def apply(self, state: RoomState, default_limit: int) -> bool:
        state.window.clear()
        return True

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        link.absorb(await link.store.clear(link.keys, link.synced, self.token, epoch))
        return [True]


@dataclass(eq=False, slots=True)
class LimitOp(Op):
    limit: int  # 0: leave the limit as it is
    rebackfill: bool | None  # None: raising the limit decides

    def apply(self, state: RoomState, default_limit: int) -> bool:
        if self.limit:
            if self.limit > (state.limit or default_limit):
                state.rebackfill = True
            state.limit = self.limit
        if self.rebackfill is not None:
            state.rebackfill = self.rebackfill
        state.window.trim(state.limit or default_limit)
        return True

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        reply = await link.store.set_limit(
            link.keys, link.synced, self.token, epoch, self.limit, self.rebackfill
        )
        link.absorb(reply)
        return [True]


@dataclass(eq=False, slots=True)
class BackfillOp(Op):
    """Prepend older platform history to the window (compare-and-set rewrite)."""

    older: list[Row]

    def merged(self, window: Window) -> list[Row]:
        present = {identity for identity in window.ids if identity is not None}
        older: Sequence[Row] = self.older
        if window.rows and is_summary(window.ids[0], window.roles[0]):
            # A consolidation summary stands for everything before it (archived):
            # platform history older than the window would come back twice.
            older = ()
        # Platform history may overlap the window: keep only what is older than
        # the first entry both share, and nothing the window already holds.
        for index, (_, identity, _) in enumerate(older):
            if identity is not None and identity in present:
                older = older[:index]
                break
        kept = [row for row in older if row[1] is None or row[1] not in present]
        current = [
            (row, identity, role)
            for row, identity, role in zip(window.rows, window.ids, window.roles, strict=True)
            if role is not None
        ]
        return kept + current

    def apply(self, state: RoomState, default_limit: int) -> bool:
        rows = self.merged(state.window)
        state.window.clear()
        for row, identity, role in rows:
            state.window.push(row, identity, role)
        state.window.trim(state.limit or default_limit)
        state.rebackfill = False
        return True

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        for _attempt in range(MAX_CONFLICTS):
            rows = self.merged(link.synced.window)
            reply = await link.store.rewrite(
                link.keys, link.synced, self.token, epoch, [row[0] for row in rows]
            )
            link.absorb(reply)
            if reply.status != 0:
                return [True]
            link.stats.conflicts += 1
        return [
            PersistError(f"room {link.room_id}: backfill kept conflicting", room_id=link.room_id)
        ]
