"""One room's state in this process, and the table of rooms the process holds."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .._entries import Cell
from .._redis.keys import KeySpace, RoomKeys, validate_room_id
from .ops import Op
from .window import RoomState


@dataclass(eq=False, slots=True)
class Batch:
    """Writes sent together, frozen until Redis confirms them."""

    ops: list[Op]
    token: str
    durable_deadline: float | None


@dataclass(frozen=True, slots=True)
class RoomInfo:
    """One room of this process's working set (``ConversationManager.rooms()``)."""

    room_id: str
    #: Entries in this worker's view of the window (its own unconfirmed writes included).
    entries: int
    #: Writes queued or in flight to Redis.
    pending_writes: int
    #: Seconds since this process last used the room (what ``reap_stale`` compares).
    idle_seconds: float
    #: The Redis version this worker last synced to (0: never synced).
    version: int


@dataclass(eq=False, slots=True)
class Room:
    room_id: str
    keys: RoomKeys
    synced: RoomState = field(default_factory=RoomState)
    view: RoomState = field(default_factory=RoomState)
    pending: deque[Op] = field(default_factory=deque)
    inflight: Batch | None = None
    task: asyncio.Task[None] | None = None
    # The op an awaiting caller is persisting in its own task (see
    # Replicator.persist_inline); while set, writes queue behind it and no
    # persist task is started.
    inline: Op | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    # Whether synced took in a change the view has not seen (another worker's
    # write, a replay, a reload): only then is the view rebuilt from synced plus
    # the queue. A reply that holds nothing but our own effect leaves the view
    # exact, which keeps draining a long queue linear.
    view_stale: bool = False
    # Consolidation's token estimate of each row object in the window, by id (the
    # entry holds the row, so the id is not reused while it is here): kept with the
    # room so it goes when the room does.
    token_estimates: dict[int, tuple[Cell, int]] = field(default_factory=dict)
    # The caller-chosen keys of this worker's appends that Redis confirmed, newest
    # last (a bounded few): a re-send of one is a recall of a stored write, which
    # the view must not show a second time while the re-send is in flight.
    confirmed_keys: dict[str, None] = field(default_factory=dict)

    def idle(self) -> bool:
        """Nothing queued and nothing being persisted: forgetting it loses nothing."""
        return not self.pending and (self.task is None or self.task.done())


class RoomTable:
    """The rooms this process holds in memory, by id."""

    def __init__(self, keyspace: KeySpace) -> None:
        self.keyspace = keyspace
        self._rooms: dict[str, Room] = {}
        # Told the id of every room that leaves (freshness="push" unsubscribes it).
        self.on_forget: Callable[[str], None] | None = None

    def __len__(self) -> int:
        return len(self._rooms)

    def __iter__(self) -> Iterator[Room]:
        return iter(list(self._rooms.values()))

    def ids(self) -> list[str]:
        return list(self._rooms)

    def get(self, room_id: str) -> Room | None:
        return self._rooms.get(room_id)

    def open(self, room_id: str, *, touch: bool = True) -> Room:
        """The room, created empty (and its id validated) on first use."""
        room = self._rooms.get(room_id)
        if room is None:
            validate_room_id(room_id)
            room = Room(room_id, self.keyspace.room(room_id))
            self._rooms[room_id] = room
        if touch:
            room.last_used = time.monotonic()
        return room

    def forget(self, room_id: str) -> None:
        if self._rooms.pop(room_id, None) is not None and self.on_forget is not None:
            self.on_forget(room_id)

    def reap(self, max_idle_seconds: float) -> int:
        """Forget the idle rooms unused for that long; how many went."""
        cutoff = time.monotonic() - max_idle_seconds
        stale = [r.room_id for r in self._rooms.values() if r.last_used < cutoff and r.idle()]
        for room_id in stale:
            del self._rooms[room_id]
            if self.on_forget is not None:
                self.on_forget(room_id)
        return len(stale)

    def working_set(self) -> list[RoomInfo]:
        """Every room held, most recently used first."""
        now = time.monotonic()
        infos = [
            RoomInfo(
                room.room_id,
                len(room.view.window) - room.view.window.corrupt,
                len(room.pending),
                max(0.0, now - room.last_used),
                room.synced.version,
            )
            for room in self._rooms.values()
        ]
        infos.sort(key=lambda info: (info.idle_seconds, info.room_id))
        return infos

    def pending_writes(self) -> int:
        return sum(len(room.pending) for room in self._rooms.values())

    def unflushed(self) -> dict[str, int]:
        return {room.room_id: len(room.pending) for room in self._rooms.values() if room.pending}
