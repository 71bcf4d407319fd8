#!/usr/bin/env python
"""The chaos checker, long variant: seeded rounds under faults until time runs out.

    .venv/bin/python scripts/soak.py --soak 600          # ten minutes, then the totals
    .venv/bin/python scripts/soak.py --seed 17           # replay one round of the quick suite
    .venv/bin/python scripts/soak.py --rounds 50 --start-seed 100

Each round is one seed: P worker processes x R rooms of random writes and reads
through a fault proxy, with latency, cut connections, blackholes, CLIENT KILL,
SCRIPT FLUSH, redis-server restarts (AOF, appendfsync always) and the loss of
single companion keys of a room, while workers recall writes with their keys,
cancel awaiting callers and move their manager to new event loops; then every
worker drains and syncs and ``tests/chaos_checker.py`` checks the logs against
Redis (see its docstring for the exact checks). The first failing round stops
the run with its seed, a replay command and a JSON dump of the round.

The quick variant of the same checker runs in the test suite
(``tests/test_chaos.py``). Exit status: 0 when every round passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This checkout's package first (also for the spawned workers, which inherit sys.path).
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from chaos_checker import (  # noqa: E402  (needs the path set up above)
    SOAK,
    ChaosCluster,
    ChaosFailure,
    ChaosOptions,
    RoundReport,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--soak", type=float, metavar="SECONDS", help="run rounds for this long")
    mode.add_argument("--seed", type=int, help="replay this one seed")
    mode.add_argument("--rounds", type=int, help="run this many rounds")
    parser.add_argument("--start-seed", type=int, default=1000, help="first seed of a soak")
    parser.add_argument("--processes", type=int, help="worker processes per round")
    parser.add_argument("--rooms", type=int, help="rooms per round")
    parser.add_argument("--ops", type=int, help="operations per worker and room")
    parser.add_argument("--restart-every", type=int, help="a redis-server restart every n rounds")
    parser.add_argument(
        "--loop-phases", type=int, help="a worker runs its operations in 1..n event loops"
    )
    parser.add_argument("--no-faults", action="store_true", help="concurrency only, no faults")
    parser.add_argument(
        "--freshness", choices=("sync", "push"), help="the workers' freshness mode (default sync)"
    )
    parser.add_argument("--dir", type=Path, help="where servers and dumps go (default: a tmp dir)")
    parser.add_argument("--json", type=Path, help="also write the totals here")
    return parser.parse_args(argv)


def options_for(args: argparse.Namespace) -> ChaosOptions:
    # A replay defaults to the quick suite's shape; a soak to the long one.
    base = ChaosOptions() if args.seed is not None else SOAK
    return replace(
        base,
        processes=args.processes or base.processes,
        rooms=args.rooms or base.rooms,
        ops_per_room=args.ops or base.ops_per_room,
        restart_every=base.restart_every if args.restart_every is None else args.restart_every,
        loop_phases=args.loop_phases or base.loop_phases,
        faults=base.faults and not args.no_faults,
        freshness=args.freshness or base.freshness,
    )


class Totals:
    def __init__(self) -> None:
        self.rounds = 0
        self.ops = 0
        self.acknowledged = 0
        self.appends = 0
        self.appends_in_redis = 0
        self.edits_checked = 0
        self.durable_errors = 0
        self.sync_retries = 0
        self.recalls = 0
        self.mixed_ticks = 0
        self.cancelled = 0
        self.loop_moves = 0
        self.keys_lost = 0
        self.excused_doubles = 0
        self.faults: Counter[str] = Counter()
        self.engine: Counter[str] = Counter()
        self.violations: Counter[str] = Counter(lost=0, duplicated=0, reordered=0, other=0)

    def add(self, report: RoundReport) -> None:
        self.rounds += 1
        self.ops += report.ops
        self.acknowledged += report.acknowledged
        self.appends += report.appends_acknowledged
        self.appends_in_redis += report.appends_in_redis
        self.edits_checked += report.edits_checked
        self.durable_errors += report.durable_errors
        self.sync_retries += report.sync_retries
        self.recalls += report.recalls
        self.mixed_ticks += report.mixed_ticks
        self.cancelled += report.cancelled
        self.loop_moves += report.loop_moves
        self.keys_lost += report.keys_lost
        self.excused_doubles += report.excused_doubles
        self.faults.update(report.faults)
        self.engine.update(report.engine)
        self.violations.update(report.counts())

    def as_dict(self, seconds: float, options: ChaosOptions) -> dict[str, object]:
        return {
            "seconds": round(seconds, 1),
            "options": {
                "processes": options.processes,
                "rooms": options.rooms,
                "ops_per_room": options.ops_per_room,
                "restart_every": options.restart_every,
                "loop_phases": options.loop_phases,
                "faults": options.faults,
                "freshness": options.freshness,
            },
            "rounds": self.rounds,
            "operations": self.ops,
            "acknowledged": self.acknowledged,
            "appends_acknowledged": self.appends,
            "appends_in_redis_at_the_end": self.appends_in_redis,
            "edits_checked": self.edits_checked,
            "faults_injected": sum(self.faults.values()),
            "faults": dict(self.faults),
            "persist_failures": self.engine["persist_failures"],
            "persist_retries": self.engine["persist_retries"],
            "durable_errors_recalled_with_key": self.durable_errors,
            "final_sync_retries": self.sync_retries,
            "recalls_of_acknowledged_keys": self.recalls,
            "mixed_ticks": self.mixed_ticks,
            "cancelled_callers": self.cancelled,
            "loop_moves": self.loop_moves,
            "companion_keys_lost": self.keys_lost,
            "doubles_excused_by_idem_loss": self.excused_doubles,
            "script_reloads": self.engine["script_reloads"],
            "catch_ups": self.engine["catch_ups"],
            "reloads": self.engine["reloads"],
            "conflicts": self.engine["conflicts"],
            # freshness="push": reads served without a round trip, and reads a doubt synced.
            "push_reads": self.engine["push_reads"],
            "push_fallbacks": self.engine["push_fallbacks"],
            "violations": dict(self.violations),
        }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = options_for(args)
    if args.seed is not None:
        seeds: range | list[int] = [args.seed]
    elif args.rounds is not None:
        seeds = range(args.start_seed, args.start_seed + args.rounds)
    else:
        seeds = range(args.start_seed, sys.maxsize)
    deadline = time.monotonic() + args.soak if args.soak else None
    directory = args.dir or Path(tempfile.mkdtemp(prefix="conversation-soak-"))
    totals = Totals()
    started = time.monotonic()
    status = 0
    print(f"chaos: {options} in {directory}", flush=True)
    with ChaosCluster(directory, options) as cluster:
        for seed in seeds:
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                report = cluster.run_round(seed)
            except ChaosFailure as failure:
                print(f"FAILED: {failure}", file=sys.stderr, flush=True)
                if failure.report is not None:
                    totals.add(failure.report)
                else:
                    totals.violations["other"] += 1  # the round did not complete
                status = 1
                break
            totals.add(report)
            print(report.summary(), flush=True)
    summary = totals.as_dict(time.monotonic() - started, options)
    print(json.dumps(summary, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
