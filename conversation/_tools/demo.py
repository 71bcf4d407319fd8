"""The multi-process demo: ``python -m conversation demo``.

What runs, each in its own OS process (``multiprocessing`` with ``spawn``)::

    source ──XADD──▶ Redis Stream {prefix}:demo:events ──▶ consumer group "inference"
                                                      ├──▶ consumer group "agents"
                                                      └──▶ consumer group "consolidation"

* the **event source** replays a scripted, seeded platform conversation across
  several rooms: text messages, image posts (``image_url`` parts), text-only
  edits of image posts, deletes, a reaction storm on one message, a ``/clear``
  and a ``/limit`` change;
* the **inference worker** records every platform event in the rooms (append,
  ``update_message``, ``mark_deleted``, ``patch_reactions``, ``clear``,
  ``set_channel_limit``) and answers messages that mention the bot with a
  deterministic FAKE model (no network, no weights; ``--model`` plugs a real one);
* the **agents worker** answers ``/weather`` requests with a tool call: it waits
  until the request is visible in its own window (catching up from Redis),
  then records the assistant ``tool_calls`` entry and the tool result as one
  group, and a final answer;
* the **consolidation worker** follows the rooms and calls the engine's
  consolidation API (``should_consolidate``/``consolidate``, SPEC §21) when the
  engine has it — see ``_ConsolidationWorker.consolidate`` for the hook.

Every worker handles each batch with the engine's sync write forms (so a
reaction storm coalesces into one replace), ``drain()``\\ s, and only then
acknowledges the batch: an acknowledged event is in Redis. When every group
has acknowledged every event, the parent sends SIGTERM; each worker drains,
calls ``ensure_fresh_from_redis`` for every room and reports its windows. The
parent compares them with an independent ``MULTI``/``LRANGE`` read of Redis and
exits non-zero if any differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib
import logging
import multiprocessing
import os
import queue as queue_module
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from .._consolidation.config import ConsolidationConfig
from .._consolidation.worker import ConsolidationWorker
from .._manager import ConversationManager, Renderer
from .._redis.keys import KeySpace
from .._renderer import PromptRenderer
from .demo_events import Event
from .reading import RoomReader
from .redis_server import RedisServerProcess, ServerBinaryError, find_server_binary
from .targets import RedisTarget, connect, make_client, redact_url
from .terminal import (
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    Palette,
    Progress,
    content_width,
    entry_rows,
    format_table,
)

logger = logging.getLogger(__name__)

ROLES = ("inference", "agents", "consolidation")
TEMPLATES = {"inference": "inference", "agents": "agents", "consolidation": "consolidation"}
BOT_NAME = "Sage"
DEMO_TTL_SECONDS = 24 * 3600
MAX_HISTORY = 100
# Folds early, so that even a short run shows the consolidation worker at work.
DEMO_CONSOLIDATION = ConsolidationConfig(max_turns=24, keep_recent=18)
# Events per batch: a worker acknowledges a batch once its writes are in Redis,
# so small batches keep the workers close behind each other.
_READ_COUNT = 16
_BLOCK_MS = 250
_REPORT_TIMEOUT = 60.0

# Rooms: (room id, platform, channel name, is a direct message).
ROOM_CATALOGUE: tuple[tuple[str, str, str, bool], ...] = (
    ("demo:discord:general", "Discord", "#general", False),
    ("demo:slack:eng-platform", "Slack", "#eng-platform", False),
    ("demo:telegram:dm-ana", "Telegram", "DM with ana", True),
    ("demo:discord:gaming", "Discord", "#gaming", False),
    ("demo:matrix:rust", "Matrix", "#rust", False),
    ("demo:slack:random", "Slack", "#random", False),
    ("demo:discord:art", "Discord", "#art", False),
    ("demo:telegram:dm-bo", "Telegram", "DM with bo", True),
    ("demo:slack:incidents", "Slack", "#incidents", False),
    ("demo:discord:music", "Discord", "#music", False),
    ("demo:matrix:python", "Matrix", "#python", False),
    ("demo:discord:books", "Discord", "#books", False),
)
# The same rooms as Discord channels, for --platform-payloads: the binding's
# room ids are ``discord:<channel id>``.
PLATFORM_ROOM_CATALOGUE: tuple[tuple[str, str, str, bool], ...] = tuple(
    (f"discord:{1001 + index}", "Discord", name, dm)
    for index, (_, _, name, dm) in enumerate(ROOM_CATALOGUE)
)
_ROOM_INFO = {
    room: (platform, name, dm)
    for room, platform, name, dm in ROOM_CATALOGUE + PLATFORM_ROOM_CATALOGUE
}


# ====================================================================== script


_USERS = ("ana", "bo", "chen", "dara", "eli", "farah")
_CHATTER = (
    "morning all",
    "anyone tried the new ramen place on 5th?",
    "deploy is green again, thanks for the quick fix",
    "lol that's exactly what happened last sprint",
    "I'll pick this up after lunch",
    "can someone review my PR? it's small, promise",
    "the build cache saved us 6 minutes per run",
    "meeting moved to 3pm",
    "who broke the staging database 😅",
    "+1, same here",
    "that screenshot is from the old dashboard",
    "brb, coffee",
    "fixed the flaky test, it was a timezone thing",
    "does anyone have the link to the design doc?",
    "weekend plans? I'm hiking if the weather holds",
    "TIL redis streams have consumer groups",
)
_QUESTIONS = (
    "@Sage can you summarise what we decided about the release?",
    "@Sage what's a good name for a cache-warming job?",
    "@Sage remind me what the on-call rotation looks like?",
    "@Sage is it rude to ping people on a Sunday?",
    "@Sage explain consumer groups like I'm five",
    "@Sage what did ana say about the ramen place?",
    "@Sage any tips for writing a good postmortem?",
)
_IMAGE_CAPTIONS = (
    "look at this sunset from the office",
    "new dashboard mockup, thoughts?",
    "my cat has opinions about standup",
    "whiteboard from today's planning",
)
_EDIT_SUFFIXES = ("(edited: fixed typo)", "(edited: added context)", "(edited: typo)")
_IMAGE_EDIT_SUFFIXES = ("(edited: better crop)", "(edited: caption)", "(edited: new angle)")
_CITIES = ("Lisbon", "Oslo", "Kyoto", "Nairobi", "Montreal", "Valparaíso")
_EMOJI = ("👍", "😂", "🔥", "❤️", "👀", "🎉")
_BASE_TIME = dt.datetime(2025, 3, 14, 9, 30, tzinfo=dt.UTC)


@dataclass(slots=True)
class _Posted:
    message_id: str
    author: str
    text: str
    images: int
    deleted: bool = False


class _ScriptBuilder:
    def __init__(self, rooms: Sequence[str], rng: random.Random) -> None:
        self.rooms = list(rooms)
        self.rng = rng
        self.events: list[Event] = []
        self.next_id = 1_000_100
        self.posted: dict[str, list[_Posted]] = {room: [] for room in rooms}
        self.reactions: dict[str, Counter[str]] = {}
        self.seconds = 0
        self.decks: dict[str, list[str]] = {}

    def _next(self, deck: str, lines: Sequence[str]) -> str:
        """Lines in a shuffled order, each used once before any repeats."""
        cards = self.decks.setdefault(deck, [])
        if not cards:
            cards.extend(lines)
            self.rng.shuffle(cards)
        return cards.pop()

    def _emit(self, kind: str, room: str, **data: Any) -> Event:
        self.seconds += self.rng.randint(2, 40)
        data["at"] = (
            (_BASE_TIME + dt.timedelta(seconds=self.seconds)).isoformat().replace("+00:00", "Z")
        )
        event = Event(len(self.events), kind, room, data)
        self.events.append(event)
        return event

    def message(
        self,
        room: str,
        text: str | None = None,
        *,
        author: str | None = None,
        images: int = 0,
        tool_city: str | None = None,
        mention: bool = False,
    ) -> _Posted:
        author = author or self.rng.choice(_USERS)
        message_id = str(self.next_id)
        self.next_id += self.rng.randint(1, 9)
        if text is None:
            text = self._next("chatter", _CHATTER)
        urls = [
            f"https://images.example.com/{room.rsplit(':', 1)[-1]}/{message_id}-{index}.jpg"
            for index in range(images)
        ]
        tool = {"name": "get_weather", "arguments": {"city": tool_city}} if tool_city else None
        self._emit(
            "message",
            room,
            message_id=message_id,
            author=author,
            text=text,
            images=urls,
            mentions_bot=mention or _ROOM_INFO.get(room, ("", "", False))[2],
            tool=tool,
        )
        posted = _Posted(message_id, author, text, images)
        self.posted[room].append(posted)
        return posted

    def image_post(self, room: str, images: int = 1) -> _Posted:
        return self.message(room, self._next("captions", _IMAGE_CAPTIONS), images=images)

    def weather(self, room: str) -> _Posted:
        city = self.rng.choice(_CITIES)
        return self.message(room, f"/weather {city}", tool_city=city)

    def edit(self, room: str, target: _Posted | None = None) -> None:
        target = target or self._recent(room, prefer_images=True)
        if target is None:
            self.message(room)
            return
        suffixes = _IMAGE_EDIT_SUFFIXES if target.images else _EDIT_SUFFIXES
        original = target.text.split(" (edited", 1)[0]
        target.text = f"{original} {self.rng.choice(suffixes)}"
        self._emit(
            "edit", room, message_id=target.message_id, author=target.author, text=target.text
        )

    def delete(self, room: str, target: _Posted | None = None) -> None:
        target = target or self._recent(room, prefer_images=False, text_only=True)
        if target is None:
            self.message(room)
            return
        target.deleted = True
        self._emit("delete", room, message_id=target.message_id)

    def react(self, room: str, target: _Posted | None = None) -> None:
        target = target or self._recent(room, prefer_images=False)
        if target is None:
            self.message(room)
            return
        counts = self.reactions.setdefault(target.message_id, Counter())
        emoji = self.rng.choice(_EMOJI[:4])
        if counts[emoji] and self.rng.random() < 0.25:
            counts[emoji] -= 1
            op = "remove"
        else:
            counts[emoji] += 1
            op = "add"
        summary = ", ".join(f"{e} {n}" for e, n in sorted(counts.items(), key=_by_count) if n)
        self._emit(
            "reaction",
            room,
            message_id=target.message_id,
            emoji=emoji,
            op=op,
            user=self.rng.choice(_USERS),
            summary=summary,
        )

    def command(self, room: str, name: str, value: int | None = None) -> None:
        self._emit("command", room, name=name, value=value, author=self.rng.choice(_USERS))
        if name == "clear":
            self.posted[room] = []

    def filler(self) -> None:
        weights = [3] + [1] * (len(self.rooms) - 1)
        room = self.rng.choices(self.rooms, weights)[0]
        roll = self.rng.random()
        if roll < 0.54:
            self.message(room)
        elif roll < 0.68:
            self.message(room, self._next("questions", _QUESTIONS), mention=True)
        elif roll < 0.71:
            self.image_post(room)
        elif roll < 0.80:
            self.edit(room)
        elif roll < 0.84:
            self.delete(room)
        else:
            self.react(room)

    def _recent(self, room: str, *, prefer_images: bool, text_only: bool = False) -> _Posted | None:
        candidates = [
            p
            for p in self.posted[room][-8:]
            if not p.deleted and not (text_only and p.images) and not p.text.startswith("/")
        ]
        if prefer_images and any(p.images for p in candidates):
            candidates = [p for p in candidates if p.images]
        return self.rng.choice(candidates) if candidates else None


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return (-item[1], item[0])


def build_script(rooms: Sequence[str], events: int, seed: int) -> list[Event]:
    """The scripted platform conversation: deterministic for a given seed.

    Whatever the size, it contains an image post and a text-only edit of it, a
    deleted message, a reaction storm on one message, two ``/weather`` tool
    requests (one with a single room), one ``/clear`` and one ``/limit``
    change; the rest is chatter.
    """
    if not rooms:
        raise ValueError("the demo needs at least one room")
    rng = random.Random(seed)
    b = _ScriptBuilder(rooms, rng)
    first, second, last = rooms[0], rooms[1 % len(rooms)], rooms[-1]
    storm = max(8, min(30, events // 8))
    shown: dict[str, _Posted] = {}

    def image_two() -> None:
        shown["image"] = b.image_post(first, images=2)

    def storm_on_image() -> None:
        for _ in range(min(storm, events - len(b.events))):
            b.react(first, shown["image"])

    # Early scenes sit at fractions of the script; the showcase room's (the
    # first's) image post, edit, reaction storm and tool call are counted back
    # from the end, so they are still in its window when the demo shows it.
    tail = events - storm
    # The agents worker answers a request only while it is in the window: keep
    # the early request out of the room that gets the /clear.
    early_tool_room = next((room for room in (second, first) if room != last), None)
    scenes: list[tuple[float, Callable[[], object]]] = sorted(
        [
            (0, lambda: b.message(first, "morning all — Sage is in this room today")),
            (0.06 * events, lambda: shown.setdefault("early", b.image_post(first))),
            (0.10 * events, lambda: b.weather(early_tool_room) if early_tool_room else None),
            (0.14 * events, lambda: b.edit(first, shown["early"])),
            (0.22 * events, lambda: b.delete(second)),
            (0.40 * events, lambda: b.command(first, "limit", 50)),
            (0.50 * events, lambda: b.command(last, "clear")),
            (tail - 12, image_two),
            (tail - 10, lambda: b.edit(first, shown["image"])),
            (tail - 8, storm_on_image),
            (events - 5, lambda: b.weather(first)),
            (events - 2, lambda: b.delete(first)),
        ],
        key=lambda scene: scene[0],
    )
    while len(b.events) < events:
        if scenes and len(b.events) >= scenes[0][0]:
            scenes.pop(0)[1]()
        else:
            b.filler()
    return b.events[:events]


def script_summary(events: Sequence[Event]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for event in events:
        if event.kind == "message":
            if event.data.get("tool"):
                counts["tool requests"] += 1
            elif event.data.get("images"):
                counts["image posts"] += 1
            else:
                counts["messages"] += 1
        elif event.kind == "command":
            counts[f"/{event.data['name']}"] += 1
        else:
            counts[f"{event.kind}s"] += 1
    order = ["messages", "image posts", "edits", "deletes", "reactions", "tool requests"]
    return {key: counts[key] for key in order + sorted(set(counts) - set(order))}


# ======================================================================= model


class ChatModel(Protocol):
    """What the workers need of a chat model: one OpenAI-format assistant message.

    Plug a real model with ``--model package.module:factory``; the factory is
    called with no arguments in each worker process.
    """

    name: str

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]: ...


_WEATHER = re.compile(r"/weather\s+(\S.*)$")
_ANSWERS = (
    ("release", "we agreed to ship on Thursday, after the migration lands."),
    ("name", "I'd call it `warmup-cron`; boring names age well."),
    ("on-call", "two people per week, handover on Mondays at 10."),
    ("sunday", "a gentle rule: ping if it's urgent, otherwise it can wait for Monday."),
    (
        "consumer group",
        "a group is one shared inbox: each message goes to one member, "
        "and nothing is lost if someone is away.",
    ),
    ("ramen", "ana said the broth was great but the queue was long."),
    (
        "postmortem",
        "lead with impact, then the timeline, then what changes; blame the process, not people.",
    ),
)
_GENERIC_ANSWERS = (
    "happy to help — could you say a bit more?",
    "noted! I'll keep that in mind.",
    "good question; short answer: it depends on the load.",
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city (demo tool: FAKE data).",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def _digest(*parts: str) -> int:
    # Not hash(): that is salted per process, and the model must agree across workers.
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def _text_of(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                return str(part.get("text", ""))
    return ""


_MARKERS = re.compile(r"\[(?:Message ID|deleted at|Reactions):[^\]]*\]\s*|\[deleted at [^\]]*\]\s*")


class FakeModel:
    """A deterministic stand-in for an LLM. FAKE: no network, no weights.

    Its reply depends only on the last message it is given (and the seed), so
    every run of the demo tells the same story. Replies start with
    ``(fake model)`` so nobody mistakes them for a real model's.
    """

    name = "FAKE deterministic model (no LLM)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] = (),
    ) -> dict[str, Any]:
        if not messages:
            return {"role": "assistant", "content": "(fake model) hello!"}
        last = messages[-1]
        if last.get("role") == "tool":
            return {"role": "assistant", "content": self._weather_answer(_text_of(last))}
        text = _MARKERS.sub("", _text_of(last)).strip()
        match = _WEATHER.search(text)
        if match and any(_tool_name(t) == "get_weather" for t in tools):
            city = match.group(1).strip()
            call_id = f"call_{_digest(str(self.seed), text) % 16**8:08x}"
            arguments = orjson.dumps({"city": city}).decode()
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": arguments},
                    }
                ],
            }
        who = str(last.get("name") or "there")
        content = last.get("content")
        parts: list[Any] = content if isinstance(content, list) else []
        images = sum(
            1 for part in parts if isinstance(part, Mapping) and part.get("type") == "image_url"
        )
        lowered = text.lower()
        answer = next(
            (reply for keyword, reply in _ANSWERS if keyword in lowered),
            _GENERIC_ANSWERS[_digest(str(self.seed), text) % len(_GENERIC_ANSWERS)],
        )
        seen = f" (I can see {images} image{'s' if images != 1 else ''})" if images else ""
        return {"role": "assistant", "content": f"(fake model) @{who}{seen} {answer}"}

    @staticmethod
    def _weather_answer(result: str) -> str:
        try:
            data = orjson.loads(result)
        except orjson.JSONDecodeError:
            return "(fake model) the weather service answered something I cannot read."
        return (
            f"(fake model) {data.get('city')}: {data.get('temp_c')}°C and "
            f"{data.get('conditions')} (demo data, not a forecast)."
        )


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    function = tool.get("function")
    return str(function.get("name")) if isinstance(function, Mapping) else None


def fake_weather(city: str) -> dict[str, Any]:
    """The demo's tool: deterministic FAKE weather."""
    value = _digest("weather", city)
    conditions = ("sunny", "cloudy", "light rain", "windy", "foggy", "clear skies")
    return {
        "city": city,
        "temp_c": 4 + value % 24,
        "conditions": conditions[value // 24 % len(conditions)],
        "source": "demo (fake data)",
    }


def load_model(spec: str | None, seed: int) -> ChatModel:
    """``None``: the FakeModel; else ``module:factory`` called with no arguments."""
    if spec is None:
        return FakeModel(seed)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--model must look like package.module:factory, got {spec!r}")
    factory = getattr(importlib.import_module(module_name), attribute)
    model: ChatModel = factory()
    return model


# ================================================================== renderers


class FallbackRenderer:
    """Used only when the packaged prompt templates cannot be loaded; says so."""

    def __init__(self, template: str, reason: str) -> None:
        self.template = template
        self.reason = reason

    def render(self, room_context: Mapping[str, Any] | None = None) -> str:
        ctx = dict(room_context or {})
        return (
            f"You are {ctx.get('bot_name', BOT_NAME)}, a helpful assistant in "
            f"{ctx.get('room_name', 'this room')} on {ctx.get('platform', 'a chat platform')}.\n"
            f"(demo fallback prompt: the packaged {self.template!r} template could not be "
            f"loaded: {self.reason})"
        )

    async def render_async(self, room_context: Mapping[str, Any] | None = None) -> str:
        return self.render(room_context)


def make_renderer(template: str) -> Renderer:
    """The package's ``PromptRenderer`` for ``template``, or a labelled fallback."""
    try:
        renderer: Renderer = PromptRenderer(template)
        renderer.render(room_context(ROOM_CATALOGUE[0][0], template))
    except Exception as exc:
        logger.warning("prompt template %r unavailable, using a fallback: %s", template, exc)
        return FallbackRenderer(template, f"{type(exc).__name__}: {exc}".splitlines()[0])
    return renderer


def room_context(
    room: str, worker: str, sender: str | None = None, now: str | None = None
) -> dict[str, Any]:
    platform, name, dm = _ROOM_INFO.get(room, ("Chat", room, False))
    context: dict[str, Any] = {
        "bot_name": BOT_NAME,
        "platform": platform,
        "room_name": name,
        "room_id": room,
        "is_dm": dm,
        "participants": list(_USERS[:2] if dm else _USERS),
        "timezone": "Europe/Lisbon",
        "worker": worker,
    }
    if sender:
        context["sender"] = sender
    if now:
        context["now"] = now  # the platform's event time: prompts are reproducible
    if worker == "agents":
        context["tools"] = [WEATHER_TOOL["function"]]
    return context


# ===================================================================== workers


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """What every child process is given (picklable)."""

    redis_url: str
    cluster: bool
    prefix: str
    stream: str
    rooms: tuple[str, ...]
    seed: int
    rate: float
    model: str | None
    verbose: bool
    max_history: int = MAX_HISTORY
    platform_payloads: bool = False


Report = Callable[[tuple[Any, ...]], None]


class _Worker:
    """Consumes the stream in its role's consumer group; drains on SIGTERM."""

    role = "worker"

    def __init__(self, config: DemoConfig, report: Report) -> None:
        self.config = config
        self.report = report
        self.stop = asyncio.Event()
        self.events = 0
        self.errors = 0
        self.notes: Counter[str] = Counter()
        self.client: Any = make_client(config.redis_url, cluster=config.cluster)
        self.renderer: Renderer = make_renderer(TEMPLATES.get(self.role, "inference"))
        self.model: ChatModel = load_model(config.model, config.seed)
        self.manager = ConversationManager(
            self.renderer,
            max_history=config.max_history,
            redis=self.client,
            key_prefix=config.prefix,
            ttl_seconds=DEMO_TTL_SECONDS,
            consolidation=DEMO_CONSOLIDATION,
        )
        self.feed: Any = None  # demo_platform.GatewayFeed with --platform-payloads

    async def run(self) -> None:
        if self.config.platform_payloads:
            from . import demo_platform  # noqa: PLC0415 (needs discord.py)

            self.feed = demo_platform.GatewayFeed(self.manager)
            await self.feed.start()
        try:
            with _stop_on_sigterm(self.stop):
                await self._run()
        finally:
            if self.feed is not None:
                await self.feed.close()

    async def post_reply(self, room: str, message_id: str, text: str, at: str) -> None:
        """The bot's reply to ``message_id``: appended directly, or, with platform
        payloads, as the gateway's echo of the bot's message through the binding."""
        if self.feed is None:
            bot_id = f"bot-{message_id}"
            content = f"[Message ID: {bot_id}] {text}"
            if self.role == "inference":  # queued behind the batch's other sync writes
                self.manager.append(room, "assistant", content, message_id=bot_id, name=BOT_NAME)
            else:
                await self.manager.append_async(
                    room, "assistant", content, message_id=bot_id, name=BOT_NAME
                )
            return
        from . import demo_platform  # noqa: PLC0415

        reply_id = demo_platform.bot_reply_id(message_id)
        await self.feed.deliver(demo_platform.bot_message(room, reply_id, text, at))

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            self.report(("ready", self.role, os.getpid()))
            await self.consume()
            logger.info("%s: stopping, draining writes", self.role)
            await self.manager.drain(timeout=30)
            windows: dict[str, list[dict[str, Any]]] = {}
            for room in self.config.rooms:
                await self.manager.ensure_fresh_from_redis(room)
                messages = self.manager.get_messages(room)
                windows[room] = messages[1:]  # [0] is the rendered system prompt
            self.report(
                (
                    "report",
                    self.role,
                    {
                        "pid": os.getpid(),
                        "events": self.events,
                        "errors": self.errors,
                        "notes": dict(self.notes),
                        "elapsed": time.monotonic() - started,
                        "stats": self.manager.stats(),
                        "windows": windows,
                    },
                )
            )
        finally:
            with contextlib.suppress(Exception):
                await self.manager.aclose(timeout=10)
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def consume(self) -> None:
        loop = asyncio.get_running_loop()
        consumer = f"{self.role}-{os.getpid()}"
        stream = self.config.stream
        while not self.stop.is_set():
            asked = loop.time()
            reply = await self.client.xreadgroup(
                self.role, consumer, {stream: ">"}, count=_READ_COUNT, block=_BLOCK_MS
            )
            entries = [entry for _, batch in reply or () for entry in batch]
            if not entries:
                # fakeredis answers an empty XREADGROUP at once instead of blocking:
                # wait out the block time, but wake at once on SIGTERM.
                remaining = _BLOCK_MS / 1000 - (loop.time() - asked)
                if remaining > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), remaining)
                continue
            done: list[bytes] = []
            for entry_id, fields in entries:
                if self.stop.is_set():
                    break  # the rest stays pending for whoever takes over
                event = Event.from_fields(fields)
                try:
                    await self.handle(event, entry_id)
                except Exception:
                    self.errors += 1
                    logger.exception(
                        "%s: room %s: event %d (%s) failed",
                        self.role,
                        event.room,
                        event.seq,
                        event.kind,
                    )
                done.append(entry_id)
            await self.manager.drain(timeout=60)
            if done:
                await self.client.xack(stream, self.role, *done)
                self.events += len(done)
                self.report(("progress", self.role, self.events))

    async def handle(self, event: Event, entry_id: bytes) -> None:
        raise NotImplementedError

    async def inference_done_with(self, entry_id: bytes) -> bool:
        """True once the inference group has acknowledged this stream entry."""
        groups = await self.client.xinfo_groups(self.config.stream)
        for group in groups:
            if group.get("name") in (b"inference", "inference"):
                delivered = group.get("last-delivered-id") or b"0-0"
                if _stream_id(delivered) < _stream_id(entry_id):
                    return False
                pending = await self.client.xpending_range(
                    self.config.stream, "inference", min=entry_id, max=entry_id, count=1
                )
                return not pending
        return True

    async def wait_for_inference(self, entry_id: bytes) -> bool:
        """Wait until the inference worker has recorded this event (False on SIGTERM)."""
        delay = 0.005
        while not await self.inference_done_with(entry_id):
            if self.stop.is_set():
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            delay = min(delay * 2, 0.1)
        return True


def _content(data: Mapping[str, Any]) -> str | list[dict[str, Any]]:
    text = f"[Message ID: {data['message_id']}] {data['text']}"
    images = data.get("images") or []
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts.extend({"type": "image_url", "image_url": {"url": url}} for url in images)
    return parts


def _upto(messages: list[dict[str, Any]], marker: str) -> list[dict[str, Any]] | None:
    """The messages up to and including the one carrying ``marker`` (None if absent)."""
    for index in range(len(messages) - 1, -1, -1):
        if marker in _text_of(messages[index]):
            return messages[: index + 1]
    return None


class _InferenceWorker(_Worker):
    """Records every platform event and answers messages that mention the bot."""

    role = "inference"

    async def handle(self, event: Event, entry_id: bytes) -> None:
        m, room, data = self.manager, event.room, event.data
        gateway = data.get("gateway")
        if gateway is not None and self.feed is not None:
            # discord.py parses the payload; the binding makes the engine call.
            await self.feed.deliver(gateway)
            if event.kind == "message" and data.get("mentions_bot") and not data.get("tool"):
                await self.answer(room, data)
        elif event.kind == "message":
            m.append(
                room, "user", _content(data), message_id=data["message_id"], name=data["author"]
            )
            if data.get("mentions_bot") and not data.get("tool"):
                await self.answer(room, data)
        elif event.kind == "edit":
            content = f"[Message ID: {data['message_id']}] {data['text']}"
            # A text-only edit of an image post: the engine keeps the image parts.
            if not m.update_message(room, data["message_id"], content):
                self._found(await m.update_message_async(room, data["message_id"], content))
        elif event.kind == "delete":
            if not m.mark_deleted(room, data["message_id"], data["at"]):
                self._found(await m.mark_deleted_async(room, data["message_id"], data["at"]))
        elif event.kind == "reaction":
            # Sync form: a storm of reactions on one message coalesces into one replace.
            if not m.patch_reactions(room, data["message_id"], data["summary"]):
                self._found(
                    await m.patch_reactions_async(room, data["message_id"], data["summary"])
                )
        elif event.kind == "command" and data["name"] == "clear":
            m.clear(room)
            logger.info("room %s: cleared by /clear", room)
        elif event.kind == "command" and data["name"] == "limit":
            applied = m.set_channel_limit(room, int(data["value"]))
            logger.info("room %s: window limit set to %d", room, applied)
            if m.is_rebackfill_requested(room):
                # A real bot would fetch older platform history (backfill_async);
                # the demo has none to fetch.
                m.discard_rebackfill_request(room)

    def _found(self, found: bool) -> None:
        if not found:
            self.notes["edits of messages no longer in the window"] += 1

    async def answer(self, room: str, data: Mapping[str, Any]) -> None:
        marker = f"[Message ID: {data['message_id']}]"
        context = room_context(room, self.role, data["author"], data["at"])
        messages = await self.manager.get_messages_async(room, context)
        prompt = _upto(messages, marker)
        if prompt is None:
            return
        reply = await self.model.complete(prompt)
        await self.post_reply(room, data["message_id"], reply.get("content") or "", data["at"])
        self.notes["answers"] += 1


class _AgentsWorker(_Worker):
    """Answers ``/weather`` requests with a tool call recorded as one group."""

    role = "agents"

    async def handle(self, event: Event, entry_id: bytes) -> None:
        tool = event.data.get("tool")
        if event.kind != "message" or not tool:
            return
        room, data = event.room, event.data
        marker = f"[Message ID: {data['message_id']}]"
        context = room_context(room, self.role, data["author"], data["at"])
        prompt = await self.wait_visible(room, marker, entry_id, context)
        if prompt is None:
            self.notes["requests gone before the agent ran"] += 1
            return
        step = await self.model.complete(prompt, tools=[WEATHER_TOOL])
        calls = step.get("tool_calls") or []
        if not calls:
            return
        call = calls[0]
        arguments = orjson.loads(call["function"]["arguments"])
        result = orjson.dumps(fake_weather(str(arguments.get("city", "")))).decode()
        # The assistant call and its result go in as one write: nothing can land
        # between them, and neither lands without the other.
        await self.manager.append_many_async(
            room,
            [
                {"role": "assistant", "content": step.get("content") or "", "tool_calls": calls},
                {"role": "tool", "content": result, "tool_call_id": call["id"]},
            ],
        )
        tool_message = {"role": "tool", "content": result, "tool_call_id": call["id"]}
        final = await self.model.complete(
            [*prompt, {**step, "tool_calls": calls}, tool_message], tools=[WEATHER_TOOL]
        )
        await self.post_reply(room, data["message_id"], final.get("content") or "", data["at"])
        self.notes["tool calls"] += 1
        logger.info("room %s: answered request %s with a tool call", room, data["message_id"])

    async def wait_visible(
        self, room: str, marker: str, entry_id: bytes, context: Mapping[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Catch up until the request is in this worker's window.

        Returns None once the inference group has finished with the event and
        the request is still absent (cleared or trimmed away meanwhile).
        """
        delay = 0.005
        while True:
            messages = await self.manager.get_messages_async(room, context)
            prompt = _upto(messages, marker)
            if prompt is not None:
                return prompt
            if await self.inference_done_with(entry_id):
                messages = await self.manager.get_messages_async(room, context)
                return _upto(messages, marker)
            if self.stop.is_set():
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            delay = min(delay * 2, 0.1)


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def demo_summarize(prompt: str, turns: Sequence[Mapping[str, Any]]) -> str:
    """The demo's FAKE summariser: extractive and deterministic (no LLM)."""
    people = sorted(
        {str(t.get("name")) for t in turns if t.get("role") == "user" and t.get("name")}
    )
    topics = [_MARKERS.sub("", _text_of(t)).strip() for t in turns if t.get("role") == "user"]
    topics = [t for t in topics if t][:3]
    return (
        f"(fake summariser) {len(turns)} earlier turns; people: {', '.join(people) or 'none'}; "
        f"first topics: {' | '.join(topics) or 'none'}"
    )


class _ConsolidationWorker(_Worker):
    """Folds long rooms (SPEC §21): the engine's own ``ConsolidationWorker``, one pass
    over the rooms the event stream touched, each time the inference worker has
    recorded them up to that event."""

    role = "consolidation"

    def __init__(self, config: DemoConfig, report: Report) -> None:
        super().__init__(config, report)
        self.touched: set[str] = set()
        self.worker = ConsolidationWorker(
            self.manager, demo_summarize, rooms=lambda: sorted(self.touched), name="demo"
        )

    async def handle(self, event: Event, entry_id: bytes) -> None:
        self.touched.add(event.room)
        if len(self.touched) < len(self.config.rooms) and event.kind != "command":
            return
        if not await self.wait_for_inference(entry_id):
            return
        for result in await self.worker.run_once():
            if result.outcome == "folded":
                self.notes["rooms folded"] += 1
                logger.info("room %s: consolidated", result.room_id)
        self.touched.clear()


_WORKERS: dict[str, type[_Worker]] = {
    "inference": _InferenceWorker,
    "agents": _AgentsWorker,
    "consolidation": _ConsolidationWorker,
}


@contextlib.contextmanager
def _stop_on_sigterm(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM sets ``stop`` while the block runs, and is ignored after it.

    The parent's SIGTERM can come late, after the work is done: had the loop's
    handler still been installed while ``asyncio.run`` closes the loop, the
    signal would be written to the loop's already closed wakeup pipe, and
    Python prints a traceback for it.
    """
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _child_setup(role: str, verbose: bool) -> None:
    # Ctrl-C in the terminal reaches every process of the group: only the parent
    # acts on it, and stops the children with SIGTERM so they drain.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _run_worker(role: str, config: DemoConfig, report: Report) -> None:
    # Built inside the loop: the client, the manager and the stop event belong to it.
    await _WORKERS[role](config, report).run()


def worker_main(role: str, config: DemoConfig, channel: Any) -> None:
    """Entry point of a worker process."""
    _child_setup(role, config.verbose)
    try:
        asyncio.run(_run_worker(role, config, channel.put))
    except BaseException:
        channel.put(("failed", role, traceback.format_exc()))
        raise SystemExit(1) from None


def source_main(config: DemoConfig, events: list[Event], channel: Any) -> None:
    """Entry point of the event-source process: XADD every event, paced by ``rate``."""
    _child_setup("source", config.verbose)
    try:
        asyncio.run(_publish(config, events, channel.put))
    except BaseException:
        channel.put(("failed", "source", traceback.format_exc()))
        raise SystemExit(1) from None


async def _publish(config: DemoConfig, events: list[Event], report: Report) -> None:
    client = make_client(config.redis_url, cluster=config.cluster)
    stop = asyncio.Event()
    with _stop_on_sigterm(stop):
        await _publish_events(client, config, events, report, stop)


async def _publish_events(
    client: Any, config: DemoConfig, events: list[Event], report: Report, stop: asyncio.Event
) -> None:
    started = time.monotonic()
    report(("ready", "source", os.getpid()))
    try:
        sent = 0
        chunk = 8
        for start in range(0, len(events), chunk):
            if stop.is_set():
                break
            pipe = client.pipeline(transaction=False)
            for event in events[start : start + chunk]:
                pipe.xadd(config.stream, event.to_fields())
            await pipe.execute()
            sent += len(events[start : start + chunk])
            report(("published", "source", sent))
            if config.rate > 0:
                due = started + sent / config.rate - time.monotonic()
                if due > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), due)
        report(("published_all", "source", sent))
    finally:
        await client.aclose()


# ================================================================ orchestrator


@dataclass(frozen=True, slots=True)
class DemoOptions:
    redis_url: str | None = None
    prefix: str = "sg"
    rooms: int = 3
    events: int = 160
    seed: int = 7
    rate: float = 400.0
    embedded: str = "auto"
    model: str | None = None
    timeout: float = 120.0
    color: str = "auto"
    verbose: bool = False
    platform_payloads: bool = False


@dataclass(slots=True)
class Backend:
    url: str
    description: str


@contextlib.contextmanager
def redis_backend(url: str | None, embedded: str = "auto") -> Iterator[Backend]:
    """The Redis the demo runs on: ``url`` if given, else a private embedded one.

    Embedded: a ``redis-server`` on a free loopback port when one is on PATH
    (stopped by pid at the end), else fakeredis's TCP server in this process.
    """
    if url:
        yield Backend(url, f"Redis at {redact_url(url)} (from --redis-url / $REDIS_URL)")
        return
    binary = None
    if embedded in ("auto", "redis-server"):
        try:
            binary = find_server_binary()  # $CONVERSATION_TEST_SERVER may name Valkey's
        except ServerBinaryError as exc:
            raise CliError(str(exc), EXIT_UNREACHABLE) from exc
    if binary is not None:
        with _private_redis_server(binary) as backend:
            yield backend
        return
    if embedded == "redis-server":
        raise CliError("--embedded redis-server: no redis-server on PATH", EXIT_UNREACHABLE)
    reason = "asked for" if embedded == "fakeredis" else "no redis-server on PATH"
    with _fakeredis_server(reason) as backend:
        yield backend


@contextlib.contextmanager
def _private_redis_server(binary: str) -> Iterator[Backend]:
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"v=(\S+)", version)
    with tempfile.TemporaryDirectory(prefix="conversation-demo-") as directory:
        # Its own session: a Ctrl-C in the terminal must not stop it before the
        # workers have drained into it; it is stopped by pid below.
        server = RedisServerProcess(Path(directory), new_session=True)
        try:
            server.start()
        except RuntimeError as exc:
            server.stop()
            raise CliError(
                f"the embedded redis-server did not start: {exc}", EXIT_UNREACHABLE
            ) from exc
        try:
            pid = server.process.pid if server.process is not None else "?"
            yield Backend(
                server.url,
                f"private {Path(binary).name} {match.group(1) if match else ''} on 127.0.0.1:"
                f"{server.port} (pid {pid}; embedded — pass --redis-url to use your own)".replace(
                    "  ", " "
                ),
            )
        finally:
            server.stop()


@contextlib.contextmanager
def _fakeredis_server(reason: str) -> Iterator[Backend]:
    try:
        # An optional test dependency: imported only when no redis-server is on PATH.
        import fakeredis  # noqa: PLC0415
    except ImportError as exc:
        raise CliError(
            "no Redis to run on: pass --redis-url (or set REDIS_URL), put redis-server on "
            "PATH, or install fakeredis[lua] for the in-process fallback",
            EXIT_UNREACHABLE,
        ) from exc
    server = fakeredis.TcpFakeServer(("127.0.0.1", 0), server_type="redis")
    port = int(server.server_address[1])
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
    )
    thread.start()
    try:
        yield Backend(
            f"redis://127.0.0.1:{port}/0",
            f"fakeredis TCP server on 127.0.0.1:{port} (embedded in this process, {reason}; "
            "slower than redis-server, and its Lua is 5.4 where Redis has 5.1)",
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the demo; returns the exit code (0 converged, 1 not, 3 no Redis, 130 Ctrl-C)."""
    out = out if out is not None else sys.stdout
    palette = Palette.for_stream(out, options.color)
    catalogue = PLATFORM_ROOM_CATALOGUE if options.platform_payloads else ROOM_CATALOGUE
    rooms = tuple(room for room, *_ in catalogue[: options.rooms])
    script = build_script(rooms, options.events, options.seed)
    if options.platform_payloads:
        script = _platform_module().to_payloads(script, options.seed)
    print(
        palette.bold("conversation demo")
        + f" — {len(rooms)} rooms, {len(script)} events, seed {options.seed}",
        file=out,
        flush=True,
    )
    with redis_backend(options.redis_url, options.embedded) as backend:
        print(f"Redis:   {backend.description}", file=out, flush=True)
        cluster = asyncio.run(_probe(backend.url))
        config = DemoConfig(
            redis_url=backend.url,
            cluster=cluster,
            prefix=options.prefix,
            stream=f"{options.prefix}:demo:events",
            rooms=rooms,
            seed=options.seed,
            rate=options.rate,
            model=options.model,
            verbose=options.verbose,
            platform_payloads=options.platform_payloads,
        )
        return _Orchestrator(config, script, options, palette, out).run()


def _platform_module() -> Any:
    """``demo_platform``, imported on demand: it needs discord.py, an optional extra."""
    try:
        from . import demo_platform  # noqa: PLC0415
    except ImportError as exc:
        raise CliError(
            f"--platform-payloads needs discord.py: pip install 'conversation[discord]' ({exc})",
            EXIT_USAGE,
        ) from exc
    return demo_platform


async def _probe(url: str) -> bool:
    target = await connect(url)
    await target.aclose()
    return target.cluster


async def _reset(config: DemoConfig) -> None:
    """Start from nothing: the demo's rooms and stream are deleted, groups created."""
    client = make_client(config.redis_url, cluster=config.cluster)
    keyspace = KeySpace(config.prefix)
    try:
        for room in config.rooms:
            keys = keyspace.room(room)
            await client.delete(*keys.as_list(), keyspace.lease(room))
        await client.delete(config.stream)
        for role in ROLES:
            await client.xgroup_create(config.stream, role, id="0", mkstream=True)
    finally:
        await client.aclose()


@dataclass(slots=True)
class _Child:
    role: str
    process: Any
    pid: int | None = None
    progress: int = 0
    ready: bool = False
    report: dict[str, Any] | None = None
    failure: str | None = None


@dataclass(slots=True)
class Verdict:
    converged: bool
    rows: list[list[str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Orchestrator:
    def __init__(
        self,
        config: DemoConfig,
        script: list[Event],
        options: DemoOptions,
        palette: Palette,
        out: IO[str],
    ) -> None:
        self.config = config
        self.script = script
        self.options = options
        self.palette = palette
        self.out = out
        self.context = multiprocessing.get_context("spawn")
        self.channel: Any = self.context.Queue()
        self.children: dict[str, _Child] = {}
        self.published = 0
        self.source_done = False

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # ------------------------------------------------------------------ run

    def run(self) -> int:
        try:
            asyncio.run(_reset(self.config))
            model = load_model(self.config.model, self.config.seed)
            self.say(f"Model:   {model.name}")
            summary = ", ".join(f"{n} {kind}" for kind, n in script_summary(self.script).items())
            self.say(f"Script:  {summary}")
            if self.config.platform_payloads:
                from . import demo_platform  # noqa: PLC0415

                self.say(f"Payloads: {demo_platform.payload_summary(self.script)}")
            self.start_children()
            ok = self.wait_until_consumed()
            self.stop_workers()
            if not ok:
                return EXIT_NOT_FOUND
            return self.finish()
        except KeyboardInterrupt:
            self.say("\ninterrupted: stopping the workers (they drain first)…")
            self.stop_workers()
            return EXIT_INTERRUPTED
        finally:
            self.kill_stragglers()

    def start_children(self) -> None:
        for role in ROLES:
            process = self.context.Process(
                target=worker_main,
                args=(role, self.config, self.channel),
                name=f"demo-{role}",
            )
            process.start()
            self.children[role] = _Child(role, process, process.pid)
        source = self.context.Process(
            target=source_main,
            args=(self.config, self.script, self.channel),
            name="demo-source",
        )
        source.start()
        self.children["source"] = _Child("source", source, source.pid)
        pids = ", ".join(f"{c.role} {c.pid}" for c in self.children.values())
        self.say(f"Processes: {pids} (spawned; one consumer group per worker)")

    def pump(self, timeout: float) -> None:
        """Take messages from the children, waiting at most ``timeout`` for the first."""
        try:
            message = self.channel.get(timeout=timeout) if timeout else self.channel.get_nowait()
        except queue_module.Empty:
            return
        while True:
            self.absorb(message)
            try:
                message = self.channel.get_nowait()
            except queue_module.Empty:
                return

    def absorb(self, message: tuple[Any, ...]) -> None:
        kind, role, value = message
        child = self.children.get(role)
        if kind == "published":
            self.published = int(value)
        elif kind == "published_all":
            self.published = int(value)
            self.source_done = True
        elif kind == "progress" and child is not None:
            child.progress = int(value)
        elif kind == "ready" and child is not None:
            child.pid = int(value)
            child.ready = True
        elif kind == "report" and child is not None:
            child.report = value
        elif kind == "failed" and child is not None:
            child.failure = str(value)

    def workers(self) -> list[_Child]:
        return [self.children[role] for role in ROLES]

    def wait_until_consumed(self) -> bool:
        total = len(self.script)
        progress = Progress()
        milestones = [total * step // 4 for step in (1, 2, 3, 4)]
        deadline = time.monotonic() + self.options.timeout
        started = time.monotonic()
        self.say(f"Replaying {total} events through {self.config.stream} …")
        try:
            while True:
                self.pump(0.1)
                done = min(c.progress for c in self.workers())
                starting = [c.role for c in self.children.values() if not c.ready]
                if starting:
                    line = f"  starting {len(starting)} process(es): {', '.join(starting)}…"
                else:
                    line = f"  published {self.published}/{total} · " + " · ".join(
                        f"{c.role} {c.progress}" for c in self.workers()
                    )
                if progress.enabled:
                    progress.update(line)
                elif milestones and done >= milestones[0]:
                    while milestones and done >= milestones[0]:
                        milestones.pop(0)
                    print(line, file=sys.stderr, flush=True)
                failed = [c for c in self.children.values() if c.failure]
                dead = [
                    c
                    for c in self.children.values()
                    if c.process.exitcode not in (None, 0) and not c.failure
                ]
                if failed or dead:
                    progress.done()
                    for child in failed:
                        self.say(self.palette.bad(f"{child.role} worker failed:"))
                        self.say(child.failure or "")
                    for child in dead:
                        self.say(
                            self.palette.bad(
                                f"{child.role} process exited with {child.process.exitcode}"
                            )
                        )
                    return False
                if self.source_done and done >= total:
                    progress.done()
                    took = time.monotonic() - started
                    self.say(
                        f"All {total} events handled by every worker in {took:.1f}s "
                        "(process start-up included)."
                    )
                    return True
                if time.monotonic() > deadline:
                    progress.done()
                    self.say(
                        self.palette.bad(
                            f"timed out after {self.options.timeout:g}s: " + line.strip()
                        )
                    )
                    return False
        finally:
            progress.done()

    def stop_workers(self) -> None:
        """SIGTERM every child (workers drain and report), then wait for them to exit.

        The channel is read all along: a child cannot exit while its report is
        still waiting to be written into a full pipe.
        """
        for child in self.children.values():
            if child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + _REPORT_TIMEOUT
        while time.monotonic() < deadline:
            if all(c.process.exitcode is not None for c in self.children.values()):
                break
            self.pump(0.05)
        self.pump(0.0)  # whatever the children wrote just before exiting

    def kill_stragglers(self) -> None:
        for child in self.children.values():
            if child.process.is_alive():
                child.process.kill()
                child.process.join(timeout=5)
        self.channel.close()
        self.channel.join_thread()

    # --------------------------------------------------------------- verdict

    def finish(self) -> int:
        failures = [c for c in self.workers() if c.report is None]
        for child in failures:
            self.say(self.palette.bad(f"{child.role} worker did not report"))
            if child.failure:
                self.say(child.failure)
        if failures:
            return EXIT_NOT_FOUND
        self.say(
            f"Stopped {len(self.children)} processes with SIGTERM; workers drained, "
            "then reported their windows after ensure_fresh_from_redis."
        )
        redis_side, showcase = asyncio.run(self.read_redis())
        windows = {c.role: (c.report or {}).get("windows", {}) for c in self.workers()}
        verdict = compare_windows(self.config.rooms, windows, redis_side, self.palette)
        self.say()
        self.say(
            self.palette.bold("Convergence") + " (each worker's window vs an independent "
            "MULTI/LRANGE read of Redis)"
        )
        for line in format_table(
            ["ROOM", "ENTRIES", "VERSION", *ROLES],
            verdict.rows,
            right=(1, 2),
            palette=self.palette,
        ):
            self.say("  " + line)
        for problem in verdict.problems:
            self.say("  " + self.palette.bad(problem))
        workers, rooms = len(ROLES), len(self.config.rooms)
        if verdict.converged:
            self.say(
                self.palette.ok(
                    f"converged: {workers} workers × {rooms} room{'s' if rooms != 1 else ''} "
                    "hold exactly what Redis holds"
                )
            )
        else:
            self.say(self.palette.bad("NOT converged: see the differences above"))
        platform_ok = self.show_platform_outcome()
        self.show_room(showcase)
        self.show_stats()
        if self.options.redis_url:
            self.say()
            self.say(
                "Look inside: python -m conversation --redis-url "
                f"{redact_url(self.config.redis_url)} inspect {self.config.rooms[0]}  "
                "(or: rooms, tail ROOM, stats)"
            )
        return EXIT_OK if verdict.converged and platform_ok else EXIT_NOT_FOUND

    def show_platform_outcome(self) -> bool:
        """With platform payloads: what the bindings stored, against the payloads' model."""
        if not self.config.platform_payloads:
            return True
        from . import demo_platform  # noqa: PLC0415

        inference = self.children["inference"].report or {}
        deferred = int(inference.get("stats", {}).get("deferred_events", 0))
        outcome = demo_platform.check_outcome(self.script, self.stored, deferred)
        self.say()
        self.say(
            self.palette.bold("Platform payloads")
            + " (discord.py parsed each gateway dict; conversation.platforms.discord.Binding "
            "made the engine calls)"
        )
        for passed, line in outcome.lines:
            mark = self.palette.ok("✓") if passed else self.palette.bad("✗")
            self.say(f"  {mark} {line}")
        return outcome.ok

    async def read_redis(self) -> tuple[dict[str, tuple[int, list[Any]]], dict[str, Any]]:
        """Independent read (plain commands, not the engine) plus the showcase room."""
        client = make_client(self.config.redis_url, cluster=self.config.cluster)
        keyspace = KeySpace(self.config.prefix)
        windows: dict[str, tuple[int, list[Any]]] = {}
        self.stored: dict[str, list[dict[str, Any]]] = {}
        try:
            for room in self.config.rooms:
                keys = keyspace.room(room)
                pipe = client.pipeline(transaction=True)
                pipe.lrange(keys.window, 0, -1)
                pipe.hget(keys.meta, "version")
                rows, version = await pipe.execute()
                messages = []
                for row in rows:
                    try:
                        entry = orjson.loads(row)
                    except orjson.JSONDecodeError:
                        messages.append({"corrupt row": row.decode("utf-8", "replace")})
                        continue
                    self.stored.setdefault(room, []).append(dict(entry))
                    entry.pop("message_id", None)
                    messages.append(entry)
                windows[room] = (int(version or 0), messages)
            showcase = await self.showcase(client)
        finally:
            await client.aclose()
        return windows, showcase

    async def showcase(self, client: Any) -> dict[str, Any]:
        room = self.config.rooms[0]
        renderer = make_renderer("inference")
        manager = ConversationManager(
            renderer, redis=client, key_prefix=self.config.prefix, max_history=MAX_HISTORY
        )
        try:
            last = next(
                (e for e in reversed(self.script) if e.room == room and e.kind == "message"), None
            )
            context = room_context(
                room,
                "inference",
                last.data["author"] if last else None,
                last.data["at"] if last else None,
            )
            messages = await manager.get_messages_async(room, context)
        finally:
            await manager.aclose()
        target = RedisTarget(client, self.config.redis_url, self.config.cluster)
        reader = RoomReader(target, self.config.prefix)
        snapshot = await reader.snapshot(room)
        await reader.wait_idle()
        return {
            "room": room,
            "prompt": messages[0]["content"] if messages else "",
            "fallback": isinstance(renderer, FallbackRenderer),
            "snapshot": snapshot,
        }

    def show_room(self, showcase: Mapping[str, Any]) -> None:
        room = showcase["room"]
        self.say()
        note = " (FALLBACK: packaged template missing)" if showcase["fallback"] else ""
        self.say(self.palette.bold(f"Rendered inference prompt for {room}") + note)
        rule = self.palette.dim("  │ ")
        for line in str(showcase["prompt"]).splitlines() or [""]:
            self.say(rule + line)
        snapshot = showcase["snapshot"]
        entries = snapshot.entries()
        focus = next(
            (
                e.data["message_id"]
                for e in reversed(self.script)
                if e.room == room and e.kind == "message" and len(e.data.get("images", ())) > 1
            ),
            None,
        )
        shown = entries[_showcase_start(entries, focus) :]
        self.say()
        self.say(
            self.palette.bold(f"Window of {room}")
            + f" — version {snapshot.version}, {len(entries)} entries, limit "
            + f"{snapshot.limit or 'default'}; the last {len(shown)}:"
        )
        width = content_width(34, self.out, None)
        for line in format_table(
            ["#", "ROLE", "NAME", "CONTENT"],
            entry_rows(shown, self.palette, width),
            right=(0,),
            palette=self.palette,
        ):
            self.say("  " + line)

    def show_stats(self) -> None:
        self.say()
        self.say(self.palette.bold("Stats") + " (per worker, from ConversationManager.stats())")
        rows = []
        notes = []
        for child in self.workers():
            report = child.report or {}
            stats = report.get("stats", {})
            rows.append(
                [
                    child.role,
                    str(report.get("pid", child.pid)),
                    str(report.get("events", 0)),
                    str(stats.get("appends", 0)),
                    str(stats.get("edits", 0)),
                    str(stats.get("persists", 0)),
                    str(stats.get("round_trips", 0)),
                    str(stats.get("catch_ups", 0)),
                    str(stats.get("reloads", 0)),
                    str(stats.get("conflicts", 0)),
                    f"{stats.get('bytes_sent', 0) / 1024:.1f}",
                    f"{stats.get('bytes_received', 0) / 1024:.1f}",
                    str(report.get("errors", 0)),
                ]
            )
            for note, count in sorted(report.get("notes", {}).items()):
                notes.append(f"{child.role}: {note}" + (f": {count}" if count != 1 else ""))
        for line in format_table(
            [
                "WORKER",
                "PID",
                "EVENTS",
                "APPENDS",
                "EDITS",
                "PERSISTS",
                "ROUND TRIPS",
                "CATCH-UPS",
                "RELOADS",
                "CONFLICTS",
                "KIB SENT",
                "KIB RECV",
                "ERRORS",
            ],
            rows,
            right=range(1, 13),
            palette=self.palette,
        ):
            self.say("  " + line)
        for note in notes:
            self.say(self.palette.dim(f"  · {note}"))


def compare_windows(
    rooms: Sequence[str],
    windows: Mapping[str, Mapping[str, Any]],
    redis_side: Mapping[str, tuple[int, list[Any]]],
    palette: Palette,
) -> Verdict:
    """Each worker's reported window of each room against what Redis holds."""
    verdict = Verdict(converged=True)
    for room in rooms:
        version, expected = redis_side[room]
        row = [room, str(len(expected)), str(version)]
        for worker, reported in windows.items():
            got = reported.get(room)
            if got == expected:
                row.append(palette.ok("✓ equal"))
                continue
            verdict.converged = False
            row.append(palette.bad("✗ differs"))
            verdict.problems.append(f"{worker} / {room}: {_first_difference(got, expected)}")
        verdict.rows.append(row)
    return verdict


def _showcase_start(entries: Sequence[tuple[int, dict[str, Any] | None]], focus: str | None) -> int:
    """Where the shown part of the window starts: at the showcase post, if recent enough."""
    start = max(0, len(entries) - 16)
    for index in range(len(entries) - 1, max(-1, len(entries) - 31), -1):
        entry = entries[index][1]
        if focus is not None and entry is not None and entry.get("message_id") == focus:
            return min(start, index)
    return start


def _first_difference(got: Sequence[Any] | None, expected: Sequence[Any]) -> str:
    if got is None:
        return "no window reported"
    if len(got) != len(expected):
        return f"{len(got)} entries in the worker, {len(expected)} in Redis"
    for index, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a != b:
            return f"entry {index} differs"
    return "differs"  # pragma: no cover - equal lists compare equal
