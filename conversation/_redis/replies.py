"""Script replies: the Lua contract, parsed (see ``lua/_lib.lua``).

Every room script answers in one shape: a status, what kind of catch-up it
carries, and the rows and replaced positions that bring the caller's synced
state to the room's current version. The caller says where it stands with a
``SyncedState``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class SyncedState(Protocol):
    """Where a caller's mirror of a room stands: what every script is told."""

    @property
    def epoch(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def tag(self) -> str: ...

    @property
    def head(self) -> int: ...

    @property
    def size(self) -> int: ...


@dataclass(slots=True)
class SyncReply:
    """A parsed reply of any script (see ``lua/_lib.lua``)."""

    status: int
    kind: int  # 0 nothing changed, 1 incremental, 2 snapshot (3 on the wire: see parse)
    version: int
    tag: str = ""  # the lineage tag of ``version`` (see lua/_lib.lua), sent back with it
    epoch: str = ""
    head: int = 0
    limit: int = 0
    rebackfill: bool = False
    own_kept: int = 0
    replaced: list[tuple[int, bytes]] = field(default_factory=list)
    rows: list[bytes] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: list[Any], rows: list[Any] | None = None) -> SyncReply:
        """``rows``: the reply of the LRANGE sent in the script's MULTI, if one was;
        a snapshot of kind 3 (its header alone) takes its rows from it."""
        status, kind = int(raw[0]), int(raw[1])
        if kind == 0:
            return cls(status, kind, int(raw[2]), _text(raw[3]))
        if kind == 3:
            if rows is None:
                raise ValueError("a snapshot without its rows: no LRANGE went with the script")
            raw = [*raw[:8], *rows]
        if kind in (2, 3):
            return cls(
                status,
                2,
                int(raw[3]),
                _text(raw[4]),
                epoch=_text(raw[2]),
                head=int(raw[5]),
                limit=int(raw[6]),
                rebackfill=bool(int(raw[7])),
                rows=raw[8:],
            )
        count = int(raw[8])
        pairs = raw[9 : 9 + 2 * count]
        return cls(
            status,
            kind,
            int(raw[2]),
            _text(raw[3]),
            head=int(raw[4]),
            limit=int(raw[5]),
            rebackfill=bool(int(raw[6])),
            own_kept=int(raw[7]),
            replaced=[(int(pairs[i]), pairs[i + 1]) for i in range(0, len(pairs), 2)],
            rows=raw[9 + 2 * count :],
        )

    def payload_bytes(self) -> int:
        # map, not a generator: a snapshot has a thousand rows to count.
        return sum(map(len, self.rows)) + sum(len(row) for _, row in self.replaced)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def lineage(epoch: str, tag: str) -> str:
    """ARGV[1] of every room script: the epoch, and the tag of the caller's version."""
    return f"{epoch}/{tag}" if tag else epoch
