"""The operator CLI: ``python -m conversation`` (console script ``conversation``).

Commands::

    rooms            list rooms with their sizes, limits, versions and TTLs
    inspect ROOM     a room's window as a table (markers highlighted) or --json
    tail ROOM        follow a room's changes live until Ctrl-C
    stats [ROOM...]  server facts, engine script cache, per-room sizes
    export ROOM      a room as a JSON export (``-o FILE``), archives included
    import ROOM FILE write an export as the room (``--replace`` an existing one)
    bench ...        the benchmark (``conversation._tools.bench``)
    demo             the multi-process demo (``conversation._tools.demo``)

Every command that talks to Redis reads ``--redis-url`` (default: ``$REDIS_URL``,
else ``redis://127.0.0.1:6379/0``) and ``--prefix`` (the engine's
``key_prefix``, default ``sg``). A Redis Cluster is detected from ``INFO
cluster`` and then scanned primary by primary.

Reading a room uses the engine's own ``sync`` script: one round trip returns
an atomic (entries, version) snapshot, never a list read and a version read
another writer could slip between.

``tail`` reads the change feed (``read_since``, ``lua/changes.lua``) from the
cursor it holds (every ``--interval`` seconds, 0.25 by default). An idle poll
is one EVALSHA that answers four small values; after a change the reply carries
only the rows that changed (appended, edited, trimmed, folded), exactly as a
worker catches up, and a gap the log cannot bridge shows as a reset. Polling
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
import importlib
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import IO, NoReturn

from redis.exceptions import ResponseError

from .commands import cmd_inspect, cmd_rooms, cmd_stats, cmd_tail
from .targets import DEFAULT_PREFIX, DEFAULT_REDIS_URL, UNREACHABLE, connect, error_reason
from .terminal import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, CliError
from .transfer import cmd_export, cmd_import
from .working_set import cmd_worker_stats

logger = logging.getLogger(__name__)
# ----------------------------------------------------------- bench and demo


def run_bench(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Hand the remaining arguments to ``conversation._tools.bench.main``."""
    # Imported on demand: the benchmark's imports are not every command's.
    bench = importlib.import_module("conversation._tools.bench")
    forwarded = list(argv)
    if args.redis_url and not any(a == "--redis-url" or a.startswith("--redis-url=") for a in argv):
        forwarded = ["--redis-url", args.redis_url, *forwarded]
    result = bench.main(forwarded)
    return int(result or 0)


def run_demo(args: argparse.Namespace) -> int:
    # Imported on demand: the demo brings multiprocessing and the whole engine.
    from .demo import DemoOptions, run  # noqa: PLC0415

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
        platform_payloads=args.platform_payloads,
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
    stats.add_argument(
        "--worker",
        metavar="FILE",
        default=None,
        help="show a worker's own counters and working set from the JSON of "
        "manager.stats(working_set=True) in FILE ('-': stdin); needs no Redis",
    )

    export = add(
        "export",
        "write a room as JSON",
        "Write a room as an export (entries with their identities, limit, archive): "
        "the format ConversationManager.export_room returns, for import elsewhere.",
    )
    export.add_argument("room", metavar="ROOM", help="room id")
    export.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    export.add_argument("--no-archives", action="store_true", help="leave the archive out")

    imp = add(
        "import",
        "write an export as a room",
        "Write an export (from 'export' or export_room) as ROOM in one script, under a "
        "new epoch: every worker reloads. Refuses a room that holds entries unless "
        "--replace; a damaged or foreign file writes nothing.",
    )
    imp.add_argument("room", metavar="ROOM", help="room id (need not be the exported one)")
    imp.add_argument("file", metavar="FILE", help="the export ('-': stdin)")
    imp.add_argument("--replace", action="store_true", help="replace a room that holds entries")
    imp.add_argument(
        "--ttl",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="the room's keys expire after this (default: never; workers' ttl_seconds)",
    )
    imp.add_argument(
        "--max-entry-bytes",
        type=_positive_int,
        default=8 * 1024 * 1024,
        metavar="N",
        help="refuse entries larger than this (default: 8 MiB, the manager's default)",
    )
    imp.add_argument(
        "--max-history",
        type=_positive_int,
        default=100,
        metavar="N",
        help="the workers' max_history: the limit of an export made under its default "
        "(default: 100, the manager's default)",
    )

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
        "--platform-payloads",
        action="store_true",
        help="the source sends Discord gateway payloads and the workers feed them through "
        "conversation.platforms.discord (needs conversation[discord])",
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
    commands = {
        "rooms": cmd_rooms,
        "inspect": cmd_inspect,
        "tail": cmd_tail,
        "stats": cmd_stats,
        "export": cmd_export,
        "import": cmd_import,
    }
    target = await connect(url)
    try:
        return await commands[args.command](target, args, out)
    except BrokenPipeError:
        raise  # our reader went away (``| head``); main() exits quietly
    except UNREACHABLE as exc:
        raise CliError(f"lost Redis at {target.url}: {error_reason(exc)}") from exc
    except ResponseError as exc:
        raise CliError(f"Redis at {target.url} answered an error: {error_reason(exc)}") from exc
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
        if args.command == "stats" and args.worker is not None:
            return cmd_worker_stats(args, sys.stdout)
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
