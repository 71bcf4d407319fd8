"""``rooms()`` (SPEC §36): this process's working set, and ``stats --worker`` showing it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conversation import ConversationManager, RoomInfo
from conversation._tools.cli import main

pytestmark = pytest.mark.real_server

Make = Callable[..., ConversationManager]


async def test_rooms_lists_entries_pending_writes_idleness_and_version(
    redis_client: aioredis.Redis, make_manager: Make
) -> None:
    manager = make_manager(redis_client)
    await manager.append_async("ws:a", "user", "[Message ID: 1] one")
    await manager.append_async("ws:a", "user", "[Message ID: 2] two")
    await manager.get_messages_async("ws:b")  # held, never written
    manager.append("ws:c", "user", "[Message ID: 3] queued")  # not persisted yet
    infos = {info.room_id: info for info in manager.rooms()}
    assert set(infos) == {"ws:a", "ws:b", "ws:c"}
    assert (infos["ws:a"].entries, infos["ws:a"].pending_writes, infos["ws:a"].version) == (
        2,
        0,
        2,
    )
    assert (infos["ws:b"].entries, infos["ws:b"].version) == (0, 0)
    assert infos["ws:c"].pending_writes == 1 and infos["ws:c"].entries == 1
    assert manager.rooms()[0].room_id == "ws:c"  # most recently used first
    assert all(isinstance(i, RoomInfo) and 0 <= i.idle_seconds < 60 for i in infos.values())
    await manager.drain()
    assert {i.room_id: i.pending_writes for i in manager.rooms()}["ws:c"] == 0
    await manager.get_messages_async("ws:a")  # a use: it moves to the front
    infos_now = manager.rooms()
    assert infos_now[0].room_id == "ws:a"
    assert [i.idle_seconds for i in infos_now] == sorted(i.idle_seconds for i in infos_now)
    assert manager.reap_stale(max_idle_seconds=3600) == 0
    assert manager.reap_stale(max_idle_seconds=0) == 3  # all idle, nothing pending
    assert manager.rooms() == []


async def test_stats_working_set_round_trips_through_the_cli(
    redis_client: aioredis.Redis,
    make_manager: Make,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manager = make_manager(redis_client)
    await manager.append_async("ws:🎉 party", "user", "[Message ID: 1] hi")
    dump = tmp_path / "worker.json"
    dump.write_text(json.dumps(manager.stats(working_set=True)))
    assert manager.stats()["appends"] == 1 and "working_set" not in manager.stats()
    assert main(["stats", "--worker", str(dump), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "Working set: 1 room(s)" in out and "ws:🎉 party" in out
    assert main(["stats", "--worker", str(dump), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["working_set"][0]["entries"] == 1


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{nope", "is not JSON"), ('{"appends": 1}', "working_set"), ("[1]", "working_set")],
)
def test_stats_worker_refuses_a_file_that_is_not_a_worker_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, problem: str
) -> None:
    dump = tmp_path / "bad.json"
    dump.write_text(content)
    assert main(["stats", "--worker", str(dump)]) == 2
    assert problem in capsys.readouterr().err
