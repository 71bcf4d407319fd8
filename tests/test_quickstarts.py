"""The ADK and LlamaIndex quick starts of docs/integrations.md run as written
(pointed at a private real redis-server instead of localhost:6379), warnings as errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from redis_servers import RedisServer

pytestmark = pytest.mark.real_server

DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
DEFAULT_URL = "redis://localhost:6379/0"


def _quick_starts(section: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(section)
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    return [b for b in re.findall(r"```python\n(.*?)```", body, re.S) if DEFAULT_URL in b]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("## Google ADK", [["{'turns': 1, 'app:motd': 'hi', 'user:lang': 'en'}", "1"]]),
        # The async one, run second, reads what the sync one wrote: one history.
        ("## LlamaIndex", [["['discord:1234']"], ["hi, I'm Ann", "hello Ann"]]),
    ],
)
def test_quick_starts_run_as_written(
    redis_server: RedisServer, section: str, expected: list[list[str]]
) -> None:
    blocks = _quick_starts(section)
    assert len(blocks) == len(expected)
    url = f"redis://127.0.0.1:{redis_server.port}/0"
    for block, fragments in zip(blocks, expected, strict=True):
        done = subprocess.run(
            [sys.executable, "-W", "error", "-c", block.replace(DEFAULT_URL, url)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        for fragment in fragments:
            assert fragment in done.stdout, done.stdout
