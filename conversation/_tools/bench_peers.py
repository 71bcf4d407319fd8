"""``python -m conversation bench --only peers``: the engine against other frameworks'
own Redis-backed histories, and all of them against raw redis-py, in one run.

Subjects are the engine in every freshness mode the manager accepts
(``FRESHNESS_MODES``) and each peer class of :data:`PEERS` that is installed; a
peer that is not installed gets rows that say so. A peer is driven only through
its public API, as its users call it. Each subject is paired (A B B A ...) with
the same raw baseline, and every row is a ratio of medians:

- ``peers_append_*``: N rooms appending at once, one message per call, into fresh
  rooms, vs one raw RPUSH+LTRIM+INCR+PEXPIRE pipeline per append. The engine and
  the baseline trim to ``APPEND_WINDOW``; a peer that cannot trim on write keeps
  every message (its ``details`` say so).
- ``peers_read_*``: one warm read of a 100-entry window, vs LRANGE+``orjson.loads``.
- ``peers_read_bytes_*``: bytes the server sent per such read (``INFO stats``
  ``total_net_output_bytes`` deltas, minus INFO's own), vs the LRANGE's.
- ``peers_edit_*``: replacing the content of the middle entry of that window, vs
  one raw LSET. A peer with no edit API does what its user must: read the
  history, then rewrite it through the public API (``details['edit']``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from .._engine.settings import FRESHNESS
from .._manager import ConversationManager
from .bench_core import NetMeter, Row, median, paired, progress, ratio_row, skipped_row

__all__ = [
    "FRESHNESS_MODES",
    "PEERS",
    "PEER_ROW_KEYS",
    "PeerSizes",
    "bench_peers",
]

#: The window the append rows trim to: below the rooms' message count, so the
#: trimming subjects actually trim for half of the run.
APPEND_WINDOW = 50
READ_WINDOW = 100
_TEXT = "the quick brown fox jumps over the lazy dog while bots read every message " * 5


#: The engine runs in every freshness mode it accepts (SPEC §37), the default first.
FRESHNESS_MODES: tuple[str, ...] = FRESHNESS


@dataclass(frozen=True, slots=True)
class Peer:
    """Another framework's Redis-backed history class, where it is imported from."""

    key: str
    module: str
    name: str
    distribution: str

    @property
    def label(self) -> str:
        return f"{self.distribution} {self.name}"

    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            return False


#: The Redis-backed histories of the frameworks the integrations serve. Only the
#: first two ship in what the test extras install; the others are their own
#: distributions (langchain-core and llama-index-core carry none).
PEERS: tuple[Peer, ...] = (
    Peer(
        "openai_agents", "agents.extensions.memory.redis_session", "RedisSession", "openai-agents"
    ),
    Peer(
        "google_adk",
        "google.adk.integrations.redis",
        "RedisSessionService",
        "google-adk",
    ),
    Peer("langchain", "langchain_redis", "RedisChatMessageHistory", "langchain-redis"),
    Peer(
        "llama_index",
        "llama_index.storage.chat_store.redis",
        "RedisChatStore",
        "llama-index-storage-chat-store-redis",
    ),
)

MEASURES = ("append", "read", "read_bytes", "edit")
SUBJECT_KEYS: tuple[str, ...] = (
    *(f"engine_{mode}" for mode in FRESHNESS_MODES),
    *(peer.key for peer in PEERS),
)
#: Every row of the section, in table order: each measure, all subjects side by side.
PEER_ROW_KEYS: tuple[str, ...] = tuple(
    f"peers_{measure}_{subject}" for measure in MEASURES for subject in SUBJECT_KEYS
)


@dataclass(frozen=True, slots=True)
class PeerSizes:
    repeats: int
    rooms: int
    per_room: int
    reads: int
    edits: int


# ------------------------------------------------------------------- subjects


class Subject(Protocol):
    """What the section does to a history: the same calls for every subject."""

    label: str
    trims: bool  # trims to the window on write
    edit: str  # how an edit is made

    async def append(self, room: str, index: int) -> None: ...
    async def read(self, room: str) -> object: ...
    async def replace(self, room: str, index: int, text: str) -> None: ...
    async def aclose(self) -> None: ...


def _text(index: int) -> str:
    return f"[Message ID: m{index}] {_TEXT}"


def _row(index: int, text: str | None = None) -> bytes:
    return orjson.dumps(
        {"message_id": f"m{index}", "role": "user", "content": text or _text(index)}
    )


class EngineSubject:
    def __init__(self, client: aioredis.Redis, prefix: str, window: int, mode: str) -> None:
        self.manager = ConversationManager(
            None,
            max_history=window,
            redis=client,
            key_prefix=prefix,
            ttl_seconds=3600,
            freshness=mode,
        )
        self.label = f"engine (freshness={mode})"
        self.trims = True
        self.edit = "update_message_async"

    async def append(self, room: str, index: int) -> None:
        await self.manager.append_async(room, "user", _text(index), message_id=f"m{index}")

    async def read(self, room: str) -> object:
        return await self.manager.get_messages_async(room)

    async def replace(self, room: str, index: int, text: str) -> None:
        await self.manager.update_message_async(room, f"m{index}", text)

    async def aclose(self) -> None:
        await self.manager.aclose(timeout=60)


class AgentsSubject:
    """``agents.extensions.memory.RedisSession``: one session per room."""

    def __init__(
        self, module: Any, client: aioredis.Redis, prefix: str | None, window: int
    ) -> None:
        self.module = module
        self.client, self.prefix, self.window = client, prefix, window
        self.sessions: dict[str, Any] = {}
        self.label = "openai-agents RedisSession"
        # Its limit only bounds what get_items returns; the list keeps every item.
        self.trims = False
        self.edit = "no edit API: get_items(), then clear_session() + add_items(all)"

    def session(self, room: str) -> Any:
        if room not in self.sessions:
            options: dict[str, Any] = {"session_settings": {"limit": self.window}, "ttl": 3600}
            if self.prefix is not None:
                options["key_prefix"] = self.prefix
            self.sessions[room] = self.module.RedisSession(
                room, redis_client=self.client, **options
            )
        return self.sessions[room]

    async def append(self, room: str, index: int) -> None:
        await self.session(room).add_items([{"role": "user", "content": _text(index)}])

    async def read(self, room: str) -> object:
        return await self.session(room).get_items()

    async def replace(self, room: str, index: int, text: str) -> None:
        session = self.session(room)
        items = await session.get_items()
        items[index] = {**items[index], "content": text}
        await session.clear_session()
        await session.add_items(items)

    async def aclose(self) -> None:
        for session in self.sessions.values():
            await session.close()  # a no-op for an injected client


class AdkSubject:
    """``google.adk.integrations.redis.RedisSessionService``: one session per room."""

    APP, USER = "bench", "user"

    def __init__(
        self, module: Any, client: aioredis.Redis, prefix: str | None, window: int
    ) -> None:
        # The event and content types its users build events with.
        self.events = importlib.import_module("google.adk.events")
        self.types = importlib.import_module("google.genai.types")
        sessions = importlib.import_module("google.adk.sessions.base_session_service")
        config = module.RedisSessionServiceConfig(
            ttl_seconds=3600, **({"key_prefix": prefix} if prefix is not None else {})
        )
        self.service = module.RedisSessionService(config=config, redis_client=client)
        self.read_config = sessions.GetSessionConfig(num_recent_events=window)
        self.sessions: dict[str, Any] = {}
        self.label = "google-adk RedisSessionService"
        self.trims = False  # the session is one JSON value holding every event
        self.edit = (
            "no edit API: get_session(), then delete_session() + create_session() "
            "+ append_event() per event"
        )

    def event(self, text: str) -> Any:
        content = self.types.Content(role="user", parts=[self.types.Part(text=text)])
        return self.events.Event(author="user", invocation_id="bench", content=content)

    async def session(self, room: str) -> Any:
        if room not in self.sessions:
            self.sessions[room] = await self.service.create_session(
                app_name=self.APP, user_id=self.USER, session_id=room
            )
        return self.sessions[room]

    async def append(self, room: str, index: int) -> None:
        await self.service.append_event(await self.session(room), self.event(_text(index)))

    async def read(self, room: str) -> object:
        return await self.service.get_session(
            app_name=self.APP, user_id=self.USER, session_id=room, config=self.read_config
        )

    async def replace(self, room: str, index: int, text: str) -> None:
        stored = await self.service.get_session(
            app_name=self.APP, user_id=self.USER, session_id=room, config=self.read_config
        )
        events = list(stored.events)
        events[index] = self.event(text)
        await self.service.delete_session(app_name=self.APP, user_id=self.USER, session_id=room)
        fresh = await self.service.create_session(
            app_name=self.APP, user_id=self.USER, session_id=room
        )
        for event in events:
            await self.service.append_event(fresh, event)
        self.sessions[room] = fresh

    async def aclose(self) -> None:
        self.sessions.clear()


# ----------------------------------------------------------------- baseline


class Raw:
    """The raw redis-py client doing each row's Redis work, and nothing else."""

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self.client, self.prefix = client, prefix

    async def append(self, key: str, index: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, _row(index))
        pipe.ltrim(key, -APPEND_WINDOW, -1)
        pipe.incr(key + ":v")
        pipe.pexpire(key, 3_600_000)
        await pipe.execute()

    async def read(self, key: str) -> object:
        rows: list[bytes] = await self.client.lrange(key, 0, -1)  # type: ignore[assignment]
        return [orjson.loads(row) for row in rows]

    async def replace(self, key: str, index: int, text: str) -> None:
        # redis-py types the value as str; it sends bytes as they are.
        await self.client.lset(key, index, _row(index, text))  # type: ignore[arg-type]


# -------------------------------------------------------------------- runs


@dataclass(slots=True)
class Meter:
    """Times ``count`` operations and counts the bytes the server read and wrote."""

    net: NetMeter
    bytes_in: list[float]
    bytes_out: list[float]

    async def run(self, count: int, work: Callable[[], Awaitable[None]], *, rate: bool) -> float:
        before = await self.net.read()
        start = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - start
        received, sent = self.net.delta(before, await self.net.read())
        self.bytes_in.append(received / count)
        self.bytes_out.append(sent / count)
        return count / elapsed if rate else elapsed / count * 1e6


def _meter(net: NetMeter) -> Meter:
    return Meter(net, [], [])


async def _appends(
    append: Callable[[str, int], Awaitable[None]], rooms: Sequence[str], per_room: int
) -> None:
    async def writer(room: str) -> None:
        for index in range(per_room):
            await append(room, index)

    await asyncio.gather(*(writer(room) for room in rooms))


async def _fill(append: Callable[[str, int], Awaitable[None]], room: str, count: int) -> None:
    for index in range(count):
        await append(room, index)


@dataclass
class Section:
    url: str
    sizes: PeerSizes
    private: bool
    prefix: str
    clients: list[aioredis.Redis]
    serial: int = 0

    def client(self, *, decode: bool = False) -> aioredis.Redis:
        client = aioredis.Redis.from_url(
            self.url, max_connections=1000, socket_timeout=30, decode_responses=decode
        )
        self.clients.append(client)
        return client

    def room(self) -> str:
        self.serial += 1
        return f"discord:{1_180_000_000_000_000_000 + self.serial}"

    def raw_key(self) -> str:
        self.serial += 1
        return f"{self.prefix}:raw:{{{self.serial}}}"

    def peer_prefix(self, name: str) -> str | None:
        """A peer's own default prefix on a private server (production key lengths);
        one under the run's prefix on a shared one, so cleaning up is safe."""
        return None if self.private else f"{self.prefix}:{name}:"

    def subjects(self, window: int) -> list[tuple[str, Subject | None, str]]:
        """(subject key, subject or None, why not) for every subject of the rows."""
        found: list[tuple[str, Subject | None, str]] = [
            (f"engine_{mode}", EngineSubject(self.client(), self.prefix, window, mode), "")
            for mode in FRESHNESS_MODES
        ]
        # Each peer on a client as its own docs build one (ADK's decodes replies).
        drivers: dict[str, Callable[[Any], Subject]] = {
            "openai_agents": lambda module: AgentsSubject(
                module, self.client(), self.peer_prefix("agents"), window
            ),
            "google_adk": lambda module: AdkSubject(
                module, self.client(decode=True), self.peer_prefix("adk"), window
            ),
        }
        for peer in PEERS:
            if not peer.installed():
                found.append((peer.key, None, f"not installed ({peer.distribution})"))
            elif peer.key not in drivers:
                found.append((peer.key, None, f"installed, no driver here for {peer.label}"))
            else:
                module = importlib.import_module(peer.module)
                found.append((peer.key, drivers[peer.key](module), ""))
        return found


async def _append_row(section: Section, key: str, subject: Subject, raw: Raw, net: NetMeter) -> Row:
    sizes = section.sizes
    count = sizes.rooms * sizes.per_room
    mine, theirs = _meter(net), _meter(net)
    # Connections opened and scripts loaded before anything is timed.
    await _appends(subject.append, [section.room() for _ in range(sizes.rooms)], 1)
    await _appends(raw.append, [section.raw_key() for _ in range(sizes.rooms)], 1)

    async def subject_run() -> float:
        rooms = [section.room() for _ in range(sizes.rooms)]
        return await mine.run(
            count, lambda: _appends(subject.append, rooms, sizes.per_room), rate=True
        )

    async def raw_run() -> float:
        keys = [section.raw_key() for _ in range(sizes.rooms)]
        return await theirs.run(
            count, lambda: _appends(raw.append, keys, sizes.per_room), rate=True
        )

    values, baseline = await paired(sizes.repeats, subject_run, raw_run)
    return ratio_row(
        f"peers_append_{key}",
        f"append x{sizes.rooms} rooms x{sizes.per_room}: {subject.label} vs raw pipeline",
        "appends/s",
        median(values),
        median(baseline),
        details={
            "trims_to_window": subject.trims,
            "window": APPEND_WINDOW,
            "engine_runs": values,
            "baseline_runs": baseline,
            "bytes_in_per_append": median(mine.bytes_in),
            "baseline_bytes_in_per_append": median(theirs.bytes_in),
        },
    )


async def _read_rows(
    section: Section, key: str, subject: Subject, raw: Raw, net: NetMeter
) -> tuple[Row, Row]:
    sizes = section.sizes
    room, raw_key = section.room(), section.raw_key()
    await _fill(subject.append, room, READ_WINDOW)
    await raw.client.rpush(raw_key, *(_row(index) for index in range(READ_WINDOW)))
    await subject.read(room)  # warm: the engine now holds the window
    mine, theirs = _meter(net), _meter(net)

    async def reads(read: Callable[[str], Awaitable[object]], target: str) -> None:
        for _ in range(sizes.reads):
            await read(target)

    async def subject_run() -> float:
        return await mine.run(sizes.reads, lambda: reads(subject.read, room), rate=False)

    async def raw_run() -> float:
        return await theirs.run(sizes.reads, lambda: reads(raw.read, raw_key), rate=False)

    values, baseline = await paired(sizes.repeats, subject_run, raw_run)
    latency = ratio_row(
        f"peers_read_{key}",
        f"warm read of {READ_WINDOW}: {subject.label} vs LRANGE+decode",
        "us",
        median(values),
        median(baseline),
        details={"engine_runs": values, "baseline_runs": baseline},
    )
    moved = ratio_row(
        f"peers_read_bytes_{key}",
        f"bytes the server sent per warm read of {READ_WINDOW}: {subject.label} vs LRANGE",
        "bytes",
        median(mine.bytes_out),
        median(theirs.bytes_out),
        details={
            "source": "INFO stats total_net_output_bytes delta, minus INFO's own",
            "bytes_in_per_read": median(mine.bytes_in),
            "baseline_bytes_in_per_read": median(theirs.bytes_in),
        },
    )
    return latency, moved


async def _edit_row(section: Section, key: str, subject: Subject, raw: Raw, net: NetMeter) -> Row:
    sizes = section.sizes
    room, raw_key = section.room(), section.raw_key()
    await _fill(subject.append, room, READ_WINDOW)
    await raw.client.rpush(raw_key, *(_row(index) for index in range(READ_WINDOW)))
    await subject.read(room)
    middle = READ_WINDOW // 2
    mine, theirs = _meter(net), _meter(net)
    serial = 0

    async def edits(replace: Callable[[str, int, str], Awaitable[None]], target: str) -> None:
        nonlocal serial
        for _ in range(sizes.edits):
            serial += 1
            await replace(target, middle, f"{_text(middle)} (edited {serial})")

    async def subject_run() -> float:
        return await mine.run(sizes.edits, lambda: edits(subject.replace, room), rate=False)

    async def raw_run() -> float:
        return await theirs.run(sizes.edits, lambda: edits(raw.replace, raw_key), rate=False)

    values, baseline = await paired(sizes.repeats, subject_run, raw_run)
    return ratio_row(
        f"peers_edit_{key}",
        f"edit the middle of {READ_WINDOW}: {subject.label} vs raw LSET",
        "us",
        median(values),
        median(baseline),
        details={
            "edit": subject.edit,
            "engine_runs": values,
            "baseline_runs": baseline,
            "bytes_in_per_edit": median(mine.bytes_in),
            "bytes_out_per_edit": median(mine.bytes_out),
            "baseline_bytes_in_per_edit": median(theirs.bytes_in),
            "baseline_bytes_out_per_edit": median(theirs.bytes_out),
        },
    )


async def bench_peers(url: str, sizes: PeerSizes, *, private: bool, prefix: str) -> list[Row]:
    """Every row of :data:`PEER_ROW_KEYS`, measured against the server at ``url``."""
    section = Section(url, sizes, private, prefix if private else f"{prefix}peers", [])
    raw = Raw(section.client(), section.prefix)
    net = NetMeter(section.client())
    await net.calibrate()
    rows: list[Row] = []
    try:
        for window, measure in ((APPEND_WINDOW, "append"), (READ_WINDOW, "read")):
            for key, subject, why_not in section.subjects(window):
                if subject is None:
                    names = ("append",) if measure == "append" else ("read", "read_bytes", "edit")
                    rows.extend(skipped_row(f"peers_{name}_{key}", why_not) for name in names)
                    continue
                progress(f"peers {measure}: {subject.label}")
                try:
                    if measure == "append":
                        rows.append(await _append_row(section, key, subject, raw, net))
                    else:
                        rows.extend(await _read_rows(section, key, subject, raw, net))
                        rows.append(await _edit_row(section, key, subject, raw, net))
                finally:
                    await subject.aclose()
    finally:
        if not private:
            async for stale in raw.client.scan_iter(match=f"{section.prefix}:*", count=1000):
                await raw.client.unlink(stale)
        for client in section.clients:
            await client.aclose()
    order = {key: index for index, key in enumerate(PEER_ROW_KEYS)}
    return sorted(rows, key=lambda row: order[row.key])
