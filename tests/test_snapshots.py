"""Point-in-time snapshots (copy-before-write) with real clients and a live writer.

A writer keeps overwriting the image block by block, each write stamped with its
generation, so the image after any number of writes is known exactly (``Replay``). A
copy of a snapshot must equal the image after some number of writes that lies between
what was acknowledged before the snapshot was asked for and what was issued by the
time it was taken; a copy of the live export read the same way matches no such state
(the negative control).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from writers import (
    BLOCK,
    BLOCKS,
    SIZE,
    MiB,
    Replay,
    Writer,
    cli,
    initial_image,
    taken_between,
    tool,
)

from conftest import NBDSERVE, NBDSH, flagged_ranges, nbdsh, run
from nbdserve.client import NbdClient, NbdError
from nbdserve.protocol import constants as c


@pytest.fixture
def snap_image(tmp_path: Path) -> Path:
    path = tmp_path / "live.img"
    initial_image(path)
    return path


def snapshot_list(control: Path) -> list[dict]:
    return json.loads(run(*NBDSERVE, "snapshot", "list", "--json", "--control",
                          str(control)).stdout)


async def read_blockwise(uri_socket: str, export: str, writer: Writer,
                         blocks: range = range(BLOCKS)) -> bytes:
    """Read block by block (as a backup reads extents) while the writer goes on."""
    async with await NbdClient.connect(unix=uri_socket, export=export) as nbd:
        parts = []
        for block in blocks:
            parts.append(await nbd.read(block * BLOCK, BLOCK))
            await writer.wait_for(writer.acknowledged + 2)  # let the writer move on
        return b"".join(parts)


async def test_snapshot_copies_match_one_instant_under_a_writer(snap_image, start_server,
                                                                tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--bitmap", "b0", "--control", str(control))
    sock = str(server.unix)
    replay = Replay()
    async with await NbdClient.connect(unix=sock) as live:
        writer = Writer(live, list(range(BLOCKS)), replay)
        writer.start()
        await writer.wait_for(BLOCKS // 2)
        # Negative control: the live export read the same way is no instant at all.
        torn = await read_blockwise(sock, "", writer)
        assert replay.matching(torn, 0, writer.issued) is None
        low, high, name = await taken_between(writer, "snapshot", "add", "full",
                                              "--control", str(control))
        assert name == "full"
        await writer.wait_for(writer.acknowledged + 3 * BLOCKS)  # the writer laps it all
        nbdcopy_copy = tmp_path / "nbdcopy.img"
        qemu_copy = tmp_path / "qemu.img"
        blockwise = await read_blockwise(sock, "full", writer)
        await tool("nbdcopy", f"nbd+unix:///full?socket={sock}", str(nbdcopy_copy))
        await tool("qemu-img", "convert", "-f", "raw", "-O", "raw",
                   f"nbd+unix:///full?socket={sock}", str(qemu_copy))
        await writer.finish()
    instant = replay.matching(nbdcopy_copy.read_bytes(), low, high)
    assert instant is not None, "the nbdcopy copy is not the image at the snapshot's instant"
    assert qemu_copy.read_bytes() == nbdcopy_copy.read_bytes() == blockwise
    # The live image ends with the writer's last data.
    assert writer.acknowledged > instant + 2 * BLOCKS
    run(*NBDSERVE, "snapshot", "remove", "full", "--control", str(control))
    live_copy = tmp_path / "live-copy.img"
    run("nbdcopy", server.uri(), str(live_copy))
    assert live_copy.read_bytes() == replay.image_after(writer.acknowledged)
    assert not list(tmp_path.glob("*.scratch"))


async def test_incremental_cycle_restores_each_checkpoint_exactly(snap_image, start_server,
                                                                  tmp_path):
    """Full backup from a snapshot, then checkpoint + snapshot cycles copying only the
    frozen bitmap's dirty extents from the snapshot, with a writer running all along:
    each restored image equals the image at that checkpoint's instant."""
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--bitmap", "b0", "--control", str(control))
    sock = str(server.unix)
    replay = Replay()
    backup = bytearray()
    async with await NbdClient.connect(unix=sock) as live:
        # Cycle 0 writes blocks 0..47; each later cycle a window further on.
        writer = Writer(live, list(range(0, 48)), replay)
        writer.start()
        await writer.wait_for(20)
        # The full backup: a snapshot of everything, and b1 recording from its instant.
        low, high, _ = await taken_between(writer, "snapshot", "add", "full", "--bitmap",
                                           "b1", "--control", str(control))
        full = tmp_path / "full.img"
        await tool("nbdcopy", f"nbd+unix:///full?socket={sock}", str(full))
        backup[:] = full.read_bytes()
        instant = replay.matching(bytes(backup), low, high)
        assert instant is not None
        await cli("snapshot", "remove", "full", "--control", str(control))
        for cycle in range(1, 4):
            window = list(range(cycle * 24, cycle * 24 + 48))
            writer.order = window
            await writer.wait_for(writer.acknowledged + 60)
            old, new = f"b{cycle}", f"b{cycle + 1}"
            low, high, name = await taken_between(writer, "bitmap", "checkpoint", old, new,
                                                  "--snapshot", "--control", str(control))
            assert name == f"@{old}"
            await writer.wait_for(writer.acknowledged + 2 * len(window))
            async with await NbdClient.connect(
                    unix=sock, export=name,
                    meta_contexts=[c.QEMU_DIRTY_BITMAP_PREFIX + old]) as snap:
                dirty = await flagged_ranges(snap, c.QEMU_DIRTY_BITMAP_PREFIX + old)
                assert dirty, "the writer wrote, so the frozen bitmap has dirty extents"
                for offset, length in dirty:
                    backup[offset:offset + length] = await snap.read(offset, length)
                    await snap.trim(offset, length)  # backed up: release it
            listed = {s["name"]: s for s in snapshot_list(control)}[name]
            assert listed["held-bytes"] == 0 and listed["scratch-bytes"] == 0
            at = replay.matching(bytes(backup), low, high)
            assert at is not None, f"cycle {cycle}: the restore is not the checkpoint's image"
            assert at > instant
            instant = at
            await cli("snapshot", "remove", name, "--control", str(control))
        await writer.finish()


async def test_snapshot_export_flags_and_refusals(snap_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--bitmap", "b0", "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", server.qemu_uri)
    run(*NBDSERVE, "bitmap", "checkpoint", "b0", "b1", "--snapshot", "--control",
        str(control))
    info = json.loads(run("nbdinfo", "--json", server.uri("@b0")).stdout)["exports"][0]
    assert info["is_read_only"] is False and info["can_trim"] is True
    assert info["can_zero"] is False
    nbd = await NbdClient.open_handshake(unix=str(server.unix))
    contexts = await nbd.list_meta_contexts("@b0")
    await nbd.abort()
    assert sorted(contexts) == ["base:allocation", "qemu:dirty-bitmap:b0"]
    async with await NbdClient.connect(unix=str(server.unix), export="@b0") as snap:
        with pytest.raises(NbdError) as refused:
            await snap.write(MiB, b"x" * 512)
        assert refused.value.error == c.NBD_EPERM
        with pytest.raises(NbdError) as refused:
            await snap.write_zeroes(MiB, 512)
        assert refused.value.error == c.NBD_EPERM
        # Outside the frozen bitmap: not held, so not readable.
        with pytest.raises(NbdError) as refused:
            await snap.read(4 * MiB, 4096)
        assert refused.value.error == c.NBD_EPERM
        assert await snap.read(MiB, 512) == b"\x07" * 512
    # Names: the default one is taken; the CLI says so in one line, exit 1.
    result = run(*NBDSERVE, "bitmap", "checkpoint", "b1", "b2", "--snapshot",
                 "--snapshot-name", "@b0", "--control", str(control), check=False)
    assert result.returncode == 1 and "exists already" in result.stderr
    assert "Traceback" not in result.stderr
    # A failed snapshot leaves the checkpoint undone: b1 still records, no b2.
    bitmaps = json.loads(run(*NBDSERVE, "bitmap", "list", "--json", "--control",
                             str(control)).stdout)
    assert {b["name"]: b["recording"] for b in bitmaps} == {"b0": False, "b1": True}
    result = run(*NBDSERVE, "bitmap", "checkpoint", "b1", "b2", "--snapshot", "--image",
                 str(snap_image), check=False)
    assert result.returncode == 2 and "running server" in result.stderr
    result = run(*NBDSERVE, "snapshot", "remove", "nope", "--control", str(control),
                 check=False)
    assert result.returncode == 1 and "not found" in result.stderr


async def test_trim_on_the_snapshot_frees_scratch_and_stops_preserving(snap_image,
                                                                       start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--control", str(control))
    run(*NBDSERVE, "snapshot", "add", "s", "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", f"write -P 9 0 {SIZE}", server.qemu_uri)
    scratch = next(tmp_path.glob("*.scratch"))
    # Block 0 of the initial image is zeros (generation 0 of block 0): not stored.
    full = os.stat(scratch).st_blocks * 512
    assert full >= SIZE - BLOCK
    [listed] = snapshot_list(control)
    assert listed["preserved-bytes"] == SIZE and listed["scratch-bytes"] >= SIZE - BLOCK
    nbdsh(server.uri("s"), f"h.trim({SIZE // 2}, 0)")
    assert os.stat(scratch).st_blocks * 512 <= full - (SIZE // 2 - BLOCK)
    run("qemu-io", "-f", "raw", "-c", f"write -P 10 0 {SIZE}", server.qemu_uri)
    [listed] = snapshot_list(control)
    assert listed["preserved-bytes"] == SIZE  # nothing more was copied
    assert listed["held-bytes"] == SIZE // 2
    async with await NbdClient.connect(unix=str(server.unix), export="s") as snap:
        assert await snap.read(SIZE // 2, BLOCK) == Replay().image_after(0)[
            SIZE // 2:SIZE // 2 + BLOCK]
        with pytest.raises(NbdError) as refused:
            await snap.read(0, BLOCK)
        assert refused.value.error == c.NBD_EPERM


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs: a scratch directory that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.fail("cannot mount a tmpfs (the suite runs as root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.server_errors_expected
async def test_full_scratch_breaks_the_snapshot_by_default(snap_image, start_server,
                                                          tmp_path, small_fs):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--bitmap", "b0", "--control", str(control),
                          "--scratch-dir", str(small_fs))
    run("qemu-io", "-f", "raw", "-c", "write -P 4 0 4M", server.qemu_uri)
    run(*NBDSERVE, "bitmap", "checkpoint", "b0", "b1", "--snapshot", "--control",
        str(control))
    # Overwriting b0's 4 MiB needs 4 MiB of scratch space on a 1 MiB file system.
    run("qemu-io", "-f", "raw", "-c", "write -P 5 0 4M", server.qemu_uri)
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 5 0 4M", server.qemu_uri)
    [listed] = snapshot_list(control)
    assert listed["broken"] and "No space left" in listed["broken"]
    result = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 64k", server.uri("@b0"),
                 check=False)
    assert "Input/output error" in result.stdout + result.stderr
    assert "broken" in run(*NBDSERVE, "status", "--control", str(control)).stdout
    server.wait_for_log(r"snapshot '@b0': copy-before-write failed.*break-snapshot")
    # The checkpoint's bitmaps are untouched, and b1 recorded the write.
    bitmaps = {b["name"]: b for b in json.loads(run(
        *NBDSERVE, "bitmap", "list", "--json", "--control", str(control)).stdout)}
    assert bitmaps["b0"]["count"] == 4 * MiB and not bitmaps["b0"]["recording"]
    assert bitmaps["b1"]["count"] == 4 * MiB and bitmaps["b1"]["recording"]


@pytest.mark.server_errors_expected
async def test_fail_write_policy_keeps_the_snapshot(snap_image, start_server, tmp_path,
                                                   small_fs):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--control", str(control), "--scratch-dir",
                          str(small_fs), "--on-cbw-error", "fail-write")
    run(*NBDSERVE, "snapshot", "add", "s", "--control", str(control))
    result = run("qemu-io", "-f", "raw", "-c", "write -P 5 0 4M", server.qemu_uri,
                 check=False)
    assert "No space left on device" in result.stdout + result.stderr
    [listed] = snapshot_list(control)
    assert not listed["broken"]
    # The snapshot still reads as the image was; the write did not land.
    snap = tmp_path / "snap.img"
    run("nbdcopy", server.uri("s"), str(snap))
    assert snap.read_bytes() == Replay().image_after(0)
    server.wait_for_log(r"failing the write to the live image")


def test_sigkill_during_a_snapshot_then_restart(snap_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--bitmap", "b0", "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 1M", server.qemu_uri)
    run(*NBDSERVE, "bitmap", "checkpoint", "b0", "b1", "--snapshot", "--control",
        str(control))
    run("qemu-io", "-f", "raw", "-c", "write -P 2 512k 1M", server.qemu_uri)
    assert len(list(tmp_path.glob("*.scratch"))) == 1
    server.stop(signal.SIGKILL)
    server = start_server(snap_image, "--bitmap", "b1", "--control", str(control))
    server.wait_for_log(r"removed 1 stale snapshot scratch files")
    assert not list(tmp_path.glob("*.scratch"))
    run("qemu-io", "-f", "raw", "-r", "-c", "read -P 1 0 512k", "-c", "read -P 2 512k 1M",
        server.qemu_uri)
    bitmaps = {b["name"]: b for b in json.loads(run(
        *NBDSERVE, "bitmap", "list", "--json", "--control", str(control)).stdout)}
    assert bitmaps["b0"]["count"] == MiB and not bitmaps["b0"]["recording"]
    assert bitmaps["b1"]["count"] == MiB and bitmaps["b1"]["recording"]
    assert snapshot_list(control) == []


def test_snapshot_in_use_is_removed_only_by_force(snap_image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(snap_image, "--control", str(control))
    run(*NBDSERVE, "snapshot", "add", "s", "--control", str(control))
    assert "s" in run("nbdinfo", "--list", server.uri()).stdout
    holder = subprocess.Popen([*NBDSH, "-u", server.uri("s"), "-c",
                               "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        server.wait_for_log(r"connected to export 's'")
        result = run(*NBDSERVE, "snapshot", "remove", "s", "--control", str(control),
                     check=False)
        assert result.returncode == 1 and "in use by 1 connection" in result.stderr
        run(*NBDSERVE, "snapshot", "remove", "s", "--force", "--control", str(control))
    finally:
        holder.stdin.close()
        holder.wait(10)
    assert snapshot_list(control) == []
    assert not list(tmp_path.glob("*.scratch"))
    status = json.loads(run(*NBDSERVE, "status", "--json", "--control",
                            str(control)).stdout)
    assert [e["name"] for e in status["exports"]] == [""]


def test_on_cbw_error_is_checked_on_the_command_line(snap_image, tmp_path):
    result = run(*NBDSERVE, "serve", str(snap_image), "-k", str(tmp_path / "s"),
                 "--on-cbw-error", "ignore", check=False)
    assert result.returncode == 2 and "--on-cbw-error" in result.stderr


def test_concurrent_writers_never_show_through_a_snapshot(tmp_path):
    """In-process: threads overwrite granules through the export's recording path
    (inline writes, zeroes and trims alike) while readers read the snapshot with and
    without the page-cache-only path; every read returns the image as it was."""
    import random
    import threading

    from nbdserve.config import ExportConfig
    from nbdserve.export import Export, ExportCatalog
    from nbdserve.image import RawImage
    from nbdserve.snapshots.manager import take_snapshot

    path = tmp_path / "disk.img"
    initial_image(path)
    original = path.read_bytes()
    export = Export(ExportConfig("", str(path)), RawImage(str(path)))
    export.scratch_dir = str(tmp_path)
    snapshot = take_snapshot(ExportCatalog([export]), export, "s")
    stop = threading.Event()
    failures: list[str] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            block = rng.randrange(BLOCKS)
            offset = block * BLOCK + rng.randrange(0, BLOCK, 4096)
            kind = rng.randrange(3)
            if kind == 0:
                export.write(offset, 8192, [b"\xee" * 8192])
            elif kind == 1:
                export.zero(offset, 4096)
            else:
                export.trim(offset, 4096)

    def read(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            offset = rng.randrange(0, SIZE - 3 * BLOCK, 512)
            length = rng.choice([512, BLOCK, 3 * BLOCK])
            pieces = snapshot.read(offset, length, sparse=False, nowait=bool(seed & 1))
            if pieces is None:
                continue
            data = b"".join(p[2] for p in pieces)
            if data != original[offset:offset + length]:
                failures.append(f"read at {offset}+{length} saw a later write")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    threads += [threading.Thread(target=read, args=(10 + i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    import time
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert snapshot.snapshot.preserved_bytes > 0
    assert path.read_bytes() != original  # the writers did change the live image
    snapshot.close()
    export.close()
