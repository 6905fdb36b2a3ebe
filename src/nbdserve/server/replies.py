"""Everything one connection sends during transmission, in one place.

``ReplyWriter`` frames replies (simple or structured, as negotiated), queues the
replies of a burst of pipelined requests and hands them to the transport in one
writev (``flush``), and sends large cached reads straight from the image with
sendfile(2). Every reply is handed over in one synchronous step, so a chunk is never
interleaved with another on the wire. It also holds the one failure path: an error of
any request, mapped to its NBD error with the request's flags in hand.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket

from nbdserve.errors import ERROR_NAMES, RequestError, error_message, nbd_error
from nbdserve.export import Export
from nbdserve.metrics import OTHER
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import (
    block_status_chunk,
    error_chunk,
    extended_block_status_chunk,
    extended_error_chunk,
    extended_none_chunk,
    extended_offset_data_header,
    extended_offset_hole_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_ok,
    simple_reply,
)

log = logging.getLogger("nbdserve.transmission")

UNIX_SEND_BUFFER = 4 << 20  # send buffer asked for on Unix sockets (see large_read)

Pieces = list[tuple[int, int, "bytes | bytearray | None"]]


class ReplyWriter:
    """Simple and structured replies. Every framing method takes the request's offset,
    which only extended replies echo (ExtendedReplyWriter)."""

    extended = False

    def __init__(self, transport, export: Export, structured: bool, peer: str,
                 sock: socket.socket | None, unix: bool = False) -> None:
        self.transport = transport
        self.export = export
        self.structured = structured or self.extended
        self.peer = peer
        self.errors = export.stats.errors
        self.out: list[bytes | bytearray] = []  # replies not yet handed to the transport
        # sendfile(2) straight to the socket saves a copy; only on plain sockets (TLS
        # must go through the transport; the caller passes no socket then) and only
        # while the transport has nothing queued, so the bytes still leave in order.
        self.sockfd = sock.fileno() if sock is not None else -1
        # A Unix socket's send buffer (about 208 KiB by default) is smaller than one
        # nbdcopy read (256 KiB): a reply would stop part-way, and the rest wait in
        # the transport. It is enlarged before the first large read (large_read; not
        # at accept: the call costs a few microseconds of every handshake).
        self.unix_sock = sock if unix else None

    # -- the queue ----------------------------------------------------------------------------

    def flush(self) -> None:
        """Hand the queued replies to the transport in one writev. The request loop
        queues the replies of a burst of pipelined requests and flushes before it would
        wait for the client; replies finished in tasks flush at once."""
        if self.out:
            out, self.out = self.out, []
            if not self.transport.is_closing():  # a client that hung up gets nothing
                self.transport.writelines(out)

    # -- framing --------------------------------------------------------------------------------

    def ok(self, cookie: int, offset: int) -> None:
        self.out.append(simple_ok(cookie))

    def fail(self, command: int, cookie: int, flags: int, exc: BaseException,
             offset: int) -> None:
        """The one failure path for a request that raised: its NBD error depends on
        the request's flags (errors.nbd_error). A failure of the server's own I/O is
        a WARNING, with the host's errno name."""
        error = nbd_error(exc, flags)
        failure = error != c.NBD_ESHUTDOWN and not isinstance(exc, RequestError)
        if failure:
            code = getattr(exc, "errno", None)
            log.warning("%s: %s at offset %d failed: %s (%s; NBD %s)", self.peer,
                        c.COMMAND_NAMES.get(command, command), offset, error_message(exc),
                        errno.errorcode.get(code, code) if code else type(exc).__name__,
                        ERROR_NAMES.get(error, error))
        self.refuse(command, cookie, error, error_message(exc), offset, logged=failure)

    def refuse(self, command: int, cookie: int, error: int, reason: str,
               offset: int, logged: bool = False) -> None:
        """An error reply: a structured error chunk, or a simple reply's error field.
        A refusal (the client's mistake, by the spec's rules) is logged at INFO."""
        self.errors[command if command < OTHER else OTHER] += 1
        if error != c.NBD_ESHUTDOWN and not logged:
            log.info("%s: %s refused: %s (%s)", self.peer,
                     c.COMMAND_NAMES.get(command, command), reason,
                     ERROR_NAMES.get(error, error))
        self.out.append(self._error(cookie, offset, error, reason))

    def _error(self, cookie: int, offset: int, error: int, reason: str) -> bytes:
        if self.structured:
            return error_chunk(cookie, error, reason)
        return simple_reply(cookie, error)

    def read_data(self, cookie: int, pieces: Pieces, offset: int) -> None:
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

    def block_status(self, cookie: int, chunks: list[tuple[int, bytes]], offset: int) -> None:
        """One chunk per (context id, descriptors), the last flagged DONE."""
        last = len(chunks) - 1
        self.out.extend(block_status_chunk(cookie, context_id, descriptors, index == last)
                        for index, (context_id, descriptors) in enumerate(chunks))

    # -- reads sent with sendfile(2) -----------------------------------------------------------

    def large_read(self) -> None:
        """Before the first large READ's reply, however it is sent: a Unix socket's
        send buffer is enlarged (the kernel caps it at net.core.wmem_max)."""
        if self.unix_sock is not None:
            with contextlib.suppress(OSError):
                self.unix_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                          UNIX_SEND_BUFFER)
            self.unix_sock = None

    def send_file(self, cookie: int, offset: int, length: int, sparse: bool) -> bool:
        """Send a cached READ with sendfile(2); False (nothing sent) if it cannot."""
        export = self.export
        if self.sockfd < 0 or not export.is_cached(offset, length):
            return False
        self.flush()
        if self.transport.get_write_buffer_size():
            return False
        runs = export.data_runs(offset, length, sparse)
        if runs is None:
            return False
        structured, extended = self.structured, self.extended
        heads = [] if structured else [simple_reply(cookie)]
        position = offset
        last = len(runs) - 1
        for index, (run, is_data) in enumerate(runs):
            if extended:
                chunk = extended_offset_data_header if is_data else extended_offset_hole_chunk
                heads.append(chunk(cookie, offset, position, run, index == last))
            elif structured:
                chunk = offset_data_header if is_data else offset_hole_chunk
                heads.append(chunk(cookie, position, run, index == last))
            if is_data:
                self._send_range(b"".join(heads), position, run)
                heads = []
            position += run
        if heads:  # trailing holes
            self._write_direct(b"".join(heads))
        return True

    def _write_direct(self, data: bytes) -> bool:
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

    def _send_range(self, header: bytes, offset: int, length: int) -> None:
        """Header, then [offset, offset+length) of the image: straight to the socket
        while it takes them, queued on the transport (in order) from then on."""
        export = self.export
        if not self._write_direct(header):
            self.transport.write(export.read(offset, length, sparse=False)[0][2])
            return
        end = offset + length
        while offset < end:
            sent = export.send_to(self.sockfd, offset, end - offset)
            if sent == 0:
                # The socket is full: the transport takes the rest and its backpressure.
                self.transport.write(export.read(offset, end - offset, sparse=False)[0][2])
                return
            offset += sent


class ExtendedReplyWriter(ReplyWriter):
    """Replies after extended headers were negotiated: every one is a 32-byte chunk
    that echoes the request's offset; there are no simple replies (a NONE chunk says
    success), and block status is BLOCK_STATUS_EXT (64-bit descriptors)."""

    extended = True

    def ok(self, cookie: int, offset: int) -> None:
        self.out.append(extended_none_chunk(cookie, offset))

    def _error(self, cookie: int, offset: int, error: int, reason: str) -> bytes:
        return extended_error_chunk(cookie, offset, error, reason)

    def read_data(self, cookie: int, pieces: Pieces, offset: int) -> None:
        if pieces[0][1] == 0:
            self.ok(cookie, offset)
            return
        chunks = self.out
        last = len(pieces) - 1
        for index, (position, run, data) in enumerate(pieces):
            done = index == last
            if data is None:
                chunks.append(extended_offset_hole_chunk(cookie, offset, position, run, done))
            else:
                chunks.append(extended_offset_data_header(cookie, offset, position, run, done))
                chunks.append(data)

    def block_status(self, cookie: int, chunks: list[tuple[int, bytes]], offset: int) -> None:
        last = len(chunks) - 1
        self.out.extend(extended_block_status_chunk(cookie, offset, context_id, descriptors,
                                                    index == last)
                        for index, (context_id, descriptors) in enumerate(chunks))
