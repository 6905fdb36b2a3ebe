"""`nbdserve list`, `info` and `map` against nbdserve, qemu-nbd and nbdkit."""

from __future__ import annotations

import json

import pytest

from conftest import NBDSERVE, run

MiB = 1 << 20


def cli(*args: str, check: bool = True):
    return run(*NBDSERVE, *args, check=check)


@pytest.fixture
def written(image):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4M", "-c", "write -P 2 40M 1M",
        str(image))
    return image


@pytest.mark.parametrize("kind", ["nbdserve", "qemu-nbd", "nbdkit"])
def test_list_info_and_map_against_each_server(kind, written, start_server, peer_server):
    if kind == "nbdserve":
        uri = start_server(written, "-D", "the disk").uri()
    else:
        uri = f"nbd+unix:///?socket={peer_server(kind, written)}"
    listed = json.loads(cli("list", "--json", uri).stdout)
    assert [e["size"] for e in listed] == [64 * MiB]
    info = json.loads(cli("info", "--json", uri).stdout)
    assert info["size"] == 64 * MiB and "base:allocation" in info["contexts"]
    expected = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    mapped = json.loads(cli("map", "--json", uri).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in mapped] == \
        [(e["offset"], e["length"], e["type"]) for e in expected]


def test_map_of_a_dirty_bitmap_and_its_picture(image, start_server, tmp_path):
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 0 8M", "-c", "write 32M 1M", server.qemu_uri)
    uri = server.uri()
    lines = cli("map", "--context", "qemu:dirty-bitmap:b0", uri).stdout.splitlines()
    assert [line.split()[:2] + [line.split()[-1]] for line in lines] == [
        ["0", str(8 * MiB), "dirty"], [str(8 * MiB), str(24 * MiB), "clean"],
        [str(32 * MiB), str(MiB), "dirty"], [str(33 * MiB), str(31 * MiB), "clean"]]
    # 64 cells of 1 MiB: the first 8 all dirty, cell 32 all dirty, the rest clean.
    drawn = cli("map", "--context", "qemu:dirty-bitmap:b0", "--picture", "--width", "16",
                uri).stdout.splitlines()
    cells = "".join(line[1:-1] for line in drawn[1:-2])
    assert len(cells) == 16 * 8
    # 128 cells of 512 KiB: cells 0-15 and 64-65 are dirty.
    assert [i for i, cell in enumerate(cells) if cell != " "] == [*range(16), 64, 65]
    assert set(cells[:16]) == {"█"}
    assert "9437184 of 67108864 bytes dirty (14.1 %)" in drawn[-1]
    svg = tmp_path / "map.svg"
    cli("map", "--context", "qemu:dirty-bitmap:b0", "--svg", str(svg), uri)
    assert svg.read_text().startswith("<svg") and svg.read_text().count("<rect") > 1


def test_inspect_errors_are_one_line(tmp_path, start_server, image):
    result = cli("info", f"nbd+unix:///?socket={tmp_path}/none", check=False)
    assert result.returncode == 1 and "cannot connect" in result.stderr
    result = cli("map", "http://example", check=False)
    assert result.returncode == 1 and "not an NBD URI" in result.stderr
    server = start_server(image)
    result = cli("map", "--context", "qemu:dirty-bitmap:nope", server.uri(), check=False)
    assert result.returncode == 1 and "does not offer" in result.stderr
    assert "Traceback" not in result.stderr
