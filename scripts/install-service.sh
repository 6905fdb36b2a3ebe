#!/bin/sh
# Install nbdserve's systemd units, its user (sysusers.d), its directories (tmpfiles.d),
# its man page (made from --help) and an example configuration, with the units naming
# the real executable.
#
#   scripts/install-service.sh [--destdir DIR] [--executable PATH]
#
# --executable: the nbdserve to run [default: `command -v nbdserve`, else this
#   checkout's .venv/bin/nbdserve]. --destdir: write under DIR instead of / (for
#   packaging and tests; nothing is started then). As root with --destdir /, it also
#   creates the user and directories and reloads systemd, when systemd runs.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
destdir=/
executable=""
while [ $# -gt 0 ]; do
    case "$1" in
        --destdir) destdir=$2; shift 2 ;;
        --executable) executable=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install-service.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$executable" ]; then
    executable=$(command -v nbdserve || true)
    [ -n "$executable" ] || executable="$here/.venv/bin/nbdserve"
fi
case "$executable" in
    /*) ;;
    *) executable="$(pwd)/$executable" ;;
esac
if [ ! -x "$executable" ]; then
    echo "install-service.sh: $executable is not an executable nbdserve (run scripts/setup.sh, or give --executable)" >&2
    exit 1
fi

units="$destdir/etc/systemd/system"
mkdir -p "$units" "$destdir/etc/sysusers.d" "$destdir/etc/tmpfiles.d" "$destdir/etc/nbdserve"
for unit in nbdserve.service nbdserve@.service nbdserve.socket; do
    sed "s|@NBDSERVE@|$executable|g" "$here/systemd/$unit" > "$units/$unit"
done
mkdir -p "$destdir/usr/local/share/man/man1"
"$(dirname "$executable")/python" "$here/scripts/manpage.py" \
    > "$destdir/usr/local/share/man/man1/nbdserve.1" 2>/dev/null ||
    python3 "$here/scripts/manpage.py" > "$destdir/usr/local/share/man/man1/nbdserve.1"
cp "$here/systemd/nbdserve.sysusers" "$destdir/etc/sysusers.d/nbdserve.conf"
cp "$here/systemd/nbdserve.tmpfiles" "$destdir/etc/tmpfiles.d/nbdserve.conf"
if [ ! -e "$destdir/etc/nbdserve/nbdserve.toml" ]; then
    cp "$here/examples/nbdserve.toml" "$destdir/etc/nbdserve/nbdserve.toml"
fi
echo "installed the units for $executable under $destdir"

if [ "$destdir" = / ] && [ "$(id -u)" = 0 ] && [ -d /run/systemd/system ]; then
    systemd-sysusers /etc/sysusers.d/nbdserve.conf
    systemd-tmpfiles --create /etc/tmpfiles.d/nbdserve.conf
    systemctl daemon-reload
    echo "next: edit /etc/nbdserve/nbdserve.toml, then systemctl enable --now nbdserve"
fi
