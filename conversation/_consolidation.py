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
import hashlib
import inspect
import logging
import re
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import orjson
from redis.exceptions import RedisError

from ._budget import estimate_tokens
from ._engine.window import RoomState
from ._entries import (
    MARKER_RE,
    SUMMARY_ID_PREFIX,
    SUMMARY_ROLE,
    Entry,
    build_entry,
    first_text,
    is_summary,
    to_messages_yielding,
)
from ._errors import (
    ConfigurationError,
    ConsolidationError,
    ConversationError,
    RedisUnavailable,
    describe_error,
    require_positive_int,
)
from ._redis.keys import validate_room_id
from ._redis.replies import SyncReply
from ._redis.retry import TRANSIENT_ERRORS, is_permanent
from ._redis.rooms import index_ranges

if TYPE_CHECKING:
    from ._engine.core import Core
    from ._engine.rooms import Room
    from ._redis.rooms import RoomStore

__all__ = [
    "ArchiveBatch",
    "ConsolidationConfig",
    "ConsolidationResult",
    "ConsolidationWorker",
    "Consolidator",
    "ExtractiveSummarizer",
    "Summarizer",
    "format_transcript",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_FOLD_SEND_ATTEMPTS = 3
_FOLD_SEND_BACKOFF = 0.05
_LLEN_CHUNK = 500
DEFAULT_SUMMARY_WORDS = 350
#: Bytes of rows one script call of a fold copies to the archive (about: a single
#: bigger row gets a call alone). Every row is its own archive element.
ARCHIVE_CALL_BYTES = 1024 * 1024
#: Bytes of archive elements read back per LRANGE (about; at least one element).
_ARCHIVE_READ_BYTES = 1024 * 1024
#: Above this many bytes a plan's digest is computed in a thread (hashlib lets go of
#: the GIL), so a window of images never stalls the loop while it is hashed.
_INLINE_DIGEST_BYTES = 256 * 1024
#: The default summariser yields to the loop after this long. Another task waiting
#: on a timer resumes about three slices later (the timer, its future and the task's
#: step each take a turn of the loop behind the summariser's next slice).
_SUMMARY_SLICE_SECONDS = 0.002
#: Token estimates of this many bytes of rows are computed between two yields.
_TOKEN_SLICE_BYTES = 256 * 1024


# ------------------------------------------------------------------ configuration


@dataclass(frozen=True, slots=True)
class ConsolidationConfig:
    """When to consolidate a room, how much to keep, and where archives go.

    A room passes the threshold when it holds more turns than
    ``min(max_turns, max_fill * its window limit)`` or more than ``max_tokens``
    tokens (counted as token budgets count them), and has at least ``min_fold``
    turns older than the ``keep_recent`` most recent ones. Tool-call groups are
    never split, so a fold may keep a few more turns than ``keep_recent``.
    """

    max_turns: int = 80
    max_fill: float = 0.8
    max_tokens: int = 16_000
    keep_recent: int = 20
    min_fold: int = 4
    #: Keep the oldest user message of the window verbatim, right after the
    #: summary (some model APIs want a user turn before anything else).
    pin_first_user: bool = False
    #: Prompt template rendered for the summariser, and folders searched for it
    #: before the packaged ``prompt_templates/`` (as ``PromptRenderer`` does).
    template: str = "consolidation"
    template_dirs: tuple[str, ...] = ()
    max_summary_words: int = DEFAULT_SUMMARY_WORDS
    #: Longer summaries are cut (the summariser was asked for ``max_summary_words``).
    max_summary_chars: int = 16_000
    #: Text put before the summary in the entry the model sees.
    summary_prefix: str = "Summary of the earlier conversation:\n"
    #: Folds kept in a room's archive (oldest dropped first); 0 keeps all.
    archive_max_batches: int = 1000
    #: Bytes of archive records kept per room (oldest folds dropped first; the newest
    #: fold always stays, even alone over the cap); 0 = no byte cap.
    archive_max_bytes: int = 64 * 1024 * 1024
    #: Archive retention; ``None`` gives it the room's ``ttl_seconds``.
    archive_ttl_seconds: float | None = None
    #: Fold attempts (each on a fresh window) before giving up on a busy room.
    max_attempts: int = 3
    #: Lease a consolidation worker holds on a room while it folds it.
    lease_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_tokens", "min_fold", "max_summary_words", "max_attempts"):
            require_positive_int(name, getattr(self, name))
        for name in ("keep_recent", "archive_max_batches", "archive_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an int >= 0, got {value!r}")
        if self.max_summary_chars < 100:
            raise ConfigurationError("max_summary_chars must be at least 100")
        if not 0 < self.max_fill <= 1:
            raise ConfigurationError(f"max_fill must be in (0, 1], got {self.max_fill!r}")
        if self.archive_ttl_seconds is not None and self.archive_ttl_seconds <= 0:
            raise ConfigurationError("archive_ttl_seconds must be positive or None")
        if self.lease_seconds < 1:
            raise ConfigurationError("lease_seconds must be at least 1")


# ----------------------------------------------------------------- public records


#: ``await summarize(prompt, turns) -> summary text``: ``prompt`` is the rendered
#: ``consolidation`` template (it carries the previous rolling summary, which the
#: new one must merge); ``turns`` are the OpenAI-chat messages to fold, oldest
#: first, exactly as the model would have seen them.
Summarizer = Callable[[str, list[Entry]], Awaitable[str]]


def format_transcript(turns: Sequence[Mapping[str, Any]]) -> str:
    """The turns as plain text, one block per turn, for a model to read."""
    return "\n\n".join(_transcript_line(turn) for turn in turns)


@dataclass(frozen=True, slots=True)
class ConsolidationResult:
    """What one ``consolidate`` call did.

    ``outcome`` is ``"folded"``, ``"nothing_to_fold"`` (the window is short
    enough, or changed under us and now is), or ``"conflict"`` (it kept
    changing for ``max_attempts`` folds; nothing was written).
    """

    room_id: str
    outcome: Literal["folded", "nothing_to_fold", "conflict"]
    folded: int = 0
    seq: int | None = None
    attempts: int = 0
    summarizer_calls: int = 0

    @property
    def summary_id(self) -> str | None:
        return None if self.seq is None else f"{SUMMARY_ID_PREFIX}{self.seq}"


@dataclass(frozen=True, slots=True)
class ArchiveBatch:
    """One fold: the raw turns that left the window and the summary that replaced them.

    ``turns`` are the stored entries, oldest first, with their ``message_id``.
    ``replaces`` names the previous summary merged into this one.
    """

    seq: int
    summary_id: str
    summary: str
    replaces: str | None
    folded_at: str
    turns: list[Entry]
    corrupt_rows: int = 0


# ------------------------------------------------------------------------ tokens


def _row_tokens(row: bytes) -> int:
    return estimate_tokens(orjson.loads(row))


def _window_tokens(room: Room, rows: Sequence[bytes]) -> int:
    """The rows' token estimates, each row parsed once while it is in the window.

    Rows are immutable ``bytes`` that a window keeps as long as they are current
    (an edit puts a new object in), so an estimate stays right for as long as its
    object is there; the room remembers the rows of its last check only.
    """
    known = room.token_estimates
    counts: dict[int, tuple[bytes, int]] = {}
    total = 0
    for row in rows:
        hit = known.get(id(row))
        count = hit[1] if hit is not None and hit[0] is row else _row_tokens(row)
        counts[id(row)] = (row, count)
        total += count
    room.token_estimates = counts
    return total


async def _estimate_tokens(room: Room, rows: Sequence[bytes]) -> None:
    """Estimate the rows not seen yet, yielding to the loop between slices."""
    known = room.token_estimates
    done = 0
    for row in rows:
        hit = known.get(id(row))
        if hit is not None and hit[0] is row:
            continue
        known[id(row)] = (row, _row_tokens(row))
        done += len(row)
        if done >= _TOKEN_SLICE_BYTES:
            done = 0
            await asyncio.sleep(0)


# ---------------------------------------------------------------------- the plan


@dataclass(slots=True)
class _Plan:
    """Which head rows a fold removes, planned on one exact state of the window."""

    epoch: str
    head: int
    version: int  # the synced version the plan was made on (the fold checks the log since)
    rows: list[bytes]  # window[0:n]: the previous summary, folded turns, the pinned turn
    keep: int  # index in rows of the pinned turn kept after the summary, or -1
    keep_meta: tuple[str | None, str | None]
    archived: list[int]  # indexes in rows of the healthy turns leaving the window
    folded: list[bytes]  # those rows (summarised and archived)
    corrupt: int
    previous_id: str | None
    previous_text: str | None
    seq: int

    def digest(self) -> bytes:
        """SHA1 of ``keep`` and the framed rows ("<length>:<row>"), hashed row by row."""
        hasher = hashlib.sha1(b"%d|" % self.keep)
        for row in self.rows:
            hasher.update(b"%d:" % len(row))
            hasher.update(row)
        return hasher.digest()

    async def digest_async(self) -> bytes:
        if sum(map(len, self.rows)) <= _INLINE_DIGEST_BYTES:
            return self.digest()
        return await asyncio.to_thread(self.digest)

    def calls(self) -> list[list[int]]:
        """The archived rows' indexes, about ``ARCHIVE_CALL_BYTES`` of them per script call.

        The last call is the fold script itself; the others stage rows before it.
        """
        calls: list[list[int]] = [[]]
        size = 0
        for index in self.archived:
            cost = len(self.rows[index])
            if calls[-1] and size + cost > ARCHIVE_CALL_BYTES:
                calls.append([])
                size = 0
            calls[-1].append(index)
            size += cost
        return calls


def _plan(state: RoomState, config: ConsolidationConfig, keep_recent: int) -> _Plan | None:
    window = state.window
    size, roles, ids, rows = len(window), window.roles, window.ids, window.rows
    start, previous_id, previous_text, seq = 0, None, None, 1
    if size and is_summary(ids[0], roles[0]):
        start, previous_id = 1, ids[0]
        previous_text = _summary_text(rows[0], config.summary_prefix)
        seq = _summary_seq(previous_id) + 1
    end = size - keep_recent
    # Never split a tool-call group: results stay with the call they answer...
    while start < end < size and roles[end] == "tool":
        end -= 1
    # ...and a call still waiting for its results stays where they will land.
    while end > start and roles[end - 1] == "assistant" and _has_tool_calls(rows[end - 1]):
        end -= 1
    if end <= start:
        return None
    keep = -1
    if config.pin_first_user:
        keep = next((i for i in range(start, end) if roles[i] == "user"), -1)
    archived = [i for i in range(start, end) if i != keep and roles[i] is not None]
    corrupt = end - start - len(archived) - (1 if keep >= 0 else 0)
    if len(archived) < config.min_fold:
        return None
    return _Plan(
        epoch=state.epoch,
        head=state.head,
        version=state.version,
        rows=rows[:end],
        keep=keep,
        keep_meta=(ids[keep], roles[keep]) if keep >= 0 else (None, None),
        archived=archived,
        folded=[rows[i] for i in archived],
        corrupt=corrupt,
        previous_id=previous_id,
        previous_text=previous_text,
        seq=seq,
    )


def _has_tool_calls(row: bytes) -> bool:
    if b'"tool_calls"' not in row:  # a byte scan spares parsing a row of images
        return False
    try:
        entry = orjson.loads(row)
    except orjson.JSONDecodeError:
        return False
    return isinstance(entry, dict) and bool(entry.get("tool_calls"))


def _summary_text(row: bytes, prefix: str) -> str | None:
    try:
        content = orjson.loads(row).get("content")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    text = first_text(content)
    if text is None:
        return None
    return text[len(prefix) :] if prefix and text.startswith(prefix) else text


def _summary_seq(identity: str | None) -> int:
    try:
        return int((identity or "")[len(SUMMARY_ID_PREFIX) :])
    except ValueError:
        return 0


def _clean_summary(text: str, max_chars: int) -> str:
    # A bracketed marker in the summary could pass for the message it names.
    text = MARKER_RE.sub(lambda match: f"(msg {match.group(1).strip()})", text.strip())
    if len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    return text


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
        self._engine = core
        self._renderer = renderer
        self._default = ExtractiveSummarizer()
        self._locks = _KeyedLocks()
        # Memory-only managers keep archives here (one process, no Redis).
        self._memory_archive: dict[str, list[_MemoryFold]] = {}

    def rebind(self) -> None:
        """The manager moved to a new event loop: locks of the old one are dropped."""
        self._locks = _KeyedLocks()

    # ------------------------------------------------------------------ checks

    def should_consolidate(self, room_id: str) -> bool:
        """O(rows) once the rows' token estimates are known (``prepare`` makes them
        without stalling the loop); a row is parsed for its estimate only once."""
        config = self.config
        room = self._engine.room(room_id)
        state = room.view
        if not self._past_turns(state) and (
            _window_tokens(room, state.window.healthy_rows()) <= config.max_tokens
        ):
            return False
        return _plan(state, config, config.keep_recent) is not None

    async def prepare(self, room_id: str) -> None:
        """Estimate the tokens of rows ``should_consolidate`` has not seen, in slices."""
        room = self._engine.room(room_id)
        if not self._past_turns(room.view):
            await _estimate_tokens(room, room.view.window.healthy_rows())

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
                plan = _plan(state, self.config, keep)
                if plan is None:
                    return ConsolidationResult(room_id, "nothing_to_fold", 0, None, attempts, calls)
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

    async def _summarize(
        self,
        room_id: str,
        plan: _Plan,
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
        return _clean_summary(text, config.max_summary_chars)

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

    def _summary_row(self, plan: _Plan, text: str) -> bytes:
        summary_id = f"{SUMMARY_ID_PREFIX}{plan.seq}"
        return self._engine.encode(
            build_entry(SUMMARY_ROLE, self.config.summary_prefix + text, message_id=summary_id)
        )

    def _record_meta(self, plan: _Plan, text: str) -> dict[str, Any]:
        """What the fold's commit record says besides its turns."""
        return {
            "seq": plan.seq,
            "summary_id": f"{SUMMARY_ID_PREFIX}{plan.seq}",
            "summary": text,
            "replaces": plan.previous_id,
            "folded_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "corrupt_rows": plan.corrupt,
        }

    async def _fold(self, room: Room, plan: _Plan, text: str) -> bool:
        if self._engine.store is None:
            return self._fold_in_memory(room, plan, text)
        # Once sent, a fold is seen through even if our caller is cancelled, so
        # the synced mirror never misses a change it made.
        task = asyncio.ensure_future(self._send_fold(room, plan, text))
        task.add_done_callback(_consume_exception)
        return await asyncio.shield(task)

    async def _send_fold(self, room: Room, plan: _Plan, text: str) -> bool:
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
                self._engine.absorb(room, reply)
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

    def _fold_in_memory(self, room: Room, plan: _Plan, text: str) -> bool:
        window = room.view.window
        n = len(plan.rows)
        if window.rows[:n] != plan.rows or (len(window) > n and window.roles[n] == "tool"):
            return False
        kept = list(zip(window.rows[n:], window.ids[n:], window.roles[n:], strict=True))
        window.clear()
        window.push(self._summary_row(plan, text), f"{SUMMARY_ID_PREFIX}{plan.seq}", SUMMARY_ROLE)
        if plan.keep >= 0:
            window.push(plan.rows[plan.keep], *plan.keep_meta)
        for row, identity, role in kept:
            window.push(row, identity, role)
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
                batch = _batch(fold.meta, await _load_rows(fold.rows))
                assert batch is not None  # made here from a well-formed record
                batches.append(batch)
            return batches
        key = self._engine.archive_key(room_id)
        for _attempt in range(_FOLD_SEND_ATTEMPTS):
            try:
                records = await _read_archive(store.redis, key)
            except _ArchiveMoved:
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
        assembler = _Assembler()
        size = 0
        for raw in records:
            assembler.add(raw)
            size += len(raw)
            if size >= _TOKEN_SLICE_BYTES:  # a record is parsed in one step of the loop
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

    plan: _Plan
    digest: bytes | None  # computed only when another plan is compared with it
    text: str


async def _known_summary(summaries: list[_Summarised], plan: _Plan) -> str | None:
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


class _ArchiveMoved(Exception):
    """Folds were dropped from the archive's front while it was being read."""


#: The first element of an archive written by this engine (see lua/_lib.lua).
_ARCHIVE_MAGIC = b"~a2|"


@dataclass(frozen=True, slots=True)
class _ArchiveHeader:
    dropped: int
    committed: int
    ledger: tuple[int, ...]  # elements of each committed fold, oldest first

    @classmethod
    def parse(cls, raw: bytes | None) -> _ArchiveHeader | None:
        if raw is None or not raw.startswith(_ARCHIVE_MAGIC):
            return None
        fields = raw[len(_ARCHIVE_MAGIC) :].split(b"|", 7)
        try:
            ledger = tuple(int(entry.split(b":")[0]) for entry in fields[7].split(b",") if entry)
            return cls(int(fields[0]), int(fields[1]), ledger)
        except (IndexError, ValueError):
            return None


async def _read_archive(redis: Any, key: str) -> list[bytes]:
    """The elements of the archive's committed folds, oldest first.

    Read in slices of about ``_ARCHIVE_READ_BYTES`` (the slice length adapts to the
    sizes seen), so no single command makes Redis copy much of the archive. Rows
    staged by a fold still in progress (or abandoned) lie after the committed folds
    and are not read. Elements only ever leave from the front (whole folds, counted
    in the header), so a header that counts the same drops after the last slice
    proves every slice saw the same positions.
    """
    first = await redis.lindex(key, 0)
    header = _ArchiveHeader.parse(first)
    if header is None:
        if first is None:
            return []
        # An archive of the previous engine: each record is one whole fold.
        return list(await redis.lrange(key, 0, -1))
    elements: list[bytes] = []
    start, count = 1, 16
    while start <= header.committed:
        stop = min(start + count - 1, header.committed)
        chunk: list[bytes] = await redis.lrange(key, start, stop)
        if not chunk:
            break
        elements.extend(chunk)
        start += len(chunk)
        size = sum(map(len, chunk))
        if size > _ARCHIVE_READ_BYTES:
            count = max(1, count // 2)
        elif size < _ARCHIVE_READ_BYTES // 4:
            count = min(1024, count * 2)
    after = _ArchiveHeader.parse(await redis.lindex(key, 0))
    if (
        after is None
        or after.dropped != header.dropped
        or after.ledger[: len(header.ledger)] != header.ledger
        or len(elements) != header.committed
    ):
        raise _ArchiveMoved
    return elements


@dataclass(slots=True)
class _Assembler:
    """Folds from archive elements, each checked against what its commit record says.

    A fold is its archived rows, one element each, then its commit record (an object
    with a ``seq`` and no ``role``, unlike any row), which counts the rows before it;
    a record of the previous engine is a commit record with its turns inline. Elements that
    do not add up to a fold are skipped (their sizes are in ``corrupt``). Each
    ``add`` parses one element, so a caller can yield between them.
    """

    batches: list[ArchiveBatch] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)
    _turns: list[Any] = field(default_factory=list)
    _bytes: int = 0
    _broken: bool = False

    def add(self, raw: bytes) -> None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict) or "seq" not in data or "role" in data:
            self._bytes += len(raw)
            if isinstance(data, dict):
                self._turns.append(data)
            else:
                self._broken = True
            return
        turns, size, broken = self._turns, self._bytes + len(raw), self._broken
        self._turns, self._bytes, self._broken = [], 0, False
        if "rows" not in data and isinstance(data.get("turns"), list):  # the previous engine
            if turns:
                self.corrupt.append(size - len(raw))
                size = len(raw)
            turns, broken = data["turns"], False
        elif data.get("rows") != len(turns):
            broken = True
        batch = None if broken else _batch(data, turns)
        if batch is None:
            self.corrupt.append(size)
        else:
            self.batches.append(batch)

    def finish(self) -> None:
        """Rows left over belong to no complete fold."""
        if self._turns or self._broken:
            self.corrupt.append(self._bytes)
        self._turns, self._bytes, self._broken = [], 0, False


def _batch(data: Mapping[str, Any], turns: list[Any]) -> ArchiveBatch | None:
    if not all(isinstance(turn, dict) for turn in turns):
        return None
    try:
        return ArchiveBatch(
            seq=int(data["seq"]),
            summary_id=str(data["summary_id"]),
            summary=str(data["summary"]),
            replaces=None if data.get("replaces") is None else str(data["replaces"]),
            folded_at=str(data.get("folded_at", "")),
            turns=turns,
            corrupt_rows=int(data.get("corrupt_rows", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None


async def _load_rows(rows: Sequence[bytes]) -> list[Entry]:
    """Stored rows as entries (``message_id`` kept), yielding between slices."""
    entries: list[Entry] = []
    size = 0
    for row in rows:
        entries.append(orjson.loads(row))
        size += len(row)
        if size >= _TOKEN_SLICE_BYTES:
            size = 0
            await asyncio.sleep(0)
    return entries


def _make_renderer(config: ConsolidationConfig) -> PromptSource:
    from ._renderer import PromptRenderer  # noqa: PLC0415 - Jinja only when used

    return PromptRenderer(template=config.template, template_dirs=config.template_dirs)


def _consume_exception(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


# --------------------------------------------------------------------- the worker


RoomSource = Iterable[str] | Callable[[], Iterable[str] | Awaitable[Iterable[str]]]


@dataclass(slots=True)
class WorkerStats:
    passes: int = 0
    checked: int = 0
    folds: int = 0
    leased_elsewhere: int = 0
    failures: int = 0


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
                await asyncio.wait_for(stop.wait(), self._interval)

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
            lengths.extend(await pipe.execute(raise_on_error=False))
        candidates = []
        for room_id, length in zip(valid, lengths, strict=True):
            if isinstance(length, Exception):
                self.stats.failures += 1
                logger.warning("room %s: skipped by consolidation: %s", room_id, length)
            elif isinstance(length, int) and length >= floor:
                candidates.append(room_id)
        return candidates


# ----------------------------------------------------------- the default summariser


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_IMPORTANT = re.compile(
    r"\b(?:will|won't|shall|promis\w*|agree\w*|decid\w*|deadline|due|tomorrow|tonight|"
    r"next (?:week|month|monday|tuesday|wednesday|thursday|friday|saturday|sunday)|"
    r"by (?:monday|tuesday|wednesday|thursday|friday|saturday|sunday|the end)|todo|must|"
    r"need(?:s)? to|remember|don't forget|schedul\w*|meeting|plan\w*|booked|confirm\w*)\b|'ll\b",
    re.IGNORECASE,
)
_FACT = re.compile(r"\d|https?://|@\w")
_TAGS = re.compile(r"\s*\[(?:deleted at [^\[\]\n]*|Reactions: [^\[\]\n]*)\]")
_WORD = re.compile(r"\S+")
_PROMPT_SUMMARY = re.compile(r"<summary>\s*\n(.*?)\n\s*</summary>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class ExtractiveSummarizer:
    """The offline default: a deterministic, extractive rolling summary.

    From each turn it keeps the one sentence that looks most worth keeping
    (commitments, plans and decisions first, then questions, then facts with
    numbers or links), attributed and cited as ``(msg <id>)``; deleted messages
    are recorded as withdrawn, tool results are left out. The previous summary's
    lines come first; when the result is over the word budget, the oldest of the
    least important lines go first. Same input, same summary.
    """

    max_words: int | None = None
    sentence_chars: int = 200
    ellipsis: str = field(default="…", repr=False)

    async def __call__(self, prompt: str, turns: list[Entry]) -> str:
        """The summariser protocol; the previous summary is read from the prompt.

        That works with the packaged template (it wraps the summary in
        ``<summary>`` tags). ``consolidate`` with no summariser calls
        :meth:`summarize` with the previous summary directly instead.
        """
        previous = _PROMPT_SUMMARY.search(prompt)
        return self.summarize(turns, previous.group(1) if previous else None)

    def summarize(
        self,
        turns: Sequence[Entry],
        previous_summary: str | None,
        max_words: int = DEFAULT_SUMMARY_WORDS,
    ) -> str:
        lines = _previous_lines(previous_summary)
        for turn in turns:
            line = self._line(turn)
            if line is not None:
                lines.append(line)
        return _joined(lines, self.max_words or max_words)

    async def summarize_rows(
        self,
        rows: Sequence[bytes],
        previous_summary: str | None,
        max_words: int = DEFAULT_SUMMARY_WORDS,
    ) -> str:
        """``summarize`` of stored rows, parsed one at a time, yielding to the loop
        every few milliseconds: a fold of a thousand turns with images never holds
        the loop (nor keeps every parsed turn alive) for the whole summary."""
        lines = _previous_lines(previous_summary)
        words = [_words(line) for _, line in lines]
        loop = asyncio.get_running_loop()
        started = loop.time()
        for row in rows:
            line = self._line(orjson.loads(row))  # its message_id is not read
            if line is not None:
                lines.append(line)
                words.append(_words(line[1]))  # counted here, in the slices
            if loop.time() - started > _SUMMARY_SLICE_SECONDS:
                await asyncio.sleep(0)
                started = loop.time()
        return _joined(lines, self.max_words or max_words, words)

    def _line(self, turn: Entry) -> tuple[int, str] | None:
        role = turn.get("role")
        if role == "tool":
            return None
        who = turn.get("name") or role
        content = turn.get("content")
        text = first_text(content) or ""
        media = (
            sum(1 for p in content if not (isinstance(p, dict) and p.get("type") == "text"))
            if isinstance(content, list)
            else 0
        )
        cite = ""
        marker = MARKER_RE.search(text)
        if marker is not None:
            cite = f" (msg {marker.group(1).strip()})"
            rest = text[marker.end() :]
            tags = re.match(r"(?:" + _TAGS.pattern + r")*", rest)
            zone = tags.group(0) if tags else ""
            if "[deleted at " in zone:
                return 1, f"- {who} withdrew a message{cite}."
            text = text[: marker.start()] + rest[len(zone) :]
        text = _TAGS.sub("", text).strip()
        text = MARKER_RE.sub(lambda m: f"(msg {m.group(1).strip()})", text)
        calls = turn.get("tool_calls") or []
        names = [
            str(call.get("function", {}).get("name", "a tool"))
            for call in calls
            if isinstance(call, dict)
        ]
        sentences = [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]
        parts = []
        importance = 1
        if names:
            parts.append("used " + ", ".join(names))
        if sentences:
            ranked = [(_importance(s), -i, s) for i, s in enumerate(sentences)]
            importance, _, best = max(ranked)
            parts.append(self._clip(best))
        if media:
            parts.append(f"shared {media} attachment{'s' if media > 1 else ''}")
        if not parts:
            return None
        return importance, f"- {who}{cite}: " + "; ".join(parts)

    def _clip(self, sentence: str) -> str:
        if len(sentence) <= self.sentence_chars:
            return sentence
        cut = sentence[: self.sentence_chars].rsplit(" ", 1)[0]
        return cut.rstrip(",;:") + self.ellipsis


def _previous_lines(previous_summary: str | None) -> list[tuple[int, str]]:
    return [
        (_importance(line), line.strip())
        for line in (previous_summary or "").splitlines()
        if line.strip()
    ]


def _joined(lines: list[tuple[int, str]], budget: int, words: list[int] | None = None) -> str:
    if not lines:
        return "- Nothing worth keeping was said."
    return "\n".join(_fit(lines, budget, words))


def _words(line: str) -> int:
    return len(_WORD.findall(line))


def _importance(text: str) -> int:
    if _IMPORTANT.search(text):
        return 3
    if "?" in text:
        return 2
    return 2 if _FACT.search(text) else 1


def _fit(lines: list[tuple[int, str]], budget: int, words: list[int] | None = None) -> list[str]:
    """Drop the oldest least important lines until the words fit (keeping the newest).

    ``words``: each line's word count, if the caller counted them already.
    """
    if words is None:
        words = [_words(line) for _, line in lines]
    total = sum(words)
    dropped: set[int] = set()
    order = sorted(range(len(lines) - 1), key=lambda i: (lines[i][0], i))
    for index in order:
        if total <= budget:
            break
        dropped.add(index)
        total -= words[index]
    return [line for i, (_, line) in enumerate(lines) if i not in dropped]


def _transcript_line(turn: Mapping[str, Any]) -> str:
    who = str(turn.get("name") or turn.get("role"))
    content = turn.get("content")
    if isinstance(content, str):
        text = content
    else:
        pieces = []
        for part in content or []:
            if isinstance(part, dict) and part.get("type") == "text":
                pieces.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                pieces.append(f"({part.get('type', 'attachment')} attachment)")
        text = "\n".join(pieces)
    if turn.get("role") == "tool":
        return f"tool result for {turn.get('tool_call_id', '?')}: {text}"
    calls = turn.get("tool_calls")
    if calls:
        called = ", ".join(
            f"{call.get('function', {}).get('name', '?')}"
            f"({call.get('function', {}).get('arguments', '')})"
            for call in calls
            if isinstance(call, dict)
        )
        text = f"{text}\n(called {called})" if text else f"(called {called})"
    return f"{who}: {text}"
