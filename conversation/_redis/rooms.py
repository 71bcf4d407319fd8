"""``RoomStore``: one typed method per room script in ``lua/``.

Every call goes through the ``Pipeliner`` (one pipeline per loop tick, WAIT
when ``min_replicas`` asks); every reply is parsed into a ``SyncReply``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any

from .. import _reactions
from .._reactions import ReactionEvent, TagSlot
from .._stats import Stats
from .keys import RoomKeys
from .pipeliner import Pipeliner, forget_pooled_connections
from .replies import SyncedState, SyncReply, lineage
from .scripts import Arg, load_scripts

logger = logging.getLogger(__name__)

#: Bytes of a row that ``probe`` keeps; must match PROBE_BYTES in lua/_lib.lua.
PROBE_BYTES = 256


def probe(row: bytes) -> bytes:
    """Length and first bytes of a row, as ``probe`` in ``lua/_lib.lua`` makes them."""
    return b"%d:%s" % (len(row), row[:PROBE_BYTES])


def index_ranges(indexes: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indexes as inclusive (first, last) runs."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


@functools.lru_cache(maxsize=4096)
def _sync_keys(keys: RoomKeys) -> tuple[bytes, ...]:
    """KEYS of ``lua/sync.lua``: the first four only (it reads no other key),
    encoded once per room (every warm read sends them)."""
    return tuple(key.encode() for key in keys.as_list()[:4])


class DeferredEventsWaiting(Exception):
    """The append refused: events wait for some of its rows (``pending``: each
    message's identity field and its events as stored). Apply them and send again."""

    def __init__(self, pending: dict[bytes, bytes]) -> None:
        super().__init__(f"deferred events wait for {len(pending)} message(s)")
        self.pending = pending


class RoomStore:
    """One typed method per Lua script; every reply is a parsed ``SyncReply``."""

    def __init__(
        self,
        redis: Any,
        stats: Stats,
        *,
        ttl_ms: int,
        default_limit: int,
        command_timeout: float | None,
        min_replicas: int = 0,
        replica_timeout_ms: int = 0,
        archive_ttl_ms: int | None = None,
    ) -> None:
        self.redis = redis
        self.scripts = load_scripts()
        self._stats = stats
        self._ttl_ms = ttl_ms
        # None: the archive lives as long as the room's other keys.
        self._archive_ttl_ms = ttl_ms if archive_ttl_ms is None else archive_ttl_ms
        self._default_limit = default_limit
        # ARGV[6], [7] and [9] of every call, encoded once (redis-py's fast path).
        self._constants = (
            b"%d" % ttl_ms,
            b"%d" % default_limit,
            b"%d" % self._archive_ttl_ms,
        )
        self._timeout = command_timeout
        self._pipeliner_settings = (min_replicas, replica_timeout_ms)
        self._pipeliner = self._new_pipeliner()
        self._has_sha1hex: bool | None = None

    def _new_pipeliner(self) -> Pipeliner:
        min_replicas, replica_timeout_ms = self._pipeliner_settings
        return Pipeliner(
            self.redis,
            self.scripts,
            self._stats,
            self._timeout,
            min_replicas=min_replicas,
            replica_timeout_ms=replica_timeout_ms,
        )

    def rebind(self) -> None:
        """Start afresh on a new event loop: calls queued on the old one died with
        it, and the client's pooled connections belong to it."""
        self._pipeliner = self._new_pipeliner()
        forget_pooled_connections(self.redis)

    def _common(self, state: SyncedState, token: str, fresh_epoch: str) -> list[Arg]:
        ttl, limit, archive_ttl = self._constants
        return [
            lineage(state.epoch, state.tag),
            state.version,
            state.head,
            state.size,
            token,
            ttl,
            limit,
            fresh_epoch,
            archive_ttl,
        ]

    async def _run(
        self,
        name: str,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        fresh_epoch: str,
        extra: Sequence[Arg],
        direct: bool = False,
    ) -> SyncReply:
        args = self._common(state, token, fresh_epoch)
        args.extend(extra)
        raw = await self._pipeliner.run(self.scripts[name], keys.as_list(), args, direct)
        reply = SyncReply.parse(raw)
        self._stats.bytes_received += reply.payload_bytes()
        return reply

    async def sync(
        self, keys: RoomKeys, state: SyncedState, tokens: Sequence[str] = ()
    ) -> SyncReply:
        """Catch up; status 2 says every write named by ``tokens`` already landed."""
        reply, _flags = await self.sync_asking(keys, state, tokens)
        return reply

    async def sync_asking(
        self, keys: RoomKeys, state: SyncedState, tokens: Sequence[str]
    ) -> tuple[SyncReply, str]:
        """Catch up; also one flag per token, ``"2"`` if that write already landed.

        The reply's status is 2 when every token landed, else 0.
        """
        args = self._common(state, "", "")
        # A caller that knows nothing gets a snapshot: its rows come from a plain
        # LRANGE in the script's MULTI (lua/sync.lua), not copied through Lua.
        cold = not state.epoch and not state.version and not state.size
        alongside = (
            ("LRANGE", keys.window, 0, -1) if cold and self._pipeliner.transactions else None
        )
        args.append("r" if alongside else "")
        args.extend(tokens)
        # Not direct: a read's caller gives up after command_timeout (the manager
        # serves memory then), and a command the caller's own task sends cannot
        # be left that fast: cancelled, redis-py releases its connection through
        # the pool, whose lock a reconnect to a stalled server holds for as long
        # again (tests/test_hardening.py, a read behind a stalled persist).
        raw = await self._pipeliner.run(
            self.scripts["sync"], _sync_keys(keys), args, False, alongside
        )
        rows = None
        if alongside is not None:
            raw, rows = raw
            if isinstance(rows, Exception):
                raise rows
        flags = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        flags = "" if flags == "0" else flags
        raw[0] = 2 if flags and set(flags) == {"2"} else 0
        reply = SyncReply.parse(raw, rows)
        self._stats.bytes_received += reply.payload_bytes()
        return reply, flags

    @property
    def default_limit(self) -> int:
        """The window limit of a room that stores none (the manager's ``max_history``)."""
        return self._default_limit

    async def changes(self, keys: RoomKeys, state: SyncedState) -> tuple[str, bool, SyncReply]:
        """What changed since a change-feed cursor (``lua/changes.lua``): the reason
        (``"i"`` incremental, ``"c"`` cleared, ``"r"`` reset), whether a fold
        happened since, and the catch-up as a sync reply."""
        args = self._common(state, "", "")
        raw = await self._pipeliner.run(self.scripts["changes"], keys.as_list(), args, False)
        reason = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        folded = bool(int(raw[1]))
        body = raw[1:]
        body[0] = 0
        reply = SyncReply.parse(body)
        self._stats.bytes_received += reply.payload_bytes()
        return reason, folded, reply

    async def import_room(
        self,
        keys: RoomKeys,
        *,
        epoch: str,
        replace: bool,
        head: int,
        limit: int,
        rebackfill: bool,
        rows: Sequence[bytes],
        archive: tuple[bytes, Sequence[bytes]] | None,
        tokens: Sequence[str] = (),
        reactions: Sequence[tuple[str, bytes]] = (),
        deferred: tuple[Sequence[bytes], int] = ((), 0),
    ) -> tuple[bool, int]:
        """``lua/import.lua``: (True, new version), or (False, entries the room holds).
        ``reactions``: (identity, state JSON) to track; ``deferred``: the deferred hash's
        fields and values, flat, and how long it lives (ms)."""
        header, elements = archive if archive is not None else (b"", ())
        waiting, waiting_ms = deferred
        args: list[Arg] = [
            "",
            0,
            0,
            0,
            "",
            self._ttl_ms,
            self._default_limit,
            epoch,
            self._archive_ttl_ms,
            "1" if replace else "0",
            head,
            limit,
            "1" if rebackfill else "0",
            len(rows),
            "0" if archive is None else "1",
            header,
            len(reactions),
            len(waiting) // 2,
            waiting_ms,
            *rows,
            len(tokens),
            *tokens,
            *(part for pair in reactions for part in pair),
            *waiting,
            *elements,
        ]
        raw = await self._pipeliner.run(self.scripts["import"], keys.as_list(), args, True)
        return bool(int(raw[0])), int(raw[1])

    async def idempotency_tokens(self, keys: RoomKeys) -> list[bytes]:
        """The tokens of the writes the room has applied (its IDEM set), oldest first."""
        async with asyncio.timeout(self._timeout):
            # By score from 0: the set's mark (score -1, see remember in _lib.lua)
            # is not a token.
            tokens = await self.redis.zrange(keys.idem, 0, "+inf", byscore=True)
        self._stats.round_trips += 1
        return [bytes(token) for token in tokens]

    async def cursor_get(self, key: str, name: str) -> bytes | None:
        async with asyncio.timeout(self._timeout):
            value = await self.redis.hget(key, name)
        self._stats.round_trips += 1
        return value if value is None else bytes(value)

    async def cursor_set(
        self, key: str, name: str, cursor: str, *, mode: str, expected: str = ""
    ) -> bool:
        """``lua/cursor_set.lua``: mode ``any``, ``absent`` or ``equal`` (to ``expected``)."""
        args: list[Arg] = [name, cursor, mode, expected, self._ttl_ms]
        return bool(await self._pipeliner.call(self.scripts["cursor_set"], [key], args))

    async def append(
        self,
        keys: RoomKeys,
        state: SyncedState,
        epoch: str,
        writes: Sequence[tuple[str, Sequence[bytes]]],
        *,
        now_ms: int = 0,
        consumed: Sequence[tuple[bytes, bytes, str, str]] = (),
        direct: bool = False,
    ) -> tuple[SyncReply, str]:
        """Push each write's rows under its own token; also returns one flag per
        write: ``"1"`` pushed now, ``"2"`` its token had already applied.

        ``consumed``: per message whose deferred events the rows have applied, its
        identity field, the events as the script handed them, its identity and
        its reaction state. Raises ``DeferredEventsWaiting`` (nothing pushed) when
        events wait for these rows that ``consumed`` does not match exactly.
        """
        extra: list[Arg] = [len(writes)]
        for token, rows in writes:
            extra.append(token)
            extra.append(len(rows))
        for _token, rows in writes:
            extra.extend(rows)
        extra.extend((now_ms, len(consumed)))
        for applied in consumed:
            extra.extend(applied)
        args = self._common(state, "", epoch)
        args.extend(extra)
        raw = await self._pipeliner.run(self.scripts["append"], keys.as_list(), args, direct)
        if raw[0] == b"D":
            raise DeferredEventsWaiting({raw[i]: raw[i + 1] for i in range(1, len(raw) - 1, 2)})
        flags = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        raw[0] = 1 if "1" in flags else 2
        reply = SyncReply.parse(raw)
        self._stats.bytes_received += reply.payload_bytes()
        return reply, flags

    async def replace(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        position: int,
        old_row: bytes,
        new_row: bytes,
        *,
        forget_reactions_of: str = "",
        direct: bool = False,
    ) -> SyncReply:
        """Swap the row at ``position`` if it is still ``old_row``; ``forget_reactions_of``
        names the identity whose tracked reactions the new row's tag supersedes."""
        if self._has_sha1hex is None:
            async with asyncio.timeout(self._timeout):
                probe = await self.redis.eval("return redis.sha1hex and 1 or 0", 0)
            self._has_sha1hex = bool(probe)
        # 64 bits of the row's SHA1 keep an edit's upload at one entry (a stale
        # row colliding at the same position is a 2**-64 event); servers without
        # redis.sha1hex get the whole old row to compare instead. Must match the
        # 16 hex digits lua/replace.lua compares.
        expected: bytes | str = (
            hashlib.sha1(old_row).hexdigest()[:16] if self._has_sha1hex else b"=" + old_row
        )
        extra = (position, expected, new_row, forget_reactions_of)
        return await self._run("replace", keys, state, token, "", extra, direct=direct)

    async def react(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        position: int,
        identity: str,
        slot: TagSlot,
        max_bytes: int,
        event: ReactionEvent,
        *,
        direct: bool = False,
    ) -> SyncReply:
        """Apply one reaction event to the row at ``position`` (held by the caller as
        ``slot`` cut open where its tag goes) and re-render its tag (``lua/react.lua``)."""
        extra = (position, identity, slot.before, slot.after, slot.form, max_bytes,
                 *event.as_args(), _reactions.MAX_TRACKED_MESSAGES)  # fmt: skip
        return await self._run("react", keys, state, token, "", extra, direct=direct)

    async def defer(
        self,
        keys: RoomKeys,
        state: SyncedState,
        field: bytes,
        event: bytes,
        *,
        now_ms: int,
        keep_ms: int,
        max_messages: int,
        max_events: int,
    ) -> SyncReply:
        """Keep ``event`` for the message ``field`` names, if the room still lacks it at
        ``state``'s version (``lua/defer.lua``)."""
        extra = (field, event, now_ms, keep_ms, max_messages, max_events)
        return await self._run("defer", keys, state, "", "", extra)

    async def clear(self, keys: RoomKeys, state: SyncedState, token: str, epoch: str) -> SyncReply:
        return await self._run("clear", keys, state, token, epoch, ())

    async def set_limit(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        epoch: str,
        limit: int,
        rebackfill: bool | None,
    ) -> SyncReply:
        flag = "" if rebackfill is None else ("1" if rebackfill else "0")
        return await self._run("set_limit", keys, state, token, epoch, (limit, flag))

    async def rewrite(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        epoch: str,
        rows: Sequence[bytes],
        *,
        now_ms: int = 0,
        consumed: Sequence[tuple[bytes, bytes, str, str]] = (),
    ) -> SyncReply:
        """Replace the window by ``rows`` if nobody wrote since ``state``; ``consumed``
        and ``DeferredEventsWaiting`` as for ``append`` (backfilled history may bring
        a message events wait for)."""
        extra: list[Arg] = [state.version, len(rows), *rows, now_ms, len(consumed)]
        for applied in consumed:
            extra.extend(applied)
        args = self._common(state, token, epoch)
        args.extend(extra)
        raw = await self._pipeliner.run(self.scripts["rewrite"], keys.as_list(), args, False)
        if raw[0] == b"D":
            raise DeferredEventsWaiting({raw[i]: raw[i + 1] for i in range(1, len(raw) - 1, 2)})
        reply = SyncReply.parse(raw)
        self._stats.bytes_received += reply.payload_bytes()
        return reply

    async def fold(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        *,
        epoch: str,
        tag: str = "",
        head: int,
        rows: Sequence[bytes],
        keep: int,
        summary_row: bytes,
        record: bytes,
        archive_cap: int,
        version: int | None = None,
        archive_max_bytes: int = 0,
        fold_id: str = "",
        staged: int = 0,
        archived: Sequence[tuple[int, int]] | None = None,
    ) -> SyncReply:
        """Replace the first ``len(rows)`` rows (planned at ``epoch``/``head``/``version``,
        by default ``state.version``) by a summary.

        ``keep`` indexes a row of ``rows`` to keep right after the summary (-1:
        none). The script archives the rows of window indexes ``archived``
        (inclusive ranges; by default every row but ``keep``) after the ``staged``
        rows that ``stage`` already copied under ``fold_id``, then ``record``, the
        fold's commit record (a JSON object with ``seq``; the script adds how
        many rows precede it). The rows themselves are not sent: the
        script checks the log, not their bytes (see ``lua/fold.lua``).
        """
        n = len(rows)
        if archived is None:
            archived = index_ranges([i for i in range(n) if i != keep])
        if not (record.startswith(b"{") and record.endswith(b"}") and record[1:-1].strip()):
            raise ValueError("a commit record must be a JSON object with fields")
        extra: list[Arg] = [
            lineage(epoch, tag),
            head,
            n,
            state.version if version is None else version,
            keep,
            archive_cap,
            archive_max_bytes,
            fold_id,
            staged,
            probe(rows[0]) if rows else b"",
            probe(rows[-1]) if rows else b"",
            record,
            summary_row,
            sum(last - first + 1 for first, last in archived),
        ]
        for first, last in archived:
            extra.extend((first, last))
        # fold.lua makes no meta (FRESH_EPOCH only tags the version it creates).
        return await self._run("fold", keys, state, token, secrets.token_hex(6), extra)

    async def stage(
        self,
        keys: RoomKeys,
        state: SyncedState,
        *,
        epoch: str,
        tag: str = "",
        head: int,
        version: int,
        n: int,
        fold_id: str,
        before: int,
        ranges: Sequence[tuple[int, int]],
    ) -> bool:
        """Copy the window rows of ``ranges`` to the archive for fold ``fold_id``, after
        the ``before`` rows earlier calls staged (``lua/archive_stage.lua``). False: the
        folded rows changed since the plan, or another fold took over the staging."""
        count = sum(last - first + 1 for first, last in ranges)
        args = self._common(state, "", "")
        args.extend((lineage(epoch, tag), head, version, n, fold_id, before, count))
        for first, last in ranges:
            args.extend((first, last))
        script = self.scripts["archive_stage"]
        return bool(await self._pipeliner.run(script, keys.as_list(), args, direct=True))

    async def lease_acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        """SET NX PX: the lease is ``token``'s for ``ttl_ms`` unless someone holds it."""
        async with asyncio.timeout(self._timeout):
            return bool(await self.redis.set(key, token, nx=True, px=ttl_ms))

    async def lease_release(self, key: str, token: str) -> bool:
        return bool(await self._pipeliner.call(self.scripts["lease_release"], [key], [token]))

    async def lease_renew(self, key: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._pipeliner.call(self.scripts["lease_renew"], [key], [token, ttl_ms]))

    async def wait_idle(self) -> None:
        await self._pipeliner.wait_idle()
