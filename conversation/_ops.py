"""Writes waiting to reach Redis, and how each changes a window.

Every write is applied at once to this worker's view (so the bot sees its own
turn immediately) and queued; the room's persist task sends the queue in order.
``apply`` is the optimistic local effect; the persisted effect comes back from
Redis in the script's sync reply.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ._entries import Entry, Transform, encode, is_summary
from ._window import RoomState, Window

Row = tuple[bytes, str | None, str]  # stored bytes, identity, role


def new_token() -> str:
    return secrets.token_hex(8)  # 64 random bits: half the bytes of a uuid4 on every write


@dataclass(eq=False, slots=True)
class Op:
    token: str = field(default_factory=new_token, kw_only=True)
    durable_deadline: float | None = field(default=None, kw_only=True)
    done: asyncio.Future[Any] | None = field(default=None, kw_only=True)

    def apply(self, state: RoomState, default_limit: int) -> bool:
        raise NotImplementedError


@dataclass(eq=False, slots=True)
class AppendOp(Op):
    rows: list[Row]

    def apply(self, state: RoomState, default_limit: int) -> bool:
        for row in self.rows:
            state.window.push(*row)
        state.window.trim(state.limit or default_limit)
        return True


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


@dataclass(eq=False, slots=True)
class ClearOp(Op):
    def apply(self, state: RoomState, default_limit: int) -> bool:
        state.window.clear()
        return True


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
