"""A randomized multi-process checker: nothing acknowledged is lost, doubled or reordered.

``ChaosCluster`` starts a private ``redis-server`` (AOF on, ``appendfsync
always``), a ``FaultProxy`` in front of it and P worker processes (spawned once,
reused round after round). One *round* is one seed:

1. every worker runs, for each of R rooms, a seeded random sequence of writes
   through the proxy: appends with unique ids (sync, ``_async``, ``durable=True``
   and with an idempotency key of the checker's choosing), edits, deletes and
   reactions (of its own entries, other workers' entries and ids that never
   existed), clears and limit changes, and reads (``ensure_fresh_from_redis``,
   ``get_messages_async``) that check the view on the spot. Besides, what users
   hit first (SPEC §6):

   * *recalls with the error's key*: a durable append that raises
     ``DurabilityError`` (or any ``PersistError`` naming a key) is called again
     with ``idempotency_key=err.idempotency_key`` until one call is confirmed;
     and an acknowledged keyed append is re-sent with its key later on (a
     redelivered event), which must change nothing;
   * *mixed ticks*: a sync ``append`` immediately followed, in the same loop
     tick, by an awaited keyed ``append_async`` (fresh, or one of those
     recalls), so both can travel in one script call;
   * *cancelled callers*: a task awaiting ``append_async`` (plain, durable, or a
     recall) runs beside the room's next operations and is cancelled after a
     drawn delay or a drawn number of them, or left to finish;
   * *loop moves*: a worker runs its round as up to ``loop_phases``
     ``asyncio.run`` calls with the same manager and client, then drains and
     syncs in two more, so each closed loop leaves queued, in-flight and
     cancelled writes behind for the next loop to take over.

   It logs every operation with its invocation time, its completion time when
   it was awaited, and what it returned;
2. meanwhile the parent injects faults drawn from the same seed: latency, cut
   connections, blackholes (replies held after Redis applied the command, or
   everything held, later delivered or dropped), ``CLIENT KILL``, ``SCRIPT
   FLUSH``, ``redis-server`` restarts (SIGTERM or SIGKILL; AOF keeps every
   acknowledged write), and the deletion of ONE companion key of a room: only
   its ``:log``, only its ``:meta``, only its ``:idem`` or only its
   ``:archive`` (``conversation._keys.RoomKeys``; the window list itself is
   never deleted: that is data loss, not partial key loss);
3. faults end; every worker ``drain()``s; then every worker runs
   ``ensure_fresh_from_redis`` on each room and reports its windows;
4. ``check_round`` compares the logs with what Redis holds (read directly, not
   through the proxy) and with every worker's window.

Worker clocks are ``time.monotonic()``, which on Linux is one system-wide clock,
so times logged by different processes compare. "x definitely happened before
y" means x completed before y was invoked, or both came from the same worker
and room in that order (one room's writes of one worker persist in order). Sync
writes are complete, at the latest, when the next awaited call of the same
worker and room returned, else when that worker's ``drain`` returned. Two kinds
of append have no place in their worker's order, only their times (*floating*):
a durable append whose recall shared a tick with a sync append (the recall lands
after that append, or the first attempt had landed before it), and a durable
append awaited in a background task (its recalls run beside later operations;
cancelled, an attempt held by a blackhole may land after anything).

What the model accepts, and why:

* cancelled callers: a cancelled *plain* ``append_async`` still lands, exactly
  once (the engine documents that cancelling the await does not cancel the
  write): it counts as acknowledged, like a sync append. A cancelled *durable*
  one may land or not (once at most); a cancelled recall changes nothing;
* a recall counts its turn once: a re-sent key never adds a row;
* ``:log`` lost: nothing changes in the model (the engine notices the lost
  records and sends snapshots; SPEC §29);
* ``:meta`` lost: the window rows stay (a writer adopts them under a new
  epoch); the room's limit falls back to the default, so the loss counts as a
  write of the default limit at the moment of the deletion (and until a write
  trims, the window may still be as long as an earlier limit allowed);
* ``:idem`` lost: the tokens of writes that already applied are forgotten, so
  a write re-sent after the loss (an engine retry of an ambiguous attempt, a
  recall) may be stored a second time. Only for an id whose sends span such a
  loss (from its first invocation to the completion of its last send, recalls
  included, or to the end of a blackhole that held one of its attempts and then
  delivered it) are duplicates accepted, in Redis and in served views; the
  order and edit checks then skip that id (its copies hold different edits);
* ``:archive`` lost: nothing changes (the mix does not fold, so the archive is
  usually absent and its loss must change nothing either).

The final checks, per room (W = the window in Redis):

* lost: an acknowledged append missing from W although some entry still in W
  definitely came before it (W is always a contiguous suffix of what was
  appended since the last clear), or although no clear can have come after it
  and W is shorter than the smallest possible limit (so nothing was trimmed);
* duplicated: an id twice in W; phantom: an id nobody appended;
* reordered: x before y definitely, both in W, x after y in W;
* edits: for each entry in W, its text, ``[Reactions: …]`` and ``[deleted at …]``
  each show a write that was reported as applied and that no other applied
  write definitely superseded (deletion: the first stands); nothing reported
  as not applied is visible; an edit of an id that never existed returns False;
  the media parts of an image post survive text edits;
* limit: the room's limit is one no later limit change (or meta loss)
  superseded; W fits it;
* views: every worker's window (and limit) equals Redis after the final sync (the
  window as three more `get_messages_async` serve it: with `"push"` the last ones
  may be served without a round trip);
* during the run: what ``get_messages_async`` / ``ensure_fresh_from_redis``
  leave in a worker's view never holds an id twice nor its own appends out of
  order (floating appends aside).

A failure raises ``ChaosFailure`` naming the seed, how to replay it, and a JSON
dump of the round (every log and the final Redis state).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import random
import re
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from fault_proxy import ThreadedFaultProxy
from redis_servers import RedisServer

logger = logging.getLogger(__name__)

MARKER_RE = re.compile(r"\[Message ID: ([^\[\]\r\n]{1,256})\]")
_TAG = r"\[(?:deleted at (?P<deleted>[^\[\]\n]*)|Reactions: (?P<reactions>[^\[\]\n]*))\]"
_TAG_AFTER_MARKER = re.compile(" " + _TAG)
_TAG_AT_START = re.compile(_TAG + " ")
MIN_CHANNEL_LIMIT = 50  # set_channel_limit clamps to [50, 1000]

# Operation mix of a worker, per room (weights).
OP_WEIGHTS: dict[str, int] = {
    "append": 28,
    "append_async": 10,
    "append_durable": 6,
    "append_keyed": 4,  # append_async with the checker's key, after a sync append half the time
    "recall": 4,  # an acknowledged keyed append re-sent with its key
    "background": 5,  # append_async awaited by a task that may be cancelled
    "update": 10,
    "react": 10,
    "delete": 6,
    "fresh": 4,
    "read": 4,
    "limit": 2,
    "clear": 1,
}

FAULT_WEIGHTS: dict[str, int] = {
    "latency": 3,
    "cut": 3,
    "blackhole_replies": 4,
    "blackhole_both": 3,
    "client_kill": 2,
    "script_flush": 1,
    "restart": 1,
}

#: Companion keys deleted on their own schedule, beside the faults above (an
#: eviction or expiry strikes at any moment): weights. Never the window itself.
DROP_WEIGHTS: dict[str, int] = {":log": 2, ":meta": 1, ":idem": 1, ":archive": 1}
DROP_EVERY = (0.1, 0.4)  # seconds between two deletions, drawn uniformly


@dataclass(frozen=True)
class ChaosOptions:
    """Shape of a round; the defaults are the quick variant."""

    processes: int = 3
    rooms: int = 3
    ops_per_room: int = 40
    think_seconds: float = 0.006  # mean pause between one room's operations
    faults: bool = True
    restart_every: int = 3  # a redis-server restart in every n-th round (0: never)
    loop_phases: int = 3  # a worker runs its operations in 1..n asyncio.run calls
    max_history: int = 50
    command_timeout: float = 0.3
    durable_timeout: float = 0.6
    retry_backoff: tuple[float, float] = (0.02, 0.25)
    clear_weight: int = OP_WEIGHTS["clear"]
    round_timeout: float = 90.0
    freshness: str = "sync"  # the workers' ConversationManager(freshness=...)


#: The long variant (scripts/soak.py --soak): more rooms, longer rounds, more restarts.
SOAK = ChaosOptions(rooms=4, ops_per_room=120, restart_every=2)


@dataclass(slots=True)
class OpRecord:
    """One operation as a worker saw it. Times are ``time.monotonic()``."""

    proc: int
    room: str
    i: int  # position in this worker's sequence of writes and reads for the room
    kind: str  # append | recall | update | react | delete | clear | limit | fresh | read
    form: str  # sync | async | durable | keyed | bg-async | bg-durable | bg-recall
    inv: float
    done: float | None = None  # when the awaited call returned (None: sync form, cancelled)
    result: str = "ok"  # ok | true | false | error:<type>
    target: str | None = None  # the entry's id (append: the new id; recall: the re-sent id)
    value: str | None = None  # append: body; update: body; react/delete: tag; limit
    role: str | None = None
    media: bool = False
    attempts: int = 1  # durable appends and recalls: calls until one was confirmed
    key: str | None = None  # the idempotency key it was (last) sent with, when known
    floating: bool = False  # no place in its worker's order (see the module docstring)
    cancelled: bool = False  # a background caller cancelled before the call returned


@dataclass(frozen=True, slots=True)
class KeyLoss:
    """The parent deleted one companion key of a room between ``start`` and ``end``."""

    room: str
    suffix: str  # ":log" | ":meta" | ":idem" | ":archive"
    start: float
    end: float
    existed: bool


@dataclass(frozen=True, slots=True)
class Held:
    """A blackhole of both directions that delivered what it held when it ended:
    an attempt sent during it may reach Redis at ``end``, after its write was
    confirmed by a retry (or given up)."""

    start: float
    end: float


@dataclass
class RoundEvents:
    """What the parent did to a round, with times, for the model."""

    losses: list[KeyLoss] = field(default_factory=list)
    holds: list[Held] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ViewEvent:
    """A read whose view looked wrong to the worker; the parent judges it (see check_round)."""

    proc: int
    room: str
    when: str
    at: float
    twice: list[str]  # ids the view held more than once
    own: list[str]  # the worker's own appends in the view, in view order (floating ones aside)


@dataclass
class RoundReport:
    seed: int
    ops: int = 0
    acknowledged: int = 0
    appends_acknowledged: int = 0
    appends_in_redis: int = 0
    appends_trimmed_or_cleared: int = 0
    edits_checked: int = 0
    durable_errors: int = 0
    sync_retries: int = 0  # final ensure_fresh_from_redis calls that raised and were retried
    recalls: int = 0  # acknowledged keyed appends re-sent with their key
    mixed_ticks: int = 0  # sync append + awaited keyed append in one loop tick
    cancelled: int = 0  # background callers cancelled before their call returned
    loop_moves: int = 0  # asyncio.run calls after a worker's first, with the same manager
    keys_lost: int = 0  # companion-key deletions that found the key
    excused_doubles: int = 0  # ids stored twice because their sends spanned an :idem loss
    faults: Counter[str] = field(default_factory=Counter)
    engine: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def retries(self) -> int:
        return self.engine["persist_retries"] + self.durable_errors

    def counts(self) -> dict[str, int]:
        kinds = Counter(v.split(":", 1)[0] for v in self.violations)
        return {k: kinds[k] for k in ("lost", "duplicated", "reordered")} | {
            "other": sum(
                n for k, n in kinds.items() if k not in ("lost", "duplicated", "reordered")
            )
        }

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.ops} ops ({self.acknowledged} acknowledged, "
            f"{self.appends_acknowledged} appends, {self.appends_in_redis} in Redis at the end, "
            f"{self.appends_trimmed_or_cleared} trimmed/cleared), "
            f"faults {dict(self.faults)} ({self.keys_lost} keys lost), "
            f"persist failures {self.engine['persist_failures']}, "
            f"retries {self.retries} (durable re-calls {self.durable_errors}), "
            f"recalls {self.recalls}, mixed ticks {self.mixed_ticks}, "
            f"cancelled {self.cancelled}, loop moves {self.loop_moves}, "
            f"final-sync retries {self.sync_retries}, "
            f"violations {self.counts()} in {self.seconds:.1f}s"
        )


class ChaosFailure(AssertionError):
    def __init__(
        self,
        seed: int,
        message: str,
        dump: Path | None = None,
        options: ChaosOptions | None = None,
        report: RoundReport | None = None,
    ) -> None:
        self.seed = seed
        self.dump = dump
        self.report = report
        where = f"\nround dump: {dump}" if dump else ""
        super().__init__(
            f"chaos checker failed for seed {seed}: {message}{where}\n"
            f"replay: .venv/bin/python scripts/soak.py {replay_args(seed, options)}"
        )


def replay_args(seed: int, options: ChaosOptions | None) -> str:
    options = options or ChaosOptions()
    return (
        f"--seed {seed} --processes {options.processes} --rooms {options.rooms} "
        f"--ops {options.ops_per_room} --restart-every {options.restart_every} "
        f"--loop-phases {options.loop_phases} --freshness {options.freshness}"
    )


# =========================================================================
# worker processes
# =========================================================================


def worker_main(conn: multiprocessing.connection.Connection, index: int) -> None:
    """Body of a spawned worker: run rounds on request until told to stop."""
    logging.basicConfig(level=logging.ERROR)  # persist warnings are counted, not printed
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        spec: dict[str, Any] = message[1]
        try:
            result = _worker_round(conn, index, spec)
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            continue
        conn.send(("result", result))


def _recv(conn: multiprocessing.connection.Connection, expected: str) -> Any:
    message = conn.recv()
    if message[0] != expected:
        raise RuntimeError(f"worker expected {expected!r}, got {message[0]!r}")
    return message


@dataclass
class _Worker:
    index: int
    seed: int
    manager: Any
    options: ChaosOptions
    records: list[OpRecord] = field(default_factory=list)
    view_events: list[ViewEvent] = field(default_factory=list)
    counter: Iterator[int] = field(default_factory=itertools.count)
    durable_errors: int = 0
    sync_retries: int = 0
    recalls: int = 0
    mixed_ticks: int = 0
    cancelled: int = 0
    loop_moves: int = 0


def _worker_round(
    conn: multiprocessing.connection.Connection, index: int, spec: dict[str, Any]
) -> dict[str, Any]:
    """One round: the operations in 1..loop_phases ``asyncio.run`` calls, then the
    drain and the final sync in one more each, all with the same manager and client
    (SPEC §26: a manager whose loop closed moves to the next loop that uses it)."""
    import redis.asyncio as aioredis

    from conversation import ConversationManager

    options = ChaosOptions(**spec["options"])
    rooms: list[str] = spec["rooms"]
    client = aioredis.Redis.from_url(spec["url"], socket_connect_timeout=1.0)
    manager = ConversationManager(
        None,
        max_history=options.max_history,
        redis=client,
        key_prefix=spec["prefix"],
        command_timeout=options.command_timeout,
        durable_timeout=options.durable_timeout,
        retry_backoff=options.retry_backoff,
        freshness=options.freshness,
    )
    worker = _Worker(index, spec["seed"], manager, options)
    runs = [_RoomRun(worker, r, room) for r, room in enumerate(rooms)]
    rng = random.Random(f"{worker.seed}:{index}:loops")
    phases = 1 + rng.randrange(max(1, options.loop_phases))
    cuts = sorted(rng.sample(range(1, options.ops_per_room), phases - 1))
    bounds = list(itertools.pairwise([0, *cuts, options.ops_per_room]))
    # Shortly before the parent gives up on the round, every task still running
    # writes its stack here: a hang names itself.
    hang = _Watchdog(Path(spec["dir"]) / f"hang-seed-{worker.seed}-worker-{index}.txt",
                     time.monotonic() + 0.8 * options.round_timeout, manager)  # fmt: skip
    closed = False
    try:
        for start, stop in bounds:
            # Whatever the phase leaves behind (queued or in-flight persists,
            # background callers) dies with its loop; the next loop takes over.
            asyncio.run(hang.watch(_phase(runs, start, stop)))
        conn.send(("ops_done", len(worker.records)))
        _recv(conn, "drain")
        drained_at = asyncio.run(hang.watch(_drain(manager)))
        conn.send(("drained", drained_at))
        _recv(conn, "sync")
        views, limits, stats = asyncio.run(hang.watch(_final_sync(worker, rooms, client)))
        closed = True
    finally:
        if not closed:
            with contextlib.suppress(Exception):
                asyncio.run(_close(manager, client))
    worker.loop_moves = len(bounds) + 1  # every asyncio.run after the first
    return {
        "records": [asdict(record) for record in worker.records],
        "view_events": [asdict(event) for event in worker.view_events],
        "views": views,
        "limits": limits,
        "stats": stats,
        "drained_at": drained_at,
        "durable_errors": worker.durable_errors,
        "sync_retries": worker.sync_retries,
        "recalls": worker.recalls,
        "mixed_ticks": worker.mixed_ticks,
        "cancelled": worker.cancelled,
        "loop_moves": worker.loop_moves,
    }


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Watchdog:
    path: Path
    at: float  # time.monotonic() when to write the stacks
    manager: Any  # whose rooms' state goes with them

    async def watch(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(max(0.0, self.at - time.monotonic()), self._dump)
        try:
            return await coro
        finally:
            handle.cancel()

    def _dump(self) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(f"--- {time.monotonic():.3f}: tasks still running\n")
            for task in asyncio.all_tasks():
                out.write(f"{task!r}\n{''.join(_await_chain(task.get_coro()))}\n")
            # Private state, for diagnosis only: what each room waits on.
            for room_id, room in getattr(self.manager, "_rooms", {}).items():
                out.write(
                    f"room {room_id}: pending {[type(op).__name__ for op in room.pending]} "
                    f"done {[op.done.done() if op.done else None for op in room.pending]} "
                    f"inflight {room.inflight!r:.300} task {room.task!r:.200} "
                    f"inline {room.inline!r:.100} lock {room.lock.locked()}\n"
                )


def _await_chain(awaitable: Any) -> Iterator[str]:
    """Every frame a suspended coroutine waits through, outermost first."""
    depth = 0
    while awaitable is not None and depth < 50:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            yield f"  awaiting {awaitable!r:.300}\n"
            return
        yield f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}\n"
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
        depth += 1


async def _phase(runs: Sequence[_RoomRun], start: int, stop: int) -> None:
    await asyncio.gather(*(run.run(start, stop) for run in runs))


async def _drain(manager: Any) -> float:
    await manager.drain(timeout=60)
    return time.monotonic()


async def _final_sync(
    worker: _Worker, rooms: Sequence[str], client: Any
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int], dict[str, int]]:
    manager = worker.manager
    try:
        views: dict[str, list[dict[str, Any]]] = {}
        limits: dict[str, int] = {}
        for room in rooms:
            await _fresh_with_retries(worker, room)
            # The reported view is what a read serves once the room is quiet: with
            # freshness="push" the later reads may skip their round trip, and what
            # they serve is checked against Redis like the rest.
            for _ in range(3):
                views[room] = await manager.get_messages_async(room)
            limits[room] = manager.get_channel_limit(room)
        return views, limits, manager.stats()
    finally:
        await _close(manager, client)


async def _close(manager: Any, client: Any) -> None:
    try:
        with contextlib.suppress(Exception):
            await manager.aclose(timeout=10)
    finally:
        await client.aclose()


async def _fresh_with_retries(worker: _Worker, room: str) -> None:
    """The final sync, retried as a careful caller would: Redis is healthy again by now,
    but a pooled connection the faults killed fails the first read on it."""
    from conversation import RedisUnavailable

    deadline = time.monotonic() + 30
    while True:
        try:
            await worker.manager.ensure_fresh_from_redis(room)
            return
        except RedisUnavailable:
            worker.sync_retries += 1
            if time.monotonic() > deadline:
                raise


def _ids_in(messages: Sequence[dict[str, Any]]) -> list[str]:
    ids = []
    for message in messages:
        content = message.get("content")
        text = content if isinstance(content, str) else _first_text(content)
        match = MARKER_RE.search(text or "")
        if match:
            ids.append(match.group(1))
    return ids


def _first_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    for part in content or ():
        if isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            return text if isinstance(text, str) else None
    return None


def _own_out_of_order(own: Sequence[str]) -> bool:
    """Whether one worker's appends to a room (ids ``p<w>r<r>n<k>``) are out of k order."""
    numbers = [int(ident.rsplit("n", 1)[1]) for ident in own]
    return numbers != sorted(numbers)


@dataclass(slots=True)
class _Turn:
    ident: str
    role: str
    content: str | list[Any]
    kwargs: dict[str, Any]


@dataclass(slots=True)
class _Background:
    task: asyncio.Task[None]
    ops_left: int | None  # cancel after this many more operations of the room (None: never)


class _RoomRun:
    """One worker's seeded sequence of operations on one room, run phase by phase."""

    def __init__(self, worker: _Worker, ridx: int, room: str) -> None:
        self.worker = worker
        self.manager = worker.manager
        self.options = worker.options
        self.ridx = ridx
        self.room = room
        self.rng = random.Random(f"{worker.seed}:{worker.index}:{ridx}")
        weights = dict(OP_WEIGHTS, clear=self.options.clear_weight)
        self.kinds = list(weights)
        self.cumulative = list(itertools.accumulate(weights.values()))
        self.tag = f"p{worker.index}r{ridx}"
        self.positions = itertools.count()
        self.keyed: list[tuple[_Turn, str]] = []  # acknowledged appends with a known key
        self.background: list[_Background] = []
        self.floating: set[str] = set()

    # ------------------------------------------------------------- records

    def _record(self, kind: str, form: str) -> OpRecord:
        record = OpRecord(
            self.worker.index, self.room, next(self.positions), kind, form, time.monotonic()
        )
        self.worker.records.append(record)
        return record

    def _new_append(self, form: str) -> tuple[OpRecord, _Turn]:
        rng = self.rng
        record = self._record("append", form)
        ident = f"{self.tag}n{next(self.worker.counter)}"
        body = f"a:{ident}"
        text = f"[Message ID: {ident}] {body}"
        media = rng.random() < 0.2
        content: str | list[Any] = (
            [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": f"https://img.test/{ident}.png"}},
            ]
            if media
            else text
        )
        role = rng.choice(("user", "assistant"))
        kwargs: dict[str, Any] = {"message_id": ident} if rng.random() < 0.5 else {}
        record.target, record.value, record.role, record.media = ident, body, role, media
        return record, _Turn(ident, role, content, kwargs)

    def _sync_append(self) -> OpRecord:
        record, turn = self._new_append("sync")
        self.manager.append(self.room, turn.role, turn.content, **turn.kwargs)
        return record

    def _mark_floating(self, record: OpRecord) -> None:
        record.floating = True
        if record.kind == "append" and record.target:
            self.floating.add(record.target)

    # ---------------------------------------------------------------- run

    async def run(self, start: int, stop: int) -> None:
        self.background = []  # tasks of an earlier phase died with its loop
        for i in range(start, stop):
            # Workload pacing (a bot's think time), so faults land in the middle of work.
            await asyncio.sleep(self.rng.random() * 2 * self.options.think_seconds)
            op = self.rng.choices(self.kinds, cum_weights=self.cumulative)[0]
            await self._step(i, op)
            await self._tick_background()
        # Background callers still waiting are cancelled when this phase's loop closes.

    async def _step(self, i: int, op: str) -> None:
        from conversation import ConversationError, RedisUnavailable

        manager, room, rng = self.manager, self.room, self.rng
        if op == "append":
            self._sync_append()
            return
        if op == "append_async":
            record, turn = self._new_append("async")
            await manager.append_async(room, turn.role, turn.content, **turn.kwargs)
            record.done = time.monotonic()
            return
        if op == "append_durable":
            record, turn = self._new_append("durable")
            await self._until_confirmed(record, turn, durable=True, key=None, mixed=True)
            record.done = time.monotonic()
            return
        if op == "recall" and self.keyed:
            await self._recall()
            return
        if op in ("append_keyed", "recall"):
            mixed = rng.random() < 0.5
            if mixed:
                self._sync_append()  # and the keyed append in the same tick: one batch
                self.worker.mixed_ticks += 1
            record, turn = self._new_append("keyed")
            key = f"key:{turn.ident}"
            await self._until_confirmed(
                record, turn, durable=rng.random() < 0.3, key=key, mixed=True
            )
            record.done = time.monotonic()
            return
        if op == "background":
            await self._start_background()
            return
        if op in ("update", "react", "delete"):
            known = _ids_in(manager.get_messages(room))[-25:]
            ghost = not known or rng.random() < 0.05
            target = f"ghost-{self.tag}i{i}" if ghost else rng.choice(known)
            asynchronous = rng.random() < 0.5
            record = self._record(op, "async" if asynchronous else "sync")
            record.target = target
            try:
                if op == "update":
                    value = f"u:{self.tag}i{i}"
                    new = f"[Message ID: {target}] {value}" if rng.random() < 0.8 else value
                    record.value = value
                    found = (
                        await manager.update_message_async(room, target, new)
                        if asynchronous
                        else manager.update_message(room, target, new)
                    )
                elif op == "react":
                    value = f"r:{self.tag}i{i}" if rng.random() < 0.85 else ""
                    record.value = value
                    found = (
                        await manager.patch_reactions_async(room, target, value)
                        if asynchronous
                        else manager.patch_reactions(room, target, value)
                    )
                else:
                    value = f"d:{self.tag}i{i}"
                    record.value = value
                    found = (
                        await manager.mark_deleted_async(room, target, value)
                        if asynchronous
                        else manager.mark_deleted(room, target, value)
                    )
                record.result = "true" if found else "false"
            except ConversationError as exc:
                record.result = f"error:{type(exc).__name__}"
            if asynchronous:
                record.done = time.monotonic()
            return
        if op == "clear":
            if rng.random() < 0.5:
                self._record("clear", "sync")
                manager.clear(room)
            else:
                record = self._record("clear", "async")
                await manager.clear_async(room)
                record.done = time.monotonic()
            return
        if op == "limit":
            wanted = rng.choice((40, 50, 60, 80, 120))
            if rng.random() < 0.5:
                record = self._record("limit", "sync")
                record.value = str(manager.set_channel_limit(room, wanted))
            else:
                record = self._record("limit", "async")
                record.value = str(await manager.set_channel_limit_async(room, wanted))
                record.done = time.monotonic()
            return
        record = self._record(op, "async")
        if op == "fresh":
            try:
                await manager.ensure_fresh_from_redis(room)
            except RedisUnavailable as exc:
                record.result = f"error:{type(exc).__name__}"
            record.done = time.monotonic()
            self._check_view(manager.get_messages(room), "ensure_fresh_from_redis")
        else:
            messages = await manager.get_messages_async(room)
            record.done = time.monotonic()
            self._check_view(messages, "get_messages_async")

    # ------------------------------------------------------------ recalls

    async def _until_confirmed(
        self, record: OpRecord, turn: _Turn, *, durable: bool, key: str | None, mixed: bool
    ) -> None:
        """Call ``append_async`` until one call is confirmed: the documented recovery
        from ``DurabilityError`` (or any ``PersistError`` naming the write) is to call
        again with ``idempotency_key=err.idempotency_key``, durable or not. ``mixed``:
        a recall may follow a sync append in the same tick (and share its batch)."""
        from conversation import PersistError

        rng = self.rng
        record.key = key
        while True:
            try:
                await self.manager.append_async(
                    self.room,
                    turn.role,
                    turn.content,
                    durable=durable,
                    idempotency_key=key,
                    **turn.kwargs,
                )
                break
            except PersistError as err:  # DurabilityError included
                if err.idempotency_key is None:
                    raise
                key = record.key = err.idempotency_key
                record.attempts += 1
                self.worker.durable_errors += 1
                durable = rng.random() < 0.7
                if mixed and rng.random() < 0.4:
                    self._sync_append()
                    self.worker.mixed_ticks += 1
                    durable = rng.random() < 0.3  # a durable write never shares a batch
                    if record.kind == "append":
                        # Its first attempt landed before that append, or this recall
                        # lands after it.
                        self._mark_floating(record)
        if key is not None and record.kind == "append":
            self.keyed.append((turn, key))

    def _new_recall(self, form: str, *, mixed: bool) -> tuple[OpRecord, _Turn, str]:
        """An acknowledged keyed append to re-send with its key (it must change nothing);
        ``mixed``: after a sync append, in the same tick."""
        turn, key = self.rng.choice(self.keyed)
        if mixed:
            self._sync_append()
            self.worker.mixed_ticks += 1
        record = self._record("recall", form)
        record.target = turn.ident
        self.worker.recalls += 1
        return record, turn, key

    async def _recall(self) -> None:
        record, turn, key = self._new_recall("keyed", mixed=self.rng.random() < 0.5)
        durable = self.rng.random() < 0.3
        await self._until_confirmed(record, turn, durable=durable, key=key, mixed=True)
        record.done = time.monotonic()

    # ---------------------------------------------------- background callers

    async def _start_background(self) -> None:
        rng = self.rng
        draw = rng.random()
        if draw < 0.3 and self.keyed:
            record, turn, key = self._new_recall("bg-recall", mixed=False)
            body = self._until_confirmed(record, turn, durable=False, key=key, mixed=False)
        elif draw < 0.6:
            record, turn = self._new_append("bg-durable")
            self._mark_floating(record)  # its recalls run beside later operations
            body = self._until_confirmed(record, turn, durable=True, key=None, mixed=False)
        else:
            record, turn = self._new_append("bg-async")
            body = self._until_confirmed(record, turn, durable=False, key=None, mixed=False)
        task = asyncio.get_running_loop().create_task(self._background_body(body, record))
        # The task's first step runs before this one resumes: its write is submitted
        # (in the view and queued) before the room's next operation.
        await asyncio.sleep(0)
        fate = rng.random()
        if fate < 0.35:
            # Cancelled after a drawn delay, often while its persist is in flight.
            delay = rng.random() * 2 * self.options.command_timeout
            done, _ = await asyncio.wait({task}, timeout=delay)
            if not done:
                await self._cancel(task)
        elif fate < 0.8:
            self.background.append(_Background(task, rng.randint(1, 3)))
        else:
            self.background.append(_Background(task, None))

    async def _background_body(self, body: Coroutine[Any, Any, None], record: OpRecord) -> None:
        try:
            await body
        except asyncio.CancelledError:
            self.worker.cancelled += 1
            record.cancelled = True
            raise
        record.done = time.monotonic()

    async def _tick_background(self) -> None:
        still: list[_Background] = []
        for entry in self.background:
            if entry.task.done():
                continue
            if entry.ops_left is not None:
                entry.ops_left -= 1
                if entry.ops_left <= 0:
                    await self._cancel(entry.task)
                    continue
            still.append(entry)
        self.background = still

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -------------------------------------------------------------- views

    def _check_view(self, messages: Sequence[dict[str, Any]], when: str) -> None:
        ids = _ids_in(messages)
        twice = sorted(ident for ident, n in Counter(ids).items() if n > 1)
        own = [i for i in ids if i.startswith(f"{self.tag}n") and i not in self.floating]
        if twice or _own_out_of_order(own):
            self.worker.view_events.append(
                ViewEvent(self.worker.index, self.room, when, time.monotonic(), twice, own)
            )


# =========================================================================
# the parent: servers, proxy, faults, rounds
# =========================================================================


class ChaosCluster:
    """A private redis-server behind a fault proxy, and P reusable worker processes."""

    def __init__(self, directory: Path, options: ChaosOptions | None = None) -> None:
        self.directory = directory
        self.options = options or ChaosOptions()
        self.prefix = "chaos"
        self.server = RedisServer(
            directory / "redis",
            extra=("--appendonly", "yes", "--appendfsync", "always"),
        )
        self.server.start()
        self.proxy = ThreadedFaultProxy(self.server.port)
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, multiprocessing.connection.Connection]] = []
        self.rounds = 0
        self._spawn_workers()

    # ------------------------------------------------------------ lifecycle

    def _spawn_workers(self) -> None:
        for index in range(self.options.processes):
            parent, child = self._context.Pipe()
            process = self._context.Process(
                target=worker_main, args=(child, index), name=f"chaos-worker-{index}", daemon=True
            )
            process.start()
            child.close()
            self._workers.append((process, parent))

    def _stop_workers(self, *, force: bool = False) -> None:
        for _process, conn in self._workers:
            if not force:
                with contextlib.suppress(OSError, BrokenPipeError):
                    conn.send(("stop",))
        for process, conn in self._workers:
            process.join(timeout=0 if force else 10)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers = []

    def close(self) -> None:
        self._stop_workers()
        self.proxy.close()
        self.server.stop()

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --------------------------------------------------------------- rounds

    def run_round(self, seed: int, *, raise_on_violation: bool = True) -> RoundReport:
        """One seeded round; raises ``ChaosFailure`` (with the seed) on any violation."""
        self.rounds += 1
        started = time.monotonic()
        report = RoundReport(seed)
        rooms = [f"s{seed}:room{r}" for r in range(self.options.rooms)]
        spec = {
            "seed": seed,
            "rooms": rooms,
            "url": self.proxy.url,
            "prefix": self.prefix,
            "dir": str(self.directory),
            "options": asdict(self.options),
        }
        events = RoundEvents()
        losses = events.losses
        try:
            results = self._drive(seed, spec, report, events)
        except Exception as exc:
            self._reset_after_failure()
            stacks = sorted(self.directory.glob(f"hang-seed-{seed}-worker-*.txt"))
            raise ChaosFailure(
                seed,
                f"the round did not complete (faults {dict(report.faults)}, "
                f"proxy {self.proxy.counters}): {exc}"
                + "".join(f"\ntask stacks of a hanging worker: {path}" for path in stacks),
                options=self.options,
            ) from exc
        redis_rows, redis_limits = self._read_redis(rooms)
        records = [OpRecord(**r) for result in results for r in result["records"]]
        view_events = [ViewEvent(**e) for result in results for e in result["view_events"]]
        for result in results:
            report.engine.update(result["stats"])
            report.durable_errors += result["durable_errors"]
            report.sync_retries += result["sync_retries"]
            report.recalls += result["recalls"]
            report.mixed_ticks += result["mixed_ticks"]
            report.cancelled += result["cancelled"]
            report.loop_moves += result["loop_moves"]
        report.keys_lost += sum(loss.existed for loss in losses)
        report.violations.extend(
            check_round(
                rooms,
                records,
                redis_rows,
                redis_limits,
                views=[result["views"] for result in results],
                view_limits=[result["limits"] for result in results],
                drained_at=[result["drained_at"] for result in results],
                max_history=self.options.max_history,
                key_losses=losses,
                holds=events.holds,
                view_events=view_events,
                report=report,
            )
        )
        report.ops = len(records)
        report.seconds = time.monotonic() - started
        if report.violations and raise_on_violation:
            dump = self._dump(seed, records, redis_rows, redis_limits, results, report, events)
            shown = "\n  ".join(report.violations[:25])
            more = len(report.violations) - 25
            raise ChaosFailure(
                seed,
                f"{len(report.violations)} violation(s) {report.counts()}:\n  {shown}"
                + (f"\n  ... and {more} more" if more > 0 else ""),
                dump,
                self.options,
                report,
            )
        return report

    def _drive(
        self, seed: int, spec: dict[str, Any], report: RoundReport, events: RoundEvents
    ) -> list[dict[str, Any]]:
        conns = [conn for _process, conn in self._workers]
        for conn in conns:
            conn.send(("round", spec))
        deadline = time.monotonic() + self.options.round_timeout
        injector = (
            FaultInjector(self, seed, report, spec["rooms"], events)
            if self.options.faults
            else None
        )
        waiting = set(conns)
        while waiting:
            timeout = injector.next_event_in() if injector else None
            ready = self._wait(waiting, timeout, deadline)
            for conn in ready:
                self._expect(conn, "ops_done")
                waiting.discard(conn)
            if injector:
                injector.tick()
        if injector:
            injector.heal()
        for conn in conns:
            conn.send(("drain",))
        for conn in conns:
            self._wait([conn], None, deadline)
            self._expect(conn, "drained")
        if injector:
            injector.quiet_drops()
        for conn in conns:
            conn.send(("sync",))
        results = []
        for conn in conns:
            self._wait([conn], None, deadline)
            results.append(self._expect(conn, "result")[1])
        return results

    @staticmethod
    def _wait(
        conns: Any, timeout: float | None, deadline: float
    ) -> list[multiprocessing.connection.Connection]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the round ran past its deadline (a worker hangs)")
        wait_for = left if timeout is None else max(0.0, min(timeout, left))
        return multiprocessing.connection.wait(list(conns), wait_for)  # type: ignore[return-value]

    @staticmethod
    def _expect(conn: multiprocessing.connection.Connection, kind: str) -> Any:
        message = conn.recv()
        if message[0] == "error":
            raise RuntimeError(f"a worker failed:\n{message[1]}")
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from a worker, got {message[0]!r}")
        return message

    def _reset_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            self.proxy.resume()
            self.proxy.set_latency(0)
        if self.server.process is None:
            self.server.start()
        self._stop_workers(force=True)
        self._spawn_workers()

    def _read_redis(self, rooms: Sequence[str]) -> tuple[dict[str, list[bytes]], dict[str, int]]:
        from conversation._redis.keys import KeySpace

        keyspace = KeySpace(self.prefix)
        rows: dict[str, list[bytes]] = {}
        limits: dict[str, int] = {}
        with self.server.sync_client() as client:
            for room in rooms:
                keys = keyspace.room(room)
                rows[room] = list(client.lrange(keys.window, 0, -1))
                raw = client.hget(keys.meta, "limit")
                limits[room] = int(raw) if raw else 0
        return rows, limits

    def _dump(
        self,
        seed: int,
        records: list[OpRecord],
        redis_rows: dict[str, list[bytes]],
        redis_limits: dict[str, int],
        results: list[dict[str, Any]],
        report: RoundReport,
        events: RoundEvents,
    ) -> Path:
        path = self.directory / f"chaos-seed-{seed}.json"
        payload = {
            "seed": seed,
            "options": asdict(self.options),
            "violations": report.violations,
            "faults": dict(report.faults),
            "key_losses": [asdict(loss) for loss in events.losses],
            "holds": [asdict(hold) for hold in events.holds],
            "records": [asdict(r) for r in records],
            "view_events": [e for result in results for e in result["view_events"]],
            "redis": {room: [row.decode() for row in rows] for room, rows in redis_rows.items()},
            "redis_limits": redis_limits,
            "views": [result["views"] for result in results],
        }
        path.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        return path


class FaultInjector:
    """Seeded faults, one at a time, each lasting a drawn while (the fault's own parameter)."""

    def __init__(
        self,
        cluster: ChaosCluster,
        seed: int,
        report: RoundReport,
        rooms: Sequence[str],
        events: RoundEvents,
    ) -> None:
        self.cluster = cluster
        self.report = report
        self.rooms = list(rooms)
        self.events = events
        self.rng = random.Random(f"faults:{seed}")
        kinds = list(FAULT_WEIGHTS)
        if cluster.options.restart_every <= 0 or seed % cluster.options.restart_every:
            kinds.remove("restart")
        self.kinds = kinds
        self.weights = [FAULT_WEIGHTS[kind] for kind in kinds]
        # Every round has the ambiguous case at least once: replies held after Redis
        # applied the command, long enough for the command timeout to fire.
        # The replies blackhole goes first (queue.pop() takes from the end): a short
        # round may end before a second queued fault gets its turn.
        self.queue = (["restart"] if "restart" in kinds else []) + ["blackhole_replies"]
        now = time.monotonic()
        self.next_at = now + self.rng.uniform(0.05, 0.25)
        self.active: str | None = None
        self.started_at = 0.0
        self.ends_at = 0.0
        self.drop = False
        self.drop_rng = random.Random(f"drops:{seed}")
        self.next_drop_at = now + self.drop_rng.uniform(*DROP_EVERY)

    def next_event_in(self) -> float:
        target = self.ends_at if self.active else self.next_at
        return max(0.0, min(target, self.next_drop_at) - time.monotonic())

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_drop_at:
            suffix = self.drop_rng.choices(list(DROP_WEIGHTS), list(DROP_WEIGHTS.values()))[0]
            room = self.drop_rng.choice(self.rooms)
            if self.cluster.server.process is not None:  # not while a restart keeps it down
                self._drop(room, suffix)
            self.next_drop_at = time.monotonic() + self.drop_rng.uniform(*DROP_EVERY)
        if self.active and now >= self.ends_at:
            self._end()
            self.next_at = time.monotonic() + self.rng.uniform(0.05, 0.3)
        elif not self.active and now >= self.next_at:
            kind = self.queue.pop() if self.queue else self.rng.choices(self.kinds, self.weights)[0]
            self._start(kind)

    def _start(self, kind: str) -> None:
        proxy, server = self.cluster.proxy, self.cluster.server
        self.report.faults[kind] += 1
        rng = self.rng
        duration = 0.0
        if kind == "latency":
            proxy.set_latency(rng.uniform(0.005, 0.08))
            duration = rng.uniform(0.15, 0.6)
        elif kind == "cut":
            proxy.cut()
        elif kind.startswith("blackhole"):
            proxy.blackhole("replies" if kind == "blackhole_replies" else "both")
            duration = rng.uniform(0.2, 1.0)
            self.drop = rng.random() < 0.5
        elif kind == "client_kill":
            with server.sync_client() as client:
                client.execute_command("CLIENT", "KILL", "TYPE", "normal")
        elif kind == "script_flush":
            with server.sync_client() as client:  # scripts and functions
                client.script_flush()
                client.function_flush()
        elif kind == "restart":
            if rng.random() < 0.5:
                server.kill()  # SIGKILL: AOF with appendfsync always keeps what was acknowledged
            else:
                server.stop()
            duration = rng.uniform(0.05, 0.4)  # how long Redis stays down
        self.active = kind if duration > 0 else None
        self.started_at = time.monotonic()
        self.ends_at = self.started_at + duration

    def quiet_drops(self) -> None:
        """Every worker drained and none writes any more: lose one companion key of
        each room, so that the final sync itself must notice (SPEC §29). A write
        would heal a lost log before anyone caught up from it."""
        for room in self.rooms:
            suffix = self.drop_rng.choices(list(DROP_WEIGHTS), list(DROP_WEIGHTS.values()))[0]
            self._drop(room, suffix)

    def _drop(self, room: str, suffix: str) -> None:
        """Delete one companion key of ``room`` (evicted, expired, deleted by hand)."""
        from conversation._redis.keys import KeySpace

        key = KeySpace(self.cluster.prefix).room_base(room) + suffix
        with self.cluster.server.sync_client() as client:
            start = time.monotonic()
            existed = bool(client.delete(key))
            end = time.monotonic()
        self.events.losses.append(KeyLoss(room, suffix, start, end, existed))
        self.report.faults["drop_" + suffix[1:]] += 1

    def _end(self) -> None:
        kind, self.active = self.active, None
        proxy = self.cluster.proxy
        if kind == "latency":
            proxy.set_latency(0)
        elif kind and kind.startswith("blackhole"):
            proxy.resume(drop=self.drop)
            if kind == "blackhole_both" and not self.drop:
                self.events.holds.append(Held(self.started_at, time.monotonic()))
        elif kind == "restart":
            self.cluster.server.start()

    def heal(self) -> None:
        if self.active:
            self._end()
        self.cluster.proxy.resume()
        self.cluster.proxy.set_latency(0)
        if self.cluster.server.process is None:
            self.cluster.server.start()


# =========================================================================
# the checks
# =========================================================================


def parse_text(text: str, identity: str) -> tuple[str, str | None, str | None]:
    """(body, deleted tag, reactions tag) of an entry's first text, as the engine writes them."""
    marker = f"[Message ID: {identity}]"
    at = text.find(marker)
    position = at + len(marker) if at >= 0 else 0
    pattern = _TAG_AFTER_MARKER if at >= 0 else _TAG_AT_START
    deleted = reactions = None
    while (match := pattern.match(text, position)) is not None:
        if match.group("deleted") is not None and deleted is None:
            deleted = match.group("deleted")
        if match.group("reactions") is not None and reactions is None:
            reactions = match.group("reactions")
        position = match.end()
    return text[position:].strip(), deleted, reactions


# Awaited calls that return only after this worker's earlier writes to the room
# were persisted (get_messages_async does not wait for them).
_WAITS_FOR_EARLIER = frozenset(
    {"append", "recall", "update", "react", "delete", "clear", "limit", "fresh"}
)


class _Timeline:
    """Effective completion times and the "definitely before" relation."""

    def __init__(self, records: Sequence[OpRecord], drained_at: Sequence[float]) -> None:
        self.done: dict[int, float] = {}
        sequences: dict[tuple[int, str], list[OpRecord]] = defaultdict(list)
        for record in records:
            sequences[(record.proc, record.room)].append(record)
        for (proc, _room), sequence in sequences.items():
            sequence.sort(key=lambda r: r.i)
            bound = drained_at[proc]
            for record in reversed(sequence):
                if record.done is not None:
                    self.done[id(record)] = record.done
                elif record.floating:
                    # Abandoned by a cancelled caller: an attempt held by a blackhole
                    # may still land after anything.
                    self.done[id(record)] = math.inf
                else:
                    self.done[id(record)] = bound
                if (
                    record.done is not None
                    and record.kind in _WAITS_FOR_EARLIER
                    and not record.result.startswith("error")
                ):
                    bound = min(bound, record.done)

    def add(self, record: OpRecord) -> None:
        """An event that is not a worker's operation (a key loss): only its times count."""
        assert record.done is not None
        self.done[id(record)] = record.done

    def before(self, x: OpRecord, y: OpRecord) -> bool:
        if x.proc == y.proc and x.room == y.room and not x.floating:
            return x.i < y.i
        return self.done[id(x)] < y.inv


def _last_writer(
    timeline: _Timeline,
    writes: Sequence[OpRecord],
    final: str | None,
    value_of: Callable[[OpRecord], str | None],
    initial: str | None,
) -> str | None:
    """Why a last-writer-wins register cannot hold ``final``, or None if some history explains it.

    ``initial`` is what the register held before any write; every applied write
    replaces it.
    """
    if not writes:
        return None if final == initial else f"shows {final!r} but no applied write produced it"
    candidates = [w for w in writes if value_of(w) == final]
    for candidate in candidates:
        if not any(timeline.before(candidate, w) for w in writes if w is not candidate):
            return None
    if candidates:
        return f"shows {final!r}, which a later applied write definitely superseded"
    if final == initial:
        return f"still shows {initial!r}: every applied write is missing ({len(writes)})"
    return f"shows {final!r}, which no applied write produced"


# Latency delivers a chunk this much later at most (FaultInjector: up to 0.08 s).
_LATE_DELIVERY_SLACK = 0.1


def _may_double(
    timeline: _Timeline,
    mine: Sequence[OpRecord],
    losses: Sequence[KeyLoss],
    holds: Sequence[Held],
) -> set[str]:
    """Ids that may legitimately be stored twice: some send of theirs (an engine retry,
    a recall, or an attempt a blackhole held and delivered late) reached Redis after an
    ``:idem`` loss that came after their first invocation."""
    idem = [loss for loss in losses if loss.suffix == ":idem"]
    if not idem:
        return set()
    spans: dict[str, tuple[float, float]] = {}
    for record in mine:
        if record.kind in ("append", "recall") and record.target:
            start, end = record.inv, timeline.done[id(record)]
            if record.target in spans:
                first, last = spans[record.target]
                start, end = min(start, first), max(end, last)
            spans[record.target] = (start, end)
    doubled = set()
    for ident, (start, end) in spans.items():
        late = [hold.end for hold in holds if hold.start < end and hold.end > start]
        reach = max([end, *late]) + _LATE_DELIVERY_SLACK
        if any(loss.end > start and loss.start < reach for loss in idem):
            doubled.add(ident)
    return doubled


def check_round(
    rooms: Sequence[str],
    records: Sequence[OpRecord],
    redis_rows: dict[str, list[bytes]],
    redis_limits: dict[str, int],
    *,
    views: Sequence[dict[str, list[dict[str, Any]]]],
    view_limits: Sequence[dict[str, int]],
    drained_at: Sequence[float],
    max_history: int,
    key_losses: Sequence[KeyLoss] = (),
    holds: Sequence[Held] = (),
    view_events: Sequence[ViewEvent] = (),
    report: RoundReport | None = None,
) -> list[str]:
    """Every violation of the guarantees found in one round (empty: it passed).

    What a key loss excuses is in the module docstring.
    """
    report = report or RoundReport(-1)
    timeline = _Timeline(records, drained_at)
    problems: list[str] = []
    min_limit = min(max_history, MIN_CHANNEL_LIMIT)
    for room in rooms:
        mine = [r for r in records if r.room == room]
        losses = [loss for loss in key_losses if loss.room == room]
        appends = {r.target: r for r in mine if r.kind == "append"}
        clears = [r for r in mine if r.kind == "clear"]
        doubled = _may_double(timeline, mine, losses, holds)
        report.acknowledged += sum(1 for r in mine if r.result in ("ok", "true"))
        # --- what the workers' reads served during the run
        for event in view_events:
            if event.room != room:
                continue
            twice = [ident for ident in event.twice if ident not in doubled]
            if twice:
                problems.append(
                    f"duplicated: worker {event.proc} room {room}: {event.when} served ids "
                    f"twice: {twice}"
                )
            own = [ident for ident in event.own if ident not in doubled]
            if _own_out_of_order(own):
                problems.append(
                    f"reordered: worker {event.proc} room {room}: {event.when} holds its own "
                    f"appends out of order: {own}"
                )
        # --- what Redis holds
        window: list[tuple[str | None, dict[str, Any]]] = []
        for row in redis_rows[room]:
            try:
                entry = orjson.loads(row)
            except orjson.JSONDecodeError:
                problems.append(f"corrupt: room {room}: a row is not JSON: {row[:80]!r}")
                continue
            window.append((entry.get("message_id"), entry))
        ids = [ident for ident, _ in window]
        position = {ident: index for index, ident in enumerate(ids)}
        for ident, count in Counter(ids).items():
            if count > 1:
                if ident in doubled:
                    report.excused_doubles += 1
                else:
                    problems.append(f"duplicated: room {room}: {ident} is {count} times in Redis")
        for ident in ids:
            if ident not in appends:
                problems.append(f"phantom: room {room}: {ident!r} in Redis was never appended")
        present = [appends[ident] for ident in position if ident in appends]
        ordered = [a for a in present if a.target not in doubled]
        # --- appends: lost?
        # A cancelled durable append is not acknowledged; a cancelled plain one is:
        # cancelling the await does not cancel the write.
        acked = [
            r for r in appends.values() if r.result == "ok" and not (r.cancelled and r.floating)
        ]
        report.appends_acknowledged += len(acked)
        for a in acked:
            if a.target in position:
                report.appends_in_redis += 1
                continue
            earlier = [w for w in ordered if timeline.before(w, a)]
            if earlier:
                problems.append(
                    f"lost: room {room}: {a.target} ({a.form}) is missing although "
                    f"{earlier[0].target}, which definitely came before it, is still there"
                )
            elif any(not timeline.before(c, a) for c in clears) or len(window) >= min_limit:
                # A clear may have come after it, or the window is full: trimmed.
                report.appends_trimmed_or_cleared += 1
            else:
                problems.append(
                    f"lost: room {room}: {a.target} ({a.form}) is missing; no clear came after "
                    f"it and the window holds only {len(window)} < {min_limit} entries"
                )
        # --- order
        for x in ordered:
            for y in ordered:
                if x is not y and timeline.before(x, y) and position[x.target] > position[y.target]:
                    problems.append(
                        f"reordered: room {room}: {x.target} definitely came before "
                        f"{y.target} but Redis holds it after"
                    )
        # --- edits
        edits: dict[str, list[OpRecord]] = defaultdict(list)
        for record in mine:
            if record.kind in ("update", "react", "delete"):
                edits[record.target or ""].append(record)
                ghost = (record.target or "").startswith("ghost-")
                # RedisUnavailable: the id is not in memory and Redis could not be asked.
                if ghost and record.result not in ("false", "error:RedisUnavailable"):
                    problems.append(
                        f"edit: room {room}: {record.kind} of the never-appended id "
                        f"{record.target} returned {record.result}"
                    )
        for ident, entry in window:
            if ident not in appends or ident in doubled:
                continue
            original = appends[ident]
            problems.extend(
                f"edit: room {room}: {ident}: {p}"
                for p in _check_entry(timeline, original, entry, edits.get(ident or "", []), report)
            )
        # --- limit: a lost meta takes the room back to the default limit
        limit_writes = [r for r in mine if r.kind == "limit"]
        resets: list[OpRecord] = []
        for n, loss in enumerate(loss for loss in losses if loss.suffix == ":meta"):
            reset = OpRecord(
                -1 - n, room, 0, "limit", "meta-loss", loss.start, loss.end,
                value=str(max_history),
            )  # fmt: skip
            timeline.add(reset)
            resets.append(reset)
        limit_writes += resets
        final_limit = redis_limits[room] or max_history
        why = _last_writer(
            timeline, limit_writes, str(final_limit), lambda w: w.value, str(max_history)
        )
        if why:
            problems.append(f"limit: room {room}: {why}")
        # Rows are trimmed by writes: after a meta loss that no write definitely
        # followed, the window may still be as long as an earlier limit allowed.
        fits = final_limit
        writes = [r for r in mine if r.kind in ("append", "clear", "limit")]
        if any(not any(timeline.before(reset, w) for w in writes) for reset in resets):
            fits = max([fits, max_history, *(int(r.value or 0) for r in limit_writes)])
        if len(window) > fits:
            problems.append(f"limit: room {room}: {len(window)} entries exceed limit {fits}")
        # --- every worker's view equals Redis
        expected = [{k: v for k, v in entry.items() if k != "message_id"} for _, entry in window]
        for proc, (worker_views, worker_limits) in enumerate(zip(views, view_limits, strict=True)):
            if worker_views[room] != expected:
                problems.append(
                    f"view: worker {proc} room {room}: window differs from Redis after the final "
                    f"sync ({len(worker_views[room])} vs {len(expected)} entries; "
                    f"{_first_difference(worker_views[room], expected)})"
                )
            if worker_limits[room] != final_limit:
                problems.append(
                    f"view: worker {proc} room {room}: limit {worker_limits[room]} != Redis "
                    f"{final_limit}"
                )
    return problems


def _first_difference(view: Sequence[dict[str, Any]], redis: Sequence[dict[str, Any]]) -> str:
    for index, (mine, theirs) in enumerate(zip(view, redis, strict=False)):
        if mine != theirs:
            return f"first at {index}: {_brief(mine)} vs Redis {_brief(theirs)}"
    longer, shorter = (view, redis) if len(view) > len(redis) else (redis, view)
    if len(longer) == len(shorter):
        return "equal"
    return f"the longer one goes on with {_brief(longer[len(shorter)])}"


def _brief(entry: dict[str, Any]) -> str:
    return repr(_first_text(entry.get("content")))[:80]


def _check_entry(
    timeline: _Timeline,
    original: OpRecord,
    entry: dict[str, Any],
    edits: Sequence[OpRecord],
    report: RoundReport,
) -> list[str]:
    ident = original.target or ""
    problems = []
    if entry.get("role") != original.role:
        problems.append(f"role {entry.get('role')!r} != appended {original.role!r}")
    content = entry.get("content")
    text = _first_text(content) or ""
    body, deleted, reactions = parse_text(text, ident)
    if original.media and not (
        isinstance(content, list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in content)
    ):
        problems.append("the image part of the post was lost")
    applied = [e for e in edits if e.result == "true"]
    report.edits_checked += len(applied)
    for e in edits:
        if e.result == "true":
            continue
        shown = {"update": body, "react": reactions, "delete": deleted}[e.kind]
        if e.value and shown == e.value:
            problems.append(f"{e.kind} {e.value!r} returned {e.result} yet is visible")
    updates = [e for e in applied if e.kind == "update"]
    why = _last_writer(timeline, updates, body, lambda w: w.value, original.value)
    if why:
        problems.append(f"text {why}")
    reacts = [e for e in applied if e.kind == "react"]
    why = _last_writer(timeline, reacts, reactions, lambda w: w.value or None, None)
    if why:
        problems.append(f"reactions {why}")
    # A deletion is idempotent: the first applied one stands.
    deletes = [e for e in applied if e.kind == "delete"]
    if not deletes:
        if deleted is not None:
            problems.append(f"deletion tag {deleted!r} but no deletion was applied")
    elif deleted is None:
        problems.append("no [deleted at …] tag although a deletion was applied")
    else:
        candidates = [d for d in deletes if d.value == deleted]
        if not candidates:
            problems.append(f"deletion tag {deleted!r} was written by no applied deletion")
        elif all(any(timeline.before(w, c) for w in deletes if w is not c) for c in candidates):
            problems.append(f"deletion tag {deleted!r} replaced an earlier deletion")
    return problems
