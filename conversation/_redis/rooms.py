"""The Redis side: Lua scripts called by SHA, batched into pipelines per loop tick.

``RoomStore`` has one typed method per script in ``lua/``. Calls made in the
same event-loop tick (by any room) travel in one non-transactional pipeline, the
way ioredis auto-pipelines: with many rooms busy, one round trip carries many
persists. Per-room order is the caller's job (one call per room at a time).

With ``min_replicas`` every batch that writes ends with ``WAIT`` on the same
connection as its scripts (on a cluster: one pinned pipeline per primary), and a
write that too few replicas confirmed fails with ``ReplicationTimeout``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import ReplicationTimeout
from .._resources import data_dir
from .._stats import Stats
from .keys import RoomKeys
from .replies import SyncedState, SyncReply

logger = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "sync",
    "append",
    "replace",
    "clear",
    "set_limit",
    "rewrite",
    "fold",
    "archive_stage",
)
#: Scripts that run without the ``_lib.lua`` prelude: they touch no room window.
STANDALONE_SCRIPT_NAMES = ("lease_release", "lease_renew")
#: Scripts whose replies ``WAIT`` need not vouch for: they write no room state. (A
#: staged archive part only counts once its fold commits, and the fold's own WAIT
#: covers every write before it: replication is one ordered stream.)
NO_WAIT_SCRIPT_NAMES = frozenset({"sync", "lease_release", "lease_renew", "archive_stage"})

#: Bytes of a row that ``probe`` keeps; must match PROBE_BYTES in lua/_lib.lua.
PROBE_BYTES = 256

Arg = str | bytes | int

# Whether scripts may call INFO, which lua/_lib.lua needs to tag epochs with the
# primary's replication id.
_INFO_PROBE = "return (pcall(redis.call, 'INFO', 'replication')) and 1 or 0"


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str, prelude: str) -> Script:
        body = (data_dir("lua") / f"{name}.lua").read_text(encoding="utf-8")
        source = f"{prelude}\n{body}"
        return cls(name, source, hashlib.sha1(source.encode("utf-8")).hexdigest())


def load_scripts() -> dict[str, Script]:
    prelude = (data_dir("lua") / "_lib.lua").read_text(encoding="utf-8")
    scripts = {name: Script.load(name, prelude) for name in SCRIPT_NAMES}
    scripts.update((name, Script.load(name, "")) for name in STANDALONE_SCRIPT_NAMES)
    return scripts


@dataclass(slots=True)
class _Call:
    script: Script
    keys: list[str]
    args: list[Arg]
    future: asyncio.Future[Any] | None  # None: sent directly (_Pipeliner.run)


class _Pipeliner:
    """Collects the script calls of one loop tick and sends them as one pipeline."""

    def __init__(
        self,
        redis: Any,
        scripts: dict[str, Script],
        stats: Stats,
        timeout: float | None,
        *,
        min_replicas: int = 0,
        replica_timeout_ms: int = 0,
    ):
        self._redis = redis
        self._scripts = scripts
        self._stats = stats
        self._timeout = timeout
        self._min_replicas = min_replicas
        self._replica_timeout_ms = replica_timeout_ms
        self._queue: list[_Call] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = isinstance(redis, RedisCluster)
        self._reload_before_next = False
        self._outstanding = 0  # calls sent or queued whose replies are not in yet
        self._info_checked = False
        self._repair: asyncio.Task[None] | None = None

    async def run(self, script: Script, keys: list[str], args: list[Arg], direct: bool) -> Any:
        """Run one script call; ``direct``: send it at once from the caller's task
        if no other call is outstanding (else it joins the tick's pipeline).

        A caller awaiting its own write asks for ``direct``: a lone call then skips
        the flush task, two loop iterations fewer per awaited write. Under load
        calls still share pipelines (one round trip for many rooms), and
        background persists always do.
        """
        if not direct or self._outstanding:
            return await self.call(script, keys, args)
        self._outstanding += 1
        try:
            (result,) = await self._results([_Call(script, keys, args, None)])
        finally:
            self._outstanding -= 1
        if isinstance(result, Exception):
            raise result
        return result

    def call(self, script: Script, keys: list[str], args: list[Arg]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, future))
        self._outstanding += 1
        if not self._scheduled:
            self._scheduled = True
            # A task's first step runs on the next loop iteration, after every call
            # made in this one: it gathers the tick's calls without a second hop.
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return future

    async def _flush(self) -> None:
        self._scheduled = False
        calls, self._queue = self._queue, []
        try:
            await self._send(calls)
        finally:
            self._outstanding -= len(calls)

    async def _send(self, calls: list[_Call]) -> None:
        try:
            results = await self._results(calls)
        except BaseException as exc:
            for call in calls:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(
                        exc if isinstance(exc, Exception) else asyncio.CancelledError()
                    )
            if not isinstance(exc, Exception):
                raise
            return
        for call, result in zip(calls, results, strict=True):
            if call.future is None or call.future.done():
                continue
            if isinstance(result, Exception):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    async def _check_info(self) -> None:
        """Once per manager, before its first script call: may scripts call INFO?"""
        try:
            async with asyncio.timeout(self._timeout):
                allowed = bool(await self._redis.eval(_INFO_PROBE, 0))
        except ResponseError as exc:  # EVAL itself refused: the scripts will say so
            logger.debug("could not probe INFO inside scripts: %s", exc)
            allowed = True
        self._info_checked = True  # not before: a probe lost to a fault is retried
        if not allowed:
            logger.warning(
                "INFO is refused inside scripts on this server (ACL, rename-command, or an "
                "emulator): epochs carry no replication id, so after a failover to a "
                "replica that missed writes, workers may patch instead of reloading"
            )

    async def _results(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply or error (NOSCRIPT handled); raises what failed them all."""
        try:
            if not self._info_checked:
                await self._check_info()
            if self._reload_before_next:
                # After a lost connection the server may be a restarted or failed-over
                # one with an empty script cache; some servers (fakeredis's TCP server)
                # even drop the connection on an error reply, so NOSCRIPT never shows.
                async with asyncio.timeout(self._timeout):
                    await self._load_all()
                self._reload_before_next = False
            # asyncio.timeout, not wait_for: on 3.11 wait_for runs the awaitable in
            # another task, two more loop iterations per round trip.
            async with asyncio.timeout(self._timeout):
                results = await self._execute(calls)
            retry = [
                call
                for call, result in zip(calls, results, strict=True)
                if isinstance(result, NoScriptError)
            ]
            if retry:
                # SCRIPT FLUSH, a restart or a failover emptied the script cache:
                # load every script again and resend only the calls that did not run.
                async with asyncio.timeout(self._timeout):
                    await self._load_all()
                async with asyncio.timeout(self._timeout):
                    again = await self._execute(retry)
                replaced = dict(zip(map(id, retry), again, strict=True))
                results = [
                    replaced.get(id(call), result)
                    for call, result in zip(calls, results, strict=True)
                ]
        except (RedisConnectionError, ConnectionError):
            # A lost connection (not a timeout: the server is still there) may mean
            # a restarted server with an empty script cache.
            self._reload_before_next = True
            raise
        return results

    async def _load_all(self) -> None:
        self._stats.script_reloads += 1
        for script in self._scripts.values():
            await self._redis.script_load(script.source)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        self._stats.round_trips += 1
        for call in calls:
            self._stats.bytes_sent += sum(
                len(a) if isinstance(a, (bytes, str)) else 8 for a in call.args
            )
        if self._min_replicas and any(c.script.name not in NO_WAIT_SCRIPT_NAMES for c in calls):
            if self._cluster:
                return await self._execute_cluster_waiting(calls)
            return await self._execute_pipelined(calls, wait=True)
        if len(calls) == 1:
            # Awaited in place: a gather would make a task for the one call that
            # every awaited write sends.
            try:
                outcome = await self._evalsha(calls[0])
            except Exception as exc:
                outcome = exc
            return _per_call([outcome])
        if self._cluster:
            # redis-py refuses EVALSHA inside a cluster pipeline: on a cluster the
            # tick's calls go out concurrently instead, each to its slot's primary,
            # and a dead primary fails only its own rooms' calls.
            outcomes = await asyncio.gather(
                *(self._evalsha(call) for call in calls), return_exceptions=True
            )
            return _per_call(outcomes)
        return await self._execute_pipelined(calls, wait=False)

    async def _execute_pipelined(self, calls: list[_Call], *, wait: bool) -> list[Any]:
        """The scripts in one pipeline, and with ``wait`` a WAIT after them: one
        connection, so WAIT counts the replicas that hold everything they wrote."""
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)
        if not wait:
            return list(await pipe.execute(raise_on_error=False))
        pipe.execute_command("WAIT", self._min_replicas, self._replica_timeout_ms)
        *results, confirmed = await pipe.execute(raise_on_error=False)
        return self._confirm(calls, results, confirmed)

    async def _execute_cluster_waiting(self, calls: list[_Call]) -> list[Any]:
        """One pinned pipeline per primary: its scripts, then its WAIT.

        redis-py's cluster pipeline re-routes commands on a retry (a script would
        go to the new owner, its WAIT elsewhere), so each primary's commands go to
        that node's own pipeline, which never retries or redirects. A primary that
        fails (dead, MOVED, slot not covered) fails only its calls, which the
        persist loop retries once the client's slot map is repaired.
        """
        await self._redis.initialize()
        by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
        results: list[Any] = [None] * len(calls)
        for index, call in enumerate(calls):
            try:
                node = self._redis.get_node_from_key(call.keys[0])
            except Exception as exc:  # SlotNotCoveredError: the map is being rebuilt
                results[index] = exc
                continue
            by_node.setdefault(node.name, (node, []))[1].append(index)
        groups = list(by_node.values())
        outcomes = await asyncio.gather(
            *(self._on_node(node, [calls[i] for i in indexes]) for node, indexes in groups),
            return_exceptions=True,
        )
        for (_node, indexes), outcome in zip(groups, outcomes, strict=True):
            replies = [outcome] * len(indexes) if isinstance(outcome, BaseException) else outcome
            for index, reply in zip(indexes, replies, strict=True):
                results[index] = reply
        stale = [calls[i] for i, result in enumerate(results) if isinstance(result, _STALE_ROUTE)]
        if stale:
            self._schedule_repair(stale[0])
        return _per_call(results)

    async def _on_node(self, node: ClusterNode, calls: list[_Call]) -> list[Any]:
        commands = [
            PipelineCommand(position, "EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args)
            for position, c in enumerate(calls)
        ]
        commands.append(
            PipelineCommand(len(calls), "WAIT", self._min_replicas, self._replica_timeout_ms)
        )
        await node.execute_pipeline(commands)
        *results, confirmed = (command.result for command in commands)
        return self._confirm(calls, results, confirmed)

    def _schedule_repair(self, call: _Call) -> None:
        """Repair the slot map in the background, one repair at a time: the calls
        that went to healthy primaries in the same batch must not wait for it."""
        if self._repair is not None and not self._repair.done():
            return
        task = asyncio.get_running_loop().create_task(self._repair_routes(call))
        self._repair = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _repair_routes(self, call: _Call) -> None:
        """Let redis-py repair its slot map: a keyed read through the normal path
        follows MOVED and reconnects after a failover, as any command would."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.exists(call.keys[0])
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            logger.debug("slot map repair failed for now: %s", exc)

    def _confirm(self, calls: list[_Call], results: list[Any], confirmed: Any) -> list[Any]:
        """Replace the replies WAIT did not vouch for by ``ReplicationTimeout``."""
        replicas = confirmed if isinstance(confirmed, int) else 0
        if replicas >= self._min_replicas:
            return results
        error = ReplicationTimeout(
            replicas=replicas, wanted=self._min_replicas, timeout_ms=self._replica_timeout_ms
        )
        if isinstance(confirmed, Exception):
            error.__cause__ = confirmed
        checked = []
        for call, result in zip(calls, results, strict=True):
            if call.script.name in NO_WAIT_SCRIPT_NAMES or isinstance(result, Exception):
                checked.append(result)
            else:
                self._stats.unreplicated_writes += 1
                checked.append(error)
        return checked

    async def _evalsha(self, call: _Call) -> Any:
        try:
            return await self._redis.evalsha(
                call.script.sha, len(call.keys), *call.keys, *call.args
            )
        except ResponseError as exc:  # NOSCRIPT included
            return exc  # per call, as a pipeline reports it

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


_LOST_CONNECTION = (RedisConnectionError, ConnectionError)

# A cluster reply that says the client's slot map is stale (or the node gone).
_STALE_ROUTE = (
    RedisConnectionError,
    RedisTimeoutError,
    RedisClusterException,
    AskError,  # and MovedError, its subclass
    ClusterDownError,
)


def forget_pooled_connections(redis: Any) -> None:
    """Close and drop a client's pooled connections that a closed event loop owned.

    Their streams belong to that loop: closing them the usual way needs it, and
    using them fails with "Event loop is closed". Their sockets are closed
    directly instead (nothing else can reach them now), and the client opens new
    connections on the loop that runs it. The pool's lock may be bound to the
    closed loop too, so it is replaced.
    """
    if isinstance(redis, RedisCluster):
        for node in redis.get_nodes():
            for connection in node._connections:
                _close_orphan(connection)
            node._connections.clear()
            node._free.clear()
        return
    pool = getattr(redis, "connection_pool", None)
    if pool is None:
        return
    for connection in [*pool._available_connections, *pool._in_use_connections]:
        _close_orphan(connection)
    pool.reset()
    if isinstance(getattr(pool, "_lock", None), asyncio.Lock):
        pool._lock = asyncio.Lock()


def _close_orphan(connection: Any) -> None:
    writer = getattr(connection, "_writer", None)
    if writer is None:
        return
    # transport.close() would schedule its callbacks on the closed loop and fail;
    # the transport's own socket is closed and detached instead, as close() would.
    transport = writer.transport
    sock = getattr(transport, "_sock", None)
    if sock is not None:
        sock.close()
        transport._sock = None
    transport._closing = True  # what close() sets first; the stream then knows it is closed
    connection._writer = connection._reader = None


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


def _per_call(outcomes: Sequence[Any]) -> list[Any]:
    """Each call's reply or error, from calls sent side by side; raises when they
    were cancelled, or when every call lost its connection (the server, or every
    node, is gone: ``_results`` then reloads the scripts before the next send)."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome
    if outcomes and all(isinstance(outcome, _LOST_CONNECTION) for outcome in outcomes):
        raise outcomes[0]
    return list(outcomes)


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
        self._timeout = command_timeout
        self._pipeliner_settings = (min_replicas, replica_timeout_ms)
        self._pipeliner = self._new_pipeliner()
        self._has_sha1hex: bool | None = None

    def _new_pipeliner(self) -> _Pipeliner:
        min_replicas, replica_timeout_ms = self._pipeliner_settings
        return _Pipeliner(
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
        return [
            state.epoch,
            state.version,
            state.head,
            state.size,
            token,
            self._ttl_ms,
            self._default_limit,
            fresh_epoch,
            self._archive_ttl_ms,
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
        return await self._run("sync", keys, state, "", "", tokens)

    async def append(
        self,
        keys: RoomKeys,
        state: SyncedState,
        epoch: str,
        writes: Sequence[tuple[str, Sequence[bytes]]],
        *,
        direct: bool = False,
    ) -> tuple[SyncReply, str]:
        """Push each write's rows under its own token; also returns one flag per
        write: ``"1"`` pushed now, ``"2"`` its token had already applied."""
        extra: list[Arg] = [len(writes)]
        for token, rows in writes:
            extra.append(token)
            extra.append(len(rows))
        for _token, rows in writes:
            extra.extend(rows)
        args = self._common(state, "", epoch)
        args.extend(extra)
        raw = await self._pipeliner.run(self.scripts["append"], keys.as_list(), args, direct)
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
        direct: bool = False,
    ) -> SyncReply:
        if self._has_sha1hex is None:
            self._has_sha1hex = bool(await self.redis.eval("return redis.sha1hex and 1 or 0", 0))
        # 64 bits of the row's SHA1 keep an edit's upload at one entry (a stale
        # row colliding at the same position is a 2**-64 event); servers without
        # redis.sha1hex get the whole old row to compare instead. Must match the
        # 16 hex digits lua/replace.lua compares.
        expected: bytes | str = (
            hashlib.sha1(old_row).hexdigest()[:16] if self._has_sha1hex else b"=" + old_row
        )
        extra = (position, expected, new_row)
        return await self._run("replace", keys, state, token, "", extra, direct=direct)

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
        self, keys: RoomKeys, state: SyncedState, token: str, epoch: str, rows: Sequence[bytes]
    ) -> SyncReply:
        return await self._run("rewrite", keys, state, token, epoch, (state.version, *rows))

    async def fold(
        self,
        keys: RoomKeys,
        state: SyncedState,
        token: str,
        *,
        epoch: str,
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
            epoch,
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
        return await self._run("fold", keys, state, token, "", extra)

    async def stage(
        self,
        keys: RoomKeys,
        state: SyncedState,
        *,
        epoch: str,
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
        args.extend((epoch, head, version, n, fold_id, before, count))
        for first, last in ranges:
            args.extend((first, last))
        script = self.scripts["archive_stage"]
        return bool(await self._pipeliner.run(script, keys.as_list(), args, direct=True))

    async def lease_acquire(self, key: str, token: str, ttl_ms: int) -> bool:
        """SET NX PX: the lease is ``token``'s for ``ttl_ms`` unless someone holds it."""
        return bool(
            await asyncio.wait_for(self.redis.set(key, token, nx=True, px=ttl_ms), self._timeout)
        )

    async def lease_release(self, key: str, token: str) -> bool:
        return bool(await self._pipeliner.call(self.scripts["lease_release"], [key], [token]))

    async def lease_renew(self, key: str, token: str, ttl_ms: int) -> bool:
        return bool(await self._pipeliner.call(self.scripts["lease_renew"], [key], [token, ttl_ms]))

    async def wait_idle(self) -> None:
        await self._pipeliner.wait_idle()
