"""``ConversationManager``: per-room windows in memory, mirrored to Redis.

Each room keeps two states: *synced*, an exact mirror of Redis at some
(epoch, version), and the *view*, which is synced plus this worker's writes that
Redis has not confirmed yet. Writes change the view at once and queue; one
persist task per room sends the queue in order, and every script reply carries
what other workers changed meanwhile, so synced stays exact without extra reads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError

from ._budget import fit_to_budget
from ._consolidation import (
    ArchiveBatch,
    ConsolidationConfig,
    ConsolidationResult,
    Consolidator,
    Summarizer,
    _positive_int,
)
from ._entries import (
    Entry,
    build_entry,
    check_new_content,
    clean_tag_value,
    deleted_transform,
    edit_transform,
    encode,
    normalise_message_id,
    reactions_transform,
    to_messages,
    to_messages_yielding,
)
from ._errors import (
    BacklogFull,
    ConfigurationError,
    DrainTimeout,
    DurabilityError,
    InvalidMessage,
    PersistError,
    RedisUnavailable,
    describe_error,
)
from ._keys import KeySpace, RoomKeys, validate_room_id
from ._ops import AppendOp, BackfillOp, ClearOp, EditOp, LimitOp, Op, Row
from ._retry import TRANSIENT_ERRORS, is_permanent
from ._stats import Stats
from ._store import RoomStore
from ._window import RoomState, SyncReply, apply_reply

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIN_CHANNEL_LIMIT, MAX_CHANNEL_LIMIT = 50, 1000
_MAX_BATCH_ROWS = 512
_MAX_EDIT_CONFLICTS = 32
_SYNC_ATTEMPTS = 3

# A batch that keeps failing with an exception no one expected (a bug here or in
# the client library) is failed after this many attempts in a row.
_MAX_UNEXPECTED_FAILURES = 5


class Renderer(Protocol):
    def render(self, room_context: Mapping[str, Any] | None = None) -> str: ...

    def render_async(self, room_context: Mapping[str, Any] | None = None) -> Awaitable[str]: ...


@dataclass(eq=False, slots=True)
class _Batch:
    ops: list[Op]
    token: str
    durable_deadline: float | None
    # A sync found the token applied: an attempt that timed out did land, so the
    # view must not apply these ops on top of a synced state that holds them.
    landed: bool = False

    def tokens(self) -> list[str]:
        """The tokens Redis remembers for this batch: each append keeps its own
        (lua/append.lua); other writes are sent, and remembered, as one."""
        if isinstance(self.ops[0], AppendOp):
            return [op.token for op in self.ops]
        return [self.token]


@dataclass(eq=False, slots=True)
class _Room:
    room_id: str
    keys: RoomKeys
    synced: RoomState = field(default_factory=RoomState)
    view: RoomState = field(default_factory=RoomState)
    pending: deque[Op] = field(default_factory=deque)
    inflight: _Batch | None = None
    task: asyncio.Task[None] | None = None
    # The op an awaiting caller is persisting in its own task (see _persist_inline);
    # while set, writes queue behind it and no persist task is started.
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
    token_estimates: dict[int, tuple[bytes, int]] = field(default_factory=dict)

    def idle(self) -> bool:
        """Nothing queued and nothing being persisted: forgetting it loses nothing."""
        return not self.pending and (self.task is None or self.task.done())


class ConversationManager:
    """Per-room sliding windows of chat turns, shared by worker processes through Redis.

    ``redis`` is any ``redis.asyncio`` client (``Redis``, ``RedisCluster``, or
    ``Sentinel.master_for``) created with ``decode_responses=False``; ``None``
    keeps everything in this process's memory.

    ``min_replicas=N`` acknowledges a write only once ``WAIT N replica_timeout_ms``
    says N replicas hold it; until then it is retried under its idempotency token
    (``ReplicationTimeout``, counted as ``unreplicated_writes``). See
    ``docs/scaling.md`` for what that guarantees across a failover.
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
    ) -> None:
        if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 1:
            raise ConfigurationError(f"max_history must be a positive int, got {max_history!r}")
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise ConfigurationError(f"ttl_seconds must be positive or None, got {ttl_seconds!r}")
        _check_replication(redis, min_replicas, replica_timeout_ms, command_timeout)
        _positive_int("max_pending_writes", max_pending_writes)
        _reject_decoding_client(redis)
        self._max_pending = max_pending_writes
        self._renderer = prompt_renderer
        self._max_history = max_history
        self._redis = redis
        self._keyspace = KeySpace(key_prefix)
        self._max_entry_bytes = max_entry_bytes
        self._durable_timeout = durable_timeout
        self._command_timeout = command_timeout
        self._sync_timeout = sync_timeout
        self._backoff_base, self._backoff_max = retry_backoff
        self._stats = Stats()
        self._rooms: dict[str, _Room] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._store = (
            RoomStore(
                redis,
                self._stats,
                ttl_ms=int(ttl_seconds * 1000) if ttl_seconds else 0,
                default_limit=max_history,
                command_timeout=command_timeout,
                min_replicas=min_replicas,
                replica_timeout_ms=replica_timeout_ms,
                archive_ttl_ms=_archive_ttl_ms(consolidation),
            )
            if redis is not None
            else None
        )
        self._consolidation = Consolidator(self, consolidation)

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
    ) -> None:
        """Record a turn now; it reaches Redis in a tracked background task."""
        op = AppendOp([self._row(role, content, message_id, name, tool_calls, tool_call_id)])
        self._submit(room_id, op)

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
        row = self._row(role, content, message_id, name, tool_calls, tool_call_id)
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
        ``message_id``, ``name``, ``tool_calls``, ``tool_call_id``); all are
        validated before any is recorded. ``durable`` and ``idempotency_key`` are
        as for ``append_async``, for the batch as a whole.
        """
        rows = [self._row_from_mapping(message) for message in messages]
        if rows:
            await self._append_rows(room_id, rows, durable, idempotency_key)

    async def _append_rows(
        self, room_id: str, rows: list[Row], durable: bool, idempotency_key: str | None
    ) -> None:
        op = AppendOp(rows)
        if idempotency_key is not None:
            if not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 128:
                raise InvalidMessage(
                    "must be a non-empty str of at most 128 characters", field="idempotency_key"
                )
            op.token = idempotency_key
        if durable and self._redis is not None:
            op.durable_deadline = asyncio.get_running_loop().time() + self._durable_timeout
        if op.durable_deadline is not None:
            self._submit(room_id, op)
            if op.done is not None:
                await self._settled_durable(room_id, op, op.durable_deadline)
        else:
            await self._write_async(room_id, op)

    def update_message(
        self, room_id: str, message_id: str | int, new_content: str | list[Any]
    ) -> bool:
        return self._submit(
            room_id, self._edit(message_id, edit_transform(check_new_content(new_content)))
        )

    async def update_message_async(
        self, room_id: str, message_id: str | int, new_content: str | list[Any]
    ) -> bool:
        return await self._edit_async(
            room_id, self._edit(message_id, edit_transform(check_new_content(new_content)))
        )

    def mark_deleted(self, room_id: str, message_id: str | int, deleted_at_iso: str) -> bool:
        transform = deleted_transform(clean_tag_value(deleted_at_iso, "deleted_at_iso"))
        return self._submit(room_id, self._edit(message_id, transform))

    async def mark_deleted_async(
        self, room_id: str, message_id: str | int, deleted_at_iso: str
    ) -> bool:
        transform = deleted_transform(clean_tag_value(deleted_at_iso, "deleted_at_iso"))
        return await self._edit_async(room_id, self._edit(message_id, transform))

    def patch_reactions(self, room_id: str, message_id: str | int, reactions_str: str) -> bool:
        transform = reactions_transform(clean_tag_value(reactions_str, "reactions_str"))
        return self._submit(room_id, self._edit(message_id, transform))

    async def patch_reactions_async(
        self, room_id: str, message_id: str | int, reactions_str: str
    ) -> bool:
        transform = reactions_transform(clean_tag_value(reactions_str, "reactions_str"))
        return await self._edit_async(room_id, self._edit(message_id, transform))

    def clear(self, room_id: str) -> None:
        self._submit(room_id, ClearOp())

    async def clear_async(self, room_id: str) -> None:
        await self._write_async(room_id, ClearOp())

    def set_channel_limit(self, room_id: str, limit: int) -> int:
        """Clamp to [50, 1000]; raising flags re-backfill, lowering trims at once."""
        clamped = _clamp_limit(limit)
        self._submit(room_id, LimitOp(clamped, None))
        return clamped

    async def set_channel_limit_async(self, room_id: str, limit: int) -> int:
        clamped = _clamp_limit(limit)
        await self._write_async(room_id, LimitOp(clamped, None))
        return clamped

    def get_channel_limit(self, room_id: str) -> int:
        view = self._room(room_id).view
        return view.limit or self._max_history

    def is_rebackfill_requested(self, room_id: str) -> bool:
        return self._room(room_id).view.rebackfill

    def discard_rebackfill_request(self, room_id: str) -> None:
        self._submit(room_id, LimitOp(0, False))

    async def backfill_async(
        self, room_id: str, older_messages: Sequence[Mapping[str, Any]]
    ) -> None:
        """Prepend older platform history (oldest first) and settle the re-backfill request.

        Messages take the fields of ``append`` (``role``, ``content``,
        ``message_id``, ...). Entries the window already holds are skipped, and
        turns appended meanwhile by any worker are kept (compare-and-set).
        """
        op = BackfillOp([self._row_from_mapping(message) for message in older_messages])
        await self._write_async(room_id, op)

    # ------------------------------------------------------------------- reads

    def get_messages(
        self, room_id: str, room_context: Mapping[str, Any] | None = None
    ) -> list[Entry]:
        """``[system] + window`` from this worker's memory only (no Redis round trip)."""
        room = self._room(room_id)
        messages = to_messages(room.view.window.healthy_rows())
        if self._renderer is None:
            return messages
        return [_system(self._renderer.render(_context(room_id, room_context))), *messages]

    async def get_messages_async(
        self,
        room_id: str,
        room_context: Mapping[str, Any] | None = None,
        *,
        token_budget: int | None = None,
    ) -> list[Entry]:
        """``[system] + window`` after catching up with Redis in one round trip.

        If Redis cannot be reached the worker keeps serving what it holds (counted
        as ``stale_reads``); ``ensure_fresh_from_redis`` is the call that raises.
        ``token_budget`` trims the returned copy (not the stored window) to fit:
        the first user message and the newest turns stay, whole tool groups go.
        """
        room = self._room(room_id)
        if self._store is not None:
            try:
                # One command_timeout in all, waiting for the room's lock included:
                # behind a persist stuck on a stalled Redis, memory is served
                # after one timeout, not two.
                async with asyncio.timeout(self._command_timeout):
                    await self._refresh(room)
            except TRANSIENT_ERRORS as exc:
                self._stats.stale_reads += 1
                logger.warning(
                    "room %s: serving memory, Redis unreachable: %s", room_id, describe_error(exc)
                )
        messages = await to_messages_yielding(room.view.window.healthy_rows())
        if self._renderer is not None:
            system = await self._renderer.render_async(_context(room_id, room_context))
            messages = [_system(system), *messages]
        if token_budget is not None:
            messages = fit_to_budget(messages, token_budget)
        return messages

    async def ensure_fresh_from_redis(self, room_id: str) -> None:
        """Wait for this worker's writes to the room, then match Redis exactly."""
        room = self._room(room_id)
        if self._store is None:
            return
        if room.pending:
            await self._wait_for(room.pending[-1], room_id)
        for attempt in range(_SYNC_ATTEMPTS):
            try:
                await self._refresh(room)
                return
            except TRANSIENT_ERRORS as exc:
                # A pooled connection that a restart, failover or CLIENT KILL closed
                # fails at once; the next attempt takes another (or a new) one. A
                # timeout is not retried: the caller asked to know, not to wait.
                stale = isinstance(exc, (RedisConnectionError, ConnectionError))
                if stale and attempt + 1 < _SYNC_ATTEMPTS:
                    continue
                raise RedisUnavailable(
                    f"room {room_id}: cannot sync with Redis: {describe_error(exc)}",
                    room_id=room_id,
                ) from exc

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
        self._bound_loop()
        return await self._consolidation.list_archives(room_id)

    # --------------------------------------------------------------- lifecycle

    def reap_stale(self, max_idle_seconds: float = 3600) -> int:
        """Forget rooms idle that long from THIS process's memory; Redis is untouched."""
        cutoff = time.monotonic() - max_idle_seconds
        stale = [
            room_id
            for room_id, room in self._rooms.items()
            if room.last_used < cutoff and room.idle()
        ]
        for room_id in stale:
            del self._rooms[room_id]
        return len(stale)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until every write queued so far is confirmed (or, if durable, given up)."""
        self._bound_loop()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waits = [
                asyncio.shield(room.pending[-1].done)
                for room in self._rooms.values()
                if room.pending and room.pending[-1].done is not None
            ]
            if not waits:
                return
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            _done, not_done = await asyncio.wait(waits, timeout=remaining)
            if not_done:
                for future in not_done:
                    future.cancel()
                unflushed = {r.room_id: len(r.pending) for r in self._rooms.values() if r.pending}
                self._fail_waiters("drain gave up before Redis confirmed it")
                raise DrainTimeout(unflushed)

    async def aclose(self, timeout: float | None = 30.0) -> None:
        """Flush pending writes (bounded by ``timeout``), then stop background work.

        Raises ``DrainTimeout`` listing per room what could not be flushed.
        """
        if self._closed:
            return
        try:
            await self.drain(timeout)
        finally:
            self._closed = True
            tasks = [room.task for room in self._rooms.values() if room.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._fail_waiters("the manager closed before Redis confirmed it")
            if self._store is not None:
                await self._store.wait_idle()

    def _fail_waiters(self, why: str) -> None:
        """Settle every unconfirmed write's future, so no caller awaits it forever.

        The writes themselves stay queued (unless the manager closes): they may
        still land, and the error's key re-sends one exactly once.
        """
        for room in self._rooms.values():
            for op in room.pending:
                if op.done is not None and not op.done.done():
                    op.done.set_exception(
                        PersistError(
                            f"room {room.room_id}: {why}; it may still land: re-send it with "
                            "idempotency_key=err.idempotency_key to be sure",
                            room_id=room.room_id,
                            idempotency_key=op.token,
                        )
                    )

    def stats(self) -> dict[str, int]:
        counters = self._stats.as_dict()
        counters["rooms"] = len(self._rooms)
        counters["pending_writes"] = sum(len(room.pending) for room in self._rooms.values())
        return counters

    # ----------------------------------------------------------- construction

    def _row(
        self,
        role: object,
        content: object,
        message_id: object = None,
        name: object = None,
        tool_calls: object = None,
        tool_call_id: object = None,
    ) -> Row:
        entry = build_entry(
            role,
            content,
            message_id=message_id,
            name=name,
            tool_calls=tool_calls,
            tool_call_id=tool_call_id,
        )
        return encode(entry, self._max_entry_bytes), entry["message_id"], entry["role"]

    def _row_from_mapping(self, message: Mapping[str, Any]) -> Row:
        fields = dict(message)
        try:
            role, content = fields.pop("role"), fields.pop("content")
        except KeyError as exc:
            raise InvalidMessage(f"message lacks {exc.args[0]!r}") from exc
        unknown = set(fields) - {"message_id", "name", "tool_calls", "tool_call_id"}
        if unknown:
            raise InvalidMessage(f"unknown field(s) {sorted(unknown)}")
        return self._row(role, content, **fields)

    def _edit(self, message_id: object, transform: Any) -> EditOp:
        return EditOp(normalise_message_id(message_id), transform, self._max_entry_bytes)

    def _room(self, room_id: str) -> _Room:
        self._bound_loop()  # refuses a caller on another live loop, reads included
        room = self._rooms.get(room_id)
        if room is None:
            validate_room_id(room_id)
            room = _Room(room_id, self._keyspace.room(room_id))
            self._rooms[room_id] = room
        room.last_used = time.monotonic()
        return room

    # ------------------------------------------------------ submitting writes

    def _submit(self, room_id: str, op: Op, *, inline: bool = False) -> bool:
        """Apply a write to the view and queue it; safe from the loop or any thread."""
        if self._closed:
            raise PersistError("the manager is closed", room_id=room_id)
        loop = self._bound_loop()
        if loop is None:
            if self._store is not None:
                raise PersistError(
                    "no running event loop to persist this write on: call it from the "
                    "manager's loop, from a thread while that loop runs, or use the _async form",
                    room_id=room_id,
                )
            return self._apply(room_id, op, None)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            return self._apply(room_id, op, loop, inline)
        # A thread without a loop: hand the write to the manager's loop and wait
        # for the local effect (not for Redis), so nothing is skipped.
        handoff = asyncio.run_coroutine_threadsafe(_call(self._apply, room_id, op, loop), loop)
        return handoff.result(timeout=self._sync_timeout)

    def _bound_loop(self) -> asyncio.AbstractEventLoop | None:
        """The manager's loop if it runs, after binding to the caller's running loop.

        The first loop that uses the manager owns it. A call from another running
        loop is refused while the owner is open (its locks, futures and pooled
        connections belong to the owner), and adopts the manager once the owner
        has closed (``asyncio.run`` per request). ``None``: no loop runs the
        manager (a thread calling before any loop did, or after its loop stopped).
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        loop = self._loop
        if running is not None and running is not loop:
            if loop is not None and not loop.is_closed():
                raise ConfigurationError(
                    "this manager belongs to another event loop, which is still open: "
                    "use it from that loop (or from a plain thread), or give each loop "
                    "its own manager"
                )
            self._rebind(running)
            loop = running
        if loop is not None and (loop.is_closed() or not loop.is_running()):
            return None
        return loop

    def _rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt ``loop``: the previous one closed, and with it every task and
        future it ran. Whatever was queued and unconfirmed is sent again from
        here, under the same tokens, so nothing is lost or doubled."""
        previous, self._loop = self._loop, loop
        if previous is None:
            return
        resumed = 0
        for room in self._rooms.values():
            room.lock = asyncio.Lock()
            room.task = None
            room.inline = None
            for op in room.pending:
                op.done = loop.create_future()
                op.done.add_done_callback(_consume_exception)
            if room.pending and self._store is not None:
                room.task = loop.create_task(self._persist_loop(room))
                resumed += 1
        if self._store is not None:
            self._store.rebind()
        self._consolidation.rebind()
        logger.info(
            "the manager's event loop closed; moved to a new one (%d room(s) resume writes)",
            resumed,
        )

    def _apply(
        self, room_id: str, op: Op, loop: asyncio.AbstractEventLoop | None, inline: bool = False
    ) -> bool:
        room = self._room(room_id)
        if self._store is not None and len(room.pending) >= self._max_pending:
            raise BacklogFull(room_id, self._max_pending)
        found = op.apply(room.view, self._max_history)
        if isinstance(op, AppendOp):
            self._stats.appends += len(op.rows)
        elif isinstance(op, EditOp):
            self._stats.edits += 1
        if not found or self._store is None or loop is None:
            return found
        op.done = loop.create_future()
        op.done.add_done_callback(_consume_exception)
        if inline and not room.pending and room.task is None and not room.lock.locked():
            # An idle room and a caller about to await: it persists the write
            # itself (_persist_inline), skipping a task, a shield and four loop
            # iterations per write.
            room.inline = op
        room.pending.append(op)
        if room.task is None and room.inline is None:
            room.task = loop.create_task(self._persist_loop(room))
        return True

    async def _settled(self, op: Op) -> Any:
        if op.done is None:
            return True
        return await asyncio.shield(op.done)

    async def _settled_durable(self, room_id: str, op: Op, deadline: float) -> None:
        """Wait for a durable write, no longer than its deadline even while it is queued."""
        assert op.done is not None
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(op.done), remaining)
            return
        except TimeoutError:
            pass
        room = self._rooms.get(room_id)
        inflight = room.inflight.ops if room is not None and room.inflight is not None else []
        if room is not None and op in room.pending and not any(op is o for o in inflight):
            # Still queued behind writes that cannot land: never sent, so it is
            # withdrawn cleanly. (If it is being sent, its own persist settles it.)
            cause = TimeoutError("queued behind writes Redis has not confirmed")
            self._abandon_durable(room, _Batch([op], op.token, deadline), cause)
        await asyncio.shield(op.done)

    async def _edit_async(self, room_id: str, op: EditOp) -> bool:
        if self._submit(room_id, op, inline=True):
            return bool(await self._settle_submitted(room_id, op))
        if self._store is None:
            return False
        # Not in memory: the room may be cold or behind another worker.
        await self.ensure_fresh_from_redis(room_id)
        if self._submit(room_id, op, inline=True):
            return bool(await self._settle_submitted(room_id, op))
        return False

    async def _write_async(self, room_id: str, op: Op) -> Any:
        self._submit(room_id, op, inline=True)
        return await self._settle_submitted(room_id, op)

    async def _settle_submitted(self, room_id: str, op: Op) -> Any:
        room = self._rooms.get(room_id)
        if room is not None and room.inline is op:
            return await self._persist_inline(room, op)
        return await self._settled(op)

    async def _wait_for(self, op: Op, room_id: str) -> None:
        if op.done is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(op.done), self._sync_timeout)
        except TimeoutError as exc:
            raise RedisUnavailable(
                f"room {room_id}: writes still unconfirmed after {self._sync_timeout}s",
                room_id=room_id,
            ) from exc
        except DurabilityError:
            pass  # the writer was told; the room is in a consistent state again

    # ----------------------------------------------------------- persisting

    async def _persist_inline(self, room: _Room, op: Op) -> Any:
        """Persist ``op`` (alone at the head of an idle room's queue) in the caller's task.

        The same frozen batch and token as the persist loop would send. Writes
        submitted meanwhile queue behind it; once it is settled, a persist task
        takes them. If the attempt fails, or the caller is cancelled mid-flight,
        the batch (maybe landed: its token tells) goes to the persist loop, which
        retries it as its own, and the caller waits as any other would.
        """
        batch = _Batch([op], op.token, None)
        room.inflight = batch
        try:
            async with room.lock:
                results = await self._persist(room, batch, direct=True)
        except BaseException as exc:
            room.inline = None
            first_failure = exc if isinstance(exc, Exception) else None
            if room.task is None:
                loop = asyncio.get_running_loop()
                room.task = loop.create_task(self._persist_loop(room, first_failure))
            if not isinstance(exc, Exception):
                raise  # cancelled: the write itself goes on in the background
            return await self._settled(op)
        room.inline = None
        self._stats.persists += 1
        self._finish(room, batch, results)
        if room.pending and room.task is None:
            room.task = asyncio.get_running_loop().create_task(self._persist_loop(room))
        result = results[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _persist_loop(self, room: _Room, failed: BaseException | None = None) -> None:
        """Send the room's queue in order; ``failed``: how the inline attempt at
        ``room.inflight`` failed (handled as this loop's own first failure)."""
        assert self._store is not None
        loop = asyncio.get_running_loop()
        failures = unexpected = 0
        try:
            while room.pending:
                batch = room.inflight or self._next_batch(room)
                room.inflight = batch
                try:
                    if failed is not None:
                        exc, failed = failed, None
                        raise exc
                    async with room.lock:
                        results = await self._persist(room, batch)
                except Exception as exc:
                    failures += 1
                    self._stats.persist_failures += 1
                    if isinstance(exc, TRANSIENT_ERRORS):
                        unexpected = 0
                    else:
                        # Not a Redis fault: a bug here or in the client library (seen:
                        # redis-py's cluster client under load). Retried a few times so
                        # one glitch loses nothing, never allowed to strand the queue.
                        unexpected += 1
                        # It may have struck after Redis applied the write, half-way
                        # through absorbing the reply: without an epoch the retry (a
                        # replay of the token) brings a whole snapshot, not a patch.
                        room.synced.epoch = ""
                        logger.exception(
                            "room %s: unexpected error persisting %d write(s) (attempt %d)",
                            room.room_id, len(batch.ops), unexpected,
                        )  # fmt: skip
                    given_up = unexpected >= _MAX_UNEXPECTED_FAILURES
                    if given_up and batch.durable_deadline is not None:
                        self._abandon_durable(room, batch, exc)  # its error names the key
                        failures = unexpected = 0
                        continue
                    if given_up or is_permanent(exc):
                        logger.error(
                            "room %s: giving up on %d write(s): %s",
                            room.room_id, len(batch.ops), describe_error(exc),
                        )  # fmt: skip
                        error = PersistError(
                            f"room {room.room_id}: Redis rejected the write: {describe_error(exc)}"
                            if is_permanent(exc)
                            else f"room {room.room_id}: the write failed {unexpected} times in a "
                            f"row and was given up; it may have landed: {describe_error(exc)}",
                            room_id=room.room_id,
                        )
                        error.__cause__ = exc
                        self._finish(room, batch, [error] * len(batch.ops))
                        failures = unexpected = 0
                        continue
                    logger.warning(
                        "room %s: persist of %d write(s) failed (attempt %d): %s",
                        room.room_id,
                        len(batch.ops),
                        failures,
                        describe_error(exc),
                    )
                    now = loop.time()
                    if batch.durable_deadline is not None and now >= batch.durable_deadline:
                        self._abandon_durable(room, batch, exc)
                        failures = unexpected = 0
                        continue
                    delay = min(self._backoff_max, self._backoff_base * 2 ** (failures - 1))
                    delay *= 0.5 + random.random() / 2  # jitter: workers do not retry in lockstep
                    if batch.durable_deadline is not None:
                        delay = min(delay, batch.durable_deadline - now)
                    self._stats.persist_retries += 1
                    await asyncio.sleep(delay)
                    continue
                failures = unexpected = 0
                self._stats.persists += 1
                self._finish(room, batch, results)
        finally:
            room.task = None

    def _next_batch(self, room: _Room) -> _Batch:
        first = room.pending[0]
        ops: list[Op] = [first]
        if first.durable_deadline is None:
            if isinstance(first, AppendOp):
                rows = len(first.rows)
                for op in itertools.islice(room.pending, 1, None):
                    if not isinstance(op, AppendOp) or op.durable_deadline is not None:
                        break
                    if rows + len(op.rows) > _MAX_BATCH_ROWS:
                        break
                    rows += len(op.rows)
                    ops.append(op)
            elif isinstance(first, EditOp):
                # A reaction storm on one message becomes one replace of its row.
                for op in itertools.islice(room.pending, 1, None):
                    if not isinstance(op, EditOp) or op.identity != first.identity:
                        break
                    ops.append(op)
        # The batch is frozen until it succeeds: a retry must resend exactly what
        # the idempotency token named, or an ambiguous first attempt could double.
        return _Batch(ops, first.token, first.durable_deadline)

    async def _persist(self, room: _Room, batch: _Batch, *, direct: bool = False) -> list[Any]:
        """Send one batch; ``direct``: its caller awaits it (see ``_Pipeliner.run``)."""
        assert self._store is not None
        store, synced, keys = self._store, room.synced, room.keys
        first = batch.ops[0]
        # 48 random bits name a room's incarnation; short, as it travels with every call.
        epoch = secrets.token_hex(6)
        if isinstance(first, AppendOp):
            appends: list[AppendOp] = batch.ops  # type: ignore[assignment]
            writes = [(op.token, [row[0] for row in op.rows]) for op in appends]
            reply, flags = await store.append(keys, synced, epoch, writes, direct=direct)
            # Rows of a write whose token had applied are in Redis where its first
            # attempt put them (the reply carries them); only the others are ours now.
            pushed = [row for op, flag in zip(appends, flags, strict=True) if flag == "1"
                      for row in op.rows]  # fmt: skip
            self._absorb(room, reply, pushed)
            if len(pushed) != sum(len(op.rows) for op in appends):
                room.view_stale = True
            return [True] * len(batch.ops)
        if isinstance(first, EditOp):
            return await self._persist_edit(room, batch, direct)
        if isinstance(first, ClearOp):
            reply = await store.clear(keys, synced, batch.token, epoch)
        elif isinstance(first, LimitOp):
            reply = await store.set_limit(
                keys, synced, batch.token, epoch, first.limit, first.rebackfill
            )
        elif isinstance(first, BackfillOp):
            for _attempt in range(_MAX_EDIT_CONFLICTS):
                rows = first.merged(synced.window)
                reply = await store.rewrite(
                    keys, synced, batch.token, epoch, [row[0] for row in rows]
                )
                self._absorb(room, reply)
                if reply.status != 0:
                    return [True]
                self._stats.conflicts += 1
            return [
                PersistError(
                    f"room {room.room_id}: backfill kept conflicting", room_id=room.room_id
                )
            ]
        else:  # pragma: no cover - every Op subclass is handled above
            raise TypeError(f"unknown write {first!r}")
        self._absorb(room, reply)
        return [True]

    async def _persist_edit(self, room: _Room, batch: _Batch, direct: bool) -> list[Any]:
        assert self._store is not None
        synced = room.synced
        edits: list[EditOp] = batch.ops  # type: ignore[assignment]
        identity = edits[0].identity
        for _attempt in range(_MAX_EDIT_CONFLICTS):
            index = synced.window.find_last(identity)
            if index is None:
                room.view_stale = True  # the view may still show the edit
                return [False] * len(edits)
            old_row = synced.window.rows[index]
            try:
                new_row = old_row
                for edit in edits:
                    new_row = edit.edited_row(new_row)
            except InvalidMessage as exc:
                return [exc] * len(edits)
            position = synced.head + index
            reply = await self._store.replace(
                room.keys, synced, batch.token, position, old_row, new_row, direct=direct
            )
            self._absorb(room, reply)
            if reply.status == 1 and reply.kind == 1:
                here = position - synced.head
                if 0 <= here < len(synced.window):
                    synced.window.set(here, new_row, identity, synced.window.roles[here])
            if reply.status != 0:
                return [True] * len(edits)
            # Someone changed the entry since we last saw it: the reply brought us
            # up to date, so re-apply the edit on top of their version.
            self._stats.conflicts += 1
        error = PersistError(
            f"room {room.room_id}: edit of {identity} kept conflicting", room_id=room.room_id
        )
        return [error] * len(edits)

    def _absorb(self, room: _Room, reply: SyncReply, own_rows: Sequence[Row] = ()) -> None:
        if reply.kind == 2 or reply.replaced or reply.rows:
            room.view_stale = True
        self._stats.corrupt_rows += apply_reply(room.synced, reply, room.room_id, own_rows)

    def _finish(self, room: _Room, batch: _Batch, results: list[Any]) -> None:
        for op, result in zip(batch.ops, results, strict=True):
            room.pending.popleft()
            if op.done is not None and not op.done.done():
                if isinstance(result, Exception):
                    op.done.set_exception(result)
                else:
                    op.done.set_result(result)
        room.inflight = None
        if room.view_stale:
            self._rebuild_view(room)

    def _abandon_durable(self, room: _Room, batch: _Batch, cause: BaseException) -> None:
        self._stats.durable_failures += 1
        for op in batch.ops:
            room.pending.remove(op)
            if op.done is not None and not op.done.done():
                error = DurabilityError(
                    f"room {room.room_id}: write not confirmed by Redis within "
                    f"{self._durable_timeout}s ({describe_error(cause)})",
                    room_id=room.room_id,
                    idempotency_key=op.token,
                )
                error.__cause__ = cause
                op.done.set_exception(error)
        if room.inflight is batch:
            room.inflight = None
        self._rebuild_view(room)

    def _rebuild_view(self, room: _Room) -> None:
        room.view_stale = False
        view = room.synced.copy()
        landed = room.inflight.ops if room.inflight is not None and room.inflight.landed else []
        # Runs of appends are pushed at once and trimmed once: the same window as
        # one trim per append (trimming keeps a suffix), at a fraction of the
        # cost when a long outage has queued many thousands of writes.
        run: list[Row] = []
        for op in room.pending:
            if any(op is done for done in landed):
                continue  # already in synced: it landed before its reply was lost
            if isinstance(op, AppendOp):
                run.extend(op.rows)
                continue
            if run:
                _push_trimmed(view, run, self._max_history)
                run = []
            # An op that no longer applies (its entry left the window) will be
            # settled by its own persist; the view simply lacks its effect.
            try:
                op.apply(view, self._max_history)
            except InvalidMessage:
                pass
            except Exception:  # a bug must not leave the room's queue unsettled
                logger.exception("room %s: could not re-apply a pending write", room.room_id)
        if run:
            _push_trimmed(view, run, self._max_history)
        room.view = view

    async def _refresh(self, room: _Room) -> None:
        assert self._store is not None
        async with room.lock:
            batch = room.inflight
            reply = await self._store.sync(room.keys, room.synced, batch.tokens() if batch else ())
            landed = False
            if batch is not None and reply.status == 2 and not batch.landed:
                batch.landed = landed = True
            if reply.kind == 0 and reply.version == room.synced.version and not landed:
                return
            self._absorb(room, reply)
            if reply.kind == 2:
                self._stats.reloads += 1
            else:
                self._stats.catch_ups += 1
            self._rebuild_view(room)


# ---------------------------------------------------------------- helpers


def _push_trimmed(state: RoomState, rows: list[Row], default_limit: int) -> None:
    limit = state.limit or default_limit
    # A window keeps at most ``limit`` rows, so older rows of the run cannot survive.
    state.window.extend(rows[-limit:])
    state.window.trim(limit)


def _clamp_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"channel limit must be an int, not {type(limit).__name__}")
    return max(MIN_CHANNEL_LIMIT, min(MAX_CHANNEL_LIMIT, limit))


def _system(text: str) -> Entry:
    return {"role": "system", "content": text}


def _context(room_id: str, room_context: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"room_id": room_id, **(room_context or {})}


async def _call(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


def _consume_exception(future: asyncio.Future[Any]) -> None:
    # A sync-form write has nobody awaiting its future; reading the exception
    # keeps asyncio from reporting it as never retrieved.
    if not future.cancelled():
        future.exception()


def _archive_ttl_ms(config: ConsolidationConfig | None) -> int | None:
    seconds = config.archive_ttl_seconds if config is not None else None
    return None if seconds is None else max(1, int(seconds * 1000))


def _check_replication(
    redis: Any, min_replicas: int, replica_timeout_ms: int, command_timeout: float | None
) -> None:
    if isinstance(min_replicas, bool) or not isinstance(min_replicas, int) or min_replicas < 0:
        raise ConfigurationError(f"min_replicas must be an int >= 0, got {min_replicas!r}")
    # WAIT 0 would block until the replicas answer, however long that takes.
    _positive_int("replica_timeout_ms", replica_timeout_ms)
    if not min_replicas:
        return
    if redis is None:
        raise ConfigurationError("min_replicas needs a redis client: memory has no replicas")
    if command_timeout is not None and command_timeout * 1000 <= replica_timeout_ms:
        raise ConfigurationError(
            f"command_timeout ({command_timeout}s) must exceed replica_timeout_ms "
            f"({replica_timeout_ms} ms): every write waits up to that long for its WAIT"
        )


def _reject_decoding_client(redis: Any) -> None:
    if redis is None:
        return
    get_encoder = getattr(redis, "get_encoder", None)
    if get_encoder is None:
        return
    try:
        decoding = bool(get_encoder().decode_responses)
    except Exception:  # an unusual client shape: let the first command tell
        return
    if decoding:
        raise ConfigurationError(
            "the redis client must be created with decode_responses=False: "
            "the engine stores and compares raw bytes"
        )
