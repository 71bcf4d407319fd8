"""``freshness="push"`` (SPEC §37): warm reads without a round trip, and every doubt synced.

Two managers stand for two workers on one private server: ``writer`` in the
default mode, ``reader`` in push mode. Round trips are counted by the reader's
``stats()`` (``round_trips``, ``push_reads``, ``push_fallbacks``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer
from redis_servers import wait_until as poll

from conversation import ConfigurationError, ConversationManager
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in messages]


async def _pushed(manager: ConversationManager, room: str) -> list[dict[str, Any]]:
    """Read until a read is served by push (the subscription confirmed and synced)."""
    result: list[dict[str, Any]] = []

    async def served_by_push() -> bool:
        nonlocal result
        before = manager.stats()["push_reads"]
        result = await manager.get_messages_async(room)
        return manager.stats()["push_reads"] > before

    await wait_until(served_by_push, what="a read served by push")
    return result


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        yield c
    finally:
        await c.aclose()


def test_freshness_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="'pull'"):
        ConversationManager(None, freshness="pull")


async def test_warm_push_read_makes_no_round_trip_and_sees_other_workers_writes(
    client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(client)
    reader = make_manager(client, freshness="push")
    await writer.append_async(room, "user", "one")
    assert _texts(await _pushed(reader, room)) == ["one"]

    trips = reader.stats()["round_trips"]
    for _ in range(20):
        assert _texts(await reader.get_messages_async(room)) == ["one"]
    assert reader.stats()["round_trips"] == trips

    await writer.append_async(room, "assistant", "two")

    async def sees_two() -> bool:
        return _texts(await reader.get_messages_async(room)) == ["one", "two"]

    await wait_until(sees_two, what="the push reader to see the other worker's write")
    # The notice sent that read through the sync, which vouched again.
    assert _texts(await _pushed(reader, room)) == ["one", "two"]


async def test_own_writes_and_ensure_fresh_keep_their_round_trips(
    client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    reader = make_manager(client, freshness="push")
    await reader.append_async(room, "user", "mine")
    assert _texts(await _pushed(reader, room)) == ["mine"]
    await reader.append_async(room, "assistant", "also mine")
    # Our own write's notice is already covered by its reply: still push.
    assert _texts(await _pushed(reader, room)) == ["mine", "also mine"]
    trips = reader.stats()["round_trips"]
    await reader.ensure_fresh_from_redis(room)
    assert reader.stats()["round_trips"] == trips + 1


async def test_killed_subscriber_falls_back_to_sync(
    client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(client)
    reader = make_manager(client, freshness="push")
    await writer.append_async(room, "user", "one")
    await _pushed(reader, room)

    await client.client_kill_filter(_type="pubsub")
    # Nothing tells the reader a notice may have been lost but the lost connection.
    await writer.append_async(room, "assistant", "two")
    fallbacks = reader.stats()["push_fallbacks"]

    async def sees_two() -> bool:
        return _texts(await reader.get_messages_async(room)) == ["one", "two"]

    await wait_until(sees_two, what="the reader to sync after its subscriber was killed")
    assert reader.stats()["push_fallbacks"] > fallbacks
    # Resubscribed and synced again: push serves again, and sees new writes.
    await _pushed(reader, room)
    await writer.append_async(room, "user", "three")

    async def sees_three() -> bool:
        return _texts(await reader.get_messages_async(room))[-1] == "three"

    await wait_until(sees_three, what="the reader to see a write after resubscribing")


async def test_push_converges_after_a_server_restart(
    redis_server: RedisServer, client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    writer = make_manager(client)
    reader = make_manager(client, freshness="push")
    await writer.append_async(room, "user", "one")
    await _pushed(reader, room)

    redis_server.restart()  # AOF off by default here: the room may be gone
    await writer.append_async(room, "assistant", "after restart")
    expected = _texts(await writer.get_messages_async(room))

    async def converged() -> bool:
        try:
            return _texts(await reader.get_messages_async(room)) == expected
        except Exception:
            return False

    await wait_until(converged, what="the push reader to converge after a restart")
    await _pushed(reader, room)


async def test_an_evicted_room_is_unsubscribed(
    client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    reader = make_manager(client, freshness="push")
    await reader.append_async(room, "user", "one")
    await _pushed(reader, room)
    channel = reader._keyspace.notices(room)

    async def subscribed() -> int:
        counts = await client.pubsub_shardnumsub(channel)
        return int(counts[0][1])

    assert await subscribed() == 1
    assert reader.reap_stale(max_idle_seconds=0) == 1

    async def gone() -> bool:
        return await subscribed() == 0

    await wait_until(gone, what="the evicted room's channel to be unsubscribed")


def test_push_survives_a_move_to_a_new_event_loop(redis_server: RedisServer) -> None:
    import asyncio

    room = "test:push-loop-move"
    client = aioredis.Redis(port=redis_server.port)
    reader = ConversationManager(None, redis=client, freshness="push")
    writer_client = aioredis.Redis(port=redis_server.port)
    writer = ConversationManager(None, redis=writer_client)

    async def first() -> None:
        await reader.append_async(room, "user", "one")
        await _pushed(reader, room)

    async def second() -> list[str]:
        await writer.append_async(room, "assistant", "two")

        async def sees_two() -> bool:
            return _texts(await reader.get_messages_async(room)) == ["one", "two"]

        await wait_until(sees_two, what="the reader on its new loop to see the write")
        await _pushed(reader, room)
        await reader.aclose()
        await writer.aclose()
        await client.aclose()
        await writer_client.aclose()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not pending, pending
        return _texts(reader.get_messages(room))

    def run() -> list[str]:
        asyncio.run(first())
        return asyncio.run(second())

    assert run() == ["one", "two"]


async def test_push_on_fakeredis_too(make_manager: Make, room: str) -> None:
    server = fakeredis.FakeServer()
    reader = make_manager(fakeredis.FakeAsyncRedis(server=server), freshness="push")
    writer = make_manager(fakeredis.FakeAsyncRedis(server=server))
    await writer.append_async(room, "user", "one")
    assert _texts(await _pushed(reader, room)) == ["one"]
    await writer.append_async(room, "user", "two")

    async def sees_two() -> bool:
        return _texts(await reader.get_messages_async(room)) == ["one", "two"]

    await wait_until(sees_two, what="the fakeredis push reader to see the write")


def test_the_blocking_manager_forwards_freshness(redis_server: RedisServer) -> None:
    from conversation.blocking import BlockingConversationManager

    url = f"redis://127.0.0.1:{redis_server.port}/0"
    room = "test:push-blocking"
    with (
        BlockingConversationManager.from_url(url) as writer,
        BlockingConversationManager.from_url(url, freshness="push") as reader,
    ):
        writer.append(room, "user", "one")
        assert _texts(reader.get_messages(room)) == ["one"]
        writer.append(room, "user", "two")
        # The write is in Redis; its notice may still be on its way.
        poll(lambda: _texts(reader.get_messages(room)) == ["one", "two"], what="the write")
        assert reader.stats()["push_fallbacks"] >= 1


async def test_a_silent_subscription_stops_vouching_after_its_lease(
    redis_server: RedisServer, client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    """A connection that stalls without an error (a partition) delivers no notices
    and no lease PINGs: within a lease the reader stops serving without a sync."""
    from fault_proxy import FaultProxy
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    proxy = await FaultProxy(redis_server.port).start()
    proxied = aioredis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
    try:
        writer = make_manager(client)
        reader = make_manager(proxied, freshness="push", command_timeout=0.3)
        await writer.append_async(room, "user", "one")
        await _pushed(reader, room)

        proxy.blackhole("replies")  # the notices of what follows are held
        await writer.append_async(room, "assistant", "two")

        async def doubted() -> bool:
            before = reader.stats()["push_fallbacks"]
            await reader.get_messages_async(room)
            return reader.stats()["push_fallbacks"] > before

        await wait_until(doubted, what="the silent subscription to stop vouching")
        assert reader.stats()["stale_reads"] >= 1  # its sync could not get through either

        proxy.resume()

        async def sees_two() -> bool:
            return _texts(await reader.get_messages_async(room)) == ["one", "two"]

        await wait_until(sees_two, what="the reader to catch up once the network healed")
        await _pushed(reader, room)
    finally:
        await proxied.aclose()
        await proxy.stop()


async def test_a_user_without_channel_rights_writes_and_push_reads_sync(
    redis_server: RedisServer, make_manager: Make, room: str
) -> None:
    """Redis 7 gives a new ACL user no channels (acl-pubsub-default resetchannels):
    its scripts still write (the notice is skipped), and its push reader, refused
    SSUBSCRIBE, never vouches, so every read syncs."""
    with redis_server.sync_client() as admin:
        admin.acl_setuser(
            "nochannels", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"]
        )
        admin.execute_command("ACL", "SETUSER", "nochannels", "resetchannels")
    client = aioredis.Redis(port=redis_server.port, username="nochannels", password="pw")
    try:
        writer = make_manager(client)
        reader = make_manager(client, freshness="push")
        for turn in range(5):
            await writer.append_async(room, "user", f"turn {turn}")
            messages = await reader.get_messages_async(room)
            assert _texts(messages)[-1] == f"turn {turn}"
        assert reader.stats()["push_reads"] == 0
    finally:
        await client.aclose()


def test_a_loop_ends_even_if_a_redis_call_turns_the_listeners_cancellation_into_an_error(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation can come back out of redis-py as a lost connection (or be
    lost, Python 3.11's ``wait_for``): the listener must not connect again, or
    the ``asyncio.run`` that cancels it on its way out never returns."""
    import asyncio
    import threading

    from redis.asyncio.client import PubSub
    from redis.exceptions import ConnectionError as RedisConnectionError

    entered = threading.Event()
    turned: list[bool] = []

    async def ping_that_turns_a_cancel_into_an_error(
        self: PubSub, *args: Any, **kwargs: Any
    ) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)  # a PING the server never answers
        except asyncio.CancelledError:
            turned.append(True)
            raise RedisConnectionError("connection lost while cancelled") from None

    monkeypatch.setattr(PubSub, "ping", ping_that_turns_a_cancel_into_an_error)
    room = "test:push-lost-cancel"
    client = aioredis.Redis(port=redis_server.port)
    reader = ConversationManager(None, redis=client, freshness="push")

    async def phase() -> None:
        await reader.append_async(room, "user", "one")
        await reader.get_messages_async(room)  # the listener starts, and pings
        await wait_until(entered.is_set, what="the listener to send its PING")

    done = threading.Event()

    def run() -> None:
        asyncio.run(phase())  # cancels the listener on its way out
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert done.is_set(), "asyncio.run never returned: the listener outlived its cancellation"
    assert turned == [True]

    async def close() -> None:
        await reader.aclose()
        await client.aclose()

    asyncio.run(close())
