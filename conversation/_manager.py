"""``ConversationManager``: the public face of the engine.

It validates input, turns each call into a write (``_engine.ops``) or a read of
a room's view, and hands writes to the backend: the ``Replicator``, which
mirrors rooms to Redis, or the memory-only backend. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Hashable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, Protocol, overload

from ._budget import fit_to_budget
from ._changes.cursor import decode_cursor
from ._changes.feed import Change, ChangeFeed
from ._changes.named import NamedCursors
from ._consolidation.config import ConsolidationConfig
from ._consolidation.consolidator import Consolidator
from ._consolidation.records import ArchiveBatch, ConsolidationResult, Summarizer
from ._deferred import MAX_DEFERRED_EVENT_BYTES
from ._engine.chains import Chains
from ._engine.core import Core
from ._engine.loop import LoopBinding, running_loop
from ._engine.ops import BackfillOp, ClearOp, EditOp, LimitOp, Op, ReactionOp, Row
from ._engine.push import Push
from ._engine.replicator import Backend, Deferral, MemoryBackend, Replicator
from ._engine.rooms import Room, RoomInfo, RoomTable
from ._engine.settings import checked_settings
from ._engine.writes import Writes, limit_write
from ._entries import (
    Entry,
)
from ._errors import (
    ConfigurationError,
    DrainTimeout,
    PersistError,
    describe_error,
)
from ._redis.keys import KeySpace, validate_room_id
from ._redis.notices import supports_push
from ._redis.retry import TRANSIENT_ERRORS
from ._redis.rooms import RoomStore
from ._stats import Stats
from ._transfer.rooms import export_room, import_room, parse_room_export

logger = logging.getLogger(__name__)


class Renderer(Protocol):
    def render(self, room_context: Mapping[str, Any] | None = None) -> str: ...

    def render_async(self, room_context: Mapping[str, Any] | None = None) -> Awaitable[str]: ...


class ConversationManager:
    """Per-room sliding windows of chat turns, shared by worker processes through Redis.

    ``redis`` is any ``redis.asyncio`` client (``Redis``, ``RedisCluster``, or
    ``Sentinel.master_for``) created with ``decode_responses=False``; ``None``
    keeps everything in this process's memory.

    ``min_replicas=N`` acknowledges a write only once ``WAIT N replica_timeout_ms``
    says N replicas hold it; until then it is retried under its idempotency token
    (``ReplicationTimeout``, counted as ``unreplicated_writes``). See
    ``docs/scaling.md`` for what that guarantees across a failover.

    ``freshness="push"``: the worker subscribes to the change notices of the rooms
    it holds, and a warm ``get_messages_async`` makes no round trip while that
    subscription is known healthy (README, "Freshness"); ``"sync"`` (the default)
    makes one on every read. ``ensure_fresh_from_redis`` always makes its round trip.
    """

    def __init__(
        self,
        prompt_renderer: Renderer | None,
        max_history: int = 100,
        redis: Any = None,
        *,
        key_prefix: str = "sg",
        ttl_seconds: float | None = None,
        max_entry_bytes: int = 8 * 1024 * 1024,
        durable_timeout: float = 5.0,
        command_timeout: float | None = 10.0,
        sync_timeout: float = 30.0,
        retry_backoff: tuple[float, float] = (0.05, 2.0),
        consolidation: ConsolidationConfig | None = None,
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
        max_pending_writes: int = 100_000,
        defer_unknown_events_seconds: float = 600,
        freshness: str = "sync",
    ) -> None:
        self._settings = checked_settings(
            redis=redis,
            max_history=max_history,
            ttl_seconds=ttl_seconds,
            max_pending_writes=max_pending_writes,
            durable_timeout=durable_timeout,
            command_timeout=command_timeout,
            sync_timeout=sync_timeout,
            retry_backoff=retry_backoff,
            min_replicas=min_replicas,
            replica_timeout_ms=replica_timeout_ms,
            freshness=freshness,
        )
        self._defer_ms = _defer_ms(defer_unknown_events_seconds)
        self._renderer = prompt_renderer
        self._redis = redis
        self._keyspace = KeySpace(key_prefix)
        self._writes = Writes(max_entry_bytes)
        self._stats = Stats()
        self._rooms = RoomTable(self._keyspace)
        self._loop = LoopBinding(self._moved)
        self._late_events = Chains(self._late_event_failed)
        self._store: RoomStore | None = None
        self._feed: ChangeFeed | None = None
        self._cursors: NamedCursors | None = None
        self._backend: Backend
        self._push: Push | None = None
        if redis is None:
            self._backend = MemoryBackend(self._rooms, self._stats, self._settings)
        else:
            self._store = RoomStore(
                redis,
                self._stats,
                ttl_ms=int(ttl_seconds * 1000) if ttl_seconds else 0,
                default_limit=max_history,
                command_timeout=command_timeout,
                min_replicas=min_replicas,
                replica_timeout_ms=replica_timeout_ms,
                archive_ttl_ms=_archive_ttl_ms(consolidation),
            )
            replicator = Replicator(self._store, self._rooms, self._stats, self._settings)
            self._backend = replicator
            if freshness == "push" and supports_push(redis):
                self._push = replicator.push = Push(
                    redis, self._rooms, self._keyspace, self._settings.backoff
                )
                self._rooms.on_forget = self._push.drop
            self._feed = ChangeFeed(self._store, self._keyspace, self._stats)
            self._cursors = NamedCursors(self._store, self._keyspace)
        core = Core(
            self._rooms,
            self._backend,
            self._store,
            self._stats,
            self._settings,
            self._loop,
            self._writes.max_entry_bytes,
        )
        self._consolidation = Consolidator(core, consolidation)

    # ------------------------------------------------------------------ writes

    def append(
        self,
        room_id: str,
        role: str,
        content: str | list[Any],
        *,
        message_id: str | int | None = None,
        name: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        tool_call_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Record a turn now; it reaches Redis in a tracked background task.

        ``metadata``: a JSON object kept with the entry for the writer's own
        reading back (``get_messages(..., include_metadata=True)``); it is never
        part of what a plain read returns, so it never reaches a model.
        """
        row = self._writes.row(role, content, message_id, name, tool_calls, tool_call_id, metadata)
        self._submit(room_id, self._writes.append([row]))

    async def append_async(
        self,
        room_id: str,
        role: str,
        content: str | list[Any],
        *,
        message_id: str | int | None = None,
        name: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        tool_call_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        durable: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """Record a turn and return once Redis holds it.

        Without ``durable`` a failing Redis is retried in the background for as
        long as it takes (cancelling the await does not cancel the write). With
        ``durable=True`` the write gets ``durable_timeout`` seconds; then
        ``DurabilityError`` is raised, the turn leaves this worker's memory, and
        re-calling with ``idempotency_key=err.idempotency_key`` lands it once.
        """
        row = self._writes.row(role, content, message_id, name, tool_calls, tool_call_id, metadata)
        await self._append_rows(room_id, [row], durable, idempotency_key)

    async def append_many_async(
        self,
        room_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        durable: bool = False,
        idempotency_key: str | None = None,
    ) -> None:
        """Record several turns as one write: Redis gets all of them in one script, or none.

        Each message takes the fields of ``append`` (``role``, ``content``,
        ``message_id``, ``name``, ``tool_calls``, ``tool_call_id``, ``metadata``); all are
        validated before any is recorded. ``durable`` and ``idempotency_key`` are
        as for ``append_async``, for the batch as a whole.
        """
        rows = [self._writes.row_from_mapping(message) for message in messages]
        if rows:
            await self._append_rows(room_id, rows, durable, idempotency_key)

    async def _append_rows(
        self, room_id: str, rows: list[Row], durable: bool, idempotency_key: str | None
    ) -> None:
        await self._write_async(room_id, self._writes.append(rows, idempotency_key), durable)

    def update_message(
        self, room_id: str, message_id: str | int, new_content: str | list[Any]
    ) -> bool:
        return self._submit(room_id, self._writes.update(message_id, new_content), keep=True)

    async def update_message_async(
        self,
        room_id: str,
        message_id: str | int,
        new_content: str | list[Any],
        *,
        durable: bool = False,
    ) -> bool:
        """Edit the entry; ``durable`` as for ``append_async`` (every ``_async`` write takes it)."""
        op = self._writes.update(message_id, new_content)
        return await self._edit_async(room_id, op, durable)

    def mark_deleted(self, room_id: str, message_id: str | int, deleted_at_iso: str) -> bool:
        return self._submit(room_id, self._writes.deleted(message_id, deleted_at_iso), keep=True)

    async def mark_deleted_async(
        self, room_id: str, message_id: str | int, deleted_at_iso: str, *, durable: bool = False
    ) -> bool:
        op = self._writes.deleted(message_id, deleted_at_iso)
        return await self._edit_async(room_id, op, durable)

    def patch_reactions(self, room_id: str, message_id: str | int, reactions_str: str) -> bool:
        return self._submit(room_id, self._writes.reactions(message_id, reactions_str), keep=True)

    async def patch_reactions_async(
        self, room_id: str, message_id: str | int, reactions_str: str, *, durable: bool = False
    ) -> bool:
        op = self._writes.reactions(message_id, reactions_str)
        return await self._edit_async(room_id, op, durable)

    def add_reaction(
        self, room_id: str, message_id: str | int, emoji: str, user_id: str | int
    ) -> bool:
        """Count ``user_id``'s ``emoji`` on the message once, however often the event comes.

        The ``[Reactions: …]`` tag lists emoji by count, highest first (ties: first
        seen), rendered from what every worker added. With Redis the new tag shows
        once Redis answers (the sync form persists in the background).
        """
        op = self._reaction(message_id, emoji, user_id, added=True)
        return self._submit(room_id, op, keep=True)

    async def add_reaction_async(
        self,
        room_id: str,
        message_id: str | int,
        emoji: str,
        user_id: str | int,
        *,
        durable: bool = False,
    ) -> bool:
        op = self._reaction(message_id, emoji, user_id, added=True)
        return await self._edit_async(room_id, op, durable)

    def remove_reaction(
        self, room_id: str, message_id: str | int, emoji: str, user_id: str | int
    ) -> bool:
        op = self._reaction(message_id, emoji, user_id, added=False)
        return self._submit(room_id, op, keep=True)

    async def remove_reaction_async(
        self,
        room_id: str,
        message_id: str | int,
        emoji: str,
        user_id: str | int,
        *,
        durable: bool = False,
    ) -> bool:
        op = self._reaction(message_id, emoji, user_id, added=False)
        return await self._edit_async(room_id, op, durable)

    def clear_reactions(
        self, room_id: str, message_id: str | int, emoji: str | None = None
    ) -> bool:
        """Forget every tracked reaction of the message, or only those with ``emoji``."""
        op = self._writes.clear_reactions(message_id, emoji, local=self._store is None)
        return self._submit(room_id, op)

    async def clear_reactions_async(
        self,
        room_id: str,
        message_id: str | int,
        emoji: str | None = None,
        *,
        durable: bool = False,
    ) -> bool:
        op = self._writes.clear_reactions(message_id, emoji, local=self._store is None)
        return await self._edit_async(room_id, op, durable)

    def _reaction(
        self, message_id: str | int, emoji: str, user_id: str | int, *, added: bool
    ) -> ReactionOp:
        return self._writes.reaction(
            message_id, emoji, user_id, added=added, local=self._store is None
        )

    def clear(self, room_id: str) -> None:
        self._submit(room_id, ClearOp())

    async def clear_async(self, room_id: str, *, durable: bool = False) -> None:
        await self._write_async(room_id, ClearOp(), durable)

    def set_channel_limit(self, room_id: str, limit: int) -> int:
        """Clamp to [50, 1000]; raising flags re-backfill, lowering trims at once."""
        op, clamped = limit_write(limit)
        self._submit(room_id, op)
        return clamped

    async def set_channel_limit_async(
        self, room_id: str, limit: int, *, durable: bool = False
    ) -> int:
        op, clamped = limit_write(limit)
        await self._write_async(room_id, op, durable)
        return clamped

    def get_channel_limit(self, room_id: str) -> int:
        view = self._room(room_id).view
        return view.limit or self._settings.max_history

    def is_rebackfill_requested(self, room_id: str) -> bool:
        return self._room(room_id).view.rebackfill

    def discard_rebackfill_request(self, room_id: str) -> None:
        self._submit(room_id, LimitOp(0, False))

    async def discard_rebackfill_request_async(
        self, room_id: str, *, durable: bool = False
    ) -> None:
        await self._write_async(room_id, LimitOp(0, False), durable)

    async def backfill_async(
        self,
        room_id: str,
        older_messages: Sequence[Mapping[str, Any]],
        *,
        durable: bool = False,
    ) -> None:
        """Prepend older platform history (oldest first) and settle the re-backfill request.

        Messages take the fields of ``append`` (``role``, ``content``,
        ``message_id``, ...). Entries the window already holds are skipped, and
        turns appended meanwhile by any worker are kept (compare-and-set).
        """
        op = BackfillOp(
            [self._writes.row_from_mapping(m) for m in older_messages],
            self._writes.max_entry_bytes,
        )
        await self._write_async(room_id, op, durable)

    # ------------------------------------------------------------------- reads

    def get_messages(
        self,
        room_id: str,
        room_context: Mapping[str, Any] | None = None,
        *,
        include_metadata: bool = False,
    ) -> list[Entry]:
        """``[system] + window`` from this worker's memory only (no Redis round trip).

        ``include_metadata``: entries written with ``metadata`` carry it (for the
        writer's own use: strip it before sending messages to a model).
        """
        room = self._room(room_id)
        messages = room.view.window.messages(metadata=include_metadata)
        if self._renderer is None:
            return messages
        return [_system(self._renderer.render(_context(room_id, room_context))), *messages]

    async def get_messages_async(
        self,
        room_id: str,
        room_context: Mapping[str, Any] | None = None,
        *,
        token_budget: int | None = None,
        include_metadata: bool = False,
    ) -> list[Entry]:
        """``[system] + window`` after catching up with Redis in one round trip.

        If Redis cannot be reached the worker keeps serving what it holds (counted
        as ``stale_reads``); ``ensure_fresh_from_redis`` is the call that raises.
        ``token_budget`` trims the returned copy (not the stored window) to fit:
        the first user message and the newest turns stay, whole tool groups go.
        """
        room = self._room(room_id)
        push = self._push
        if push is not None and push.current(room):
            self._stats.push_reads += 1  # the notices vouch for the mirror
        else:
            if push is not None:
                self._stats.push_fallbacks += 1
            try:
                # One command_timeout in all, waiting for the room's lock included:
                # behind a persist stuck on a stalled Redis, memory is served after
                # one timeout, not two.
                async with asyncio.timeout(self._settings.command_timeout):
                    await self._backend.refresh(room)
            except TRANSIENT_ERRORS as exc:
                self._stats.stale_reads += 1
                logger.warning(
                    "room %s: serving memory, Redis unreachable: %s", room_id, describe_error(exc)
                )
        messages = room.view.window.messages(metadata=include_metadata)
        if self._renderer is not None:
            system = await self._renderer.render_async(_context(room_id, room_context))
            messages = [_system(system), *messages]
        if token_budget is not None:
            messages = fit_to_budget(messages, token_budget)
        return messages

    async def ensure_fresh_from_redis(self, room_id: str) -> None:
        """Wait for this worker's writes to the room, then match Redis exactly."""
        await self._backend.ensure_fresh(self._room(room_id))

    def last_history_role(self, room_id: str) -> str | None:
        return self._room(room_id).view.window.last_role()

    def get_history_message_count(self, room_id: str) -> int:
        window = self._room(room_id).view.window
        return len(window) - window.corrupt

    # ----------------------------------------------------------- consolidation

    def should_consolidate(self, room_id: str) -> bool:
        """Whether the room passes a threshold (turns or tokens) and has turns to fold.

        Reads this worker's memory only: call ``ensure_fresh_from_redis`` first
        (the consolidation worker does).
        """
        return self._consolidation.should_consolidate(room_id)

    async def consolidate(
        self,
        room_id: str,
        summarize: Summarizer | None = None,
        *,
        keep_recent: int | None = None,
        room_context: Mapping[str, Any] | None = None,
    ) -> ConsolidationResult:
        """Fold the oldest turns into the rolling summary and archive them, atomically.

        See ``docs/consolidation.md``. Raises ``ConsolidationError`` (room
        unchanged) when the summariser fails; cancelling it changes nothing.
        """
        return await self._consolidation.consolidate(
            room_id, summarize, keep_recent=keep_recent, room_context=room_context
        )

    async def list_archives(self, room_id: str) -> list[ArchiveBatch]:
        """The room's archived turns, oldest batch first, each with the summary that replaced it."""
        self._loop.current()
        return await self._consolidation.list_archives(room_id)

    # ------------------------------------------------------------- change feed

    async def read_since(self, room_id: str, cursor: str | None = None) -> tuple[list[Change], str]:
        """Every change Redis holds for the room after ``cursor``, and the cursor after them.

        ``None`` reads the whole window as appends. A cursor the room can no longer
        serve incrementally (another epoch, history gone) gives one ``reset`` and
        then the whole window as appends. One round trip; see docs/changes.md.
        """
        batch = await self._change_feed(room_id).read(room_id, cursor)
        return batch.changes, batch.cursor

    def changes(
        self, room_id: str, *, since: str | None = None, poll_interval: float = 1.0
    ) -> AsyncGenerator[Change, None]:
        """``read_since`` forever: yields each change, waiting for more (a bounded poll,
        at most one read per ``poll_interval`` seconds while the room is idle). The
        iteration ends when the manager closes (``aclose``)."""
        if not poll_interval > 0:
            raise ConfigurationError(f"poll_interval must be > 0, not {poll_interval!r}")
        feed = self._change_feed(room_id)
        decode_cursor(room_id, since)  # a bad cursor fails here, not at the first poll
        return feed.follow(room_id, since, poll_interval)

    async def get_cursor(self, room_id: str, name: str) -> str | None:
        """The named durable cursor of the room (None: never set, or expired)."""
        self._change_feed(room_id)
        assert self._cursors is not None
        return await self._cursors.get(room_id, name)

    async def set_cursor(
        self, room_id: str, name: str, cursor: str, *, expected: str | None = None
    ) -> bool:
        """Store a named cursor with the room's TTL. ``expected``: compare-and-set, False
        when the stored cursor is not ``expected`` (``""``: only if none is stored)."""
        self._change_feed(room_id)
        assert self._cursors is not None
        return await self._cursors.set(room_id, name, cursor, expected)

    # ------------------------------------------------------- export / import

    async def export_room(self, room_id: str, *, archives: bool = True) -> dict[str, Any]:
        """The room as Redis holds it, as a JSON-serialisable dict (see docs/changes.md):
        entries with their identities, limit, and the archive unless ``archives=False``."""
        self._change_feed(room_id)
        assert self._store is not None
        return await export_room(
            self._store,
            self._keyspace,
            room_id,
            archives=archives,
            timeout=self._settings.command_timeout,
        )

    async def import_room(
        self, room_id: str, data: Mapping[str, Any], *, replace: bool = False
    ) -> None:
        """Write an export as the room, in one script, under a new epoch (every worker
        reloads). Refuses a room holding entries unless ``replace=True``
        (``RoomNotEmpty``); a damaged or foreign export raises ``InvalidExport``;
        either way nothing is written."""
        self._change_feed(room_id)
        assert self._store is not None
        parsed = parse_room_export(data, self._writes.max_entry_bytes)
        await import_room(self._store, self._keyspace, room_id, parsed, replace=replace)
        room = self._rooms.get(room_id)
        if room is not None:
            await self._backend.ensure_fresh(room)

    def _change_feed(self, room_id: str) -> ChangeFeed:
        self._loop.current()
        validate_room_id(room_id)
        if self._feed is None:
            raise ConfigurationError(
                "the change feed, named cursors, export and import work on Redis: this "
                "manager is memory-only"
            )
        return self._feed

    # --------------------------------------------------------------- lifecycle

    def reap_stale(self, max_idle_seconds: float = 3600) -> int:
        """Forget rooms idle that long from THIS process's memory; Redis is untouched."""
        return self._rooms.reap(max_idle_seconds)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every write queued so far is confirmed (or, if durable, given up)."""
        self._loop.current()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waits = [
                asyncio.shield(room.pending[-1].done)
                for room in self._rooms
                if room.pending and room.pending[-1].done is not None
            ]
            # Events the sync forms keep in the background; what they submit
            # joins ``pending`` and is waited for on the next turn.
            waits += self._late_events.waits()
            if not waits:
                return
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            _done, not_done = await asyncio.wait(waits, timeout=remaining)
            if not_done:
                for future in not_done:
                    future.cancel()
                unflushed = self._rooms.unflushed()
                self._backend.fail_waiters("drain gave up before Redis confirmed it")
                raise DrainTimeout(unflushed)

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """Flush pending writes (bounded by ``timeout``), then stop background work.

        Raises ``DrainTimeout`` listing per room what could not be flushed.
        """
        if self._loop.closed:
            return
        try:
            await self.drain(timeout)
        finally:
            self._loop.closed = True
            if self._feed is not None:
                self._feed.close()
            await self._late_events.cancel()  # only after a drain that timed out
            await self._consolidation.wait_idle()
            await self._backend.close()
            if self._push is not None:
                await self._push.close()

    def rooms(self) -> list[RoomInfo]:
        """This process's working set: every room it holds, most recently used first.

        Memory only (no Redis call): what an operator or a ``reap_stale`` policy
        looks at.
        """
        return self._rooms.working_set()

    @overload
    def stats(self) -> dict[str, int]: ...

    @overload
    def stats(self, *, working_set: Literal[True]) -> dict[str, Any]: ...

    def stats(self, *, working_set: bool = False) -> dict[str, Any]:
        """Counters; ``working_set=True`` adds ``"working_set"``, ``rooms()`` as
        JSON-ready dicts (``conversation stats --worker FILE`` shows it)."""
        counters: dict[str, Any] = self._stats.as_dict()
        counters["rooms"] = len(self._rooms)
        counters["pending_writes"] = self._rooms.pending_writes()
        if working_set:
            counters["working_set"] = [asdict(info) for info in self.rooms()]
        return counters

    # ----------------------------------------------------------- construction

    def _room(self, room_id: str) -> Room:
        self._loop.current()  # refuses a caller on another live loop, reads included
        return self._rooms.open(room_id)

    # ------------------------------------------------------ submitting writes

    def _submit(self, room_id: str, op: Op, *, inline: bool = False, keep: bool = False) -> bool:
        """Apply a write to the view and queue it; safe from the loop or any thread.

        ``keep``: a sync edit or reaction whose message this worker lacks is kept
        for it (SPEC §31); the call still answers False at once.
        """
        if self._loop.closed:
            raise PersistError("the manager is closed", room_id=room_id)
        loop = self._loop.current()
        if loop is None:
            if self._store is not None:
                raise PersistError(
                    "no running event loop to persist this write on: call it from the "
                    "manager's loop, from a thread while that loop runs, or use the _async form",
                    room_id=room_id,
                )
            return self._apply(room_id, op, None, False, keep)
        if running_loop() is loop:
            return self._apply(room_id, op, loop, inline, keep)
        # A thread without a loop: hand the write to the manager's loop and wait
        # for the local effect (not for Redis), so nothing is skipped.
        return self._loop.hand_off(
            loop, self._settings.sync_timeout, self._apply, room_id, op, loop, False, keep
        )

    def _apply(
        self,
        room_id: str,
        op: Op,
        loop: asyncio.AbstractEventLoop | None,
        inline: bool,
        keep: bool,
    ) -> bool:
        """Apply ``op`` on the engine's loop (or, memory-only, with none running)."""
        if not keep or not isinstance(op, EditOp | ReactionOp):
            return self._backend.apply(self._room(room_id), op, loop, inline)
        room = self._room(room_id)
        if loop is not None and (room_id, op.identity) in self._late_events:
            # An earlier event for this message still waits in the background:
            # this one follows it, so the message gets them in arrival order.
            found = room.view.window.find_last(op.identity) is not None
            self._keep_late(loop, room_id, op)
            return found
        if self._backend.apply(room, op, loop, inline):
            return True
        event = op.deferred_event()
        if not self._defer_ms or event is None:
            return False
        if len(event) > MAX_DEFERRED_EVENT_BYTES:
            self._stats.deferred_refused += 1
            return False
        if isinstance(self._backend, MemoryBackend):
            # The view is the only copy: keeping the event there takes no I/O.
            self._backend.keep(room, op.identity, event, self._defer_ms)
        elif loop is not None:
            self._keep_late(loop, room_id, op)
        return False

    def _keep_late(
        self, loop: asyncio.AbstractEventLoop, room_id: str, op: EditOp | ReactionOp
    ) -> None:
        async def work() -> None:
            await self._catch_up_or_defer(room_id, op, durable=False, awaited=False)

        self._late_events.start(loop, (room_id, op.identity), work)

    def _late_event_failed(self, key: Hashable, exc: BaseException) -> None:
        room_id, identity = key if isinstance(key, tuple) else (key, None)
        self._stats.deferred_failures += 1
        logger.warning(
            "room %s: an event for message %r, which this worker did not hold, was lost "
            "(neither applied nor kept for it): %s",
            room_id,
            identity,
            describe_error(exc),
        )

    def _moved(self, loop: asyncio.AbstractEventLoop) -> None:
        """The manager's loop closed and ``loop`` took it over (see ``LoopBinding``)."""
        resumed = self._backend.moved(loop)
        if self._push is not None:
            self._push.rebind()
        lost = self._late_events.drop()
        if lost:
            # Their tasks died with the old loop (nobody drained it).
            self._stats.deferred_failures += lost
            logger.warning(
                "the manager's event loop closed before %d sync event(s) for messages "
                "this worker did not hold were kept; they are lost",
                lost,
            )
        self._consolidation.rebind()
        logger.info(
            "the manager's event loop closed; moved to a new one (%d room(s) resume writes)",
            resumed,
        )

    async def _edit_async(self, room_id: str, op: EditOp | ReactionOp, durable: bool) -> bool:
        found, result = await self._try_write(room_id, op, durable)
        if found:
            return bool(result)
        return await self._catch_up_or_defer(room_id, op, durable, awaited=True)

    async def _catch_up_or_defer(
        self, room_id: str, op: EditOp | ReactionOp, durable: bool, *, awaited: bool
    ) -> bool:
        """The room lacks the edit's message: catch up, then apply it or keep it.

        ``awaited=False`` (a sync form's background work): a write found after the
        catch-up is queued like any sync write, its persist failures reported there.
        """
        if self._store is not None:
            # Not in memory: the room may be cold or behind another worker.
            await self.ensure_fresh_from_redis(room_id)
            found, result = await self._retry_write(room_id, op, durable, awaited)
            if found:
                return bool(result)
        event = op.deferred_event()
        if not self._defer_ms or event is None:
            return False
        if len(event) > MAX_DEFERRED_EVENT_BYTES:
            self._stats.deferred_refused += 1
            return False
        # The message has not arrived (gateway events reach workers out of order):
        # keep the event for the append that brings it (SPEC §31).
        outcome = await self._backend.defer(self._room(room_id), op.identity, event, self._defer_ms)
        if outcome is Deferral.FOUND:
            found, result = await self._retry_write(room_id, op, durable, awaited)
            return found and bool(result)
        return False

    async def _retry_write(
        self, room_id: str, op: Op, durable: bool, awaited: bool
    ) -> tuple[bool, Any]:
        if awaited:
            return await self._try_write(room_id, op, durable)
        return self._submit(room_id, op), True

    async def _write_async(self, room_id: str, op: Op, durable: bool = False) -> Any:
        return (await self._try_write(room_id, op, durable))[1]

    async def _try_write(self, room_id: str, op: Op, durable: bool) -> tuple[bool, Any]:
        """Submit ``op`` and wait for Redis: whether it applied here, and its result.

        ``durable``: no longer than ``durable_timeout``; then ``DurabilityError``
        and the write leaves this worker's view (it is never retried for ever).
        """
        if not (durable and self._redis is not None):
            if not self._submit(room_id, op, inline=True):
                return False, False
            return True, await self._backend.settle(self._rooms.open(room_id), op)
        deadline = asyncio.get_running_loop().time() + self._settings.durable_timeout
        op.durable_deadline = deadline
        op.awaited = True  # not inline (the deadline rules), but its caller waits
        if not self._submit(room_id, op):
            return False, False
        return True, await self._backend.settle_durable(self._rooms.open(room_id), op, deadline)


# ---------------------------------------------------------------- helpers


def engine_loop(manager: ConversationManager) -> asyncio.AbstractEventLoop | None:
    """The running loop the manager belongs to, or None when no loop runs it.

    For the integrations' sync members, which hand work to that loop from
    another thread. Raises ``ConfigurationError`` when called on a running
    loop other than the manager's, while the manager's is open (SPEC §26).
    """
    return manager._loop.current()


def hand_off_timeout(manager: ConversationManager) -> float:
    """How long a thread waits for the manager's loop to take work (``sync_timeout``)."""
    return manager._settings.sync_timeout


def _system(text: str) -> Entry:
    return {"role": "system", "content": text}


def _context(room_id: str, room_context: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"room_id": room_id, **(room_context or {})}


def _defer_ms(seconds: object) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise ConfigurationError(
            f"defer_unknown_events_seconds must be a number >= 0 (0: off), got {seconds!r}"
        )
    return int(seconds * 1000)


def _archive_ttl_ms(config: ConsolidationConfig | None) -> int | None:
    seconds = config.archive_ttl_seconds if config is not None else None
    return None if seconds is None else max(1, int(seconds * 1000))
