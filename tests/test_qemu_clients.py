"""QEMU's NBD client (qemu-img, qemu-io) against a running nbdserve."""

from __future__ import annotations

import json
import os

from conftest import run


def test_qemu_img_info_reports_the_size(server):
    info = json.loads(run("qemu-img", "info", "--output=json", server.qemu_uri).stdout)
    assert info["virtual-size"] == 64 << 20


def test_qemu_io_writes_land_in_the_image_and_read_back(server, image):
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1000 70000",
        "-c", "write -z 2M 64k", "-c", "flush", server.qemu_uri)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 1000 70000", "-c", "read -P 0 2M 64k",
        server.qemu_uri)
    with open(image, "rb") as f:
        f.seek(1000)
        assert f.read(70000) == b"\x5a" * 70000
        f.seek(999)
        assert f.read(1) == b"\0"


def test_qemu_io_read_of_wrong_pattern_fails(server):
    # Guard against a vacuous pass: qemu-io's pattern check really compares bytes.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 4096", server.qemu_uri)
    result = run("qemu-io", "-f", "raw", "-c", "read -P 0x22 0 4096", server.qemu_uri,
                 check=False)
    assert "Pattern verification failed" in result.stdout + result.stderr


def test_qemu_img_convert_both_ways_and_compare(server, tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(1 << 20))
    with open(source, "r+b") as f:
        f.truncate(64 << 20)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.qemu_uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), server.qemu_uri)
    copy = tmp_path / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.qemu_uri, str(copy))
    assert copy.read_bytes() == source.read_bytes()


def test_qemu_img_compare_detects_a_difference(server, tmp_path):
    other = tmp_path / "other.raw"
    with open(other, "wb") as f:
        f.truncate(64 << 20)
    run("qemu-io", "-f", "raw", "-c", "write -P 1 32M 512", server.qemu_uri)
    result = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(other), server.qemu_uri,
                 check=False)
    assert result.returncode == 1
    assert "Content mismatch at offset 33554432" in result.stdout


def test_qemu_img_map_follows_allocation(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 1M 128k", "-c", "write -P 2 10M 4k",
        server.qemu_uri)
    extents = json.loads(run("qemu-img", "map", "--output=json", server.qemu_uri).stdout)
    data = [(e["start"], e["length"]) for e in extents if e["data"]]
    assert data == [(1 << 20, 128 << 10), (10 << 20, 4096)]
    assert sum(e["length"] for e in extents) == 64 << 20


def test_qemu_img_map_allocation_depth(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 64k", server.qemu_uri)
    opts = f"driver=nbd,server.type=unix,server.path={server.unix}," \
           "x-dirty-bitmap=qemu:allocation-depth"
    extents = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    # qemu's hack reads depth 1 ("local") as data=false, depth 0 ("absent") as data=true.
    local = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert local == [(4 << 20, 64 << 10)]


def test_qemu_io_trim_punches_a_hole(server, image):
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4M", "-c", "flush", server.qemu_uri)
    allocated = os.stat(image).st_blocks
    run("qemu-io", "-f", "raw", "-c", "discard 0 4M", server.qemu_uri)
    assert os.stat(image).st_blocks < allocated - (3 << 20) // 512
    run("qemu-io", "-f", "raw", "-c", "read -P 0 0 4M", server.qemu_uri)


def test_qemu_io_on_read_only_export_refuses_writes(image, start_server):
    server = start_server(image, "-r")
    result = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", server.qemu_uri)
    assert "read 4096/4096" in result.stdout
    result = run("qemu-io", "-f", "raw", "-c", "write 0 4k", server.qemu_uri, check=False)
    # QEMU sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert image.read_bytes()[:4096] == bytes(4096)
