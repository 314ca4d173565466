#!/usr/bin/env bash
# Create .venv and install the project. `setup.sh test` adds the test tools.
# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA wheels.
# Off these machines, add `--index-url https://download.pytorch.org/whl/cpu` for a CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
pip install -q torch==2.13.0
if [[ ${1:-} == test ]]; then
    pip install -q -e ".[test]"
else
    pip install -q -e .
fi
