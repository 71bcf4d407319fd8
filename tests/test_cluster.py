"""SPEC §3.15-16, §25: the engine on a real local Redis Cluster (3 primaries + 3 replicas).

One cluster is started for the whole module; every test picks its own rooms,
spread so that each primary owns some. Failover tests kill the primary of a
busy room by pid in the middle of concurrent writes, wait for its replica to
take over, then start the killed node again (it rejoins as a replica), so the
next test finds a healthy 3 + 3 cluster again.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
from cluster_servers import (
    KEYS,
    LaggingWrites,
    LocalCluster,
    Workload,
    assert_converged,
    eventually,
    link_down,
    quick_retry,
    redis_window,
)
from multiproc import run_in_processes
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from support import running_cluster

from conversation import ConversationManager, DurabilityError
from conversation.testing import wait_until

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
MakeClient = Callable[[], RedisCluster]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(tmp_path_factory)


def new_client(startup_nodes: list[tuple[str, int]]) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in startup_nodes],
        socket_timeout=5,
        socket_connect_timeout=1,
        retry=quick_retry(),
    )


@pytest.fixture
async def cluster_client(cluster: LocalCluster) -> AsyncIterator[MakeClient]:
    """Makes RedisCluster clients (one per simulated worker); the script cache starts empty."""
    cluster.wait_healthy()
    clients: list[RedisCluster] = []

    def make() -> RedisCluster:
        client = new_client(cluster.startup_nodes)
        clients.append(client)
        return client

    flusher = make()
    await flusher.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    await flusher.execute_command("FUNCTION FLUSH", target_nodes=RedisCluster.PRIMARIES)
    yield make
    for client in clients:
        await client.aclose()


def slot_of(room: str) -> int:
    return key_slot(KEYS.room(room).window.encode())


def rooms_on_every_primary(cluster: LocalCluster, per_primary: int) -> dict[int, list[str]]:
    """Fresh room ids, ``per_primary`` of them owned by each primary (by port)."""
    owners = cluster.slot_map()
    rooms: dict[int, list[str]] = {port: [] for port in set(owners.values())}
    tag = uuid.uuid4().hex[:8]
    index = 0
    while any(len(found) < per_primary for found in rooms.values()):
        room = f"cluster:{tag}:{index}"
        index += 1
        port = owners[slot_of(room)]
        if len(rooms[port]) < per_primary:
            rooms[port].append(room)
    assert len(rooms) == cluster.primaries
    return rooms


# ------------------------------------------------------------------ layout


async def test_a_rooms_keys_live_in_one_slot_on_one_primary(
    cluster: LocalCluster, cluster_client: MakeClient, make_manager: Make
) -> None:
    client = cluster_client()
    manager = make_manager(client)
    rooms = ["discord:1234", "telegram:-100:thread/7", "ünïcode room · 🦜", "a" * 512]
    for room in rooms:
        keys = [*KEYS.room(room).as_list(), KEYS.archive(room), KEYS.lease(room)]
        assert {key_slot(key.encode()) for key in keys} == {slot_of(room)}
        await manager.append_async(room, "user", "[Message ID: 1] hello")
        assert await manager.update_message_async(room, 1, "[Message ID: 1] hello again")

        slot = slot_of(room)
        owner = cluster.slot_owner(slot)
        with redis.Redis(port=owner.port, decode_responses=True) as direct:
            assert direct.execute_command("CLUSTER", "KEYSLOT", keys[0]) == slot
            stored = set(direct.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100))
        written = KEYS.room(room)  # the archive only exists once the room is folded
        assert {written.window, written.meta, written.log, written.idem} <= stored
        for port in cluster.primary_ports():
            if port != owner.port:
                with redis.Redis(port=port) as other:
                    assert other.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0


# ----------------------------------------------------------- multi-worker


async def test_workers_converge_with_rooms_on_every_primary(
    cluster: LocalCluster, cluster_client: MakeClient, make_manager: Make
) -> None:
    by_primary = rooms_on_every_primary(cluster, per_primary=2)
    rooms = [room for found in by_primary.values() for room in found]
    assert {cluster.slot_owner(slot_of(room)).port for room in rooms} == set(
        cluster.primary_ports()
    )
    managers = [make_manager(cluster_client(), max_history=500) for _ in range(3)]

    async def writer(index: int, manager: ConversationManager, room: str) -> None:
        for turn in range(30):
            content = f"[Message ID: w{index}-{turn}] turn {turn} of worker {index}"
            if turn % 3 == 0:
                manager.append(room, "user", content)  # sync form: persisted in background
            else:
                await manager.append_async(room, "user", content)

    await asyncio.gather(
        *(writer(i, manager, room) for i, manager in enumerate(managers) for room in rooms)
    )
    for manager in managers:
        await manager.drain()

    # Catch-up: every worker sees every worker's turns, each worker's in its own order.
    for room in rooms:
        for manager in managers:
            messages = await manager.get_messages_async(room)
            assert len(messages) == 90
            for index in range(3):
                mine = [m["content"] for m in messages if f"of worker {index}" in m["content"]]
                assert mine == [
                    f"[Message ID: w{index}-{turn}] turn {turn} of worker {index}"
                    for turn in range(30)
                ]

    # The scripts and functions of every primary are gone: the next writes reload them.
    client = cluster_client()
    await client.execute_command("SCRIPT FLUSH", target_nodes=RedisCluster.PRIMARIES)
    await client.execute_command("FUNCTION FLUSH", target_nodes=RedisCluster.PRIMARIES)

    # Edits from different workers, concurrently, in rooms on every primary.
    edits = []
    for room in rooms:
        edits += [
            managers[1].mark_deleted_async(room, "w1-5", "2024-01-01T00:00:00Z"),
            managers[2].patch_reactions_async(room, "w1-5", "👍 2"),
            managers[0].update_message_async(room, "w0-7", "[Message ID: w0-7] edited by 0"),
        ]
    assert all(await asyncio.gather(*edits))
    observer = make_manager(cluster_client(), max_history=500)  # a cold worker
    for room in rooms:
        contents = [m["content"] for m in await observer.get_messages_async(room)]
        (deleted,) = [c for c in contents if c.startswith("[Message ID: w1-5]")]
        assert "[deleted at 2024-01-01T00:00:00Z]" in deleted
        assert "[Reactions: 👍 2]" in deleted
        assert "[Message ID: w0-7] edited by 0" in contents
    assert sum(manager.stats()["script_reloads"] for manager in managers) >= 1

    # Clear one room per primary: every worker sees it at its next sync.
    cleared = [found[0] for found in by_primary.values()]
    await asyncio.gather(*(managers[1].clear_async(room) for room in cleared))
    for room in cleared:
        for manager in [*managers, observer]:
            await manager.ensure_fresh_from_redis(room)
            assert manager.get_messages(room) == []
    await assert_converged([*managers, observer], client, rooms)


async def test_limits_and_backfill_on_every_primary(
    cluster: LocalCluster, cluster_client: MakeClient, make_manager: Make
) -> None:
    rooms = [room for found in rooms_on_every_primary(cluster, 1).values() for room in found]
    manager, other = make_manager(cluster_client()), make_manager(cluster_client())
    for room in rooms:
        for turn in range(60):
            manager.append(room, "user", f"[Message ID: {turn + 10}] turn {turn}")
    await manager.drain()
    await asyncio.gather(*(other.set_channel_limit_async(room, 200) for room in rooms))
    older = [{"role": "user", "content": f"[Message ID: {i}] old {i}"} for i in range(10)]
    await asyncio.gather(*(manager.backfill_async(room, older) for room in rooms))
    for room in rooms:
        messages = await other.get_messages_async(room)
        contents = [m["content"] for m in messages]
        assert contents[:2] == ["[Message ID: 0] old 0", "[Message ID: 1] old 1"]
        assert len(messages) == 70
        assert not other.is_rebackfill_requested(room)
    await asyncio.gather(*(other.set_channel_limit_async(room, 50) for room in rooms))
    await assert_converged([manager, other], cluster_client(), rooms)
    for room in rooms:
        assert manager.get_history_message_count(room) == 50


def process_body(
    index: int,
    barrier: Any,
    startup_nodes: list[tuple[str, int]],
    rooms: list[str],
    count: int,
) -> dict[str, list[str]]:
    """One worker process: appends ``count`` turns to every room, then reads all back."""

    async def body() -> dict[str, list[str]]:
        client = new_client(startup_nodes)
        manager = ConversationManager(None, redis=client, max_history=1000)
        barrier.wait()
        for turn in range(count):
            for room in rooms:
                content = f"[Message ID: p{index}-{turn}] process {index} turn {turn}"
                if turn % 2:
                    await manager.append_async(room, "user", content)
                else:
                    manager.append(room, "user", content)
        await manager.drain()
        barrier.wait()  # every process is done writing: now all must converge
        windows = {}
        for room in rooms:
            await manager.ensure_fresh_from_redis(room)
            windows[room] = [m["content"] for m in manager.get_messages(room)]
        await manager.aclose()
        await client.aclose()
        return windows

    return asyncio.run(body())


async def test_processes_append_concurrently_on_the_cluster(
    cluster: LocalCluster,
) -> None:
    rooms = [room for found in rooms_on_every_primary(cluster, 1).values() for room in found]
    count = 40
    results = await asyncio.to_thread(
        run_in_processes,
        process_body,
        [(cluster.startup_nodes, rooms, count)] * 3,
    )
    for room in rooms:
        windows = [result[room] for result in results]
        assert windows[0] == windows[1] == windows[2]
        assert len(windows[0]) == 3 * count
        for index in range(3):
            assert [c for c in windows[0] if c.startswith(f"[Message ID: p{index}-")] == [
                f"[Message ID: p{index}-{turn}] process {index} turn {turn}"
                for turn in range(count)
            ]


# ------------------------------------------------------------ WAIT option


async def test_wait_option_confirms_writes_on_every_primary(
    cluster: LocalCluster, cluster_client: MakeClient, make_manager: Make
) -> None:
    rooms = [room for found in rooms_on_every_primary(cluster, 2).values() for room in found]
    manager = make_manager(cluster_client(), min_replicas=1, replica_timeout_ms=2000)
    for turn in range(5):
        for room in rooms:
            manager.append(room, "user", f"[Message ID: {turn}] turn {turn}")
    await manager.drain()
    await asyncio.gather(
        *(manager.update_message_async(room, 3, "[Message ID: 3] edited") for room in rooms)
    )
    stats = manager.stats()
    assert stats["unreplicated_writes"] == 0
    assert stats["persist_failures"] == 0
    # Each primary's replica holds every room's window already (WAIT vouched for it).
    for room in rooms:
        owner = cluster.slot_owner(slot_of(room))
        (replica,) = cluster.replicas_of(owner)
        with redis.Redis(port=replica.port) as direct:
            direct.execute_command("READONLY")
            assert direct.llen(KEYS.room(room).window) == 5


async def test_wait_shortfall_is_not_acknowledged(
    cluster: LocalCluster, cluster_client: MakeClient, make_manager: Make
) -> None:
    """Asking for more replicas than exist: a durable write fails, naming the shortfall."""
    from conversation import ReplicationTimeout  # the engine's min_replicas option

    (room,) = rooms_on_every_primary(cluster, 1)[cluster.primary_ports()[0]]
    manager = make_manager(
        cluster_client(), min_replicas=2, replica_timeout_ms=50, durable_timeout=0.5
    )
    with pytest.raises(DurabilityError) as caught:
        await manager.append_async(room, "user", "[Message ID: 1] needs two replicas", durable=True)
    assert isinstance(caught.value.__cause__, ReplicationTimeout)
    assert caught.value.__cause__.replicas == 1
    assert manager.stats()["unreplicated_writes"] >= 1
    # The primary may hold it (WAIT is no rollback): a retry with the key lands it once.
    patient = make_manager(cluster_client(), min_replicas=1)
    await patient.append_async(
        room,
        "user",
        "[Message ID: 1] needs two replicas",
        idempotency_key=caught.value.idempotency_key,
    )
    assert len(await patient.get_messages_async(room)) == 1


# -------------------------------------------------------------- failover

FAILOVER_MODES = pytest.mark.parametrize(
    "min_replicas", [0, 1], ids=["async-replication", "wait-1-replica"]
)


@pytest.mark.slow
@FAILOVER_MODES
async def test_failover_in_the_middle_of_concurrent_writes(
    cluster: LocalCluster,
    cluster_client: MakeClient,
    make_manager: Make,
    min_replicas: int,
    record_property: Callable[[str, object], None],
) -> None:
    by_primary = rooms_on_every_primary(cluster, per_primary=1)
    victim = cluster.member(cluster.primary_ports()[0])
    (replica,) = cluster.replicas_of(victim)
    busy = by_primary[victim.port][0]
    rooms = [room for found in by_primary.values() for room in found]
    managers = [
        make_manager(
            cluster_client(),
            max_history=1000,
            min_replicas=min_replicas,
            replica_timeout_ms=500,
            retry_backoff=(0.02, 0.25),
        )
        for _ in range(3)
    ]
    # A reader in push mode (SPEC §37): its subscriber on the victim dies with it.
    reader = make_manager(cluster_client(), freshness="push")
    workload = Workload(managers, rooms)
    workload.start()
    await eventually(lambda: workload.count(busy) >= 60, 30, "appends flowing")
    for room in rooms:
        await reader.get_messages_async(room)

    cluster.kill(victim)
    workload.mark_killed()
    # The workers go on: sync writes queue in memory while the slot has no primary.
    for index, manager in enumerate(managers):
        for turn in range(10):
            manager.append(busy, "assistant", f"[Message ID: {busy}/s{index}-{turn}] queued")
    await asyncio.to_thread(cluster.wait_promoted, replica)
    promoted_after = asyncio.get_running_loop().time() - workload.killed_at
    cluster.restart(victim)  # it rejoins as a replica of the promoted node
    await asyncio.to_thread(cluster.wait_healthy)
    await workload.finish()
    for manager in managers:
        await manager.drain(timeout=30)

    client = cluster_client()
    assert cluster.slot_owner(slot_of(busy)).port == replica.port
    await assert_converged(managers, client, rooms)
    for room in rooms:
        stored = [message["content"] for message in await redis_window(client, room)]

        async def read_converged(room: str = room, stored: list[str] = stored) -> bool:
            messages = await reader.get_messages_async(room)
            return [message["content"] for message in messages] == stored

        await wait_until(read_converged, what=f"the push reader to converge in {room}")

    async def pushed_again() -> bool:
        before = reader.stats()["push_reads"]
        await reader.get_messages_async(busy)
        return reader.stats()["push_reads"] > before

    await wait_until(pushed_again, what="push to serve the failed-over room again")
    label = f"cluster failover, min_replicas={min_replicas}"
    lost = await workload.report(label, client, busy, promoted_after, record_property)
    if min_replicas:
        assert lost == 0


@pytest.mark.slow
@FAILOVER_MODES
async def test_failover_to_a_lagging_replica(
    cluster: LocalCluster,
    cluster_client: MakeClient,
    make_manager: Make,
    min_replicas: int,
    record_property: Callable[[str, object], None],
) -> None:
    """The replica's link is down when the primary dies: what it missed is gone.

    Writes made while the replica lags reach the primary only; then the primary
    is killed and the replica promoted. Without WAIT every write acknowledged in
    that window is lost; with ``min_replicas=1`` none was acknowledged before a
    replica held it, and the retries land them all on the new primary.
    """
    victim = cluster.member(cluster.primary_ports()[0])
    (replica,) = cluster.replicas_of(victim)
    room = rooms_on_every_primary(cluster, per_primary=1)[victim.port][0]
    writer = make_manager(
        cluster_client(),
        max_history=1000,
        min_replicas=min_replicas,
        replica_timeout_ms=200,
        retry_backoff=(0.02, 0.25),
    )
    other = make_manager(cluster_client(), max_history=1000)
    writes = LaggingWrites(writer, room)
    await writes.before()
    with (
        link_down(victim.server, replica.server),
        redis.Redis(port=victim.port) as direct,
    ):
        writes.start()
        await writes.reach_primary(direct)
        cluster.kill(victim)
    await asyncio.to_thread(cluster.wait_promoted, replica)
    cluster.restart(victim)
    await asyncio.to_thread(cluster.wait_healthy)
    label = "cluster failover to a lagging replica"
    await writes.check(label, min_replicas, other, cluster_client(), record_property)
