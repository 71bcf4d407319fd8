"""The engine on a real local Redis Cluster (SPEC §3.15-3.16, §25): 3 primaries.

Every room's keys share one slot, rooms spread over the primaries, a loop tick's
script calls for many rooms (one per slot owner) go out together, and scripts
reload on every primary after SCRIPT FLUSH.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from cluster_servers import LocalCluster
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from support import running_cluster

from conversation import ConversationManager
from conversation._redis.keys import KeySpace

pytestmark = pytest.mark.real_server

ROOMS = [f"discord:{i}" for i in range(12)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(tmp_path_factory, primaries=3, replicas_per_primary=0)


@pytest.fixture
async def clients(cluster: LocalCluster) -> AsyncIterator[list[RedisCluster]]:
    made = [
        RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])
        for _ in range(2)
    ]
    try:
        yield made
    finally:
        for client in made:
            await client.aclose()


def test_a_rooms_keys_share_one_slot_and_rooms_spread(cluster: LocalCluster) -> None:
    keyspace = KeySpace("sg")
    owners = set()
    for room in ROOMS:
        keys = [*keyspace.room(room).as_list(), keyspace.archive(room), keyspace.lease(room)]
        slots = {key_slot(key.encode()) for key in keys}
        assert len(slots) == 1
        owners.add(cluster.slot_owner(slots.pop()).port)
    assert len(owners) == 3


async def test_workers_converge_on_a_cluster(
    cluster: LocalCluster, clients: list[RedisCluster]
) -> None:
    prefix = "cl1"
    a = ConversationManager(None, redis=clients[0], key_prefix=prefix, max_history=50)
    b = ConversationManager(None, redis=clients[1], key_prefix=prefix, max_history=50)
    try:
        for i in range(5):
            for room in ROOMS:  # one tick: calls for every primary at once
                a.append(room, "user", f"[Message ID: {i}] hello {room}")
        await a.drain(timeout=10)
        for room in ROOMS:
            await b.append_async(room, "assistant", f"answer in {room}")
            assert await b.patch_reactions_async(room, 2, "👍x2")
        for port in cluster.primary_ports():
            async with aioredis.Redis(port=port) as node:
                await node.script_flush()
                await node.function_flush()
        for room in ROOMS:
            assert await a.mark_deleted_async(room, 4, "T")
        await a.clear_async(ROOMS[0])
        for room in ROOMS:
            await a.ensure_fresh_from_redis(room)
            await b.ensure_fresh_from_redis(room)
            assert a.get_messages(room) == b.get_messages(room)
        assert a.get_messages(ROOMS[0]) == []
        contents = [m["content"] for m in b.get_messages(ROOMS[1])]
        assert contents[2] == "[Message ID: 2] [Reactions: 👍x2] hello discord:1"
        assert contents[4] == "[Message ID: 4] [deleted at T] hello discord:1"
        assert contents[5] == "answer in discord:1"
        assert a.stats()["script_reloads"] >= 1
    finally:
        await a.aclose()
        await b.aclose()


async def test_push_freshness_on_a_cluster(
    cluster: LocalCluster, clients: list[RedisCluster]
) -> None:
    """Sharded pub/sub: one subscriber per primary, each room on its slot's owner."""
    from conversation.testing import wait_until

    prefix = "cl2"
    rooms = ROOMS  # on every primary, several slots per primary
    writer = ConversationManager(None, redis=clients[0], key_prefix=prefix)
    reader = ConversationManager(None, redis=clients[1], key_prefix=prefix, freshness="push")
    try:
        for room in rooms:
            await writer.append_async(room, "user", f"hello {room}")

        async def all_pushed() -> bool:
            before = reader.stats()["push_reads"]
            for room in rooms:
                assert await reader.get_messages_async(room) == writer.get_messages(room)
            return reader.stats()["push_reads"] == before + len(rooms)

        await wait_until(all_pushed, what="every room served by push")
        trips = reader.stats()["round_trips"]
        for room in rooms:
            await reader.get_messages_async(room)
        assert reader.stats()["round_trips"] == trips

        for room in rooms:
            await writer.append_async(room, "assistant", "again")

        async def sees_all() -> bool:
            for room in rooms:
                if await reader.get_messages_async(room) != writer.get_messages(room):
                    return False
            return True

        await wait_until(sees_all, what="the push reader to see every room's new write")
        await wait_until(all_pushed, what="every room served by push again")
        channels = [reader._keyspace.notices(room) for room in rooms]
        holders: list[bytes] = []
        for port in cluster.primary_ports():
            async with aioredis.Redis(port=port) as node:
                for channel in channels:
                    counts = await node.pubsub_shardnumsub(channel)
                    holders.extend(channel for _, n in counts if n)
        assert sorted(holders) == sorted(channels)  # each on exactly one primary: its slot's
    finally:
        await writer.aclose()
        await reader.aclose()
