"""The LangChain history where its users stand: plain sync programs, every field, long histories.

Tests are plain functions (no event loop in the test's thread) unless they
say otherwise. "Another worker" is another engine with its own client.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from redis_servers import RedisServer, free_port

from conversation import ConversationManager, DurabilityError, RedisUnavailable
from conversation.blocking import BlockingConversationManager
from conversation.integrations.langchain import DEFAULT_MAX_HISTORY, EngineChatMessageHistory

pytestmark = pytest.mark.real_server


@pytest.fixture
def other_worker(url: str) -> Iterator[BlockingConversationManager]:
    with BlockingConversationManager.from_url(url, max_history=DEFAULT_MAX_HISTORY) as engine:
        yield engine


RICH: list[BaseMessage] = [
    SystemMessage("rules", additional_kwargs={"__openai_role__": "developer"}, id="s-1"),
    HumanMessage(
        [
            {"type": "text", "text": "[Message ID: 1] what is this?"},
            {"type": "image", "source_type": "base64", "data": "AAAA", "mime_type": "image/png"},
        ],
        name="ann",
        id="h-1",
        additional_kwargs={"client": {"ip_hash": "ab12"}},
    ),
    AIMessage(
        "",
        id="run-42",
        tool_calls=[
            {"name": "look", "args": {"q": "Oslo", "n": 2}, "id": "c1", "type": "tool_call"}
        ],
        invalid_tool_calls=[
            {
                "name": "oops",
                "args": "{bad",
                "id": "c2",
                "error": "not JSON",
                "type": "invalid_tool_call",
            }
        ],
        usage_metadata={"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
        response_metadata={"model_name": "m-1", "finish_reason": "tool_calls"},
        additional_kwargs={"refusal": None},
    ),
    ToolMessage("sunny", tool_call_id="c1", artifact={"raw": [1, 2]}, status="success", id="t-1"),
    AIMessage("Sunny in Oslo. 🌞", response_metadata={"logprobs": None}, name="bot"),
]


def test_every_field_langchain_round_trips_comes_back_equal(
    url: str, other_worker: BlockingConversationManager
) -> None:
    writer = EngineChatMessageHistory.from_url(url, "rich")
    writer.add_messages(RICH)
    reader = EngineChatMessageHistory(other_worker, "rich")
    assert reader.messages == RICH
    assert asyncio.run(reader.aget_messages()) == RICH
    # The bot's own reads (what it sends a model) hold OpenAI chat fields only.
    entries = other_worker.get_messages("rich")
    assert {key for entry in entries for key in entry} <= {
        "role", "content", "name", "tool_calls", "tool_call_id",
    }  # fmt: skip
    assert entries[1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,AAAA"},
    }
    assert entries[0] == {"role": "system", "content": "rules"}


def test_a_platform_edit_reaches_the_message_and_keeps_its_fields(
    url: str, other_worker: BlockingConversationManager
) -> None:
    history = EngineChatMessageHistory.from_url(url, "edited")
    history.add_messages([HumanMessage("[Message ID: 5] hi", id="h-5", name="ann"), RICH[1]])
    assert other_worker.update_message("edited", 5, "[Message ID: 5] hello")
    assert other_worker.update_message("edited", 1, "[Message ID: 1] this?")
    first, second = history.messages
    assert first == HumanMessage("[Message ID: 5] hello", id="h-5", name="ann")
    # Content blocks were replaced by the edit: the chat form of the new content.
    assert second.content == [
        {"type": "text", "text": "[Message ID: 1] this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    assert (second.id, second.additional_kwargs) == ("h-1", {"client": {"ip_hash": "ab12"}})


def test_a_thousand_messages_read_back_as_a_thousand(url: str) -> None:
    history = EngineChatMessageHistory.from_url(url, "long")
    turns = [HumanMessage(f"turn {n}") if n % 2 else AIMessage(f"turn {n}") for n in range(1000)]
    history.add_messages(turns[:500])
    for message in turns[500:]:
        history.add_message(message)
    assert history.messages == turns


def test_sync_reads_catch_up_with_another_worker(
    url: str, other_worker: BlockingConversationManager
) -> None:
    mine = EngineChatMessageHistory.from_url(url, "shared")
    theirs = EngineChatMessageHistory(other_worker, "shared")
    mine.add_user_message("one")
    assert theirs.messages == [HumanMessage("one")]
    theirs.add_ai_message("two")
    assert mine.messages == [HumanMessage("one"), AIMessage("two")]
    theirs.clear()
    assert mine.messages == []


def test_an_unreachable_redis_raises_on_the_sync_path() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    history = EngineChatMessageHistory.from_url(
        url, "down", durable_timeout=0.3, retry_backoff=(0.01, 0.05), command_timeout=1.0
    )
    with pytest.raises(DurabilityError):
        history.add_message(HumanMessage("lost?"))
    with pytest.raises(RedisUnavailable):
        _ = history.messages
    with pytest.raises(DurabilityError):
        history.clear()


def test_over_an_async_manager_in_a_program_with_no_loop(redis_server: RedisServer) -> None:
    """The bot's own async manager, used from plain sync code: each call runs a loop of
    its own and the manager moves to it (SPEC §26)."""
    client = aioredis.Redis(port=redis_server.port)
    manager = ConversationManager(None, redis=client)
    history = EngineChatMessageHistory(manager, "async-made")
    history.add_messages(RICH[:2])
    history.add_message(AIMessage("three"))
    assert history.messages == [*RICH[:2], AIMessage("three")]
    history.clear()
    assert history.messages == []

    async def close() -> None:
        await manager.aclose()
        await client.aclose()

    asyncio.run(close())


def test_a_sync_call_the_managers_blocked_loop_never_takes_raises_instead_of_hanging(
    redis_server: RedisServer,
) -> None:
    """The manager's loop runs in another thread but is stuck (here: waiting for
    this very call, a deadlock a sync chain called from that loop's code makes):
    the sync member gives up after ``sync_timeout`` with an error saying so."""
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    release = threading.Event()

    client = aioredis.Redis(port=redis_server.port)

    async def build() -> ConversationManager:
        built = ConversationManager(None, redis=client, sync_timeout=0.5)
        await built.get_messages_async("stuck-loop")  # the manager is this loop's now
        return built

    manager = asyncio.run_coroutine_threadsafe(build(), loop).result(10)
    history = EngineChatMessageHistory(manager, "stuck-loop")

    async def stuck() -> None:
        release.wait()  # blocks the loop itself, as sync code on it would

    asyncio.run_coroutine_threadsafe(stuck(), loop)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            history.messages  # noqa: B018
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(10)  # far beyond sync_timeout: still waiting means it would wait for ever
    hung = reader.is_alive()
    release.set()
    reader.join(10)
    try:
        assert not hung, "the sync read waited on a loop that could not take it"
        assert isinstance(outcome[0], TimeoutError), outcome
        assert "sync_timeout" in str(outcome[0])
        history.add_messages([HumanMessage("after the loop is free again")])
        assert [m.content for m in history.messages] == ["after the loop is free again"]
    finally:

        async def close() -> None:
            await manager.aclose()
            await client.aclose()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


CHAIN_SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("ignore")
    from langchain_core.messages import AIMessage
    from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
    from langchain_core.runnables import RunnableLambda
    from langchain_core.runnables.history import RunnableWithMessageHistory
    from conversation.integrations.langchain import EngineChatMessageHistory

    url, question = sys.argv[1], sys.argv[2]
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Be terse."), MessagesPlaceholder("history"), ("human", "{question}")]
    )

    def model(value):
        said = [m.content for m in value.to_messages() if m.type == "human"]
        return AIMessage("you said: " + " | ".join(said))

    chain = RunnableWithMessageHistory(
        prompt | RunnableLambda(model),
        lambda session_id: EngineChatMessageHistory.from_url(url, session_id),
        input_messages_key="question",
        history_messages_key="history",
    )
    reply = chain.invoke({"question": question}, {"configurable": {"session_id": "chat-1"}})
    print(reply.content)
    """
)


def test_a_chain_run_twice_as_a_plain_script_remembers_the_first_run(
    url: str, tmp_path: Path
) -> None:
    script = tmp_path / "chain.py"
    script.write_text(CHAIN_SCRIPT, encoding="utf-8")

    def run(question: str) -> str:
        done = subprocess.run(
            [sys.executable, str(script), url, question],
            capture_output=True,
            text=True,
            timeout=90,
            check=True,
        )
        return done.stdout.strip()

    assert run("my name is Ada") == "you said: my name is Ada"
    assert run("what is my name?") == "you said: my name is Ada | what is my name?"
