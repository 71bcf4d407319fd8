"""The engine core as the parts above the facade reach it (consolidation).

One object with the rooms, the backend and the store, and the few operations
they need, so that nothing above the core reads the manager's private state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from .._entries import Entry, encode
from .._redis.keys import KeySpace
from .._redis.replies import SyncReply
from .._redis.rooms import RoomStore
from .._stats import Stats
from .loop import LoopBinding
from .replicator import Backend
from .rooms import Room, RoomTable
from .settings import Settings
from .window import RoomState


@dataclass(eq=False, slots=True)
class Core:
    rooms: RoomTable
    backend: Backend
    store: RoomStore | None  # None: memory only
    stats: Stats
    settings: Settings
    loop: LoopBinding
    max_entry_bytes: int

    @property
    def keyspace(self) -> KeySpace:
        return self.rooms.keyspace

    def key_space(self) -> KeySpace:
        return self.rooms.keyspace

    def room(self, room_id: str) -> Room:
        self.loop.current()  # refuses a caller on another live loop, reads included
        return self.rooms.open(room_id)

    async def ensure_fresh(self, room_id: str) -> None:
        """Wait for this worker's writes to the room, then match Redis exactly."""
        await self.backend.ensure_fresh(self.room(room_id))

    def archive_key(self, room_id: str) -> str:
        return self.rooms.keyspace.archive(room_id)

    def lease_key(self, room_id: str) -> str:
        return self.rooms.keyspace.lease(room_id)

    def limit(self, state: RoomState) -> int:
        return state.limit or self.settings.max_history

    def encode(self, entry: Entry) -> bytes:
        return encode(entry, self.max_entry_bytes)

    async def absorb(self, room: Room, reply: SyncReply) -> None:
        """Bring the room's synced state to a script reply and rebuild its view."""
        await self.backend.absorb(room, reply)
        self.backend.rebuild_view(room)

    def count(self, counter: str) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def known_rooms(self) -> list[str]:
        return self.rooms.ids()

    @contextlib.contextmanager
    def visit(self, room_id: str) -> Iterator[None]:
        """A worker's visit is not a use of the room.

        A room this process did not hold is forgotten again once idle, and a room
        it held keeps its last use, so ``reap_stale`` still frees it. Memory-only
        managers keep everything: their memory is the only copy.
        """
        before = self.rooms.get(room_id)
        last_used = before.last_used if before is not None else None
        try:
            yield
        finally:
            room = self.rooms.get(room_id)
            if room is not None and self.store is not None:
                if before is None and room.idle():
                    self.rooms.forget(room_id)
                elif room is before and last_used is not None:
                    room.last_used = last_used
