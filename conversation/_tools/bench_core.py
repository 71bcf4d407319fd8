"""What every ``bench`` section measures with: rows and their verdicts, paired
medians, and the server's byte counters.

Its own module so a section that lives outside ``bench.py`` (``bench_peers``)
reports the same way without importing the module that lists it.
"""

from __future__ import annotations

import gc
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

__all__ = [
    "NetMeter",
    "Row",
    "median",
    "paired",
    "percentile",
    "progress",
    "ratio_row",
    "skipped_row",
    "value_row",
]


# --------------------------------------------------------------------- results


@dataclass(slots=True)
class Row:
    """One line of the table: engine and baseline medians, their ratio, the verdict."""

    key: str
    title: str
    unit: str
    engine: float | None
    baseline: float | None
    target: str
    passed: bool | None  # None: reported only (no target in the issue)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.engine is None or not self.baseline:
            return None
        return self.engine / self.baseline

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "unit": self.unit,
            "engine": self.engine,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target,
            "passed": self.passed,
            "details": self.details,
            "skipped": self.skipped,
        }


def ratio_row(
    key: str,
    title: str,
    unit: str,
    engine: float,
    baseline: float,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    details: dict[str, Any] | None = None,
) -> Row:
    """A row judged on engine / baseline."""
    ratio = engine / baseline if baseline else float("inf")
    if at_least is not None:
        target, passed = f">= {at_least:g}x", ratio >= at_least
    elif at_most is not None:
        target, passed = f"<= {at_most:g}x", ratio <= at_most
    else:
        target, passed = "report", None
    return Row(key, title, unit, engine, baseline, target, passed, details or {})


def skipped_row(key: str, reason: str) -> Row:
    """A row that could not be measured here, and says why."""
    return Row(key, key, "", None, None, "n/a", None, skipped=reason)


def value_row(
    key: str,
    title: str,
    unit: str,
    engine: float,
    baseline: float,
    *,
    below: float | None = None,
    at_most: float | None = None,
    details: dict[str, Any] | None = None,
) -> Row:
    """A row judged on the engine's own value (a count or an absolute bound)."""
    if below is not None:
        target, passed = f"< {below:g} {unit}", engine < below
    elif at_most is not None:
        target, passed = f"<= {at_most:g} {unit}", engine <= at_most
    else:
        target, passed = "report", None
    return Row(key, title, unit, engine, baseline, target, passed, details or {})


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def paired(
    repeats: int,
    engine: Callable[[], Awaitable[float]],
    baseline: Callable[[], Awaitable[float]],
) -> tuple[list[float], list[float]]:
    """Run engine and baseline ``repeats`` times each, alternating which goes first."""
    engine_values: list[float] = []
    baseline_values: list[float] = []
    for index in range(repeats):
        gc.collect()
        if index % 2 == 0:
            engine_values.append(await engine())
            baseline_values.append(await baseline())
        else:
            baseline_values.append(await baseline())
            engine_values.append(await engine())
    return engine_values, baseline_values


class NetMeter:
    """Bytes the server read and wrote, from ``INFO stats``, minus INFO's own traffic."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.overhead = (0, 0)

    async def read(self) -> tuple[int, int]:
        info: dict[str, Any] = await self.client.info("stats")
        return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])

    async def calibrate(self) -> None:
        ins: list[int] = []
        outs: list[int] = []
        previous = await self.read()
        for _ in range(5):
            current = await self.read()
            ins.append(current[0] - previous[0])
            outs.append(current[1] - previous[1])
            previous = current
        self.overhead = (min(ins), min(outs))

    def delta(self, before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
        return (
            max(0, after[0] - before[0] - self.overhead[0]),
            max(0, after[1] - before[1] - self.overhead[1]),
        )


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)
