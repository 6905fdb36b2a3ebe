#!/usr/bin/env bash
# Set up nbdserve on a fresh Debian 12 machine (idempotent).
#   scripts/setup.sh            the Debian packages the tests and benchmarks drive, and
#                               .venv with nbdserve and its test tools (editable install)
#   scripts/setup.sh --runtime  only what serving needs: python3-venv and .venv with
#                               nbdserve (what docker/Dockerfile runs)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
    --runtime) mode=runtime ;;
    "") ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

if [ "$mode" = runtime ]; then
    packages=(python3-venv)
else
    packages=(qemu-utils libnbd-bin python3-libnbd nbdkit fio nbd-client systemd python3-venv
              buildah debootstrap)
fi
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
    lean=()
    [ "$mode" = runtime ] && lean=(--no-install-recommends)  # the container stays small
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${lean[@]}" \
        "${missing[@]}" >/dev/null
fi

if [ "$mode" = full ] && [ ! -x .venv/qemu-10/usr/bin/qemu-nbd ]; then
    # QEMU 10 (extended headers on both sides) for the tests, unpacked beside the 7.2
    # tools, which stay what the rest of the suite drives. The backports suite is read
    # through a private apt state: the system's sources are left as they are.
    echo "setup: unpacking qemu-utils 10 from bookworm-backports into .venv/qemu-10"
    work=$(mktemp -d)
    mkdir -p "$work/parts" "$work/lists/partial" "$work/cache/archives/partial"
    # The Debian mirror the system already uses, for its backports suite.
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    if [ -z "$mirror" ]; then
        echo "setup: no Debian mirror found in the apt sources" >&2
        exit 1
    fi
    cat >"$work/parts/backports.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    private=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$work/parts"
             -o Dir::State::Lists="$work/lists" -o Dir::Cache="$work/cache"
             -o APT::Sandbox::User=root)  # a private root-owned directory: no _apt
    apt-get "${private[@]}" update -qq
    (cd "$work" && apt-get "${private[@]}" download -qq qemu-utils/bookworm-backports)
    mkdir -p .venv
    dpkg -x "$work"/qemu-utils_*.deb .venv/qemu-10
    rm -rf "$work"
    if ldd .venv/qemu-10/usr/bin/qemu-nbd | grep -q "not found"; then
        echo "setup: QEMU 10 misses libraries:" >&2
        ldd .venv/qemu-10/usr/bin/qemu-nbd | grep "not found" >&2
        exit 1
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$mode" = runtime ]; then
    .venv/bin/python -m pip install -q --no-cache-dir .
else
    .venv/bin/python -m pip install -q -e '.[test]'
fi
echo "setup: ready (.venv/bin/nbdserve $(.venv/bin/nbdserve --version | awk '{print $3}'))"
