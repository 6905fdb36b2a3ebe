"""libnbd's tools (nbdinfo, nbdcopy, nbdsh) against a running nbdserve."""

from __future__ import annotations

import json
import os
import re

from conftest import nbdsh, run


def test_nbdinfo_shows_size_flags_and_block_sizes(server):
    info = json.loads(run("nbdinfo", "--json", server.uri()).stdout)
    (export,) = info["exports"]
    assert export["export-size"] == 64 << 20
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                       "can_multi_conn", "can_cache", "can_df"):
        assert export[capability] is True, capability
    assert export["is_read_only"] is False
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 32 << 20)
    assert set(export["contexts"]) == {"base:allocation", "qemu:allocation-depth"}


def test_nbdinfo_can_answers_with_exit_status(server):
    assert run("nbdinfo", "--can", "flush", server.uri(), check=False).returncode == 0
    assert run("nbdinfo", "--is", "read-only", server.uri(), check=False).returncode == 2


def test_nbdinfo_list_shows_name_and_description(image, start_server):
    server = start_server(image, "-x", "vm-disk", "-D", "the VM's system disk")
    out = run("nbdinfo", "--list", "--json", server.uri()).stdout
    (export,) = json.loads(out)["exports"]
    assert export["export-name"] == "vm-disk"
    assert export["description"] == "the VM's system disk"


def test_unknown_export_name_is_refused(image, start_server):
    server = start_server(image, "-x", "vm-disk")
    result = run("nbdinfo", server.uri("other"), check=False)
    assert result.returncode != 0
    # libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
    assert "No such file or directory for export: other" in result.stderr


def test_nbdinfo_map_allocation(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 4M 1M", server.qemu_uri)
    extents = json.loads(run("nbdinfo", "--map", "--json", server.uri()).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in extents] == [
        (0, 4 << 20, 3), (4 << 20, 1 << 20, 0), (5 << 20, 59 << 20, 3)]
    depth = json.loads(run("nbdinfo", "--map=qemu:allocation-depth", "--json",
                           server.uri()).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in depth] == [
        (0, 4 << 20, 0), (4 << 20, 1 << 20, 1), (5 << 20, 59 << 20, 0)]


def test_nbdcopy_round_trip_uses_multi_conn_and_is_byte_identical(server, tmp_path):
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(20 << 20) + bytes(24 << 20) + os.urandom(20 << 20))
    # nbdcopy caps connections at its thread count, which defaults to the cores.
    run("nbdcopy", "--connections=4", "--threads=4", str(source), server.uri())
    back = tmp_path / "back.raw"
    run("nbdcopy", "--connections=4", "--threads=4", server.uri(), str(back))
    assert back.read_bytes() == source.read_bytes()
    assert server.image.read_bytes() == source.read_bytes()
    peers = set(re.findall(r"(\S+): connected to export", server.log))
    assert len(peers) == 8, server.log  # four connections for each copy


def test_nbdsh_data_path_and_errors(server):
    out = nbdsh(server.uri(), """
        import errno
        h.pwrite(b"A" * 5000, 4096)
        assert h.pread(5000, 4096) == b"A" * 5000
        h.pwrite(b"B" * 512, 0, nbd.CMD_FLAG_FUA)
        h.flush()
        h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(4096, 4096) == bytes(4096)
        h.trim(65536, 1 << 20)  # count, offset: away from the data above
        h.cache(65536, 0)
        size = h.get_size()
        h.set_strict_mode(0)  # let the server, not libnbd, judge the bad requests
        for call, expected in [
            (lambda: h.pwrite(b"x", size), errno.ENOSPC),
            (lambda: h.zero(512, size - 256), errno.ENOSPC),
            (lambda: h.pread(2, size - 1), errno.EINVAL),
            (lambda: h.trim(1, size), errno.EINVAL),
        ]:
            try:
                call()
            except nbd.Error as e:
                assert e.errnum == expected, (e.errnum, expected, e)
            else:
                raise AssertionError("no error")
        # The connection survived every error.
        assert h.pread(512, 0) == b"B" * 512
        print("ok")
    """)
    assert out.strip() == "ok"


def test_nbdsh_read_only_export_answers_eperm(image, start_server):
    server = start_server(image, "-r")
    out = nbdsh(server.uri(), """
        import errno
        assert h.is_read_only()
        assert not h.can_trim() and not h.can_zero()
        assert h.pread(512, 0) == bytes(512)
        h.set_strict_mode(0)  # libnbd would refuse these itself
        for call in (lambda: h.pwrite(b"x", 0), lambda: h.trim(512, 0),
                     lambda: h.zero(512, 0)):
            try:
                call()
            except nbd.Error as e:
                assert e.errnum == errno.EPERM, e
            else:
                raise AssertionError("write accepted")
        print("ok")
    """)
    assert out.strip() == "ok"
    assert image.read_bytes()[:512] == bytes(512)


def test_nbdsh_structured_sparse_read_and_df(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 9 1M 64k", server.qemu_uri)
    out = nbdsh(server.uri(), """
        chunks = []
        def chunk(buf, offset, status, error):
            chunks.append((offset, len(buf), status))
            return 0
        h.pread_structured(4 << 20, 0, chunk)
        kinds = sorted({s for _, _, s in chunks})
        assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, chunks
        assert sum(n for _, n, _ in chunks) == 4 << 20
        chunks.clear()
        h.pread_structured(4 << 20, 0, chunk, nbd.CMD_FLAG_DF)
        assert chunks == [(0, 4 << 20, nbd.READ_DATA)], chunks
        data = h.pread(4 << 20, 0)
        assert data[1 << 20 : (1 << 20) + 65536] == b"\\x09" * 65536
        assert data[: 1 << 20] == bytes(1 << 20)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_nbdsh_block_status_req_one_and_fast_zero(server):
    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", server.qemu_uri)
    out = nbdsh(server.uri(), """
        seen = {}
        def cb(metacontext, offset, entries, err):
            seen[metacontext] = list(entries)
        # block_status(count, offset, ...): with REQ_ONE, one extent within the request
        h.block_status(1 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert seen["base:allocation"] == [65536, 0], seen
        h.block_status(1 << 20, 32768, cb, nbd.CMD_FLAG_REQ_ONE)
        assert seen["base:allocation"] == [32768, 0], seen
        h.block_status(1 << 20, 0, cb)
        assert seen["base:allocation"] == [65536, 0, (1 << 20) - 65536, 3], seen
        h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(65536, 0) == bytes(65536)
        print("ok")
    """, contexts=("base:allocation",))
    assert out.strip() == "ok"
