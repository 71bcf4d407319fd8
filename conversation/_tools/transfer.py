"""``conversation export ROOM [-o FILE]`` and ``conversation import ROOM FILE``.

The same code as ``ConversationManager.export_room`` / ``import_room``
(``conversation._transfer.rooms``), with progress on stderr for big rooms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from typing import IO

import orjson

from .._errors import InvalidExport, RoomNotEmpty
from .._redis.keys import KeySpace, validate_room_id
from .._redis.rooms import RoomStore
from .._stats import Stats
from .._transfer.rooms import ParsedRoom, export_room, import_room, parse_room_export
from .targets import RedisTarget
from .terminal import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, CliError, Progress

#: The largest export file ``import`` reads (a window of 1000 rows of 8 MB, plus archives).
MAX_IMPORT_BYTES = 2 * 1024**3


def _write_whole(path: str, body: bytes) -> None:
    """Written beside the target and renamed: a failed export never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("wb", dir=directory, delete=False) as handle:
        handle.write(body)
    os.replace(handle.name, path)


#: ``import`` reads stdin in pieces of this size.
_READ_CHUNK = 1024 * 1024


def _read_at_most(path: str, size: int) -> bytes:
    """At most ``size`` bytes of the file (or stdin). Never ``read(size)`` on an
    unknown length: that reserves ``size`` bytes up front (2 GiB for every import,
    a MemoryError under an address-space limit)."""
    if path == "-":
        body = _read_chunks(sys.stdin.buffer, size + 1)
        if len(body) > size:
            raise CliError(f"stdin holds more than {size} bytes", EXIT_USAGE)
        return body
    with open(path, "rb") as handle:
        try:
            length = os.fstat(handle.fileno()).st_size
        except OSError:
            length = 0
        if length > size:
            raise CliError(f"{path!r} is larger than {size} bytes", EXIT_USAGE)
        body = handle.read(length) if length else _read_chunks(handle, size + 1)
    if len(body) > size:
        raise CliError(f"{path!r} is larger than {size} bytes", EXIT_USAGE)
    return body


def _read_chunks(stream: IO[bytes], size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        part = stream.read(min(_READ_CHUNK, size - got))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _store(
    target: RedisTarget, ttl_seconds: float | None = None, default_limit: int = 100
) -> RoomStore:
    ttl_ms = int(ttl_seconds * 1000) if ttl_seconds else 0
    return RoomStore(
        target.client, Stats(), ttl_ms=ttl_ms, default_limit=default_limit, command_timeout=60.0
    )


def _room(room: str) -> str:
    try:
        return validate_room_id(room)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


async def cmd_export(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    room = _room(args.room)
    progress = Progress()
    progress.update(f"reading room {room}…")
    store = _store(target)
    try:
        data = await export_room(
            store,
            KeySpace(args.prefix),
            room,
            archives=not args.no_archives,
            timeout=60.0,
            progress=progress.update,
        )
    finally:
        progress.done()
        await store.wait_idle()
    if not data["source"]["epoch"] and not data["entries"]:
        print(
            f"conversation: room {room!r} not found under prefix {args.prefix!r}", file=sys.stderr
        )
        return EXIT_NOT_FOUND
    body = orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n"
    if args.output in (None, "-"):
        out.write(body.decode("utf-8"))
        out.flush()
    else:
        await asyncio.to_thread(_write_whole, args.output, body)
    archived = len(data["archive"]["elements"]) if data["archive"] else 0
    where = "" if args.output in (None, "-") else f" to {args.output}"
    print(
        f"exported {len(data['entries'])} entries and {archived} archive elements of {room}{where}",
        file=sys.stderr,
    )
    return EXIT_OK


async def _read_export(args: argparse.Namespace, progress: Progress) -> ParsedRoom:
    """The file, checked. The raw bytes and the JSON tree are dropped as soon as the
    next form exists, so a big import holds about two copies at once, not four."""
    try:
        raw = await asyncio.to_thread(_read_at_most, args.file, MAX_IMPORT_BYTES)
    except OSError as exc:
        raise CliError(f"cannot read {args.file!r}: {exc.strerror}", EXIT_USAGE) from exc
    progress.update(f"checking {len(raw)} bytes…")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{args.file!r} is not JSON: {exc}; nothing written", EXIT_USAGE) from exc
    del raw
    try:
        parsed = parse_room_export(data, args.max_entry_bytes, progress.update)
    except InvalidExport as exc:
        raise CliError(f"{args.file!r}: {exc}; nothing written", EXIT_USAGE) from exc
    del data
    if not parsed.limit and len(parsed.rows) > args.max_history:
        raise CliError(
            f"{args.file!r} holds {len(parsed.rows)} entries under its source's "
            f"default limit; pass --max-history N (the workers' max_history, "
            f"now {args.max_history}) so none is trimmed; nothing written",
            EXIT_USAGE,
        )
    return parsed


async def cmd_import(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    room = _room(args.room)
    progress = Progress()
    try:
        parsed = await _read_export(args, progress)
    except BaseException:
        progress.done()
        raise
    store = _store(target, args.ttl, args.max_history)
    try:
        try:
            progress.update(f"writing {len(parsed.rows)} entries in one script…")
            version = await import_room(
                store, KeySpace(args.prefix), room, parsed, replace=args.replace
            )
        except InvalidExport as exc:
            raise CliError(f"{args.file!r}: {exc}; nothing written", EXIT_USAGE) from exc
        except RoomNotEmpty as exc:
            raise CliError(
                f"room {room!r} holds {exc.entries} entries; --replace replaces them "
                "(nothing written)",
                EXIT_USAGE,
            ) from exc
    finally:
        progress.done()
        await store.wait_idle()
    print(f"imported {len(parsed.rows)} entries into {room} (version {version})", file=out)
    return EXIT_OK
