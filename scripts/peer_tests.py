"""Run the frameworks' own tests of their history/session classes against our adapters.

    python scripts/peer_tests.py [--cache DIR] [langchain] [openai-agents]

For each framework, at the version installed (the test extra pins it), the
sdist is fetched from the package index with pip (``pip download --no-deps
--no-binary :all:``: the sdists ship their tests; GitHub is not needed) into
``--cache`` (default ``.cache/peer-tests``), and its test files below are run
with only the constructor of the class under test swapped for the engine's
adapter (``scripts/peer/peer_*.py``), on a private redis-server. LangChain's
tests run twice: ``plain`` (a sync test in a thread with no event loop
anywhere) and ``threaded`` (its sync tests, called from the main thread while
an async manager's loop runs in another). ``scripts/peer/left_out.py`` names
every test left out, with the reason. Exits non-zero if any test fails.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from conversation._tools.redis_server import RedisServerProcess

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "scripts" / "peer"


@dataclass(frozen=True)
class Suite:
    framework: str  # the key of scripts/peer/left_out.py
    distribution: str  # the package on the index
    plugin: str
    files: tuple[str, ...]
    modes: tuple[str, ...]
    own_conftest: bool  # False: their conftest needs plugins we do not install


SUITES = (
    Suite(
        "langchain",
        "langchain-core",
        "peer_langchain",
        (
            "tests/unit_tests/chat_history/test_chat_history.py",
            "tests/unit_tests/runnables/test_history.py",
        ),
        ("plain", "threaded"),
        own_conftest=False,  # unit_tests/conftest.py needs blockbuster and pytest-mock
    ),
    Suite(
        "openai-agents",
        "openai-agents",
        "peer_agents",
        (
            "tests/memory/test_session.py",
            "tests/memory/test_session_limit.py",
            "tests/extensions/memory/test_redis_session.py",
        ),
        ("plain",),
        own_conftest=True,
    ),
)


def fetch(suite: Suite, cache: Path) -> Path:
    """The extracted sdist of the installed version (fetched once per version)."""
    version = importlib.metadata.version(suite.distribution)
    stem = f"{suite.distribution.replace('-', '_')}-{version}"
    tree = cache / stem
    if (tree / "tests").is_dir():
        return tree
    downloads = cache / "sdists"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / f"{stem}.tar.gz"
    if not archive.exists():
        fetched = subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                "--no-binary", ":all:", f"{suite.distribution}=={version}", "-d", str(downloads),
            ],
            check=False,
        )  # fmt: skip
        if fetched.returncode != 0 or not archive.exists():
            raise SystemExit(
                f"could not fetch the {suite.distribution} {version} sdist from the package "
                f"index; put {archive.name} in {downloads} (or pass --cache) and run again"
            )
    with tarfile.open(archive) as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(f"{stem}/tests/")]
        sdist.extractall(cache, members=members, filter="data")
    return tree


def run(suite: Suite, mode: str, tree: Path, url: str, report: Path) -> dict[str, object]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), str(PEER)]),
        "PEER_FRAMEWORK": suite.framework,
        "PEER_MODE": mode,
        "PEER_REDIS_URL": url,
        "PEER_REPORT": str(report),
        "OPENAI_AGENTS_DISABLE_TRACING": "1",
    }
    command = [
        sys.executable, "-m", "pytest", "-c", str(PEER / "pytest.ini"), "--rootdir", str(tree),
        "-p", "peer_report", "-p", suite.plugin, "-q", "--no-header", "-rfE",
        *([] if suite.own_conftest else ["--noconftest"]),
        *suite.files,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=tree, env=env, check=False)
    outcome: dict[str, object] = json.loads(report.read_text(encoding="utf-8"))
    outcome["status"] = done.returncode
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frameworks", nargs="*", help="langchain, openai-agents (default: both)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "peer-tests")
    args = parser.parse_args()
    unknown = set(args.frameworks) - {s.framework for s in SUITES}
    if unknown:
        parser.error(f"unknown framework(s): {', '.join(sorted(unknown))}")
    chosen = [s for s in SUITES if not args.frameworks or s.framework in args.frameworks]
    trees = {suite.framework: fetch(suite, args.cache) for suite in chosen}
    failed = False
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="peer-tests-") as scratch:
        server = RedisServerProcess(Path(scratch) / "redis").start()
        try:
            for suite in chosen:
                for mode in suite.modes:
                    report = Path(scratch) / f"{suite.framework}-{mode}.json"
                    outcome = run(suite, mode, trees[suite.framework], server.url, report)
                    counts = outcome["outcomes"]
                    assert isinstance(counts, dict)
                    left_out = outcome["left_out"]
                    assert isinstance(left_out, dict)
                    bad = counts.get("failed", 0) + counts.get("error", 0)
                    strays = outcome["no_adapter"]
                    assert isinstance(strays, list)
                    for nodeid in strays:
                        print(f"ran without the adapter (name it in left_out.py): {nodeid}")
                    bad += len(strays)
                    failed = failed or bad > 0 or outcome["status"] not in (0, 5)
                    rows.append(
                        f"{suite.framework:14} {mode:9} passed {counts.get('passed', 0):4}  "
                        f"failed {bad:3}  skipped {counts.get('skipped', 0):3}  "
                        f"left out {len(left_out):3}  adapters built {outcome['adapters_built']}"
                    )
        finally:
            if server.process is not None:
                server.process.terminate()
                server.process.wait(timeout=10)
    print("\n".join(["", "peer suites:", *rows]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
