"""Adaptive polling: the window's rules, and that it never holds up other work."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from nbdserve.config import ExportConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import RawImage
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import bind_unix
from nbdserve.server.polling import FIRST_WINDOW_NS, Census, Poller
from nbdserve.server.stream import NbdStream

MAX_NS = 50_000


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def poller(sock, transmitting=1, handshaking=0) -> Poller:
    census = Census()
    census.poll_max_ns = MAX_NS  # whatever this machine's CPU count
    census.transmitting = transmitting
    census.handshaking = handshaking
    return Poller(sock.fileno(), census)


def test_window_grows_while_waits_are_short_and_stops_after_a_long_one(pair):
    census = poller(pair[0]).census
    assert census.window_ns == 0
    census.adapt(10_000)  # a wait a window would have caught: start polling
    assert census.window_ns == FIRST_WINDOW_NS
    census.adapt(10_000)
    census.adapt(10_000)
    assert census.window_ns == 4 * FIRST_WINDOW_NS
    census.adapt(10_000)  # caught within the window: no change
    assert census.window_ns == 4 * FIRST_WINDOW_NS
    for _ in range(10):
        census.adapt(MAX_NS - 1)
    assert census.window_ns == MAX_NS  # never past the maximum
    census.adapt(MAX_NS + 1)  # an idle client: stop spinning at once
    assert census.window_ns == 0


def test_spin_returns_as_soon_as_bytes_arrive(pair):
    a, b = pair
    p = poller(a)
    p.census.window_ns = 10_000_000_000  # far longer than the test may take
    b.send(b"x")
    started = time.perf_counter_ns()
    assert p.spin(started)  # readable: the caller may read it at once
    assert time.perf_counter_ns() - started < 1_000_000_000


def test_spin_gives_up_after_the_window(pair):
    p = poller(pair[0])
    p.census.window_ns = 2_000_000  # 2 ms, nothing arrives
    started = time.perf_counter_ns()
    assert not p.spin(started)
    assert time.perf_counter_ns() - started >= 2_000_000


def test_no_polling_with_other_connections_or_work_in_flight(pair):
    assert poller(pair[0]).allowed(busy=False)
    assert not poller(pair[0]).allowed(busy=True)  # tasks or queued output need the loop
    assert not poller(pair[0], transmitting=2).allowed(busy=False)
    assert not poller(pair[0], handshaking=1).allowed(busy=False)
    assert poller(pair[0], transmitting=0, handshaking=1).allowed(busy=False)


def test_one_cpu_never_polls(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert Census(MAX_NS).poll_max_ns == 0


async def qemu_io_polled(image, tmp_path, commands: list[str]) -> tuple[bytes, int]:
    """qemu-io running commands one at a time (writeback: no FUA, so no request needs
    a task) against an in-process server that busy-polls. Returns its output and the
    polling window at the end."""
    export = Export(ExportConfig("", str(image)), RawImage(str(image)))
    path = str(tmp_path / "polled.sock")
    server = Server(ExportCatalog([export]), [bind_unix(path)], poll_max_us=200_000)
    await server.start()
    try:
        qemu_io = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-t", "writeback", *commands, f"nbd:unix:{path}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await qemu_io.communicate()
        assert qemu_io.returncode == 0, output
        return output, server.connections.census.window_ns
    finally:
        await server.shutdown()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no busy-polling")
async def test_a_request_seen_while_polling_is_read_and_served_at_once(image, tmp_path,
                                                                     monkeypatch):
    """qemu-io, one request at a time: once the window has grown, the next request is
    read as polling sees it (no turn of the event loop), and every write and read
    still lands and reads back as written."""
    read_now = []
    receive_now = NbdStream.receive_now

    def counting(stream, fd):
        count = receive_now(stream, fd)
        read_now.append(count)
        return count
    monkeypatch.setattr(NbdStream, "receive_now", counting)
    commands = []
    for index in range(150):
        commands += ["-c", f"write -P {index % 250 + 1} {index * 8192} 4k",
                     "-c", f"read -P {index % 250 + 1} {index * 8192} 4k"]
    output, _ = await qemu_io_polled(image, tmp_path, commands)
    assert b"verification failed" not in output and output.count(b"read 4096/") == 150
    data = image.read_bytes()
    for index in range(150):
        assert data[index * 8192:index * 8192 + 4096] == bytes([index % 250 + 1]) * 4096
    assert sum(1 for count in read_now if count) > 100  # most requests, once it grew


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: no busy-polling")
async def test_the_request_loop_keeps_its_window_when_polling_sees_a_request(image,
                                                                            tmp_path):
    """WRITEs of 128 KiB one at a time are served by the request loop, which
    busy-polls between them too: a spin that sees the next request arrive is a short
    wait, so the window grows, and must not be taken for a long one (which stops
    polling)."""
    commands = []
    for index in range(60):
        commands += ["-c", f"write -P {index + 1} {index << 17} 128k"]
    _, window = await qemu_io_polled(image, tmp_path, commands)
    data = image.read_bytes()
    assert all(data[index << 17:(index + 1) << 17] == bytes([index + 1]) * (128 << 10)
               for index in range(60))
    assert window >= 16 * FIRST_WINDOW_NS
