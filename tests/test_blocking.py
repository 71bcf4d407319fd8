"""SPEC §26: ``BlockingConversationManager``, the engine for plain sync programs.

These tests are plain (not async) functions: no event loop runs in the test's
thread, as in a script or a WSGI worker. Two managers with their own clients
stand for two worker processes.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer, free_port

from conversation import (
    ConfigurationError,
    ConversationManager,
    DurabilityError,
    InvalidMessage,
    PromptRenderer,
)
from conversation.blocking import BlockingConversationManager

pytestmark = pytest.mark.real_server


@pytest.fixture
def worker(url: str) -> Iterator[BlockingConversationManager]:
    with BlockingConversationManager.from_url(url) as manager:
        yield manager


def _blocking_name(name: str) -> str:
    return {"aclose": "close"}.get(name, name.removesuffix("_async"))


def _public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }


def test_every_public_method_of_the_manager_is_offered_blocking_by_the_one_rule() -> None:
    manager_methods = _public_methods(ConversationManager)
    offered = _public_methods(BlockingConversationManager)
    expected: dict[str, Any] = {}
    for name, method in manager_methods.items():
        # Where both forms exist, the blocking name runs the _async one.
        target = _blocking_name(name)
        if target not in expected or name.endswith("_async"):
            expected[target] = method
    extras = {"run", "submit", "close", "from_url"}
    assert set(offered) - extras == set(expected) - {"close"}
    for name, method in expected.items():
        if name == "close":
            continue
        wrapper = offered[name]
        assert wrapper.__wrapped__ is method, name
        assert inspect.signature(wrapper).parameters == inspect.signature(method).parameters, name


def test_a_plain_sync_program_writes_through_and_another_worker_reads_it(
    url: str, worker: BlockingConversationManager
) -> None:
    worker.append("room:1", "user", "hello [Message ID: 1]", message_id=1)
    worker.append("room:1", "assistant", "hi there")
    with BlockingConversationManager.from_url(url) as other:
        assert [m["content"] for m in other.get_messages("room:1")] == [
            "hello [Message ID: 1]",
            "hi there",
        ]
        # The other worker's edit reaches the first at its next read (a catch-up).
        assert other.update_message("room:1", 1, "hello again [Message ID: 1]") is True
        other.append("room:1", "user", "third")
    assert [m["content"] for m in worker.get_messages("room:1")] == [
        "hello again [Message ID: 1]",
        "hi there",
        "third",
    ]
    assert worker.get_history_message_count("room:1") == 3
    assert worker.last_history_role("room:1") == "user"
    assert worker.stats()["catch_ups"] >= 1


def test_every_write_form_is_confirmed_and_visible_to_another_worker(
    url: str, worker: BlockingConversationManager
) -> None:
    worker.append_many(
        "r", [{"role": "user", "content": f"m{i} [Message ID: {i}]"} for i in range(3)]
    )
    assert worker.mark_deleted("r", 0, "2026-01-01T00:00:00Z") is True
    assert worker.patch_reactions("r", 1, "👍 2") is True
    for user in ("ana", "bo", "ana"):  # a redelivered event counts once
        assert worker.add_reaction("r", 2, "😂", user) is True
    assert worker.remove_reaction("r", 2, "😂", "bo") is True
    assert worker.update_message("r", "missing", "x") is False
    assert worker.set_channel_limit("r", 500) == 500
    assert worker.is_rebackfill_requested("r") is True
    worker.discard_rebackfill_request("r")
    with BlockingConversationManager.from_url(url) as other:
        contents = [m["content"] for m in other.get_messages("r")]
        assert "[deleted at 2026-01-01T00:00:00Z]" in contents[0]
        assert "[Reactions: 👍 2]" in contents[1]
        assert "[Reactions: 😂 1]" in contents[2]
        assert other.clear_reactions("r", 2) is True
        assert "[Reactions:" not in other.get_messages("r")[2]["content"]
        assert other.get_channel_limit("r") == 500
        assert other.is_rebackfill_requested("r") is False
        other.clear("r")
    assert worker.get_messages("r") == []


def test_a_write_redis_cannot_confirm_raises_instead_of_waiting_for_ever() -> None:
    # Nothing listens on this port: every attempt fails at once.
    url = f"redis://127.0.0.1:{free_port()}/0"
    with BlockingConversationManager.from_url(
        url, durable_timeout=0.3, retry_backoff=(0.01, 0.05)
    ) as manager:
        with pytest.raises(DurabilityError) as caught:
            manager.append("room", "user", "lost?")
        assert caught.value.room_id == "room"
        # The unconfirmed turn left this worker's memory: what it shows is what Redis has.
        assert manager.get_history_message_count("room") == 0
        with pytest.raises(DurabilityError):
            manager.clear("room")


def test_many_threads_share_one_manager(url: str, worker: BlockingConversationManager) -> None:
    threads, per_thread = 5, 15  # 75 turns: inside the default window of 100
    failures: list[BaseException] = []

    def talk(n: int) -> None:
        try:
            for i in range(per_thread):
                worker.append("shared", "user", f"t{n}-{i}")
                worker.get_messages("shared")
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    pool = [threading.Thread(target=talk, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert failures == []
    with BlockingConversationManager.from_url(url) as other:
        contents = [m["content"] for m in other.get_messages("shared")]
    assert len(contents) == threads * per_thread
    for n in range(threads):
        # Each thread's turns are stored in the order it made them.
        assert [c for c in contents if c.startswith(f"t{n}-")] == [
            f"t{n}-{i}" for i in range(per_thread)
        ]


def test_the_client_is_built_on_the_engine_thread_and_closed_with_the_manager(
    redis_server: RedisServer,
) -> None:
    built: list[aioredis.Redis] = []
    threads: list[threading.Thread] = []

    def factory() -> aioredis.Redis:
        threads.append(threading.current_thread())
        client = aioredis.Redis(port=redis_server.port)
        built.append(client)
        return client

    manager = BlockingConversationManager(factory, PromptRenderer("inference"))
    manager.append("r", "user", "hi")
    messages = manager.get_messages("r", {"bot_name": "Ada"})
    assert messages[0]["role"] == "system" and messages[1]["content"] == "hi"
    assert threads[0] is not threading.current_thread()
    manager.close()
    assert manager.closed
    assert not threads[0].is_alive()  # the portal's thread stopped
    pooled = built[0].connection_pool._available_connections
    assert pooled and not any(connection.is_connected for connection in pooled)
    manager.close()  # a second close is a no-op
    with pytest.raises(ConfigurationError, match="closed"):
        manager.get_messages("r")


def test_bad_construction_is_refused_clearly() -> None:
    with pytest.raises(ConfigurationError, match="client_factory"):
        BlockingConversationManager("redis://localhost")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_history"):
        BlockingConversationManager(None, max_history=0)


def test_run_awaits_several_calls_in_one_hop(worker: BlockingConversationManager) -> None:
    async def two(manager: ConversationManager) -> int:
        await manager.append_async("r", "user", "a")
        await manager.append_async("r", "user", "b")
        return manager.get_history_message_count("r")

    assert worker.run(two) == 2


def test_a_script_that_never_closes_exits_and_its_writes_are_flushed(url: str) -> None:
    script = (
        "import sys\n"
        "from conversation.blocking import BlockingConversationManager\n"
        "m = BlockingConversationManager.from_url(sys.argv[1])\n"
        "m.append('left-open', 'user', 'kept', durable=False)\n"
    )
    subprocess.run([sys.executable, "-c", script, url], check=True, timeout=60)
    with BlockingConversationManager.from_url(url) as reader:
        assert [m["content"] for m in reader.get_messages("left-open")] == ["kept"]


def test_metadata_comes_back_only_when_asked_and_survives_edits(
    url: str, worker: BlockingConversationManager
) -> None:
    private = {"lc": {"id": "run-1", "usage": {"input_tokens": 3}}}
    worker.append("meta", "user", "hi [Message ID: 9]", metadata=private)
    worker.append_many("meta", [{"role": "assistant", "content": "yo", "metadata": {"k": 1}}])
    with BlockingConversationManager.from_url(url) as other:
        # What goes to a model: OpenAI chat fields only.
        assert other.get_messages("meta") == [
            {"role": "user", "content": "hi [Message ID: 9]"},
            {"role": "assistant", "content": "yo"},
        ]
        assert other.update_message("meta", 9, "edited [Message ID: 9]")
        assert other.get_messages("meta", include_metadata=True) == [
            {"role": "user", "content": "edited [Message ID: 9]", "metadata": private},
            {"role": "assistant", "content": "yo", "metadata": {"k": 1}},
        ]
    with pytest.raises(InvalidMessage, match="metadata"):
        worker.append("meta", "user", "x", metadata=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage, match="JSON"):
        worker.append("meta", "user", "x", metadata={"set": {1, 2}})
    assert worker.get_history_message_count("meta") == 2


def test_changes_is_a_blocking_iterator_that_waits_for_another_workers_writes(
    url: str, worker: BlockingConversationManager
) -> None:
    worker.append("room:feed", "user", "first [Message ID: 1]", message_id=1)
    _, cursor = worker.read_since("room:feed")
    with BlockingConversationManager.from_url(url) as other:
        changes = worker.changes("room:feed", since=cursor, poll_interval=0.05)
        # Written from another thread while (or before) next() waits on the engine's loop.
        writer = threading.Thread(
            target=other.append, args=("room:feed", "user", "second [Message ID: 2]")
        )
        writer.start()
        change = next(changes)
        writer.join()
        assert change.kind == "append"
        assert change.entry is not None and "second" in str(change.entry["content"])
        changes.close()  # closes the async iterator on the engine's loop
        with pytest.raises(StopIteration):
            next(changes)
    with pytest.raises(ConfigurationError):
        worker.changes("room:feed", poll_interval=0)  # raised at the call, not at next()


def test_cursors_export_and_import_are_offered_blocking(
    worker: BlockingConversationManager,
) -> None:
    worker.append("room:a", "user", "hello [Message ID: 1]", message_id=1)
    _, cursor = worker.read_since("room:a")
    assert worker.set_cursor("room:a", "indexer", cursor, expected="") is True
    assert worker.get_cursor("room:a", "indexer") == cursor
    exported = worker.export_room("room:a")
    worker.import_room("room:b", exported)
    assert [m["content"] for m in worker.get_messages("room:b")] == [
        m["content"] for m in worker.get_messages("room:a")
    ]
    assert {info.room_id for info in worker.rooms()} >= {"room:a", "room:b"}


@pytest.mark.parametrize(
    "metadata",
    [{"set": {1, 2}}, {"nested": {1: "int key"}}, {"raw": b"\x00bytes"}],
    ids=["set", "non-str-nested-key", "bytes"],
)
def test_metadata_that_cannot_be_stored_is_refused_naming_metadata(
    worker: BlockingConversationManager, metadata: dict[str, Any]
) -> None:
    worker.append("hostile-meta", "user", "kept")
    with pytest.raises(InvalidMessage) as single:
        worker.append("hostile-meta", "user", "fine text", metadata=metadata)
    # The caller is told which field is wrong: the text they sent was fine.
    assert single.value.field == "metadata"
    batch: list[dict[str, Any]] = [
        {"role": "user", "content": "ok"},
        {"role": "user", "content": "x", "metadata": metadata},
    ]
    with pytest.raises(InvalidMessage) as many:
        worker.append_many("hostile-meta", batch)
    assert many.value.field == "metadata"
    assert [m["content"] for m in worker.get_messages("hostile-meta")] == ["kept"]


def test_a_call_from_the_engines_own_thread_is_refused_clearly(
    worker: BlockingConversationManager,
) -> None:
    async def reenter(manager: ConversationManager) -> object:
        return worker.get_messages("r")  # a blocking call from inside the engine's loop

    with pytest.raises(ConfigurationError, match="engine's own thread"):
        worker.run(reenter)
    worker.append("r", "user", "still serving")  # the engine is unharmed
    assert worker.get_history_message_count("r") == 1


_FORK_SCRIPT = """
import os, signal, sys
from conversation import ConfigurationError
from conversation.integrations._common import shared_engine

url = sys.argv[1]
parent = shared_engine(url, {})
parent.append("forked", "user", "before fork")
pid = os.fork()
if pid == 0:  # a pre-fork server's worker: the engine thread was not copied
    signal.alarm(20)  # a hang ends this child instead of outliving the test
    try:
        parent.get_messages("forked")
    except ConfigurationError as exc:
        assert "fork" in str(exc), exc
    else:
        os._exit(3)
    assert parent.closed
    child = shared_engine(url, {})
    assert child is not parent
    assert [m["content"] for m in child.get_messages("forked")] == ["before fork"]
    child.append("forked", "user", "from the child", durable=False)
    sys.exit(0)  # atexit flushes the child's engine and skips the parent's
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
parent.append("forked", "user", "parent after fork")
"""


def test_a_forked_child_is_told_to_build_its_own_engine_and_from_url_does(url: str) -> None:
    subprocess.run([sys.executable, "-c", _FORK_SCRIPT, url], check=True, timeout=60)
    with BlockingConversationManager.from_url(url) as reader:
        assert [m["content"] for m in reader.get_messages("forked")] == [
            "before fork",
            "from the child",
            "parent after fork",
        ]


_EXIT_WITH_REDIS_DOWN = """
import sys
from conversation.blocking import BlockingConversationManager

async def queue(manager):
    manager.append("left-open", "user", "never confirmed")  # the background form

for _ in range(4):
    manager = BlockingConversationManager.from_url(sys.argv[1], exit_timeout=2.0)
    manager.run(queue)
"""


def test_exit_with_redis_down_waits_exit_timeout_once_not_per_manager() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITH_REDIS_DOWN, dead],
        check=False,
        timeout=60,
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # Four managers flushed one after another would take 8 s; side by side, 2.
    assert took < 6.0, took
    assert done.stderr.count("DrainTimeout") >= 4, done.stderr  # each failure is logged


def test_exit_timeout_must_be_a_number_of_seconds() -> None:
    with pytest.raises(ConfigurationError, match="exit_timeout"):
        BlockingConversationManager(None, exit_timeout=-1)


def test_an_entry_too_big_because_of_its_metadata_says_so() -> None:
    with BlockingConversationManager(None, max_entry_bytes=4096) as memory:
        memory.append("big-meta", "user", "kept")
        with pytest.raises(InvalidMessage) as refused:
            memory.append("big-meta", "user", "short text", metadata={"blob": "y" * 8000})
        assert refused.value.field == "metadata"
        assert "metadata" in refused.value.reason and "4096" in refused.value.reason
        with pytest.raises(InvalidMessage) as text_too_big:
            memory.append("big-meta", "user", "z" * 8000)
        assert text_too_big.value.field == "content"
        assert [m["content"] for m in memory.get_messages("big-meta")] == ["kept"]
