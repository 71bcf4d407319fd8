"""SPEC §3.14 and §3.16 against a real redis-server that is flushed, restarted and stopped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis_servers import RedisServer
from support import wait_for, window_key

from conversation import ConversationManager, DurabilityError, RedisUnavailable

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]
AOF = ("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def aof_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "aof", extra=AOF).start()
    yield server
    server.stop()


def client_for(server: RedisServer) -> aioredis.Redis:
    # No client-side retries: the engine's own retry loop is what is under test.
    return aioredis.Redis(
        port=server.port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
    )


async def test_scripts_survive_script_flush_and_restart(
    aof_server: RedisServer, make_manager: Make, room: str
) -> None:
    client = client_for(aof_server)
    manager = make_manager(client)
    await manager.append_async(room, "user", "[Message ID: 1] one")
    await client.script_flush()
    await client.function_flush()  # a write still lands: the library is loaded again
    await manager.append_async(room, "user", "[Message ID: 2] two")
    assert await manager.patch_reactions_async(room, 1, "x")
    aof_server.restart()
    await manager.append_async(room, "user", "[Message ID: 3] three")
    assert manager.stats()["script_reloads"] >= 3
    reader = make_manager(client)
    assert [m["content"] for m in await reader.get_messages_async(room)] == [
        "[Message ID: 1] [Reactions: x] one",
        "[Message ID: 2] two",
        "[Message ID: 3] three",
    ]
    await client.aclose()


async def test_sync_append_while_redis_is_down_lands_exactly_once(
    aof_server: RedisServer, make_manager: Make, room: str
) -> None:
    client = client_for(aof_server)
    manager = make_manager(client, retry_backoff=(0.02, 0.2))
    await manager.append_async(room, "user", "[Message ID: 1] before")
    aof_server.stop()
    manager.append(room, "user", "[Message ID: 2] while down")
    assert [m["content"] for m in manager.get_messages(room)][-1] == "[Message ID: 2] while down"
    await wait_for(lambda: manager.stats()["persist_failures"] >= 2, "failed persist attempts")
    # Reads keep serving memory while Redis is away; the explicit sync point raises.
    assert len(await manager.get_messages_async(room)) == 2
    assert manager.stats()["stale_reads"] >= 1
    aof_server.start()
    await manager.drain(timeout=20)
    rows = await client.lrange(window_key(room), 0, -1)
    assert [r.count(b"while down") for r in rows] == [0, 1]  # type: ignore[arg-type]
    assert manager.stats()["persist_retries"] >= 1
    await client.aclose()


async def test_ensure_fresh_raises_when_redis_is_unreachable(
    redis_server: RedisServer, make_manager: Make, room: str
) -> None:
    client = client_for(redis_server)
    manager = make_manager(client)
    await manager.append_async(room, "user", "hi")
    redis_server.stop()
    with pytest.raises(RedisUnavailable, match=room):
        await manager.ensure_fresh_from_redis(room)
    await client.aclose()


class _LoseFirstReplies:
    """Forwards to a real client, but the first ``n`` script calls time out AFTER running."""

    def __init__(self, client: aioredis.Redis, n: int) -> None:
        self._client = client
        self.remaining = n

    async def evalsha(self, *args: Any) -> Any:
        return self._lose(await self._client.evalsha(*args))

    async def fcall(self, *args: Any) -> Any:
        return self._lose(await self._client.fcall(*args))

    def _lose(self, result: Any) -> Any:
        if self.remaining > 0:
            self.remaining -= 1
            raise RedisTimeoutError("reply lost (injected)")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


async def test_retry_after_an_ambiguous_timeout_never_duplicates(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    lossy = _LoseFirstReplies(any_client, 0)
    manager = make_manager(lossy, retry_backoff=(0.01, 0.05))
    await manager.append_async(room, "user", "[Message ID: 0] warm")  # loads scripts
    lossy.remaining = 2
    await manager.append_async(room, "user", "[Message ID: 1] once")
    lossy.remaining = 1
    assert await manager.patch_reactions_async(room, 1, "👍")
    lossy.remaining = 1
    await manager.clear_async(room)
    await manager.append_async(room, "user", "[Message ID: 2] after clear")
    rows = await any_client.lrange(window_key(room), 0, -1)
    assert rows == [b'{"message_id":"2","role":"user","content":"[Message ID: 2] after clear"}']
    assert manager.stats()["persist_retries"] >= 4


async def test_idempotent_append_lands_once_after_lost_reply(
    any_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    lossy = _LoseFirstReplies(any_client, 0)
    manager = make_manager(lossy, retry_backoff=(0.01, 0.05))
    await manager.append_async(room, "user", "[Message ID: 0] warm")
    lossy.remaining = 3
    await manager.append_async(room, "user", "[Message ID: 1] once")
    rows = await any_client.lrange(window_key(room), 0, -1)
    assert len(rows) == 2
    assert [m["content"] for m in manager.get_messages(room)] == [
        "[Message ID: 0] warm",
        "[Message ID: 1] once",
    ]


async def test_durable_append_raises_and_retry_with_key_lands_once(
    aof_server: RedisServer, make_manager: Make, room: str
) -> None:
    client = client_for(aof_server)
    manager = make_manager(client, durable_timeout=0.5, retry_backoff=(0.02, 0.1))
    await manager.append_async(room, "user", "[Message ID: 1] stored")
    aof_server.stop()
    with pytest.raises(DurabilityError) as info:
        await manager.append_async(room, "user", "[Message ID: 2] important", durable=True)
    assert info.value.room_id == room
    # The turn left memory: it is neither served as if stored nor retried behind our back.
    assert [m["content"] for m in manager.get_messages(room)] == ["[Message ID: 1] stored"]
    assert manager.stats()["durable_failures"] == 1
    aof_server.start()
    key = info.value.idempotency_key
    await manager.append_async(
        room, "user", "[Message ID: 2] important", durable=True, idempotency_key=key
    )
    await manager.append_async(
        room, "user", "[Message ID: 2] important", durable=True, idempotency_key=key
    )
    rows = await client.lrange(window_key(room), 0, -1)
    assert [r.count(b"important") for r in rows] == [0, 1]  # type: ignore[arg-type]
    await client.aclose()


async def test_aclose_flushes_pending_writes(redis_server: RedisServer, room: str) -> None:
    client = client_for(redis_server)
    manager = ConversationManager(None, redis=client)
    for i in range(300):
        manager.append(room, "user", f"m{i}")
    await manager.aclose(timeout=20)
    assert await client.llen(window_key(room)) == 100
    await client.aclose()


async def test_pipelined_calls_reload_scripts_after_flush(
    redis_server: RedisServer, make_manager: Make
) -> None:
    client = client_for(redis_server)
    manager = make_manager(client)
    rooms = [f"pipelined:{i}" for i in range(30)]
    for name in rooms:
        await manager.append_async(name, "user", "warm")
    await client.script_flush()
    await client.function_flush()
    before = manager.stats()
    for name in rooms:  # one loop tick: one pipeline, every call answered NOSCRIPT
        manager.append(name, "user", "after flush")
    await manager.drain()
    after = manager.stats()
    assert after["script_reloads"] == before["script_reloads"] + 1
    assert after["round_trips"] - before["round_trips"] == 2  # the pipeline, then its resend
    for name in rooms:
        assert await client.lrange(window_key(name), 0, -1) == [
            b'{"message_id":null,"role":"user","content":"warm"}',
            b'{"message_id":null,"role":"user","content":"after flush"}',
        ]
    await client.aclose()


async def test_on_a_cluster_a_dead_node_fails_only_its_own_rooms_calls() -> None:
    """The calls of one tick go to several primaries at once; one primary being gone
    must not fail the calls that reached the others (they would be retried for
    nothing, and any awaited write there would wait for a dead node's backoff)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from conversation._redis.pipeliner import Pipeliner, _Call
    from conversation._redis.scripts import Script, ScriptSet
    from conversation._stats import Stats

    class TwoNodes:
        """Stands in for a RedisCluster whose node for key 'dead' is down."""

        async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
            if keys_and_args[0] == "dead":
                raise RedisConnectionError("Error 111 connecting to the dead node")
            return b"ok"

        async def fcall(self, function: str, numkeys: int, *keys_and_args: Any) -> Any:
            return await self.evalsha(function, numkeys, *keys_and_args)

        async def eval(self, script: str, numkeys: int) -> int:
            return 1

        async def initialize(self) -> None:
            return None

    pipeliner = Pipeliner(TwoNodes(), ScriptSet({}, "", ""), Stats(), 1.0)
    pipeliner._cluster = True
    script = Script("append", "", "0" * 40, "append_0")
    calls = [_Call(script, [key], [], None) for key in ("dead", "alive", "alive")]
    results = await pipeliner._results(calls)
    assert isinstance(results[0], RedisConnectionError)
    assert results[1:] == [b"ok", b"ok"]
    # Every node gone: the whole tick fails as one, and scripts are reloaded next time.
    with pytest.raises(RedisConnectionError):
        await pipeliner._results([_Call(script, ["dead"], [], None)])


@pytest.mark.parametrize("functions", ["1", "0"])
async def test_scripts_run_as_functions_or_by_sha_and_reload_after_a_flush(
    redis_server: RedisServer,
    make_manager: Make,
    room: str,
    functions: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the server has functions the scripts are one library, named by a hash of
    its code (two engine versions side by side each call their own); with
    CONVERSATION_FUNCTIONS=0 they go by EVALSHA. Either way a server that lost them
    (FUNCTION FLUSH, SCRIPT FLUSH: a restart without persistence) gets them again."""
    monkeypatch.setenv("CONVERSATION_FUNCTIONS", functions)
    client = client_for(redis_server)
    await client.config_resetstat()
    manager = make_manager(client)
    await manager.append_async(room, "user", "[Message ID: 1] one")
    await client.function_flush()
    await client.script_flush()
    await manager.append_async(room, "user", "[Message ID: 2] two")
    assert await manager.update_message_async(room, 1, "[Message ID: 1] edited")
    reader = make_manager(client)
    assert [m["content"] for m in await reader.get_messages_async(room)] == [
        "[Message ID: 1] edited",
        "[Message ID: 2] two",
    ]
    stats = await client.info("commandstats")
    # Each entry is a flat [b"library_name", name, ...] list.
    libraries = [entry[1] for entry in await client.function_list()]
    if functions == "1":
        assert manager._store is not None
        library = manager._store.scripts.library_name
        assert "cmdstat_fcall" in stats and "cmdstat_evalsha" not in stats
        assert [name.decode() for name in libraries] == [library]
        assert library.startswith("conversation_")
    else:
        assert "cmdstat_evalsha" in stats and "cmdstat_fcall" not in stats
        assert libraries == []
    await client.aclose()


async def test_a_user_allowed_evalsha_but_not_functions_still_writes(
    redis_server: RedisServer, make_manager: Make, room: str
) -> None:
    """An ACL written before Redis Functions (EVALSHA and SCRIPT allowed, FCALL and
    FUNCTION not, as ``-@scripting +evalsha +script`` gives) kept working before
    the scripts ran as functions: a refused FCALL means EVALSHA, not a failed write."""
    with redis_server.sync_client() as admin:
        admin.acl_setuser(
            "oldacl",
            enabled=True,
            passwords=["+pw"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-@scripting", "+evalsha", "+eval", "+script"],
        )
    client = aioredis.Redis(port=redis_server.port, username="oldacl", password="pw")
    try:
        manager = make_manager(client, retry_backoff=(0.01, 0.05))
        await manager.append_async(room, "user", "[Message ID: 1] one")
        assert await manager.update_message_async(room, 1, "[Message ID: 1] edited")
        reader = make_manager(client)
        messages = await reader.get_messages_async(room)
        assert [m["content"] for m in messages] == ["[Message ID: 1] edited"]
    finally:
        await client.aclose()
