"""NbdStream, driven through the BufferedProtocol calls a transport makes."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from nbdserve.server import stream as stream_module
from nbdserve.server.stream import NbdStream


class FakeTransport:
    reading = True

    def get_extra_info(self, name, default=None):
        return default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def receive(stream: NbdStream, data: bytes, step: int = 1 << 30) -> None:
    """What the transport does, step bytes at a time: data_received fills the buffers
    get_buffer gives and reports each count, as uvloop's transports do."""
    for start in range(0, len(data), step):
        stream.data_received(data[start:start + step])


async def open_stream() -> NbdStream:
    """A stream as the transmission phase uses it (after the handshake)."""
    stream = NbdStream(lambda _stream: None)
    stream.connection_made(FakeTransport())
    stream.use_transmission_buffer()
    return stream


async def read_bytes(stream: NbdStream, n: int) -> bytes:
    """The next n bytes, read the way the request loop reads headers."""
    (data,) = await stream.read_struct(struct.Struct(f"{n}s"))
    return data


async def test_payload_received_whole_is_a_view_of_the_buffer():
    stream = await open_stream()
    payload = os.urandom(4096)
    receive(stream, b"h" * 28 + payload + b"next")
    assert await read_bytes(stream, 28) == b"h" * 28
    (view,) = await stream.read_payload(4096)
    assert view.obj is stream.unread().obj  # a view of the receive buffer: no copy
    assert bytes(view) == payload
    assert await read_bytes(stream, 4) == b"next"


async def test_payload_split_across_receives_is_not_copied_or_overwritten():
    stream = await open_stream()
    first, second = os.urandom(300_000), os.urandom(200_000)
    receive(stream, b"h" * 28 + first[:1000])
    await read_bytes(stream, 28)

    async def feed() -> None:
        await asyncio.sleep(0)
        # The rest, the next header and part of the next payload, in one burst: what
        # arrives after the payload must not land on the part already received.
        receive(stream, first[1000:] + b"H" * 28 + second[:5000], step=50_000)
        await asyncio.sleep(0)
        receive(stream, second[5000:], step=50_000)

    feeder = asyncio.create_task(feed())
    head, rest = await stream.read_payload(len(first))
    await asyncio.sleep(0)  # the event loop runs before the caller uses the payload
    assert bytes(head) + bytes(rest) == first
    assert await read_bytes(stream, 28) == b"H" * 28
    parts = await stream.read_payload(len(second))
    assert b"".join(bytes(part) for part in parts) == second
    await feeder


async def test_the_spare_buffer_is_reused():
    stream = await open_stream()
    spares = []
    for _ in range(3):
        payload = os.urandom(100_000)

        async def feed(data: bytes = payload) -> None:
            await asyncio.sleep(0)
            receive(stream, data, step=30_000)

        feeder = asyncio.create_task(feed())
        (rest,) = await stream.read_payload(len(payload))
        assert bytes(rest) == payload
        spares.append(rest.obj)
        await feeder
    assert spares[0] is spares[1] is spares[2]


async def test_large_payload_gets_its_own_buffer():
    stream = await open_stream()
    big = os.urandom(stream_module.SPARE_MAX + 4096)

    async def feed() -> None:
        await asyncio.sleep(0)
        receive(stream, big, step=1 << 20)

    feeder = asyncio.create_task(feed())
    (got,) = await stream.read_payload(len(big))
    assert bytes(got) == big
    assert len(got.obj) == len(big)  # a buffer of its own, not the (smaller) spare
    await feeder


async def test_buffer_can_grow_while_a_payload_view_is_held():
    stream = await open_stream()
    payload = os.urandom(1000)
    receive(stream, payload)
    held = await stream.read_payload(1000)
    assert bytes(held[0]) == payload
    # The reader falls behind: far more arrives than the buffer holds. Growing must
    # not fail because a view of the old buffer is alive (bytearray.extend would).
    backlog = os.urandom(3 * stream_module.BUFFER_SIZE)
    receive(stream, backlog)
    assert stream.receive_buffer_size > stream_module.BUFFER_SIZE
    del held
    assert await read_bytes(stream, len(backlog)) == backlog


async def test_eof_in_the_middle_of_a_payload():
    stream = await open_stream()
    receive(stream, b"x" * 100)

    async def hang_up() -> None:
        await asyncio.sleep(0)
        stream.eof_received()

    closer = asyncio.create_task(hang_up())
    with pytest.raises(asyncio.IncompleteReadError):
        await stream.read_payload(1 << 20)
    await closer


async def test_a_reader_that_falls_behind_pauses_receiving_instead_of_growing():
    stream = await open_stream()
    transport = stream.transport
    requests = os.urandom(stream_module.HIGH_WATER + 4096)
    receive(stream, requests, step=16384)
    assert not transport.reading  # the event loop would otherwise keep reading
    assert stream.receive_buffer_size == stream_module.BUFFER_SIZE
    taken = 0
    while transport.reading is False:
        assert await read_bytes(stream, 28) == requests[taken:taken + 28]
        taken += 28
    assert len(requests) - taken < stream_module.LOW_WATER  # resumed once caught up
    assert await read_bytes(stream, len(requests) - taken) == requests[taken:]


async def test_no_pause_while_the_reader_needs_more_than_has_arrived():
    stream = await open_stream()
    big = os.urandom(2 * stream_module.BUFFER_SIZE)

    async def feed() -> None:
        await asyncio.sleep(0)
        receive(stream, big, step=16384)

    feeder = asyncio.create_task(feed())
    assert await read_bytes(stream, len(big)) == big  # the buffer grows for it
    assert stream.transport.reading
    await feeder


async def test_a_request_and_its_payload_are_taken_together_or_not_at_all():
    """take_request (a small WRITE served as it arrives): nothing is consumed until
    header and payload are both in; then both are, and the payload is a view."""
    stream = await open_stream()
    header, payload = b"h" * 28, os.urandom(4096)
    receive(stream, header + payload[:1000])
    assert stream.take_request(28, 4096) is None
    assert stream.available() == 28 + 1000  # untouched
    receive(stream, payload[1000:] + b"next")
    view = stream.take_request(28, 4096)
    assert view.obj is stream.unread().obj and bytes(view) == payload
    assert stream.available() == 4 and bytes(stream.unread()) == b"next"
    assert stream.take_request(28, 0) is None  # a header not all here is no request


async def test_bytes_handed_over_whole_fill_the_buffers_a_transport_would_be_given():
    """data_received (which uvloop looks up, though it calls get_buffer): more than
    the small handshake buffer holds, in one piece, arrives whole and in order."""
    stream = NbdStream(lambda _stream: None)
    stream.connection_made(FakeTransport())
    data = os.urandom(3 * stream_module.HANDSHAKE_BUFFER + 100)
    stream.data_received(data)
    assert stream.available() == len(data)
    assert bytes(stream.unread()) == data


async def test_receive_now_reads_what_the_socket_holds_unless_something_else_decides():
    """receive_now (busy-polling saw the socket readable): the bytes join the unread
    ones at once; nothing is read while reading is paused or a payload is received
    in place, nor when nothing is there; at the end it reads nothing, and the end
    stays for the event loop to find."""
    ours, client = socket.socketpair()
    ours.setblocking(False)
    try:
        stream = await open_stream()
        receive(stream, b"head")
        assert stream.receive_now(ours.fileno()) == 0  # nothing there
        client.sendall(b"request")
        stream.pause_reading()  # (another reader of the socket, a splice)
        assert stream.receive_now(ours.fileno()) == 0
        stream.resume_reading()
        assert stream.receive_now(ours.fileno()) == len(b"request")
        assert bytes(stream.unread()) == b"headrequest"
        client.close()
        assert stream.receive_now(ours.fileno()) == 0
        assert ours.recv(1) == b""  # the end is still there to be found
    finally:
        ours.close()
        client.close()
