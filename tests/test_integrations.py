"""SPEC §5.24: the LangChain history and the Agents SDK session, on the real packages.

Every test runs on a private real redis-server. "Two workers" are two managers
with their own Redis connections, as two worker processes would have.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from agents import (
    Agent,
    AgentOutputSchemaBase,
    Handoff,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    RunConfig,
    Runner,
    SessionSettings,
    Tool,
    TResponseInputItem,
    Usage,
    function_tool,
)
from agents.memory import Session
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompt_values import PromptValue
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.history import RunnableWithMessageHistory
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseReasoningItem,
)
from openai.types.responses.response_reasoning_item import Summary
from redis_servers import RedisServer

from conversation import (
    ConfigurationError,
    ConversationManager,
    InvalidMessage,
    InvalidRoomId,
    PromptRenderer,
)
from conversation.integrations.langchain import EngineChatMessageHistory
from conversation.integrations.openai_agents import ITEM_PART, POP_PART, EngineSession

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]


@pytest.fixture
async def other_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A second connection to the same server: the second worker's."""
    client = aioredis.Redis(port=redis_server.port, socket_timeout=5)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def workers(
    redis_client: aioredis.Redis, other_client: aioredis.Redis, make_manager: Make
) -> tuple[ConversationManager, ConversationManager]:
    return make_manager(redis_client), make_manager(other_client)


# ---------------------------------------------------------------- LangChain

CONVERSATION: list[BaseMessage] = [
    SystemMessage("You are terse."),
    HumanMessage("[Message ID: 1] weather in Oslo?", name="ann"),
    HumanMessage(
        [
            {"type": "text", "text": "[Message ID: 2] and this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]
    ),
    AIMessage(
        "",
        tool_calls=[
            {
                "name": "weather",
                "args": {"city": "Oslo", "days": 2},
                "id": "c1",
                "type": "tool_call",
            }
        ],
    ),
    ToolMessage("sunny, 21°C", tool_call_id="c1"),
    AIMessage("Sunny in Oslo."),
]


async def test_langchain_history_round_trips_across_workers(
    workers: tuple[ConversationManager, ConversationManager], room: str
) -> None:
    first, second = workers
    writer = EngineChatMessageHistory(first, room)
    assert isinstance(writer, BaseChatMessageHistory)
    await writer.aadd_messages(CONVERSATION)

    reader = EngineChatMessageHistory(second, room)
    assert await reader.aget_messages() == CONVERSATION
    assert reader.messages == CONVERSATION  # the catch-up filled the worker's memory

    # The room stays an ordinary chat room: what the bot's own manager reads.
    entries = await second.get_messages_async(room)
    assert entries[3] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "id": "c1",
                "function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 2}'},
            }
        ],
    }
    assert entries[4] == {"role": "tool", "content": "sunny, 21°C", "tool_call_id": "c1"}
    # The engine's identity came from the marker: platform edits reach LangChain's view.
    assert await second.update_message_async(room, "1", "[Message ID: 1] weather in Bergen?")
    assert (await writer.aget_messages())[1] == HumanMessage(
        "[Message ID: 1] weather in Bergen?", name="ann"
    )


async def test_langchain_sync_forms_use_memory_and_persist_in_background(
    workers: tuple[ConversationManager, ConversationManager], room: str
) -> None:
    first, second = workers
    history = EngineChatMessageHistory(first, room)
    history.add_messages(CONVERSATION[1:3])
    history.add_message(AIMessage("hello"))
    assert history.messages == [*CONVERSATION[1:3], AIMessage("hello")]  # at once, from memory
    await first.drain()
    other = EngineChatMessageHistory(second, room)
    assert await other.aget_messages() == history.messages

    history.clear()
    assert history.messages == []
    await first.drain()
    assert await other.aget_messages() == []


async def test_langchain_sync_forms_from_a_thread_reach_redis(
    workers: tuple[ConversationManager, ConversationManager], room: str
) -> None:
    first, second = workers
    history = EngineChatMessageHistory(first, room)
    # The manager learns its loop from any async call made on it.
    assert await history.aget_messages() == []
    # A thread without an event loop: the engine hands each write to the manager's loop.
    await asyncio.to_thread(history.add_messages, CONVERSATION)
    await first.drain()
    assert await EngineChatMessageHistory(second, room).aget_messages() == CONVERSATION


async def test_langchain_aclear_clears_for_every_worker(
    workers: tuple[ConversationManager, ConversationManager], room: str
) -> None:
    first, second = workers
    await EngineChatMessageHistory(first, room).aadd_messages(CONVERSATION)
    other = EngineChatMessageHistory(second, room)
    assert len(await other.aget_messages()) == len(CONVERSATION)
    await other.aclear()
    assert await EngineChatMessageHistory(first, room).aget_messages() == []


def _echo_model(prompt: PromptValue) -> AIMessage:
    """A deterministic chat model: says how many messages it was given, and the last one."""
    messages = prompt.to_messages()
    return AIMessage(f"{len(messages)} messages; last: {messages[-1].content}")


@pytest.mark.filterwarnings(
    "ignore:RunnableWithMessageHistory is deprecated:"
    "langchain_core._api.deprecation.LangChainDeprecationWarning"
)
async def test_langchain_runnable_with_message_history_across_workers(
    workers: tuple[ConversationManager, ConversationManager], room: str
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are terse."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    chain = prompt | RunnableLambda(_echo_model)

    def with_history(manager: ConversationManager) -> RunnableWithMessageHistory:
        return RunnableWithMessageHistory(
            chain,
            lambda session_id: EngineChatMessageHistory(manager, session_id),
            input_messages_key="question",
            history_messages_key="history",
        )

    first, second = (with_history(manager) for manager in workers)
    config: Any = {"configurable": {"session_id": room}}
    reply = await first.ainvoke({"question": "hi"}, config)
    assert reply.content == "2 messages; last: hi"
    # The next turn lands on the other worker, which catches up before answering.
    reply = await second.ainvoke({"question": "again"}, config)
    assert reply.content == "4 messages; last: again"
    # Sync invoke from a worker thread: reads this worker's memory, writes via its loop.
    reply = await asyncio.to_thread(second.invoke, {"question": "third"}, config)
    assert reply.content == "6 messages; last: third"
    await workers[1].drain()

    history = await EngineChatMessageHistory(workers[0], room).aget_messages()
    assert [(type(m), m.content) for m in history] == [
        (HumanMessage, "hi"),
        (AIMessage, "2 messages; last: hi"),
        (HumanMessage, "again"),
        (AIMessage, "4 messages; last: again"),
        (HumanMessage, "third"),
        (AIMessage, "6 messages; last: third"),
    ]


async def test_langchain_refuses_what_it_cannot_store(
    redis_client: aioredis.Redis, make_manager: Make, room: str
) -> None:
    manager = make_manager(redis_client)
    history = EngineChatMessageHistory(manager, room)
    with pytest.raises(InvalidMessage, match="function"):
        await history.aadd_messages([HumanMessage("kept?"), FunctionMessage(content="x", name="f")])
    assert await history.aget_messages() == []  # converted first, nothing written
    developer = SystemMessage("rules", additional_kwargs={"__openai_role__": "developer"})
    await history.aadd_messages([developer])
    assert await history.aget_messages() == [developer]  # reads back as it was added
    assert await manager.get_messages_async(room) == [{"role": "system", "content": "rules"}]


async def test_integrations_need_a_manager_without_prompt_renderer(
    redis_client: aioredis.Redis, room: str
) -> None:
    manager = ConversationManager(PromptRenderer("inference"), redis=redis_client)
    try:
        with pytest.raises(ConfigurationError, match="prompt_renderer=None"):
            EngineChatMessageHistory(manager, room)
        with pytest.raises(ConfigurationError, match="prompt_renderer=None"):
            EngineSession(manager, room)
    finally:
        await manager.aclose(timeout=10)


async def test_integrations_validate_room_ids(make_manager: Make) -> None:
    manager = make_manager()
    with pytest.raises(InvalidRoomId):
        EngineChatMessageHistory(manager, "bad{room}")
    with pytest.raises(InvalidRoomId):
        EngineSession(manager, "bad\nsession")


# ------------------------------------------------------------ OpenAI Agents

ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "[Message ID: 7] weather in Oslo?"},
    {"role": "developer", "content": "Answer in one line."},
    {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "and this picture?"},
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "auto"},
        ],
    },
    {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "Look it up."}],
        "encrypted_content": "gAAAA==",
    },
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "weather",
        "arguments": '{"city": "Oslo"}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21.5°C"},
    {
        "type": "custom_tool_call",
        "call_id": "call_2",
        "name": "grammar",
        "input": "SELECT 1",
    },
    {"type": "custom_tool_call_output", "call_id": "call_2", "output": "1"},
    {
        "type": "mcp_approval_response",
        "approval_request_id": "mcpr_1",
        "approve": True,
        "reason": None,
    },
    {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "status": "completed",
        "content": [
            {
                "type": "output_text",
                "text": "Sunny, 21.5 °C.",
                "annotations": [],
                "logprobs": [{"token": "S", "logprob": -0.125, "bytes": [83], "top_logprobs": []}],
            }
        ],
    },
    {"role": "assistant", "content": "Anything else?"},
]


def as_items(raw: list[dict[str, Any]]) -> list[TResponseInputItem]:
    """Test data as the SDK's input-item type (a TypedDict union), as fresh copies."""
    return cast("list[TResponseInputItem]", copy.deepcopy(raw))


async def test_agents_session_round_trips_every_item_type_across_workers(
    workers: tuple[ConversationManager, ConversationManager],
) -> None:
    first, second = workers
    writer = EngineSession(first, "s-1")
    assert isinstance(writer, Session)
    await writer.add_items(as_items(ITEMS))

    reader = EngineSession(second, "s-1")
    assert await reader.get_items() == ITEMS
    assert await reader.get_items(limit=2) == ITEMS[-2:]
    assert await reader.get_items(limit=0) == []

    # How they are stored: plain chat messages as chat entries, the rest whole.
    entries = await second.get_messages_async("agents:s-1")
    assert entries[0] == ITEMS[0]
    assert entries[-1] == ITEMS[-1]
    assert entries[4] == {"role": "assistant", "content": [{"type": ITEM_PART, "item": ITEMS[4]}]}
    roles = [entry["role"] for entry in entries]
    assert roles == [
        "user", "system", "user", "assistant", "assistant", "tool",
        "assistant", "tool", "user", "assistant", "assistant",
    ]  # fmt: skip


async def test_agents_session_settings_limit(
    make_manager: Make, redis_client: aioredis.Redis
) -> None:
    session = EngineSession(
        make_manager(redis_client), "s-2", session_settings=SessionSettings(limit=3)
    )
    await session.add_items(as_items(ITEMS))
    assert await session.get_items() == ITEMS[-3:]
    assert await session.get_items(limit=5) == ITEMS[-5:]


async def test_agents_pop_item_removes_the_latest_for_every_worker(
    workers: tuple[ConversationManager, ConversationManager],
) -> None:
    first, second = workers
    mine, theirs = EngineSession(first, "s-3"), EngineSession(second, "s-3")
    assert await mine.pop_item() is None  # empty: nothing appended for it
    assert await first.get_messages_async("agents:s-3") == []

    await mine.add_items(as_items(ITEMS[:6]))
    assert await theirs.pop_item() == ITEMS[5]
    marker = (await first.get_messages_async("agents:s-3"))[-1]
    assert marker["role"] == "tool"
    assert [part["type"] for part in marker["content"]] == [POP_PART]
    assert await mine.pop_item() == ITEMS[4]
    assert await theirs.get_items() == ITEMS[:4]
    await theirs.add_items(as_items([ITEMS[9]]))
    assert await mine.get_items() == [*ITEMS[:4], ITEMS[9]]
    assert await mine.pop_item() == ITEMS[9]
    for expected in reversed(ITEMS[:4]):
        assert await theirs.pop_item() == expected
    assert await mine.pop_item() is None
    assert await mine.get_items() == []


async def test_agents_concurrent_pops_each_remove_a_different_item(
    workers: tuple[ConversationManager, ConversationManager],
) -> None:
    first, second = workers
    items = [{"role": "user", "content": f"item {i}"} for i in range(20)]
    await EngineSession(first, "s-4").add_items(as_items(items))
    sessions = [EngineSession(manager, "s-4") for manager in (first, second) for _ in range(3)]
    popped = await asyncio.gather(*(s.pop_item() for s in sessions for _ in range(2)))
    # Twelve linearised pops: exactly the last twelve items, each popped once.
    contents = [cast("dict[str, Any]", item)["content"] for item in popped]
    assert sorted(contents) == sorted(item["content"] for item in items[8:])
    for manager in workers:
        assert await EngineSession(manager, "s-4").get_items() == items[:8]


async def test_agents_trimming_keeps_the_replay_right(
    redis_client: aioredis.Redis, make_manager: Make
) -> None:
    session = EngineSession(make_manager(redis_client, max_history=4), "s-5")
    other = EngineSession(make_manager(redis_client, max_history=4), "s-5")
    item = [{"role": "user", "content": f"i{n}"} for n in range(7)]
    await session.add_items(as_items(item[1:4]))
    assert await session.pop_item() == item[3]  # window: i1 i2 i3 POP
    await session.add_items(as_items([item[4]]))  # i2 i3 POP i4
    assert await other.get_items() == [item[2], item[4]]
    await session.add_items(as_items([item[5]]))  # i3 POP i4 i5
    assert await other.get_items() == [item[4], item[5]]
    # i3 falls off; the marker left at the front (role tool) is swept with it.
    await session.add_items(as_items([item[6]]))
    assert await other.get_items() == [item[4], item[5], item[6]]
    assert other.manager.get_history_message_count("agents:s-5") == 3


async def test_agents_clear_session_for_every_worker(
    workers: tuple[ConversationManager, ConversationManager],
) -> None:
    first, second = workers
    await EngineSession(first, "s-6").add_items(as_items(ITEMS))
    other = EngineSession(second, "s-6", room_id="custom:s-6")
    assert await other.get_items() == []  # another room
    await EngineSession(second, "s-6").clear_session()
    assert await EngineSession(first, "s-6").get_items() == []
    assert await EngineSession(first, "s-6").pop_item() is None


async def test_agents_add_items_checks_every_item_before_writing(
    redis_client: aioredis.Redis, make_manager: Make
) -> None:
    session = EngineSession(make_manager(redis_client), "s-7")
    with pytest.raises(InvalidMessage, match="JSON"):
        await session.add_items(as_items([ITEMS[0], {"type": "x", "output": {1, 2}}]))
    with pytest.raises(InvalidMessage, match="dict"):
        await session.add_items([*as_items(ITEMS[:1]), cast("TResponseInputItem", "not an item")])
    assert await session.get_items() == []


class ScriptedModel(Model):
    """A deterministic model: replays scripted outputs and records what it was sent."""

    def __init__(self, outputs: list[list[Any]]) -> None:
        self.outputs = outputs
        self.inputs: list[list[TResponseInputItem]] = []

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        *,
        previous_response_id: str | None,
        conversation_id: str | None,
        prompt: Any,
    ) -> ModelResponse:
        assert isinstance(input, list)
        self.inputs.append(copy.deepcopy(input))
        return ModelResponse(output=self.outputs.pop(0), usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


@function_tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def _text(id_: str, text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=id_,
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


async def test_agents_runner_keeps_its_history_in_the_engine(
    workers: tuple[ConversationManager, ConversationManager],
) -> None:
    model = ScriptedModel(
        [
            [
                ResponseReasoningItem(
                    id="rs_1", type="reasoning", summary=[Summary(type="summary_text", text="t")]
                ),
                ResponseFunctionToolCall(
                    id="fc_1",
                    call_id="call_1",
                    type="function_call",
                    name="weather",
                    arguments='{"city": "Oslo"}',
                    status="completed",
                ),
            ],
            [_text("msg_1", "Sunny in Oslo.")],
            [_text("msg_2", "You're welcome.")],
        ]
    )
    agent = Agent(name="weather bot", instructions="Be terse.", model=model, tools=[weather])
    run_config = RunConfig(tracing_disabled=True)
    first, second = (EngineSession(manager, "run-1") for manager in workers)

    result = await Runner.run(agent, "Weather in Oslo?", session=first, run_config=run_config)
    assert result.final_output == "Sunny in Oslo."
    # The second turn runs on the other worker and sends the whole history to the model.
    result = await Runner.run(agent, "Thanks!", session=second, run_config=run_config)
    assert result.final_output == "You're welcome."

    sent = cast("list[dict[str, Any]]", model.inputs[-1])
    kinds = [item.get("type", "message") for item in sent]
    assert kinds == [
        "message", "reasoning", "function_call", "function_call_output", "message", "message",
    ]  # fmt: skip
    assert sent[2]["call_id"] == "call_1"
    assert sent[3]["output"] == "sunny in Oslo"
    stored = cast("list[dict[str, Any]]", await first.get_items())
    assert [item.get("type", "message") for item in stored] == [*kinds, "message"]
    assert stored[-1]["content"][0]["text"] == "You're welcome."


async def test_both_adapters_work_on_a_memory_only_manager(make_manager: Make, room: str) -> None:
    manager = make_manager()  # redis=None: one process, nothing to sync
    history = EngineChatMessageHistory(manager, room)
    await history.aadd_messages(CONVERSATION)
    assert history.messages == CONVERSATION
    session = EngineSession(manager, "s-8")
    await session.add_items(as_items(ITEMS))
    assert await session.pop_item() == ITEMS[-1]
    assert await session.get_items() == ITEMS[:-1]
    await session.clear_session()
    assert await session.pop_item() is None
