"""The operator CLI against private redis-servers: output and exit codes of every command."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_servers import RedisServer, free_port

from conversation import ConversationManager
from conversation._tools.cli import main
from conversation._tools.redis_server import server_identity

pytestmark = pytest.mark.real_server

ROOT = Path(__file__).resolve().parent.parent
ALPHA, BETA = "cli:alpha", "cli:beta"
IMAGE = "https://images.example.com/cat.jpg"


async def _populate(url: str, prefix: str = "sg") -> None:
    client = aioredis.Redis.from_url(url)
    manager = ConversationManager(None, redis=client, key_prefix=prefix)
    try:
        await manager.append_async(ALPHA, "user", "[Message ID: 1] hello there", name="ana")
        await manager.append_async(
            ALPHA,
            "user",
            [
                {"type": "text", "text": "[Message ID: 2] my cat"},
                {"type": "image_url", "image_url": {"url": IMAGE}},
            ],
            name="bo",
        )
        await manager.update_message_async(ALPHA, "2", "[Message ID: 2] my cat (edited)")
        await manager.patch_reactions_async(ALPHA, "2", "👍 3, 😂 1")
        await manager.mark_deleted_async(ALPHA, "1", "2025-03-14T10:00:00Z")
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
        await manager.append_async(ALPHA, "assistant", "", tool_calls=[call])
        await manager.append_async(ALPHA, "tool", '{"temp_c": 3}', tool_call_id="call_1")
        await manager.append_async(BETA, "user", "[Message ID: 7] beta room", name="chen")
        await manager.set_channel_limit_async(BETA, 60)
    finally:
        await manager.aclose()
        await client.aclose()


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    asyncio.run(_populate(redis_server.url))
    return redis_server.url


def _meta_version(server: RedisServer, room: str) -> int:
    with server.sync_client() as client:
        return int(client.hget(f"sg:conversation:{{{room}}}:meta", "version") or 0)


# ------------------------------------------------------------------ rooms


def test_rooms_lists_every_room_with_size_limit_and_version(
    url: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--redis-url", url, "rooms"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["ROOM", "ENTRIES", "LIMIT", "VERSION", "TTL", "FLAGS"]
    alpha = next(line for line in lines if line.startswith(ALPHA)).split()
    beta = next(line for line in lines if line.startswith(BETA)).split()
    assert alpha[1:4] == ["4", "default", str(_meta_version(redis_server, ALPHA))]
    assert beta[1:4] == ["1", "60", str(_meta_version(redis_server, BETA))]
    assert "2 room(s), 5 entries" in out
    assert "\x1b[" not in out  # not a terminal: no colour


def test_rooms_json_match_and_options_after_the_command(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rooms", "--redis-url", url, "--json", "--match", "cli:al*"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [room["room"] for room in payload["rooms"]] == [ALPHA]
    assert payload["rooms"][0]["entries"] == 4
    assert payload["cluster"] is False


def test_rooms_under_an_unused_prefix(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "--prefix", "other", "rooms"]) == 0
    assert "no rooms under prefix 'other'" in capsys.readouterr().out


def test_redis_url_comes_from_the_environment(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert main(["rooms"]) == 0
    assert ALPHA in capsys.readouterr().out


# ---------------------------------------------------------------- inspect


def test_inspect_shows_the_window_as_a_table(
    url: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--redis-url", url, "inspect", ALPHA]) == 0
    out = capsys.readouterr().out
    version = _meta_version(redis_server, ALPHA)
    assert f"room {ALPHA} · version {version} · 4 entries (limit default)" in out
    lines = out.splitlines()
    assert lines[1].split() == ["#", "ROLE", "NAME", "CONTENT"]
    assert "[Message ID: 1] [deleted at 2025-03-14T10:00:00Z] hello there" in lines[2]
    assert "[Message ID: 2] [Reactions: 👍 3, 😂 1] my cat (edited)" in lines[3]
    assert f"<image {IMAGE}>" in lines[3]  # the text-only edit kept the image
    assert '→ get_weather({"city":"Oslo"})' in lines[4]
    assert '↩ call_1: {"temp_c": 3}' in lines[5]
    assert "\x1b[" not in out


def test_inspect_highlights_markers_in_colour(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "--color", "always", "inspect", ALPHA, "--last", "3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[36m[Message ID: 2]\x1b[0m" in out
    assert "\x1b[33;1m[Reactions: 👍 3, 😂 1]\x1b[0m" in out
    assert "1 earlier entries not shown" in out
    assert "hello there" not in out


def test_inspect_cuts_long_content(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "inspect", ALPHA, "--max-chars", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].endswith("[Message ID: 1] [de…")


def test_inspect_json_is_the_atomic_snapshot(
    url: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--redis-url", url, "inspect", ALPHA, "--json"]) == 0
    snapshot = json.loads(capsys.readouterr().out)
    assert snapshot["exists"] is True
    assert snapshot["version"] == _meta_version(redis_server, ALPHA)
    with redis_server.sync_client() as direct:
        stored_epoch, stored_tag = direct.hmget(f"sg:conversation:{{{ALPHA}}}:meta", "epoch", "tag")
    assert snapshot["epoch"] == stored_epoch.decode()
    # "<version>:<tag>": the lineage tag of that version
    assert f"{snapshot['version']}:{snapshot['tag']}" == stored_tag.decode()
    assert [e["position"] for e in snapshot["entries"]] == [0, 1, 2, 3]
    assert [e["message_id"] for e in snapshot["entries"]] == ["1", "2", None, None]
    image = snapshot["entries"][1]["content"][1]
    assert image == {"type": "image_url", "image_url": {"url": IMAGE}}
    assert snapshot["entries"][3]["tool_call_id"] == "call_1"


def test_inspect_of_a_missing_room_exits_1(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "inspect", "cli:nobody"]) == 1
    assert "room 'cli:nobody' not found" in capsys.readouterr().err
    assert main(["--redis-url", url, "inspect", "cli:nobody", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["exists"] is False


def test_inspect_rejects_an_invalid_room_id(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "inspect", "bad{room}"]) == 2
    assert "invalid room id" in capsys.readouterr().err


# ------------------------------------------------------------------ stats


def test_stats_shows_server_scripts_and_rooms(
    url: str, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--redis-url", url, "stats"]) == 0
    out = capsys.readouterr().out
    assert "ENGINE SCRIPTS" in out
    assert "Rooms under prefix 'sg': 2 room(s), 5 entries" in out
    alpha = next(line for line in out.splitlines() if line.strip().startswith(ALPHA)).split()
    assert alpha[1] == "4"  # entries
    assert alpha[4] == "3"  # the edit log: the edit, the reactions, the deletion
    # The server's own version, Valkey's named: not the redis_version 7.2.4 it also reports.
    with redis_server.sync_client() as client:
        name, version = server_identity(client.info("server"))
    shown = version if name == "redis" else f"{name} {version}"
    assert re.search(rf"^\s*127\.0\.0\.1:{redis_server.port}\s+{re.escape(shown)}\s", out, re.M)


def test_stats_json_for_chosen_rooms(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--redis-url", url, "stats", BETA, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    (server,) = payload["servers"]
    assert server["info"]["redis_version"]
    assert 0 < server["scripts"]["loaded"] <= server["scripts"]["total"]
    (beta,) = payload["rooms"]["detail"]
    assert beta["room"] == BETA
    assert beta["entries"] == 1
    assert beta["limit"] == 60
    assert beta["memory_bytes"] > 0


# ------------------------------------------------------------ unreachable


@pytest.mark.parametrize(
    "command", [["rooms"], ["inspect", ALPHA], ["tail", ALPHA, "--count", "1"], ["stats"]]
)
def test_unreachable_redis_is_a_clear_error_with_exit_code_3(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["--redis-url", dead, *command]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"conversation: error: cannot reach Redis at {dead}: ")
    assert "Traceback" not in err


def test_a_password_in_the_url_is_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    assert main(["--redis-url", dead, "rooms"]) == 3
    err = capsys.readouterr().err
    assert "s3cret" not in err
    assert "redis://user:***@127.0.0.1:" in err


# ------------------------------------------------------------ help, bench


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("rooms", "inspect", "tail", "stats", "export", "import", "bench", "demo"):
        assert f"    {command} " in out
    assert "REDIS_URL" in out
    assert "exit codes" in out


@pytest.mark.parametrize(
    "command", ["rooms", "inspect", "tail", "stats", "export", "import", "demo"]
)
def test_each_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--redis-url" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: conversation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["rooms", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_bench_gets_the_remaining_arguments(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("conversation._tools.bench")

    def bench_main(argv: list[str]) -> int:
        seen.append(argv)
        return 5

    fake.main = bench_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "conversation._tools.bench", fake)
    assert main(["--redis-url", "redis://h:1/0", "bench", "--quick", "--json", "x.json"]) == 5
    assert seen == [["--redis-url", "redis://h:1/0", "--quick", "--json", "x.json"]]
    assert main(["bench", "--redis-url", "redis://o:2/0", "--help", "-v"]) == 5
    assert seen[-1] == ["--redis-url", "redis://o:2/0", "--help", "-v"]


def test_python_dash_m_and_the_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conversation", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: conversation")
    script = Path(sys.executable).parent / "conversation"
    if script.exists():  # the console script declared in pyproject (an installed venv)
        installed = subprocess.run(
            [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert installed.returncode == 0, installed.stderr
        assert installed.stdout == result.stdout


# -------------------------------------------------------------------- tail


class _Tail:
    """``conversation tail`` in a subprocess, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def expect(self, text: str, timeout: float = 15.0) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"tail ended before {text!r}; got {self.lines}")
                line = raw.decode().rstrip("\n")
                self.lines.append(line)
                if text in line:
                    return line

    async def finish(self, timeout: float = 15.0) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.process.communicate(), timeout)
        self.lines.extend(out.decode().splitlines())
        return int(self.process.returncode or 0), out.decode(), err.decode()


@contextlib.asynccontextmanager
async def _tail(url: str, room: str, *args: str) -> AsyncIterator[_Tail]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "conversation",
        "--redis-url",
        url,
        "tail",
        room,
        "--interval",
        "0.05",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield _Tail(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()


@pytest.fixture
async def writer(redis_server: RedisServer) -> AsyncIterator[ConversationManager]:
    client = aioredis.Redis.from_url(redis_server.url)
    manager = ConversationManager(None, redis=client)
    try:
        yield manager
    finally:
        await manager.aclose()
        await client.aclose()


async def test_tail_follows_appends_edits_trims_and_clears(
    redis_server: RedisServer, writer: ConversationManager
) -> None:
    room = "cli:tail"
    await writer.append_async(room, "user", "[Message ID: 1] first", name="ana")
    # Changes: 1 append, 1 edit, 50 appends + 1 trim + 1 limit, 1 clear, 1 append.
    async with _tail(redis_server.url, room, "--last", "1", "--count", "56") as tail:
        await tail.expect("following cli:tail at version 1 (1 entries, limit default)")
        await tail.expect("#0 user ana: [Message ID: 1] first")
        await writer.append_async(room, "user", "[Message ID: 2] second", name="bo")
        await tail.expect("+ #1 user bo: [Message ID: 2] second")
        await writer.patch_reactions_async(room, "1", "🔥 2")
        await tail.expect("~ #0 user ana: [Message ID: 1] [Reactions: 🔥 2] first")
        for index in range(3, 53):
            writer.append(room, "user", f"[Message ID: {index}] n{index}")
        await writer.set_channel_limit_async(room, 50)
        await tail.expect("✂ 2 entries left the front of the window")
        await tail.expect("limit default → 50")
        await writer.clear_async(room)
        await tail.expect("∅ room cleared")
        await writer.append_async(room, "user", "[Message ID: 99] again", name="chen")
        await tail.expect("+ #0 user chen: [Message ID: 99] again")
        code, _out, err = await tail.finish()
    assert code == 0, err
    assert "Traceback" not in err


async def test_tail_shows_a_fold_and_a_reset(
    redis_server: RedisServer, writer: ConversationManager
) -> None:
    room = "cli:fold"
    for i in range(24):
        await writer.append_async(room, "user", f"[Message ID: {i}] turn {i}")
    async with _tail(redis_server.url, room, "--last", "0", "--count", "3") as tail:
        await tail.expect("following cli:fold at version 24 (24 entries")
        result = await writer.consolidate(room, keep_recent=5)
        assert result.outcome == "folded"
        head = result.folded - 1  # the summary takes the last folded turn's slot
        await tail.expect(f"entries up to #{head} folded into a summary: #{head} system")
        export = await writer.export_room(room)
        await writer.import_room(room, export, replace=True)  # a new epoch
        await tail.expect("window reset")
        code, _out, err = await tail.finish()
    assert code == 0, err


async def test_tail_waits_for_a_room_to_appear(
    redis_server: RedisServer, writer: ConversationManager
) -> None:
    async with _tail(redis_server.url, "cli:later", "--count", "1") as tail:
        await tail.expect("waiting for room cli:later to appear")
        await writer.append_async("cli:later", "user", "[Message ID: 5] here now")
        await tail.expect("room cli:later appeared at version 1")
        await tail.expect("+ #0 user: [Message ID: 5] here now")
        code, _out, err = await tail.finish()
    assert code == 0, err


async def test_tail_stops_cleanly_on_ctrl_c(
    redis_server: RedisServer, writer: ConversationManager
) -> None:
    await writer.append_async("cli:quiet", "user", "[Message ID: 1] hi")
    async with _tail(redis_server.url, "cli:quiet") as tail:
        await tail.expect("following cli:quiet")
        tail.process.send_signal(signal.SIGINT)
        code, _out, err = await tail.finish()
    assert code == 0
    assert err == ""


async def test_tail_stops_after_its_timeout(redis_server: RedisServer) -> None:
    async with _tail(redis_server.url, "cli:idle", "--timeout", "0.3") as tail:
        code, out, err = await tail.finish()
    assert code == 0, err
    assert "(stopped after --timeout 0.3s)" in out


# ----------------------------------------------------------------- cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[object]:
    from cluster_servers import LocalCluster

    deployment = LocalCluster(tmp_path / "cluster", primaries=3, replicas_per_primary=0).start()
    try:
        yield deployment
    finally:
        deployment.stop()


def test_rooms_inspect_and_stats_on_a_cluster_scan_every_primary(
    cluster: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from redis.cluster import key_slot  # type: ignore[attr-defined]

    port = cluster.startup_nodes[0][1]  # type: ignore[attr-defined]
    url = f"redis://127.0.0.1:{port}/0"
    rooms = [f"cl:{index}" for index in range(12)]

    async def populate() -> None:
        client = aioredis.RedisCluster(host="127.0.0.1", port=port)
        manager = ConversationManager(None, redis=client)
        try:
            for room in rooms:
                await manager.append_async(room, "user", f"[Message ID: 1] in {room}")
        finally:
            await manager.aclose()
            await client.aclose()

    asyncio.run(populate())
    owners = {cluster.slot_owner(key_slot(f"{{{room}}}".encode())).port for room in rooms}  # type: ignore[attr-defined]
    assert len(owners) == 3  # the rooms really are spread over the primaries

    assert main(["--redis-url", url, "rooms", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["cluster"] is True
    assert sorted(room["room"] for room in payload["rooms"]) == sorted(rooms)

    assert main(["--redis-url", url, "inspect", "cl:7"]) == 0
    assert "[Message ID: 1] in cl:7" in capsys.readouterr().out

    assert main(["--redis-url", url, "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert len(stats["servers"]) == 3
    assert stats["rooms"]["count"] == 12
