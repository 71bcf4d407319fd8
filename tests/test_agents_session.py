"""The Agents SDK session where its users stand: a loop per call, run_sync, several workers.

Tests are plain functions: no event loop runs in the test's thread, as in a
script that calls ``asyncio.run`` or ``Runner.run_sync``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
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
)
from multiproc import run_in_processes
from openai.types.responses import ResponseOutputMessage, ResponseOutputText
from redis_servers import RedisServer

from conversation import ConversationManager
from conversation.integrations.openai_agents import EngineSession

pytestmark = pytest.mark.real_server

RUN = RunConfig(tracing_disabled=True)


class CountingModel(Model):
    """Answers with how many user turns it was sent: what the session remembered."""

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
        users = [cast("dict[str, Any]", item) for item in input]
        said = [item["content"] for item in users if item.get("role") == "user"]
        text = ResponseOutputText(type="output_text", text=" | ".join(said), annotations=[])
        message = ResponseOutputMessage(
            id="msg", type="message", role="assistant", status="completed", content=[text]
        )
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


AGENT = Agent(name="echo", instructions="Repeat.", model=CountingModel())

THREE_RUNS = textwrap.dedent(
    """
    import asyncio, sys
    from agents import RunConfig, Runner
    from test_agents_session import AGENT
    from conversation.integrations.openai_agents import EngineSession

    session = EngineSession.from_url(sys.argv[1], "three-runs")
    config = RunConfig(tracing_disabled=True)
    for question in ("one", "two", "three"):
        result = asyncio.run(Runner.run(AGENT, question, session=session, run_config=config))
        print(result.final_output)
    """
)


def test_a_script_calling_asyncio_run_three_times_with_one_session(url: str) -> None:
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-c", THREE_RUNS, url],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
        env={"PYTHONPATH": str(tests), "PATH": ""},
    )
    assert done.stdout.splitlines() == ["one", "one | two", "one | two | three"]


def test_over_the_bots_own_manager_asyncio_run_per_call_works(
    redis_server: RedisServer,
) -> None:
    client = aioredis.Redis(port=redis_server.port)
    session = EngineSession(ConversationManager(None, redis=client), "per-call")
    outputs = [
        asyncio.run(Runner.run(AGENT, q, session=session, run_config=RUN)).final_output
        for q in ("a", "b", "c")
    ]
    assert outputs == ["a", "a | b", "a | b | c"]

    async def close() -> None:
        await cast("ConversationManager", session.manager).aclose()
        await client.aclose()

    asyncio.run(close())


def test_run_sync_from_several_threads_and_the_main_thread(url: str) -> None:
    session = EngineSession.from_url(url, "run-sync")
    outputs: list[str] = []
    failures: list[BaseException] = []
    left_open: list[asyncio.AbstractEventLoop] = []

    def turn(question: str) -> None:
        try:
            result = Runner.run_sync(AGENT, question, session=session, run_config=RUN)
            outputs.append(result.final_output)
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            # run_sync leaves the thread's loop open behind it, on purpose: it
            # stays open until every turn has run, as in a real thread pool.
            left_open.append(asyncio.get_event_loop_policy().get_event_loop())

    try:
        for question in ("t1", "t2"):
            thread = threading.Thread(target=turn, args=(question,))
            thread.start()
            thread.join()
        turn("main")
    finally:
        for loop in left_open:
            loop.close()
        asyncio.set_event_loop(None)
    assert failures == []
    assert outputs == ["t1", "t1 | t2", "t1 | t2 | main"]


def test_session_settings_limit_and_explicit_limit(url: str) -> None:
    session = EngineSession.from_url(url, "limited", session_settings=SessionSettings(limit=2))
    items = [cast("TResponseInputItem", {"role": "user", "content": f"i{n}"}) for n in range(5)]
    asyncio.run(session.add_items(items))
    assert asyncio.run(session.get_items()) == items[-2:]
    assert asyncio.run(session.get_items(limit=4)) == items[-4:]
    assert asyncio.run(session.pop_item()) == items[-1]
    assert asyncio.run(session.get_items(limit=10)) == items[:-1]


def _worker(index: int, barrier: Any, url: str) -> list[str]:
    session = EngineSession.from_url(url, "two-processes")
    barrier.wait()
    for n in range(20):
        item = cast("TResponseInputItem", {"role": "user", "content": f"p{index}-{n}"})
        asyncio.run(session.add_items([item]))
    barrier.wait()  # both have written everything: each now reads the other's items
    return [cast("dict[str, Any]", i)["content"] for i in asyncio.run(session.get_items())]


def test_two_processes_share_one_session(url: str) -> None:
    seen = run_in_processes(_worker, [(url,), (url,)])
    assert seen[0] == seen[1]
    assert len(seen[0]) == 40
    for index in (0, 1):
        assert [c for c in seen[0] if c.startswith(f"p{index}-")] == [
            f"p{index}-{n}" for n in range(20)
        ]
