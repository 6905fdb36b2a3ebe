"""One connection's byte stream: an asyncio.BufferedProtocol with a small reader and
writer surface (read_struct, read_payload, write, drain, start_tls).

asyncio's StreamReader copies every received chunk into its buffer and again out of
it; profiling 1 MiB writes showed three quarters of the server's time there. Here the
transport receives straight into our buffer (recv_into), headers are unpacked in place,
and a WRITE payload is received directly into the buffer that is then written to the
image.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
from collections.abc import Callable

BUFFER_SIZE = 256 << 10  # for transmission (see use_transmission_buffer)
MIN_FREE = 64 << 10
HANDSHAKE_BUFFER = 4 << 10  # options are small: a connection starts small and cheap
HANDSHAKE_MIN_FREE = 1 << 10
HIGH_WATER = BUFFER_SIZE - MIN_FREE  # unread bytes at which receiving pauses...
LOW_WATER = BUFFER_SIZE // 4  # ...until the reader has brought them below this
_BEHIND, _HANDED_OVER, _REPLIES = 1, 2, 4  # reasons for not reading the socket
POOL_MAX = 32  # receive buffers kept for later connections (8 MiB)
_POOL: list[bytearray] = []
SPARE_MAX = 4 << 20  # payloads up to this size reuse one buffer per connection


class _Gone:
    """What a stream's transport is once the connection is lost: closed, quietly."""

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return default

    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


_GONE = _Gone()


class NbdStream(asyncio.BufferedProtocol):
    def __init__(self, on_connect: Callable[[NbdStream], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.on_connect = on_connect
        # While set, called whenever bytes arrive (instead of waking a reader): the
        # handshake is driven this way, without a task per connection.
        self.on_data: Callable[[], None] | None = None
        # While set, called when bytes arrive, before a waiting reader is woken: the
        # request loop serves requests that arrive complete this way while it waits
        # for a header (Transmission.serve_arrived), and leaves the rest unread.
        self.on_arrival: Callable[[], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        # The listener's address family when it says (saves asking the socket object
        # per connection, which converts it to an enum each time); 0 when unknown.
        self.family = 0
        self._connected = False
        self.transport: asyncio.Transport | None = None
        self.loop = loop or asyncio.get_running_loop()  # given: one syscall less
        self._buf = bytearray(HANDSHAKE_BUFFER)
        self._min_free = HANDSHAKE_MIN_FREE
        self._other: bytearray | None = None  # the receive buffer's twin (read_payload)
        self._spare = bytearray(0)  # payloads received in place (see read_payload)
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self._wanted = 0  # bytes the waiting reader needs in the buffer
        self._direct: memoryview | None = None  # a payload being received in place
        self._direct_filled = 0
        self._waiter: asyncio.Future | None = None
        self._closed: BaseException | None = None
        self._eof = False
        self._write_paused = False
        self._paused = 0  # _BEHIND | _HANDED_OVER | _REPLIES
        self._drain_waiters: list[asyncio.Future] = []

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self._connected:  # not again after start_tls
            self._connected = True
            self.on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._direct is not None:
            return self._direct[self._direct_filled:]
        if len(self._buf) - self._end < self._min_free:
            unread = self._end - self._start
            if self._start:  # move the unread tail to the front
                self._buf[:unread] = self._buf[self._start:self._end]
                self._start, self._end = 0, unread
            if len(self._buf) - self._end < self._min_free:
                bigger = bytearray(2 * len(self._buf))
                bigger[:unread] = memoryview(self._buf)[self._start:self._end]
                # A new buffer rather than extend(): a payload view may still refer
                # to the old one, which then stays valid until it is dropped.
                self._buf, self._start, self._end = bigger, 0, unread
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._direct is not None:
            self._direct_filled += nbytes
            if self._direct_filled == len(self._direct):
                self._direct = None
                self._wake()
            return
        self._end += nbytes
        if self.on_data is not None:
            self.on_data()
            return
        if self.on_arrival is not None:
            self.on_arrival()
        unread = self._end - self._start
        if unread >= self._wanted:
            self._wake()
            if unread >= HIGH_WATER:
                # The reader has not caught up: stop receiving until it has, rather
                # than grow the buffer (the event loop may read many times before
                # the reader gets a turn).
                self._pause(_BEHIND)

    def data_received(self, data: bytes) -> None:
        """Bytes from a transport that does not take get_buffer's buffer: none does
        (uvloop and asyncio both serve a BufferedProtocol through get_buffer), but
        uvloop looks this method up for every new transport, and when it is missing
        raises and catches an AttributeError each time: 1.8 % of a short
        connection's instructions (docs/performance.md). So it is here, and correct:
        it fills get_buffer's buffers as a transport would."""
        view = memoryview(data)
        while view:
            buffer = self.get_buffer(len(view))
            count = min(len(buffer), len(view))
            buffer[:count] = view[:count]
            self.buffer_updated(count)
            view = view[count:]

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closed = exc or ConnectionResetError("connection closed")
        self._eof = True
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self.on_lost is not None:
            self.on_lost()
        # What is unread can never be used now: give the buffers back (to the pool:
        # a client that hangs up right after DISC is often gone before the request
        # loop ends, and a fresh 256 KiB buffer for each such connection was a
        # twentieth of a handshake). And let go of the transport: a TLS transport's
        # protocol holds our bound methods, so the two would keep each other (and
        # OpenSSL's buffers) alive until the cycle collector next ran, which under a
        # stream of TLS clients is a growing heap (issue 12).
        self._pool_buffers()
        self._spare = bytearray(0)
        self.transport = _GONE
        self.on_connect = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.on_data is not None:
            # A client that sends faster than it reads the replies: stop taking its
            # bytes until the replies have gone out.
            self._pause(_REPLIES)

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()
        if self._paused & _REPLIES:
            self._resume(_REPLIES)
            if self.on_data is not None:
                self.on_data()

    # -- why the transport is not read from: a bit per reason --------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def write_paused(self) -> bool:
        return self._write_paused

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._eof:
            raise asyncio.IncompleteReadError(b"", None)
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- reading ------------------------------------------------------------------------------

    async def _fill(self, n: int) -> None:
        while self._end - self._start < n:
            if self._eof:
                partial = bytes(self._buf[self._start:self._end])
                raise asyncio.IncompleteReadError(partial, n)
            self._wanted = n
            await self._wait()
        self._wanted = 0

    def use_transmission_buffer(self) -> None:
        """Switch to the large receive buffer that pipelined requests need, taken
        from the pool: allocating (and zeroing) 256 KiB cost a tenth of a handshake."""
        if len(self._buf) < BUFFER_SIZE:
            bigger = _POOL.pop() if _POOL else bytearray(BUFFER_SIZE)
            unread = self._end - self._start
            bigger[:unread] = memoryview(self._buf)[self._start:self._end]
            self._buf, self._start, self._end = bigger, 0, unread
        self._min_free = MIN_FREE

    def release_buffers(self) -> None:
        """The connection is closed and nothing reads from it any more: give the
        receive buffers back to the pool."""
        self._pool_buffers()
        self._buf = bytearray(HANDSHAKE_BUFFER)

    def _pool_buffers(self) -> None:
        """Hand the receive buffers to the pool. Only once nothing refers to them:
        payload views never outlive a turn of the loop (read_payload), and no worker
        thread is given one."""
        for buffer in (self._buf, self._other):
            if buffer is not None and len(buffer) == BUFFER_SIZE and len(_POOL) < POOL_MAX:
                _POOL.append(buffer)
        self._buf, self._other = bytearray(0), None
        self._start = self._end = 0

    @property
    def receive_buffer_size(self) -> int:
        return len(self._buf)

    def available(self) -> int:
        """Bytes received and not yet read: what can be read without waiting."""
        return self._end - self._start

    def pause_reading(self) -> None:
        """Stop receiving from the socket (someone else reads it for a while)."""
        self._pause(_HANDED_OVER)

    def resume_reading(self) -> None:
        self._resume(_HANDED_OVER)

    def receive_now(self, fd: int) -> int:
        """Receive what the socket fd holds now, as the event loop would on its next
        turn, for a caller that just saw it readable (busy-polling) and goes on
        serving; how many bytes came. 0 when none did, or while something else
        decides what is read (a pause, a payload received in place): the event loop
        then finds what there is (more bytes, the end, an error) as usual."""
        if self._paused or self._direct is not None:
            return 0
        try:
            count = os.readv(fd, (self.get_buffer(-1),))
        except OSError:
            return 0
        self._end += count
        return count

    def unread(self) -> memoryview:
        """The bytes received and not yet consumed, without a copy: valid until
        control returns to the loop or consume() is called."""
        return memoryview(self._buf)[self._start:self._end]

    def consume(self, n: int) -> None:
        """Drop the first n unread bytes (after a callback handled them)."""
        if self._end - self._start < n:
            raise ValueError(f"{n} bytes consumed, {self._end - self._start} available")
        self._consume(n)

    def take_view(self, n: int) -> memoryview:
        """The next n unread bytes (check available() first), consumed, without a
        copy: valid until control returns to the loop."""
        if self._end - self._start < n:
            raise ValueError(f"{n} bytes wanted, {self._end - self._start} available")
        view = memoryview(self._buf)[self._start:self._start + n]
        self._consume(n)
        return view

    def take_request(self, header_size: int, length: int) -> memoryview | None:
        """A request header (already peeked at) and the length bytes of payload after
        it, consumed together, the payload as a view without a copy (valid until
        control returns to the loop); None, consuming nothing, until all are here.
        One call for what a small WRITE served as it arrives would otherwise take
        three."""
        start = self._start + header_size
        end = start + length
        if end > self._end:
            return None
        self._consume(end - self._start)
        return memoryview(self._buf)[start:end]

    def take_struct(self, layout: struct.Struct) -> tuple | None:
        """The next fixed-size record if it has arrived (consumed), else None: the
        request loop's fast path, with no coroutine when requests are pipelined."""
        if self._end - self._start < layout.size:
            return None
        values = layout.unpack_from(self._buf, self._start)
        self._consume(layout.size)
        return values

    def peek_struct(self, layout: struct.Struct) -> tuple | None:
        """The next fixed-size record if it has arrived, not consumed; else None."""
        if self._end - self._start < layout.size:
            return None
        return layout.unpack_from(self._buf, self._start)

    def expect(self, n: int) -> None:
        """For the arrival callback (on_arrival): it can go on once n bytes are unread.
        Until then, bytes that arrive call it again without waking the waiting reader
        (whose own need is smaller)."""
        self._wanted = n

    def fail_reader(self, exc: BaseException) -> None:
        """Make the waiting reader raise exc (an on_arrival callback failed)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def read_struct(self, layout: struct.Struct) -> tuple:
        """Unpack the next fixed-size record in place (the per-request header)."""
        if self._end - self._start < layout.size:
            await self._fill(layout.size)
        values = layout.unpack_from(self._buf, self._start)
        self._consume(layout.size)
        return values

    async def read_payload(self, n: int) -> tuple[memoryview, ...]:
        """The next n bytes as buffers to be used back to back, without copying them.

        The part already received is a view of the receive buffer; the rest, if any,
        is received straight into a spare buffer reused from request to request (no
        allocation, zeroing or page faults per request). The views are valid only
        until control returns to the event loop, which may receive new bytes over
        them: the caller writes them to the image before awaiting anything.
        """
        start = self._start
        have = self._end - start
        head = memoryview(self._buf)[start:start + min(have, n)]
        self._consume(len(head))
        if have >= n:
            return (head,)
        # Every unread byte is part of this payload. The transport may receive more
        # before the caller runs again, so it gets the other (empty) buffer from now
        # on, and the bytes under head stay as they are until the next such swap.
        if self._other is None:
            self._other = bytearray(len(self._buf))
        self._buf, self._other = self._other, self._buf
        missing = n - have
        if missing <= SPARE_MAX:
            if len(self._spare) < missing:
                self._spare = bytearray(max(missing, MIN_FREE))
            rest = memoryview(self._spare)[:missing]
        else:
            rest = memoryview(bytearray(missing))
        self._direct = rest
        self._direct_filled = 0
        while self._direct is not None:
            if self._eof:
                self._direct = None
                raise asyncio.IncompleteReadError(b"", n)
            await self._wait()
        return (head, rest) if have else (rest,)

    def _consume(self, n: int) -> None:
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        if self._paused & _BEHIND and self._end - self._start < LOW_WATER:
            self._resume(_BEHIND)

    # -- writing (the StreamWriter surface the handshake uses) ---------------------------------

    def write(self, data) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self._closed is not None:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
            if self._closed is not None:
                raise ConnectionResetError("connection lost")

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS in place: the same protocol then receives the plaintext."""
        if self._end != self._start:
            raise ConnectionError("client sent data before the TLS handshake")
        self.transport = await self.loop.start_tls(self.transport, self, context,
                                                   server_side=True)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        while self._closed is None:
            waiter = self.loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
