"""Which turns a fold takes: token estimates, the plan, and reading summary entries."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import (
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from .._budget import estimate_tokens
from .._engine.window import RoomState
from .._entries import (
    MARKER_RE,
    SUMMARY_ID_PREFIX,
    Cell,
    cell_bytes,
    first_text,
    is_summary,
    message_of,
    row_of,
)
from .config import ConsolidationConfig

if TYPE_CHECKING:
    from .._engine.rooms import Room


logger = logging.getLogger(__name__)


#: Bytes of rows one script call of a fold copies to the archive (about: a single
#: bigger row gets a call alone). Every row is its own archive element.
ARCHIVE_CALL_BYTES = 1024 * 1024
#: Above this many bytes a plan's digest is computed in a thread (hashlib lets go of
#: the GIL), so a window of images never stalls the loop while it is hashed.
_INLINE_DIGEST_BYTES = 256 * 1024
#: Token estimates of this many bytes of rows are computed between two yields.
TOKEN_SLICE_BYTES = 256 * 1024


# ------------------------------------------------------------------------ tokens


def _cell_tokens(cell: Cell, role: str) -> int:
    return estimate_tokens(message_of(cell, role))


def window_tokens(room: Room, cells: Sequence[tuple[Cell, str]]) -> int:
    """The rows' token estimates, each row estimated once while it is in the window.

    A window's cells are immutable and kept as long as their row is current (an
    edit puts a new object in), so an estimate stays right for as long as its
    object is there; the room remembers the cells of its last check only.
    """
    known = room.token_estimates
    counts: dict[int, tuple[Cell, int]] = {}
    total = 0
    for cell, role in cells:
        hit = known.get(id(cell))
        count = hit[1] if hit is not None and hit[0] is cell else _cell_tokens(cell, role)
        counts[id(cell)] = (cell, count)
        total += count
    room.token_estimates = counts
    return total


async def estimate_room_tokens(room: Room, cells: Sequence[tuple[Cell, str]]) -> None:
    """Estimate the rows not seen yet, yielding to the loop between slices."""
    known = room.token_estimates
    done = 0
    for cell, role in cells:
        hit = known.get(id(cell))
        if hit is not None and hit[0] is cell:
            continue
        known[id(cell)] = (cell, _cell_tokens(cell, role))
        done += cell_bytes(cell)
        if done >= TOKEN_SLICE_BYTES:
            done = 0
            await asyncio.sleep(0)


# ---------------------------------------------------------------------- the plan


@dataclass(slots=True)
class FoldPlan:
    """Which head rows a fold removes, planned on one exact state of the window."""

    epoch: str
    head: int
    version: int  # the synced version the plan was made on (the fold checks the log since)
    tag: str  # the lineage tag of that version: the fold refuses another history's
    rows: list[bytes]  # window[0:n]: the previous summary, folded turns, the pinned turn
    keep: int  # index in rows of the pinned turn kept after the summary, or -1
    keep_meta: tuple[str | None, str | None]
    archived: list[int]  # indexes in rows of the healthy turns leaving the window
    folded: list[bytes]  # those rows (summarised and archived)
    corrupt: int
    previous_id: str | None
    previous_text: str | None
    seq: int

    def digest(self) -> bytes:
        """SHA1 of ``keep`` and the framed rows ("<length>:<row>"), hashed row by row."""
        hasher = hashlib.sha1(b"%d|" % self.keep)
        for row in self.rows:
            hasher.update(b"%d:" % len(row))
            hasher.update(row)
        return hasher.digest()

    async def digest_async(self) -> bytes:
        if sum(map(len, self.rows)) <= _INLINE_DIGEST_BYTES:
            return self.digest()
        return await asyncio.to_thread(self.digest)

    def calls(self) -> list[list[int]]:
        """The archived rows' indexes, about ``ARCHIVE_CALL_BYTES`` of them per script call.

        The last call is the fold script itself; the others stage rows before it.
        """
        calls: list[list[int]] = [[]]
        size = 0
        for index in self.archived:
            cost = len(self.rows[index])
            if calls[-1] and size + cost > ARCHIVE_CALL_BYTES:
                calls.append([])
                size = 0
            calls[-1].append(index)
            size += cost
        return calls


@dataclass(frozen=True, slots=True)
class _Bounds:
    start: int  # 1 past a previous summary at the head, else 0
    end: int  # the first row that stays
    keep: int  # the pinned turn, or -1
    archived: list[int]


def _bounds(
    state: RoomState, config: ConsolidationConfig, keep_recent: int, read_limit: int | None
) -> _Bounds | None:
    window = state.window
    size, roles, ids = len(window), window.roles, window.ids
    start = 1 if size and is_summary(ids[0], roles[0]) else 0
    end = size - keep_recent
    if read_limit is not None:
        end = min(end, read_limit)
    # Never split a tool-call group: results stay with the call they answer...
    while start < end < size and roles[end] == "tool":
        end -= 1
    # ...and a call still waiting for its results stays where they will land.
    while end > start and roles[end - 1] == "assistant" and window.has_tool_calls(end - 1):
        end -= 1
    if end <= start:
        return None
    keep = -1
    if config.pin_first_user:
        keep = next((i for i in range(start, end) if roles[i] == "user"), -1)
    archived = [i for i in range(start, end) if i != keep and roles[i] is not None]
    if len(archived) < config.min_fold:
        return None
    return _Bounds(start, end, keep, archived)


def can_fold(state: RoomState, config: ConsolidationConfig, keep_recent: int) -> bool:
    """Whether ``plan_fold`` would make a plan (without writing any row's bytes)."""
    return _bounds(state, config, keep_recent, None) is not None


#: Bytes of rows a plan writes between two yields to the loop (see ``plan_fold``).
PLAN_SLICE_BYTES = 1024 * 1024


async def plan_fold(
    state: RoomState,
    config: ConsolidationConfig,
    keep_recent: int,
    read_limit: int | None = None,
) -> FoldPlan | None:
    """``read_limit``: fold none of the window's rows from this index on (rows the
    ``wait_for_cursors`` readers have not read); None: no such limit.

    The window holds rows decoded, so the plan writes their bytes again: a window
    of images is a hundred megabytes of ``orjson.dumps``, done in slices that
    yield to the loop, from the rows as they stood when the plan was called (the
    held rows are immutable, so the lists are copied, not the rows)."""
    bounds = _bounds(state, config, keep_recent, read_limit)
    if bounds is None:
        return None
    window = state.window
    start, end, keep, archived = bounds.start, bounds.end, bounds.keep, bounds.archived
    previous_id, previous_text, seq = None, None, 1
    if start:
        previous_id = window.ids[0]
        previous_text = _summary_text(window.row(0), config.summary_prefix)
        seq = _summary_seq(previous_id) + 1
    epoch, head, version, tag = state.epoch, state.head, state.version, state.tag
    cells, ids, roles = window.cells[:end], window.ids[:end], window.roles[:end]
    rows: list[bytes] = []
    written = 0
    for cell, identity, role in zip(cells, ids, roles, strict=True):
        rows.append(row_of(cell, identity, role))
        written += len(rows[-1])
        if written > PLAN_SLICE_BYTES:
            written = 0
            await asyncio.sleep(0)
    return FoldPlan(
        epoch=epoch,
        head=head,
        version=version,
        tag=tag,
        rows=rows,
        keep=keep,
        keep_meta=(ids[keep], roles[keep]) if keep >= 0 else (None, None),
        archived=archived,
        folded=[rows[i] for i in archived],
        corrupt=end - start - len(archived) - (1 if keep >= 0 else 0),
        previous_id=previous_id,
        previous_text=previous_text,
        seq=seq,
    )


def _summary_text(row: bytes, prefix: str) -> str | None:
    try:
        content = orjson.loads(row).get("content")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    text = first_text(content)
    if text is None:
        return None
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _summary_seq(identity: str | None) -> int:
    try:
        return int((identity or "")[len(SUMMARY_ID_PREFIX) :])
    except ValueError:
        return 0


def clean_summary(text: str, max_chars: int) -> str:
    # A bracketed marker in the summary could pass for the message it names.
    text = MARKER_RE.sub(lambda match: f"(msg {match.group(1).strip()})", text.strip())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text
