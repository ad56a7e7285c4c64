#!/usr/bin/env bash
# The project's test command (README "Test"): the whole CPU suite.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
python -m pytest -q -p no:cacheprovider tests "$@"
