"""`nbdserve backup`: chains of restore points made from a live export, restored and
served back, checked against the image at each point's instant."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from writers import BLOCKS, SIZE, MiB, Replay, Writer, initial_image, taken_between

from conftest import NBDSERVE, free_port, run
from nbdserve.client import NbdClient
from nbdserve.control.client import ControlClient


@pytest.fixture
def live_image(tmp_path: Path) -> Path:
    path = tmp_path / "live.img"
    initial_image(path)
    return path


def backup(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(*NBDSERVE, "backup", *args, check=check)


def points(dest: Path) -> list[dict]:
    return json.loads(backup("list", "--json", str(dest)).stdout)


class Served:
    """`nbdserve backup serve` of one restore point, on a Unix socket."""

    def __init__(self, dest: Path, sock: Path, until: int | None = None) -> None:
        argv = [*NBDSERVE, "backup", "serve", str(dest), "-k", str(sock)]
        if until is not None:
            argv += ["--until", str(until)]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.uri = f"nbd+unix:///?socket={sock}"
        for line in self.proc.stderr:
            if "ready (pid" in line:
                return
        raise AssertionError(f"backup serve did not start: {self.proc.wait()}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0


async def test_full_and_five_incrementals_under_a_writer(live_image, start_server, tmp_path):
    """Every restore point, restored and served, is the image at its run's instant."""
    control = tmp_path / "ctl.sock"
    server = start_server(live_image, "--control", str(control))
    dest = tmp_path / "chain"
    replay = Replay()
    instants = []
    async with await NbdClient.connect(unix=str(server.unix)) as live:
        writer = Writer(live, list(range(BLOCKS)), replay)
        writer.start()
        for run_number in range(6):
            # Each run's writes land on a window of blocks: incrementals differ in size.
            writer.order = list(range(run_number * 16, run_number * 16 + 40))
            await writer.wait_for(writer.acknowledged + 30)
            low, high, out = await taken_between(writer, "backup", "run", "--json",
                                                 "--control", str(control), str(dest))
            summary = json.loads(out)
            assert summary["point"] == run_number
            assert summary["kind"] == ("full" if run_number == 0 else "incremental")
            instants.append((low, high))
        await writer.finish()
    listed = points(dest)
    assert [p["kind"] for p in listed] == ["full"] + ["incremental"] * 5
    # An incremental copies what changed, not the image.
    assert all(p["bytes"] < SIZE for p in listed[1:])
    # The server keeps exactly one bitmap of the chain, and no snapshot.
    bitmaps = json.loads(run(*NBDSERVE, "bitmap", "list", "--json", "--control",
                             str(control)).stdout)
    assert len(bitmaps) == 1 and bitmaps[0]["recording"]
    assert json.loads(run(*NBDSERVE, "snapshot", "list", "--json", "--control",
                          str(control)).stdout) == []
    assert "OK" in backup("verify", str(dest)).stdout
    found = []
    for index, (low, high) in enumerate(instants):
        target = tmp_path / f"restore-{index}.img"
        backup("restore", str(dest), str(target), "--until", str(index))
        at = replay.matching(target.read_bytes(), low, high)
        assert at is not None, f"restore point {index} is not the image at its instant"
        found.append(at)
        if index in (0, 3, 5):  # instant restore: the same bytes, straight from the chain
            served = Served(dest, tmp_path / f"serve-{index}.sock", index)
            try:
                copy = tmp_path / f"served-{index}.img"
                run("nbdcopy", served.uri, str(copy))
                assert copy.read_bytes() == target.read_bytes()
            finally:
                served.stop()
    assert found == sorted(found) and len(set(found)) == len(found)


def test_backup_serve_with_qemu_img_and_nbdinfo(live_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(live_image, "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write -z -u 0 1M", "-c", "write -P 7 2M 1M",
        server.qemu_uri)
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), str(dest))
    run("qemu-io", "-f", "raw", "-c", "write -P 8 5M 64k", server.qemu_uri)
    backup("run", "--control", str(control), str(dest))
    served = Served(dest, tmp_path / "serve.sock")
    try:
        converted = tmp_path / "converted.img"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri, str(converted))
        live_copy = tmp_path / "live-copy.img"
        run("nbdcopy", server.uri(), str(live_copy))
        assert converted.read_bytes() == live_copy.read_bytes()
        mapping = run("nbdinfo", "--map", served.uri).stdout
        # The zeroed first MiB is a hole of the restore point, not data.
        first = mapping.splitlines()[0].split()
        assert first[0] == "0" and "hole" in mapping.splitlines()[0]
        info = json.loads(run("nbdinfo", "--json", served.uri).stdout)["exports"][0]
        assert info["is_read_only"] is True
    finally:
        served.stop()


def test_verify_names_damaged_extents(live_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(live_image, "--control", str(control))
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), "--compression", "none", str(dest))
    run("qemu-io", "-f", "raw", "-c", "write -P 3 1M 64k", server.qemu_uri)
    backup("run", "--control", str(control), str(dest))
    assert backup("verify", str(dest)).returncode == 0
    full = points_json(dest, 0)
    data = dest / full["data"]
    offset, length, _kind, stored, _n, _digest = full["extents"][1]
    with open(data, "r+b") as f:  # flip one byte inside the second extent
        f.seek(stored + 1000)
        byte = f.read(1)
        f.seek(stored + 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = backup("verify", str(dest), check=False)
    assert result.returncode == 1
    assert f"extent at image offset {offset} (length {length}): checksum mismatch" in \
        result.stderr
    assert "Traceback" not in result.stderr
    incremental = points_json(dest, 1)
    os.truncate(dest / incremental["data"], 3)
    result = backup("verify", str(dest), check=False)
    assert result.returncode == 1 and "truncated" in result.stderr
    # A damaged chain is not restored silently.
    result = backup("restore", str(dest), str(tmp_path / "r.img"), check=False)
    assert result.returncode == 1
    assert "checksum mismatch" in result.stderr or "truncated" in result.stderr


def points_json(dest: Path, index: int) -> dict:
    return json.loads((dest / f"{index:06d}.json").read_text())


async def test_a_run_killed_midway_then_the_next_run(tmp_path, start_server):
    """Killed after its checkpoint, before its point: the next run merges the frozen
    bitmap into its successor and still captures every change."""
    image = tmp_path / "big.img"
    with open(image, "wb") as f:  # incompressible, so a copy takes a while
        f.write(os.urandom(256 * MiB))
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), "--compression", "none", str(dest))
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 200M", server.qemu_uri)
    proc = await asyncio.create_subprocess_exec(
        *NBDSERVE, "backup", "run", "--control", str(control), "--compression", "none",
        str(dest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it as soon as its snapshot exists, asked over one control connection every
    # millisecond or so: a `snapshot list` process per look took long enough (its
    # start-up) for the 200 MiB copy to finish in between, now and then.
    with ControlClient(str(control)) as client:
        for _ in range(20000):
            listed = client.execute("query-snapshots")
            if listed or proc.returncode is not None:
                break
            await asyncio.sleep(0.001)
    assert listed, "the run finished before it could be killed"
    proc.kill()
    await proc.wait()
    assert [p["kind"] for p in points(dest)] == ["full"]
    run("qemu-io", "-f", "raw", "-c", "write -P 2 250M 1M", server.qemu_uri)
    summary = json.loads(backup("run", "--json", "--control", str(control),
                                "--compression", "none", str(dest)).stdout)
    assert summary["kind"] == "incremental" and summary["point"] == 1
    assert summary["bytes_read"] >= 201 * MiB  # both writes, before and after the kill
    restored = tmp_path / "restored.img"
    backup("restore", str(dest), str(restored))
    run("cmp", str(restored), str(image))
    assert not list(dest.glob("*.partial"))
    bitmaps = json.loads(run(*NBDSERVE, "bitmap", "list", "--json", "--control",
                             str(control)).stdout)
    assert len(bitmaps) == 1


def test_a_cleared_bitmap_forces_a_full_backup(live_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    start_server(live_image, "--control", str(control))
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), str(dest))
    [bitmap] = json.loads(run(*NBDSERVE, "bitmap", "list", "--json", "--control",
                              str(control)).stdout)
    run(*NBDSERVE, "bitmap", "clear", bitmap["name"], "--control", str(control))
    result = backup("run", "--control", str(control), str(dest))
    assert "full backup: bitmap" in result.stderr and "cleared or recreated" in result.stderr
    assert [p["kind"] for p in points(dest)] == ["full", "full"]
    # Both chains restore; point 0 is still there until merged away.
    backup("restore", str(dest), str(tmp_path / "r0.img"), "--until", "0")


def test_merge_folds_points_and_keeps_the_later_ones(live_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(live_image, "--control", str(control))
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), str(dest))
    expected = {}
    for index, pattern in enumerate((5, 6, 7), start=1):
        run("qemu-io", "-f", "raw", "-c", f"write -P {pattern} {index}M 512k",
            server.qemu_uri)
        backup("run", "--control", str(control), str(dest))
        expected[index] = tmp_path / f"expected-{index}.img"
        backup("restore", str(dest), str(expected[index]), "--until", str(index))
    backup("merge", str(dest), "--until", "2")
    assert [(p["point"], p["kind"]) for p in points(dest)] == [(2, "full"),
                                                               (3, "incremental")]
    for index in (2, 3):
        again = tmp_path / f"again-{index}.img"
        backup("restore", str(dest), str(again), "--until", str(index))
        assert again.read_bytes() == expected[index].read_bytes()
    assert backup("verify", str(dest)).returncode == 0
    # The chain goes on from the merged point.
    run("qemu-io", "-f", "raw", "-c", "write -P 9 7M 4k", server.qemu_uri)
    assert json.loads(backup("run", "--json", "--control", str(control),
                             str(dest)).stdout)["kind"] == "incremental"


def test_uri_mode_against_qemu_nbd_with_a_qcow2_bitmap(tmp_path):
    """A full and an incremental from qemu-nbd -B, driven with --uri."""
    qcow2 = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(qcow2), "32M")
    run("qemu-io", "-c", "write -P 1 0 4M", "-c", "write -P 2 20M 1M", str(qcow2))
    run("qemu-img", "bitmap", "--add", str(qcow2), "b0")
    dest = tmp_path / "chain"

    def served(then):
        port = free_port()
        proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-r", "-B", "b0", "-b",
                                 "127.0.0.1", "-p", str(port), "-t", str(qcow2)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(200):
                if run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/",
                       check=False).returncode == 0:
                    break
                subprocess.run(["sleep", "0.05"])
            return then(f"nbd://127.0.0.1:{port}/")
        finally:
            proc.terminate()
            proc.wait(10)

    served(lambda uri: backup("run", "--uri", uri, "--bitmap", "b0", str(dest)))
    run("qemu-io", "-c", "write -P 3 2M 64k", "-c", "write -P 4 30M 512k", str(qcow2))
    summary = served(lambda uri: json.loads(backup("run", "--json", "--uri", uri, "--bitmap",
                                                   "b0", str(dest)).stdout))
    assert summary["kind"] == "incremental" and summary["bytes_read"] < 2 * MiB
    restored = tmp_path / "restored.img"
    backup("restore", str(dest), str(restored))
    raw = tmp_path / "expected.img"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw))
    assert restored.read_bytes() == raw.read_bytes()


def test_backup_errors_are_one_line(tmp_path, live_image):
    result = backup("run", str(tmp_path / "d"), check=False)
    assert result.returncode == 2
    result = backup("run", "--control", str(tmp_path / "nope.sock"), str(tmp_path / "d"),
                    check=False)
    assert result.returncode == 1 and "cannot reach" in result.stderr
    result = backup("list", str(tmp_path), check=False)
    assert result.returncode == 1 and "no backup chain" in result.stderr
    assert "Traceback" not in result.stderr


def test_restore_to_an_nbd_export_and_snapshot_metrics(live_image, start_server, tmp_path):
    """Restore over NBD into another export; the snapshot's figures are in the metrics
    while a backup's snapshot exists."""
    import urllib.request
    control = tmp_path / "ctl.sock"
    metrics_port = free_port()
    server = start_server(live_image, "--control", str(control), "--metrics",
                          f"127.0.0.1:{metrics_port}")
    run("qemu-io", "-f", "raw", "-c", "write -P 6 1M 2M", server.qemu_uri)
    dest = tmp_path / "chain"
    backup("run", "--control", str(control), str(dest))
    run(*NBDSERVE, "snapshot", "add", "s", "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", server.qemu_uri)
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    assert 'nbdserve_snapshot_preserved_bytes{export="",snapshot="s"} 65536.0' in text
    assert 'nbdserve_snapshot_broken{export="",snapshot="s"} 0.0' in text
    target_image = tmp_path / "target.img"
    with open(target_image, "wb") as f:
        f.write(os.urandom(SIZE))  # whatever was there is replaced, holes included
    target = start_server(target_image)
    backup("restore", str(dest), target.uri())
    restored = tmp_path / "restored.img"
    run("nbdcopy", target.uri(), str(restored))
    expected = tmp_path / "expected.img"
    backup("restore", str(dest), str(expected))
    assert restored.read_bytes() == expected.read_bytes()
