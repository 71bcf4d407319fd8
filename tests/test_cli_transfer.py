"""``conversation export`` / ``import``: a room moved between two servers by file."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer

from conversation import ConversationManager
from conversation._tools.cli import main

pytestmark = pytest.mark.real_server

ROOM = "cli:moving 🚚"


async def _populate(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    manager = ConversationManager(None, redis=client)
    try:
        await manager.set_channel_limit_async(ROOM, 80)
        for i in range(30):
            await manager.append_async(ROOM, "user", f"[Message ID: {i}] turn {i}", name="ana")
        await manager.update_message_async(ROOM, 4, "[Message ID: 4] edited")
    finally:
        await manager.aclose()
        await client.aclose()


@pytest.fixture
def second(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "second").start()
    try:
        yield server
    finally:
        server.stop()


def test_export_then_import_on_another_server_reads_back_equal(
    redis_server: RedisServer,
    second: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(_populate(redis_server.url))
    dump = tmp_path / "room.json"
    assert main(["--redis-url", redis_server.url, "export", ROOM, "-o", str(dump)]) == 0
    assert "exported 30 entries" in capsys.readouterr().err
    assert main(["--redis-url", second.url, "import", ROOM, str(dump)]) == 0
    assert "imported 30 entries" in capsys.readouterr().out
    assert main(["--redis-url", redis_server.url, "inspect", ROOM, "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["--redis-url", second.url, "inspect", ROOM, "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["entries"] == before["entries"] and after["limit"] == 80

    # Into a room that holds entries: refused, unless --replace.
    assert main(["--redis-url", second.url, "import", ROOM, str(dump)]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["--redis-url", second.url, "import", ROOM, str(dump), "--replace"]) == 0


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not JSON"),
        (b'{"format": "discord-dump", "messages": []}', "format is"),
        (b'{"format": "conversation-room", "format_version": 1, "entries": [7]}', "entries[0]"),
    ],
)
def test_import_of_a_corrupt_or_foreign_file_writes_nothing(
    redis_server: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes,
    problem: str,
) -> None:
    dump = tmp_path / "bad.json"
    dump.write_bytes(content)
    assert main(["--redis-url", redis_server.url, "import", "cli:target", str(dump)]) == 2
    err = capsys.readouterr().err
    assert problem in err and "nothing written" in err
    with redis_server.sync_client() as client:
        assert client.keys("*") == []


def test_export_of_a_missing_room_says_so(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--redis-url", redis_server.url, "export", "cli:nobody"]) == 1
    assert "not found" in capsys.readouterr().err


async def _populate_default_limit(url: str, entries: int, max_history: int) -> None:
    client = aioredis.Redis.from_url(url)
    manager = ConversationManager(None, redis=client, max_history=max_history)
    try:
        for i in range(entries):
            await manager.append_async(ROOM, "user", f"turn {i}", name="ana")
    finally:
        await manager.aclose()
        await client.aclose()


def test_import_never_trims_an_export_to_a_smaller_default_limit(
    redis_server: RedisServer,
    second: RedisServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Workers run with max_history=300, so the room stores limit 0 ("the default").
    # The CLI does not know that default: it must not cut 150 turns to its own 100.
    asyncio.run(_populate_default_limit(redis_server.url, 150, 300))
    dump = tmp_path / "room.json"
    assert main(["--redis-url", redis_server.url, "export", ROOM, "-o", str(dump)]) == 0
    capsys.readouterr()
    assert main(["--redis-url", second.url, "import", ROOM, str(dump)]) == 2
    err = capsys.readouterr().err
    assert "150 entries" in err and "--max-history" in err and "nothing written" in err
    with second.sync_client() as client:
        assert client.keys("*") == []
    args = ["--redis-url", second.url, "import", ROOM, str(dump), "--max-history", "300"]
    assert main(args) == 0
    assert "imported 150 entries" in capsys.readouterr().out
    assert main(["--redis-url", second.url, "inspect", ROOM, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["entries"]) == 150


def test_import_of_a_small_file_needs_memory_for_that_file_only(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Under an address-space limit (a container, ulimit -v, overcommit off) the
    # import must not reserve its 2 GiB file cap up front, for a file or stdin.
    dump = tmp_path / "room.json"
    entries = [{"message_id": "1", "role": "user", "content": "[Message ID: 1] hi"}]
    dump.write_text(
        json.dumps({"format": "conversation-room", "format_version": 1, "entries": entries})
    )
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1536 * 1024**2, 1536 * 1024**2))\n"
        "from conversation._tools.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    base = [sys.executable, "-c", script, "--redis-url", redis_server.url, "import"]
    from_file = subprocess.run(  # noqa: PLW1510 - the return code is asserted
        [*base, "cli:small", str(dump)], capture_output=True, text=True, timeout=60
    )
    assert from_file.returncode == 0, from_file.stderr
    from_stdin = subprocess.run(  # noqa: PLW1510 - the return code is asserted
        [*base, "cli:stdin", "-"],
        input=dump.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert "imported 1 entries" in from_stdin.stdout
