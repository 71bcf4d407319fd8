"""Reading rooms for the operator tools: snapshots through the engine's sync script."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from .._changes.feed import Batch, ChangeFeed
from .._engine.window import RoomState
from .._redis.keys import KeySpace
from .._redis.rooms import RoomStore
from .._stats import Stats
from .targets import RedisTarget
from .terminal import Progress

logger = logging.getLogger(__name__)
# ------------------------------------------------------------ reading rooms


@dataclass
class Snapshot:
    """A room as Redis holds it at one version (from the engine's ``sync`` script)."""

    room: str
    exists: bool
    epoch: str = ""
    version: int = 0
    head: int = 0
    limit: int = 0
    rebackfill: bool = False
    rows: list[bytes] = field(default_factory=list)
    tag: str = ""  # the lineage tag of ``version`` (see lua/_lib.lua)

    def entries(self) -> list[tuple[int, dict[str, Any] | None]]:
        """(absolute position, decoded entry or None when corrupt) for every row."""
        out: list[tuple[int, dict[str, Any] | None]] = []
        for offset, row in enumerate(self.rows):
            out.append((self.head + offset, decode_entry(row)))
        return out

    def messages(self) -> list[dict[str, Any]]:
        """The window as OpenAI-chat messages (identity stripped, corrupt rows skipped)."""
        messages = []
        for _, entry in self.entries():
            if entry is not None:
                entry.pop("message_id", None)
                messages.append(entry)
        return messages


def decode_entry(row: bytes) -> dict[str, Any] | None:
    try:
        entry = orjson.loads(row)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and "role" in entry else None


class RoomReader:
    """Reads and follows rooms through the engine's ``sync`` Lua script."""

    def __init__(self, target: RedisTarget, prefix: str) -> None:
        self.target = target
        self.keyspace = KeySpace(prefix)
        self._store = RoomStore(
            target.client, Stats(), ttl_ms=0, default_limit=100, command_timeout=30.0
        )
        self._feed = ChangeFeed(self._store, self.keyspace, Stats())

    async def snapshot(self, room: str) -> Snapshot:
        state = RoomState()
        reply = await self._store.sync(self.keyspace.room(room), state)
        if reply.kind != 2 or not reply.epoch:
            return Snapshot(room, exists=False)
        return Snapshot(
            room,
            exists=True,
            epoch=reply.epoch,
            version=reply.version,
            head=reply.head,
            limit=reply.limit,
            rebackfill=reply.rebackfill,
            rows=list(reply.rows),
            tag=reply.tag,
        )

    async def read_changes(self, room: str, cursor: str | None) -> Batch:
        """The room's change feed after ``cursor`` (what ``read_since`` reads)."""
        return await self._feed.read(room, cursor)

    async def wait_idle(self) -> None:
        await self._store.wait_idle()


@dataclass
class RoomSummary:
    room: str
    entries: int
    version: int
    limit: int
    rebackfill: bool
    ttl_ms: int


async def list_rooms(
    target: RedisTarget, prefix: str, match: str = "*", progress: Progress | None = None
) -> list[str]:
    keyspace = KeySpace(prefix)
    rooms = set()
    async for key in target.scan(keyspace.meta_pattern(match), progress):
        room = keyspace.room_from_meta_key(key.decode("utf-8", "replace"))
        if room is not None:
            rooms.add(room)
    return sorted(rooms)


async def summarise_rooms(
    target: RedisTarget, prefix: str, rooms: Sequence[str], progress: Progress | None = None
) -> list[RoomSummary]:
    keyspace = KeySpace(prefix)
    out: list[RoomSummary] = []
    for start in range(0, len(rooms), 200):
        chunk = rooms[start : start + 200]
        pipe = target.client.pipeline(transaction=False)
        for room in chunk:
            keys = keyspace.room(room)
            pipe.hmget(keys.meta, "version", "limit", "rebackfill")
            pipe.llen(keys.window)
            pipe.pttl(keys.meta)
        replies = await pipe.execute()
        for index, room in enumerate(chunk):
            meta, length, ttl = replies[3 * index : 3 * index + 3]
            version, limit, rebackfill = (as_int(v) for v in meta)
            out.append(RoomSummary(room, int(length), version, limit, bool(rebackfill), int(ttl)))
        if progress is not None:
            progress.update(f"reading rooms… {len(out)}/{len(rooms)}")
    return out


def as_int(value: object) -> int:
    if not isinstance(value, (bytes, str, int)):
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


def ttl_text(ttl_ms: int) -> str:
    if ttl_ms == -1:
        return "none"
    if ttl_ms < 0:
        return "gone"
    seconds = ttl_ms // 1000
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def limit_text(limit: int) -> str:
    return str(limit) if limit > 0 else "default"
