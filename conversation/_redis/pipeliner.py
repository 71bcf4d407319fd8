"""Script calls batched per event-loop tick, with the one reload path.

Calls made in the same event-loop tick (by any room or session) travel in one
non-transactional pipeline, the way ioredis auto-pipelines: with many rooms
busy, one round trip carries many persists. Per-room order is the caller's job
(one call per room at a time). On a Redis Cluster the tick's calls go out side
by side instead, each to its slot's primary.

With ``min_replicas`` every batch that writes ends with ``WAIT`` on the same
connection as its scripts (on a cluster: one pinned pipeline per primary), and a
write that too few replicas confirmed fails with ``ReplicationTimeout``.

Scripts run as Redis Functions (``FCALL`` of the family's library, see
``scripts.py``) unless the server has none (it answers ``FCALL`` with "unknown
command", or the client's ACL user may not run it: from then on ``EVALSHA``),
or ``CONVERSATION_FUNCTIONS=0`` forces ``EVALSHA`` (for a proxy that does not
pass ``FCALL`` on, or to compare). A missing function or script (a restart
without persistence, ``FUNCTION FLUSH``, ``SCRIPT FLUSH``, a failover) is the one
reload path: the family is loaded again and only the calls that did not run are
sent again.
"""

from __future__ import annotations

import asyncio
import logging
import os
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
from .._stats import Stats
from .scripts import NO_WAIT_SCRIPT_NAMES, Arg, Script, ScriptSet

logger = logging.getLogger(__name__)

#: Set to "0" to call the scripts by EVALSHA even where the server has functions.
FUNCTIONS_ENV = "CONVERSATION_FUNCTIONS"


def functions_enabled() -> bool:
    return os.environ.get(FUNCTIONS_ENV, "1") != "0"


def _missing(result: Any) -> bool:
    """A reply saying the function or script is not loaded (it did not run)."""
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and "function not found" in str(result).lower()
    )


def _refused(text: str) -> bool:
    # No such command, or an ACL that does not allow it (one written before Redis
    # Functions: EVALSHA and SCRIPT allowed, FCALL and FUNCTION not).
    return "unknown command" in text or "no permissions" in text


def _no_functions(result: Any) -> bool:
    """A reply saying this client may not FCALL here (it did not run)."""
    # The type first: a reply (a snapshot of a thousand rows) is never made text.
    if not isinstance(result, ResponseError):
        return False
    text = str(result).lower()
    return _refused(text) and "fcall" in text


@dataclass(slots=True)
class _Call:
    script: Script
    keys: Sequence[Arg]
    args: list[Arg]
    future: asyncio.Future[Any] | None  # None: sent directly (Pipeliner.run)
    # A command run right after the script in one MULTI (see Pipeliner.run).
    alongside: tuple[Arg, ...] | None = None


class Pipeliner:
    """Collects the script calls of one loop tick and sends them as one pipeline."""

    def __init__(
        self,
        redis: Any,
        scripts: ScriptSet,
        stats: Stats,
        timeout: float | None,
        *,
        min_replicas: int = 0,
        replica_timeout_ms: int = 0,
        functions: bool | None = None,
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
        self._cluster_ready = False
        self._reload_before_next = False
        self._outstanding = 0  # calls sent or queued whose replies are not in yet
        self._repair: asyncio.Task[None] | None = None
        # Whether calls go by FCALL: until the server says it has no functions.
        self._functions = functions_enabled() if functions is None else functions
        self._heads: dict[tuple[str, int, bool], tuple[Arg, ...]] = {}

    @property
    def transactions(self) -> bool:
        """Whether ``run`` takes ``alongside``: not on a Cluster with
        ``min_replicas`` (each primary's calls then go as one pinned pipeline with
        its WAIT, see ``_execute_cluster_waiting``)."""
        return not (self._cluster and self._min_replicas)

    async def run(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: list[Arg],
        direct: bool,
        alongside: tuple[Arg, ...] | None = None,
    ) -> Any:
        """Run one script call; ``direct``: send it at once from the caller's task
        if no other call is outstanding (else it joins the tick's pipeline).

        ``alongside`` (only where ``transactions``): a command sent right after the
        script in one ``MULTI``, so it sees exactly the state the script left; the
        reply is then ``[script's reply, its reply]``.

        A caller awaiting its own write asks for ``direct``: a lone call then skips
        the flush task, two loop iterations fewer per awaited write. Under load
        calls still share pipelines (one round trip for many rooms), and
        background persists always do.
        """
        if not direct or self._outstanding:
            return await self.call(script, keys, args, alongside)
        self._outstanding += 1
        try:
            (result,) = await self._results([_Call(script, keys, args, None, alongside)])
        finally:
            self._outstanding -= 1
        if isinstance(result, Exception):
            raise result
        return result

    def call(
        self,
        script: Script,
        keys: Sequence[Arg],
        args: list[Arg],
        alongside: tuple[Arg, ...] | None = None,
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append(_Call(script, keys, args, future, alongside))
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
                # A flush that a closed loop left pending is finalized later: its
                # callers' futures died with that loop and cannot be told.
                if call.future is not None and not call.future.done():
                    if call.future.get_loop().is_closed():
                        continue
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

    async def _results(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply or error (NOSCRIPT handled); raises what failed them all."""
        try:
            if self._cluster and not self._cluster_ready:
                # Learn the slot map before the first calls go out side by side:
                # redis-py's cluster client, asked concurrently while it is still
                # uninitialised, can hand out connections it is resetting.
                async with asyncio.timeout(self._timeout):
                    await self._redis.initialize()
                self._cluster_ready = True
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
            if self._functions and any(map(_no_functions, results)):
                self._functions = False  # no functions for us here: EVALSHA from now on
            retry = [
                call
                for call, result in zip(calls, results, strict=True)
                if _missing(result) or _no_functions(result)
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
        if self._functions:
            try:
                # On a cluster redis-py sends FUNCTION LOAD to every primary.
                await self._redis.function_load(self._scripts.library, replace=True)
                return
            except ResponseError as exc:
                if not _refused(str(exc).lower()):
                    raise
                self._functions = False  # a server (or an ACL user) without functions
        for script in self._scripts.values():
            await self._redis.script_load(script.source)

    def _command(self, call: _Call) -> tuple[Arg, ...]:
        # The command's head, encoded once per script and key count: redis-py
        # encodes every argument of every call, and bytes are its fast path.
        form = (call.script.name, len(call.keys), self._functions)
        head = self._heads.get(form)
        if head is None:
            named = call.script.function if self._functions else call.script.sha
            head = ("FCALL" if self._functions else "EVALSHA", named.encode(), b"%d" % form[1])
            self._heads[form] = head
        return (*head, *call.keys, *call.args)

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
        if len(calls) == 1 and (calls[0].alongside is None or self._cluster):
            # Awaited in place: a gather would make a task for the one call that
            # every awaited write sends.
            call = calls[0]
            try:
                if call.alongside is None:
                    outcome = await self._evalsha(call)
                else:
                    outcome = await self._transaction(call)
            except Exception as exc:
                outcome = exc
            return _per_call([outcome])
        if self._cluster:
            # redis-py refuses EVALSHA (and FCALL) inside a cluster pipeline: on a cluster the
            # tick's calls go out concurrently instead, each to its slot's primary,
            # and a dead primary fails only its own rooms' calls. A call with an
            # alongside goes as a cluster transaction (which does take scripts).
            outcomes = await asyncio.gather(
                *(
                    self._evalsha(call) if call.alongside is None else self._transaction(call)
                    for call in calls
                ),
                return_exceptions=True,
            )
            return _per_call(outcomes)
        return await self._execute_pipelined(calls, wait=False)

    async def _execute_pipelined(self, calls: list[_Call], *, wait: bool) -> list[Any]:
        """The scripts in one pipeline, and with ``wait`` a WAIT after them: one
        connection, so WAIT counts the replicas that hold everything they wrote."""
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            if call.alongside is None:
                pipe.execute_command(*self._command(call))
                continue
            # A MULTI block inside the batch: redis-py's transaction pipeline would
            # make it a batch of its own (and raise, not report, a queuing error).
            pipe.execute_command("MULTI")
            pipe.execute_command(*self._command(call))
            pipe.execute_command(*call.alongside)
            pipe.execute_command("EXEC")
        if wait:
            pipe.execute_command("WAIT", self._min_replicas, self._replica_timeout_ms)
        replies = list(await pipe.execute(raise_on_error=False))
        results: list[Any] = []
        at = 0
        for call in calls:
            if call.alongside is None:
                results.append(replies[at])
                at += 1
            else:
                results.append(_transaction_result(replies[at : at + 4]))
                at += 4
        if not wait:
            return results
        return self._confirm(calls, results, replies[at])

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
            PipelineCommand(position, *self._command(c)) for position, c in enumerate(calls)
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
        _name, named, count, *rest = self._command(call)
        try:
            if self._functions:
                return await self._redis.fcall(named, count, *rest)
            return await self._redis.evalsha(named, count, *rest)
        except ResponseError as exc:  # NOSCRIPT and "Function not found" included
            return exc  # per call, as a pipeline reports it

    async def _transaction(self, call: _Call) -> Any:
        """On a Cluster: the call and its ``alongside`` in one MULTI on the slot's
        primary (redis-py's cluster transaction: both name the room's slot)."""
        assert call.alongside is not None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.execute_command(*self._command(call))
                pipe.execute_command(*call.alongside)
                script, alongside = await pipe.execute(raise_on_error=False)
        except ResponseError as exc:  # refused while queuing: nothing ran
            return exc
        return script if isinstance(script, Exception) else [script, alongside]

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
    connections on the loop that runs it. Connections of a live loop stay: a
    client shared by a manager and a ``SessionStore`` is rebound by each, and
    the second must not close what the first already opened on the new loop.
    The pool's lock may be bound to the closed loop too, so it is replaced.
    """
    if isinstance(redis, RedisCluster):
        for node in redis.get_nodes():
            dead = [c for c in node._connections if _on_closed_loop(c)]
            for connection in dead:
                _close_orphan(connection)
                node._connections.remove(connection)
                if connection in node._free:
                    node._free.remove(connection)
        return
    pool = getattr(redis, "connection_pool", None)
    if pool is None:
        return
    for connection in [*pool._available_connections, *pool._in_use_connections]:
        if _on_closed_loop(connection):
            _close_orphan(connection)
            if connection in pool._available_connections:
                pool._available_connections.remove(connection)
            pool._in_use_connections.discard(connection)
    lock = getattr(pool, "_lock", None)
    if isinstance(lock, asyncio.Lock) and _bound_to_closed_loop(lock):
        pool._lock = asyncio.Lock()


def _on_closed_loop(connection: Any) -> bool:
    writer = getattr(connection, "_writer", None)
    if writer is None:
        return False  # not connected: it connects on whichever loop uses it next
    loop = getattr(writer.transport, "_loop", None)
    return loop is None or loop.is_closed()


def _bound_to_closed_loop(lock: asyncio.Lock) -> bool:
    loop = getattr(lock, "_loop", None)  # set on first contention (asyncio's loop mixin)
    return loop is not None and loop.is_closed()


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


def _transaction_result(replies: Sequence[Any]) -> Any:
    """A call's result from its MULTI, script, alongside, EXEC replies: ``[script's
    reply, alongside's reply]``, or the error that kept the script from running
    (queued or not: NOSCRIPT and unknown FCALL then reach the reload path)."""
    _multi, queued, _alongside, executed = replies
    if isinstance(queued, Exception):
        return queued  # refused while queuing (unknown command): EXEC aborted
    if isinstance(executed, Exception):
        return executed
    if isinstance(executed[0], Exception):
        return executed[0]
    return list(executed)


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
