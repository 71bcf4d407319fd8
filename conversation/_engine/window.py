"""The in-memory window of one room, and how a script reply from Redis updates it.

Rows are held decoded (see ``Cell`` in ``_entries``), with identity and role
beside them: handing out messages rebuilds only the containers around strings
the window shares, and nothing is held twice (no row bytes next to its decoded
strings; a 100 KB image is one ``str``). The bytes a write needs (an edit's
compare-and-set, a fold, a backfill) are written again by ``orjson.dumps``,
which gives back exactly what Redis holds: a row it would not is kept as bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson

from .._entries import (
    Cell,
    Entry,
    decode_cell,
    entry_of,
    is_summary,
    message_of,
    row_of,
    rows_to_drop,
)
from .._reactions import RoomReactions
from .._redis.replies import SyncReply
from .._stats import Stats

logger = logging.getLogger(__name__)

#: A row as a window holds it: the cell, identity, and role (None: corrupt).
Held = tuple[Cell, str | None, str | None]

#: A reply's rows are decoded at most this many bytes, or rows, between two
#: yields to the loop (about a millisecond of decoding; see ``decode_rows``).
DECODE_SLICE_BYTES = 1024 * 1024
DECODE_SLICE_ROWS = 2048


def hold(row: bytes, room_id: str) -> Held:
    """A row read from Redis as a window holds it (a corrupt row is logged)."""
    return decode_cell(row) or _corrupt(row, room_id)


def hold_all(rows: Iterable[bytes], room_id: str) -> list[Held]:
    return [decode_cell(row) or _corrupt(row, room_id) for row in rows]


def _corrupt(row: bytes, room_id: str) -> Held:
    logger.warning("room %s: skipping a corrupt row from Redis (%d bytes)", room_id, len(row))
    return row, None, None


def needs_slices(rows: Sequence[bytes]) -> bool:
    """Whether decoding ``rows`` is more than one slice (see ``decode_rows``)."""
    return len(rows) > DECODE_SLICE_ROWS or sum(map(len, rows)) > DECODE_SLICE_BYTES


async def decode_rows(rows: Sequence[bytes], room_id: str, stats: Stats) -> list[Held]:
    """``rows`` as a window holds them, yielding to the loop between slices, each
    counted in ``stats.decode_slices``. No slice decodes more than
    ``DECODE_SLICE_BYTES`` (one bigger row alone) or ``DECODE_SLICE_ROWS``, so a
    snapshot of a window of images never holds the loop for long."""
    held: list[Held] = []
    start = slices = 0
    while start < len(rows):
        stop, size = start, 0
        while stop < len(rows) and stop - start < DECODE_SLICE_ROWS:
            size += len(rows[stop])
            if size > DECODE_SLICE_BYTES and stop > start:
                break
            stop += 1
        if slices:
            await asyncio.sleep(0)
        held.extend(hold_all(rows[start:stop], room_id))
        slices += 1
        stats.decode_slices += 1
        start = stop
    return held


@dataclass(slots=True)
class Window:
    """Held rows with their identities and roles (``role is None`` marks a corrupt row).

    Corrupt rows are kept so positions stay aligned with Redis, and skipped
    whenever messages are handed out. Cells are immutable once held, so a copy
    of a window shares them.
    """

    cells: list[Cell] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)
    roles: list[str | None] = field(default_factory=list)
    corrupt: int = 0

    def __len__(self) -> int:
        return len(self.cells)

    def copy(self) -> Window:
        return Window(self.cells.copy(), self.ids.copy(), self.roles.copy(), self.corrupt)

    # --------------------------------------------------------------- reading

    @property
    def rows(self) -> list[bytes]:
        """Every row's bytes, as Redis holds them (written again: O(window))."""
        return [row_of(c, i, r) for c, i, r in zip(self.cells, self.ids, self.roles, strict=True)]

    def row(self, index: int) -> bytes:
        """The bytes Redis holds at ``index``, as an edit compares them."""
        return row_of(self.cells[index], self.ids[index], self.roles[index])

    def entry(self, index: int) -> Entry:
        """The whole stored entry at ``index`` (identity first), caller-owned."""
        role = self.roles[index]
        assert role is not None, "a corrupt row has no entry"
        return entry_of(self.cells[index], self.ids[index], role)

    def has_tool_calls(self, index: int) -> bool:
        """Whether the row at ``index`` carries a non-empty ``tool_calls``."""
        cell = self.cells[index]
        if type(cell) is str:
            return False
        if type(cell) is bytes:
            if self.roles[index] is None or b'"tool_calls"' not in cell:
                return False  # a byte scan spares parsing a row of images
            return bool(orjson.loads(cell).get("tool_calls"))
        assert type(cell) is tuple
        fields = cell[1::2]
        return "tool_calls" in fields and bool(cell[2 + 2 * fields.index("tool_calls")])

    def held(self, start: int = 0, stop: int | None = None) -> list[Held]:
        cells, ids, roles = self.cells[start:stop], self.ids[start:stop], self.roles[start:stop]
        return list(zip(cells, ids, roles, strict=True))

    def messages(self, *, metadata: bool = False) -> list[Entry]:
        """Fresh, caller-owned OpenAI-chat messages (corrupt rows skipped).

        Containers are rebuilt and strings shared: far cheaper than a parse,
        and nothing a caller does to what it gets reaches the window.
        """
        out: list[Entry] = []
        append = out.append
        for cell, role in zip(self.cells, self.roles, strict=True):
            if type(cell) is str:
                append({"role": role, "content": cell})
            elif role is not None:
                append(message_of(cell, role, metadata=metadata))
        return out

    def healthy_cells(self) -> list[tuple[Cell, str]]:
        """(cell, role) of every healthy row: cells are immutable, so their
        identity says a row is unchanged (the token estimates rely on it)."""
        return [(c, r) for c, r in zip(self.cells, self.roles, strict=True) if r is not None]

    def find_last(self, identity: str) -> int | None:
        ids = self.ids
        try:
            return len(ids) - 1 - ids[::-1].index(identity)  # a C scan, from the end
        except ValueError:
            return None

    def last_role(self) -> str | None:
        for role in reversed(self.roles):
            if role is not None:
                return role
        return None

    # --------------------------------------------------------------- writing

    def push_held(self, cell: Cell, identity: str | None, role: str | None) -> None:
        self.cells.append(cell)
        self.ids.append(identity)
        self.roles.append(role)
        if role is None:
            self.corrupt += 1

    def push(self, row: bytes, identity: str | None, role: str | None) -> None:
        """Append a row of known identity and role (this worker's own, or one read
        before); a row that does not decode is held as corrupt."""
        self.push_held(*_own(row, identity, role))

    def extend(self, rows: Sequence[Held]) -> None:
        """Append held rows (none corrupt), in one step."""
        self.cells.extend([cell for cell, _, _ in rows])
        self.ids.extend([identity for _, identity, _ in rows])
        self.roles.extend([role for _, _, role in rows])

    def push_stored(self, rows: Iterable[bytes], room_id: str) -> int:
        """Append rows read from Redis, decoding each; returns how many were corrupt."""
        return self.push_decoded(hold_all(rows, room_id))

    def push_decoded(self, held: Sequence[Held]) -> int:
        """Append rows ``decode_rows`` made; returns how many were corrupt."""
        if not held:
            return 0
        cells, ids, roles = zip(*held, strict=True)  # one pass, not three
        bad = roles.count(None)
        self.cells.extend(cells)
        self.ids.extend(ids)
        self.roles.extend(roles)
        self.corrupt += bad
        return bad

    def set_held(self, index: int, cell: Cell, identity: str | None, role: str | None) -> None:
        if self.roles[index] is None:
            self.corrupt -= 1
        if role is None:
            self.corrupt += 1
        self.cells[index] = cell
        self.ids[index] = identity
        self.roles[index] = role

    def set(self, index: int, row: bytes, identity: str | None, role: str | None) -> None:
        self.set_held(index, *_own(row, identity, role))

    def drop_front(self, count: int) -> None:
        if count <= 0:
            return
        if self.corrupt:
            self.corrupt -= sum(1 for role in self.roles[:count] if role is None)
        del self.cells[:count], self.ids[:count], self.roles[:count]

    def clear(self) -> None:
        self.cells.clear()
        self.ids.clear()
        self.roles.clear()
        self.corrupt = 0

    def trim(self, limit: int) -> int:
        """Mirror of the Lua trim: down to ``limit``, no leading orphan tool results,
        and a consolidation summary at the head stays there."""
        size = len(self.cells)
        if size <= limit:
            return 0
        keep_summary = limit > 1 and is_summary(self.ids[0], self.roles[0])
        summary = (self.cells[0], self.ids[0], self.roles[0])
        roles = self.roles
        drop = rows_to_drop(size, limit, lambda i: roles[i] == "tool", keep_first=keep_summary)
        self.drop_front(drop)
        if keep_summary and self.cells:
            self.set_held(0, *summary)
        return drop


def _own(row: bytes, identity: str | None, role: str | None) -> Held:
    """A row whose identity and role the caller knows, as a window holds it."""
    if role is None:
        return row, identity, None
    held = decode_cell(row)
    if held is None:
        return row, identity, None
    return held[0], identity, held[2]


@dataclass(slots=True)
class RoomState:
    """A window plus the room settings that travel with it.

    As the *synced* state it mirrors Redis exactly at ``(epoch, version)``, with
    ``head`` the absolute position of its first row; as a *view* it is the synced
    state with this worker's not-yet-confirmed writes applied on top.
    """

    window: Window = field(default_factory=Window)
    epoch: str = ""
    version: int = 0
    head: int = 0
    limit: int = 0  # 0: the manager's default (max_history)
    rebackfill: bool = False
    # A memory-only room's tracked reactions (shared by copies: there is one
    # copy of the room). With Redis they live in the room's reactions hash.
    reactions: RoomReactions | None = None
    # A memory-only room's deferred events: identity -> (expiry ms, event), in
    # arrival order. With Redis they live in the room's deferred hash.
    deferred: dict[str, list[tuple[int, bytes]]] | None = None
    tag: str = ""  # the lineage tag of ``version`` (see lua/_lib.lua), sent back with it

    @property
    def size(self) -> int:
        return len(self.window)

    def copy(self) -> RoomState:
        return RoomState(
            self.window.copy(),
            self.epoch,
            self.version,
            self.head,
            self.limit,
            self.rebackfill,
            self.reactions,
            self.deferred,
            self.tag,
        )


def apply_reply(
    state: RoomState,
    reply: SyncReply,
    room_id: str,
    own_rows: Sequence[Held] = (),
    decoded: Sequence[Held] | None = None,
) -> int:
    """Bring a synced state to the reply's version; returns corrupt rows seen.

    ``own_rows``: the rows this worker's write pushed (the reply omits them),
    held as its view holds them; ``decoded``: the reply's rows as
    ``decode_rows`` made them (None: decoded here).
    """
    state.tag = reply.tag
    if reply.kind == 0:
        state.version = reply.version
        return 0
    window = state.window
    if decoded is None:
        decoded = hold_all(reply.rows, room_id)
    bad = 0
    if reply.kind == 2:
        window.clear()
        bad = window.push_decoded(decoded)
        state.epoch = reply.epoch
    else:
        window.drop_front(min(reply.head - state.head, len(window)))
        for position, row in reply.replaced:
            cell, identity, role = hold(row, room_id)
            bad += role is None
            window.set_held(position - reply.head, cell, identity, role)
        bad += window.push_decoded(decoded)
        if reply.own_kept:
            window.extend(own_rows[len(own_rows) - reply.own_kept :])
    state.version = reply.version
    state.head = reply.head
    state.limit = reply.limit
    state.rebackfill = reply.rebackfill
    return bad
