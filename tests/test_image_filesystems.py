"""Images on file systems that refuse RWF_NOWAIT, served and read back by real clients.

tmpfs keeps its files in memory: every READ is served at once, as page-cache hits
are. overlayfs (a container's own file system) cannot tell a hit from a miss: every
READ goes to a worker thread, and the server says so when it starts. Either way the
bytes, and the holes, must come back as they are.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import nbdsh, run

MiB = 1 << 20
NOTE = "cannot tell whether data is in the page cache"


def make_image(path: Path) -> bytes:
    """8 MiB: 3 MiB of random data, a 4 MiB hole, 1 MiB of random data."""
    head, tail = os.urandom(3 * MiB), os.urandom(MiB)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(7 * MiB)
        f.write(tail)
    return head + bytes(4 * MiB) + tail


def read_back(server, tmp_path: Path, expected: bytes) -> None:
    copy = tmp_path / "copy.raw"
    run("nbdcopy", "--connections=4", server.uri(), str(copy))  # 256 KiB reads
    assert copy.read_bytes() == expected
    # Small reads one at a time, and a large one that spans data and the hole.
    spots = [(0, 4096), (3 * MiB - 512, 1024), (5 * MiB, 65536), (2 * MiB, 6 * MiB)]
    script = "import sys\n" + "".join(
        f"sys.stdout.write(h.pread({length}, {offset}).hex() + '\\n')\n"
        for offset, length in spots)
    lines = nbdsh(server.uri(), script).split()
    assert [bytes.fromhex(line) for line in lines] == \
        [expected[offset:offset + length] for offset, length in spots]


@pytest.fixture
def overlay_dir(tmp_path: Path):
    layers = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for layer in layers.values():
        layer.mkdir()
    options = (f"lowerdir={layers['lower']},upperdir={layers['upper']},"
               f"workdir={layers['work']}")
    mounted = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options,
                              str(layers["merged"])], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount an overlayfs here: {mounted.stderr.strip()}")
    yield layers["merged"]
    subprocess.run(["umount", "-l", str(layers["merged"])], check=True)


def test_an_image_on_tmpfs_is_served_from_memory(tmpfs_dir, tmp_path, start_server):
    path = tmpfs_dir / "disk.raw"
    expected = make_image(path)
    server = start_server(path)
    read_back(server, tmp_path, expected)
    assert NOTE not in server.log


def test_an_image_on_overlayfs_is_read_in_worker_threads(overlay_dir, tmp_path, start_server):
    path = overlay_dir / "disk.raw"
    expected = make_image(path)
    server = start_server(path)
    assert f"file system (overlay) {NOTE}" in server.log
    read_back(server, tmp_path, expected)
