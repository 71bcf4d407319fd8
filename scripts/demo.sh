#!/usr/bin/env bash
# The main job: creates .venv, installs, and runs the multi-process demo.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
exec .venv/bin/python -m conversation demo "$@"
