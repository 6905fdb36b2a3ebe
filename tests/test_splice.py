"""Large WRITEs take the splice(2) path (socket -> pipe -> image): bytes, bitmaps,
errors and hang-ups must be exactly as on the ordinary path."""

from __future__ import annotations

import os
import resource
import socket
import struct

import pytest

from conftest import flagged_ranges
from nbdserve.client import NbdClient, NbdError
from nbdserve.protocol import constants as c

MiB = 1 << 20


@pytest.fixture(params=["unix", "tcp"])
def any_server(request, image, start_server):
    return start_server(image, unix=request.param == "unix")


async def test_large_writes_land_whole(any_server, image):
    client = await NbdClient.connect(**any_server.client_args())
    writes = [(0, 100 * 1024), (3 * MiB + 512, MiB), (8 * MiB, 4 * MiB + 512),
              (20 * MiB, 32 * MiB)]  # the largest payload a client may send
    expected = bytearray(64 * MiB)
    for offset, length in writes:
        data = os.urandom(length)
        await client.write(offset, data)
        expected[offset:offset + length] = data
    await client.flush()
    for offset, length in writes:
        assert await client.read(offset, min(length, 8 * MiB)) == \
            bytes(expected[offset:offset + min(length, 8 * MiB)])
    await client.disconnect()
    assert image.read_bytes() == bytes(expected)


async def test_pipelined_large_and_small_writes_keep_their_order(any_server, image):
    client = await NbdClient.connect(**any_server.client_args())
    big, small = os.urandom(2 * MiB), os.urandom(4096)
    # The small write lands inside the big one and is sent after it: it must win.
    futures = [client.submit(c.NBD_CMD_WRITE, MiB, len(big), 0, big),
               client.submit(c.NBD_CMD_WRITE, MiB + 8192, len(small), 0, small)]
    for future in futures:
        await future
    await client.disconnect()
    disk = image.read_bytes()
    assert disk[MiB:MiB + 8192] == big[:8192]
    assert disk[MiB + 8192:MiB + 8192 + 4096] == small
    assert disk[MiB + 12288:3 * MiB] == big[12288:]


async def test_spliced_writes_are_recorded_in_bitmaps(image, start_server):
    server = start_server(image, "--bitmap", "b0")
    client = await NbdClient.connect(**server.client_args(),
                                     meta_contexts=["qemu:dirty-bitmap:b0"])
    await client.write(5 * MiB, os.urandom(2 * MiB))
    dirty = await flagged_ranges(client, "qemu:dirty-bitmap:b0", c.NBD_STATE_DIRTY)
    assert dirty == [(5 * MiB, 2 * MiB)]
    await client.disconnect()


@pytest.mark.parametrize("offset", [14 * MiB, 16 * MiB + 512],
                         ids=["crossing-the-limit", "past-the-limit"])
async def test_an_image_error_mid_payload_keeps_the_connection_in_step(any_server, offset):
    # Writes past 16 MiB fail with EFBIG (ENOSPC on the wire) once the limit is set.
    resource.prlimit(any_server.proc.pid, resource.RLIMIT_FSIZE, (16 * MiB, 16 * MiB))
    client = await NbdClient.connect(**any_server.client_args())
    with pytest.raises(NbdError) as failure:
        await client.write(offset, os.urandom(4 * MiB))
    assert failure.value.error == c.NBD_ENOSPC
    data = os.urandom(MiB)
    await client.write(MiB, data)  # the stream is intact: the next requests work
    assert await client.read(MiB, MiB) == data
    await client.disconnect()
    assert any_server.proc.poll() is None


async def test_client_hanging_up_mid_payload_costs_only_its_connection(any_server, image):
    if any_server.unix:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(any_server.unix))
    else:
        sock = socket.create_connection((any_server.host, any_server.port))
    with sock:
        assert sock.recv(18, socket.MSG_WAITALL)[:8] == b"NBDMAGIC"
        sock.sendall(struct.pack(">I", 3) + struct.pack(">QII", c.IHAVEOPT,
                                                        c.NBD_OPT_EXPORT_NAME, 0))
        sock.recv(10, socket.MSG_WAITALL)
        sock.sendall(struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 1,
                                 0, 4 * MiB) + os.urandom(300 * 1024))
    any_server.wait_for_log("client closed the connection|connection lost|disconnected")
    client = await NbdClient.connect(**any_server.client_args())
    assert await client.read(32 * MiB, 4096) == bytes(4096)
    await client.disconnect()


async def test_large_fua_write_is_acknowledged_after_the_flush(any_server, image):
    client = await NbdClient.connect(**any_server.client_args())
    data = os.urandom(3 * MiB)
    await client.write(MiB, data, c.NBD_CMD_FLAG_FUA)
    await client.disconnect()
    assert image.read_bytes()[MiB:4 * MiB] == data


@pytest.mark.parametrize("case", ["past-the-end", "read-only"])
async def test_refused_large_writes_are_read_off_the_wire(case, image, start_server):
    """Requests that fail validation are not spliced: their payload is read and
    dropped, and the next request is understood."""
    server = start_server(image, *(["-r"] if case == "read-only" else []))
    client = await NbdClient.connect(**server.client_args())
    offset = 63 * MiB if case == "past-the-end" else 0
    with pytest.raises(NbdError) as failure:
        await client.write(offset, os.urandom(2 * MiB))
    assert failure.value.error == (c.NBD_ENOSPC if case == "past-the-end" else c.NBD_EPERM)
    assert await client.read(0, 4096) == bytes(4096)
    await client.disconnect()
    assert image.read_bytes() == bytes(64 * MiB)


@pytest.mark.parametrize("size", [4096, 2 * MiB])  # received whole, and spliced
async def test_a_journal_that_cannot_grow_fails_the_write_with_enospc(image, tmp_path, size):
    """Marking comes first; when the crash journal cannot record (a full disk), the
    write is refused with ENOSPC, nothing reaches the image, and the connection goes
    on, whichever path the payload took."""
    import errno

    from nbdserve.bitmaps.store import BitmapStore
    from nbdserve.config import BitmapRequest, ExportConfig
    from nbdserve.export import Export, ExportCatalog
    from nbdserve.image import RawImage
    from nbdserve.server.lifecycle import Server
    from nbdserve.server.listener import bind_unix

    raw = RawImage(str(image))
    store = BitmapStore.open(str(image) + ".qdb", raw.size, raw.identity,
                             requests=[BitmapRequest("b0", 4096)])

    def full(records: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store.journal.append = full
    path = str(tmp_path / "s.sock")
    server = Server(ExportCatalog([Export(ExportConfig("", str(image)), raw, store)]),
                    [bind_unix(path)])
    await server.start()
    try:
        async with await NbdClient.connect(unix=path) as nbd:
            with pytest.raises(NbdError) as refused:
                await nbd.write(MiB, os.urandom(size))
            assert refused.value.error == c.NBD_ENOSPC
            assert await nbd.read(MiB, size) == bytes(size)  # in step, nothing written
    finally:
        await server.shutdown()


def test_a_failed_marking_of_a_spliced_part_is_returned_not_raised(image):
    """The splicer empties the pipe by what the sink says it moved: a marking that
    fails (the journal cannot grow) must come back as (0, error), never as an exception
    that leaves the payload in the pipe and the stream out of step."""
    import errno

    from nbdserve.bitmaps.store import BitmapStore
    from nbdserve.config import BitmapRequest, ExportConfig
    from nbdserve.export import Export
    from nbdserve.image import RawImage

    raw = RawImage(str(image))
    store = BitmapStore.open(str(image) + ".qdb", raw.size, raw.identity,
                             requests=[BitmapRequest("b0")])

    def full(records: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    store.journal.append = full
    export = Export(ExportConfig("", str(image)), raw, store)
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 4096)
    moved, error = export.write_from_pipe(read_end, 0, 4096)
    assert (moved, error.errno) == (0, errno.ENOSPC)
    assert raw.pread(0, 4096) == bytes(4096)
    os.close(read_end)
    os.close(write_end)
    store.close()
    raw.close()
