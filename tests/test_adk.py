"""The Google ADK adapter on private real Redis servers: scoping, state prefixes,
event order across workers, hostile input, and two processes sharing a session.

ADK's own session-service tests run against it too (scripts/peer_tests.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from google.adk.agents import LlmAgent
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models.base_llm import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types
from multiproc import run_in_processes
from redis_servers import RedisServer

from conversation import InvalidMessage, InvalidSessionId
from conversation.integrations.adk import EngineSessionService

pytestmark = pytest.mark.real_server


@pytest.fixture
async def workers(redis_server: RedisServer) -> AsyncIterator[tuple[Any, Any]]:
    """Two services with their own connections: two workers of one deployment."""
    clients = [aioredis.Redis(port=redis_server.port, socket_timeout=5) for _ in range(2)]
    await clients[0].script_flush()
    await clients[0].function_flush()
    try:
        yield EngineSessionService(clients[0]), EngineSessionService(clients[1])
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
def url_of(redis_server: RedisServer) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/0"


def _event(text: str, *, author: str = "user", delta: dict[str, Any] | None = None) -> Event:
    return Event(
        invocation_id="inv",
        author=author,
        content=types.Content(
            role="user" if author == "user" else "model", parts=[types.Part(text=text)]
        ),
        actions=EventActions(state_delta=delta or {}),
    )


def _texts(events: list[Event]) -> list[str]:
    return [e.content.parts[0].text for e in events if e.content and e.content.parts]  # type: ignore[misc]


async def test_state_prefixes_scope_across_workers(workers: tuple[Any, Any]) -> None:
    one, two = workers
    s = await one.create_session(
        app_name="shop",
        user_id="ann",
        session_id="s1",
        state={"cart": 1, "app:banner": "sale", "user:lang": "fr", "temp:draft": "x"},
    )
    assert s.state == {"cart": 1, "app:banner": "sale", "user:lang": "fr"}
    await one.append_event(
        s, _event("hi", delta={"cart": 2, "user:lang": "de", "app:banner": "new", "temp:t": 1})
    )
    assert s.state["temp:t"] == 1  # the invocation sees its temp keys...
    got = await two.get_session(app_name="shop", user_id="ann", session_id="s1")
    assert got.state == {"cart": 2, "app:banner": "new", "user:lang": "de"}  # ...nobody else
    assert "temp:t" not in got.events[0].actions.state_delta
    # user: state follows the user into another session, app: state every user.
    other = await two.create_session(app_name="shop", user_id="ann", session_id="s2")
    assert other.state == {"app:banner": "new", "user:lang": "de"}
    bob = await two.create_session(app_name="shop", user_id="bob")
    assert bob.state == {"app:banner": "new"}
    assert await one.get_user_state(app_name="shop", user_id="ann") == {"lang": "de"}
    assert await one.get_user_state(app_name="shop", user_id="bob") == {}


async def test_apps_and_users_never_share_keys(workers: tuple[Any, Any]) -> None:
    """Colons and percent signs in names cannot make two (app, user) pairs meet."""
    one, _ = workers
    pairs = [("a:b", "c"), ("a", "b:c"), ("a%3Ab", "c"), ("a", "b%3Ac")]
    for app, user in pairs:
        await one.create_session(
            app_name=app,
            user_id=user,
            session_id="same",
            state={"who": f"{app}/{user}", "user:who": user, "app:who": app},
        )
    for app, user in pairs:
        got = await one.get_session(app_name=app, user_id=user, session_id="same")
        assert got.state == {"who": f"{app}/{user}", "user:who": user, "app:who": app}
        listed = await one.list_sessions(app_name=app)
        assert sorted(x.user_id for x in listed.sessions) == sorted(u for a, u in pairs if a == app)


async def test_events_keep_the_order_redis_received_them(workers: tuple[Any, Any]) -> None:
    one, two = workers
    s1 = await one.create_session(app_name="app", user_id="u", session_id="chat")
    s2 = await two.get_session(app_name="app", user_id="u", session_id="chat")
    for i in range(6):  # interleaved, each worker on its own stale copy
        await (one if i % 2 == 0 else two).append_event(s1 if i % 2 == 0 else s2, _event(f"m{i}"))
    got = await one.get_session(app_name="app", user_id="u", session_id="chat")
    assert _texts(got.events) == [f"m{i}" for i in range(6)]
    # Concurrent appends from both workers: all land, each worker's in its own order.
    await asyncio.gather(
        *(one.append_event(s1, _event(f"a{i}")) for i in range(10)),
        *(two.append_event(s2, _event(f"b{i}")) for i in range(10)),
    )
    texts = _texts((await two.get_session(app_name="app", user_id="u", session_id="chat")).events)
    assert len(texts) == 26
    assert [t for t in texts if t.startswith("a")] == [f"a{i}" for i in range(10)]
    assert [t for t in texts if t.startswith("b")] == [f"b{i}" for i in range(10)]
    recent = await one.get_session(
        app_name="app",
        user_id="u",
        session_id="chat",
        config=GetSessionConfig(num_recent_events=2),
    )
    assert _texts(recent.events) == texts[-2:]


async def test_a_retried_append_lands_once(workers: tuple[Any, Any]) -> None:
    one, two = workers
    s = await one.create_session(app_name="app", user_id="u")
    event = _event("once", delta={"n": 1})
    await one.append_event(s, event)
    stale = await two.get_session(app_name="app", user_id="u", session_id=s.id)
    stale.events.clear()  # a worker that never saw it delivers the same event again
    await two.append_event(stale, event)
    got = await one.get_session(app_name="app", user_id="u", session_id=s.id)
    assert _texts(got.events) == ["once"]


async def test_hostile_ids_are_refused_and_store_nothing(
    workers: tuple[Any, Any], redis_client: aioredis.Redis
) -> None:
    one, _ = workers
    for app, user, sid in [
        ("app", "u{1}", "s"),
        ("ap}p", "u", "s"),
        ("app", "u", "s\n1"),
        ("app", "u", "x" * 300),
        ("", "u", "s"),
        ("app", "", "s"),
        ("app", "u\x00", "s"),
    ]:
        with pytest.raises(InvalidSessionId):
            await one.create_session(app_name=app, user_id=user, session_id=sid)
    assert await redis_client.dbsize() == 0


async def test_hostile_state_keys_round_trip_and_bad_values_store_nothing(
    workers: tuple[Any, Any],
) -> None:
    one, two = workers
    keys = {"{tag}": 1, "a:b:c": 2, "😀 emoji": 3, "": 4, "line\nbreak": 5, "x" * 2000: 6}
    s = await one.create_session(app_name="app", user_id="u", state=keys)
    await one.append_event(s, _event("e", delta={"user:{u}": [1, {"n": None}]}))
    got = await two.get_session(app_name="app", user_id="u", session_id=s.id)
    assert got.state == {**keys, "user:{u}": [1, {"n": None}]}

    with pytest.raises(InvalidMessage):
        await one.append_event(s, _event("never", delta={"bad": object()}))
    with pytest.raises(InvalidMessage):
        await one.create_session(app_name="app", user_id="u", session_id="n", state={"f": object()})
    got = await two.get_session(app_name="app", user_id="u", session_id=s.id)
    assert _texts(got.events) == ["e"]
    assert await two.get_session(app_name="app", user_id="u", session_id="n") is None


async def test_missing_sessions_and_duplicate_ids(workers: tuple[Any, Any]) -> None:
    one, two = workers
    s = await one.create_session(app_name="app", user_id="u", session_id="dup")
    with pytest.raises(AlreadyExistsError):
        await two.create_session(app_name="app", user_id="u", session_id="dup")
    await two.delete_session(app_name="app", user_id="u", session_id="dup")
    with pytest.raises(SessionNotFoundError):
        await one.append_event(s, _event("late"))
    assert (
        await one.list_sessions(app_name="app", user_id="u")
        == type(await one.list_sessions(app_name="nothing"))()
    )


class _EchoModel(BaseLlm):
    """A deterministic model: answers with how many user turns it was sent."""

    model: str = "echo"

    async def generate_content_async(  # type: ignore[override]
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncIterator[LlmResponse]:
        turns = sum(1 for c in llm_request.contents if c.role == "user")
        yield LlmResponse(content=types.Content(role="model", parts=[types.Part(text=f"{turns}")]))


async def _run_turn(service: EngineSessionService, text: str) -> str:
    agent = LlmAgent(name="echo", model=_EchoModel(), instruction="Count.")
    runner = Runner(app_name="bot", agent=agent, session_service=service)
    message = types.Content(role="user", parts=[types.Part(text=text)])
    answer = ""
    async for event in runner.run_async(user_id="u", session_id="chat", new_message=message):
        if event.content and event.content.parts and event.content.parts[0].text:
            answer = event.content.parts[0].text
    return answer


def _process_turn(index: int, barrier: Any, port: int) -> str:
    del index, barrier

    async def body() -> str:
        client = aioredis.Redis(port=port, socket_timeout=5)
        try:
            return await _run_turn(EngineSessionService(client), "from the other process")
        finally:
            await client.aclose()

    return asyncio.run(body())


async def test_two_processes_share_one_session_through_the_runner(
    redis_server: RedisServer, workers: tuple[Any, Any]
) -> None:
    """ADK's Runner in this process, then in another one: the second sees the first turn."""
    one, _ = workers
    await one.create_session(app_name="bot", user_id="u", session_id="chat")
    assert await _run_turn(one, "hello") == "1"
    (answer,) = await asyncio.to_thread(run_in_processes, _process_turn, [(redis_server.port,)])
    assert answer == "2"  # the model was sent both user turns
    got = await one.get_session(app_name="bot", user_id="u", session_id="chat")
    assert [e.author for e in got.events] == ["user", "echo", "user", "echo"]


def _sync_program(index: int, barrier: Any, url: str) -> list[str]:
    """A plain sync program: ADK's sync Runner.run, which runs each call on a new
    loop in a new thread, twice in a row and then from two threads at once."""
    del index, barrier
    service = EngineSessionService.from_url(url)
    agent = LlmAgent(name="echo", model=_EchoModel(), instruction="Count.")
    runner = Runner(app_name="bot", agent=agent, session_service=service)

    def turn(session_id: str, text: str) -> str:
        message = types.Content(role="user", parts=[types.Part(text=text)])
        answers = [
            e.content.parts[0].text
            for e in runner.run(user_id="u", session_id=session_id, new_message=message)
            if e.content and e.content.parts and e.content.parts[0].text
        ]
        return answers[-1] or ""

    for sid in ("a", "b"):
        asyncio.run(service.create_session(app_name="bot", user_id="u", session_id=sid))
    answers = [turn("a", "one"), turn("a", "two")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers += list(pool.map(turn, ["a", "b"], ["three", "first"]))
    asyncio.run(service.close())
    return answers


def test_sync_runner_in_a_plain_program_across_loops_and_threads(url_of: str) -> None:
    (answers,) = run_in_processes(_sync_program, [(url_of,)])
    assert answers == ["1", "2", "3", "1"]


async def test_corrupt_rows_and_state_are_skipped_not_fatal(
    workers: tuple[Any, Any], redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    one, _ = workers
    s = await one.create_session(app_name="app", user_id="u", session_id="s", state={"ok": 1})
    await one.append_event(s, _event("kept"))
    keys = one.store.keys.session("app:u", "s")
    await redis_client.rpush(keys.messages, b"not json", b'{"role":"user","content":"plain"}')
    await redis_client.hset(keys.state, "broken", b"{nope")
    got = await one.get_session(app_name="app", user_id="u", session_id="s")
    assert _texts(got.events) == ["kept"]
    assert got.state == {"ok": 1}
    assert "corrupt" in caplog.text
    assert "no ADK event" in caplog.text
