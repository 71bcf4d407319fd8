"""Consolidation: fold a room's oldest turns into a rolling summary, archive them.

When a room passes a threshold (turns or estimated tokens), the oldest part of
its window is summarised by a pluggable async summariser and replaced, in Redis
and atomically (``lua/fold.lua``), by ONE summary entry at the head of the
window; the raw turns go to the room's archive (a capped LIST with a TTL under
the room's hash tag), together with the summary that replaced them.

The summary entry is an ordinary stored entry with a reserved identity:
``role == "system"`` and ``message_id == "summary:<n>"`` (``n`` counts the
folds of the rolling summary). Both must hold: a user who types
``[Message ID: summary:1]`` only ever makes a user entry with that identity. It
is handed to the model like any turn (``{"role": "system", "content": ...}``),
right after the system prompt. The next fold feeds its text to the summariser
(the ``summary`` variable of the ``consolidation`` template) and folds the old
entry away with the turns, so there is always at most one, at the head.

The fold is planned on this worker's exact mirror of Redis and sent with the
epoch, head position and version it was planned at: the script reads the
room's log of replaced rows to see whether any folded row changed since that
version, so no call ever hashes (or even reads) every folded row. If anything
changed there meanwhile (an edit of a folded turn, a clear, a trim, another
consolidator's fold) nothing is written, the reply brings the worker up to
date, and the fold is planned again on the fresh window (the summariser runs
again only if the turns to fold changed), up to ``max_attempts`` times. Turns
appended meanwhile by any worker are never touched. A summariser that raises
or is cancelled changes nothing: nothing is written before it returns.

The archived rows go to the archive one element each (so every archive record
is bounded by the size of a row), about ``ARCHIVE_CALL_BYTES`` of them per
script call: a big fold stages its first rows with ``lua/archive_stage.lua``
(which copies them from the window inside Redis), and the fold script itself
copies the last ones, adds the commit record (the summary) and makes them all
part of the archive at once. The archive is capped in folds and in bytes,
oldest folds first.

Consolidation reaches the engine through ``_engine.core.Core`` only (rooms,
their lock and synced state, the store, the key space); the manager's public
``should_consolidate``, ``consolidate`` and ``list_archives`` delegate here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import orjson

from .._changes.cursor import Cursor, decode_cursor
from .._engine.replicator import consume_exception
from .._engine.window import RoomState
from .._entries import (
    SUMMARY_ID_PREFIX,
    SUMMARY_ROLE,
    Entry,
    build_entry,
    decode_row,
    is_summary,
    to_messages_yielding,
)
from .._errors import (
    ConfigurationError,
    ConsolidationError,
    InvalidCursor,
    RedisUnavailable,
    describe_error,
)
from .._redis.keys import validate_room_id
from .._redis.replies import SyncReply
from .._redis.retry import TRANSIENT_ERRORS, is_permanent
from .._redis.rooms import index_ranges
from .archive import ArchiveAssembler, ArchiveMoved, batch_of, read_archive
from .config import ConsolidationConfig
from .plan import (
    FoldPlan,
    can_fold,
    clean_summary,
    estimate_room_tokens,
    plan_fold,
    window_tokens,
)
from .records import ArchiveBatch, ConsolidationResult, Summarizer
from .summarizer import ExtractiveSummarizer

if TYPE_CHECKING:
    from .._engine.core import Core
    from .._engine.rooms import Room
    from .._redis.rooms import RoomStore


from .plan import TOKEN_SLICE_BYTES

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_FOLD_SEND_ATTEMPTS = 3
_FOLD_SEND_BACKOFF = 0.05


# ------------------------------------------------------------------ the engine


class PromptSource(Protocol):
    """What renders the summariser's prompt (``PromptRenderer`` by default)."""

    def render_async(self, room_context: Mapping[str, Any] | None = None) -> Awaitable[str]: ...


class _KeyedLocks:
    """One asyncio lock per room, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class HasConsolidation(Protocol):
    """What a worker is given: a ``ConversationManager`` (its consolidation part)."""

    _consolidation: Consolidator


class Consolidator:
    """Consolidation for one manager; the manager's public methods delegate here."""

    def __init__(
        self,
        core: Core,
        config: ConsolidationConfig | None = None,
        *,
        renderer: PromptSource | None = None,
    ) -> None:
        if config is not None and not isinstance(config, ConsolidationConfig):
            raise ConfigurationError("consolidation must be a ConsolidationConfig")
        self.config = config or ConsolidationConfig()
        if self.config.wait_for_cursors and core.store is None:
            raise ConfigurationError(
                "wait_for_cursors needs Redis (named cursors live there): this manager "
                "is memory-only"
            )
        self._engine = core
        self._renderer = renderer
        self._default = ExtractiveSummarizer()
        self._locks = _KeyedLocks()
        # Folds in flight: each is seen through even if its caller is cancelled,
        # and the manager's aclose waits for them.
        self._folds: set[asyncio.Task[bool]] = set()
        # Memory-only managers keep archives here (one process, no Redis).
        self._memory_archive: dict[str, list[_MemoryFold]] = {}

    def rebind(self) -> None:
        """The manager moved to a new event loop: locks of the old one are dropped."""
        self._locks = _KeyedLocks()
        self._folds = set()  # they ran on the closed loop, and died with it

    async def wait_idle(self) -> None:
        """Wait until no fold is in flight (the manager's ``aclose``)."""
        while self._folds:
            await asyncio.gather(*self._folds, return_exceptions=True)

    # ------------------------------------------------------------------ checks

    def should_consolidate(self, room_id: str) -> bool:
        """O(rows) once the rows' token estimates are known (``prepare`` makes them
        without stalling the loop); a row is parsed for its estimate only once."""
        config = self.config
        room = self._engine.room(room_id)
        state = room.view
        if not self._past_turns(state) and (
            window_tokens(room, state.window.healthy_cells()) <= config.max_tokens
        ):
            return False
        return can_fold(state, config, config.keep_recent)

    async def prepare(self, room_id: str) -> None:
        """Estimate the tokens of rows ``should_consolidate`` has not seen, in slices."""
        room = self._engine.room(room_id)
        if not self._past_turns(room.view):
            await estimate_room_tokens(room, room.view.window.healthy_cells())

    def _past_turns(self, state: RoomState) -> bool:
        config = self.config
        turns = len(state.window) - state.window.corrupt
        limit = min(config.max_turns, max(1, int(self._engine.limit(state) * config.max_fill)))
        return turns > limit

    # ----------------------------------------------------------------- folding

    async def consolidate(
        self,
        room_id: str,
        summarize: Summarizer | None = None,
        *,
        keep_recent: int | None = None,
        room_context: Mapping[str, Any] | None = None,
    ) -> ConsolidationResult:
        keep = self.config.keep_recent if keep_recent is None else keep_recent
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ConfigurationError(f"keep_recent must be an int >= 0, got {keep!r}")
        engine = self._engine
        validate_room_id(room_id)
        async with self._locks.hold(room_id):
            if engine.store is not None:
                await engine.ensure_fresh(room_id)
            room = engine.room(room_id)
            summaries: list[_Summarised] = []
            attempts = calls = 0
            while True:
                state = room.synced if engine.store is not None else room.view
                read_limit = await self._read_limit(room_id, state)
                plan = await plan_fold(state, self.config, keep, read_limit)
                if plan is None:
                    outcome: Literal["nothing_to_fold", "waiting_for_cursors"] = (
                        "waiting_for_cursors"
                        if read_limit is not None and can_fold(state, self.config, keep)
                        else "nothing_to_fold"
                    )
                    return ConsolidationResult(room_id, outcome, 0, None, attempts, calls)
                if attempts >= self.config.max_attempts:
                    logger.warning(
                        "room %s: consolidation gave up after %d conflicting folds",
                        room_id,
                        attempts,
                    )
                    return ConsolidationResult(room_id, "conflict", 0, None, attempts, calls)
                text = await _known_summary(summaries, plan)
                if text is None:
                    text = await self._summarize(room_id, plan, summarize, room_context)
                    summaries.append(_Summarised(plan, None, text))
                    calls += 1
                attempts += 1
                if await self._fold(room, plan, text):
                    room.token_estimates = {}  # the folded rows must not stay referenced
                    engine.count("folds")
                    logger.info(
                        "room %s: folded %d turn(s) into summary %d (attempt %d)",
                        room_id,
                        len(plan.folded),
                        plan.seq,
                        attempts,
                    )
                    return ConsolidationResult(
                        room_id, "folded", len(plan.folded), plan.seq, attempts, calls
                    )
                engine.count("conflicts")
                logger.info(
                    "room %s: the window changed during consolidation; planning again", room_id
                )

    async def _read_limit(self, room_id: str, state: RoomState) -> int | None:
        """How many rows from the window's head every ``wait_for_cursors`` reader has
        read (None: no cursor to wait for). Cursors only move forward, so a limit
        read before the fold is never too generous."""
        store = self._engine.store
        if not self.config.wait_for_cursors or store is None:
            return None
        limit = len(state.window)
        key = self._engine.keyspace.cursors(room_id)
        for name in self.config.wait_for_cursors:
            raw = await store.cursor_get(key, name)
            if raw is None:
                return 0
            try:
                cursor = decode_cursor(room_id, raw.decode("utf-8", "replace"))
            except InvalidCursor:
                logger.warning("room %s: cursor %r is damaged; holding back folds", room_id, name)
                return 0
            if cursor.epoch != state.epoch:
                return 0  # the reader will read this epoch's window from its start
            limit = min(limit, max(0, cursor.head + cursor.size - state.head))
            if cursor.version < state.version:
                limit = min(limit, await self._unread_edits(room_id, cursor, state))
        return limit

    async def _unread_edits(self, room_id: str, cursor: Cursor, state: RoomState) -> int:
        """The window index of the first row replaced after the cursor read it (an
        edit the reader has not seen: a fold must not swallow it), or the window's
        length. The summary a previous fold put at the head does not count; a cursor
        the feed cannot patch (a reset) holds everything back."""
        store = self._engine.store
        assert store is not None
        keys = self._engine.keyspace.room(room_id)
        reason, _folded, reply = await store.changes(keys, cursor)
        if reply.kind == 2 or reason != "i":
            return 0
        first = len(state.window)
        for position, row in reply.replaced:
            meta = decode_row(row)
            if position == reply.head and meta is not None and is_summary(*meta):
                continue
            first = min(first, max(0, position - state.head))
        return first

    async def _summarize(
        self,
        room_id: str,
        plan: FoldPlan,
        summarize: Summarizer | None,
        room_context: Mapping[str, Any] | None,
    ) -> str:
        config = self.config
        context = {
            "room_id": room_id,
            **(room_context or {}),
            "summary": plan.previous_text,
            "max_summary_words": config.max_summary_words,
        }
        prompt = await (await self._prompt_renderer()).render_async(context)
        try:
            if summarize is None:  # the default is given the previous summary directly
                text = await self._default.summarize_rows(
                    plan.folded, plan.previous_text, config.max_summary_words
                )
            else:
                text = await summarize(prompt, await to_messages_yielding(plan.folded))
        except Exception as exc:  # CancelledError is not an Exception: it propagates
            raise ConsolidationError(
                f"room {room_id}: the summariser failed ({type(exc).__name__}); "
                "the room is unchanged",
                room_id=room_id,
            ) from exc
        if not isinstance(text, str) or not text.strip():
            raise ConsolidationError(
                f"room {room_id}: the summariser returned no summary; the room is unchanged",
                room_id=room_id,
            )
        return clean_summary(text, config.max_summary_chars)

    def prepare_renderer(self) -> None:
        """Build the prompt renderer now (blocking: Jinja is imported, templates compiled)."""
        if self._renderer is None:
            self._renderer = _make_renderer(self.config)

    async def _prompt_renderer(self) -> PromptSource:
        if self._renderer is None:
            # Importing Jinja and compiling the templates takes tens of milliseconds:
            # done once, in a thread, so the first fold does not stall the loop.
            renderer = await asyncio.to_thread(_make_renderer, self.config)
            if self._renderer is None:
                self._renderer = renderer
        return self._renderer

    def _summary_row(self, plan: FoldPlan, text: str) -> bytes:
        summary_id = f"{SUMMARY_ID_PREFIX}{plan.seq}"
        return self._engine.encode(
            build_entry(SUMMARY_ROLE, self.config.summary_prefix + text, message_id=summary_id)
        )

    def _record_meta(self, plan: FoldPlan, text: str) -> dict[str, Any]:
        """What the fold's commit record says besides its turns."""
        return {
            "seq": plan.seq,
            "summary_id": f"{SUMMARY_ID_PREFIX}{plan.seq}",
            "summary": text,
            "replaces": plan.previous_id,
            "folded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "corrupt_rows": plan.corrupt,
        }

    async def _fold(self, room: Room, plan: FoldPlan, text: str) -> bool:
        if self._engine.store is None:
            return self._fold_in_memory(room, plan, text)
        # Once sent, a fold is seen through even if our caller is cancelled, so
        # the synced mirror never misses a change it made.
        task = asyncio.ensure_future(self._send_fold(room, plan, text))
        self._folds.add(task)
        task.add_done_callback(self._folds.discard)
        task.add_done_callback(consume_exception)
        return await asyncio.shield(task)

    async def _send_fold(self, room: Room, plan: FoldPlan, text: str) -> bool:
        store = self._engine.store
        assert store is not None
        # The fold's idempotency token (a resend after a timeout must not fold twice)
        # also names the rows it stages in the archive.
        token = uuid.uuid4().hex
        calls = plan.calls()
        staged = 0
        for indexes in calls[:-1]:
            accepted = await self._confirmed(
                room,
                functools.partial(
                    store.stage,
                    room.keys,
                    room.synced,
                    epoch=plan.epoch,
                    tag=plan.tag,
                    head=plan.head,
                    version=plan.version,
                    n=len(plan.rows),
                    fold_id=token,
                    before=staged,
                    ranges=index_ranges(indexes),
                ),
            )
            if not accepted:
                # The folded rows changed (or another fold took the archive over):
                # nothing counts yet. Catch up, so the next plan sees the change.
                await self._engine.ensure_fresh(room.room_id)
                return False
            staged += len(indexes)
        record = orjson.dumps({**self._record_meta(plan, text), "fold": token})
        summary_row = self._summary_row(plan, text)

        async def commit() -> SyncReply:
            async with room.lock:
                reply = await store.fold(
                    room.keys,
                    room.synced,
                    token,
                    epoch=plan.epoch,
                    tag=plan.tag,
                    head=plan.head,
                    version=plan.version,
                    rows=plan.rows,
                    keep=plan.keep,
                    summary_row=summary_row,
                    record=record,
                    archive_cap=self.config.archive_max_batches,
                    archive_max_bytes=self.config.archive_max_bytes,
                    fold_id=token,
                    staged=staged,
                    archived=index_ranges(calls[-1]),
                )
                await self._engine.absorb(room, reply)
                return reply

        return (await self._confirmed(room, commit)).status != 0

    async def _confirmed(self, room: Room, call: Callable[[], Awaitable[_T]]) -> _T:
        """One script call of a fold, resent after a transient error (each is idempotent)."""
        for attempt in range(_FOLD_SEND_ATTEMPTS):
            try:
                return await call()
            except TRANSIENT_ERRORS as exc:
                if is_permanent(exc):
                    raise
                if attempt == _FOLD_SEND_ATTEMPTS - 1:
                    raise RedisUnavailable(
                        f"room {room.room_id}: could not confirm the fold: {describe_error(exc)}",
                        room_id=room.room_id,
                    ) from exc
                logger.warning(
                    "room %s: fold not confirmed (attempt %d), resending: %r",
                    room.room_id,
                    attempt + 1,
                    exc,
                )
                await asyncio.sleep(_FOLD_SEND_BACKOFF * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _fold_in_memory(self, room: Room, plan: FoldPlan, text: str) -> bool:
        window = room.view.window
        n = len(plan.rows)
        if len(window) < n or any(window.row(i) != row for i, row in enumerate(plan.rows)):
            return False
        if len(window) > n and window.roles[n] == "tool":
            return False
        kept = window.held(n)
        pinned = window.held(plan.keep, plan.keep + 1) if plan.keep >= 0 else []
        window.clear()
        window.push(self._summary_row(plan, text), f"{SUMMARY_ID_PREFIX}{plan.seq}", SUMMARY_ROLE)
        for cell, identity, role in pinned + kept:
            window.push_held(cell, identity, role)
        # The rows are kept as they are (no record is serialised): the same caps apply.
        meta = self._record_meta(plan, text)
        size = len(orjson.dumps(meta)) + sum(len(row) + 1 for row in plan.folded)
        archive = self._memory_archive.setdefault(room.room_id, [])
        archive.append(_MemoryFold(meta, plan.folded, size))
        cap, cap_bytes = self.config.archive_max_batches, self.config.archive_max_bytes
        total = sum(fold.size for fold in archive)
        while len(archive) > 1 and (
            (cap and len(archive) > cap) or (cap_bytes and total > cap_bytes)
        ):
            total -= archive.pop(0).size
        return True

    # ---------------------------------------------------------------- archives

    async def list_archives(self, room_id: str) -> list[ArchiveBatch]:
        validate_room_id(room_id)
        store = self._engine.store
        if store is None:
            folds = list(self._memory_archive.get(room_id, ()))
            batches = []
            for fold in folds:
                batch = batch_of(fold.meta, await _load_rows(fold.rows))
                assert batch is not None  # made here from a well-formed record
                batches.append(batch)
            return batches
        key = self._engine.archive_key(room_id)
        for _attempt in range(_FOLD_SEND_ATTEMPTS):
            try:
                records = await read_archive(
                    store.redis, key, self._engine.settings.command_timeout
                )
            except ArchiveMoved:
                continue  # folds were dropped from its front while we read: read again
            except TRANSIENT_ERRORS as exc:
                raise RedisUnavailable(
                    f"room {room_id}: cannot read the archive: {describe_error(exc)}",
                    room_id=room_id,
                ) from exc
            break
        else:
            raise RedisUnavailable(
                f"room {room_id}: the archive kept changing while it was read", room_id=room_id
            )
        assembler = ArchiveAssembler()
        size = 0
        for raw in records:
            assembler.add(raw)
            size += len(raw)
            if size >= TOKEN_SLICE_BYTES:  # a record is parsed in one step of the loop
                size = 0
                await asyncio.sleep(0)
        assembler.finish()
        for nbytes in assembler.corrupt:
            self._engine.count("corrupt_rows")
            logger.warning(
                "room %s: skipping archive records that do not make a fold (%d bytes)",
                room_id,
                nbytes,
            )
        return assembler.batches

    # ------------------------------------------------------------------ leases

    @contextlib.asynccontextmanager
    async def lease(self, room_id: str, holder: str) -> AsyncIterator[bool]:
        """Hold the room's consolidation lease (yields False if another worker does).

        The lease expires after ``lease_seconds`` unless renewed; it is renewed
        while held and released only by its holder, so a crashed worker's lease
        frees itself.
        """
        store = self._engine.store
        if store is None:
            yield True
            return
        key = self._engine.lease_key(room_id)
        token = f"{holder}:{uuid.uuid4().hex}"
        ttl_ms = int(self.config.lease_seconds * 1000)
        if not await store.lease_acquire(key, token, ttl_ms):
            yield False
            return
        renewer = asyncio.ensure_future(self._renew(store, room_id, key, token, ttl_ms))
        try:
            yield True
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            try:
                await store.lease_release(key, token)
            except TRANSIENT_ERRORS as exc:
                logger.warning(
                    "room %s: could not release the consolidation lease (it expires): %r",
                    room_id,
                    exc,
                )

    async def _renew(
        self, store: RoomStore, room_id: str, key: str, token: str, ttl_ms: int
    ) -> None:
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                held = await store.lease_renew(key, token, ttl_ms)
            except TRANSIENT_ERRORS as exc:
                logger.warning("room %s: could not renew the consolidation lease: %r", room_id, exc)
                continue
            if not held:
                # The fold stays safe (it is compare-and-set); another worker may
                # now summarise the same turns, and only one fold will land.
                logger.warning("room %s: the consolidation lease was lost", room_id)
                return


@dataclass(slots=True)
class _Summarised:
    """A summary written during one ``consolidate`` call, and the plan it was written on."""

    plan: FoldPlan
    digest: bytes | None  # computed only when another plan is compared with it
    text: str


async def _known_summary(summaries: list[_Summarised], plan: FoldPlan) -> str | None:
    """The summary already written for the same turns, if any (hashing only when asked)."""
    if not summaries:
        return None
    digest = await plan.digest_async()
    for done in summaries:
        if done.digest is None:
            done.digest = await done.plan.digest_async()
        if done.digest == digest:
            return done.text
    return None


@dataclass(frozen=True, slots=True)
class _MemoryFold:
    """One fold in a memory-only manager's archive: its record's fields and its rows."""

    meta: dict[str, Any]
    rows: list[bytes]
    size: int


async def _load_rows(rows: Sequence[bytes]) -> list[Entry]:
    """Stored rows as entries (``message_id`` kept), yielding between slices."""
    entries: list[Entry] = []
    size = 0
    for row in rows:
        entries.append(orjson.loads(row))
        size += len(row)
        if size >= TOKEN_SLICE_BYTES:
            size = 0
            await asyncio.sleep(0)
    return entries


def _make_renderer(config: ConsolidationConfig) -> PromptSource:
    from .._renderer import PromptRenderer  # noqa: PLC0415 - Jinja only when used

    return PromptRenderer(template=config.template, template_dirs=config.template_dirs)
