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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import orjson

from .._deferred import apply_events, identity_field, reaction_event, stored_events
from .._entries import Cell, Transform, decode_cell, encode, is_summary, reactions_transform
from .._errors import InvalidMessage, PersistError
from .._reactions import (
    MAX_EMOJI_PER_MESSAGE,
    MAX_REACTIONS_PER_MESSAGE,
    MessageReactions,
    ReactionEvent,
    RoomReactions,
    TooManyReactions,
    tag_slot,
)
from .._redis.keys import RoomKeys
from .._redis.replies import SyncReply
from .._redis.rooms import DeferredEventsWaiting, RoomStore
from .._stats import Stats
from .window import Held, RoomState, Window

Row = tuple[bytes, str | None, str]  # stored bytes, identity, role

MAX_BATCH_ROWS = 512


def now_ms() -> int:
    """The wall clock deferred events expire by (workers compare it across processes)."""
    return int(time.time() * 1000)


def apply_waiting(
    appends: Sequence[AppendOp], pending: dict[bytes, bytes]
) -> list[tuple[bytes, bytes, str, str]]:
    """Apply the events the append script handed over to the last row of each message
    (of the rows as first made), and say what was applied, as the script checks it."""
    consumed: list[tuple[bytes, bytes, str, str]] = []
    last: dict[bytes, tuple[AppendOp, int]] = {}
    for op in appends:
        if not op.original:
            op.original = list(op.rows)
        for index, (_row, identity, _role) in enumerate(op.original):
            if identity is not None:
                last[identity_field(identity)] = (op, index)
    for op in appends:
        op.rows = list(op.original)
    for field_name, value in pending.items():
        if field_name not in last:
            continue
        op, index = last[field_name]
        row, identity, role = op.original[index]
        assert identity is not None
        applied = apply_events(row, identity, stored_events(value), op.max_bytes)
        op.rows[index] = (applied.row, identity, role)
        consumed.append((field_name, value, identity, applied.reaction_state()))
    return consumed


def apply_memory_deferred(
    state: RoomState, rows: list[Row], max_bytes: int, window_limit: int
) -> int:
    """Memory-only: apply to ``rows`` (in place) the events that wait for them, drop
    them from ``state`` and track the reactions they built; how many applied."""
    assert state.deferred is not None
    now = now_ms()
    count = 0
    for index, (row, identity, role) in enumerate(rows):
        if identity is None or identity not in state.deferred:
            continue
        events = [event for expiry, event in state.deferred.pop(identity) if expiry > now]
        if not events:
            continue
        applied = apply_events(row, identity, events, max_bytes)
        rows[index] = (applied.row, identity, role)
        count += len(events)
        if applied.reactions is not None or applied.forget:
            if state.reactions is None:
                state.reactions = RoomReactions()
            state.reactions.forget(identity)
            if applied.reactions is not None and applied.reactions.emoji:
                state.reactions.get(identity, window_limit).emoji = applied.reactions.emoji
    return count


def apply_pending(
    rows: list[Row], pending: dict[bytes, bytes], max_bytes: int
) -> tuple[list[Row], list[tuple[bytes, bytes, str, str]]]:
    """``rows`` with the events a script handed over applied to the last row of each
    message, and what was applied, as the script checks it."""
    last: dict[bytes, int] = {}
    for index, (_row, identity, _role) in enumerate(rows):
        if identity is not None:
            last[identity_field(identity)] = index
    applied_rows = list(rows)
    consumed: list[tuple[bytes, bytes, str, str]] = []
    for field_name, value in pending.items():
        at = last.get(field_name)
        if at is None:
            continue
        row, identity, role = rows[at]
        assert identity is not None
        applied = apply_events(row, identity, stored_events(value), max_bytes)
        applied_rows[at] = (applied.row, identity, role)
        consumed.append((field_name, value, identity, applied.reaction_state()))
    return applied_rows, consumed


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

    async def absorb(self, reply: SyncReply, own_rows: Sequence[Held] = ()) -> None: ...

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
    # A caller awaits the write (an _async form): its errors reach that caller.
    awaited: bool = field(default=False, kw_only=True)

    # Whether each write of a batch keeps its own idempotency token in Redis
    # (lua/append.lua); other batches are sent, and remembered, under the first's.
    keeps_own_token: ClassVar[bool] = False

    def apply(self, state: RoomState, default_limit: int) -> bool:
        raise NotImplementedError

    def count(self, stats: Stats) -> None:
        """Count the write in ``stats`` as it is made."""

    def deferred_event(self) -> bytes | None:
        """The event to keep when the write's message has not arrived (None: not kept)."""
        return None

    def appended_rows(self) -> list[Held] | None:
        """The rows a plain append adds, held (a run of them is replayed at once), else None."""
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
    max_bytes: int = 8 * 1024 * 1024  # what a deferred event may grow a row to
    applied_deferred: int = field(default=0, init=False)
    # The rows as made, before any deferred event was applied to them.
    original: list[Row] = field(default_factory=list, init=False, repr=False)
    # Each row decoded once, with the bytes it was decoded from: the view and the
    # synced window hold the same cells (one copy of every string).
    _held: list[tuple[bytes, Held]] = field(default_factory=list, init=False, repr=False)
    # The caller named the write's key (idempotency_key=): re-sending that key
    # recalls this write, so the worker remembers the key once Redis confirms it.
    keyed: bool = field(default=False, kw_only=True)
    keeps_own_token: ClassVar[bool] = True

    def apply(self, state: RoomState, default_limit: int) -> bool:
        if state.deferred:
            self.apply_deferred(state, state.limit or default_limit)
        state.window.extend(self.held())
        state.window.trim(state.limit or default_limit)
        return True

    def held(self) -> list[Held]:
        """The rows as a window holds them, decoded once per row's bytes."""
        cache = self._held
        out: list[Held] = []
        for index, (row, identity, role) in enumerate(self.rows):
            if index < len(cache) and cache[index][0] is row:
                out.append(cache[index][1])
                continue
            decoded = decode_cell(row)
            cell: Cell = row if decoded is None else decoded[0]
            held: Held = (cell, identity, role)
            if index < len(cache):
                cache[index] = (row, held)
            else:
                cache.append((row, held))
            out.append(held)
        return out

    def apply_deferred(self, state: RoomState, window_limit: int) -> None:
        """Memory-only: apply the events that wait for these rows, and drop them."""
        self.applied_deferred += apply_memory_deferred(
            state, self.rows, self.max_bytes, window_limit
        )

    def count(self, stats: Stats) -> None:
        stats.appends += len(self.rows)
        stats.deferred_applied += self.applied_deferred

    def appended_rows(self) -> list[Held]:
        return self.held()

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
        consumed: list[tuple[bytes, bytes, str, str]] = []
        for _attempt in range(MAX_CONFLICTS):
            writes = [(op.token, [row[0] for row in op.rows]) for op in appends]
            try:
                reply, flags = await link.store.append(
                    link.keys,
                    link.synced,
                    epoch,
                    writes,
                    now_ms=now_ms(),
                    consumed=consumed,
                    direct=direct,
                )
                break
            except DeferredEventsWaiting as waiting:
                # Events came before these messages: apply them to our rows (the
                # view showed the rows without them) and send the rows again.
                consumed = apply_waiting(appends, waiting.pending)
                link.mark_view_stale()
        else:
            error = PersistError(
                f"room {link.room_id}: events for these messages kept arriving",
                room_id=link.room_id,
            )
            return [error] * len(batch)
        if consumed:
            link.stats.deferred_applied += sum(len(stored_events(c[1])) for c in consumed)
        # Rows of a write whose token had applied are in Redis where its first
        # attempt put them (the reply carries them); only the others are ours now.
        pushed = [row for op, flag in zip(appends, flags, strict=True) if flag == "1"
                  for row in op.held()]  # fmt: skip
        await link.absorb(reply, pushed)
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
    # patch_reactions: the new summary replaces whatever reactions were tracked.
    forgets_reactions: bool = False
    # What to keep if the message has not arrived yet (see _deferred).
    event: bytes | None = None
    # Transforms are pure: the same base row (the view and the synced window
    # hold the same row) always gives the same edited row, held as one cell.
    _base: bytes | None = field(default=None, init=False, repr=False)
    _edited: bytes = field(default=b"", init=False, repr=False)
    _cell: Cell = field(default=b"", init=False, repr=False)

    def edited_row(self, row: bytes) -> bytes:
        if row == self._base:
            return self._edited
        entry = orjson.loads(row)
        edited = encode(self.transform(entry, self.identity), self.max_bytes)
        decoded = decode_cell(edited)
        self._base, self._edited = row, edited
        self._cell = edited if decoded is None else decoded[0]
        return edited

    def edited_cell(self, row: bytes) -> Cell:
        """``edited_row`` as a window holds it (decoded once per base row)."""
        self.edited_row(row)
        return self._cell

    def apply(self, state: RoomState, default_limit: int) -> bool:
        window = state.window
        index = window.find_last(self.identity)
        if index is None:
            return False
        role = window.roles[index]
        window.set_held(index, self.edited_cell(window.row(index)), self.identity, role)
        if self.forgets_reactions and state.reactions is not None:
            state.reactions.forget(self.identity)
        return True

    def count(self, stats: Stats) -> None:
        stats.edits += 1

    def deferred_event(self) -> bytes | None:
        return self.event

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
        forget = self.identity if any(edit.forgets_reactions for edit in edits) else ""
        synced = link.synced
        for _attempt in range(MAX_CONFLICTS):
            index = synced.window.find_last(self.identity)
            if index is None:
                link.mark_view_stale()  # the view may still show the edit
                return [False] * len(edits)
            old_row = synced.window.row(index)
            try:
                base = new_row = old_row
                for edit in edits:
                    base, new_row = new_row, edit.edited_row(new_row)
                new_cell = edits[-1].edited_cell(base)
            except InvalidMessage as exc:
                return [exc] * len(edits)
            position = synced.head + index
            reply = await link.store.replace(
                link.keys,
                synced,
                self.token,
                position,
                old_row,
                new_row,
                forget_reactions_of=forget,
                direct=direct,
            )
            await link.absorb(reply)
            if reply.status == 1 and reply.kind == 1:
                here = position - synced.head
                if 0 <= here < len(synced.window):
                    role = synced.window.roles[here]
                    synced.window.set_held(here, new_cell, self.identity, role)
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
class ReactionOp(Op):
    """One reaction event on one message.

    With Redis the count is the room's, not this worker's: ``lua/react.lua``
    updates the message's reaction state and re-renders the tag together, and the
    reply brings the row back, so the view shows the tag only once Redis answered.
    Memory-only (``local``) the room's ``RoomReactions`` is the state.
    """

    identity: str
    event: ReactionEvent
    max_bytes: int
    local: bool

    def apply(self, state: RoomState, default_limit: int) -> bool:
        window = state.window
        index = window.find_last(self.identity)
        if index is None:
            return False
        if not self.local:
            return True
        if state.reactions is None:
            state.reactions = RoomReactions()
        tracked = state.reactions.get(self.identity, state.limit or default_limit)
        # Applied to a copy first: a refused event (or a row that would grow too
        # big) leaves the tracked reactions and the row as they were.
        trial = MessageReactions([(key, shown, list(users)) for key, shown, users in tracked.emoji])
        if trial.apply(self.event):
            entry = window.entry(index)
            row = encode(reactions_transform(trial.summary())(entry, self.identity), self.max_bytes)
            window.set(index, row, self.identity, window.roles[index])
            tracked.emoji = trial.emoji
        state.reactions.settle(self.identity)
        return True

    def count(self, stats: Stats) -> None:
        stats.reactions += 1

    def deferred_event(self) -> bytes | None:
        return reaction_event(self.event)

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        synced = link.synced
        for _attempt in range(MAX_CONFLICTS):
            index = synced.window.find_last(self.identity)
            if index is None:
                link.mark_view_stale()
                return [False]
            try:
                slot = tag_slot(
                    synced.window.row(index), self.identity, reactions_transform, self.max_bytes
                )
            except InvalidMessage as exc:
                return [exc]
            reply = await link.store.react(
                link.keys,
                synced,
                self.token,
                synced.head + index,
                self.identity,
                slot,
                self.max_bytes,
                self.event,
                direct=direct,
            )
            await link.absorb(reply)
            if reply.status in (1, 2, 3):
                return [True]
            if reply.status == 4:
                return [
                    TooManyReactions(
                        f"room {link.room_id}: message {self.identity} already has "
                        f"{MAX_REACTIONS_PER_MESSAGE} reactions or {MAX_EMOJI_PER_MESSAGE} "
                        "distinct emoji",
                        field="emoji",
                    )
                ]
            if reply.status == 5:
                return [
                    InvalidMessage(
                        f"room {link.room_id}: message {self.identity} would outgrow "
                        f"{self.max_bytes} bytes with its reactions tag",
                        field="content",
                    )
                ]
            # The row changed other than in its tag (an edit), or moved: the reply
            # brought us up to date; cut it open again.
            link.stats.conflicts += 1
        error = PersistError(
            f"room {link.room_id}: reaction on {self.identity} kept conflicting",
            room_id=link.room_id,
        )
        return [error]


@dataclass(eq=False, slots=True)
class ClearOp(Op):
    def apply(self, state: RoomState, default_limit: int) -> bool:
        state.window.clear()
        state.reactions = None
        state.deferred = None
        return True

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        await link.absorb(await link.store.clear(link.keys, link.synced, self.token, epoch))
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
        await link.absorb(reply)
        return [True]


@dataclass(eq=False, slots=True)
class BackfillOp(Op):
    """Prepend older platform history to the window (compare-and-set rewrite)."""

    older: list[Row]
    max_bytes: int = 8 * 1024 * 1024  # what a deferred event may grow a row to
    applied_deferred: int = field(default=0, init=False)

    def merged(self, window: Window) -> list[Row]:
        present = {identity for identity in window.ids if identity is not None}
        older: Sequence[Row] = self.older
        if len(window) and is_summary(window.ids[0], window.roles[0]):
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
            (window.row(index), identity, role)
            for index, (identity, role) in enumerate(zip(window.ids, window.roles, strict=True))
            if role is not None
        ]
        return kept + current

    def apply(self, state: RoomState, default_limit: int) -> bool:
        rows = self.merged(state.window)
        if state.deferred:
            # Older history may bring a message that events wait for (SPEC §31).
            self.applied_deferred += apply_memory_deferred(
                state, rows, self.max_bytes, state.limit or default_limit
            )
        state.window.clear()
        for row, identity, role in rows:
            state.window.push(row, identity, role)
        state.window.trim(state.limit or default_limit)
        state.rebackfill = False
        return True

    def count(self, stats: Stats) -> None:
        stats.deferred_applied += self.applied_deferred

    async def send(self, batch: list[Op], link: Link, epoch: str, direct: bool) -> list[Any]:
        pending: dict[bytes, bytes] = {}
        for _attempt in range(MAX_CONFLICTS):
            rows, consumed = apply_pending(self.merged(link.synced.window), pending, self.max_bytes)
            try:
                reply = await link.store.rewrite(
                    link.keys,
                    link.synced,
                    self.token,
                    epoch,
                    [row[0] for row in rows],
                    now_ms=now_ms(),
                    consumed=consumed,
                )
            except DeferredEventsWaiting as waiting:
                # Older history brings a message that events wait for: apply them
                # (the view showed the rows without them) and send again.
                pending = waiting.pending
                link.mark_view_stale()
                continue
            await link.absorb(reply)
            if reply.status == 1 and consumed:
                link.stats.deferred_applied += sum(len(stored_events(c[1])) for c in consumed)
            if reply.status != 0:
                return [True]
            link.stats.conflicts += 1
        return [
            PersistError(f"room {link.room_id}: backfill kept conflicting", room_id=link.room_id)
        ]
