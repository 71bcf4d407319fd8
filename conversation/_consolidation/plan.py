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
    first_text,
    is_summary,
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


def _row_tokens(row: bytes) -> int:
    return estimate_tokens(orjson.loads(row))


def window_tokens(room: Room, rows: Sequence[bytes]) -> int:
    """The rows' token estimates, each row parsed once while it is in the window.

    Rows are immutable ``bytes`` that a window keeps as long as they are current
    (an edit puts a new object in), so an estimate stays right for as long as its
    object is there; the room remembers the rows of its last check only.
    """
    known = room.token_estimates
    counts: dict[int, tuple[bytes, int]] = {}
    total = 0
    for row in rows:
        hit = known.get(id(row))
        count = hit[1] if hit is not None and hit[0] is row else _row_tokens(row)
        counts[id(row)] = (row, count)
        total += count
    room.token_estimates = counts
    return total


async def estimate_room_tokens(room: Room, rows: Sequence[bytes]) -> None:
    """Estimate the rows not seen yet, yielding to the loop between slices."""
    known = room.token_estimates
    done = 0
    for row in rows:
        hit = known.get(id(row))
        if hit is not None and hit[0] is row:
            continue
        known[id(row)] = (row, _row_tokens(row))
        done += len(row)
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


def plan_fold(
    state: RoomState,
    config: ConsolidationConfig,
    keep_recent: int,
    read_limit: int | None = None,
) -> FoldPlan | None:
    """``read_limit``: fold none of the window's rows from this index on (rows the
    ``wait_for_cursors`` readers have not read); None: no such limit."""
    window = state.window
    size, roles, ids, rows = len(window), window.roles, window.ids, window.rows
    start, previous_id, previous_text, seq = 0, None, None, 1
    if size and is_summary(ids[0], roles[0]):
        start, previous_id = 1, ids[0]
        previous_text = _summary_text(rows[0], config.summary_prefix)
        seq = _summary_seq(previous_id) + 1
    end = size - keep_recent
    if read_limit is not None:
        end = min(end, read_limit)
    # Never split a tool-call group: results stay with the call they answer...
    while start < end < size and roles[end] == "tool":
        end -= 1
    # ...and a call still waiting for its results stays where they will land.
    while end > start and roles[end - 1] == "assistant" and _has_tool_calls(rows[end - 1]):
        end -= 1
    if end <= start:
        return None
    keep = -1
    if config.pin_first_user:
        keep = next((i for i in range(start, end) if roles[i] == "user"), -1)
    archived = [i for i in range(start, end) if i != keep and roles[i] is not None]
    corrupt = end - start - len(archived) - (1 if keep >= 0 else 0)
    if len(archived) < config.min_fold:
        return None
    return FoldPlan(
        epoch=state.epoch,
        head=state.head,
        version=state.version,
        tag=state.tag,
        rows=rows[:end],
        keep=keep,
        keep_meta=(ids[keep], roles[keep]) if keep >= 0 else (None, None),
        archived=archived,
        folded=[rows[i] for i in archived],
        corrupt=corrupt,
        previous_id=previous_id,
        previous_text=previous_text,
        seq=seq,
    )


def _has_tool_calls(row: bytes) -> bool:
    if b'"tool_calls"' not in row:  # a byte scan spares parsing a row of images
        return False
    try:
        entry = orjson.loads(row)
    except orjson.JSONDecodeError:
        return False
    return isinstance(entry, dict) and bool(entry.get("tool_calls"))


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
