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
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from .retry import Backoff

logger = logging.getLogger(__name__)

#: The default lease: how old the last proof of a live subscription may be.
LEASE_SECONDS = 1.0

Notice = Callable[[bytes, str, int], None]


def supports_push(redis: Any) -> bool:
    """Whether this client can hold the one subscriber connection push needs.

    A Cluster shards notices by slot, so it needs one connection per node and
    resubscription as slots move; redis-py's asyncio ``ClusterPubSub`` is not
    used for it yet, and push falls back to sync there (docs/scaling.md).
    """
    return not isinstance(redis, RedisCluster) and hasattr(redis, "pubsub")


class NoticeListener:
    """One pub/sub connection, the channels on it, and the lease that vouches for it."""

    def __init__(
        self, redis: Any, on_notice: Notice, backoff: Backoff, *, lease: float = LEASE_SECONDS
    ) -> None:
        self._redis = redis
        self._on_notice = on_notice
        self._backoff = backoff
        self.lease = lease
        self.generation = 0
        self._wanted: set[bytes] = set()
        self._asked: set[bytes] = set()  # what the current connection was asked to hold
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
            self._poke()
        else:
            self._start()

    def unwatch(self, channel: bytes) -> None:
        if channel in self._wanted:
            self._wanted.discard(channel)
            self._confirmed.pop(channel, None)
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
        self.generation += 1
        self._confirmed.clear()
        self._asked.clear()
        self._pings.clear()
        self._proven_at = None

    async def _run(self) -> None:
        failures = 0
        while not self._closed:
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
            if reader.done():
                reader.result()  # its error ends this connection
                return
            wanted, asked = self._wanted, self._asked
            new = [c for c in wanted if c not in asked]
            gone = [c for c in asked if c not in wanted]
            if new:
                asked.update(new)
                await pubsub.ssubscribe(*new)
            if gone:
                asked.difference_update(gone)
                await pubsub.sunsubscribe(*gone)
            now = time.monotonic()
            if now >= next_ping:
                self._ping_seq += 1
                payload = str(self._ping_seq).encode()
                self._pings[payload] = now
                await pubsub.ping(payload)
                next_ping = now + interval
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

    async def _read(self, pubsub: PubSub) -> None:
        while True:
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
            with contextlib.suppress(Exception):
                await pubsub.aclose()
