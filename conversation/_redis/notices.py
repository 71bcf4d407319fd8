"""The change notices of ``freshness="push"`` (SPEC §37): one subscriber connection.

Every mutating room script SPUBLISHes ``"<epoch> <version>"`` on the room's
notice channel (``KeySpace.notices``). A ``NoticeListener`` holds one pub/sub
connection, subscribes the channels it is asked to watch, hands every notice
to its callback, and says what it can vouch for:

* a *generation* counts the connections: every reconnect (ours, or redis-py's
  own inside a read) starts a new one, and only a subscription confirmed in
  the current generation stands (notices published while it was down are lost);
* a *lease*: a PING goes out every ``lease / 4`` seconds, numbered, on the same
  connection. Its reply comes after every notice the server published before
  it took the PING, so once the reply is read, every write acknowledged before
  the PING was sent has had its notice read too. The listener vouches for
  nothing once the last answered PING is older than ``lease``: a stalled or
  blackholed connection (no error, no notices) cannot make a worker serve an
  old mirror for longer than that.

It knows channels, not rooms: the engine (``_engine.push``) maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from .pipeliner import forget_pooled_connections
from .retry import Backoff

logger = logging.getLogger(__name__)

#: The default lease: how old the last proof of a live subscription may be.
LEASE_SECONDS = 1.0
# Unanswered PINGs remembered; an older one's late reply could not vouch anyway.
_PINGS_KEPT = 16
# How long dropping a subscriber connection may take before it is left to finish alone.
_CLOSE_SECONDS = 1.0


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a teardown that failed is nothing to report


Notice = Callable[[bytes, str, int], None]


def _raise_if_cancelled() -> None:
    """Go on cancelling a task whose cancellation was swallowed.

    A cancellation can come back out of redis-py as something else: on Python
    3.11 the ``asyncio.wait_for`` under every send (its socket timeout) loses one
    that arrives as the send completes (CPython gh-86296), and a cancelled read
    can surface as a lost connection. The listener would then connect again (a
    reader task the cancelling ``asyncio.run`` never saw), and that
    ``asyncio.run`` would wait for it forever. The task still counts the
    request (``cancelling()``), so each turn asks.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# Generations are unique across every listener of the process, so a room that a
# Cluster moved from one node's listener to another's is never vouched for by a
# number that only happens to match.
_GENERATIONS = itertools.count(1)


class Notices(Protocol):
    """What the engine asks of the subscriber side (one server, or one per primary)."""

    def watch(self, channel: bytes) -> None: ...

    def unwatch(self, channel: bytes) -> None: ...

    def vouched(self, channel: bytes) -> int | None: ...

    def rebind(self) -> None: ...

    async def close(self) -> None: ...


def notices_for(redis: Any, on_notice: Notice, backoff: Backoff) -> Notices:
    """The subscriber side for this client: per primary on a Cluster."""
    if isinstance(redis, RedisCluster):
        return ClusterNotices(redis, on_notice, backoff)
    return NoticeListener(redis, on_notice, backoff)


def supports_push(redis: Any) -> bool:
    """Whether this client can subscribe to notices at all (a client with pub/sub)."""
    return isinstance(redis, RedisCluster) or hasattr(redis, "pubsub")


class NoticeListener:
    """One pub/sub connection, the channels on it, and the lease that vouches for it."""

    def __init__(
        self,
        redis: Any,
        on_notice: Notice,
        backoff: Backoff,
        *,
        lease: float = LEASE_SECONDS,
        per_slot: bool = False,
    ) -> None:
        self._redis = redis
        # A Cluster node refuses one SSUBSCRIBE of channels in different slots (CROSSSLOT).
        self._per_slot = per_slot
        self._on_notice = on_notice
        self._backoff = backoff
        self.lease = lease
        self.generation = next(_GENERATIONS)
        self._wanted: set[bytes] = set()
        # What the current connection still has to be asked (each wake sends only
        # these, not a scan of every room held).
        self._to_add: set[bytes] = set()
        self._to_drop: set[bytes] = set()
        self._confirmed: dict[bytes, int] = {}  # channel -> generation of its SSUBSCRIBE reply
        self._pings: dict[bytes, float] = {}  # PING payload -> when it was sent
        self._ping_seq = 0
        self._proven_at: float | None = None  # send time of the newest answered PING
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False

    # ------------------------------------------------------------ the engine's side

    def watch(self, channel: bytes) -> None:
        """Hold ``channel`` from now on (confirmed once its SSUBSCRIBE reply is read)."""
        if channel not in self._wanted:
            self._wanted.add(channel)
            self._to_add.add(channel)
            self._to_drop.discard(channel)
            self._poke()
        else:
            self._start()

    def unwatch(self, channel: bytes) -> None:
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._confirmed.pop(channel, None)
            if channel in self._to_add:
                self._to_add.discard(channel)
            else:
                self._to_drop.add(channel)
            self._poke()

    def vouched(self, channel: bytes) -> int | None:
        """The generation the channel's subscription stands in, if it stands now.

        ``None``: not confirmed in this connection, or the lease ran out.
        """
        proven = self._proven_at
        if proven is None or time.monotonic() - proven > self.lease:
            return None
        generation = self._confirmed.get(channel)
        return generation if generation == self.generation else None

    def rebind(self) -> None:
        """The event loop closed: its task and connection went with it.

        The client's pool closes the orphaned socket (``forget_pooled_connections``);
        everything confirmed on it is void, and a new connection starts on the next
        ``watch``. In a forked child the task may still be scheduled on the copied
        loop: cancelled, it stops without reading the parent's socket.
        """
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed
                task.cancel()
        self._lost()
        self._pubsub = None
        self._task = None
        self._wake = None

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._drop_pubsub()
        self._lost()

    # ------------------------------------------------------------ the connection

    def _poke(self) -> None:
        self._start()
        if self._wake is not None:
            self._wake.set()

    def _start(self) -> None:
        if self._closed or (self._task is not None and not self._task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a thread without a loop: the next call from the loop starts it
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run(), name="conversation-notices")

    def _lost(self) -> None:
        """Nothing this connection confirmed or proved holds any more."""
        self.generation = next(_GENERATIONS)
        self._confirmed.clear()
        # A new connection holds nothing yet: every wanted channel is asked again.
        self._to_add = set(self._wanted)
        self._to_drop = set()
        self._pings.clear()
        self._proven_at = None

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
            _raise_if_cancelled()
            try:
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A connection that had proved itself starts the backoff again.
                failures = 1 if self._proven_at is not None else failures + 1
                self._lost()
                await self._drop_pubsub()
                if failures == 1:
                    logger.warning("change notices: subscriber connection lost: %s", exc)
                await asyncio.sleep(self._backoff.delay(failures))
                continue

    async def _serve(self) -> None:
        pubsub = self._redis.pubsub()
        self._pubsub = pubsub
        await pubsub.connect()
        assert pubsub.connection is not None
        # redis-py reconnects inside a read and resubscribes by itself: notices
        # published meanwhile are lost, so every reconnect voids what stood.
        pubsub.connection.register_connect_callback(self._reconnected)
        self._lost()
        reader = asyncio.ensure_future(self._read(pubsub))
        try:
            await self._write(pubsub, reader)
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _reconnected(self, _connection: Any) -> None:
        self._lost()

    async def _write(self, pubsub: PubSub, reader: asyncio.Future[Any]) -> None:
        """Send what the wanted channels and the lease need, until the reader fails."""
        interval = self.lease / 4
        next_ping = 0.0
        while True:
            _raise_if_cancelled()
            if reader.done():
                reader.result()  # its error ends this connection
                return
            if self._to_add:
                new, self._to_add = self._to_add, set()
                for group in self._groups(new):
                    await pubsub.ssubscribe(*group)
            if self._to_drop:
                gone, self._to_drop = self._to_drop, set()
                for group in self._groups(gone):
                    await pubsub.sunsubscribe(*group)
            now = time.monotonic()
            if now >= next_ping:
                self._ping_seq += 1
                payload = str(self._ping_seq).encode()
                self._pings[payload] = now
                await pubsub.ping(payload)
                next_ping = now + interval
                if len(self._pings) > _PINGS_KEPT:  # a silent connection answers none
                    del self._pings[next(iter(self._pings))]
            wake = self._wake
            assert wake is not None
            wake.clear()
            woken: asyncio.Future[Any] = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait(
                    {reader, woken}, timeout=max(0.0, next_ping - time.monotonic()),
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
            finally:
                woken.cancel()

    def _groups(self, channels: set[bytes]) -> list[list[bytes]]:
        if not self._per_slot:
            return [list(channels)]
        by_slot: dict[int, list[bytes]] = {}
        for channel in channels:
            by_slot.setdefault(key_slot(channel), []).append(channel)
        return list(by_slot.values())

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            _raise_if_cancelled()
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            kind = kind.decode() if isinstance(kind, bytes) else kind
            if kind == "smessage":
                self._notice(message["channel"], message["data"])
            elif kind == "pong":
                sent = self._pings.pop(message["data"], None)
                if sent is not None:
                    # Older PINGs' replies came before this one, or never will.
                    self._pings = {k: t for k, t in self._pings.items() if t > sent}
                    self._proven_at = sent
            elif kind == "ssubscribe":
                channel = message["channel"]
                if channel in self._wanted:
                    self._confirmed[channel] = self.generation
            elif kind == "sunsubscribe":
                self._confirmed.pop(message["channel"], None)

    def _notice(self, channel: bytes, data: Any) -> None:
        try:
            epoch, version = bytes(data).decode().rsplit(" ", 1)
            number = int(version)
        except (ValueError, UnicodeDecodeError):
            # Not ours to read: the room is doubted (a negative version), never trusted.
            epoch, number = "", -1
        self._on_notice(channel, epoch, number)

    async def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            connection: Any = pubsub.connection
            if connection is not None:
                # It goes back to the pool: its reconnects are no longer ours.
                connection.deregister_connect_callback(self._reconnected)
            # redis-py's aclose cannot be cancelled (it finishes its teardown
            # first), and that teardown waits for the pool: bounded here, so
            # neither a reconnect nor the manager's aclose can hang on it.
            closing = asyncio.ensure_future(pubsub.aclose())
            closing.add_done_callback(_consume)
            await asyncio.wait({closing}, timeout=_CLOSE_SECONDS)


class ClusterNotices:
    """A Cluster's notices: one ``NoticeListener`` per primary, each channel on
    the primary that owns its slot.

    redis-py's asyncio ``ClusterPubSub`` is not used: it moves a migrated
    channel to its new node by itself, which hides the gap a move leaves, and it
    polls nodes in turn where a lease needs each node's own PINGs. Here a move
    is a doubt like any other. A node that loses the slot unsubscribes the
    channel (``sunsubscribe``), a failover drops the connection; either way the
    room syncs, and the next sync's ``watch`` routes the channel by the slot map
    the client holds then.
    """

    def __init__(self, cluster: RedisCluster, on_notice: Notice, backoff: Backoff) -> None:
        self._cluster = cluster
        self._on_notice = on_notice
        self._backoff = backoff
        self._listeners: dict[str, tuple[aioredis.Redis, NoticeListener]] = {}
        self._route: dict[bytes, str] = {}

    def watch(self, channel: bytes) -> None:
        try:
            node = self._cluster.get_node_from_key(channel)  # type: ignore[arg-type]
        except Exception:  # slots not known yet, or not covered: the next sync routes it
            node = None
        if node is None:
            return
        previous = self._route.get(channel)
        if previous is not None and previous != node.name:
            self._listeners[previous][1].unwatch(channel)
        self._route[channel] = node.name
        entry = self._listeners.get(node.name)
        if entry is None:
            pool = aioredis.ConnectionPool(
                connection_class=node.connection_class, **node.connection_kwargs
            )
            client = aioredis.Redis.from_pool(pool)
            entry = self._listeners[node.name] = (
                client,
                NoticeListener(client, self._on_notice, self._backoff, per_slot=True),
            )
        entry[1].watch(channel)

    def unwatch(self, channel: bytes) -> None:
        name = self._route.pop(channel, None)
        if name is not None and name in self._listeners:
            self._listeners[name][1].unwatch(channel)

    def vouched(self, channel: bytes) -> int | None:
        name = self._route.get(channel)
        entry = self._listeners.get(name) if name is not None else None
        return entry[1].vouched(channel) if entry is not None else None

    def rebind(self) -> None:
        for client, listener in self._listeners.values():
            listener.rebind()
            forget_pooled_connections(client)

    async def close(self) -> None:
        for client, listener in self._listeners.values():
            await listener.close()
            with contextlib.suppress(Exception):
                await client.aclose()
        self._listeners.clear()
