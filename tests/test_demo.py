"""The multi-process demo, end to end at a small size, and its building blocks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis_servers import REDIS_SERVER, RedisServer

from conversation._tools.demo import (
    PLATFORM_ROOM_CATALOGUE,
    ROOM_CATALOGUE,
    WEATHER_TOOL,
    FakeModel,
    build_script,
    compare_windows,
    fake_weather,
    script_summary,
)
from conversation._tools.demo_events import Event
from conversation._tools.demo_platform import (
    EARLY_EDIT_SUFFIX,
    check_outcome,
    to_payloads,
)
from conversation._tools.redis_server import SERVER_ENV
from conversation._tools.terminal import Palette

ROOT = Path(__file__).resolve().parent.parent
ROOMS = [room for room, *_ in ROOM_CATALOGUE[:3]]
PLATFORM_ROOMS = [room for room, *_ in PLATFORM_ROOM_CATALOGUE[:3]]

pytestmark = [pytest.mark.slow, pytest.mark.real_server]


def _demo(
    *args: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", *drop)}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "conversation", "demo", *args],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=ROOT,
        env=environment,
    )


def _assert_converged(result: subprocess.CompletedProcess[str], rooms: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    plural = "s" if rooms != 1 else ""
    assert f"converged: 3 workers × {rooms} room{plural} hold exactly what Redis holds" in out
    assert out.count("✓ equal") == 3 * rooms
    assert "✗" not in out
    assert "NOT converged" not in out
    assert "Traceback" not in result.stderr


def _note_count(out: str, note: str) -> int:
    """How often the demo's notes say ``note``: ``note: N``, or ``note`` alone for one."""
    for line in out.splitlines():
        text = line.strip().removeprefix("· ")
        if text == note:
            return 1
        if text.startswith(note + ": "):
            return int(text.removeprefix(note + ": "))
    return 0


def test_demo_converges_on_a_private_redis_server(redis_server: RedisServer) -> None:
    result = _demo("--redis-url", redis_server.url, "--rooms", "2", "--events", "60", "--seed", "3")
    _assert_converged(result, rooms=2)
    out = result.stdout
    assert f"Redis at {redis_server.url}" in out
    assert "FAKE deterministic model" in out
    assert "All 60 events handled by every worker" in out
    # The rendered prompt and the window of the showcase room.
    assert "Rendered inference prompt for demo:discord:general" in out
    assert "FALLBACK" not in out
    assert "Window of demo:discord:general" in out
    assert "[Reactions: " in out
    assert "<image https://images.example.com/general/" in out
    # The stats table: every worker handled every event, without errors.
    for role in ("inference", "agents", "consolidation"):
        row = next(line.split() for line in out.splitlines() if line.strip().startswith(role))
        assert row[2] == "60", row  # events
        assert row[-1] == "0", row  # errors
    # Each of the two /weather requests gets its tool call, unless the room lost the
    # request first: a /clear or a fold may come before a slow agents worker reads it
    # (as on a loaded machine), and the demo says so rather than answer it.
    tool_calls = _note_count(out, "agents: tool calls")
    gone = _note_count(out, "agents: requests gone before the agent ran")
    assert tool_calls >= 1 and tool_calls + gone == 2, (tool_calls, gone)
    # The consolidation worker folded the long rooms: a summary heads their windows.
    assert "consolidation: rooms folded" in out

    # An independent look at Redis after the demo: every consumer group read and
    # acknowledged every event, and each room's window is the one the demo printed.
    with redis_server.sync_client() as client:
        groups = {g["name"].decode(): g for g in client.xinfo_groups("sg:demo:events")}
        assert set(groups) == {"inference", "agents", "consolidation"}
        for group in groups.values():
            assert group["pending"] == 0
            assert group["entries-read"] == 60
        for room in ROOMS[:2]:
            key = f"sg:conversation:{{{room}}}"
            entries = client.llen(key)
            version = int(client.hget(f"{key}:meta", "version") or 0)
            assert re.search(rf"{re.escape(room)}\s+{entries}\s+{version}\s+✓ equal", out), room
        calls = 0
        for room in ROOMS[:2]:
            rows = [orjson.loads(r) for r in client.lrange(f"sg:conversation:{{{room}}}", 0, -1)]
            for index, row in enumerate(rows):
                if row.get("tool_calls"):  # each call is directly followed by its result
                    calls += 1
                    assert rows[index + 1]["role"] == "tool"
                    assert rows[index + 1]["tool_call_id"] == row["tool_calls"][0]["id"]
        assert calls >= 1, "the agents worker's tool call is in the window"
        summaries = [
            orjson.loads(client.lindex(f"sg:conversation:{{{room}}}", 0) or b"{}")
            for room in ROOMS[:2]
        ]
        assert any(str(row.get("message_id", "")).startswith("summary:") for row in summaries)


def _expected_reactions(events: list[Event]) -> dict[str, str]:
    """The test's own fold of the per-user events: who holds which emoji, listed by
    count, ties by first seen (an emoji nobody holds any more starts again)."""
    held: dict[str, dict[str, set[str]]] = {}
    for event in events:
        if event.kind != "reaction":
            continue
        emoji = held.setdefault(event.data["message_id"], {})
        users = emoji.setdefault(event.data["emoji"], set())
        (users.add if event.data["op"] == "add" else users.discard)(event.data["user"])
        if not users:
            del emoji[event.data["emoji"]]
    return {
        message_id: ", ".join(
            f"{e} {len(u)}"
            for _, (e, u) in sorted(enumerate(emoji.items()), key=lambda i: (-len(i[1][1]), i[0]))
        )
        for message_id, emoji in held.items()
    }


def _text(row: dict[str, Any]) -> str:
    content = row["content"]
    return content if isinstance(content, str) else content[0]["text"]


def test_demo_with_platform_payloads_goes_through_the_discord_binding(
    redis_server: RedisServer,
) -> None:
    # Seed 13: the storm's 11 events include removes and 3 redelivered copies.
    args = ("--rooms", "2", "--events", "60", "--seed", "13")
    result = _demo("--platform-payloads", "--redis-url", redis_server.url, *args)
    _assert_converged(result, rooms=2)
    out = result.stdout
    payloads = to_payloads(build_script(PLATFORM_ROOMS[:2], 60, seed=13), seed=13)
    assert f"All {len(payloads)} events handled by every worker" in out
    assert "Platform payloads (discord.py parsed each gateway dict" in out
    for check in ("rooms", "names", "markers", "reactions", "storm", "edit before its message"):
        assert f"✓ {check}: " in out, check
    assert "PyNaCl" not in result.stderr

    (early,) = [e for e in payloads if e.data.get("early")]
    create = next(
        e
        for e in payloads
        if e.kind == "message" and e.data["message_id"] == early.data["message_id"]
    )
    assert early.seq < create.seq, "the edit is sent before its message"
    expected = _expected_reactions(payloads)
    storm = Counter(e.data["message_id"] for e in payloads if e.kind == "reaction")
    storm_id = storm.most_common(1)[0][0]
    on_storm = [
        e.data for e in payloads if e.kind == "reaction" and e.data["message_id"] == storm_id
    ]
    assert any(d.get("redelivered") for d in on_storm), "the storm has redelivered events"
    assert any(d["op"] == "remove" for d in on_storm), "and removes"
    with redis_server.sync_client() as client:
        for group in client.xinfo_groups("sg:demo:events"):
            assert group["pending"] == 0
            assert group["entries-read"] == len(payloads)
        rows = {
            str(row.get("message_id")): row
            for room in PLATFORM_ROOMS[:2]
            for row in map(orjson.loads, client.lrange(f"sg:conversation:{{{room}}}", 0, -1))
        }
    # Rooms, markers and names as the binding maps them.
    users = [row for row in rows.values() if row["role"] == "user"]
    assert users and all(_text(r).startswith(f"[Message ID: {r['message_id']}] ") for r in users)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", r["name"]) for r in users)
    assert any(r["name"] == "dara_mod" and "] dara (mod): " in _text(r) for r in users)
    # The bot's replies came back as the gateway's echo of its messages: assistant turns.
    replies = [r for r in rows.values() if r["role"] == "assistant" and "(fake model)" in _text(r)]
    assert replies and all("name" not in r for r in replies)
    # Reactions: exactly the per-user model, the storm's message included.
    assert storm_id in rows
    for message_id, summary in expected.items():
        if message_id in rows:
            tag = re.search(r"\[Reactions: ([^\]]*)\]", _text(rows[message_id]))
            assert (tag.group(1) if tag else "") == summary, message_id
    assert f"[Reactions: {expected[storm_id]}]" in _text(rows[storm_id])
    # The edit that arrived before its message was applied when the message landed.
    assert _text(rows[early.data["message_id"]]).endswith(EARLY_EDIT_SUFFIX)


@pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server on PATH")
def test_demo_embeds_a_private_redis_server_by_default() -> None:
    result = _demo("--rooms", "1", "--events", "40")
    _assert_converged(result, rooms=1)
    match = re.search(
        r"private (?:redis|valkey)-server \S+ on 127\.0\.0\.1:(\d+) \(pid (\d+);", result.stdout
    )
    assert match, result.stdout
    port, pid = int(match.group(1)), int(match.group(2))
    assert port != 6379
    # Stopped by pid before the demo exited.
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_demo_falls_back_to_fakeredis_tcp_server() -> None:
    result = _demo("--embedded", "fakeredis", "--rooms", "2", "--events", "40")
    _assert_converged(result, rooms=2)
    assert "fakeredis TCP server on 127.0.0.1:" in result.stdout


def test_demo_without_any_redis_is_a_clear_error(tmp_path: Path) -> None:
    # A PATH without redis-server, no $CONVERSATION_TEST_SERVER, fakeredis hidden:
    # nothing to run on.
    blocker = tmp_path / "fakeredis.py"
    blocker.write_text("raise ImportError('hidden for this test')\n")
    result = _demo(
        "--embedded",
        "auto",
        env={"PATH": str(tmp_path), "PYTHONPATH": str(tmp_path)},
        drop=(SERVER_ENV,),
    )
    assert result.returncode == 3
    assert "no Redis to run on: pass --redis-url" in result.stderr
    assert "Traceback" not in result.stderr


def test_platform_payloads_without_discord_py_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "discord.py").write_text("raise ImportError('hidden for this test')\n")
    result = _demo("--platform-payloads", env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2
    assert "--platform-payloads needs discord.py: pip install 'conversation[discord]'" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert "Redis:" not in result.stdout, "refused before starting anything"


# ------------------------------------------------------------ the pieces


def test_the_script_is_deterministic_and_has_every_kind_of_event() -> None:
    script = build_script(ROOMS, 40, seed=11)
    assert script == build_script(ROOMS, 40, seed=11)
    assert script != build_script(ROOMS, 40, seed=12)
    assert len(script) == 40
    assert [event.seq for event in script] == list(range(40))
    summary = script_summary(script)
    assert summary["image posts"] >= 1
    assert summary["tool requests"] == 2
    assert summary["/clear"] == 1
    assert summary["/limit"] == 1
    assert summary["deletes"] >= 1
    posts = {e.data["message_id"]: e for e in script if e.kind == "message"}
    edited_images = [
        e for e in script if e.kind == "edit" and posts[e.data["message_id"]].data["images"]
    ]
    assert edited_images, "an image post gets a text-only edit"
    storm = Counter(e.data["message_id"] for e in script if e.kind == "reaction")
    assert max(storm.values()) >= 8, "a reaction storm on one message"
    targets = [e.data["message_id"] for e in script if e.kind in {"edit", "delete", "reaction"}]
    assert set(targets) <= set(posts)


async def test_the_fake_model_is_deterministic_and_calls_the_tool() -> None:
    model = FakeModel(seed=1)
    question = {
        "role": "user",
        "name": "ana",
        "content": "[Message ID: 3] @Sage explain consumer groups",
    }
    first = await model.complete([question])
    assert first == await FakeModel(seed=1).complete([question])
    assert first["content"].startswith("(fake model) @ana ")

    request = {"role": "user", "content": "[Message ID: 4] /weather Oslo"}
    assert "tool_calls" not in await model.complete([request])  # no tools offered
    step = await model.complete([request], tools=[WEATHER_TOOL])
    (call,) = step["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}
    result = orjson.dumps(fake_weather("Oslo")).decode()
    final = await model.complete(
        [request, step, {"role": "tool", "tool_call_id": call["id"], "content": result}]
    )
    assert final["content"].startswith("(fake model) Oslo: ")


def test_platform_payloads_are_per_user_and_redeliveries_never_overtake() -> None:
    script = build_script(PLATFORM_ROOMS, 400, seed=5)
    payloads = to_payloads(script, seed=5)
    assert payloads == to_payloads(script, seed=5)
    assert [e.seq for e in payloads] == list(range(len(payloads)))
    assert all("summary" not in e.data for e in payloads), "platforms send no summaries"
    originals = [e for e in payloads if e.kind == "reaction" and not e.data.get("redelivered")]
    copies = [e for e in payloads if e.kind == "reaction" and e.data.get("redelivered")]
    assert 0.1 < len(copies) / len(originals) < 0.3
    holders: set[tuple[str, str, str]] = set()
    last: dict[tuple[str, str, str], Event] = {}
    for event in payloads:
        if event.kind != "reaction":
            continue
        data = event.data
        key = (data["message_id"], data["user"], data["emoji"])
        gateway = data["gateway"]
        assert gateway["t"] == f"MESSAGE_REACTION_{data['op'].upper()}"
        assert gateway["d"]["message_id"] == data["message_id"]
        if data.get("redelivered"):
            # A copy of the last event on its key: nothing on that key came between.
            assert last[key].data["op"] == data["op"]
            continue
        # Like a platform: an add by a user who has not reacted, a remove by one who has.
        assert (key in holders) == (data["op"] == "remove")
        (holders.add if data["op"] == "add" else holders.discard)(key)
        last[key] = event


def test_platform_check_reports_a_wrong_reaction_tag() -> None:
    payloads = to_payloads(build_script(PLATFORM_ROOMS[:1], 40, seed=2), seed=2)
    message_id = next(e.data["message_id"] for e in payloads if e.kind == "reaction")
    row = {"role": "user", "name": "Ana", "message_id": message_id,
           "content": f"[Message ID: {message_id}] [Reactions: 👍 99] Ana: hi"}  # fmt: skip
    outcome = check_outcome(payloads, {PLATFORM_ROOMS[0]: [row]}, deferred=1)
    assert not outcome.ok
    assert any(not passed and message_id in line for passed, line in outcome.lines)


def test_convergence_check_reports_a_differing_worker() -> None:
    same = [{"role": "user", "content": "a"}]
    verdict = compare_windows(
        ["r1", "r2"],
        {"inference": {"r1": same, "r2": []}, "agents": {"r1": same, "r2": same}},
        {"r1": (3, same), "r2": (1, [])},
        Palette(False),
    )
    assert not verdict.converged
    assert verdict.rows[0] == ["r1", "1", "3", "✓ equal", "✓ equal"]
    assert verdict.rows[1] == ["r2", "0", "1", "✓ equal", "✗ differs"]
    assert verdict.problems == ["agents / r2: 1 entries in the worker, 0 in Redis"]
