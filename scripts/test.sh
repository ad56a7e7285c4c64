#!/usr/bin/env bash
# The project's test command (README "Test"): the whole CPU suite.
#   bash scripts/test.sh             every test (what CI runs)
#   bash scripts/test.sh --quick     the fast tier: every test not marked `slow` (subprocess round trips, reference
#                                    tools, real servers, training); any other arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate
args=()
for a in "$@"; do
    if [ "$a" = "--quick" ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
python -m pytest -q -p no:cacheprovider tests "${args[@]}"
