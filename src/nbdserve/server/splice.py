"""WRITE payloads moved from the socket towards the image with splice(2).

Received the usual way, a payload is copied twice: from the socket into our buffer,
then from there into the page cache. splice(2) moves it from the socket into a pipe
without copying; the image then moves it from the pipe into the file with one copy
(``RawImage.write_from_pipe``). For large writes that was about twice the throughput
(docs/performance.md). This module owns the socket side only.

While a payload is spliced, the transport must not read from the socket: its reading
is paused, and readability is watched on a duplicate of the descriptor (the event
loop refuses to watch a descriptor that a transport owns). Plain sockets only: under
TLS the bytes on the socket are not the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import Callable

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, missing from Python 3.11 on some builds
PIPE_SIZE = 1 << 20  # the largest pipe an unprivileged process gets by default
SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2

# Where a pipe's bytes go (Export.write_from_pipe):
# (pipe fd, offset, count) -> (bytes moved, error or None).
PipeSink = Callable[[int, int, int], "tuple[int, OSError | None]"]


class SocketSplicer:
    """Moves byte ranges from one connection's socket into files."""

    def __init__(self, sockfd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.sockfd = sockfd
        self.loop = loop
        self.pipe_r = self.pipe_w = self.watch_fd = self.null_fd = -1
        self.pipe_size = 0

    def _open(self) -> None:
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pipe_size = fcntl.fcntl(self.pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the user's pipe allowance: keep the default size
            self.pipe_size = fcntl.fcntl(self.pipe_w, 1032)  # F_GETPIPE_SZ

    async def receive(self, sink: PipeSink, offset: int, length: int,
                      error: OSError | None = None) -> OSError | None:
        """Move the next length bytes of the socket to sink at offset.

        The bytes are always consumed from the socket, so the stream stays in step;
        once the sink refuses them (or if an error is passed in), the rest of the
        payload is discarded and the first error returned. Raises
        IncompleteReadError if the client hangs up.
        """
        if self.pipe_r < 0:
            self._open()
        while length:
            try:
                moved = os.splice(self.sockfd, self.pipe_w, min(length, self.pipe_size),
                                  flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            except BlockingIOError:
                await self._readable()
                continue
            if moved == 0:
                raise asyncio.IncompleteReadError(b"", length)
            length -= moved
            if error is None:
                written, error = sink(self.pipe_r, offset, moved)
                if written < moved:
                    self._discard(moved - written)  # the pipe is left empty either way
            else:
                self._discard(moved)
            offset += moved
        return error

    def _discard(self, count: int) -> None:
        if self.null_fd < 0:
            self.null_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        while count:
            count -= os.splice(self.pipe_r, self.null_fd, count)

    async def _readable(self) -> None:
        if self.watch_fd < 0:
            self.watch_fd = os.dup(self.sockfd)
        ready = self.loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(self.watch_fd, wake)
        try:
            await ready
        finally:
            self.loop.remove_reader(self.watch_fd)

    def close(self) -> None:
        for fd in (self.pipe_r, self.pipe_w, self.watch_fd, self.null_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pipe_r = self.pipe_w = self.watch_fd = self.null_fd = -1
