"""Extended headers (issue 18) with real peers: QEMU 10's qemu-io and qemu-img against
nbdserve, and our client against QEMU 10's qemu-nbd. The server's own request counts
(its Prometheus metrics) prove the 64-bit path was taken: a compact request cannot
carry 4 GiB or more.

QEMU 10 comes from Debian's bookworm-backports, unpacked into .venv/qemu-10 by
scripts/setup.sh beside the 7.2 tools the rest of the suite uses.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, run
from nbdserve.client import NbdClient
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import EXTENDED_REQUEST_HEADER, REQUEST_HEADER

GiB = 1 << 30
TiB = 1 << 40
QEMU10 = Path(__file__).resolve().parent.parent / ".venv" / "qemu-10" / "usr" / "bin"


@pytest.fixture(scope="module")
def qemu10() -> Path:
    if not (QEMU10 / "qemu-io").exists():
        pytest.fail(f"QEMU 10 is not at {QEMU10}: run scripts/setup.sh")
    version = run(str(QEMU10 / "qemu-io"), "--version").stdout
    assert version.startswith("qemu-io version 10."), version
    return QEMU10


@pytest.fixture
def big_image(tmp_path) -> Path:
    """16 TiB, less the 64 KiB that ext4's largest file lacks: sparse."""
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(16 * TiB - 64 * 1024)
    return path


def requests_by_command(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {m[0]: float(m[1]) for m in re.findall(
        r'^nbdserve_requests_total\{command="(\w+)",export=""\} (\S+)$', text.decode(), re.M)}


def test_qemu_io_10_zeroes_above_4_gib_in_one_request(qemu10, big_image, start_server):
    port = free_port()
    server = start_server(big_image, "--metrics", f"127.0.0.1:{port}")
    out = run(str(qemu10 / "qemu-io"), "-f", "raw",
              "-c", "write -P 0x5a 5G 64k", "-c", "write -z -n -u 6G 8G",
              "-c", "discard 20G 1G", "-c", "read -P 0x5a 5G 64k",
              "-c", "read -P 0 6G 64k", "-c", "read -P 0 14G 64k",
              server.qemu_uri).stdout
    assert "Pattern verification failed" not in out, out
    assert requests_by_command(port)["WRITE_ZEROES"] == 1  # 8 GiB: one 64-bit request
    assert "extended-headers" in server.log
    with open(big_image, "rb") as f:
        f.seek(5 * GiB)
        assert f.read(65536) == b"\x5a" * 65536


def test_qemu_img_10_maps_a_16_tib_dirty_bitmap_in_a_few_requests(qemu10, big_image,
                                                                  start_server):
    port = free_port()
    server = start_server(big_image, "--bitmap", "b0", "--metrics", f"127.0.0.1:{port}")
    run(str(qemu10 / "qemu-io"), "-f", "raw", "-c", "write -P 1 10T 64k",
        "-c", "write -P 2 5G 64k", server.qemu_uri)
    opts = (f"driver=nbd,server.type=unix,server.path={server.unix},"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0")
    before = requests_by_command(port).get("BLOCK_STATUS", 0)
    extents = json.loads(run(str(qemu10 / "qemu-img"), "map", "--output=json",
                             "--image-opts", opts).stdout)
    dirty = [(e["start"], e["length"]) for e in extents if not e["data"]]  # QEMU's hack
    assert dirty == [(5 * GiB, 65536), (10 * TiB, 65536)]
    assert max(e["length"] for e in extents) > 4 * GiB
    asked = requests_by_command(port)["BLOCK_STATUS"] - before
    assert asked <= 16, asked  # a compact client needs over 4,000 for 16 TiB
    # QEMU 7.2 (no extended headers) still gets the same answer, the long way.
    extents_72 = json.loads(run("qemu-img", "map", "--output=json", "--image-opts",
                                opts).stdout)
    assert [(e["start"], e["length"]) for e in extents_72 if not e["data"]] == dirty
    assert requests_by_command(port)["BLOCK_STATUS"] - before - asked > 4000


@pytest.fixture
def qemu_nbd_10(qemu10, tmp_path, big_image):
    sock = tmp_path / "q10.sock"
    proc = subprocess.Popen([str(qemu10 / "qemu-nbd"), "-f", "raw", "-t", "-k", str(sock),
                             "-A", str(big_image)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "qemu-nbd 10 did not start"
        time.sleep(0.05)
    yield sock
    proc.terminate()
    proc.wait(10)


async def test_our_client_speaks_extended_headers_to_qemu_nbd_10(qemu_nbd_10):
    async with await NbdClient.connect(unix=str(qemu_nbd_10),
                                       meta_contexts=[c.BASE_ALLOCATION]) as nbd:
        assert nbd.extended
        await nbd.write(5 * GiB, b"\x33" * 8192)
        assert await nbd.read(5 * GiB, 8192) == b"\x33" * 8192
        await nbd.write_zeroes(8 * GiB, 8 * GiB)  # one request of 8 GiB
        await nbd.trim(20 * GiB, 6 * GiB)
        status = await nbd.block_status(0, 12 * TiB)
        ((first, flags), *_rest) = status[c.BASE_ALLOCATION]
        assert first == 5 * GiB and flags & c.NBD_STATE_HOLE  # one extent over 4 GiB
        extents = await nbd.walk_extents(c.BASE_ALLOCATION)
        assert [(o, n) for o, n, f in extents if not f & c.NBD_STATE_HOLE] == \
            [(5 * GiB, 8192)]
        assert sum(n for _, n, _ in extents) == nbd.size


async def test_our_client_and_server_both_ways_with_a_status_payload(big_image,
                                                                     start_server):
    """BLOCK_STATUS_PAYLOAD: a payload naming some of the selected contexts gets
    answers for those only; a bad payload is consumed and refused with EINVAL."""
    server = start_server(big_image, "--bitmap", "b0")
    contexts = [c.BASE_ALLOCATION, "qemu:dirty-bitmap:b0"]
    async with await NbdClient.connect(unix=str(server.unix),
                                       meta_contexts=contexts) as nbd:
        assert nbd.extended and nbd.flags & c.NBD_FLAG_BLOCK_STATUS_PAYLOAD
        await nbd.write(7 * TiB, b"\x01" * 4096)
        await nbd.trim(1 * TiB, 5 * GiB)  # one TRIM of over 4 GiB
        bitmap_id = next(i for i, name in nbd.contexts.items() if name == contexts[1])
        payload = (12 * TiB).to_bytes(8, "big") + bitmap_id.to_bytes(4, "big")
        only = await nbd.raw_request(c.NBD_CMD_BLOCK_STATUS, 0, 0,
                                     c.NBD_CMD_FLAG_PAYLOAD_LEN, payload)
        assert list(only) == [bitmap_id]
        assert only[bitmap_id][:3] == [(1 * TiB, 0), (5 * GiB, 1),
                                       (6 * TiB - 5 * GiB, 0)]
        with pytest.raises(Exception, match="22|EINVAL|Invalid"):
            await nbd.raw_request(c.NBD_CMD_BLOCK_STATUS, 0, 0, c.NBD_CMD_FLAG_PAYLOAD_LEN,
                                  payload + payload[-4:])  # a context named twice
        past_end = (nbd.size + 1).to_bytes(8, "big") + bitmap_id.to_bytes(4, "big")
        with pytest.raises(Exception, match="22|EINVAL|Invalid"):
            await nbd.raw_request(c.NBD_CMD_BLOCK_STATUS, 0, 0, c.NBD_CMD_FLAG_PAYLOAD_LEN,
                                  past_end)  # a good selection, a refused request
        both = await nbd.block_status(0, 12 * TiB)  # no payload: every context
        assert set(both) == set(contexts)
        assert await nbd.read(7 * TiB, 4096) == b"\x01" * 4096  # still in step


async def test_extended_requests_the_server_refuses_or_hangs_up_on(big_image, start_server):
    server = start_server(big_image)
    contexts = [c.BASE_ALLOCATION, c.QEMU_ALLOCATION_DEPTH]
    async with await NbdClient.connect(unix=str(server.unix),
                                       meta_contexts=contexts) as nbd:
        assert nbd.extended
        with pytest.raises(Exception, match="22|EINVAL|Invalid"):
            await nbd.read(0, c.MAX_PAYLOAD + 512)  # READ stays bounded
        with pytest.raises(Exception, match="22|EINVAL|Invalid"):
            await nbd.raw_request(c.NBD_CMD_FLUSH, 0, 0, 0, b"junk")  # takes no payload
        await nbd.cache(0, 8 * GiB)  # an effect length above 4 GiB
        status = await nbd.block_status(0, 8 * GiB)
        assert status[c.QEMU_ALLOCATION_DEPTH] == [(8 * GiB, 0)]  # one 64-bit extent
        assert status[c.BASE_ALLOCATION] == [(8 * GiB, c.NBD_STATE_HOLE | c.NBD_STATE_ZERO)]
        assert await nbd.read(0, 512) == bytes(512)  # payloads were consumed: in step
    nbd = await NbdClient.connect(unix=str(server.unix))
    # A compact header on a connection that negotiated extended ones: out of step,
    # so the server hangs up.
    nbd.writer.write(REQUEST_HEADER.pack(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 9, 0, 512))
    with pytest.raises(ConnectionError):
        await nbd.read(0, 512)
    await nbd.disconnect()
    # (The line is written before the hang-up, but read from the server's stderr by
    # another thread: wait for it.)
    server.wait_for_log("bad extended request magic")


def test_extended_request_header_layout():
    assert EXTENDED_REQUEST_HEADER.pack(c.NBD_EXTENDED_REQUEST_MAGIC,
                                        c.NBD_CMD_FLAG_PAYLOAD_LEN, c.NBD_CMD_WRITE, 7,
                                        5 << 32, 4096) == bytes.fromhex(
        "21e41c71 0020 0001 0000000000000007 0000000500000000 0000000000001000")
