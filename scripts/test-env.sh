# Sourced by scripts/test.sh and scripts/test-containers.sh from the repository root: set up
# .venv with the test tools and, as root, the system packages; then activate it.
bash scripts/setup.sh test
# The real vLLM of the serving tests, in its own cached venv.
bash scripts/setup-vllm.sh
# promtool, Prometheus, Docker and debootstrap come from Debian; install them where we can (root).
if [[ ${EUID} -eq 0 ]] && command -v apt-get >/dev/null; then
    bash .ci/setup-system.sh
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 ANONYMIZED_TELEMETRY=False
