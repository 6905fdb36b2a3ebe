#!/usr/bin/env bash
# Set everything up, then serve a default sparse image (disk.img, 10 GiB, created if
# missing) on 127.0.0.1:10809 until Ctrl-C. Extra arguments go to `nbdserve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/nbdserve serve disk.img --create 10G "$@"
