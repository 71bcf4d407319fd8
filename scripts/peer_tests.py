"""Run frameworks' own tests of their session / chat-store classes against our adapters.

    python scripts/peer_tests.py [adk] [llama-index] [-- extra pytest args]

For each suite: the framework's test file, at the version installed (the one
pyproject's ``test`` extra pins), is fetched into a cache directory
(``$CONVERSATION_PEER_CACHE``, default ``~/.cache/conversation-peer-tests``),
copied into a scratch directory beside one of our conftests
(``tests/peers/<suite>_conftest.py``), and run by pytest. The conftest changes
one thing: the line of the file that builds the framework's class builds our
adapter instead, on a private real redis-server. Their code is never
committed here; the cache is outside the repository.

Sources, in order: the cache; the framework's sdist on PyPI (used when it
ships its tests: at the pinned versions neither does); the framework's
repository at the commit the suite names (raw file download). When none can
be reached the suite fails with a message saying how to seed the cache:
a peer suite that cannot run is never reported as passed. With
``--if-available`` (what scripts/test.sh passes) such a suite is reported as
NOT RUN, with the reason, and does not fail the run: on a machine with no way
to the framework's repository the rest of the suite still gates.

Tests of the file that exercise something other than the swapped
constructor (another class's internals, a cloud client) are left out by name,
each with its reason, listed in ``LEFT_OUT`` below and in docs/integrations.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Suite:
    """One framework's test file and how to obtain it at the pinned version."""

    name: str
    dist: str  # the PyPI distribution whose version is pinned
    repo: str  # owner/name on GitHub
    commit: str  # the tests' commit for the pinned version (see the note per suite)
    path: str  # the test file, inside the repository
    left_out: dict[str, str] = field(default_factory=dict)  # test name -> reason
    #: Each run sets ``PEER_MODE`` for the conftest (sync suites run twice).
    modes: tuple[str, ...] = ("default",)

    def version(self) -> str:
        return importlib.metadata.version(self.dist)


_DB_INTERNALS = "tests DatabaseSessionService's SQL engine, sessions or schema, not the contract"
_SQLITE_INTERNALS = "tests SqliteSessionService's URL handling and files"
_IN_MEMORY_INTERNALS = "reaches into InMemorySessionService.sessions (its private storage)"
_STALE = (
    "DatabaseSessionService's optimistic stale-session check: a Session read before "
    "another writer's append is refused there; ours, like InMemorySessionService, "
    "appends (events are ordered by Redis, state deltas merge key by key)"
)

SUITES = {
    # The file as of the google-adk 2.13.0 line: every session_service test in it
    # passes against ADK's own InMemorySessionService, DatabaseSessionService and
    # SqliteSessionService at 2.13.0 (the Vertex AI test needs Google Cloud).
    "adk": Suite(
        name="adk",
        dist="google-adk",
        repo="google/adk-python",
        commit="03301454c3cd2d85d3691b3026a60ce6cb703193",
        path="tests/unittests/sessions/test_session_service.py",
        left_out={
            "test_database_session_service_enables_pool_pre_ping_by_default": _DB_INTERNALS,
            "test_database_session_service_strips_timezone_for_dialect": _DB_INTERNALS,
            "test_database_session_service_preserves_timezone_for_other_dialects": _DB_INTERNALS,
            "test_database_session_service_respects_pool_pre_ping_override": _DB_INTERNALS,
            "test_database_session_service_creates_read_only_engine_for_spanner": _DB_INTERNALS,
            "test_database_session_service_creates_read_only_engine_for_other_dialects": (
                _DB_INTERNALS
            ),
            "test_sqlite_session_service_accepts_sqlite_urls": _SQLITE_INTERNALS,
            "test_sqlite_session_service_preserves_uri_query_parameters": _SQLITE_INTERNALS,
            "test_sqlite_session_service_accepts_absolute_sqlite_urls": _SQLITE_INTERNALS,
            "test_database_session_service_get_session_uses_read_only_factory": _DB_INTERNALS,
            "test_database_session_service_list_sessions_uses_read_only_factory": _DB_INTERNALS,
            "test_append_event_to_stale_session": _STALE,
            "test_append_event_raises_if_app_state_row_missing": _DB_INTERNALS,
            "test_append_event_raises_if_user_state_row_missing": _DB_INTERNALS,
            "test_append_event_concurrent_stale_sessions_reject_stale_writer": _STALE,
            "test_append_event_allows_timestamp_drift_for_current_session": _DB_INTERNALS,
            "test_append_event_allows_markerless_current_session": _DB_INTERNALS,
            "test_append_event_when_session_is_same_ref_as_storage_session": (_IN_MEMORY_INTERNALS),
            "test_create_session_calls_rollback_on_commit_failure": _DB_INTERNALS,
            "test_append_event_calls_rollback_on_commit_failure": _DB_INTERNALS,
            "test_append_event_reads_storage_revision_before_commit": _DB_INTERNALS,
            "test_create_session_reads_storage_revision_before_commit": _DB_INTERNALS,
            "test_delete_session_calls_rollback_on_commit_failure": _DB_INTERNALS,
            "test_service_recovers_after_multiple_failures": _DB_INTERNALS,
            "test_concurrent_prepare_tables_no_race_condition": _DB_INTERNALS,
            "test_prepare_tables_serializes_schema_detection_and_creation": _DB_INTERNALS,
            "test_get_or_create_state_returns_existing_row": _DB_INTERNALS,
            "test_get_or_create_state_creates_new_row": _DB_INTERNALS,
            "test_get_or_create_state_handles_race_condition": _DB_INTERNALS,
            "test_create_session_sequential_same_app_name": _DB_INTERNALS,
            "test_prepare_tables_idempotent_after_creation": _DB_INTERNALS,
            "test_public_prepare_tables_eager_initialization": _DB_INTERNALS,
            "test_append_event_locks_only_scopes_with_deltas": _DB_INTERNALS,
            "test_vertex_ai_session_service_raises_not_implemented_for_get_user_state": (
                "tests VertexAiSessionService (a Google Cloud client)"
            ),
            "test_database_session_service_visible_in_module_namespace": (
                "tests google.adk.sessions' module namespace"
            ),
        },
        modes=("client", "url"),
    ),
    # The file at the newest commit stored in reach (the 0.14.25 tag's could not be
    # fetched from here): later than 0.14.25 by two tests of fixes made since
    # (out-of-bounds and empty-history deletes), which SimpleChatStore 0.14.25
    # itself fails; of the others, the persistence test (left out) fails there on
    # a pydantic serialisation error, and the four left pass against it.
    "llama-index": Suite(
        name="llama_index",
        dist="llama-index-core",
        repo="run-llama/llama_index",
        commit="0e40745355a0768b690ccfaa7721c5cd2334d8ce",
        path="llama-index-core/tests/storage/chat_store/test_simple_chat_store.py",
        left_out={
            "test_persist_non_ascii_unescaped": (
                "tests SimpleChatStore's JSON-file persistence (persist / from_persist_path); "
                "the adapter persists to Redis on every call"
            ),
        },
        modes=("sync", "thread"),
    ),
}


def cache_root() -> Path:
    configured = os.environ.get("CONVERSATION_PEER_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "conversation-peer-tests"


class Unavailable(Exception):
    """No source of the suite's test file could be reached."""


def fetch(suite: Suite) -> Path:
    """The suite's test file at the pinned version, from the cache or fetched into it."""
    version = suite.version()
    target = cache_root() / f"{suite.dist}-{version}" / suite.path
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for source in (_from_sdist, _from_repository):
        try:
            text = source(suite, version)
        except Exception as exc:  # every failure of a source is reported, then the next is tried
            errors.append(f"{source.__name__}: {exc}")
            continue
        if text is not None:
            target.write_bytes(text)
            return target
        errors.append(f"{source.__name__}: not there")
    raise Unavailable(
        f"peer suite {suite.name}: cannot obtain {suite.path} of {suite.dist} {version}:\n  "
        + "\n  ".join(errors)
        + f"\nSeed the cache by placing the file at {target} (from {suite.repo} at "
        f"{suite.commit})."
    )


def _from_sdist(suite: Suite, version: str) -> bytes | None:
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "-d",
                scratch,
                f"{suite.dist}=={version}",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        for archive in Path(scratch).glob("*.tar.gz"):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.name.split("/", 1)[-1] == suite.path:
                        extracted = tar.extractfile(member)
                        return extracted.read() if extracted else None
    return None


def _from_repository(suite: Suite, version: str) -> bytes | None:
    del version  # the commit pins it
    url = f"https://raw.githubusercontent.com/{suite.repo}/{suite.commit}/{suite.path}"
    with urllib.request.urlopen(url, timeout=20) as reply:
        data: bytes = reply.read()
    return data


def run(suite: Suite, pytest_args: list[str]) -> int:
    status = 0
    for mode in suite.modes:
        status = max(status, _run_mode(suite, mode, pytest_args))
    return status


def _run_mode(suite: Suite, mode: str, pytest_args: list[str]) -> int:
    source = fetch(suite)
    with tempfile.TemporaryDirectory(prefix=f"peer-{suite.name}-") as scratch:
        run_dir = Path(scratch)
        shutil.copy(source, run_dir / source.name)
        shutil.copy(ROOT / "tests" / "peers" / f"{suite.name}_conftest.py", run_dir / "conftest.py")
        (run_dir / "pytest.ini").write_text(
            "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n",
            encoding="utf-8",
        )
        deselect = [f"--deselect={source.name}::{name}" for name in suite.left_out]
        env = dict(os.environ, CONVERSATION_ROOT=str(ROOT), PEER_MODE=mode)
        print(
            f"peer suite {suite.name} ({mode}): {suite.dist} {suite.version()}, {source.name} "
            f"(left out by name: {len(suite.left_out)})",
            flush=True,
        )
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:valkey",
            "-c",
            str(run_dir / "pytest.ini"),
            "--rootdir",
            str(run_dir),
            *deselect,
            *pytest_args,
            str(run_dir / source.name),
        ]
        return subprocess.run(command, cwd=run_dir, env=env, check=False).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", metavar="suite", help=f"any of {sorted(SUITES)}")
    parser.add_argument(
        "--if-available",
        action="store_true",
        help="report a suite whose test file cannot be obtained as NOT RUN instead of failing",
    )
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; choose from {sorted(SUITES)}")
    names = args.suites or list(SUITES)
    status = 0
    for name in names:
        try:
            status = max(status, run(SUITES[name], extra))
        except Unavailable as exc:
            print(f"NOT RUN: {exc}", file=sys.stderr, flush=True)
            if not args.if_available:
                status = max(status, 1)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
