"""``ConsolidationWorker``: watch rooms and fold those past the threshold, one replica per room."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import uuid
from collections.abc import (
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from .._errors import (
    ConfigurationError,
    ConversationError,
    require_positive_int,
)
from .._redis.keys import validate_room_id
from .._redis.retry import TRANSIENT_ERRORS
from .consolidator import Consolidator, HasConsolidation
from .records import ConsolidationResult, Summarizer

if TYPE_CHECKING:
    pass


logger = logging.getLogger(__name__)


_LLEN_CHUNK = 500


# --------------------------------------------------------------------- the worker


RoomSource = Iterable[str] | Callable[[], Iterable[str] | Awaitable[Iterable[str]]]


@dataclass(slots=True)
class WorkerStats:
    passes: int = 0
    checked: int = 0
    folds: int = 0
    leased_elsewhere: int = 0
    failures: int = 0
    #: Visits that found turns to fold but a ``wait_for_cursors`` reader behind them.
    waiting_for_cursors: int = 0


class ConsolidationWorker:
    """Watches rooms and consolidates those past the threshold, one replica per room.

    ``rooms`` lists the rooms to watch (an iterable, or a callable returning
    one, sync or async); by default every room in Redis (``SCAN`` of the meta
    keys), or every room in memory for a memory-only manager. Each pass syncs
    the candidates, and folds each room that passes the threshold while holding
    its lease (``SET NX PX``, renewed while held, released only by its holder),
    so two consolidation replicas never fold the same room at once.
    """

    def __init__(
        self,
        manager: HasConsolidation,
        summarize: Summarizer | None = None,
        *,
        rooms: RoomSource | None = None,
        interval: float = 5.0,
        concurrency: int = 4,
        keep_recent: int | None = None,
        room_context: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        require_positive_int("concurrency", concurrency)
        if interval <= 0:
            raise ConfigurationError("interval must be positive")
        self._consolidator: Consolidator = manager._consolidation
        self._engine = self._consolidator._engine
        self._summarize = summarize
        self._rooms = rooms
        self._interval = interval
        self._concurrency = concurrency
        self._keep_recent = keep_recent
        self._room_context = room_context
        self.name = name or f"consolidator-{uuid.uuid4().hex[:8]}"
        self.stats = WorkerStats()
        # Rooms held back by wait_for_cursors, warned about once until they fold.
        self._held_back: set[str] = set()
        # A worker compiles its prompt template now, at startup: a broken template
        # of yours fails here, and the first fold does not compile it mid-pass.
        self._consolidator.prepare_renderer()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Pass over the rooms every ``interval`` seconds until ``stop`` is set."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.run_once()
            except (*TRANSIENT_ERRORS, ConversationError) as exc:
                logger.warning("consolidation pass failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await stop.wait()

    async def run_once(self) -> list[ConsolidationResult]:
        """One pass: every watched room that passes the threshold is consolidated."""
        self.stats.passes += 1
        candidates = await self._candidates(await self._room_ids())
        semaphore = asyncio.Semaphore(self._concurrency)

        async def visit(room_id: str) -> ConsolidationResult | None:
            async with semaphore:
                return await self._visit(room_id)

        results = await asyncio.gather(*(visit(room_id) for room_id in candidates))
        return [result for result in results if result is not None]

    async def _visit(self, room_id: str) -> ConsolidationResult | None:
        self.stats.checked += 1
        with self._engine.visit(room_id):
            return await self._check_and_fold(room_id)

    async def _check_and_fold(self, room_id: str) -> ConsolidationResult | None:
        consolidator, engine = self._consolidator, self._engine
        try:
            await engine.ensure_fresh(room_id)
            await consolidator.prepare(room_id)
            if not consolidator.should_consolidate(room_id):
                return None
            async with consolidator.lease(room_id, self.name) as held:
                if not held:
                    self.stats.leased_elsewhere += 1
                    return None
                # Another replica may have folded it just before we got the lease.
                await engine.ensure_fresh(room_id)
                await consolidator.prepare(room_id)
                if not consolidator.should_consolidate(room_id):
                    return None
                result = await consolidator.consolidate(
                    room_id,
                    self._summarize,
                    keep_recent=self._keep_recent,
                    room_context=self._room_context,
                )
        # RedisError: a key of the wrong type (WRONGTYPE) or another server refusal
        # in one room must not end the pass for the others.
        except (*TRANSIENT_ERRORS, ConversationError, RedisError) as exc:
            self.stats.failures += 1
            cause = exc.__cause__
            logger.warning(
                "room %s: consolidation failed: %s%s",
                room_id,
                exc,
                f" (caused by {type(cause).__name__})" if cause is not None else "",
            )
            return None
        if result.outcome == "waiting_for_cursors":
            self.stats.waiting_for_cursors += 1
            if room_id not in self._held_back:
                self._held_back.add(room_id)
                logger.warning(
                    "room %s: consolidation waits for cursor(s) %s (not set, behind, or "
                    "of another epoch); no fold until they read on",
                    room_id,
                    list(consolidator.config.wait_for_cursors),
                )
        else:
            self._held_back.discard(room_id)
        if result.outcome == "folded":
            self.stats.folds += 1
        return result

    async def _room_ids(self) -> list[str]:
        source = self._rooms
        if source is not None:
            got = source() if callable(source) else source
            if inspect.isawaitable(got):
                got = await got
            return list(dict.fromkeys(got))
        store = self._engine.store
        if store is None:
            return self._engine.known_rooms()
        keyspace = self._engine.key_space()
        found: set[str] = set()
        # On a RedisCluster, redis-py's scan_iter walks every primary, each to its end.
        async for key in store.redis.scan_iter(match=keyspace.meta_pattern(), count=1000):
            text = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            room_id = keyspace.room_from_meta_key(text)
            if room_id is not None:
                found.add(room_id)
        return sorted(found)

    async def _candidates(self, room_ids: Sequence[str]) -> list[str]:
        """Skip, with one LLEN each (pipelined), rooms too short to have anything to fold."""
        store = self._engine.store
        if store is None or not room_ids:
            return list(room_ids)
        config = self._consolidator.config
        keep = config.keep_recent if self._keep_recent is None else self._keep_recent
        floor = keep + config.min_fold
        keyspace = self._engine.key_space()
        valid = []
        for room_id in room_ids:
            try:
                valid.append(validate_room_id(room_id))
            except ConversationError:
                logger.warning("skipping an invalid room id from the room source")
        lengths: list[object] = []
        for start in range(0, len(valid), _LLEN_CHUNK):
            pipe = store.redis.pipeline(transaction=False)
            for room_id in valid[start : start + _LLEN_CHUNK]:
                pipe.llen(keyspace.room(room_id).window)
            # One room's WRONGTYPE comes back in its own slot, not as the pass's error.
            async with asyncio.timeout(self._engine.settings.command_timeout):
                lengths.extend(await pipe.execute(raise_on_error=False))
        candidates = []
        for room_id, length in zip(valid, lengths, strict=True):
            if isinstance(length, Exception):
                self.stats.failures += 1
                logger.warning("room %s: skipped by consolidation: %s", room_id, length)
            elif isinstance(length, int) and length >= floor:
                candidates.append(room_id)
        return candidates
