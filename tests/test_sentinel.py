"""SPEC §25: the engine behind Sentinel (one primary, one replica, three Sentinels).

Managers get their client from ``Sentinel(...).master_for(...)``. Failover tests
kill the primary by pid in the middle of concurrent writes, wait until every
Sentinel names the replica as the new primary, then bring the killed server back
as a replica of it, so the next test finds a primary with a replica again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from cluster_servers import (
    SERVICE,
    LaggingWrites,
    LocalSentinel,
    Workload,
    assert_converged,
    eventually,
    link_down,
    quick_retry,
    redis_window,
)
from redis.asyncio.sentinel import Sentinel

from conversation import ConversationManager
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
MakeClient = Callable[[], aioredis.Redis]


FAILOVER_MODES = pytest.mark.parametrize(
    "min_replicas", [0, 1], ids=["async-replication", "wait-1-replica"]
)


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSentinel]:
    deployment = LocalSentinel(tmp_path_factory.mktemp("sentinel")).start()
    try:
        yield deployment
    finally:
        deployment.stop()


@pytest.fixture
async def sentinel_client(sentinel: LocalSentinel) -> AsyncIterator[MakeClient]:
    """Makes ``master_for`` clients (one per simulated worker); the script cache starts empty.

    They share one ``Sentinel``, as the workers of one process would.
    """
    sentinel.wait_healthy()
    watcher = Sentinel(sentinel.sentinel_addresses, socket_timeout=1)  # type: ignore[no-untyped-call, unused-ignore]
    # Concurrent master discoveries in a failover reorder watcher.sentinels with a
    # stale index across an await and can drop one of its clients from the list
    # (redis-py's discover_master); keep them all here so every one gets closed.
    sentinel_clients: list[aioredis.Redis] = list(watcher.sentinels)
    clients: list[aioredis.Redis] = []

    def make() -> aioredis.Redis:
        client: aioredis.Redis = watcher.master_for(
            SERVICE, socket_timeout=5, socket_connect_timeout=1, retry=quick_retry()
        )
        clients.append(client)
        return client

    await make().script_flush()
    yield make
    for client in [*clients, *sentinel_clients]:
        await client.aclose()


def rooms(count: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"sentinel:{tag}:{index}" for index in range(count)]


async def test_managers_share_rooms_through_sentinel(
    sentinel: LocalSentinel,
    sentinel_client: MakeClient,
    make_manager: Make,
) -> None:
    names = rooms(4)
    managers = [make_manager(sentinel_client(), max_history=500) for _ in range(3)]

    async def writer(index: int, manager: ConversationManager, room: str) -> None:
        for turn in range(25):
            content = f"[Message ID: w{index}-{turn}] turn {turn} of worker {index}"
            if turn % 2:
                await manager.append_async(room, "user", content)
            else:
                manager.append(room, "user", content)

    await asyncio.gather(
        *(writer(i, manager, room) for i, manager in enumerate(managers) for room in names)
    )
    for manager in managers:
        await manager.drain()
    edits = [
        managers[0].mark_deleted_async(names[0], "w2-3", "2024-01-01T00:00:00Z"),
        managers[1].patch_reactions_async(names[0], "w2-3", "🎉 1"),
        managers[2].update_message_async(names[1], "w0-0", "[Message ID: w0-0] edited"),
    ]
    assert all(await asyncio.gather(*edits))
    await managers[2].clear_async(names[2])

    observer = make_manager(sentinel_client(), max_history=500)
    messages = await observer.get_messages_async(names[0])
    assert len(messages) == 75
    (edited,) = [m["content"] for m in messages if m["content"].startswith("[Message ID: w2-3]")]
    assert "[deleted at 2024-01-01T00:00:00Z]" in edited
    assert "[Reactions: 🎉 1]" in edited
    assert await observer.get_messages_async(names[2]) == []
    await assert_converged([*managers, observer], sentinel_client(), names)


@pytest.mark.slow
@FAILOVER_MODES
async def test_sentinel_failover_in_the_middle_of_concurrent_writes(
    sentinel: LocalSentinel,
    sentinel_client: MakeClient,
    make_manager: Make,
    min_replicas: int,
    record_property: Callable[[str, object], None],
) -> None:
    names = rooms(3)
    managers = [
        make_manager(
            sentinel_client(),
            max_history=1000,
            min_replicas=min_replicas,
            replica_timeout_ms=500,
            retry_backoff=(0.02, 0.25),
        )
        for _ in range(3)
    ]
    # A reader in push mode (SPEC §37): its subscriber connection dies with the primary.
    reader = make_manager(sentinel_client(), freshness="push")
    old, replica = sentinel.primary(), sentinel.replica()
    workload = Workload(managers, names)
    workload.start()
    await eventually(lambda: workload.count(names[0]) >= 60, 30, "appends flowing")
    for name in names:
        await reader.get_messages_async(name)

    old.kill()
    workload.mark_killed()
    for index, manager in enumerate(managers):
        for turn in range(10):
            manager.append(names[0], "assistant", f"[Message ID: s{index}-{turn}] queued")
    new = await asyncio.to_thread(sentinel.wait_failover, old.port)
    assert new is replica
    promoted_after = asyncio.get_running_loop().time() - workload.killed_at
    sentinel.restart_as_replica(old, new)
    await asyncio.to_thread(sentinel.wait_healthy)
    await workload.finish()
    for manager in managers:
        await manager.drain(timeout=30)

    client = sentinel_client()
    await assert_converged(managers, client, names)
    for name in names:
        stored = [message["content"] for message in await redis_window(client, name)]

        async def read_converged(name: str = name, stored: list[str] = stored) -> bool:
            messages = await reader.get_messages_async(name)
            return [message["content"] for message in messages] == stored

        await wait_until(read_converged, what=f"the push reader to converge in {name}")

    async def pushed_again() -> bool:
        before = reader.stats()["push_reads"]
        await reader.get_messages_async(names[0])
        return reader.stats()["push_reads"] > before

    await wait_until(pushed_again, what="push to serve again from the new primary")
    label = f"sentinel failover, min_replicas={min_replicas}"
    lost = await workload.report(label, client, names[0], promoted_after, record_property)
    if min_replicas:
        assert lost == 0


@pytest.mark.slow
@FAILOVER_MODES
async def test_sentinel_failover_to_a_lagging_replica(
    sentinel: LocalSentinel,
    sentinel_client: MakeClient,
    make_manager: Make,
    min_replicas: int,
    record_property: Callable[[str, object], None],
) -> None:
    """As in the cluster: acknowledged writes the replica missed are lost without WAIT."""
    (room,) = rooms(1)
    writer = make_manager(
        sentinel_client(),
        max_history=1000,
        min_replicas=min_replicas,
        replica_timeout_ms=200,
        retry_backoff=(0.02, 0.25),
    )
    other = make_manager(sentinel_client(), max_history=1000)
    writes = LaggingWrites(writer, room)
    await writes.before()
    old, replica = sentinel.primary(), sentinel.replica()
    with link_down(old, replica), redis.Redis(port=old.port) as direct:
        writes.start()
        await writes.reach_primary(direct)
        old.kill()
    new = await asyncio.to_thread(sentinel.wait_failover, old.port)
    sentinel.restart_as_replica(old, new)
    await asyncio.to_thread(sentinel.wait_healthy)
    label = "sentinel failover to a lagging replica"
    await writes.check(label, min_replicas, other, sentinel_client(), record_property)
