"""Leaves out the peer tests ``left_out.LEFT_OUT`` names, and reports the counts.

Loaded by every peer run (``-p peer_report``). ``PEER_FRAMEWORK`` picks the
table; ``PEER_REPORT`` is where the counts go (JSON), for the runner to show.
"""

from __future__ import annotations

import inspect
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import peer_engine
import pytest
from left_out import LEFT_OUT
from peer_engine import MODE

_FRAMEWORK = os.environ["PEER_FRAMEWORK"]
_outcomes: Counter[str] = Counter()
_left_out: dict[str, str] = {}
# Tests that ran without building an adapter: they test something else (the
# peer's own class, a base class), so left_out.py must name them.
_no_adapter: list[str] = []


def _key(item: pytest.Item) -> tuple[str, str]:
    """(path, function) of a test, the path relative to the suite's root."""
    path = Path(str(item.path)).relative_to(Path(str(item.config.rootpath))).as_posix()
    name = getattr(item, "originalname", None) or item.name.partition("[")[0]
    return path, name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    table = LEFT_OUT[_FRAMEWORK]
    kept, dropped = [], []
    for item in items:
        path, name = _key(item)
        reason = table.get(path, {}).get(name)
        function = getattr(item, "function", None)
        if reason is None and MODE == "threaded" and inspect.iscoroutinefunction(function):
            reason = "async test: runs in plain mode (no sync call to hand to another thread)"
        if reason is None:
            kept.append(item)
        else:
            dropped.append(item)
            _left_out[item.nodeid] = reason
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = kept


_built_before_setup: dict[str, int] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # From setup on: some suites build the adapter in a fixture (ADK's).
    _built_before_setup[item.nodeid] = peer_engine.counts.built


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield
    if peer_engine.counts.built == _built_before_setup.get(item.nodeid, -1):
        _no_adapter.append(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _outcomes[report.outcome] += 1
    elif report.outcome == "failed":
        _outcomes["error"] += 1  # in setup or teardown
    elif report.outcome == "skipped":
        _outcomes["skipped"] += 1  # skipped before it ran


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("PEER_REPORT")
    if path:
        report = {
            "outcomes": dict(_outcomes),
            "left_out": _left_out,
            "adapters_built": peer_engine.counts.built,
            "no_adapter": _no_adapter,
        }
        Path(path).write_text(json.dumps(report, indent=1), encoding="utf-8")
