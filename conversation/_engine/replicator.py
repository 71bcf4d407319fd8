"""Keeping each room's memory and Redis converging: the replication engine.

Each room keeps two states: *synced*, an exact mirror of Redis at some
(epoch, version), and the *view*, which is synced plus this worker's writes that
Redis has not confirmed yet. Writes change the view at once and queue; one
persist task per room sends the queue in order, and every script reply carries
what other workers changed meanwhile, so synced stays exact without extra reads.

Two backends share one interface: ``Replicator`` mirrors rooms to Redis;
``MemoryBackend`` keeps them in this process only (no Redis), where a write is
done once its local effect is applied.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Sequence
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError

from .._deferred import MAX_DEFERRED_MESSAGES, MAX_DEFERRED_PER_MESSAGE, identity_field
from .._errors import (
    BacklogFull,
    DurabilityError,
    InvalidMessage,
    PersistError,
    RedisUnavailable,
    describe_error,
)
from .._redis.replies import SyncReply
from .._redis.retry import TRANSIENT_ERRORS, is_permanent
from .._redis.rooms import RoomStore
from .._stats import Stats
from .ops import MAX_CONFLICTS, AppendOp, Op, now_ms
from .push import Push
from .rooms import Batch, Room, RoomTable
from .settings import Settings
from .window import Held, RoomState, apply_reply, decode_rows, needs_slices

logger = logging.getLogger(__name__)

# A batch that keeps failing with an exception no one expected (a bug here or in
# the client library) is failed after this many attempts in a row.
MAX_UNEXPECTED_FAILURES = 5


class Deferral(enum.Enum):
    """What became of an event for a message the room did not hold."""

    KEPT = "kept"  # it waits for the message
    FOUND = "found"  # the message arrived meanwhile: apply the event now
    REFUSED = "refused"  # the room has as many events waiting as it may


class Verdict(enum.Enum):
    RETRY = "retry"  # after a backoff
    GIVE_UP = "give up"  # settle the batch with PersistError
    ABANDON = "abandon"  # a durable batch: withdraw it with DurabilityError


def judge_failure(
    exc: BaseException, *, unexpected: int, durable_deadline: float | None, now: float
) -> Verdict:
    """What to do with a batch whose persist just failed with ``exc``.

    ``unexpected``: failures in a row that were not Redis faults (bugs).
    """
    given_up = unexpected >= MAX_UNEXPECTED_FAILURES
    if given_up and durable_deadline is not None:
        return Verdict.ABANDON  # its DurabilityError names the key to re-send with
    if given_up or is_permanent(exc):
        return Verdict.GIVE_UP
    if durable_deadline is not None and now >= durable_deadline:
        return Verdict.ABANDON
    return Verdict.RETRY


class Backend(Protocol):
    """How the facade's writes and reads reach (or do not reach) Redis."""

    def apply(
        self, room: Room, op: Op, loop: asyncio.AbstractEventLoop | None, inline: bool = False
    ) -> bool: ...

    async def settle(self, room: Room, op: Op) -> Any: ...

    async def settle_durable(self, room: Room, op: Op, deadline: float) -> Any: ...

    async def ensure_fresh(self, room: Room) -> None: ...

    async def defer(self, room: Room, identity: str, event: bytes, keep_ms: int) -> Deferral: ...

    async def refresh(self, room: Room) -> None: ...

    async def absorb(self, room: Room, reply: SyncReply, own_rows: Sequence[Held] = ()) -> None: ...

    def rebuild_view(self, room: Room) -> None: ...

    def moved(self, loop: asyncio.AbstractEventLoop) -> int: ...

    def fail_waiters(self, why: str) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """No Redis: the view is the only copy, and a write is done once applied."""

    def __init__(self, rooms: RoomTable, stats: Stats, settings: Settings) -> None:
        self.rooms, self.stats, self.settings = rooms, stats, settings

    def apply(
        self, room: Room, op: Op, loop: asyncio.AbstractEventLoop | None, inline: bool = False
    ) -> bool:
        found = op.apply(room.view, self.settings.max_history)
        op.count(self.stats)
        return found

    async def settle(self, room: Room, op: Op) -> Any:
        return True

    async def settle_durable(self, room: Room, op: Op, deadline: float) -> Any:
        return True

    async def ensure_fresh(self, room: Room) -> None:
        return None

    async def defer(self, room: Room, identity: str, event: bytes, keep_ms: int) -> Deferral:
        return self.keep(room, identity, event, keep_ms)

    def keep(self, room: Room, identity: str, event: bytes, keep_ms: int) -> Deferral:
        """``defer`` without a loop: the view is the only copy (sync forms call it)."""
        state = room.view
        if state.window.find_last(identity) is not None:
            return Deferral.FOUND
        if state.deferred is None:
            state.deferred = {}
        now = now_ms()
        waiting = [(expiry, e) for expiry, e in state.deferred.get(identity, []) if expiry > now]
        if not waiting and len(state.deferred) >= MAX_DEFERRED_MESSAGES:
            for other in list(state.deferred):
                if all(expiry <= now for expiry, _ in state.deferred[other]):
                    del state.deferred[other]
        if (not waiting and len(state.deferred) >= MAX_DEFERRED_MESSAGES) or len(
            waiting
        ) >= MAX_DEFERRED_PER_MESSAGE:
            self.stats.deferred_refused += 1
            return Deferral.REFUSED
        waiting.append((now + keep_ms, event))
        state.deferred[identity] = waiting
        self.stats.deferred_events += 1
        return Deferral.KEPT

    async def refresh(self, room: Room) -> None:
        return None

    async def absorb(self, room: Room, reply: SyncReply, own_rows: Sequence[Held] = ()) -> None:
        raise TypeError("a memory-only engine receives no script replies")

    def rebuild_view(self, room: Room) -> None:
        return None

    def moved(self, loop: asyncio.AbstractEventLoop) -> int:
        for room in self.rooms:
            room.lock = asyncio.Lock()  # consolidation may hold it; it was the old loop's
        return 0

    def fail_waiters(self, why: str) -> None:
        return None

    async def close(self) -> None:
        return None


class _Link:
    """One room as its writes' remote effects see it (see ``ops.Link``)."""

    __slots__ = ("keys", "replicator", "room", "room_id", "stats", "store", "synced")

    def __init__(self, replicator: Replicator, room: Room) -> None:
        self.replicator, self.room = replicator, room
        self.room_id, self.keys, self.synced = room.room_id, room.keys, room.synced
        self.store, self.stats = replicator.store, replicator.stats

    async def absorb(self, reply: SyncReply, own_rows: Sequence[Held] = ()) -> None:
        await self.replicator.absorb(self.room, reply, own_rows)

    def mark_view_stale(self) -> None:
        self.room.view_stale = True


class Replicator:
    """Persist loops, inline persists, durable deadlines and catch-up, per room."""

    def __init__(
        self, store: RoomStore, rooms: RoomTable, stats: Stats, settings: Settings
    ) -> None:
        self.store, self.rooms, self.stats, self.settings = store, rooms, stats, settings
        # freshness="push": every sync tells it what stood when it began.
        self.push: Push | None = None

    # ------------------------------------------------------------- queueing

    def apply(
        self, room: Room, op: Op, loop: asyncio.AbstractEventLoop | None, inline: bool = False
    ) -> bool:
        if len(room.pending) >= self.settings.max_pending:
            raise BacklogFull(room.room_id, self.settings.max_pending)
        if op.keeps_own_token and op.token in room.confirmed_keys:
            # A recall of a write Redis confirmed to this worker: synced holds it,
            # so the view does not take it again (a read that cannot reach Redis
            # serves the view as it is). Its re-send still goes out and settles it.
            op.landed = found = True
        else:
            found = op.apply(room.view, self.settings.max_history)
        op.count(self.stats)
        if not found or loop is None:
            return found
        op.done = loop.create_future()
        op.done.add_done_callback(consume_exception)
        op.awaited = op.awaited or inline
        if inline and not room.pending and room.task is None and not room.lock.locked():
            # An idle room and a caller about to await: it persists the write
            # itself (persist_inline), skipping a task, a shield and four loop
            # iterations per write.
            room.inline = op
        room.pending.append(op)
        if room.task is None and room.inline is None:
            room.task = loop.create_task(self._persist_loop(room))
        return True

    async def settle(self, room: Room, op: Op) -> Any:
        """Wait for a submitted write; the caller persists it itself when it may."""
        if room.inline is op:
            return await self._persist_inline(room, op)
        if op.done is None:
            return True
        return await asyncio.shield(op.done)

    async def settle_durable(self, room: Room, op: Op, deadline: float) -> Any:
        """Wait for a durable write, no longer than its deadline even while it is queued."""
        if op.done is None:
            return True
        remaining = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            async with asyncio.timeout(remaining):
                return await asyncio.shield(op.done)
        except TimeoutError:
            pass
        inflight = room.inflight.ops if room.inflight is not None else []
        if op in room.pending and not any(op is o for o in inflight):
            # Still queued behind writes that cannot land: never sent, so it is
            # withdrawn cleanly. (If it is being sent, its own persist settles it.)
            cause = TimeoutError("queued behind writes Redis has not confirmed")
            self._abandon_durable(room, Batch([op], op.token, deadline), cause)
        return await asyncio.shield(op.done)

    def fail_waiters(self, why: str) -> None:
        """Settle every unconfirmed write's future, so no caller awaits it forever.

        The writes themselves stay queued (unless the manager closes): they may
        still land, and the error's key re-sends one exactly once.
        """
        for room in self.rooms:
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

    def moved(self, loop: asyncio.AbstractEventLoop) -> int:
        """The previous loop closed, and with it every task and future it ran.

        Whatever was queued and unconfirmed is sent again from ``loop``, under
        the same tokens, so nothing is lost or doubled. Returns how many rooms
        resume writing.
        """
        resumed = 0
        for room in self.rooms:
            room.lock = asyncio.Lock()
            room.task = None
            room.inline = None
            for op in room.pending:
                op.done = loop.create_future()
                op.done.add_done_callback(consume_exception)
            if room.pending:
                room.task = loop.create_task(self._persist_loop(room))
                resumed += 1
        self.store.rebind()
        return resumed

    async def close(self) -> None:
        tasks = [room.task for room in self.rooms if room.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.fail_waiters("the manager closed before Redis confirmed it")
        await self.store.wait_idle()

    # ----------------------------------------------------------- persisting

    async def _persist_inline(self, room: Room, op: Op) -> Any:
        """Persist ``op`` (alone at the head of an idle room's queue) in the caller's task.

        The same frozen batch and token as the persist loop would send. Writes
        submitted meanwhile queue behind it; once it is settled, a persist task
        takes them. If the attempt fails, or the caller is cancelled mid-flight,
        the batch (maybe landed: its token tells) goes to the persist loop, which
        retries it as its own, and the caller waits as any other would.
        """
        batch = Batch([op], op.token, None)
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
            assert op.done is not None
            return await asyncio.shield(op.done)
        room.inline = None
        self.stats.persists += 1
        self._finish(room, batch, results)
        if room.pending and room.task is None:
            room.task = asyncio.get_running_loop().create_task(self._persist_loop(room))
        result = results[0]
        if isinstance(result, Exception):
            raise result
        return result

    async def _persist_loop(self, room: Room, failed: BaseException | None = None) -> None:
        """Send the room's queue in order; ``failed``: how the inline attempt at
        ``room.inflight`` failed (handled as this loop's own first failure)."""
        loop = asyncio.get_running_loop()
        this_task = asyncio.current_task()
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
                    self.stats.persist_failures += 1
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
                    now = loop.time()
                    verdict = judge_failure(
                        exc, unexpected=unexpected, durable_deadline=batch.durable_deadline, now=now
                    )
                    if verdict is Verdict.GIVE_UP:
                        self._give_up(room, batch, exc, unexpected)
                        failures = unexpected = 0
                        continue
                    if unexpected < MAX_UNEXPECTED_FAILURES:
                        logger.warning(
                            "room %s: persist of %d write(s) failed (attempt %d): %s",
                            room.room_id, len(batch.ops), failures, describe_error(exc),
                        )  # fmt: skip
                    if verdict is Verdict.ABANDON:
                        self._abandon_durable(room, batch, exc)
                        failures = unexpected = 0
                        continue
                    delay = self.settings.backoff.delay(failures)
                    if batch.durable_deadline is not None:
                        delay = min(delay, batch.durable_deadline - now)
                    self.stats.persist_retries += 1
                    await asyncio.sleep(delay)
                    continue
                failures = unexpected = 0
                self.stats.persists += 1
                self._finish(room, batch, results)
        finally:
            # A task that a closed loop left pending is finalized whenever it is
            # collected, after moved() gave the room a new task: that slot is not its own.
            if room.task is this_task:
                room.task = None

    def _next_batch(self, room: Room) -> Batch:
        first = room.pending[0]
        # The batch is frozen until it succeeds: a retry must resend exactly what
        # the idempotency token named, or an ambiguous first attempt could double.
        return Batch(first.gather(room.pending), first.token, first.durable_deadline)

    async def _persist(self, room: Room, batch: Batch, *, direct: bool = False) -> list[Any]:
        """Send one batch; ``direct``: its caller awaits it (see ``Pipeliner.run``)."""
        # 48 random bits name a room's incarnation; short, as it travels with every call.
        epoch = secrets.token_hex(6)
        return await batch.ops[0].send(batch.ops, _Link(self, room), epoch, direct)

    def _give_up(self, room: Room, batch: Batch, exc: Exception, unexpected: int) -> None:
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

    async def absorb(self, room: Room, reply: SyncReply, own_rows: Sequence[Held] = ()) -> None:
        """Bring the room's synced state to ``reply`` (its caller holds ``room.lock``).

        A big reply (a snapshot, a long catch-up) is decoded in slices that yield
        to the loop, then applied in one step.
        """
        synced = room.synced
        decoded = None
        if reply.kind != 0 and needs_slices(reply.rows):
            base = (synced.epoch, synced.version, synced.head, synced.size)
            decoded = await decode_rows(reply.rows, room.room_id, self.stats)
            if reply.kind == 1 and (synced.epoch, synced.version, synced.head, synced.size) != base:
                # Another absorb got in while the rows were decoded (every caller
                # holds room.lock, so none should): this patch no longer fits, and
                # the next call brings a snapshot instead.
                logger.error("room %s: a catch-up went stale while decoding", room.room_id)
                synced.epoch = ""
                room.view_stale = True
                return
        if (
            reply.kind == 2
            or reply.replaced
            or reply.rows
            # Another worker's limit change (and the trim it made) may come back in
            # the reply to our own write, with no rows: the view must take it too.
            or (reply.kind == 1 and reply.limit != synced.limit)
            or (reply.kind == 1 and reply.rebackfill != synced.rebackfill)
        ):
            room.view_stale = True
        self.stats.corrupt_rows += apply_reply(synced, reply, room.room_id, own_rows, decoded)

    def _finish(self, room: Room, batch: Batch, results: list[Any]) -> None:
        confirmed: set[str] = set()
        for op, result in zip(batch.ops, results, strict=True):
            room.pending.popleft()
            if result is True and isinstance(op, AppendOp) and op.keyed:
                confirmed.add(op.token)
            if op.done is not None and not op.done.done():
                if isinstance(result, Exception):
                    op.done.set_exception(result)
                else:
                    op.done.set_result(result)
            if isinstance(result, Exception) and not op.awaited:
                # A sync write that Redis refused (a reaction on a full message, an
                # edit outgrowing the row limit once merged): nobody awaits it, so
                # say so rather than drop it without a trace.
                self.stats.writes_refused += 1
                logger.warning("room %s: a write was refused: %s", room.room_id,
                               describe_error(result))  # fmt: skip
        room.inflight = None
        if confirmed:
            self._remember_confirmed(room, confirmed)
        if room.view_stale:
            self.rebuild_view(room)

    def _remember_confirmed(self, room: Room, keys: set[str]) -> None:
        remembered = room.confirmed_keys
        for key in keys:
            remembered.pop(key, None)
            remembered[key] = None
        while len(remembered) > _CONFIRMED_KEYS_KEPT:
            del remembered[next(iter(remembered))]
        # Recalls of these keys queued while the first send was in flight are in
        # the view on top of what synced now holds: they landed too.
        for op in room.pending:
            if op.keeps_own_token and not op.landed and op.token in keys:
                op.landed = room.view_stale = True

    def _abandon_durable(self, room: Room, batch: Batch, cause: BaseException) -> None:
        self.stats.durable_failures += 1
        for op in batch.ops:
            room.pending.remove(op)
            if op.done is not None and not op.done.done():
                error = DurabilityError(
                    f"room {room.room_id}: write not confirmed by Redis within "
                    f"{self.settings.durable_timeout}s ({describe_error(cause)})",
                    room_id=room.room_id,
                    idempotency_key=op.token,
                )
                error.__cause__ = cause
                op.done.set_exception(error)
        if room.inflight is batch:
            room.inflight = None
        self.rebuild_view(room)

    def rebuild_view(self, room: Room) -> None:
        room.view_stale = False
        limit = self.settings.max_history
        view = room.synced.copy()
        # Runs of appends are pushed at once and trimmed once: the same window as
        # one trim per append (trimming keeps a suffix), at a fraction of the
        # cost when a long outage has queued many thousands of writes.
        run: list[Held] = []
        for op in room.pending:
            if op.landed:
                continue  # already in synced: it landed before (a lost reply, a recall)
            rows = op.appended_rows()
            if rows is not None:
                run.extend(rows)
                continue
            if run:
                _push_trimmed(view, run, limit)
                run = []
            # An op that no longer applies (its entry left the window) will be
            # settled by its own persist; the view simply lacks its effect.
            try:
                op.apply(view, limit)
            except InvalidMessage:
                pass
            except Exception:  # a bug must not leave the room's queue unsettled
                logger.exception("room %s: could not re-apply a pending write", room.room_id)
        if run:
            _push_trimmed(view, run, limit)
        room.view = view

    # ------------------------------------------------------------ catching up

    async def refresh(self, room: Room) -> None:
        """Bring the room to what Redis holds, in one round trip."""
        async with room.lock:
            mark = self.push.begin(room) if self.push is not None else None
            tokens, owners = self._unconfirmed(room)
            reply, flags = await self.store.sync_asking(room.keys, room.synced, tokens)
            landed = False
            for ops, flag in zip(owners, flags or "1" * len(owners), strict=True):
                for op in ops:
                    if flag == "2" and not op.landed:
                        op.landed = landed = True
            if not (reply.kind == 0 and reply.version == room.synced.version and not landed):
                await self.absorb(room, reply)
                if reply.kind == 2:
                    self.stats.reloads += 1
                else:
                    self.stats.catch_ups += 1
                self.rebuild_view(room)
            if mark is not None and self.push is not None:
                self.push.end(room, mark)

    async def defer(self, room: Room, identity: str, event: bytes, keep_ms: int) -> Deferral:
        """Keep ``event`` in Redis until its message comes, if the room still lacks it."""
        field = identity_field(identity)
        lost = 0
        for _attempt in range(MAX_CONFLICTS):
            async with room.lock:
                if (
                    room.synced.window.find_last(identity) is not None
                    or room.view.window.find_last(identity) is not None
                ):
                    return Deferral.FOUND
                try:
                    reply = await self.store.defer(
                        room.keys,
                        room.synced,
                        field,
                        event,
                        now_ms=now_ms(),
                        keep_ms=keep_ms,
                        max_messages=MAX_DEFERRED_MESSAGES,
                        max_events=MAX_DEFERRED_PER_MESSAGE,
                    )
                except TRANSIENT_ERRORS as exc:
                    # As a catch-up: a pooled connection a restart or failover closed
                    # fails at once (having sent nothing); the next attempt takes
                    # another. Anything else: the caller learns Redis could not be asked.
                    lost += 1
                    if isinstance(exc, _LOST_CONNECTION) and lost < _SYNC_ATTEMPTS:
                        continue
                    raise RedisUnavailable(
                        f"room {room.room_id}: cannot keep an event for message "
                        f"{identity!r:.80}: {describe_error(exc)}",
                        room_id=room.room_id,
                    ) from exc
                await self.absorb(room, reply)
                if room.view_stale:
                    self.rebuild_view(room)
            if reply.status == 1:
                self.stats.deferred_events += 1
                return Deferral.KEPT
            if reply.status == 3:
                self.stats.deferred_refused += 1
                return Deferral.REFUSED
            # The room moved on since we looked: the reply brought us up to date.
        self.stats.deferred_refused += 1
        return Deferral.REFUSED

    def _unconfirmed(self, room: Room) -> tuple[list[str], list[list[Op]]]:
        """The tokens a catch-up asks about, with the writes each one names.

        The batch in flight (an attempt may have timed out after Redis took it),
        then the appends queued behind it (a recall of a write that landed long
        ago), up to a bound. A batch of another kind is remembered under one token.
        """
        batch = room.inflight
        tokens: list[str] = []
        owners: list[list[Op]] = []
        if batch is not None:
            if batch.ops[0].keeps_own_token:
                tokens.extend(op.token for op in batch.ops)
                owners.extend([op] for op in batch.ops)
            else:
                tokens.append(batch.token)
                owners.append(list(batch.ops))
        sent = {id(op) for op in batch.ops} if batch is not None else set()
        for op in room.pending:
            if len(tokens) >= _MAX_ASKED_TOKENS:
                break
            if op.keeps_own_token and not op.landed and id(op) not in sent:
                tokens.append(op.token)
                owners.append([op])
        return tokens, owners

    async def ensure_fresh(self, room: Room) -> None:
        """Wait for this worker's writes to the room, then match Redis exactly."""
        if room.pending:
            await self._wait_for(room, room.pending[-1])
        for attempt in range(_SYNC_ATTEMPTS):
            try:
                await self.refresh(room)
                return
            except TRANSIENT_ERRORS as exc:
                # A pooled connection that a restart, failover or CLIENT KILL closed
                # fails at once; the next attempt takes another (or a new) one. A
                # timeout is not retried: the caller asked to know, not to wait.
                stale = isinstance(exc, _LOST_CONNECTION)
                if stale and attempt + 1 < _SYNC_ATTEMPTS:
                    continue
                raise RedisUnavailable(
                    f"room {room.room_id}: cannot sync with Redis: {describe_error(exc)}",
                    room_id=room.room_id,
                ) from exc

    async def _wait_for(self, room: Room, op: Op) -> None:
        if op.done is None:
            return
        timeout = self.settings.sync_timeout
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(op.done)
        except TimeoutError as exc:
            raise RedisUnavailable(
                f"room {room.room_id}: writes still unconfirmed after {timeout}s",
                room_id=room.room_id,
            ) from exc
        except DurabilityError:
            pass  # the writer was told; the room is in a consistent state again


_SYNC_ATTEMPTS = 3
# Confirmed caller keys a room remembers (Room.confirmed_keys): a recall of an
# older one is in the view until its re-send or a catch-up settles it.
_CONFIRMED_KEYS_KEPT = 64
# Tokens one catch-up asks about (a sync's ARGV): the batch in flight and the
# appends queued behind it.
_MAX_ASKED_TOKENS = 1024
_LOST_CONNECTION = (RedisConnectionError, ConnectionError)


def _push_trimmed(state: RoomState, rows: list[Held], default_limit: int) -> None:
    limit = state.limit or default_limit
    # A window keeps at most ``limit`` rows, so older rows of the run cannot survive.
    state.window.extend(rows[-limit:])
    state.window.trim(limit)


def consume_exception(future: asyncio.Future[Any]) -> None:
    # A sync-form write has nobody awaiting its future; reading the exception
    # keeps asyncio from reporting it as never retrieved.
    if not future.cancelled():
        future.exception()
