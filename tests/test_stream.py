"""NbdStream, driven through the BufferedProtocol calls a transport makes."""

from __future__ import annotations

import asyncio
import os

import pytest

from nbdserve.server import stream as stream_module
from nbdserve.server.stream import NbdStream


class FakeTransport:
    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        pass


def receive(stream: NbdStream, data: bytes, step: int = 1 << 30) -> None:
    """What the transport does: fill the buffer it is given, then report the count."""
    view = memoryview(data)
    while view:
        buffer = stream.get_buffer(-1)
        count = min(len(buffer), len(view), step)
        buffer[:count] = view[:count]
        stream.buffer_updated(count)
        view = view[count:]


async def open_stream() -> NbdStream:
    async def idle(_stream: NbdStream) -> None:
        await asyncio.sleep(3600)

    stream = NbdStream(idle)
    stream.connection_made(FakeTransport())
    stream.task.cancel()
    return stream


async def test_payload_received_whole_is_a_view_of_the_buffer():
    stream = await open_stream()
    payload = os.urandom(4096)
    receive(stream, b"h" * 28 + payload + b"next")
    assert await stream.readexactly(28) == b"h" * 28
    view = await stream.read_payload(4096)
    assert isinstance(view, memoryview)
    assert view.obj is stream._buf  # no copy
    assert bytes(view) == payload
    assert await stream.readexactly(4) == b"next"


async def test_payload_split_across_receives_uses_one_reused_spare_buffer():
    stream = await open_stream()
    first, second = os.urandom(300_000), os.urandom(200_000)

    async def feed() -> None:
        for data in (first, second):
            await asyncio.sleep(0)
            receive(stream, data, step=50_000)

    feeder = asyncio.create_task(feed())
    got_first = await stream.read_payload(len(first))
    assert bytes(got_first) == first
    spare = got_first.obj
    got_first = None
    got_second = await stream.read_payload(len(second))
    assert bytes(got_second) == second
    assert got_second.obj is spare  # reused, not reallocated
    await feeder


async def test_large_payload_gets_its_own_buffer():
    stream = await open_stream()
    big = os.urandom(stream_module.SPARE_MAX + 4096)

    async def feed() -> None:
        await asyncio.sleep(0)
        receive(stream, big, step=1 << 20)

    feeder = asyncio.create_task(feed())
    got = await stream.read_payload(len(big))
    assert bytes(got) == big
    assert got.obj is not stream._spare
    await feeder


async def test_buffer_can_grow_while_a_payload_view_is_held():
    stream = await open_stream()
    payload = os.urandom(1000)
    receive(stream, payload)
    held = await stream.read_payload(1000)
    # The reader falls behind: far more arrives than the buffer holds. Growing must
    # not fail because a view of the old buffer is alive (bytearray.extend would).
    backlog = os.urandom(3 * stream_module.BUFFER_SIZE)
    receive(stream, backlog)
    assert len(stream._buf) > stream_module.BUFFER_SIZE
    del held
    assert await stream.readexactly(len(backlog)) == backlog


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
