#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy --strict), check schema drift, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/test-env.sh
. scripts/test-env.sh
ruff check .
ruff format --check .
mypy
ings-daemon schemas --check
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
