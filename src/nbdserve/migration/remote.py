"""After a switchover: the source's open connections go on, their requests forwarded
to the target.

``RemoteImage`` has the verbs of a RawImage that the export and the transmission
phase use, each done over NBD on the target (our own client, on an event loop of its
own in a thread, so any thread may block on it, the source's event loop included).
``ForwardedTracker`` answers the export's bitmap questions from the target, whose
bitmaps are the live ones now. A client of the source sees the same disk as before,
a little slower; it never sees an error for the move.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence

from nbdserve.client import NbdClient, NbdError
from nbdserve.config import ListenAddress
from nbdserve.image import write_through_memory
from nbdserve.protocol import constants as c

REQUEST_TIMEOUT = 60.0  # seconds a forwarded request may take
MAX_FORWARD = 32 << 20  # the target's largest request


class RemoteImage:
    read_only = False
    is_block_device = False
    can_punch = True
    can_zero_range = True
    fd = -1

    def __init__(self, address: ListenAddress, export: str, size: int,
                 tls: ssl.SSLContext | None = None, tls_hostname: str | None = None) -> None:
        self.address = address
        self.export_name = export
        self.size = size
        self.path = f"migrated to {address}"
        self.tls = tls
        self.tls_hostname = tls_hostname
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="nbdserve-forward")
        self._thread.start()
        try:
            self.client: NbdClient = self._call(self._connect())
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self, contexts: Sequence[str] = (c.BASE_ALLOCATION,)) -> NbdClient:
        """The forwarding connection asks for base:allocation only: a dirty bitmap's
        context held open would keep that bitmap busy on the target (no checkpoint,
        no clear) for as long as a client stays connected here."""
        address = self.address
        return await NbdClient.connect(address.host or "127.0.0.1", address.port or 0,
                                       unix=address.path, export=self.export_name,
                                       meta_contexts=contexts, tls=self.tls,
                                       tls_hostname=self.tls_hostname)

    async def _bitmap_extents(self, context: str, offset: int, length: int,
                              flags: int) -> list[tuple[int, int]]:
        """A dirty bitmap's extents on a connection of their own, closed at once."""
        client = await self._connect((context,))
        try:
            return (await client.block_status(offset, length, flags)).get(context, [])
        finally:
            await client.disconnect()

    def _call(self, coroutine):
        """Run a client coroutine on the forwarding loop; an NBD error becomes the
        OSError the export's callers expect (NBD error numbers are errnos)."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(REQUEST_TIMEOUT)
        except NbdError as exc:
            raise OSError(exc.error, exc.message or os.strerror(exc.error)) from None
        except TimeoutError:
            future.cancel()
            raise OSError(errno.ETIMEDOUT, "the migration target did not answer") from None
        except ConnectionError as exc:
            raise OSError(errno.EIO, f"the migration target is unreachable: {exc}") from None

    # -- reads --------------------------------------------------------------------------

    def read_pieces(self, offset: int, length: int, sparse: bool, nowait: bool = False):
        if nowait:
            return None  # a round trip: never on the event loop's fast path
        return [(offset, length, self._call(self.client.read(offset, length)))]

    def pread(self, offset: int, length: int) -> bytes:
        return self._call(self.client.read(offset, length))

    def is_cached(self, offset: int, length: int) -> bool:
        return False  # so no sendfile(2): there is no local file

    def readahead(self, offset: int, length: int) -> None:
        pass

    def _extents(self, context: str, offset: int, length: int,
                 limit: int) -> list[tuple[int, int]]:
        flags = c.NBD_CMD_FLAG_REQ_ONE if limit == 1 else 0
        length = min(length, 0xFFFFFFFF & ~511, self.size - offset)
        if context == c.BASE_ALLOCATION:
            extents = self._call(self.client.block_status(offset, length, flags)).get(context)
        else:
            extents = self._call(self._bitmap_extents(context, offset, length, flags))
        if not extents:
            raise OSError(errno.EIO, f"the migration target answered no {context} extents")
        out, position = [], offset
        for run, run_flags in extents[:limit]:
            run = min(run, offset + length - position)
            if run <= 0:
                break
            out.append((run, run_flags))
            position += run
        return out

    def allocation(self, offset: int, length: int, limit: int) -> Iterator[tuple[int, bool]]:
        for run, flags in self._extents(c.BASE_ALLOCATION, offset, length, limit):
            yield run, not flags & c.NBD_STATE_HOLE

    def allocation_words(self, offset: int, length: int, limit: int, data: int, hole: int,
                         typecode: str = "I") -> array:
        words = array(typecode)
        for run, flags in self._extents(c.BASE_ALLOCATION, offset, length, limit):
            words.append(run)
            words.append(hole if flags & c.NBD_STATE_HOLE else data)
        return words

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        extents = self._extents(context, offset, length, limit)
        lengths: list[int] = []
        previous = None
        for run, flags in extents:
            dirty = bool(flags & c.NBD_STATE_DIRTY)
            if dirty == previous:
                lengths[-1] += run
            else:
                lengths.append(run)
                previous = dirty
        return lengths, bool(extents[0][1] & c.NBD_STATE_DIRTY)

    # -- changes ------------------------------------------------------------------------

    def pwritev(self, offset: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        self._call(self.client.write(offset, b"".join(buffers)))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._call(self.client.write(offset, bytes(data)))

    def write_from_pipe(self, pipe_fd: int, offset: int,
                        count: int) -> tuple[int, OSError | None]:
        """A spliced WRITE's part: the bytes waiting in the pipe, forwarded."""
        return write_through_memory(pipe_fd, offset, count, self.pwrite)

    def punch_hole(self, offset: int, length: int) -> bool:
        for start, size in _pieces(offset, length):
            self._call(self.client.trim(start, size))
        return True

    def zero_range(self, offset: int, length: int) -> bool:
        for start, size in _pieces(offset, length):
            self._call(self.client.write_zeroes(start, size, c.NBD_CMD_FLAG_NO_HOLE))
        return True

    def write_zeroes_slowly(self, offset: int, length: int) -> None:
        self.zero_range(offset, length)

    def flush(self) -> None:
        self._call(self.client.flush())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self._call(self.client.disconnect())
        except OSError:
            pass
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


def _pieces(offset: int, length: int) -> Iterator[tuple[int, int]]:
    """A TRIM or WRITE_ZEROES of any length as requests the target takes."""
    end = offset + length
    while offset < end:
        size = min(end - offset, 1 << 30)
        yield offset, size
        offset += size


class ForwardedTracker:
    """The export's DirtyTracker once its bitmaps live on the target: answers from
    there; marks nothing (the target's own recording path marks the forwarded
    changes)."""

    recorder = None

    def __init__(self, remote: RemoteImage | None, contexts: Sequence[str]) -> None:
        self.remote = remote
        self._contexts = list(contexts)

    def make_durable(self) -> None:
        pass  # the target's FLUSH covers its bitmaps

    def contexts(self) -> list[str]:
        return list(self._contexts)

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        if self.remote is None:
            raise OSError(errno.EIO, "the migration target cannot be reached")
        return self.remote.dirty_runs(context, offset, length, limit)

    def hold(self, contexts: Iterable[str]) -> list[str]:
        return []

    def release(self, names: Iterable[str]) -> None:
        pass

    def watch_image(self, image_fd: int) -> None:
        return None

    def query(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


class LostTarget:
    """The export moved, and its target cannot be reached: every request fails with
    EIO (the one case a client of the source sees an error; docs/migration.md)."""

    read_only = False
    is_block_device = False
    fd = -1

    def __init__(self, where: str, size: int) -> None:
        self.path = f"migrated to {where} (unreachable)"
        self.size = size

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            raise OSError(errno.EIO, f"the export moved to {self.path}")
        return fail

    def is_cached(self, offset: int, length: int) -> bool:
        return False

    def read_pieces(self, offset: int, length: int, sparse: bool, nowait: bool = False):
        if nowait:
            return None
        raise OSError(errno.EIO, f"the export {self.path}")

    def close(self) -> None:
        pass
