"""The kernel's NBD client (nbd-client + /dev/nbdX): simple replies only."""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import run

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not os.path.exists("/dev/nbd0") or shutil.which("nbd-client") is None,
                       reason="needs the nbd kernel module (/dev/nbd0) and nbd-client"),
]


def test_kernel_client_reads_and_writes(image, start_server):
    server = start_server(image, unix=False)
    run("nbd-client", "-N", "", server.host, str(server.port), "/dev/nbd0")
    try:
        payload = os.urandom(1 << 20)
        with open("/dev/nbd0", "r+b", buffering=0) as dev:
            dev.seek(4 << 20)
            dev.write(payload)
            os.fsync(dev.fileno())
            dev.seek(4 << 20)
            assert dev.read(1 << 20) == payload
    finally:
        run("nbd-client", "-d", "/dev/nbd0")
    assert image.read_bytes()[4 << 20 : 5 << 20] == payload
