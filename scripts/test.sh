#!/usr/bin/env bash
# The whole test suite, the same locally and in CI: lint, types, tests.
# Creates .venv, installs the package with its test extras, and makes sure a
# redis-server binary exists (tests start their own private servers from it).
set -euo pipefail
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
.venv/bin/python -m pytest "$@"
