"""fio's nbd engine: concurrent jobs writing and verifying with crc32c."""

from __future__ import annotations

import json

from conftest import run


def test_fio_random_write_verify_several_jobs(server, tmp_path):
    # fio leaves verify state files in its working directory: keep them out of the repo.
    result = run(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={server.uri()}",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=8M",
        "--offset_increment=16M", "--verify=crc32c", "--verify_fatal=1",
        "--do_verify=1", "--group_reporting", "--output-format=json", cwd=tmp_path,
    )
    report = json.loads(result.stdout[result.stdout.index("{"):])
    (job,) = report["jobs"]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * (8 << 20)
    assert job["read"]["io_bytes"] == 4 * (8 << 20)  # the verification pass read it all


def test_fio_verify_catches_corruption(server, image, tmp_path):
    """A verify run over data written with another pattern must fail (no vacuous pass)."""
    run("qemu-io", "-f", "raw", "-c", "write -P 0x33 0 1M", server.qemu_uri)
    result = run(
        "fio", "--name=check", "--ioengine=nbd", f"--uri={server.uri()}", "--rw=read",
        "--bs=4k", "--size=1M", "--verify=crc32c", "--verify_only=1", "--verify_fatal=1",
        check=False, cwd=tmp_path,
    )
    assert result.returncode != 0
