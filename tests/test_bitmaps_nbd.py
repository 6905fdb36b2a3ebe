"""Dirty bitmaps end to end: real clients write, real clients read the bitmaps back."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest

from conftest import NBDSERVE, flagged_ranges, run
from nbdserve.client import NbdClient, NbdError
from nbdserve.protocol import constants as c

MiB = 1 << 20


def dirty_map(server, name: str) -> list[tuple[int, int]]:
    """(offset, length) of dirty extents, as nbdinfo reports them."""
    out = run("nbdinfo", f"--map=qemu:dirty-bitmap:{name}", "--json", server.uri()).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] == 1]


def bitmap_cli(*args: str, check: bool = True):
    return run(*NBDSERVE, "bitmap", *args, check=check)


def listing(control) -> dict:
    out = bitmap_cli("list", "--json", "--control", str(control)).stdout
    return {b["name"]: b for b in json.loads(out)}


def test_qemu_io_writes_show_up_at_granule_boundaries(image, start_server):
    server = start_server(image, "--bitmap", "b0", "--bitmap", "fine,granularity=4K")
    run("qemu-io", "-f", "raw", "-c", "write 12583912 4096",  # 12 MiB + 1000, unaligned
        "-c", "write -z 14M 512", "-c", "discard 20M 64k", "-c", "read 30M 1M",
        server.qemu_uri)
    assert dirty_map(server, "b0") == [(12 * MiB, 65536), (14 * MiB, 65536),
                                       (20 * MiB, 65536)]
    assert dirty_map(server, "fine") == [(12 * MiB, 8192), (14 * MiB, 4096),
                                         (20 * MiB, 65536)]


def test_last_partial_granule(tmp_path, start_server):
    image = tmp_path / "odd.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB + 4096)  # the last 64 KiB granule is 4 KiB long
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", f"write {64 * MiB + 4095} 1", server.qemu_uri)
    assert dirty_map(server, "b0") == [(64 * MiB, 4096)]


def test_qemu_img_map_with_x_dirty_bitmap(image, start_server):
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 1M 64k", server.qemu_uri)
    opts = (f"driver=nbd,server.type=unix,server.path={server.unix},"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0")
    extents = json.loads(run("qemu-img", "map", "--output=json", "--image-opts", opts).stdout)
    # QEMU's debugging hack shows dirty as "data": false.
    dirty = [(e["start"], e["length"]) for e in extents if not e["data"]]
    assert dirty == [(MiB, 65536)]


async def test_meta_context_listing_and_selection(image, start_server):
    server = start_server(image, "--bitmap", "b0", "--bitmap", "b1")
    nbd = await NbdClient.open_handshake(unix=str(server.unix))
    assert await nbd.list_meta_contexts("", ["qemu:"]) == [
        "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert await nbd.list_meta_contexts("", ["qemu:dirty-bitmap:"]) == [
        "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    assert await nbd.list_meta_contexts("", ["qemu:dirty-bitmap:b1", "base:"]) == [
        "qemu:dirty-bitmap:b1", "base:allocation"]
    await nbd.abort()
    async with await NbdClient.connect(unix=str(server.unix), meta_contexts=[
            "base:allocation", "qemu:dirty-bitmap:nope", "qemu:dirty-bitmap:b0",
            "qemu:dirty-bitmap:b1"]) as nbd:
        assert list(nbd.contexts.values()) == ["base:allocation", "qemu:dirty-bitmap:b0",
                                               "qemu:dirty-bitmap:b1"]
        await nbd.write(2 * MiB + 100, b"x" * 100)
        status = await nbd.block_status(MiB, 4 * MiB)
        assert status == {
            "base:allocation": [(MiB, 3), (4096, 0), (3 * MiB - 4096, 3)],
            "qemu:dirty-bitmap:b0": [(MiB, 0), (65536, 1), (3 * MiB - 65536, 0)],
            "qemu:dirty-bitmap:b1": [(MiB, 0), (65536, 1), (3 * MiB - 65536, 0)],
        }
        one = await nbd.block_status(2 * MiB + 1000, MiB, c.NBD_CMD_FLAG_REQ_ONE)
        assert one["qemu:dirty-bitmap:b0"] == [(65536 - 1000, 1)]


def test_bitmaps_persist_across_a_clean_restart(image, start_server):
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 5M 4k", server.qemu_uri)
    assert server.stop() == 0
    assert "saved 1 bitmaps" in server.log
    run(*NBDSERVE, "qdb", "check", f"{image}.qdb")
    server = start_server(image)  # no --bitmap: the QDB file is loaded anyway
    assert dirty_map(server, "b0") == [(5 * MiB, 65536)]


def test_control_socket_and_cli(image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    bitmap_cli("add", "b0", "--granularity", "4K", "--control", str(control))
    bitmap_cli("add", "frozen", "--disabled", "--granularity", "4096",
               "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", server.qemu_uri)
    found = listing(control)
    assert (found["b0"]["count"], found["b0"]["recording"]) == (4096, True)
    assert (found["frozen"]["count"], found["frozen"]["recording"]) == (0, False)
    bitmap_cli("merge", "frozen", "b0", "--control", str(control))
    assert listing(control)["frozen"]["count"] == 4096
    bitmap_cli("add", "coarse", "--control", str(control))
    result = bitmap_cli("merge", "coarse", "b0", "--control", str(control), check=False)
    assert result.returncode == 1 and "merge needs equal granularities" in result.stderr
    result = bitmap_cli("remove", "nope", "--control", str(control), check=False)
    assert result.returncode == 1 and "Dirty bitmap 'nope' not found" in result.stderr
    # Offline access is refused while the server holds the image.
    result = bitmap_cli("list", "--image", str(image), check=False)
    assert result.returncode == 1 and "in use by another process" in result.stderr
    table = bitmap_cli("list", "--control", str(control)).stdout
    assert table.splitlines()[0].split() == ["NAME", "GRANULARITY", "DIRTY", "RECORDING",
                                             "BUSY", "INCONSISTENT", "GENERATION"]


async def test_exported_bitmap_is_busy(image, start_server, tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--bitmap", "b0", "--control", str(control))
    async with await NbdClient.connect(unix=str(server.unix),
                                       meta_contexts=["qemu:dirty-bitmap:b0"]):
        assert listing(control)["b0"]["busy"]
        result = bitmap_cli("remove", "b0", "--control", str(control), check=False)
        assert "currently in use by another operation" in result.stderr
    server.wait_for_log("disconnected from export")
    assert not listing(control)["b0"]["busy"]
    bitmap_cli("remove", "b0", "--control", str(control))


def test_frozen_bitmap_answers_are_stable_while_writes_continue(image, start_server,
                                                                tmp_path):
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--bitmap", "b0", "--control", str(control))
    run("qemu-io", "-f", "raw", "-c", "write 1M 4k", server.qemu_uri)
    bitmap_cli("checkpoint", "b0", "b1", "--control", str(control))
    frozen = dirty_map(server, "b0")
    run("qemu-io", "-f", "raw", "-c", "write 9M 4k", "-c", "write 1M 4k", server.qemu_uri)
    assert dirty_map(server, "b0") == frozen == [(MiB, 65536)]
    assert dirty_map(server, "b1") == [(MiB, 65536), (9 * MiB, 65536)]


def test_image_modified_while_down_is_detected(image, start_server):
    server = start_server(image, "--bitmap", "b0")
    assert server.stop() == 0
    with open(image, "r+b") as f:
        f.seek(7 * MiB)
        f.write(b"written with no server watching")
    server = start_server(image)
    server.wait_for_log(r"inconsistent: the image was changed while no server was running")
    contexts = json.loads(run("nbdinfo", "--json", server.uri()).stdout)["exports"][0]
    assert "qemu:dirty-bitmap:b0" not in contexts["contexts"]
    result = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", server.uri(), check=False)
    assert result.returncode != 0


def test_corrupted_qdb_still_serves_and_reports_the_bitmap(image, start_server, tmp_path):
    server = start_server(image, "--bitmap", "good", "--bitmap", "bad")
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", server.qemu_uri)
    assert server.stop() == 0
    qdb = f"{image}.qdb"
    raw = bytearray(Path(qdb).read_bytes())
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", qdb).stdout)
    assert [b["name"] for b in info["bitmaps"]] == ["good", "bad"]
    # Damage the data of "bad" (its table entry says all-ones -> make it point past EOF).
    dir_offset = int.from_bytes(raw[88:96], "big")
    entry = dir_offset + 40 + 8  # second entry: after "good" (40 + 4 name + 4 pad)
    table = int.from_bytes(raw[entry : entry + 8], "big")
    raw[table : table + 8] = (1 << 40).to_bytes(8, "big")
    Path(qdb).write_bytes(raw)
    result = run(*NBDSERVE, "qdb", "check", qdb, check=False)
    assert result.returncode == 1
    assert "bitmap 'bad'" in result.stderr and "past the end of the file" in result.stderr
    assert result.stderr.count("bad") == 1, result.stderr  # the prefix, once
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    found = listing(control)
    assert found["bad"]["inconsistent"] and not found["good"]["inconsistent"]
    assert dirty_map(server, "good") == [(0, 65536)]
    run("qemu-io", "-f", "raw", "-c", "read 0 4k", server.qemu_uri)  # still served


@pytest.mark.server_errors_expected  # an unusable QDB file is logged at ERROR
@pytest.mark.parametrize("garbage", [b"NOTQDB" * 100, b""])
def test_unreadable_qdb_file_is_kept_aside(image, start_server, garbage):
    Path(f"{image}.qdb").write_bytes(garbage)
    server = start_server(image, "--bitmap", "b0")
    server.wait_for_log("is unusable")
    assert any(n.startswith("disk.img.qdb.corrupt-") for n in os.listdir(image.parent))
    run("qemu-io", "-f", "raw", "-c", "write 0 4k", server.qemu_uri)


async def test_full_and_incremental_backups_restore_byte_identical(image, start_server,
                                                                    tmp_path):
    """Only block status and reads, as docs/bitmaps.md's recipe says: clear, full copy,
    then incrementals from frozen bitmaps. A write that lands on an already-copied
    region during the full copy must reach the next incremental (clearing after the
    copy, as the recipe once said, loses it)."""
    from nbdserve.control.client import ControlClient

    control = tmp_path / "ctl.sock"
    server = start_server(image, "--bitmap", "gen0", "--control", str(control))
    backup = tmp_path / "backup.img"
    with open(backup, "wb") as f:
        f.truncate(64 * MiB)

    async def copy_extents(context: str | None, after_first_chunk=None) -> int:
        contexts = [context] if context else []
        copied = 0
        async with await NbdClient.connect(unix=str(server.unix),
                                           meta_contexts=contexts) as nbd:
            ranges = [(0, nbd.size)]
            if context:
                ranges = await flagged_ranges(nbd, context, c.NBD_STATE_DIRTY)
            with open(backup, "r+b") as out:
                for offset, length in ranges:
                    for start in range(offset, offset + length, 4 * MiB):
                        n = min(4 * MiB, offset + length - start)
                        out.seek(start)
                        out.write(await nbd.read(start, n))
                        copied += n
                        if after_first_chunk is not None:
                            await after_first_chunk()
                            after_first_chunk = None
        return copied

    async def write(offset: int, data: bytes) -> None:
        async with await NbdClient.connect(unix=str(server.unix)) as nbd:
            await nbd.write(offset, data)

    await write(0, os.urandom(3 * MiB))
    with ControlClient(str(control)) as ctl:  # first reset the bitmap, then copy
        ctl.execute("bitmap-clear", {"name": "gen0"})

    async def write_behind_the_copy() -> None:  # the first 4 MiB are already copied
        await write(MiB, os.urandom(8192))

    assert await copy_extents(None, write_behind_the_copy) == 64 * MiB  # the full backup
    for generation in range(1, 4):
        await write(generation * 5 * MiB + 777, os.urandom(100000))
        await write(generation * 1000, os.urandom(10))
        with ControlClient(str(control)) as ctl:
            ctl.execute("bitmap-checkpoint", {"old": f"gen{generation - 1}",
                                              "new": f"gen{generation}"})
        await write(60 * MiB, os.urandom(4096))  # lands in the next increment
        copied = await copy_extents(f"qemu:dirty-bitmap:gen{generation - 1}")
        assert copied < 64 * MiB // 8  # incremental, not full
        with ControlClient(str(control)) as ctl:
            ctl.execute("bitmap-remove", {"name": f"gen{generation - 1}"})
    await copy_extents("qemu:dirty-bitmap:gen3")  # the final increment
    assert backup.read_bytes() == image.read_bytes()


def test_qdb_info_and_dump(image, start_server):
    server = start_server(image, "--bitmap", "b0", "--bitmap", "b1,granularity=4K")
    run("qemu-io", "-f", "raw", "-c", "write 1M 100k", server.qemu_uri)
    assert server.stop() == 0
    qdb = f"{image}.qdb"
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", qdb).stdout)
    assert info["in_use"] is False and info["image_size"] == 64 * MiB
    assert {b["name"]: b["dirty_bytes"] for b in info["bitmaps"]} == {
        "b0": 2 * 65536, "b1": 25 * 4096}
    dump = json.loads(run(*NBDSERVE, "qdb", "dump", qdb, "--bitmap", "b1", "--json").stdout)
    assert dump == [{"name": "b1", "granularity": 4096,
                     "dirty": [{"offset": MiB, "length": 25 * 4096}]}]
    text = run(*NBDSERVE, "qdb", "dump", qdb).stdout
    assert "b0 (granularity 65536):" in text and f"{MiB:>14} {2 * 65536:>14}  dirty" in text
    missing = run(*NBDSERVE, "qdb", "dump", qdb, "--bitmap", "nope", check=False)
    assert missing.returncode == 1 and "no bitmap named nope" in missing.stderr
    garbage = image.parent / "garbage.qdb"
    garbage.write_bytes(b"nope" * 64)
    bad = run(*NBDSERVE, "qdb", "check", str(garbage), check=False)
    assert bad.returncode == 1 and "bad magic" in bad.stderr


def test_qdb_commands_refuse_a_file_a_running_server_holds(image, start_server):
    """What is on disk is older than the server's bitmaps: say so, exit 1."""
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 0 64k", server.qemu_uri)
    for command in ("info", "dump", "check"):
        result = run(*NBDSERVE, "qdb", command, f"{image}.qdb", check=False)
        assert result.returncode == 1, (command, result.stdout)
        assert "in use by a running server" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_qdb_info_and_dump_of_a_crashed_file_include_its_journal(image, start_server):
    import signal
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 1M 64k", server.qemu_uri)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    qdb = f"{image}.qdb"
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", qdb).stdout)
    assert info["in_use"] is True and "journal replayed" in info["note"]
    assert info["bitmaps"][0]["dirty_bytes"] == 65536  # the file alone says 0
    dump = json.loads(run(*NBDSERVE, "qdb", "dump", "--json", qdb).stdout)
    assert dump[0]["dirty"] == [{"offset": MiB, "length": 65536}]
    assert "journal replayed" in run(*NBDSERVE, "qdb", "info", qdb).stdout


def test_qdb_dump_of_an_inconsistent_bitmap_reports_all_of_it_dirty(image, start_server):
    """Never the saved bits of a bitmap that cannot be trusted: here a crash, then a
    write while no server ran (the file alone says only 1 MiB is dirty)."""
    import signal
    import time

    from nbdserve.bitmaps.journal import read_journal
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 1M 64k", server.qemu_uri)
    for _ in range(500):  # the crash journal has recorded the image at rest
        slot = read_journal(f"{image}.qdb.journal").watch
        if not slot.unset and not slot.heartbeat_ns:
            break
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    with open(image, "r+b") as f:
        f.seek(32 * MiB)
        f.write(b"offline")
    qdb = f"{image}.qdb"
    (dump,) = json.loads(run(*NBDSERVE, "qdb", "dump", "--json", qdb).stdout)
    assert dump["dirty"] == [{"offset": 0, "length": 64 * MiB}]
    assert "changed after the server stopped" in dump["inconsistent"]
    assert "inconsistent, all dirty" in run(*NBDSERVE, "qdb", "dump", qdb).stdout
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", qdb).stdout)
    assert info["bitmaps"][0]["dirty_bytes"] == 64 * MiB
    assert info["bitmaps"][0]["inconsistent"] is True


def test_qdb_check_validates_completely(image, start_server):
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 0 64k", server.qemu_uri)
    assert server.stop() == 0
    qdb = Path(f"{image}.qdb")
    assert "OK" in run(*NBDSERVE, "qdb", "check", str(qdb)).stdout
    qdb.write_bytes(qdb.read_bytes() + bytes(4096))  # a cluster nothing refers to
    result = run(*NBDSERVE, "qdb", "check", str(qdb), check=False)
    assert result.returncode == 1 and "not referenced by anything" in result.stderr
    server = start_server(image, "--bitmap", "b0")  # still loads: a leak is not damage
    assert "inconsistent" not in server.log


def written_and_stopped(image: Path, start_server) -> None:
    server = start_server(image, "--bitmap", "b0")
    run("qemu-io", "-f", "raw", "-c", "write 1M 64k", server.qemu_uri)
    assert server.stop() == 0


def test_a_copy_of_an_image_is_adopted_by_the_operator(image, start_server, tmp_path):
    import shutil
    written_and_stopped(image, start_server)
    elsewhere = tmp_path / "restored"
    elsewhere.mkdir()
    copy = elsewhere / "disk.img"
    shutil.copyfile(image, copy)  # a new inode: the bitmaps would be inconsistent
    shutil.copyfile(f"{image}.qdb", f"{copy}.qdb")
    result = run(*NBDSERVE, "qdb", "adopt", str(copy))
    assert "adopted 1 bitmaps" in result.stdout and "vouches" in result.stdout
    server = start_server(copy, "--bitmap", "b0")
    assert "inconsistent" not in server.log
    assert dirty_map(server, "b0") == [(MiB, 65536)]


def test_without_adopt_a_copy_has_inconsistent_bitmaps(image, start_server, tmp_path):
    """The negative control of the test above."""
    import shutil
    written_and_stopped(image, start_server)
    copy = tmp_path / "copy.img"
    shutil.copyfile(image, copy)
    shutil.copyfile(f"{image}.qdb", f"{copy}.qdb")
    server = start_server(copy, "--bitmap", "b0")
    assert "inconsistent" in server.log


def other_file_system(tmp_path: Path) -> Path | None:
    import tempfile
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        return Path(tempfile.mkdtemp(dir="/dev/shm", prefix="nbdserve-test-"))
    return None


@pytest.mark.parametrize("across", [False, True])
def test_qdb_move_takes_the_bitmaps_along(image, start_server, tmp_path, across):
    import shutil
    written_and_stopped(image, start_server)
    directory = tmp_path / "moved"
    directory.mkdir()
    if across:
        directory = other_file_system(tmp_path)
        if directory is None:
            pytest.skip("no second file system (/dev/shm) to move across")
    try:
        target = directory / "disk.img"
        result = run(*NBDSERVE, "qdb", "move", str(image), str(target))
        assert ("copied" if across else "renamed") in result.stdout
        assert not image.exists() and not Path(f"{image}.qdb").exists()
        server = start_server(target, "--bitmap", "b0")
        assert "inconsistent" not in server.log
        assert dirty_map(server, "b0") == [(MiB, 65536)]
        run("qemu-io", "-f", "raw", "-c", "read -P 0xcd 1M 64k", server.qemu_uri)
        assert server.stop() == 0
    finally:
        if across:
            shutil.rmtree(directory, ignore_errors=True)


def test_qdb_move_refuses_an_image_changed_since_its_bitmaps_were_saved(image, start_server,
                                                                        tmp_path):
    written_and_stopped(image, start_server)
    with open(image, "r+b") as f:  # an offline write
        f.write(b"changed")
    result = run(*NBDSERVE, "qdb", "move", str(image), str(tmp_path / "t.img"), check=False)
    assert result.returncode == 1 and "changed since its bitmaps were saved" in result.stderr
    assert image.exists() and not (tmp_path / "t.img").exists()


@pytest.fixture
def full_file_system(tmp_path):
    """A real 8 MiB tmpfs, mounted for the test (CI runs as root)."""
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.server_errors_expected  # the full disk is reported at ERROR, as it must be
def test_a_full_disk_at_start_serves_with_inconsistent_bitmaps(full_file_system, tmp_path,
                                                               start_server):
    """Issue 12: the export must come up (reads, writes that fit) and the bitmaps must
    be inconsistent, never silently wrong, when their file cannot be written."""
    image = full_file_system / "disk.img"
    image.write_bytes(os.urandom(4 * MiB))  # allocated: overwriting it needs no space
    filler = full_file_system / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(65536))
    server = start_server(image, "--bitmap", "b0")
    assert "could not be saved at start" in server.log
    run("qemu-io", "-f", "raw", "-c", "write -P 0x55 0 64k", server.qemu_uri)
    run("qemu-io", "-f", "raw", "-c", "read -P 0x55 0 64k", server.qemu_uri)
    filler.unlink()  # space is back by the time the server stops: the save records it
    assert server.stop() == 0
    assert "Traceback" not in server.log
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", f"{image}.qdb").stdout)
    assert info["bitmaps"][0]["inconsistent"]  # not a bitmap that missed the write
    server = start_server(image, "--bitmap", "b0")
    contexts = run("nbdinfo", "--list", "--json", server.uri()).stdout
    assert "qemu:dirty-bitmap:b0" not in contexts  # never offered while inconsistent
    assert server.stop() == 0


@pytest.mark.server_errors_expected  # full disks are reported at ERROR where they matter
async def test_enospc_while_serving_data_journal_and_qdb(full_file_system, start_server,
                                                         tmp_path):
    """Issue 12: the disk fills up while serving. Writes that need space (small and
    spliced alike) earn ENOSPC on a connection that stays usable; a bitmap operation whose
    save fails changes nothing; once space is back, everything works and the bitmaps hold
    every acknowledged write."""
    image = full_file_system / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)  # sparse: a write into a hole needs space
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--bitmap", "b0", "--control", str(control))
    filler = full_file_system / "filler"
    async with await NbdClient.connect(unix=str(server.unix),
                                       meta_contexts=["qemu:dirty-bitmap:b0"]) as nbd:
        # Dirty already (a TRIM of a hole allocates nothing): writing there needs no
        # journal record, only data space.
        await nbd.trim(12 * MiB, MiB)
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(bytes(4096))
        # ENOSPC from the journal (a clean granule) and from the data (a dirty one),
        # small and spliced (1 MiB) alike.
        for offset in (8 * MiB, 12 * MiB):
            for length in (4096, 1 * MiB):
                with pytest.raises(NbdError) as refused:
                    await nbd.write(offset, b"\x77" * length)
                assert refused.value.error == c.NBD_ENOSPC
        assert await nbd.read(0, 4096) == bytes(4096)  # the connection still serves
        result = bitmap_cli("add", "b1", "--control", str(control), check=False)
        assert result.returncode == 1
        assert "b1" not in listing(control)
        filler.unlink()
        await nbd.write(8 * MiB, b"\x77" * MiB)
        assert await nbd.read(8 * MiB, 4096) == b"\x77" * 4096
        dirty = await flagged_ranges(nbd, "qemu:dirty-bitmap:b0")
    # Over-reporting the refused writes is allowed; missing the one that landed is not.
    assert any(offset <= 8 * MiB and offset + length >= 9 * MiB for offset, length in dirty)
    bitmap_cli("add", "b1", "--control", str(control))
    assert server.stop() == 0
    assert "Traceback" not in server.log
    # Each failed write is a WARNING with the host's errno name (issue 17).
    failures = [line for line in server.lines if "WRITE at offset" in line]
    assert len(failures) == 4 and all(": WARNING: " in line and "(ENOSPC; NBD ENOSPC)"
                                       in line for line in failures), failures
