#!/usr/bin/env bash
# Set up, then lint (ruff), type-check (mypy --strict), check schema drift, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# promtool and a real Prometheus come from Debian; install them where we can (root).
if [[ ${EUID} -eq 0 ]] && command -v apt-get >/dev/null; then
    bash .ci/setup-system.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 ANONYMIZED_TELEMETRY=False
ruff check .
ruff format --check .
mypy
ings-daemon schemas --check
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
