"""The peer benchmark (``bench --only peers``) reports every row, for every subject.

A smoke test only: tiny sizes, and it asserts the shape of the rows, never a timing.
"""

from __future__ import annotations

import math

import pytest

from conversation._tools.bench import ROW_KEYS
from conversation._tools.bench_peers import (
    FRESHNESS_MODES,
    PEER_ROW_KEYS,
    PEERS,
    PeerSizes,
    bench_peers,
)

pytestmark = pytest.mark.real_server

TINY = PeerSizes(repeats=1, rooms=3, per_room=2, reads=3, edits=1)


async def test_every_peer_row_is_measured_or_says_why_not(url: str) -> None:
    rows = await bench_peers(url, TINY, private=True, prefix="sg")

    assert [row.key for row in rows] == list(PEER_ROW_KEYS)
    for row in rows:
        peer = next((p for p in PEERS if row.key.endswith("_" + p.key)), None)
        if peer is not None and not peer.installed():
            assert row.skipped == f"not installed ({peer.distribution})", row.key
            continue
        assert row.skipped is None, (row.key, row.skipped)
        for value in (row.engine, row.baseline, row.ratio):
            assert isinstance(value, float) and math.isfinite(value), (row.key, value)
    by_key = {row.key: row for row in rows}
    # The engine's warm read moves a version check, never the window.
    for mode in FRESHNESS_MODES:
        assert by_key[f"peers_read_bytes_engine_{mode}"].ratio < 0.1  # type: ignore[operator]
    # A peer with no edit API says what its user must do instead.
    for peer in PEERS:
        if peer.installed():
            assert by_key[f"peers_edit_{peer.key}"].details["edit"].startswith("no edit API")


def test_the_bench_table_lists_the_peer_rows() -> None:
    assert ROW_KEYS[-len(PEER_ROW_KEYS) :] == PEER_ROW_KEYS
    for mode in FRESHNESS_MODES:
        assert f"peers_append_engine_{mode}" in PEER_ROW_KEYS


def test_the_engine_runs_in_every_freshness_mode_default_first() -> None:
    assert FRESHNESS_MODES == ("sync", "push")
