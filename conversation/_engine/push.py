"""``freshness="push"`` (SPEC §37): when a warm read may skip its round trip.

A room's synced mirror is *vouched for* while all of this holds:

* the listener's subscription to the room's notices was confirmed, in the
  listener's current generation (no reconnect since), BEFORE the sync that
  produced the mirror began: every change after that sync publishes a notice
  this worker reads;
* the listener's lease stands (a PING answered less than ``lease`` ago);
* no notice read since that sync began runs ahead of the mirror (another
  epoch, or a higher version): each one is checked against synced as it
  arrives, and kept until a sync covers it.

Anything else (a cold room, a subscription not confirmed yet, a reconnect, a
lapsed lease, a notice ahead) is a doubt, and the read makes the usual
one-round-trip sync, which vouches again. Writes of this worker not confirmed
yet also send the read through the sync, as in ``"sync"`` mode.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from .._redis.keys import KeySpace
from .._redis.notices import notices_for
from .._redis.retry import Backoff
from .rooms import Room, RoomTable

# Notices a room keeps unchecked before it drops the oldest. Within one epoch
# versions only grow, so the newest notices are the ones that matter.
_KEPT = 64


@dataclass(eq=False, slots=True)
class _Watch:
    channel: bytes
    # The generation whose confirmed subscription preceded the last sync.
    verified: int | None = None
    seen: int = 0  # notices read so far
    # (seen, epoch, version) of notices read that ran ahead of synced when they came.
    ahead: list[tuple[int, str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SyncMark:
    """What stood when a sync began (``Push.begin``)."""

    generation: int | None
    seen: int


class Push:
    """Subscriptions to the notices of the rooms this process holds, per room."""

    def __init__(self, redis: Any, rooms: RoomTable, keyspace: KeySpace, backoff: Backoff) -> None:
        self._rooms = rooms
        self._keyspace = keyspace
        self._listener = notices_for(redis, self._noticed, backoff)
        self._watches: dict[str, _Watch] = {}
        self._by_channel: dict[bytes, str] = {}
        _alive.add(self)

    def current(self, room: Room) -> bool:
        """Whether the room's view may be served without a round trip."""
        watch = self._watches.get(room.room_id)
        if watch is None or watch.ahead or room.pending or room.inflight is not None:
            return False
        generation = self._listener.vouched(watch.channel)
        return generation is not None and watch.verified == generation

    def begin(self, room: Room) -> SyncMark:
        """A sync of ``room`` is about to be sent (under its lock)."""
        watch = self._watches.get(room.room_id)
        if watch is None:
            channel = self._keyspace.notices(room.room_id)
            watch = self._watches[room.room_id] = _Watch(channel)
            self._by_channel[channel] = room.room_id
        self._listener.watch(watch.channel)
        return SyncMark(self._listener.vouched(watch.channel), watch.seen)

    def end(self, room: Room, mark: SyncMark) -> None:
        """The sync begun at ``mark`` brought synced to what Redis held."""
        watch = self._watches.get(room.room_id)
        if watch is None:
            return
        watch.verified = mark.generation
        # Notices read before the sync began are in what it brought; later ones
        # may be too (they raced its reply).
        watch.ahead = [
            n for n in watch.ahead if n[0] > mark.seen and not _covered(n[1], n[2], room)
        ]

    def drop(self, room_id: str) -> None:
        """The room left this process's memory: stop listening for it."""
        watch = self._watches.pop(room_id, None)
        if watch is not None:
            self._by_channel.pop(watch.channel, None)
            self._listener.unwatch(watch.channel)

    def rebind(self) -> None:
        """A new event loop took the manager over (or this is a forked child)."""
        self._listener.rebind()

    async def close(self) -> None:
        await self._listener.close()

    def _noticed(self, channel: bytes, epoch: str, version: int) -> None:
        room_id = self._by_channel.get(channel)
        watch = self._watches.get(room_id) if room_id is not None else None
        if watch is None:
            return
        watch.seen += 1
        room = self._rooms.get(room_id) if room_id is not None else None
        if room is not None and _covered(epoch, version, room):
            return
        watch.ahead.append((watch.seen, epoch, version))
        if len(watch.ahead) > _KEPT:
            del watch.ahead[0]

    def _forked(self) -> None:
        # The parent's subscriber socket is the parent's: never read it here.
        self._listener.rebind()


def _covered(epoch: str, version: int, room: Room) -> bool:
    synced = room.synced
    return version >= 0 and epoch == synced.epoch and version <= synced.version


_alive: weakref.WeakSet[Push] = weakref.WeakSet()


def _after_fork() -> None:
    for push in list(_alive):
        push._forked()


os.register_at_fork(after_in_child=_after_fork)
