"""The ``min_replicas`` (WAIT) option on one primary with and without a replica, and
what the persist loop does with errors nobody expected.

Failovers are tested on real deployments in test_cluster.py and test_sentinel.py;
this module pins down the single-server behaviour those build on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from cluster_servers import eventually, link_down
from fault_proxy import FaultProxy
from redis_servers import RedisServer, wait_until

from conversation import (
    ConfigurationError,
    ConversationManager,
    DurabilityError,
    PersistError,
    ReplicationTimeout,
)
from conversation._redis.keys import KeySpace

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
KEYS = KeySpace("sg")


@pytest.fixture
def primary(redis_server: RedisServer) -> RedisServer:
    """conftest's private server, named for the role it plays here."""
    return redis_server


def start_replica(directory: Path, primary: RedisServer) -> RedisServer:
    replica = RedisServer(directory, extra=("--replicaof", "127.0.0.1", str(primary.port))).start()
    replica.wait_replica_synced()
    return replica


def stored(server: RedisServer, room: str) -> list[str]:
    with redis.Redis(port=server.port) as client:
        rows = client.lrange(KEYS.room(room).window, 0, -1)
    return [str(orjson.loads(row)["content"]) for row in rows]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": True}, "min_replicas"),
        ({"min_replicas": "1"}, "min_replicas"),
        ({"min_replicas": 1, "replica_timeout_ms": 0}, "replica_timeout_ms"),
        ({"min_replicas": 1, "replica_timeout_ms": 1.5}, "replica_timeout_ms"),
        ({"min_replicas": 1, "replica_timeout_ms": 5000, "command_timeout": 2.0}, "exceed"),
    ],
)
def test_bad_replication_settings_are_refused_by_name(kwargs: dict[str, Any], problem: str) -> None:
    client = aioredis.Redis(port=1)  # never connected: construction must refuse first
    with pytest.raises(ConfigurationError, match=problem):
        ConversationManager(None, redis=client, **kwargs)


def test_min_replicas_needs_redis() -> None:
    with pytest.raises(ConfigurationError, match="needs a redis client"):
        ConversationManager(None, min_replicas=1)


async def test_writes_are_confirmed_by_the_replica(
    primary: RedisServer, tmp_path: Path, make_manager: Make, room: str
) -> None:
    replica = start_replica(tmp_path / "replica", primary)
    try:
        client = aioredis.Redis(port=primary.port, socket_timeout=5)
        manager = make_manager(client, min_replicas=1, replica_timeout_ms=2000)
        for turn in range(20):
            manager.append(room, "user", f"[Message ID: {turn}] turn {turn}")
        await manager.append_async(room, "user", "[Message ID: 20] awaited")
        assert await manager.patch_reactions_async(room, 3, "👍 1")
        await manager.set_channel_limit_async(room, 60)
        await manager.drain()
        # Acknowledged means the replica holds it: read it there, with no waiting.
        on_replica = stored(replica, room)
        assert on_replica == stored(primary, room)
        assert len(on_replica) == 21
        assert on_replica[3] == "[Message ID: 3] [Reactions: 👍 1] turn 3"
        stats = manager.stats()
        assert (stats["unreplicated_writes"], stats["persist_failures"]) == (0, 0)
        await client.aclose()
    finally:
        replica.stop()


async def test_without_enough_replicas_nothing_is_acknowledged(
    primary: RedisServer, tmp_path: Path, make_manager: Make, room: str
) -> None:
    """No replica: a durable write fails naming the shortfall; a background write waits.

    Both are on the primary already (WAIT is no rollback). Once a replica
    attaches, the waiting write is confirmed by a replay of its token: it lands
    once, and the re-sent durable write with its key lands once too.
    """
    client = aioredis.Redis(port=primary.port, socket_timeout=5)
    manager = make_manager(
        client,
        min_replicas=1,
        replica_timeout_ms=50,
        durable_timeout=0.4,
        retry_backoff=(0.02, 0.1),
    )
    with pytest.raises(DurabilityError) as caught:
        await manager.append_async(room, "user", "[Message ID: 1] durable", durable=True)
    cause = caught.value.__cause__
    assert isinstance(cause, ReplicationTimeout)
    assert (cause.replicas, cause.wanted) == (0, 1)
    assert "0 of 1 replica(s)" in str(cause)
    assert stored(primary, room) == ["[Message ID: 1] durable"]
    assert manager.get_messages(room) == []  # a durable failure leaves memory

    manager.append(room, "user", "[Message ID: 2] waits for a replica")
    refused = manager.stats()["unreplicated_writes"]
    await eventually(
        lambda: manager.stats()["unreplicated_writes"] >= refused + 2, 10, "WAIT refusing it twice"
    )
    assert manager.stats()["pending_writes"] == 1
    assert stored(primary, room) == [
        "[Message ID: 1] durable",
        "[Message ID: 2] waits for a replica",
    ]

    replica = start_replica(tmp_path / "replica", primary)
    try:
        await manager.drain(timeout=10)
        await manager.append_async(
            room, "user", "[Message ID: 1] durable", idempotency_key=caught.value.idempotency_key
        )
        expected = ["[Message ID: 1] durable", "[Message ID: 2] waits for a replica"]
        assert stored(primary, room) == expected
        assert stored(replica, room) == expected
        await manager.ensure_fresh_from_redis(room)
        assert [m["content"] for m in manager.get_messages(room)] == expected
    finally:
        replica.stop()
        await client.aclose()


async def test_reads_and_syncs_do_not_wait_for_replicas(
    primary: RedisServer, make_manager: Make, room: str
) -> None:
    """Only writes carry WAIT: a worker with no replica around can still read."""
    client = aioredis.Redis(port=primary.port, socket_timeout=5)
    writer = make_manager(client)
    await writer.append_async(room, "user", "[Message ID: 1] hi")
    reader = make_manager(client, min_replicas=1, replica_timeout_ms=50)
    await reader.ensure_fresh_from_redis(room)
    assert [m["content"] for m in await reader.get_messages_async(room)] == ["[Message ID: 1] hi"]
    assert reader.stats()["unreplicated_writes"] == 0
    await client.aclose()


# --------------------------------------------------------- unexpected errors


def break_appends(
    manager: ConversationManager,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[], Exception | None],
) -> None:
    """Before each append script call, ``failure()`` may name an error to raise instead."""
    store = manager._store
    assert store is not None
    real_append = store.append

    async def append(*args: Any, **kwargs: Any) -> Any:
        error = failure()
        if error is not None:
            raise error
        return await real_append(*args, **kwargs)

    monkeypatch.setattr(store, "append", append)


async def test_persist_loop_survives_an_unexpected_error(
    primary: RedisServer, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug-shaped error (seen from redis-py's cluster client under load) is retried."""
    client = aioredis.Redis(port=primary.port, socket_timeout=5)
    manager = make_manager(client, retry_backoff=(0.01, 0.02))
    failures = iter([AttributeError("'NoneType' object has no attribute 'writelines'")])
    break_appends(manager, monkeypatch, lambda: next(failures, None))
    manager.append(room, "user", "[Message ID: 1] first")
    await manager.append_async(room, "user", "[Message ID: 2] second")
    await manager.drain(timeout=5)
    assert stored(primary, room) == ["[Message ID: 1] first", "[Message ID: 2] second"]
    assert manager.stats()["persist_failures"] == 1
    await client.aclose()


async def test_an_error_that_never_goes_away_fails_the_write_not_the_room(
    primary: RedisServer, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = aioredis.Redis(port=primary.port, socket_timeout=5)
    manager = make_manager(client, retry_backoff=(0.01, 0.02))
    broken = True
    break_appends(manager, monkeypatch, lambda: AttributeError("a bug") if broken else None)
    with pytest.raises(PersistError, match="given up; it may have landed") as caught:
        await manager.append_async(room, "user", "[Message ID: 1] doomed")
    assert isinstance(caught.value.__cause__, AttributeError)
    broken = False
    await manager.append_async(room, "user", "[Message ID: 2] fine")
    assert stored(primary, room) == ["[Message ID: 2] fine"]
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in manager.get_messages(room)] == ["[Message ID: 2] fine"]
    await client.aclose()


# ------------------------------------------------- failover to a stale replica


async def test_workers_reload_after_a_failover_that_reused_versions(
    primary: RedisServer, tmp_path: Path, make_manager: Make, room: str
) -> None:
    """The promoted replica missed writes, and new writes then reuse their versions.

    A worker that saw the lost writes is ahead by version only until the new
    primary passes it; the epoch carries the primary's replication id, so it
    reloads instead of patching new rows onto a history Redis no longer has.
    Both workers reach Redis through one proxy, moved to the replica as a
    virtual IP would be.
    """
    replica = start_replica(tmp_path / "replica", primary)
    proxy = await FaultProxy(primary.port).start()
    clients = [aioredis.Redis(port=proxy.port, socket_timeout=5) for _ in range(2)]
    try:
        seer, other = (make_manager(client, retry_backoff=(0.01, 0.05)) for client in clients)
        for turn in range(10):
            await seer.append_async(room, "user", f"[Message ID: {turn}] replicated")
        wait_until(lambda: len(stored(replica, room)) == 10, what="the replica holding 10 rows")
        with link_down(primary, replica):
            for turn in range(10, 15):
                await seer.append_async(room, "user", f"[Message ID: {turn}] lost")
            with redis.Redis(port=replica.port) as promoted:
                promoted.execute_command("REPLICAOF", "NO", "ONE")
            proxy.upstream_port = replica.port
            proxy.cut()
        for turn in range(15, 23):
            await other.append_async(room, "assistant", f"[Message ID: {turn}] after")

        await seer.ensure_fresh_from_redis(room)
        after = stored(replica, room)
        assert len(after) == 18 and not any(c.endswith("lost") for c in after)
        assert [m["content"] for m in seer.get_messages(room)] == after
        assert seer.stats()["reloads"] >= 1
    finally:
        for client in clients:
            await client.aclose()
        await proxy.stop()
        replica.stop()


async def test_an_error_after_redis_applied_the_write_lands_it_once(
    primary: RedisServer, make_manager: Make, room: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reply of an applied write is lost to a bug: the retry replays the token."""
    client = aioredis.Redis(port=primary.port, socket_timeout=5)
    manager = make_manager(client, retry_backoff=(0.01, 0.02))
    await manager.append_async(room, "user", "[Message ID: 1] before")
    replicator = manager._backend
    real_absorb = replicator.absorb
    failures = iter([KeyError("a bug while reading the reply")])

    async def flaky_absorb(*args: Any, **kwargs: Any) -> None:
        for error in failures:
            raise error
        await real_absorb(*args, **kwargs)

    monkeypatch.setattr(replicator, "absorb", flaky_absorb)
    await manager.append_async(room, "user", "[Message ID: 2] applied, reply lost")
    await manager.append_async(room, "user", "[Message ID: 3] after")
    expected = [
        "[Message ID: 1] before",
        "[Message ID: 2] applied, reply lost",
        "[Message ID: 3] after",
    ]
    assert stored(primary, room) == expected
    assert [m["content"] for m in manager.get_messages(room)] == expected
    await manager.ensure_fresh_from_redis(room)
    assert [m["content"] for m in manager.get_messages(room)] == expected
    await client.aclose()


def deny_dangerous(*servers: RedisServer) -> None:
    """A common hardening ACL: the user "bot" may not run @dangerous commands (INFO)."""
    for server in servers:
        with redis.Redis(port=server.port) as admin:
            admin.acl_setuser(
                "bot",
                enabled=True,
                passwords=["+secret"],
                keys=["*"],
                commands=["+@all", "-@dangerous"],
            )


async def test_a_failover_that_lost_writes_is_told_without_info(
    primary: RedisServer, tmp_path: Path, make_manager: Make, room: str
) -> None:
    """The promoted replica lost the last writes (appends and an edit), then reuses
    their versions: a worker that saw all of them (at the head, even at the very
    version the new primary reaches), and one that saw only some (several versions
    behind), both reload and equal Redis, through the lineage tag of their version.
    The scripts may not run INFO (an ACL denies @dangerous): nothing depends on it.
    """
    replica = start_replica(tmp_path / "replica", primary)
    deny_dangerous(primary, replica)
    proxy = await FaultProxy(primary.port).start()
    clients = [
        aioredis.Redis(port=proxy.port, username="bot", password="secret", socket_timeout=5)
        for _ in range(3)
    ]
    try:
        seer, behind, other = (make_manager(c, retry_backoff=(0.01, 0.05)) for c in clients)
        for turn in range(10):
            await seer.append_async(room, "user", f"[Message ID: {turn}] replicated")
        wait_until(lambda: len(stored(replica, room)) == 10, what="the replica holding 10 rows")
        with link_down(primary, replica):
            for turn in range(10, 12):
                await seer.append_async(room, "user", f"[Message ID: {turn}] lost")
            await behind.ensure_fresh_from_redis(room)  # saw 2 of the 5 lost writes
            await seer.update_message_async(room, 3, "[Message ID: 3] lost edit")
            for turn in range(12, 14):
                await seer.append_async(room, "user", f"[Message ID: {turn}] lost")
            with redis.Redis(port=replica.port) as promoted:
                promoted.execute_command("REPLICAOF", "NO", "ONE")
            proxy.upstream_port = replica.port
            proxy.cut()
        # The new primary reaches the seer's version exactly, with other rows.
        for turn in range(20, 25):
            await other.append_async(room, "assistant", f"[Message ID: {turn}] after")
        await other.update_message_async(room, 5, "[Message ID: 5] edited after")
        after = stored(replica, room)
        assert not any("lost" in content for content in after)
        for worker in (seer, behind):
            await worker.ensure_fresh_from_redis(room)
            assert [m["content"] for m in worker.get_messages(room)] == after
            assert worker.stats()["reloads"] >= 1
        # And they keep converging on later writes, theirs and others'.
        await seer.append_async(room, "user", "[Message ID: 30] seer again")
        await behind.update_message_async(room, 21, "[Message ID: 21] behind edits")
        final = stored(replica, room)
        for worker in (seer, behind, other):
            await worker.ensure_fresh_from_redis(room)
            assert [m["content"] for m in worker.get_messages(room)] == final
    finally:
        for client in clients:
            await client.aclose()
        await proxy.stop()
        replica.stop()
