#!/usr/bin/env bash
# System packages the test suite needs beyond the Python virtualenv, for a fresh
# Debian 12 machine, run as root. Safe to run again: it does nothing when done.
#
#   prometheus  - promtool (tests/test_deploy.py validates deploy/prometheus/*.yml with it)
#                 and a real Prometheus server (tests/test_prometheus_scrape.py scrapes
#                 a live /metrics endpoint with it).
#   docker.io   - a Docker daemon; tests/containers starts dockerd itself and stops it.
#   debootstrap - the Debian 12 root the container tests' base images are made from (no
#                 image registry is reachable here).
set -euo pipefail

if [[ ${EUID} -ne 0 ]]; then
    echo "setup-system.sh: run as root (it installs Debian packages)" >&2
    exit 1
fi

packages=(prometheus docker.io debootstrap)

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done

if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d exit 101 tells invoke-rc.d not to start services from postinst;
    # keep an existing one untouched and remove only the one we put there.
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    cleanup_policy() { if [[ ${created_policy} -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup_policy EXIT
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Tests start their own Prometheus on free ports; a packaged one left running would hold
# :9090 and the Debian data dir, and nothing here needs it. Without systemd a postinst
# may still have launched it through its init script. The packaged service runs as the
# `prometheus` user, which tells it apart from instances a test (as root or a CI user)
# may have started, so only those processes are stopped.
packaged_pids() { pgrep -x -u prometheus prometheus 2>/dev/null || true; }
stop_packaged_prometheus() {
    local pids
    id prometheus >/dev/null 2>&1 || return 0
    pids=$(packaged_pids)
    [[ -z ${pids} ]] && return 0
    if command -v service >/dev/null 2>&1; then
        service prometheus stop >/dev/null 2>&1 || true
    fi
    pids=$(packaged_pids)
    [[ -z ${pids} ]] && return 0
    # shellcheck disable=SC2086  # one pid per word, on purpose
    kill ${pids} 2>/dev/null || true
    for _ in $(seq 1 50); do
        [[ -z $(packaged_pids) ]] && return 0
        sleep 0.1
    done
    echo "setup-system.sh: prometheus still running after SIGTERM: $(packaged_pids | tr '\n' ' ')" >&2
    return 1
}
stop_packaged_prometheus

promtool --version >/dev/null
prometheus --version >/dev/null
echo "setup-system.sh: prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}') and promtool ready"
