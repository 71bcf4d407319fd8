"""The room archive's layout: a header, one element per folded row, a commit per fold."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import (
    Awaitable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .records import ArchiveBatch

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


#: Bytes of archive elements read back per LRANGE (about; at least one element).
_ARCHIVE_READ_BYTES = 1024 * 1024


class ArchiveMoved(Exception):
    """Folds were dropped from the archive's front while it was being read."""


#: The first element of an archive written by this engine (see lua/_lib.lua).
_ARCHIVE_MAGIC = b"~a2|"


@dataclass(frozen=True, slots=True)
class _ArchiveHeader:
    dropped: int
    committed: int
    ledger: tuple[int, ...]  # elements of each committed fold, oldest first

    @classmethod
    def parse(cls, raw: bytes | None) -> _ArchiveHeader | None:
        if raw is None or not raw.startswith(_ARCHIVE_MAGIC):
            return None
        fields = raw[len(_ARCHIVE_MAGIC) :].split(b"|", 7)
        try:
            ledger = tuple(int(entry.split(b":")[0]) for entry in fields[7].split(b",") if entry)
            return cls(int(fields[0]), int(fields[1]), ledger)
        except (IndexError, ValueError):
            return None


async def read_archive(redis: Any, key: str, timeout: float | None) -> list[bytes]:
    """The elements of the archive's committed folds, oldest first.

    Read in slices of about ``_ARCHIVE_READ_BYTES`` (the slice length adapts to the
    sizes seen), so no single command makes Redis copy much of the archive. Rows
    staged by a fold still in progress (or abandoned) lie after the committed folds
    and are not read. Elements only ever leave from the front (whole folds, counted
    in the header), so a header that counts the same drops after the last slice
    proves every slice saw the same positions.
    """
    first = await _bounded(redis.lindex(key, 0), timeout)
    header = _ArchiveHeader.parse(first)
    if header is None:
        if first is None:
            return []
        # An archive of the previous engine: each record is one whole fold.
        return list(await _bounded(redis.lrange(key, 0, -1), timeout))
    elements: list[bytes] = []
    start, count = 1, 16
    while start <= header.committed:
        stop = min(start + count - 1, header.committed)
        chunk: list[bytes] = await _bounded(redis.lrange(key, start, stop), timeout)
        if not chunk:
            break
        elements.extend(chunk)
        start += len(chunk)
        size = sum(map(len, chunk))
        if size > _ARCHIVE_READ_BYTES:
            count = max(1, count // 2)
        elif size < _ARCHIVE_READ_BYTES // 4:
            count = min(1024, count * 2)
    after = _ArchiveHeader.parse(await _bounded(redis.lindex(key, 0), timeout))
    if (
        after is None
        or after.dropped != header.dropped
        or after.ledger[: len(header.ledger)] != header.ledger
        or len(elements) != header.committed
    ):
        raise ArchiveMoved
    return elements


@dataclass(slots=True)
class ArchiveAssembler:
    """Folds from archive elements, each checked against what its commit record says.

    A fold is its archived rows, one element each, then its commit record (an object
    with a ``seq`` and no ``role``, unlike any row), which counts the rows before it;
    a record of the previous engine is a commit record with its turns inline. Elements that
    do not add up to a fold are skipped (their sizes are in ``corrupt``). Each
    ``add`` parses one element, so a caller can yield between them.
    """

    batches: list[ArchiveBatch] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    _turns: list[Any] = field(default_factory=list)
    _bytes: int = 0
    _broken: bool = False

    def add(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or "seq" not in data or "role" in data:
            self._bytes += len(raw)
            if isinstance(data, dict):
                self._turns.append(data)
            else:
                self._broken = True
            return
        turns, size, broken = self._turns, self._bytes + len(raw), self._broken
        self._turns, self._bytes, self._broken = [], 0, False
        if "rows" not in data and isinstance(data.get("turns"), list):  # the previous engine
            if turns:
                self.corrupt.append(size - len(raw))
                size = len(raw)
            turns, broken = data["turns"], False
        elif data.get("rows") != len(turns):
            broken = True
        batch = None if broken else batch_of(data, turns)
        if batch is None:
            self.corrupt.append(size)
        else:
            self.batches.append(batch)

    def finish(self) -> None:
        """Rows left over belong to no complete fold."""
        if self._turns or self._broken:
            self.corrupt.append(self._bytes)
        self._turns, self._bytes, self._broken = [], 0, False


def batch_of(data: Mapping[str, Any], turns: list[Any]) -> ArchiveBatch | None:
    if not all(isinstance(turn, dict) for turn in turns):
        return None
    try:
        return ArchiveBatch(
            seq=int(data["seq"]),
            summary_id=str(data["summary_id"]),
            summary=str(data["summary"]),
            replaces=None if data.get("replaces") is None else str(data["replaces"]),
            folded_at=str(data.get("folded_at", "")),
            turns=turns,
            corrupt_rows=int(data.get("corrupt_rows", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None


async def _bounded(command: Awaitable[Any], timeout: float | None) -> Any:
    """One Redis command, bounded like every other by the manager's command_timeout."""
    async with asyncio.timeout(timeout):
        return await command
