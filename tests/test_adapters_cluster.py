"""The ADK and LlamaIndex adapters on a real local Redis Cluster (SPEC §25): every
script's keys share one slot, and two workers share sessions through it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cluster_servers import LocalCluster
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from llama_index.core.llms import ChatMessage
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from support import running_cluster

from conversation._redis.sessions import SessionKeySpace
from conversation.integrations.adk import EngineSessionService, _app, _owner
from conversation.integrations.llama_index import EngineChatStore

pytestmark = pytest.mark.real_server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    yield from running_cluster(tmp_path_factory, primaries=3, replicas_per_primary=0)


def _client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes])


@pytest.fixture
async def services(cluster: LocalCluster) -> AsyncIterator[list[EngineSessionService]]:
    clients = [_client(cluster) for _ in range(2)]
    try:
        yield [EngineSessionService(c) for c in clients]
    finally:
        for client in clients:
            await client.aclose()


def test_each_scripts_keys_share_one_slot_and_spread(cluster: LocalCluster) -> None:
    keys = SessionKeySpace("sg", "adk")
    owners = set()
    for i in range(12):
        session = keys.session(_owner(f"app{i}", f"user:{i}"), f"s{i}").as_list()
        group = [keys.group_state(_app(f"app{i}")), keys.group_members(_app(f"app{i}"))]
        for script_keys in (session, group):
            slots = {key_slot(k.encode()) for k in script_keys}
            assert len(slots) == 1
            owners.add(cluster.slot_owner(slots.pop()).port)
    assert len(owners) == 3


async def test_adk_sessions_shared_through_the_cluster(
    services: list[EngineSessionService],
) -> None:
    one, two = services
    for i in range(6):
        s = await one.create_session(
            app_name="bot", user_id=f"u{i}", session_id="chat", state={"user:n": i}
        )
        await one.append_event(
            s, Event(author="user", actions=EventActions(state_delta={"app:seen": i, "k": i}))
        )
    listed = await two.list_sessions(app_name="bot")
    assert sorted(s.user_id for s in listed.sessions) == [f"u{i}" for i in range(6)]
    got = await two.get_session(app_name="bot", user_id="u3", session_id="chat")
    assert got is not None
    assert got.state == {"k": 3, "user:n": 3, "app:seen": 5}
    assert len(got.events) == 1


def test_llama_index_store_on_the_cluster(cluster: LocalCluster) -> None:
    def factory() -> Any:
        return _client(cluster)

    with EngineChatStore(factory) as one, EngineChatStore(factory) as two:
        one.set_messages("a", [ChatMessage(content="1"), ChatMessage(content="3")])
        two.add_message("a", ChatMessage(content="2"), idx=1)
        assert [m.content for m in one.get_messages("a")] == ["1", "2", "3"]
        assert two.delete_last_message("a") == ChatMessage(content="3")
        assert one.get_keys() == ["a"]
