"""The LlamaIndex adapter on private real Redis servers: histories shared by
workers, atomic positional changes, full messages, hostile keys, sync/async and
threads, and two processes sharing a key.

LlamaIndex's own chat-store tests run against it too (scripts/peer_tests.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import ChatMemoryBuffer
from multiproc import run_in_processes
from redis_servers import RedisServer

from conversation import InvalidSessionId
from conversation.integrations.llama_index import EngineChatStore

pytestmark = pytest.mark.real_server


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    with redis.Redis(port=redis_server.port) as admin:
        admin.script_flush()
    return f"redis://127.0.0.1:{redis_server.port}/0"


@pytest.fixture
def workers(url: str) -> Iterator[tuple[EngineChatStore, EngineChatStore]]:
    """Two stores with their own connections and loop threads: two workers."""
    one, two = EngineChatStore.from_url(url), EngineChatStore.from_url(url)
    try:
        yield one, two
    finally:
        one.close()
        two.close()


def _texts(messages: list[ChatMessage]) -> list[str | None]:
    return [m.content for m in messages]


def test_workers_share_histories_and_keys(workers: tuple[EngineChatStore, EngineChatStore]) -> None:
    one, two = workers
    one.add_message("ann", ChatMessage(role="user", content="hi"))
    two.add_message("ann", ChatMessage(role="assistant", content="hello"))
    two.add_message("bob", ChatMessage(role="user", content="yo"))
    one.add_message("ann", ChatMessage(role="user", content="first"), idx=0)
    assert _texts(two.get_messages("ann")) == ["first", "hi", "hello"]
    assert one.get_keys() == ["ann", "bob"]
    assert _texts(one.delete_messages("ann") or []) == ["first", "hi", "hello"]
    assert two.get_keys() == ["bob"]
    assert two.get_messages("ann") == []
    assert one.delete_messages("ann") is None


def test_concurrent_pops_and_adds_are_atomic(
    workers: tuple[EngineChatStore, EngineChatStore],
) -> None:
    """Twenty pops from two workers and four threads: each message removed once."""
    one, two = workers
    one.set_messages("k", [ChatMessage(role="user", content=f"m{i}") for i in range(20)])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        popped = list(pool.map(lambda i: (one, two)[i % 2].delete_last_message("k"), range(24)))
        list(
            pool.map(
                lambda i: (one, two)[i % 2].add_message("j", ChatMessage(content=f"{i}")), range(30)
            )
        )
    texts = sorted(m.content for m in popped if m is not None)  # type: ignore[type-var]
    assert texts == sorted(f"m{i}" for i in range(20))
    assert popped.count(None) == 4
    assert sorted(_texts(two.get_messages("j"))) == sorted(str(i) for i in range(30))  # type: ignore[type-var]


def test_whole_messages_round_trip(workers: tuple[EngineChatStore, EngineChatStore]) -> None:
    one, two = workers
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="developer", content="dev"),
        ChatMessage(
            role="user",
            blocks=[TextBlock(text="look 👀"), ImageBlock(url="https://example.com/a.png")],
        ),
        ChatMessage(
            role="assistant",
            content="",
            additional_kwargs={"tool_calls": [{"id": "c1", "function": {"name": "f"}}]},
        ),
        ChatMessage(role="tool", content="42", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(role="chatbot", content="legacy role"),
    ]
    one.set_messages("full", messages)
    assert two.get_messages("full") == messages
    assert two.delete_message("full", -2) == messages[-2]
    assert two.delete_message("full", 99) is None
    assert one.get_messages("full") == messages[:-2] + messages[-1:]


def test_hostile_keys_are_refused_and_store_nothing(
    workers: tuple[EngineChatStore, EngineChatStore], redis_server: RedisServer
) -> None:
    one, _ = workers
    for key in ["{tag}", "a}b", "line\nbreak", "x" * 300, "", "nul\x00"]:
        with pytest.raises(InvalidSessionId):
            one.add_message(key, ChatMessage(content="never"))
    with pytest.raises(TypeError):
        one.set_messages("k", [{"role": "user", "content": "a dict"}])  # type: ignore[list-item]
    with redis.Redis(port=redis_server.port) as admin:
        assert admin.dbsize() == 0
    one.add_message("😀 a:b:c", ChatMessage(content="ok"))
    assert one.get_keys() == ["😀 a:b:c"]
    with pytest.raises(InvalidSessionId):
        EngineChatStore(namespace="{x}")


async def test_async_methods_on_the_callers_loop(
    workers: tuple[EngineChatStore, EngineChatStore],
) -> None:
    one, two = workers
    await one.aset_messages("a", [ChatMessage(content="1")])
    await asyncio.gather(
        *(two.async_add_message("a", ChatMessage(content=f"{i}")) for i in range(5))
    )
    assert len(await one.aget_messages("a")) == 6
    assert (await two.adelete_last_message("a")) is not None
    assert (await one.adelete_message("a", 0)).content == "1"  # type: ignore[union-attr]
    assert await two.aget_keys() == ["a"]
    assert len(await one.adelete_messages("a") or []) == 4
    # The sync API from a thread while this loop runs.
    await asyncio.to_thread(one.add_message, "b", ChatMessage(content="from a thread"))
    assert _texts(await two.aget_messages("b")) == ["from a thread"]


def test_chat_memory_buffer_remembers_across_workers(
    workers: tuple[EngineChatStore, EngineChatStore],
) -> None:
    one, two = workers
    first = ChatMemoryBuffer.from_defaults(chat_store=one, chat_store_key="discord:42")
    first.put(ChatMessage(role="user", content="my name is Ann"))
    second = ChatMemoryBuffer.from_defaults(chat_store=two, chat_store_key="discord:42")
    assert _texts(second.get()) == ["my name is Ann"]


def _process_adds(index: int, barrier: Any, url: str) -> int:
    store = EngineChatStore.from_url(url)
    try:
        barrier.wait()
        for i in range(20):
            store.add_message("shared", ChatMessage(content=f"p{index}-{i}"))
        return len(store.get_messages("shared"))
    finally:
        store.close()


def test_two_processes_share_one_key(url: str) -> None:
    run_in_processes(_process_adds, [(url,), (url,)])
    with EngineChatStore.from_url(url) as store:
        texts = _texts(store.get_messages("shared"))
    assert len(texts) == 40
    for p in (0, 1):
        assert [t for t in texts if t and t.startswith(f"p{p}-")] == [
            f"p{p}-{i}" for i in range(20)
        ]
