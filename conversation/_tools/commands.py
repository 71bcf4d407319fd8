"""The CLI commands that talk to Redis: rooms, inspect, tail, stats."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any
from urllib.parse import urlsplit

from redis.exceptions import ResponseError

from .._changes.feed import Batch, Change
from .._redis.keys import KeySpace, validate_room_id
from .._redis.scripts import load_scripts
from .reading import (
    RoomReader,
    Snapshot,
    as_int,
    limit_text,
    list_rooms,
    summarise_rooms,
    ttl_text,
)
from .redis_server import server_identity
from .targets import RedisTarget
from .terminal import (
    CYAN,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    GREEN,
    MAGENTA,
    RED,
    YELLOW,
    CliError,
    Palette,
    Progress,
    content_width,
    describe_entry,
    entry_rows,
    format_table,
    json_dumps,
    truncate,
)

logger = logging.getLogger(__name__)
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
            limit_text(s.limit),
            str(s.version),
            ttl_text(s.ttl_ms),
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
    return {
        "room": snapshot.room,
        "exists": snapshot.exists,
        "epoch": snapshot.epoch or None,
        "tag": snapshot.tag or None,
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
        f"{len(entries)} entries (limit {limit_text(snapshot.limit)})"
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
    follower = _Follower(room, palette, width, out)
    try:
        # The change feed (what ``changes()`` reads), polled every --interval.
        batch = await reader.read_changes(room, None)
        follower.start(batch, args.last)
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
            follower.report(await reader.read_changes(room, follower.cursor))
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await reader.wait_idle()
    return EXIT_OK


class _Follower:
    """Turns change-feed batches into one printed line per change."""

    def __init__(self, room: str, palette: Palette, width: int | None, out: IO[str]) -> None:
        self.room = room
        self.palette = palette
        self.width = width
        self.out = out
        self.changes = 0
        self.cursor: str | None = None
        self.epoch = ""
        self.limit = 0
        self.rebackfill = False
        self.head = 0  # the lowest position this follower holds
        self.end = 0  # one past the highest

    def emit(self, mark: str, text: str, *, change: bool = True) -> None:
        stamp = self.palette.dim(dt.datetime.now().strftime("%H:%M:%S"))
        print(f"{stamp} {mark} {text}", file=self.out, flush=True)
        if change:
            self.changes += 1

    def entry_line(self, change: Change) -> str:
        entry = change.entry
        if entry is None:
            return f"#{change.position} {self.palette.bad('corrupt row')}"
        name = f" {entry['name']}" if entry.get("name") else ""
        text = self.palette.highlight(truncate(describe_entry(entry), self.width))
        return f"#{change.position} {self.palette.role(str(entry.get('role')))}{name}: {text}"

    def _settle(self, batch: Batch) -> None:
        self.cursor = batch.cursor
        self.epoch = batch.epoch
        self.limit = batch.limit
        self.rebackfill = batch.rebackfill

    def start(self, batch: Batch, last: int) -> None:
        self._settle(batch)
        if not batch.epoch:
            print(
                f"waiting for room {self.palette.bold(self.room)} to appear (Ctrl-C to stop)",
                file=self.out,
                flush=True,
            )
            return
        appends = [c for c in batch.changes if c.kind == "append"]
        print(
            f"following {self.palette.bold(self.room)} at version {batch.version} "
            f"({len(batch.rows)} entries, limit {limit_text(batch.limit)}) — Ctrl-C to stop",
            file=self.out,
            flush=True,
        )
        if appends:
            self.head, self.end = appends[0].position, appends[-1].position + 1
        for change in appends[-last:] if last > 0 else []:
            self.emit(" ", self.entry_line(change), change=False)

    def report(self, batch: Batch) -> None:
        p = self.palette
        before_epoch, before_limit, before_rebackfill = self.epoch, self.limit, self.rebackfill
        self._settle(batch)
        if not before_epoch and batch.epoch and batch.changes:
            self.emit(p.paint("●", CYAN), f"room {self.room} appeared at version {batch.version}")
        for change in batch.changes:
            if change.kind == "append":
                self.emit(p.paint("+", GREEN), self.entry_line(change))
                self.end = change.position + 1
            elif change.kind == "edit":
                self.emit(p.paint("~", YELLOW), self.entry_line(change))
            elif change.kind in ("trim", "fold"):
                gone = max(0, min(change.position, self.end) - self.head)
                self.head = change.position
                if change.kind == "fold":
                    self.emit(
                        p.paint("⊕", MAGENTA),
                        f"entries up to #{change.position} folded into a summary: "
                        + self.entry_line(change),
                    )
                else:
                    self.emit(
                        p.dim("✂"),
                        p.dim(
                            f"{gone} entr{'y' if gone == 1 else 'ies'} left the front of the window"
                        ),
                    )
            elif change.kind == "clear":
                self.head = self.end = change.position
                self.emit(p.paint("∅", RED), f"room cleared (version {batch.version})")
            else:  # reset
                self.head = self.end = change.position
                if not batch.epoch:
                    self.emit(
                        p.bad("✗"), f"room {self.room} is gone from Redis (expired or flushed)"
                    )
                else:
                    self.emit(
                        p.paint("∅", RED),
                        f"window reset (another epoch, or more changes than the log keeps); "
                        f"the whole window follows (version {batch.version})",
                    )
        if batch.epoch and batch.limit != before_limit:
            self.emit(
                p.paint("⚙", MAGENTA),
                f"limit {limit_text(before_limit)} → {limit_text(batch.limit)}",
            )
        if batch.rebackfill and not before_rebackfill:
            self.emit(p.paint("⚙", MAGENTA), "re-backfill requested")


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
                limit_text(int(d["limit"] or 0)),
                str(d["version"]),
                str(d["edit_log"]),
                str(d["idempotency_tokens"]),
                str(d["archived"]) if d["archived"] is not None else "-",
                _bytes_text(d["memory_bytes"]),
                ttl_text(int(d["ttl_ms"])),
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
    scripts = load_scripts()
    shas = [script.sha for script in scripts.values()]
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
            # Loaded as this engine's function library (FCALL), or else script by script.
            library = await target.execute_on(
                node, "FUNCTION", "LIST", "LIBRARYNAME", scripts.library_name
            )
        except ResponseError:  # a server without functions
            library = []
        try:
            if library:
                loaded: int | None = len(shas)
            else:
                exists = await target.execute_on(node, "SCRIPT", "EXISTS", *shas)
                loaded = sum(1 for flag in exists if int(flag))
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
        per_room = 6 + len(keyspace.room("x").as_list())
        archive_sizes = await _archive_sizes(target, keyspace, chunk, replies, per_room)
        for index, room in enumerate(chunk):
            reply = replies[index * per_room : (index + 1) * per_room]
            meta, length, log, idem, ttl, _kind = reply[:6]
            memory = reply[6:]
            version, limit, rebackfill = (
                (as_int(v) for v in meta) if isinstance(meta, list) else (0, 0, 0)
            )
            usage = None
            if not any(isinstance(m, Exception) for m in memory):
                usage = sum(int(m) for m in memory if m is not None)
            details.append(
                {
                    "room": room,
                    "entries": as_int(length),
                    "version": version,
                    "limit": limit or None,
                    "rebackfill": bool(rebackfill),
                    "edit_log": as_int(log),
                    "idempotency_tokens": as_int(idem),
                    "archived": archive_sizes[index],
                    "memory_bytes": usage,
                    "ttl_ms": as_int(ttl),
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
            sizes[index] = as_int(value) if not isinstance(value, Exception) else None
    return sizes


def _room_arg(room: str) -> str:
    try:
        return validate_room_id(room)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc
