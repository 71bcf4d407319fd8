"""The benchmark runs end to end (``--quick``) and reports every row with numbers.

A smoke test only: it asserts the shape of the JSON report, never a timing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from redis_servers import REDIS_SERVER

from conversation._tools.bench import ROW_KEYS, main

# The nine measurements of issue 4, by the key prefix of their rows.
ISSUE_ROWS = (
    "append_",
    "warm_read_",
    "edit_",
    "catchup_",
    "cold_hydrate_",
    "get_messages_vs_deepcopy",
    "loop_lag_",
    "memory_per_entry",
    "render_",
)


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason="needs a redis-server binary")
def test_quick_bench_reports_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "bench.json"

    assert main(["--quick", "--json", str(report)]) == 0

    document = json.loads(report.read_text(encoding="utf-8"))
    rows = {row["key"]: row for row in document["rows"]}
    assert list(rows) == list(ROW_KEYS)
    for prefix in ISSUE_ROWS:
        assert any(key.startswith(prefix) for key in rows), prefix
    for key, row in rows.items():
        if row["skipped"]:
            # Only a missing optional component may skip a row, and it must say so.
            assert isinstance(row["skipped"], str) and row["skipped"], key
            continue
        for field in ("engine", "baseline", "ratio"):
            value = row[field]
            assert isinstance(value, int | float) and not isinstance(value, bool), (key, field)
            assert math.isfinite(value), (key, field, value)
        assert row["passed"] in (True, False, None), key
        assert isinstance(row["target"], str) and row["target"], key
    assert document["meta"]["quick"] is True
    assert isinstance(document["meta"]["cpu_count"], int)
    # The table went to stdout, one line per row plus the header and the summary.
    out = capsys.readouterr().out
    for key in rows:
        assert f"| {key} " in out
