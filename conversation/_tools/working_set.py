"""``conversation stats --worker FILE``: a worker's own counters and working set.

The working set lives in the worker's memory, not in Redis, so the CLI cannot
read it from outside. A worker writes ``manager.stats(working_set=True)`` as
JSON (to a file, on a signal, from an admin endpoint: its choice) and this
command shows it; ``-`` reads standard input.
"""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any

import orjson

from .terminal import EXIT_OK, EXIT_USAGE, CliError, Palette, format_table, json_dumps

_FIELDS = ("room_id", "entries", "pending_writes", "idle_seconds", "version")


def load_worker_stats(source: str) -> dict[str, Any]:
    try:
        if source == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as handle:
                raw = handle.read()
    except OSError as exc:
        raise CliError(f"cannot read worker stats {source!r}: {exc.strerror}", EXIT_USAGE) from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CliError(f"{source!r} is not JSON: {exc}", EXIT_USAGE) from exc
    rooms = data.get("working_set") if isinstance(data, dict) else None
    if not isinstance(rooms, list) or not all(
        isinstance(r, dict) and all(f in r for f in _FIELDS) for r in rooms
    ):
        raise CliError(
            f"{source!r} is not the JSON of manager.stats(working_set=True) "
            "(no valid 'working_set' list)",
            EXIT_USAGE,
        )
    stats: dict[str, Any] = data
    return stats


def cmd_worker_stats(args: argparse.Namespace, out: IO[str]) -> int:
    data = load_worker_stats(args.worker)
    if args.json:
        print(json_dumps(data), file=out)
        return EXIT_OK
    palette = Palette.for_stream(out, args.color)
    rooms: list[dict[str, Any]] = data["working_set"]
    counters = {k: v for k, v in data.items() if k != "working_set" and isinstance(v, int)}
    print(palette.bold("Worker counters"), file=out)
    for line in format_table(
        ["COUNTER", "VALUE"],
        [[name, str(value)] for name, value in counters.items()],
        right=(1,),
        palette=palette,
    ):
        print(line, file=out)
    print(file=out)
    print(
        palette.bold("Working set") + f": {len(rooms)} room(s), most recently used first", file=out
    )
    shown = rooms[: args.top] if args.top else rooms
    for line in format_table(
        ["ROOM", "ENTRIES", "PENDING", "IDLE S", "VERSION"],
        [
            [
                str(r["room_id"]),
                str(r["entries"]),
                str(r["pending_writes"]),
                f"{float(r['idle_seconds']):.1f}",
                str(r["version"]),
            ]
            for r in shown
        ],
        right=(1, 2, 3, 4),
        palette=palette,
    ):
        print(line, file=out)
    if len(shown) < len(rooms):
        print(palette.dim(f"  … {len(rooms) - len(shown)} more (--top 0 shows all)"), file=out)
    return EXIT_OK
