"""The transmission phase of one connection.

One loop reads pipelined requests. Requests that the page cache can answer at once
(most READs, WRITEs without FUA, CACHE, BLOCK_STATUS) are served inline: a task per
request would cost more than the I/O. Requests that may block (FLUSH, FUA, TRIM,
WRITE_ZEROES, reads of uncached data) run in worker threads and are answered out of
order when done. Every reply is handed to the transport in one synchronous step, so a
chunk is never interleaved with another on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor

from nbdserve.errors import nbd_error
from nbdserve.export import Export
from nbdserve.metrics import OTHER
from nbdserve.protocol import constants as c
from nbdserve.protocol.options import Session
from nbdserve.protocol.transmission import (
    REQUEST_HEADER,
    RequestValidator,
    block_status_chunk,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)
from nbdserve.server.polling import Poller
from nbdserve.server.splice import SocketSplicer
from nbdserve.server.stream import NbdStream

log = logging.getLogger("nbdserve.transmission")

SPLICE_MIN = 64 << 10  # WRITEs with this much payload still on the socket are spliced
INLINE_READ_MAX = 1 << 20  # larger reads go to a worker thread
SENDFILE_MIN = 64 << 10  # data runs at least this long go out with sendfile(2)
SPARSE_READ_MIN = 64 << 10  # reads at least this long look for holes (OFFSET_HOLE)
MAX_INFLIGHT_BYTES = 64 << 20  # payload held by unanswered requests, per connection
WRITE_BUFFER_HIGH = 4 << 20  # wait for the socket to drain above this
UNIX_SEND_BUFFER = 4 << 20  # send buffer asked for on Unix sockets (see __init__)


def read_pieces(image, offset: int, length: int, sparse: bool,
                nowait: bool) -> list[tuple[int, int, bytes | bytearray | None]] | None:
    """(offset, length, data or None for a hole) covering a READ.

    With ``nowait``, return None as soon as any data is not in the page cache.
    """
    read = image.pread_nowait if nowait else image.pread
    if not sparse:
        data = read(offset, length)
        return None if data is None else [(offset, length, data)]
    pieces: list[tuple[int, int, bytes | bytearray | None]] = []
    position = offset
    for run, is_data in image.allocation(offset, length, 1 << 16):
        data = None
        if is_data:
            data = read(position, run)
            if data is None:
                return None
        pieces.append((position, run, data))
        position += run
    if position < offset + length:  # the extent limit was reached: the rest as data
        data = read(position, offset + length - position)
        if data is None:
            return None
        pieces.append((position, offset + length - position, data))
    return pieces


class Transmission:
    def __init__(self, reader: NbdStream, writer: NbdStream,
                 session: Session, executor: Executor, peer: str,
                 shutting_down: Callable[[], bool], sock=None,
                 poller: Poller | None = None) -> None:
        self.reader = reader
        self.writer = writer
        reader.use_transmission_buffer()
        self.transport = writer.transport
        self.export: Export = session.export  # type: ignore[assignment]
        self.structured = session.structured_replies
        self.contexts = session.meta_contexts
        self.validator = RequestValidator(
            self.export.size, session.transmission_flags, session.structured_replies,
            bool(session.meta_contexts),
        )
        self.executor = executor
        self.peer = peer
        self.shutting_down = shutting_down
        self.loop = reader.loop
        self.tasks: set[asyncio.Task] = set()
        self.inflight_bytes = 0
        self.room = asyncio.Event()
        self.room.set()
        self.requests = 0
        self.out: list[bytes | bytearray] = []  # replies not yet handed to the transport
        self.started = 0.0  # when the request being dispatched arrived (metrics on)
        self.spawned = False  # whether it went to a task, which then times itself
        # sendfile(2) straight to the socket saves a copy; only on plain sockets (TLS
        # must go through the transport) and only while the transport has nothing
        # queued, so the bytes still leave in order.
        self.sockfd = sock.fileno() if sock is not None and not session.tls else -1
        # A Unix socket's send buffer (about 208 KiB by default) is smaller than one
        # nbdcopy read (256 KiB): sendfile(2) would stop part-way and the rest be
        # copied. It is enlarged before the first large read (not at accept: the
        # call costs a few microseconds of every handshake).
        self.sock = sock if self.sockfd >= 0 and sock.family == socket.AF_UNIX else None
        # Busy-polling before sleeping (see polling.py); plain sockets only, as TLS
        # may hold decrypted bytes the socket does not show.
        self.poller = poller if self.sockfd >= 0 else None
        self.splicer: SocketSplicer | None = None  # made at the first large WRITE

    # -- the request loop -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve requests until DISC, EOF or a protocol violation."""
        read_struct = self.reader.read_struct
        read_payload = self.reader.read_payload
        validator = self.validator
        stats = self.export.stats
        requests = stats.requests
        clock = time.perf_counter
        clock_ns = time.perf_counter_ns
        available = self.reader.available
        poller = self.poller
        try:
            while True:
                if self.out and (available() < 28 or len(self.out) > 64):
                    self.flush_replies()  # about to wait for the client: send what is ready
                if not self.room.is_set():
                    self.flush_replies()
                    await self.room.wait()
                polled_from = 0
                if poller is not None and available() < REQUEST_HEADER.size and \
                        poller.allowed(bool(self.tasks) or self.transport.get_write_buffer_size()):
                    polled_from = clock_ns()
                    poller.spin(polled_from)
                magic, flags, command, cookie, offset, length = await read_struct(REQUEST_HEADER)
                if polled_from:
                    poller.adapt(clock_ns() - polled_from)
                if magic != c.NBD_REQUEST_MAGIC:
                    log.warning("%s: bad request magic 0x%x; disconnecting", self.peer, magic)
                    return
                payload = None
                spliced = False
                if command == c.NBD_CMD_WRITE:
                    if length > c.MAX_PAYLOAD:
                        # Spec: over 32 MiB may be treated as hostile; QEMU hangs up too.
                        log.warning("%s: write payload of %d bytes; disconnecting",
                                    self.peer, length)
                        return
                    if self.out and available() < length:
                        self.flush_replies()
                    # Most of the payload still on the socket: splice it, if the request
                    # is valid (checked now: a refused payload must be read off the wire).
                    spliced = (self.sockfd >= 0 and length - available() >= SPLICE_MIN
                               and not self.shutting_down()
                               and not validator.check(command, flags, offset, length)[0])
                    if not spliced:
                        payload = await read_payload(length)
                elif command == c.NBD_CMD_DISC:
                    log.debug("%s: client disconnected (DISC)", self.peer)
                    if not self.tasks:
                        # Nothing left to answer: hang up now (queued replies still go
                        # out first), not after the book-keeping; clients wait for it.
                        self.flush_replies()
                        self.transport.close()
                        await asyncio.sleep(0)  # let the loop close it before the rest
                    return
                self.requests += 1
                requests[command if command < OTHER else OTHER] += 1
                self.started = clock() if stats.timing else 0.0
                if spliced:
                    await self.write_spliced(flags, cookie, offset, length)
                else:
                    if self.shutting_down():
                        self.send_error(command, cookie, c.NBD_ESHUTDOWN,
                                        "server is shutting down")
                        continue
                    error, reason = validator.check(command, flags, offset, length)
                    if error:
                        self.send_error(command, cookie, error, reason)
                        continue
                    self.dispatch(command, flags, cookie, offset, length, payload)
                    payload = None  # views of the stream's buffers, valid until the loop runs
                if self.started and not self.spawned:
                    stats.observe(clock() - self.started)
                self.spawned = False
                if self.transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    self.flush_replies()
                    await self.writer.drain()
        except asyncio.IncompleteReadError:
            log.debug("%s: client closed the connection", self.peer)
        except ConnectionError as exc:
            log.debug("%s: connection lost: %s", self.peer, exc)
        finally:
            self.flush_replies()
            await self.finish_inflight()
            if self.splicer is not None:
                self.splicer.close()

    async def write_spliced(self, flags: int, cookie: int, offset: int, length: int) -> None:
        """A WRITE, already validated, whose payload is mostly still on the socket:
        moved into the image with splice(2) (see splice.py)."""
        export = self.export
        export.stats.bytes_written += length
        if self.splicer is None:
            self.splicer = SocketSplicer(self.sockfd, self.loop)
        head = self.reader.take_view(min(length, self.reader.available()))
        self.reader.pause_reading()  # the splicer reads the socket meanwhile
        try:
            error = await export.write_streamed(offset, length, head, self.splicer.receive)
        finally:
            self.reader.resume_reading()
        if error is not None:
            self.send_error(c.NBD_CMD_WRITE, cookie, nbd_error(error),
                            error.strerror or "write")
        elif flags & c.NBD_CMD_FLAG_FUA:
            self.spawn(self.in_thread(c.NBD_CMD_WRITE, cookie, export.flush), 0)
        else:
            self.out.append(simple_reply(cookie))

    def dispatch(self, command: int, flags: int, cookie: int, offset: int, length: int,
                 payload: tuple[memoryview, ...] | None) -> None:
        """handle_request: one branch per command (validation already passed)."""
        export = self.export
        if command == c.NBD_CMD_READ:
            export.stats.bytes_read += length
            sparse = (self.structured and length >= SPARSE_READ_MIN
                      and not flags & c.NBD_CMD_FLAG_DF)
            if (length >= SENDFILE_MIN and self.sockfd >= 0 and not flags & c.NBD_CMD_FLAG_FUA
                    and self.sendfile_read(cookie, offset, length, sparse)):
                return
            if length <= INLINE_READ_MAX and not flags & c.NBD_CMD_FLAG_FUA:
                # Page-cache hits are served at once; anything that would block goes
                # to a worker thread.
                try:
                    pieces = read_pieces(export.image, offset, length, sparse, nowait=True)
                except OSError as exc:
                    self.send_error(command, cookie, nbd_error(exc), exc.strerror or "read")
                    return
                if pieces is not None:
                    self.send_pieces(cookie, offset, pieces)
                    return
            self.spawn(self.slow_read(cookie, offset, length, flags, sparse), length)
        elif command == c.NBD_CMD_WRITE:
            export.stats.bytes_written += length
            try:
                export.change(command, offset, length, flags, payload)
            except OSError as exc:
                self.send_error(command, cookie, nbd_error(exc), exc.strerror or "write")
                return
            if flags & c.NBD_CMD_FLAG_FUA:
                self.spawn(self.in_thread(command, cookie, export.flush), 0)
            else:
                self.out.append(simple_reply(cookie))
        elif command in (c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_TRIM):
            def apply() -> None:
                export.change(command, offset, length, flags)
                if flags & c.NBD_CMD_FLAG_FUA:
                    export.flush()
            self.spawn(self.in_thread(command, cookie, apply), 0)
        elif command == c.NBD_CMD_FLUSH:
            self.spawn(self.in_thread(command, cookie, export.flush), 0)
        elif command == c.NBD_CMD_CACHE:
            try:
                export.image.readahead(offset, length)
            except OSError:
                pass  # a hint: failing to prefetch changes nothing
            self.out.append(simple_reply(cookie))
        elif command == c.NBD_CMD_BLOCK_STATUS:
            self.send_block_status(cookie, offset, length, flags)

    def sendfile_read(self, cookie: int, offset: int, length: int, sparse: bool) -> bool:
        """Send a cached READ with sendfile(2); False (nothing sent) if it cannot."""
        transport = self.transport
        image = self.export.image
        if not image.is_cached(offset, length):
            return False
        if self.sock is not None:
            with contextlib.suppress(OSError):  # the kernel caps it at wmem_max
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
            self.sock = None
        self.flush_replies()
        if transport.get_write_buffer_size():
            return False
        if sparse:
            runs = list(image.allocation(offset, length, 1 << 16))
            if sum(run for run, _ in runs) != length:
                return False
        else:
            runs = [(length, True)]
        heads = [] if self.structured else [simple_reply(cookie)]
        position = offset
        last = len(runs) - 1
        for index, (run, is_data) in enumerate(runs):
            if self.structured:
                chunk = offset_data_header if is_data else offset_hole_chunk
                heads.append(chunk(cookie, position, run, index == last))
            if is_data:
                self.send_file_range(b"".join(heads), image.fd, position, run)
                heads = []
            position += run
        if heads:  # trailing holes
            self.write_direct(b"".join(heads))
        return True

    def write_direct(self, data: bytes) -> bool:
        """Write to the socket; queue what does not fit. True if all of it was sent."""
        if self.transport.get_write_buffer_size() == 0:
            try:
                sent = os.write(self.sockfd, data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return True
            data = data[sent:]
        self.transport.write(data)
        return False

    def send_file_range(self, header: bytes, fd: int, offset: int, length: int) -> None:
        """Header, then [offset, offset+length) of the image: straight to the socket
        while it takes them, queued on the transport (in order) from then on."""
        if not self.write_direct(header):
            self.transport.write(self.export.image.pread(offset, length))
            return
        end = offset + length
        while offset < end:
            try:
                sent = os.sendfile(self.sockfd, fd, offset, end - offset)
            except BlockingIOError:
                sent = 0
            if sent == 0:
                # The socket is full: the transport takes the rest and its backpressure.
                self.transport.write(self.export.image.pread(offset, end - offset))
                return
            offset += sent

    # -- slow paths -------------------------------------------------------------------------

    def spawn(self, coroutine, held_bytes: int) -> None:
        self.spawned = True
        started = self.started
        self.inflight_bytes += held_bytes
        if self.inflight_bytes > MAX_INFLIGHT_BYTES:
            self.room.clear()  # backpressure: stop reading requests until some finish
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)

        def done(finished: asyncio.Task) -> None:
            if started:
                self.export.stats.observe(time.perf_counter() - started)
            self.tasks.discard(finished)
            self.inflight_bytes -= held_bytes
            if self.inflight_bytes <= MAX_INFLIGHT_BYTES:
                self.room.set()
        task.add_done_callback(done)

    async def in_thread(self, command: int, cookie: int, work: Callable[[], None]) -> None:
        try:
            await self.loop.run_in_executor(self.executor, work)
        except OSError as exc:
            self.send_error(command, cookie, nbd_error(exc), exc.strerror or "I/O error")
            self.flush_replies()
            return
        except Exception as exc:  # never let one request take the connection down
            log.exception("%s: request failed", self.peer)
            self.send_error(command, cookie, nbd_error(exc), str(exc) or "internal error")
            self.flush_replies()
            return
        self.out.append(simple_reply(cookie))
        self.flush_replies()

    async def slow_read(self, cookie: int, offset: int, length: int, flags: int,
                        sparse: bool) -> None:
        export = self.export

        def read() -> list[tuple[int, int, bytes | bytearray | None]]:
            if flags & c.NBD_CMD_FLAG_FUA:
                export.flush()  # as QEMU: READ with FUA first makes earlier writes durable
            return read_pieces(export.image, offset, length, sparse, nowait=False)

        try:
            pieces = await self.loop.run_in_executor(self.executor, read)
        except OSError as exc:
            self.send_error(c.NBD_CMD_READ, cookie, nbd_error(exc), exc.strerror or "read")
            self.flush_replies()
            return
        self.send_pieces(cookie, offset, pieces)
        self.flush_replies()

    # -- replies (framing only) -------------------------------------------------------------

    def flush_replies(self) -> None:
        """Hand the queued replies to the transport in one writev. The request loop
        queues the replies of a burst of pipelined requests and flushes before it would
        wait for the client; replies finished in tasks flush at once."""
        if self.out:
            out, self.out = self.out, []
            self.transport.writelines(out)

    def send_pieces(self, cookie: int, offset: int,
                    pieces: list[tuple[int, int, bytes | bytearray | None]]) -> None:
        """A READ reply: data and (structured, non-DF) hole pieces covering the request."""
        chunks = self.out
        if not self.structured:
            chunks += (simple_reply(cookie), pieces[0][2])
            return
        if pieces[0][1] == 0:
            chunks.append(none_chunk(cookie))
            return
        last = len(pieces) - 1
        for index, (position, run, data) in enumerate(pieces):
            done = index == last
            if data is None:
                chunks.append(offset_hole_chunk(cookie, position, run, done))
            else:
                chunks.append(offset_data_header(cookie, position, run, done))
                chunks.append(data)

    def send_error(self, command: int, cookie: int, error: int, message: str) -> None:
        self.export.stats.errors[command if command < OTHER else OTHER] += 1
        if error != c.NBD_ESHUTDOWN:
            log.info("%s: %s failed: %s (error %d)", self.peer,
                     c.COMMAND_NAMES.get(command, command), message, error)
        if self.structured:
            self.out.append(error_chunk(cookie, error, message))
        else:
            self.out.append(simple_reply(cookie, error))

    def send_block_status(self, cookie: int, offset: int, length: int, flags: int) -> None:
        limit = 1 if flags & c.NBD_CMD_FLAG_REQ_ONE else c.MAX_EXTENTS_PER_CHUNK
        chunks = []
        try:
            for context_id, name in self.contexts.items():
                chunks.append((context_id,
                               self.export.block_status(name, offset, length, limit)))
        except OSError as exc:
            self.send_error(c.NBD_CMD_BLOCK_STATUS, cookie, nbd_error(exc),
                            exc.strerror or "block status")
            return
        except (KeyError, ValueError) as exc:
            # A context that went away since SET (a removed bitmap, say).
            self.send_error(c.NBD_CMD_BLOCK_STATUS, cookie, c.NBD_EINVAL, str(exc))
            return
        last = len(chunks) - 1
        self.out.extend(block_status_chunk(cookie, context_id, descriptors, index == last)
                        for index, (context_id, descriptors) in enumerate(chunks))

    # -- end of the connection --------------------------------------------------------------

    async def finish_inflight(self) -> None:
        """Let every accepted request complete and its reply be queued."""
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
