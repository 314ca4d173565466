#!/usr/bin/env bash
# Set up, then run the daemon on the embedded default (Tansu broker, embedded Chroma,
# SmolLM2-135M-Instruct imported under ./data) with the example events flowing through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
exec ings-daemon dev --examples examples "$@"
