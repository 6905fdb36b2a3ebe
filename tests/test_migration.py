"""Live migration of an export and its dirty bitmaps to another nbdserve
(docs/migration.md): real servers, real clients, images and bitmaps compared."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bitarray import bitarray

from conftest import NBDSERVE, NbdServe, flagged_ranges, run
from nbdserve.bitmaps.qdb import migration_state
from nbdserve.client import NbdClient, OptionRefused
from nbdserve.control.client import ControlClient
from nbdserve.migration import stream
from nbdserve.migration.stream import ChannelError, Kind

DIRTY = 1
GRANULE = 64 << 10


# -- the channel's framing, with literal bytes -----------------------------------------------

def test_data_message_layout():
    encoded = stream.encode(Kind.DATA, 0x1000, 3, b"abc")
    assert encoded == bytes.fromhex("03000000" "00000003" "0000000000001000"
                                    "0000000000000003") + b"abc"
    assert stream.decode_header(encoded[:24]) == (Kind.DATA, 3, 0x1000, 3)


@pytest.mark.parametrize("header, problem", [
    (bytes.fromhex("63000000" "00000000" + "00" * 16), "unknown message kind 99"),
    (bytes.fromhex("03000100" "00000000" + "00" * 16), "reserved header bytes"),
    (bytes.fromhex("03000000" "00000004" "0000000000000000" "0000000000000003"),
     "DATA of 3 bytes carries 4"),
    (bytes.fromhex("01000000" "7fffffff" + "00" * 16), "over"),
])
def test_bad_headers_are_refused(header, problem):
    with pytest.raises(ChannelError, match=problem):
        stream.decode_header(header)


def test_bits_overwrite_from_a_byte_boundary():
    source = bitarray("0000000011000000001", endian="little")
    target = bitarray(len(source), endian="little")
    target.setall(1)
    message = stream.bits_message(0, source, 9, 12)  # widened to granules 8..16
    kind, length, index, first = stream.decode_header(message[:24])
    assert (kind, index, first, length) == (Kind.BITS, 0, 8, 1)
    stream.apply_bits(target, first, message[24:])
    assert target.to01() == "11111111" + "11000000" + "111"
    with pytest.raises(ChannelError, match="byte boundary"):
        stream.apply_bits(target, 3, b"\0")
    with pytest.raises(ChannelError, match="past the bitmap"):
        stream.apply_bits(target, 16, b"\0\0")


@pytest.mark.parametrize("change, problem", [
    ({"granules": 1 << 40}, "does not fit"),  # would allocate 128 GiB of bits
    ({"granules": 15}, "does not fit"),
    ({"granularity-bits": 8}, "does not fit"),
    ({"name": "a" * 2000}, "wrong"),
    ({"generation": "x"}, "wrong"),
])
def test_bitmap_descriptions_are_checked_against_the_image(change, problem):
    good = {"name": "b", "granularity-bits": 16, "generation": 7, "recording": True,
            "inconsistent": False, "granules": 16}
    assert stream.BitmapMeta.from_json(good, 1 << 20).granules == 16
    with pytest.raises(ChannelError, match=problem):
        stream.BitmapMeta.from_json(good | change, 1 << 20)


# -- helpers ------------------------------------------------------------------------------------

def fill(path: Path, size: int, data_ranges: list[tuple[int, int]]) -> None:
    """A sparse image with data in data_ranges: 1 MiB of pseudo-random bytes, each
    copy stamped with its offset (no two MiB alike)."""
    block = bytearray(random.Random(7).randbytes(1 << 20))
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in data_ranges:
            f.seek(offset)
            for position in range(offset, offset + length, 1 << 20):
                block[:8] = position.to_bytes(8, "little")
                f.write(block[:min(1 << 20, offset + length - position)])


def control(path: Path, command: str, **arguments):
    with ControlClient(str(path)) as ctl:
        return ctl.execute(command, arguments)


def wait_phase(ctl: Path, phases: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = control(ctl, "query-migrate")["outgoing"]
        if state is not None and state["phase"] in phases:
            return state
        time.sleep(0.05)
    raise AssertionError(f"migration not in {phases}: {state}")


def dirty_map(uri: str, bitmap: str) -> list[tuple[int, int, int]]:
    out = run("nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri).stdout
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def allocated_kib(path: Path) -> int:
    return os.stat(path).st_blocks // 2


class Pair:
    """A source serving an image with bitmaps and a control socket, and a target
    waiting with --incoming on a Unix socket."""

    def __init__(self, tmp_path: Path, start_server, source_image: Path,
                 *source_args: str) -> None:
        self.tmp = tmp_path
        self.src_ctl = tmp_path / "src.ctl"
        self.dst_ctl = tmp_path / "dst.ctl"
        self.incoming = tmp_path / "incoming.sock"
        self.source_image = source_image
        self.target_image = tmp_path / "target.img"
        self.source = start_server(source_image, "--control", str(self.src_ctl),
                                   *source_args)
        self.target = start_server(self.target_image, "--incoming", f"unix:{self.incoming}",
                                   "--control", str(self.dst_ctl))

    def migrate(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(*NBDSERVE, "migrate", "start", f"unix:{self.incoming}", "--control",
                   str(self.src_ctl), *args, check=check)


# -- end to end --------------------------------------------------------------------------------

def test_idle_export_moves_with_holes_and_every_bitmap(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 256 << 20, [(0, 8 << 20), (100 << 20, 1 << 20), (255 << 20, 1 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "rec")
    source = pair.source
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 200M 64k", "-c", "write -z 0 64k",
        source.qemu_uri)
    control(pair.src_ctl, "bitmap-add", name="off", granularity=1 << 20)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 50M 4k", source.qemu_uri)
    control(pair.src_ctl, "bitmap-disable", name="off")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x55 60M 4k", source.qemu_uri)
    before = {name: dirty_map(source.uri(), name) for name in ("rec", "off")}
    listed = {b["name"]: b for b in control(pair.src_ctl, "query-bitmaps")}

    # The target refuses NBD clients until the migration completes, and says why.
    async def refused() -> str:
        with pytest.raises(OptionRefused) as caught:
            await NbdClient.connect(unix=str(pair.target.unix))
        return caught.value.message
    assert "waits for an incoming migration" in asyncio.run(refused())

    done = pair.migrate("--wait")
    assert done.returncode == 0
    state = control(pair.src_ctl, "query-migrate")["outgoing"]
    assert state["phase"] == "completed"
    assert run("cmp", str(image), str(pair.target_image)).returncode == 0
    # Holes are not sent: the target allocates what the source does, not 256 MiB.
    assert state["data-bytes"] <= 12 << 20
    assert allocated_kib(pair.target_image) <= allocated_kib(image) + 1024
    # Every bitmap, recording or not, with its bits, granularity and generation.
    target = pair.target
    for name in ("rec", "off"):
        assert dirty_map(target.uri(), name) == before[name]
    moved = {b["name"]: b for b in control(pair.dst_ctl, "query-bitmaps")}
    for name in ("rec", "off"):
        for key in ("granularity", "recording", "generation", "count"):
            assert moved[name][key] == listed[name][key], (name, key)
    # The source's QDB file says the image moved; serving it again takes --force.
    assert migration_state(str(image) + ".qdb") == "moved"
    source.stop()
    info = run(*NBDSERVE, "qdb", "info", str(image) + ".qdb").stdout
    assert "migration: the image was migrated away" in info
    refused_start = run(*NBDSERVE, "serve", str(image), "-k", str(tmp_path / "again.sock"),
                        check=False)
    assert refused_start.returncode == 1
    assert "was migrated to another server" in refused_start.stderr
    assert "Traceback" not in refused_start.stderr
    # The target records what is written there from now on, in the recording bitmap.
    run("qemu-io", "-f", "raw", "-c", "write -P 0x66 128M 4k", target.qemu_uri)
    assert (128 << 20, GRANULE, DIRTY) in dirty_map(target.uri(), "rec")
    assert (128 << 20) not in [e[0] for e in dirty_map(target.uri(), "off") if e[2]]


def test_writes_during_migration_land_on_the_target_and_in_its_bitmap(tmp_path,
                                                                      start_server):
    """A client writes through the whole migration on one connection to the source
    (forwarded after the switchover, never an error); the target ends with every
    write, and its bitmap holds exactly the granules written."""
    image = tmp_path / "disk.img"
    fill(image, 64 << 20, [(0, 48 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    control(pair.src_ctl, "bitmap-clear", name="b")
    rng = random.Random(3)
    expected: dict[int, bytes] = {}

    async def write_through() -> int:
        client = await NbdClient.connect(unix=str(pair.source.unix))
        writes = 0
        started = time.monotonic()
        migrating = False
        try:
            while True:
                offset = rng.randrange(0, (64 << 20) // 4096) * 4096
                data = rng.randbytes(4096)
                await client.write(offset, data)
                expected[offset] = data
                writes += 1
                if not migrating and time.monotonic() - started > 0.3:
                    migrating = True
                    await asyncio.to_thread(pair.migrate, "--bandwidth", "24M")
                if migrating:
                    phase = (await asyncio.to_thread(control, pair.src_ctl,
                                                     "query-migrate"))["outgoing"]["phase"]
                    if phase == "completed":
                        break
                    assert phase not in ("failed", "cancelled"), phase
                await asyncio.sleep(0.002)
            for _ in range(200):  # forwarded now
                offset = rng.randrange(0, (64 << 20) // 4096) * 4096
                data = rng.randbytes(4096)
                await client.write(offset, data)
                expected[offset] = data
                assert await client.read(offset, 4096) == data
                writes += 1
            await client.flush()
        finally:
            await client.disconnect()
        return writes

    writes = asyncio.run(write_through())
    # Its client gone, the moved export closes, and its forwarding connection with it.
    pair.source.wait_for_log("the last connection forwarded to its new server closed")
    deadline = time.monotonic() + 10
    while control(pair.dst_ctl, "query-status")["connections"]:
        assert time.monotonic() < deadline, "the forwarding connection stayed open"
        time.sleep(0.05)
    state = control(pair.src_ctl, "query-migrate")["outgoing"]
    # Writes landed while it copied: some regions went again (in a pass or the pause).
    assert state["data-bytes"] > 48 << 20, state
    assert writes > 400
    with open(pair.target_image, "rb") as f:
        for offset, data in expected.items():
            f.seek(offset)
            assert f.read(4096) == data, offset
    # Exact bitmap: the granules written, no more, no fewer.
    granules = sorted({offset // GRANULE for offset in expected})
    runs: list[tuple[int, int]] = []
    for granule in granules:
        if runs and runs[-1][0] + runs[-1][1] == granule * GRANULE:
            runs[-1] = (runs[-1][0], runs[-1][1] + GRANULE)
        else:
            runs.append((granule * GRANULE, GRANULE))

    async def target_dirty():
        async with await NbdClient.connect(unix=str(pair.target.unix),
                                           meta_contexts=["qemu:dirty-bitmap:b"]) as nbd:
            return await flagged_ranges(nbd, "qemu:dirty-bitmap:b")
    assert asyncio.run(target_dirty()) == runs


def test_fio_verify_runs_through_the_migration_of_a_1g_image(tmp_path, start_server):
    """fio writes 4 KiB blocks at a fixed rate, and reads, on the source through the
    whole migration of a 1 GiB image; its verification pass (after the switchover)
    reads every block back through the source's forwarding; the target has them too."""
    image = tmp_path / "disk.img"
    size = 1 << 30
    fill(image, size, [(0, 256 << 20), (768 << 20, 256 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    control(pair.src_ctl, "bitmap-clear", name="b")
    fio = subprocess.Popen(
        ["fio", "--output-format=json", "--ioengine=nbd", f"--uri={pair.source.uri()}",
         "--name=writer", "--rw=randwrite", "--bs=4k", "--iodepth=4", "--offset=128M",
         "--size=24M", "--rate_iops=,1200", "--verify=crc32c", "--verify_fatal=1",
         "--do_verify=1", "--write_iolog=writes.log",
         "--name=reader", "--rw=randread", "--bs=4k", "--iodepth=2", "--offset=512M",
         "--size=256M", "--time_based", "--runtime=7", "--rate_iops=500"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        pair.migrate("--bandwidth", "200M", "--max-downtime", "100")
        state = wait_phase(pair.src_ctl, ("completed", "failed", "cancelled"))
        assert state["phase"] == "completed", state
        assert fio.poll() is None, "fio ended before the switchover: the test proves nothing"
        out, err = fio.communicate(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
    assert fio.returncode == 0, err
    report = json.loads(out[out.index("{"):])
    writer, reader = report["jobs"]
    assert writer["error"] == 0 and reader["error"] == 0
    assert writer["write"]["io_bytes"] == 24 << 20
    assert writer["read"]["io_bytes"] == 24 << 20  # verified, after the switchover
    assert reader["read"]["io_bytes"] > 0
    # Outside fio's writes the target is the source image; inside, fio verified it
    # through the forwarding, and the target's own export reads the same.
    with open(image, "rb") as a, open(pair.target_image, "rb") as b:
        for start, stop in ((0, 128 << 20), (152 << 20, size)):
            a.seek(start)
            b.seek(start)
            while start < stop:
                chunk = min(16 << 20, stop - start)
                assert a.read(chunk) == b.read(chunk), start
                start += chunk
    written = sorted({int(words[words.index("write") + 1]) for words in
                      map(str.split, (tmp_path / "writes.log").read_text().splitlines())
                      if "write" in words})
    assert len(written) > 1000
    dirty = [(o, n) for o, n, t in dirty_map(pair.target.uri(), "b") if t & DIRTY]
    for offset in written:
        assert any(o <= offset < o + n for o, n in dirty), offset
    assert all(o >= 128 << 20 and o + n <= 152 << 20 for o, n in dirty), dirty
    assert state["data-bytes"] > 512 << 20  # fio's writes during the copy went again


@pytest.mark.server_errors_expected
def test_target_killed_mid_copy_leaves_the_source_serving(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 128 << 20, [(0, 96 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 1M 4k", pair.source.qemu_uri)
    before = dirty_map(pair.source.uri(), "b")
    pair.migrate("--bandwidth", "16M")
    wait_phase(pair.src_ctl, ("bulk", "dirty"))
    time.sleep(0.5)
    pair.target.stop(signal.SIGKILL)
    state = wait_phase(pair.src_ctl, ("completed", "failed", "cancelled"))
    assert state["phase"] == "failed" and state["error"]
    # The source serves on with its bitmaps as they were; bitmap operations work again.
    run("qemu-io", "-f", "raw", "-c", "read -P 0x21 1M 4k", pair.source.qemu_uri)
    assert dirty_map(pair.source.uri(), "b") == before
    control(pair.src_ctl, "bitmap-add", name="after")
    assert migration_state(str(image) + ".qdb") == ""
    # The partial target is never served by mistake ...
    again = run(*NBDSERVE, "serve", str(pair.target_image), "-k", str(tmp_path / "t.sock"),
                check=False)
    assert again.returncode == 1 and "did not complete" in again.stderr
    # ... and a new target receives it all.
    target = NbdServe(pair.target_image, "--incoming", f"unix:{pair.incoming}",
                      unix=tmp_path / "t2.sock")
    try:
        pair.migrate("--wait")
        assert run("cmp", str(image), str(pair.target_image)).returncode == 0
        assert dirty_map(target.uri(), "b") == before
    finally:
        target.stop()


@pytest.mark.server_errors_expected
def test_cancel_and_source_crash_leave_a_waiting_target(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 128 << 20, [(0, 96 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    pair.migrate("--bandwidth", "16M")
    wait_phase(pair.src_ctl, ("bulk",))
    run(*NBDSERVE, "migrate", "cancel", "--control", str(pair.src_ctl))
    state = wait_phase(pair.src_ctl, ("completed", "failed", "cancelled"))
    assert state["phase"] == "cancelled"
    status = run(*NBDSERVE, "migrate", "status", "--control", str(pair.src_ctl)).stdout
    assert "phase:" in status and "cancelled" in status
    overall = run(*NBDSERVE, "status", "--control", str(pair.dst_ctl)).stdout
    assert "waits for a migration on unix:" in overall

    def target_state():
        return control(pair.dst_ctl, "query-migrate")["incoming"][0]
    deadline = time.monotonic() + 10
    while target_state()["failures"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target_state()["state"] == "waiting"
    assert "cancelled" in target_state()["last-error"]
    # Kill -9 the source mid-copy: the target waits on, its image partial.
    pair.migrate("--bandwidth", "16M")
    wait_phase(pair.src_ctl, ("bulk",))
    pair.source.stop(signal.SIGKILL)
    while target_state()["failures"] < 2 and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert target_state()["state"] == "waiting"
    assert migration_state(str(pair.target_image) + ".qdb") == "incoming"
    # The source restarts with its bitmaps, not marked as moved.
    assert migration_state(str(image) + ".qdb") == ""
    restarted = NbdServe(image, unix=tmp_path / "again.sock")
    try:
        assert [e for e in dirty_map(restarted.uri(), "b") if e[2]] == []
    finally:
        restarted.stop()


@pytest.mark.server_errors_expected  # the failed migration is logged as an error
def test_mistakes_get_one_line(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 16 << 20, [(0, 1 << 20)])
    ctl = tmp_path / "ctl"
    start_server(image, "--control", str(ctl))
    port = 1  # nothing listens there; the refusal comes first
    plain = run(*NBDSERVE, "migrate", "start", f"127.0.0.1:{port}", "--control", str(ctl),
                check=False)
    assert plain.returncode == 1 and "--plain" in plain.stderr
    nowhere = run(*NBDSERVE, "migrate", "start", f"unix:{tmp_path / 'none.sock'}",
                  "--control", str(ctl), "--wait", check=False)
    assert nowhere.returncode == 1 and "cannot reach" in nowhere.stderr
    assert "Traceback" not in nowhere.stderr
    usage = run(*NBDSERVE, "migrate", "start", "nohost", "--control", str(ctl), check=False)
    assert usage.returncode == 2 and "no port" in usage.stderr
    conflict = run(*NBDSERVE, "serve", str(image), "--incoming", "unix:/tmp/x", "-r",
                   check=False)
    assert conflict.returncode == 2 and "incoming" in conflict.stderr
    # The image is served: nothing may migrate into it meanwhile.
    busy = run(*NBDSERVE, "serve", str(image), "--incoming", f"unix:{tmp_path / 'in'}",
               "-k", str(tmp_path / "other.sock"), check=False)
    assert busy.returncode == 1 and "in use by another process" in busy.stderr, busy.stderr


def test_snapshots_and_bitmap_operations_wait_for_the_migration(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 128 << 20, [(0, 96 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    control(pair.src_ctl, "snapshot-add", name="snap")
    refused = run(*NBDSERVE, "migrate", "start", f"unix:{pair.incoming}", "--control",
                  str(pair.src_ctl), check=False)
    assert refused.returncode == 1 and "snapshots" in refused.stderr
    control(pair.src_ctl, "snapshot-remove", name="snap")
    pair.migrate("--bandwidth", "32M")
    wait_phase(pair.src_ctl, ("bulk", "dirty"))
    for command, arguments in (("bitmap-add", {"name": "x"}),
                               ("snapshot-add", {"name": "s2"})):
        with pytest.raises(Exception, match="migrat"):
            control(pair.src_ctl, command, **arguments)
    state = wait_phase(pair.src_ctl, ("completed", "failed", "cancelled"))
    assert state["phase"] == "completed"


@pytest.mark.server_errors_expected  # the first attempt names the wrong host
def test_tls_channel_and_forwarding_with_certificates_both_ways(tmp_path, start_server):
    """Both servers require TLS with client certificates: the channel and the
    forwarded requests present the source's certificate; a source whose subject the
    target does not allow is refused."""
    from test_tls import Pki
    pki = Pki(tmp_path)
    image = tmp_path / "disk.img"
    fill(image, 32 << 20, [(0, 8 << 20)])
    tls = pki.server_args("require", "--tls-verify-client", "--tls-allow-subject",
                          "CN=nbd-server*")
    src_ctl = tmp_path / "src.ctl"
    source = start_server(image, "--control", str(src_ctl), "--bitmap", "b", *tls)
    target = start_server(tmp_path / "target.img", "--incoming", "127.0.0.1:0",
                          "--control", str(tmp_path / "dst.ctl"), *tls, unix=False)
    line = target.wait_for_log(r"waits for an incoming migration on 127\.0\.0\.1:\d+")
    port = int(line.rsplit(":", 1)[1])
    refused = run(*NBDSERVE, "migrate", "start", f"127.0.0.1:{port}", "--control",
                  str(src_ctl), "--wait", "--tls-hostname", "wrong.example", check=False)
    assert refused.returncode == 1 and "TLS" in refused.stderr, refused.stderr

    async def write_then_migrate():
        context = pki.client_context(pki.client_dir("client", common_name="nbd-server"))
        client = await NbdClient.connect(unix=str(source.unix), tls=context,
                                         tls_hostname="localhost")
        try:
            await client.write(1 << 20, b"\x5a" * 4096)
            await asyncio.to_thread(run, *NBDSERVE, "migrate", "start", f"127.0.0.1:{port}",
                                    "--control", str(src_ctl), "--wait")
            await client.write(2 << 20, b"\xa5" * 4096)  # forwarded, over TLS
            assert await client.read(1 << 20, 4096) == b"\x5a" * 4096
            await client.flush()
        finally:
            await client.disconnect()
    asyncio.run(write_then_migrate())
    data = (tmp_path / "target.img").read_bytes()
    assert data[1 << 20:(1 << 20) + 4096] == b"\x5a" * 4096
    assert data[2 << 20:(2 << 20) + 4096] == b"\xa5" * 4096
    target.wait_for_log(r"completed: serving")
    assert "CN=nbd-server" in target.log


@pytest.mark.server_errors_expected
def test_a_source_the_target_does_not_allow_is_refused(tmp_path, start_server):
    from test_tls import Pki
    pki = Pki(tmp_path)
    image = tmp_path / "disk.img"
    fill(image, 16 << 20, [(0, 1 << 20)])
    src_ctl = tmp_path / "src.ctl"
    start_server(image, "--control", str(src_ctl), *pki.server_args("require"))
    target = start_server(tmp_path / "target.img", "--incoming", "127.0.0.1:0",
                          *pki.server_args("require", "--tls-verify-client",
                                           "--tls-allow-subject", "CN=someone-else"),
                          unix=False)
    port = int(target.wait_for_log(r"incoming migration on").rsplit(":", 1)[1])
    result = run(*NBDSERVE, "migrate", "start", f"127.0.0.1:{port}", "--control",
                 str(src_ctl), "--wait", check=False)
    assert result.returncode == 1
    target.wait_for_log(r"subject CN=nbd-server.* is not allowed")
    assert not (tmp_path / "target.img").exists()


@pytest.mark.server_errors_expected
def test_target_lost_in_the_pause_leaves_the_source_recording(tmp_path, start_server):
    """A target that hangs up at SWITCHOVER, inside the pause, after the source began
    to mark its QDB file moved: the mark is taken back, the bitmaps reopen, and the
    source records and serves as before."""
    import socket
    import threading

    from nbdserve.migration.channel import Channel
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "fake.sock"))
    listener.listen(1)

    def fake_target() -> None:
        conn, _ = listener.accept()
        channel = Channel(conn)
        channel.expect(Kind.HELLO)
        channel.send(stream.encode_meta(Kind.WELCOME, {"export": "", "listen": []}))
        while True:
            message = channel.receive()
            if message.kind == Kind.SYNC:
                channel.send(stream.encode(Kind.SYNCED))
            elif message.kind == Kind.SWITCHOVER:
                channel.close()
                return
    thread = threading.Thread(target=fake_target, daemon=True)
    thread.start()
    image = tmp_path / "disk.img"
    fill(image, 16 << 20, [(0, 4 << 20)])
    ctl = tmp_path / "ctl"
    source = start_server(image, "--control", str(ctl), "--bitmap", "b")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x21 1M 4k", source.qemu_uri)
    result = run(*NBDSERVE, "migrate", "start", f"unix:{tmp_path / 'fake.sock'}",
                 "--control", str(ctl), "--wait", check=False)
    thread.join(10)
    assert result.returncode == 1
    state = control(ctl, "query-migrate")["outgoing"]
    assert state["phase"] == "failed" and "switchover" not in state["phase"]
    assert migration_state(str(image) + ".qdb") == ""
    run("qemu-io", "-f", "raw", "-c", "write -P 0x22 9M 4k", source.qemu_uri)
    dirty = [(o, n) for o, n, t in dirty_map(source.uri(), "b") if t & DIRTY]
    assert dirty == [(1 << 20, GRANULE), (9 << 20, GRANULE)]
    control(ctl, "bitmap-add", name="after")
    source.stop()
    assert migration_state(str(image) + ".qdb") == ""
    again = NbdServe(image, unix=tmp_path / "again.sock")
    try:
        dirty = [(o, n) for o, n, t in dirty_map(again.uri(), "b") if t & DIRTY]
        assert dirty == [(1 << 20, GRANULE), (9 << 20, GRANULE)]
    finally:
        again.stop()


def test_the_next_backup_from_the_target_is_incremental(tmp_path, start_server):
    """A backup chain started on the source goes on from the target: the bitmap it
    relies on moved with its generation, so the next run is incremental, copies only
    what changed, and restores to the target's image."""
    image = tmp_path / "disk.img"
    fill(image, 64 << 20, [(0, 16 << 20)])
    pair = Pair(tmp_path, start_server, image)
    chain = tmp_path / "chain"
    first = json.loads(run(*NBDSERVE, "backup", "run", "--json", "--control",
                           str(pair.src_ctl), str(chain)).stdout)
    assert first["kind"] == "full"
    run("qemu-io", "-f", "raw", "-c", "write -P 0x71 3M 64k", pair.source.qemu_uri)
    pair.migrate("--wait")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x72 40M 64k", pair.target.qemu_uri)
    second = json.loads(run(*NBDSERVE, "backup", "run", "--json", "--control",
                            str(pair.dst_ctl), str(chain)).stdout)
    assert second["kind"] == "incremental", second
    assert second["bytes_read"] <= 2 * GRANULE, second  # the two writes, no more
    restored = tmp_path / "restored.img"
    run(*NBDSERVE, "backup", "restore", str(chain), str(restored))
    assert restored.read_bytes() == pair.target_image.read_bytes()


KILL_ROUNDS = 20 if os.environ.get("NBDSERVE_SLOW") else 3


class Writer:
    """Random 4 KiB writes on one connection, in a thread of its own, until stopped or
    the connection fails; `acked` holds what the server acknowledged."""

    def __init__(self, unix: Path, seed: int, size: int) -> None:
        import threading
        self.unix, self.rng, self.size = unix, random.Random(seed), size
        self.acked: dict[int, bytes] = {}
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        client = await NbdClient.connect(unix=str(self.unix))
        try:
            while not self.stopping:
                offset = self.rng.randrange(0, self.size // 4096) * 4096
                data = self.rng.randbytes(4096)
                await client.write(offset, data)
                self.acked[offset] = data
                await asyncio.sleep(0.001)
            await client.disconnect()
        except Exception as exc:  # noqa: BLE001 (the test looks at who failed)
            self.error = exc

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(30)

    def written_granules(self) -> list[tuple[int, int]]:
        return [(g * GRANULE, GRANULE) for g in sorted({o // GRANULE for o in self.acked})]


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for offset, length in ranges:
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return out


def assert_has_writes(path: Path, acked: dict[int, bytes]) -> None:
    with open(path, "rb") as f:
        for offset, data in acked.items():
            f.seek(offset)
            assert f.read(4096) == data, offset


@pytest.mark.slow
@pytest.mark.server_errors_expected
@pytest.mark.parametrize("round_number", range(KILL_ROUNDS))
def test_kill_either_side_at_a_random_point(tmp_path, round_number):
    """kill -9 the target or the source at a random moment of a migration under
    writes: the side that survives has every acknowledged write and a bitmap that
    misses none of them."""
    rng = random.Random(round_number)
    image = tmp_path / "disk.img"
    size = 32 << 20
    fill(image, size, [(0, 24 << 20)])
    src_ctl, incoming = tmp_path / "src.ctl", tmp_path / "in.sock"
    source = NbdServe(image, "--control", str(src_ctl), "--bitmap", "b",
                      unix=tmp_path / "src.sock")
    target = NbdServe(tmp_path / "target.img", "--incoming", f"unix:{incoming}",
                      unix=tmp_path / "dst.sock")
    writer = None
    try:
        control(src_ctl, "bitmap-clear", name="b")
        writer = Writer(source.unix, round_number, size)
        time.sleep(0.2)
        run(*NBDSERVE, "migrate", "start", f"unix:{incoming}", "--control", str(src_ctl),
            "--bandwidth", "12M")
        time.sleep(rng.uniform(0.05, 2.0))
        victim = rng.choice(("target", "source"))
        phase = control(src_ctl, "query-migrate")["outgoing"]["phase"]
        if phase == "completed":
            pytest.skip("the migration ended before the kill: nothing to check")
        (target if victim == "target" else source).stop(signal.SIGKILL)
        if victim == "target":
            state = wait_phase(src_ctl, ("completed", "failed", "cancelled"))
            if state["phase"] == "completed":  # killed after the commit point
                pytest.skip("the target died after the switchover: it owned the disk")
            time.sleep(0.3)
            writer.stop()
            assert writer.error is None, writer.error  # the source served on
            source.stop()
            assert migration_state(str(image) + ".qdb") == ""
            assert_has_writes(image, writer.acked)
            again = NbdServe(image, unix=tmp_path / "again.sock")
        else:
            writer.stop()  # its connection died with the source
            moved = migration_state(str(image) + ".qdb") == "moved"
            if moved:  # killed in the switchover, past the commit point
                assert_has_writes(tmp_path / "target.img", writer.acked)
                pytest.skip("the source died after the commit point")
            target.stop()
            assert migration_state(str(tmp_path / "target.img") + ".qdb") == "incoming"
            assert_has_writes(image, writer.acked)
            again = NbdServe(image, unix=tmp_path / "again.sock")
        try:
            dirty = merged([(o, n) for o, n, t in dirty_map(again.uri(), "b") if t & DIRTY])
            written = merged(writer.written_granules())
            covered = [any(o <= w < o + n for o, n in dirty) for w, _ in written]
            assert all(covered), "a bitmap lost an acknowledged write"
        finally:
            again.stop()
    finally:
        if writer is not None:
            writer.stop()
        for server in (source, target):
            if server.proc.poll() is None:
                server.stop(signal.SIGKILL)


@pytest.mark.server_errors_expected  # the migration is cancelled, which is logged
def test_sigterm_during_a_migration_cancels_it_and_stops_cleanly(tmp_path, start_server):
    image = tmp_path / "disk.img"
    fill(image, 64 << 20, [(0, 48 << 20)])
    pair = Pair(tmp_path, start_server, image, "--bitmap", "b")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x31 2M 4k", pair.source.qemu_uri)
    pair.migrate("--bandwidth", "8M")
    wait_phase(pair.src_ctl, ("bulk", "dirty"))
    assert pair.source.stop(signal.SIGTERM) == 0
    assert "cancelled" in pair.source.log
    assert migration_state(str(image) + ".qdb") == ""
    assert not Path(str(image) + ".qdb.journal").exists()  # a clean stop
    info = json.loads(run(*NBDSERVE, "qdb", "info", "--json", str(image) + ".qdb").stdout)
    assert info["bitmaps"][0]["dirty_bytes"] == GRANULE


def test_a_read_only_export_migrates_and_its_copy_stays_servable(tmp_path, start_server):
    """Nothing is written to a read-only export, so its copy is not stale: the source
    writes no QDB file (its directory may be read-only too) and serves again without
    --force."""
    image = tmp_path / "disk.img"
    fill(image, 16 << 20, [(0, 4 << 20)])
    pair = Pair(tmp_path, start_server, image, "-r")
    pair.migrate("--wait")
    assert run("cmp", str(image), str(pair.target_image)).returncode == 0
    assert not Path(str(image) + ".qdb").exists()
    pair.source.stop()
    again = NbdServe(image, "-r", unix=tmp_path / "again.sock")
    again.stop()
