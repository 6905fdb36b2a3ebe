#!/usr/bin/env bash
# Set up everything nbdserve needs on a fresh Debian 12 machine (idempotent):
# the Debian packages the tests and benchmarks drive, and a virtual environment at
# .venv with nbdserve and its test tools installed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio nbd-client systemd python3-venv)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: ready (.venv/bin/nbdserve $(.venv/bin/nbdserve --version | awk '{print $3}'))"
