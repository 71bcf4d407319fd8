"""The operator CLI: ``python -m conversation`` (console script ``conversation``).

Commands::

    rooms            list rooms with their sizes, limits, versions and TTLs
    inspect ROOM     a room's window as a table (markers highlighted) or --json
    tail ROOM        follow a room's changes live until Ctrl-C
    stats [ROOM...]  server facts, engine script cache, per-room sizes
    bench ...        the benchmark (``conversation._bench``)
    demo             the multi-process demo (``conversation._demo``)

Every command that talks to Redis reads ``--redis-url`` (default: ``$REDIS_URL``,
else ``redis://127.0.0.1:6379/0``) and ``--prefix`` (the engine's
``key_prefix``, default ``sg``). A Redis Cluster is detected from ``INFO
cluster`` and then scanned primary by primary.

Reading a room uses the engine's own ``sync`` script: one round trip returns
an atomic (entries, version) snapshot, never a list read and a version read
another writer could slip between.

``tail`` polls that script with the state it already holds (every
``--interval`` seconds, 0.25 by default). An idle poll is one EVALSHA that
answers three integers; after a change the reply carries only the rows that
changed (appended, edited, trimmed), exactly as a worker catches up. Polling
was chosen over keyspace notifications because it needs no server setting
(``notify-keyspace-events`` is off by default and often locked down), works
unchanged on Cluster and Sentinel, and can never miss a change: a burst of
writes between two polls arrives as one catch-up.

Exit codes: 0 success; 1 the room does not exist (``inspect``) or the demo did
not converge; 2 usage error; 3 Redis unreachable or failing; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import textwrap
import unicodedata
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._keys import KeySpace, validate_room_id
from ._redis_server import server_identity
from ._stats import Stats
from ._store import RoomStore, load_scripts
from ._window import RoomState, SyncReply, apply_reply

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_PREFIX = "sg"

_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, RedisClusterException, OSError)


class CliError(Exception):
    """A failure reported as one line on stderr and an exit code (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_UNREACHABLE) -> None:
        self.code = code
        super().__init__(message)


# ------------------------------------------------------------------ output


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MARKER = re.compile(r"\[Message ID: [^\[\]\n]*\]")
_DELETED = re.compile(r"\[deleted at [^\[\]\n]*\]")
_REACTIONS = re.compile(r"\[Reactions: [^\[\]\n]*\]")
_MEDIA = re.compile(r"<(?:image|file|audio|video|part) [^<>\n]*>")
_TOOL = re.compile(r"(?:→|↩) [^\s(:]+")

_BOLD, _DIM, _RED, _GREEN, _YELLOW, _BLUE, _MAGENTA, _CYAN = (
    "1",
    "2",
    "31",
    "32",
    "33",
    "34",
    "35",
    "36",
)
_ROLE_COLOURS = {"user": _GREEN, "assistant": _BLUE, "system": _MAGENTA, "tool": _YELLOW}


@dataclass(frozen=True, slots=True)
class Palette:
    """ANSI colours when writing to a terminal, plain text otherwise."""

    enabled: bool

    @classmethod
    def for_stream(cls, stream: IO[str], choice: str = "auto") -> Palette:
        if choice == "always":
            return cls(True)
        if choice == "never" or os.environ.get("NO_COLOR"):
            return cls(False)
        isatty = getattr(stream, "isatty", None)
        return cls(bool(isatty and isatty()))

    def paint(self, text: str, *codes: str) -> str:
        if not self.enabled or not text or not codes:
            return text
        return f"\x1b[{';'.join(codes)}m{text}\x1b[0m"

    def role(self, role: str) -> str:
        return self.paint(role, _ROLE_COLOURS.get(role, _BOLD))

    def ok(self, text: str) -> str:
        return self.paint(text, _GREEN, _BOLD)

    def bad(self, text: str) -> str:
        return self.paint(text, _RED, _BOLD)

    def dim(self, text: str) -> str:
        return self.paint(text, _DIM)

    def bold(self, text: str) -> str:
        return self.paint(text, _BOLD)

    def highlight(self, text: str) -> str:
        """Colour the engine's markers, media placeholders and tool arrows in ``text``."""
        if not self.enabled:
            return text
        text = _MARKER.sub(lambda m: self.paint(m.group(0), _CYAN), text)
        text = _DELETED.sub(lambda m: self.paint(m.group(0), _RED, _BOLD), text)
        text = _REACTIONS.sub(lambda m: self.paint(m.group(0), _YELLOW, _BOLD), text)
        text = _MEDIA.sub(lambda m: self.paint(m.group(0), _MAGENTA), text)
        return _TOOL.sub(lambda m: self.paint(m.group(0), _YELLOW), text)


def visible_width(text: str) -> int:
    """Terminal columns ``text`` takes: ANSI codes take none, wide characters two."""
    plain = _ANSI.sub("", text)
    return sum(
        0
        if unicodedata.combining(ch) or ch == "\ufe0f"
        else 2
        if unicodedata.east_asian_width(ch) in "WF"
        else 1
        for ch in plain
    )


def truncate(text: str, width: int | None) -> str:
    """Cut plain ``text`` to ``width`` columns, ending in an ellipsis when cut."""
    if width is None or visible_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        size = visible_width(ch)
        if used + size > max(width - 1, 0):
            break
        out.append(ch)
        used += size
    return "".join(out) + "…"


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    right: Iterable[int] = (),
    palette: Palette | None = None,
) -> list[str]:
    """Left-aligned columns (``right`` names columns aligned right); cells may hold ANSI."""
    body = [list(row) for row in rows]
    widths = [visible_width(h) for h in headers]
    for row in body:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], visible_width(cell))
    right_set = set(right)

    def line(cells: Sequence[str]) -> str:
        out = []
        for index, cell in enumerate(cells):
            pad = " " * (widths[index] - visible_width(cell))
            last = index == len(cells) - 1
            if index in right_set:
                out.append(pad + cell)
            else:
                out.append(cell if last else cell + pad)
        return "  ".join(out).rstrip()

    head = line(headers)
    lines = [palette.bold(head) if palette else head]
    lines.extend(line(row) for row in body)
    return lines


def json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()


def _one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", " ⏎ ").replace("\t", " ")


def describe_part(part: object) -> str:
    if not isinstance(part, Mapping):
        return "<part ?>"
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        return text if isinstance(text, str) else ""
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image
        url_text = str(url) if url is not None else "?"
        if url_text.startswith("data:"):
            url_text = url_text.split(",", 1)[0] + ",…"
        return f"<image {url_text}>"
    if kind == "file":
        file = part.get("file")
        name = file.get("filename") if isinstance(file, Mapping) else None
        return f"<file {name or '?'}>"
    if kind == "input_audio":
        audio = part.get("input_audio")
        fmt = audio.get("format") if isinstance(audio, Mapping) else None
        return f"<audio {fmt or '?'}>"
    if isinstance(kind, str) and "video" in kind:
        return f"<video {kind}>"
    return f"<part {kind}>"


def describe_content(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(piece for piece in map(describe_part, content) if piece)
    return repr(content)


def describe_entry(entry: Mapping[str, Any]) -> str:
    """One line for a stored entry: its text, media placeholders, tool calls or result."""
    pieces: list[str] = []
    text = describe_content(entry.get("content"))
    if entry.get("role") == "tool":
        pieces.append(f"↩ {entry.get('tool_call_id', '?')}:")
    if text:
        pieces.append(text)
    for call in entry.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping):
            pieces.append(f"→ {function.get('name', '?')}({function.get('arguments', '')})")
        else:
            pieces.append("→ ?")
    return _one_line(" ".join(pieces))


def entry_rows(
    entries: Sequence[tuple[int, Mapping[str, Any] | None]],
    palette: Palette,
    max_chars: int | None,
) -> list[list[str]]:
    """Table rows ``[#, ROLE, NAME, CONTENT]`` for (absolute position, entry) pairs."""
    rows = []
    for position, entry in entries:
        if entry is None:
            rows.append(
                [str(position), palette.bad("corrupt"), "", palette.dim("(unreadable row)")]
            )
            continue
        role = str(entry.get("role", "?"))
        name = entry.get("name")
        content = palette.highlight(truncate(describe_entry(entry), max_chars))
        rows.append([str(position), palette.role(role), str(name or ""), content])
    return rows


def content_width(reserved: int, stream: IO[str], requested: int | None) -> int | None:
    """How many columns message text may take: ``--max-chars``, else fit a terminal."""
    if requested is not None:
        return requested if requested > 0 else None
    isatty = getattr(stream, "isatty", None)
    if isatty and isatty():
        return max(20, shutil.get_terminal_size((120, 24)).columns - reserved)
    return None


class Progress:
    """A one-line progress indicator on stderr, only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self._stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._width = 0
        self._text = ""

    def update(self, text: str) -> None:
        if not self.enabled or text == self._text:
            return
        self._text = text
        pad = " " * max(0, self._width - visible_width(text))
        self._stream.write("\r" + text + pad)
        self._stream.flush()
        self._width = visible_width(text)

    def done(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
            self._text = ""


# ---------------------------------------------------------------- connecting


def redact_url(url: str) -> str:
    """The URL with any password replaced, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass
class RedisTarget:
    """A connected client (plain or Cluster) plus what the commands need to know of it."""

    client: Any
    url: str
    cluster: bool

    def nodes(self) -> list[Any]:
        """The nodes to scan: every primary of a Cluster, else just the one server."""
        if self.cluster:
            return list(self.client.get_primaries())
        return [None]

    async def scan(self, match: str, progress: Progress | None = None) -> AsyncIterator[bytes]:
        seen = 0
        for node in self.nodes():
            cursor: Any = 0
            while True:
                if node is None:
                    cursor, keys = await self.client.scan(cursor, match=match, count=1000)
                else:
                    reply, keys = await self.client.scan(
                        cursor, match=match, count=1000, target_nodes=node
                    )
                    cursor = next(iter(reply.values())) if isinstance(reply, dict) else reply
                for key in keys:
                    yield key
                seen += len(keys)
                if progress is not None:
                    progress.update(f"scanning… {seen} room(s) found")
                if int(cursor) == 0:
                    break

    async def execute_on(self, node: Any, *args: Any) -> Any:
        if node is None:
            return await self.client.execute_command(*args)
        return await self.client.execute_command(*args, target_nodes=node)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


def make_client(url: str, *, cluster: bool, timeout: float = 5.0) -> Any:
    """A ``redis.asyncio`` client for ``url`` (bytes in and out, as the engine needs)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": max(timeout * 2, 10.0),
        "decode_responses": False,
    }
    if cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def connect(url: str, *, timeout: float = 5.0) -> RedisTarget:
    """Connect, check the server answers, and detect a Redis Cluster.

    Raises ``CliError`` (exit code 3) when Redis cannot be reached, with the
    URL (password redacted) and the reason in the message.
    """
    shown = redact_url(url)
    try:
        client = make_client(url, cluster=False, timeout=timeout)
    except ValueError as exc:
        raise CliError(f"invalid Redis URL {shown}: {exc}", EXIT_USAGE) from exc
    try:
        await client.ping()
        cluster = await _cluster_enabled(client)
    except _UNREACHABLE as exc:
        await _close_quietly(client)
        raise CliError(f"cannot reach Redis at {shown}: {_reason(exc)}") from exc
    except RedisError as exc:
        await _close_quietly(client)
        raise CliError(f"Redis at {shown} refused the connection: {_reason(exc)}") from exc
    if not cluster:
        return RedisTarget(client, shown, cluster=False)
    await _close_quietly(client)
    cluster_client = make_client(url, cluster=True, timeout=timeout)
    try:
        await cluster_client.initialize()
    except (*_UNREACHABLE, RedisError) as exc:
        await _close_quietly(cluster_client)
        raise CliError(f"cannot reach Redis Cluster at {shown}: {_reason(exc)}") from exc
    return RedisTarget(cluster_client, shown, cluster=True)


async def _cluster_enabled(client: Any) -> bool:
    try:
        info = await client.info("cluster")
    except ResponseError:  # servers without INFO (fakeredis) are not clusters
        return False
    return bool(int(info.get("cluster_enabled", 0) or 0))


async def _close_quietly(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# ------------------------------------------------------------ reading rooms


@dataclass
class Snapshot:
    """A room as Redis holds it at one version (from the engine's ``sync`` script)."""

    room: str
    exists: bool
    epoch: str = ""
    version: int = 0
    head: int = 0
    limit: int = 0
    rebackfill: bool = False
    rows: list[bytes] = field(default_factory=list)

    def entries(self) -> list[tuple[int, dict[str, Any] | None]]:
        """(absolute position, decoded entry or None when corrupt) for every row."""
        out: list[tuple[int, dict[str, Any] | None]] = []
        for offset, row in enumerate(self.rows):
            out.append((self.head + offset, decode_entry(row)))
        return out

    def messages(self) -> list[dict[str, Any]]:
        """The window as OpenAI-chat messages (identity stripped, corrupt rows skipped)."""
        messages = []
        for _, entry in self.entries():
            if entry is not None:
                entry.pop("message_id", None)
                messages.append(entry)
        return messages


def decode_entry(row: bytes) -> dict[str, Any] | None:
    try:
        entry = orjson.loads(row)
    except orjson.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) and "role" in entry else None


class RoomReader:
    """Reads and follows rooms through the engine's ``sync`` Lua script."""

    def __init__(self, target: RedisTarget, prefix: str) -> None:
        self.target = target
        self.keyspace = KeySpace(prefix)
        self._store = RoomStore(
            target.client, Stats(), ttl_ms=0, default_limit=100, command_timeout=30.0
        )

    async def snapshot(self, room: str) -> Snapshot:
        state = RoomState()
        reply = await self._store.sync(self.keyspace.room(room), state)
        if reply.kind != 2 or not reply.epoch:
            return Snapshot(room, exists=False)
        return Snapshot(
            room,
            exists=True,
            epoch=reply.epoch,
            version=reply.version,
            head=reply.head,
            limit=reply.limit,
            rebackfill=reply.rebackfill,
            rows=list(reply.rows),
        )

    async def poll(self, room: str, state: RoomState) -> SyncReply:
        """Bring ``state`` up to date in one round trip; returns the raw reply."""
        reply = await self._store.sync(self.keyspace.room(room), state)
        apply_reply(state, reply, room)
        return reply

    async def wait_idle(self) -> None:
        await self._store.wait_idle()


@dataclass
class RoomSummary:
    room: str
    entries: int
    version: int
    limit: int
    rebackfill: bool
    ttl_ms: int


async def list_rooms(
    target: RedisTarget, prefix: str, match: str = "*", progress: Progress | None = None
) -> list[str]:
    keyspace = KeySpace(prefix)
    rooms = set()
    async for key in target.scan(keyspace.meta_pattern(match), progress):
        room = keyspace.room_from_meta_key(key.decode("utf-8", "replace"))
        if room is not None:
            rooms.add(room)
    return sorted(rooms)


async def summarise_rooms(
    target: RedisTarget, prefix: str, rooms: Sequence[str], progress: Progress | None = None
) -> list[RoomSummary]:
    keyspace = KeySpace(prefix)
    out: list[RoomSummary] = []
    for start in range(0, len(rooms), 200):
        chunk = rooms[start : start + 200]
        pipe = target.client.pipeline(transaction=False)
        for room in chunk:
            keys = keyspace.room(room)
            pipe.hmget(keys.meta, "version", "limit", "rebackfill")
            pipe.llen(keys.window)
            pipe.pttl(keys.meta)
        replies = await pipe.execute()
        for index, room in enumerate(chunk):
            meta, length, ttl = replies[3 * index : 3 * index + 3]
            version, limit, rebackfill = (_int(v) for v in meta)
            out.append(RoomSummary(room, int(length), version, limit, bool(rebackfill), int(ttl)))
        if progress is not None:
            progress.update(f"reading rooms… {len(out)}/{len(rooms)}")
    return out


def _int(value: object) -> int:
    if not isinstance(value, (bytes, str, int)):
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


def _ttl_text(ttl_ms: int) -> str:
    if ttl_ms == -1:
        return "none"
    if ttl_ms < 0:
        return "gone"
    seconds = ttl_ms // 1000
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _limit_text(limit: int) -> str:
    return str(limit) if limit > 0 else "default"


# ------------------------------------------------------------------ commands


async def cmd_rooms(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    progress = Progress()
    try:
        rooms = await list_rooms(target, args.prefix, args.match, progress)
        summaries = await summarise_rooms(target, args.prefix, rooms, progress)
    finally:
        progress.done()
    if args.json:
        payload = {
            "prefix": args.prefix,
            "cluster": target.cluster,
            "rooms": [
                {
                    "room": s.room,
                    "entries": s.entries,
                    "version": s.version,
                    "limit": s.limit or None,
                    "rebackfill": s.rebackfill,
                    "ttl_ms": s.ttl_ms if s.ttl_ms >= 0 else None,
                }
                for s in summaries
            ],
        }
        print(json_dumps(payload), file=out)
        return EXIT_OK
    palette = Palette.for_stream(out, args.color)
    if not summaries:
        print(f"no rooms under prefix {args.prefix!r} at {target.url}", file=out)
        return EXIT_OK
    rows = [
        [
            s.room,
            str(s.entries),
            _limit_text(s.limit),
            str(s.version),
            _ttl_text(s.ttl_ms),
            "rebackfill" if s.rebackfill else "",
        ]
        for s in summaries
    ]
    for line in format_table(
        ["ROOM", "ENTRIES", "LIMIT", "VERSION", "TTL", "FLAGS"],
        rows,
        right=(1, 2, 3),
        palette=palette,
    ):
        print(line, file=out)
    total = sum(s.entries for s in summaries)
    where = " across the cluster's primaries" if target.cluster else ""
    print(palette.dim(f"{len(summaries)} room(s), {total} entries{where}"), file=out)
    return EXIT_OK


async def cmd_inspect(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    room = _room_arg(args.room)
    reader = RoomReader(target, args.prefix)
    snapshot = await reader.snapshot(room)
    await reader.wait_idle()
    if args.json:
        print(json_dumps(snapshot_json(snapshot)), file=out)
        return EXIT_OK if snapshot.exists else EXIT_NOT_FOUND
    if not snapshot.exists:
        print(
            f"conversation: room {room!r} not found under prefix {args.prefix!r}", file=sys.stderr
        )
        return EXIT_NOT_FOUND
    palette = Palette.for_stream(out, args.color)
    for line in render_snapshot(snapshot, palette, args.max_chars, out, last=args.last):
        print(line, file=out)
    return EXIT_OK


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    entries = []
    corrupt = 0
    for position, entry in snapshot.entries():
        if entry is None:
            corrupt += 1
            continue
        entries.append({"position": position, **entry})
    # The scripts report the epoch as "<stored epoch>@<primary's replication id>".
    epoch, _, primary = snapshot.epoch.partition("@")
    return {
        "room": snapshot.room,
        "exists": snapshot.exists,
        "epoch": epoch or None,
        "primary_replid": primary or None,
        "version": snapshot.version,
        "head": snapshot.head,
        "limit": snapshot.limit or None,
        "rebackfill": snapshot.rebackfill,
        "corrupt_rows": corrupt,
        "entries": entries,
    }


def render_snapshot(
    snapshot: Snapshot,
    palette: Palette,
    max_chars: int | None,
    out: IO[str],
    *,
    last: int | None = None,
) -> list[str]:
    entries = snapshot.entries()
    header = (
        f"room {palette.bold(snapshot.room)} · version {snapshot.version} · "
        f"{len(entries)} entries (limit {_limit_text(snapshot.limit)})"
    )
    if snapshot.rebackfill:
        header += " · re-backfill requested"
    lines = [header]
    shown = entries[-last:] if last else entries
    if len(shown) < len(entries):
        lines.append(palette.dim(f"… {len(entries) - len(shown)} earlier entries not shown"))
    if not entries:
        lines.append(palette.dim("(the window is empty)"))
        return lines
    width = content_width(40, out, max_chars)
    lines.extend(
        format_table(
            ["#", "ROLE", "NAME", "CONTENT"],
            entry_rows(shown, palette, width),
            right=(0,),
            palette=palette,
        )
    )
    return lines


async def cmd_tail(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    room = _room_arg(args.room)
    palette = Palette.for_stream(out, args.color)
    reader = RoomReader(target, args.prefix)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    deadline = loop.time() + args.timeout if args.timeout else None
    width = content_width(30, out, args.max_chars)
    state = RoomState()
    follower = _Follower(room, palette, width, out)
    try:
        await reader.poll(room, state)
        follower.start(state, args.last)
        while not stop.is_set():
            if args.count and follower.changes >= args.count:
                break
            wait = args.interval
            if deadline is not None:
                wait = min(wait, deadline - loop.time())
                if wait <= 0:
                    print(palette.dim(f"(stopped after --timeout {args.timeout:g}s)"), file=out)
                    break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                break
            before = _Before.of(state)
            reply = await reader.poll(room, state)
            follower.report(before, reply, state)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await reader.wait_idle()
    return EXIT_OK


@dataclass(frozen=True, slots=True)
class _Before:
    epoch: str
    head: int
    rows: tuple[bytes, ...]
    limit: int
    rebackfill: bool

    @classmethod
    def of(cls, state: RoomState) -> _Before:
        return cls(state.epoch, state.head, tuple(state.window.rows), state.limit, state.rebackfill)


class _Follower:
    """Turns sync replies into one printed line per change."""

    def __init__(self, room: str, palette: Palette, width: int | None, out: IO[str]) -> None:
        self.room = room
        self.palette = palette
        self.width = width
        self.out = out
        self.changes = 0

    def emit(self, mark: str, text: str, *, change: bool = True) -> None:
        stamp = self.palette.dim(dt.datetime.now().strftime("%H:%M:%S"))
        print(f"{stamp} {mark} {text}", file=self.out, flush=True)
        if change:
            self.changes += 1

    def entry_line(self, position: int, row: bytes) -> str:
        entry = decode_entry(row)
        if entry is None:
            return f"#{position} {self.palette.bad('corrupt row')}"
        name = f" {entry['name']}" if entry.get("name") else ""
        text = self.palette.highlight(truncate(describe_entry(entry), self.width))
        return f"#{position} {self.palette.role(str(entry.get('role')))}{name}: {text}"

    def start(self, state: RoomState, last: int) -> None:
        if not state.epoch:
            print(
                f"waiting for room {self.palette.bold(self.room)} to appear (Ctrl-C to stop)",
                file=self.out,
                flush=True,
            )
            return
        rows = state.window.rows
        print(
            f"following {self.palette.bold(self.room)} at version {state.version} "
            f"({len(rows)} entries, limit {_limit_text(state.limit)}) — Ctrl-C to stop",
            file=self.out,
            flush=True,
        )
        backlog = rows[-last:] if last > 0 else []
        first = state.head + len(rows) - len(backlog)
        for offset, row in enumerate(backlog):
            self.emit(" ", self.entry_line(first + offset, row), change=False)

    def report(self, before: _Before, reply: SyncReply, state: RoomState) -> None:
        p = self.palette
        if reply.kind == 0:
            return
        if reply.kind == 1:
            trimmed = min(state.head - before.head, len(before.rows))
            if trimmed > 0:
                self.emit(
                    p.dim("✂"),
                    p.dim(
                        f"{trimmed} entr{'y' if trimmed == 1 else 'ies'} "
                        f"left the front of the window"
                    ),
                )
            for position, row in sorted(reply.replaced):
                self.emit(p.paint("~", _YELLOW), self.entry_line(position, row))
            end = state.head + len(state.window)
            appended = (
                state.window.rows[len(state.window) - len(reply.rows) :] if reply.rows else []
            )
            for offset, row in enumerate(appended):
                self.emit(p.paint("+", _GREEN), self.entry_line(end - len(appended) + offset, row))
        else:
            self._report_snapshot(before, state)
        if state.limit != before.limit:
            self.emit(
                p.paint("⚙", _MAGENTA),
                f"limit {_limit_text(before.limit)} → {_limit_text(state.limit)}",
            )
        if state.rebackfill and not before.rebackfill:
            self.emit(p.paint("⚙", _MAGENTA), "re-backfill requested")

    def _report_snapshot(self, before: _Before, state: RoomState) -> None:
        # A snapshot comes after a clear, a whole-window rewrite (backfill,
        # consolidation), a reset, or more edits than the edit log keeps. Rows
        # are matched by identity (by bytes when they have none) to say what
        # changed: positions alone cannot tell, since a clear restarts them.
        p = self.palette
        if not state.epoch:
            self.emit(p.bad("✗"), f"room {self.room} is gone from Redis (expired or flushed)")
            return
        if not before.epoch:
            self.emit(p.paint("●", _CYAN), f"room {self.room} appeared at version {state.version}")
        old = {_row_key(row): row for row in before.rows}
        new_keys = {_row_key(row) for row in state.window.rows}
        removed = sum(1 for key in old if key not in new_keys)
        if before.rows and not state.window.rows:
            self.emit(p.paint("∅", _RED), f"room cleared (version {state.version})")
        elif removed:
            self.emit(
                p.paint("∅", _RED),
                f"window reset (cleared or rewritten): {removed} "
                f"entr{'y' if removed == 1 else 'ies'} gone (version {state.version})",
            )
        for offset, row in enumerate(state.window.rows):
            previous = old.get(_row_key(row))
            if previous is None:
                self.emit(p.paint("+", _GREEN), self.entry_line(state.head + offset, row))
            elif previous != row:
                self.emit(p.paint("~", _YELLOW), self.entry_line(state.head + offset, row))


def _row_key(row: bytes) -> str | bytes:
    entry = decode_entry(row)
    identity = entry.get("message_id") if entry is not None else None
    return f"id:{identity}" if isinstance(identity, str) else row


async def cmd_stats(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    progress = Progress()
    try:
        servers = await _server_stats(target)
        rooms = [_room_arg(r) for r in args.rooms] or await list_rooms(
            target, args.prefix, "*", progress
        )
        details = await _room_stats(target, args.prefix, rooms, progress)
    finally:
        progress.done()
    details.sort(key=lambda d: (-int(d["entries"]), str(d["room"])))
    if args.json:
        payload = {
            "url": target.url,
            "cluster": target.cluster,
            "prefix": args.prefix,
            "servers": servers,
            "rooms": {
                "count": len(details),
                "entries": sum(int(d["entries"]) for d in details),
                "detail": details,
            },
        }
        print(json_dumps(payload), file=out)
        return EXIT_OK
    palette = Palette.for_stream(out, args.color)
    print(
        palette.bold("Server") + f" {target.url}" + (" (cluster)" if target.cluster else ""),
        file=out,
    )
    rows = []
    for server in servers:
        info = server["info"]
        scripts = server["scripts"]
        rows.append(
            [
                str(server["node"]),
                _server_version(info),
                str(info.get("used_memory_human", "?")),
                str(info.get("connected_clients", "?")),
                str(info.get("instantaneous_ops_per_sec", "?")),
                str(info.get("uptime_in_seconds", "?")),
                f"{scripts['loaded']}/{scripts['total']}" if scripts["total"] else "?",
            ]
        )
    for line in format_table(
        ["NODE", "VERSION", "MEMORY", "CLIENTS", "OPS/S", "UPTIME S", "ENGINE SCRIPTS"],
        rows,
        right=(3, 4, 5),
        palette=palette,
    ):
        print("  " + line, file=out)
    total = sum(int(d["entries"]) for d in details)
    print(file=out)
    print(
        palette.bold("Rooms") + f" under prefix {args.prefix!r}: {len(details)} room(s), "
        f"{total} entries",
        file=out,
    )
    shown = details[: args.top] if args.top else details
    if shown:
        room_rows = [
            [
                str(d["room"]),
                str(d["entries"]),
                _limit_text(int(d["limit"] or 0)),
                str(d["version"]),
                str(d["edit_log"]),
                str(d["idempotency_tokens"]),
                str(d["archived"]) if d["archived"] is not None else "-",
                _bytes_text(d["memory_bytes"]),
                _ttl_text(int(d["ttl_ms"])),
            ]
            for d in shown
        ]
        for line in format_table(
            [
                "ROOM",
                "ENTRIES",
                "LIMIT",
                "VERSION",
                "EDIT LOG",
                "TOKENS",
                "ARCHIVED",
                "MEMORY",
                "TTL",
            ],
            room_rows,
            right=(1, 2, 3, 4, 5, 6, 7),
            palette=palette,
        ):
            print("  " + line, file=out)
        if len(shown) < len(details):
            print(
                palette.dim(f"  … {len(details) - len(shown)} more (--top 0 shows all)"), file=out
            )
    return EXIT_OK


def _bytes_text(value: object) -> str:
    if not isinstance(value, int):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop returns


async def _server_stats(target: RedisTarget) -> list[dict[str, Any]]:
    shas = [script.sha for script in load_scripts().values()]
    servers = []
    for node in target.nodes():
        name = node.name if node is not None else _host_of(target.url)
        try:
            raw = await target.execute_on(node, "INFO")
            info = _parse_info(raw)
        except ResponseError:  # fakeredis and some proxies have no INFO
            info = {}
        wanted = (
            "redis_version",
            "redis_mode",
            # Valkey's own: it reports redis_version 7.2.4, the Redis it is compatible with.
            "server_name",
            "valkey_version",
            "server_mode",
            "role",
            "uptime_in_seconds",
            "connected_clients",
            "used_memory",
            "used_memory_human",
            "instantaneous_ops_per_sec",
            "total_commands_processed",
            "keyspace_hits",
            "keyspace_misses",
        )
        try:
            exists = await target.execute_on(node, "SCRIPT", "EXISTS", *shas)
            loaded: int | None = sum(1 for flag in exists if int(flag))
        except ResponseError:
            loaded = None
        servers.append(
            {
                "node": name,
                "info": {key: info[key] for key in wanted if key in info},
                "scripts": {"loaded": loaded, "total": len(shas) if loaded is not None else 0},
            }
        )
    return servers


def _server_version(info: Mapping[str, Any]) -> str:
    """The VERSION column: Redis's version as it is, Valkey's own prefixed with its name."""
    if not info:
        return "?"
    name, version = server_identity(info)
    return version if name == "redis" else f"{name} {version}"


def _parse_info(raw: object) -> dict[str, Any]:
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    info: dict[str, Any] = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            info[key] = value
    return info


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname or '?'}:{parts.port or 6379}"


async def _room_stats(
    target: RedisTarget, prefix: str, rooms: Sequence[str], progress: Progress
) -> list[dict[str, Any]]:
    keyspace = KeySpace(prefix)
    details: list[dict[str, Any]] = []
    for start in range(0, len(rooms), 100):
        chunk = rooms[start : start + 100]
        pipe = target.client.pipeline(transaction=False)
        for room in chunk:
            keys = keyspace.room(room)
            pipe.hmget(keys.meta, "version", "limit", "rebackfill")
            pipe.llen(keys.window)
            pipe.llen(keys.log)
            pipe.zcard(keys.idem)
            pipe.pttl(keys.meta)
            pipe.type(keyspace.archive(room))
            for key in keys.as_list():
                pipe.execute_command("MEMORY", "USAGE", key)
        replies = await pipe.execute(raise_on_error=False)
        per_room = 6 + 5
        archive_sizes = await _archive_sizes(target, keyspace, chunk, replies, per_room)
        for index, room in enumerate(chunk):
            reply = replies[index * per_room : (index + 1) * per_room]
            meta, length, log, idem, ttl, _kind = reply[:6]
            memory = reply[6:]
            version, limit, rebackfill = (
                (_int(v) for v in meta) if isinstance(meta, list) else (0, 0, 0)
            )
            usage = None
            if not any(isinstance(m, Exception) for m in memory):
                usage = sum(int(m) for m in memory if m is not None)
            details.append(
                {
                    "room": room,
                    "entries": _int(length),
                    "version": version,
                    "limit": limit or None,
                    "rebackfill": bool(rebackfill),
                    "edit_log": _int(log),
                    "idempotency_tokens": _int(idem),
                    "archived": archive_sizes[index],
                    "memory_bytes": usage,
                    "ttl_ms": _int(ttl),
                }
            )
        progress.update(f"reading room stats… {len(details)}/{len(rooms)}")
    return details


async def _archive_sizes(
    target: RedisTarget,
    keyspace: KeySpace,
    rooms: Sequence[str],
    replies: Sequence[Any],
    per_room: int,
) -> list[int | None]:
    """Records in each room's archive (its type depends on the consolidation feature).

    For the LIST archive: every element (a header, each archived turn, a commit
    record per fold). Counting folds would mean reading an element, and an archive
    of the previous engine may start with a record of many megabytes.
    """
    counters = {b"list": "LLEN", b"zset": "ZCARD", b"stream": "XLEN", b"hash": "HLEN"}
    pipe = target.client.pipeline(transaction=False)
    queued: list[int] = []
    for index, room in enumerate(rooms):
        kind = replies[index * per_room + 5]
        kind = kind.encode() if isinstance(kind, str) else kind
        command = counters.get(kind) if isinstance(kind, bytes) else None
        if command is not None:
            pipe.execute_command(command, keyspace.archive(room))
            queued.append(index)
    sizes: list[int | None] = [None] * len(rooms)
    if queued:
        for index, value in zip(queued, await pipe.execute(raise_on_error=False), strict=True):
            sizes[index] = _int(value) if not isinstance(value, Exception) else None
    return sizes


def _room_arg(room: str) -> str:
    try:
        return validate_room_id(room)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


# ----------------------------------------------------------- bench and demo


def run_bench(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Hand the remaining arguments to ``conversation._bench.main``."""
    try:
        bench = importlib.import_module("conversation._bench")
    except ModuleNotFoundError as exc:
        if exc.name != "conversation._bench":
            raise
        print(
            "conversation: error: the benchmark is not available in this build "
            "(conversation/_bench.py is missing)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    forwarded = list(argv)
    if args.redis_url and not any(a == "--redis-url" or a.startswith("--redis-url=") for a in argv):
        forwarded = ["--redis-url", args.redis_url, *forwarded]
    result = bench.main(forwarded)
    return int(result or 0)


def run_demo(args: argparse.Namespace) -> int:
    # Imported on demand: the demo imports this module (and multiprocessing).
    from ._demo import DemoOptions, run  # noqa: PLC0415

    options = DemoOptions(
        redis_url=args.redis_url or os.environ.get("REDIS_URL") or None,
        prefix=args.prefix,
        rooms=args.rooms,
        events=args.events,
        seed=args.seed,
        rate=args.rate,
        embedded=args.embedded,
        model=args.model,
        timeout=args.timeout,
        color=args.color,
        verbose=args.verbose,
    )
    return run(options)


# ------------------------------------------------------------------- parser


_DESCRIPTION = """\
Operate the conversation engine: look inside the rooms it mirrors to Redis,
follow them live, and run the multi-process demo and the benchmark."""

_EPILOG = """\
examples:
  python -m conversation demo                      # the demo, on an embedded Redis
  conversation --redis-url redis://10.0.0.5:6379/0 rooms
  conversation inspect discord:1234 --json
  conversation tail discord:1234                   # Ctrl-C to stop
  conversation stats --top 5

environment:
  REDIS_URL   default for --redis-url (redis://, rediss://, unix://; a Cluster
              is detected automatically)
  NO_COLOR    disable colours

exit codes: 0 ok, 1 room not found / demo not converged, 2 usage error,
            3 Redis unreachable, 130 interrupted"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _connection_options(parser: argparse.ArgumentParser, fallback: str = DEFAULT_REDIS_URL) -> None:
    # Accepted before or after the command. Each parser gets its own actions with
    # SUPPRESS defaults, so a command's parser never clobbers a value given
    # before the command (the real defaults live on the top-level parser).
    conn = parser.add_argument_group("global options")
    conn.add_argument(
        "--redis-url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help=f"Redis to use (default: $REDIS_URL, else {fallback})",
    )
    conn.add_argument(
        "--prefix",
        default=argparse.SUPPRESS,
        help=f"the engine's key prefix (default: {DEFAULT_PREFIX})",
    )
    conn.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=argparse.SUPPRESS,
        help="colour output (default: auto, on when writing to a terminal)",
    )
    conn.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log engine activity at INFO level to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conversation",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _connection_options(parser)
    parser.set_defaults(redis_url=None, prefix=DEFAULT_PREFIX, color="auto", verbose=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        command = sub.add_parser(
            name,
            help=help_text,
            description="\n\n".join(
                textwrap.fill(paragraph, 78) for paragraph in description.split("\n\n")
            ),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        fallback = "an embedded private Redis" if name == "demo" else DEFAULT_REDIS_URL
        _connection_options(command, fallback)
        return command

    rooms = add(
        "rooms",
        "list rooms with sizes, limits and versions",
        "List every room under the prefix (SCAN of its meta keys; on a Cluster, "
        "every primary is scanned).",
    )
    rooms.add_argument(
        "--match", default="*", metavar="GLOB", help="only room ids matching this glob (default: *)"
    )
    rooms.add_argument("--json", action="store_true", help="machine-readable output")

    inspect = add(
        "inspect",
        "show a room's window as a table",
        "Show one room's window from an atomic snapshot: position, role, name "
        "and content, with the [Message ID: …], [deleted at …] and [Reactions: …] "
        "markers highlighted on a terminal.",
    )
    inspect.add_argument("room", metavar="ROOM", help="room id, e.g. discord:1234")
    inspect.add_argument(
        "--json", action="store_true", help="the snapshot as JSON (entries keep their message_id)"
    )
    inspect.add_argument(
        "--last",
        type=_positive_int,
        default=0,
        metavar="N",
        help="only the last N entries (default: all)",
    )
    inspect.add_argument(
        "--max-chars",
        type=int,
        default=None,
        metavar="N",
        help="cut content to N characters (default: fit the terminal; 0 = never cut)",
    )

    tail = add(
        "tail",
        "follow a room's changes live",
        "Print a room's changes as they happen: + appended, ~ edited (edits, "
        "deletions, reactions), ✂ trimmed, ∅ cleared, ⚙ limit changes.\n\n"
        "It polls the engine's sync script, which costs one tiny round trip "
        "when nothing changed and carries only the changed rows otherwise.\n\n"
        "Stops on Ctrl-C, after --count changes or after --timeout seconds.",
    )
    tail.add_argument("room", metavar="ROOM", help="room id")
    tail.add_argument(
        "--last",
        type=_positive_int,
        default=10,
        metavar="N",
        help="first print the last N entries (default: 10)",
    )
    tail.add_argument(
        "--count",
        type=_positive_int,
        default=0,
        metavar="N",
        help="stop after N changes (default: follow until Ctrl-C)",
    )
    tail.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds",
    )
    tail.add_argument(
        "--interval",
        type=_positive_float,
        default=0.25,
        metavar="SECONDS",
        help="poll interval (default: 0.25)",
    )
    tail.add_argument(
        "--max-chars",
        type=int,
        default=None,
        metavar="N",
        help="cut content to N characters (default: fit the terminal)",
    )

    stats = add(
        "stats",
        "server and per-room statistics",
        "Server facts (version, memory, clients, whether the engine's Lua scripts "
        "are cached) and per-room sizes: entries, edit log, idempotency tokens, "
        "archive, memory, TTL.",
    )
    stats.add_argument("rooms", nargs="*", metavar="ROOM", help="only these rooms (default: all)")
    stats.add_argument(
        "--top",
        type=_positive_int,
        default=20,
        metavar="N",
        help="show the N largest rooms (default: 20; 0 = all)",
    )
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    # Every argument after "bench" belongs to the benchmark, --help included.
    sub.add_parser(
        "bench",
        help="run the benchmark (its own options: bench --help)",
        add_help=False,
    )

    demo = add(
        "demo",
        "run the multi-process demo",
        "Run the multi-process demo: an event source and the inference, agents and "
        "consolidation workers as separate processes share rooms through Redis "
        "(a Redis Stream with one consumer group per worker), then every worker's "
        "window is checked against Redis.\n\n"
        "Without --redis-url/$REDIS_URL it starts a private redis-server on a free "
        "port when one is on PATH, else fakeredis's TCP server.",
    )
    demo.add_argument(
        "--rooms",
        type=_demo_rooms,
        default=3,
        metavar="N",
        help="rooms to talk in (1-12, default: 3)",
    )
    demo.add_argument(
        "--events",
        type=_demo_events,
        default=160,
        metavar="N",
        help="platform events to replay (>= 30, default: 160)",
    )
    demo.add_argument("--seed", type=int, default=7, help="script seed (default: 7)")
    demo.add_argument(
        "--rate",
        type=float,
        default=400.0,
        metavar="PER_S",
        help="events published per second (default: 400; 0 = no pacing)",
    )
    demo.add_argument(
        "--embedded",
        choices=("auto", "redis-server", "fakeredis"),
        default="auto",
        help="which embedded Redis to start when no URL is given (default: auto)",
    )
    demo.add_argument(
        "--model",
        default=None,
        metavar="MODULE:FACTORY",
        help="a chat model factory to use instead of the built-in FAKE model",
    )
    demo.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="give up if the workers have not finished by then (default: 120)",
    )
    return parser


def _demo_rooms(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 12:
        raise argparse.ArgumentTypeError(f"must be between 1 and 12, got {value}")
    return value


def _demo_events(text: str) -> int:
    value = int(text)
    if value < 30:
        raise argparse.ArgumentTypeError(f"must be at least 30, got {value}")
    return value


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _dispatch(args: argparse.Namespace, out: IO[str]) -> int:
    url = args.redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    commands = {"rooms": cmd_rooms, "inspect": cmd_inspect, "tail": cmd_tail, "stats": cmd_stats}
    target = await connect(url)
    try:
        return await commands[args.command](target, args, out)
    except BrokenPipeError:
        raise  # our reader went away (``| head``); main() exits quietly
    except _UNREACHABLE as exc:
        raise CliError(f"lost Redis at {target.url}: {_reason(exc)}") from exc
    except ResponseError as exc:
        raise CliError(f"Redis at {target.url} answered an error: {_reason(exc)}") from exc
    finally:
        await target.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m conversation`` and the ``conversation`` script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if extra and args.command != "bench":
        _usage_error(parser, f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)
    try:
        if args.command == "bench":
            return run_bench(extra, args)
        if args.command == "demo":
            return run_demo(args)
        return asyncio.run(_dispatch(args, sys.stdout))
    except CliError as exc:
        print(f"conversation: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("conversation: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of our output went away (``| head``): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)
