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
from .._transfer.rooms import export_room, import_room, parse_room_export
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


def _read_at_most(path: str, size: int) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read(size)
    with open(path, "rb") as handle:
        return handle.read(size)


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


async def cmd_import(target: RedisTarget, args: argparse.Namespace, out: IO[str]) -> int:
    room = _room(args.room)
    progress = Progress()
    try:
        raw = await asyncio.to_thread(_read_at_most, args.file, MAX_IMPORT_BYTES + 1)
    except OSError as exc:
        raise CliError(f"cannot read {args.file!r}: {exc.strerror}", EXIT_USAGE) from exc
    if len(raw) > MAX_IMPORT_BYTES:
        raise CliError(f"{args.file!r} is larger than {MAX_IMPORT_BYTES} bytes", EXIT_USAGE)
    progress.update(f"checking {len(raw)} bytes…")
    store = _store(target, args.ttl, args.max_history)
    try:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CliError(
                f"{args.file!r} is not JSON: {exc}; nothing written", EXIT_USAGE
            ) from exc
        try:
            parsed = parse_room_export(data, args.max_entry_bytes, progress.update)
            if not parsed.limit and len(parsed.rows) > args.max_history:
                raise CliError(
                    f"{args.file!r} holds {len(parsed.rows)} entries under its source's "
                    f"default limit; pass --max-history N (the workers' max_history, "
                    f"now {args.max_history}) so none is trimmed; nothing written",
                    EXIT_USAGE,
                )
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
