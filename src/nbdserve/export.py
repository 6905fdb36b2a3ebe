"""An export: one image shared by every connection that names it.

This is the layer between the transmission phase and the image. It has one verb per
operation (read, write, write_streamed, zero, trim, flush, cache, block_status), and
every verb that changes the image runs inside ``recording()``, so dirty bitmaps are
marked for every WRITE, WRITE_ZEROES and TRIM before the reply goes out. It encodes
each metadata context's extents as BLOCK_STATUS descriptors.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from nbdserve.config import ExportConfig
from nbdserve.errors import RequestError
from nbdserve.image import RawImage
from nbdserve.metrics import ExportStats
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import alternating_descriptors, encode_words

log = logging.getLogger(__name__)


class DirtyTracker(Protocol):
    """What the export needs from the bitmaps (nbdserve.bitmaps implements it)."""

    epoch: int  # changes whenever bits may have been reset (clear, checkpoint, ...)

    def mark_dirty(self, offset: int, length: int) -> int:
        """Record a change; returns `epoch` as it was before the marking."""

    def make_durable(self) -> None: ...

    def contexts(self) -> Sequence[str]: ...

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        """Lengths of alternating runs from offset (at most limit), and whether the
        first is dirty. Raises OSError (EINVAL) for a context that went away."""

    def hold(self, contexts: Iterable[str]) -> list[str]: ...

    def release(self, names: Iterable[str]) -> None: ...

    def close(self) -> None: ...


class _Recording:
    """The one place where a change to the image is recorded: entered before the
    image changes, left after (whether or not the change succeeded).

    On entry the bitmaps are marked, so a crash between marking and the data can only
    over-report; a failed change still marks (over-reporting is always safe). On exit,
    if bitmaps were reset meanwhile (a clear or a checkpoint racing with this change),
    the change is marked again in the new epoch; without that, the new bitmap could
    miss a write that landed after it was made. Copy-before-write and migration
    tracking hook in here too, so no change can go around them.
    """

    __slots__ = ("tracker", "offset", "length", "epoch")

    def __init__(self, tracker: DirtyTracker, offset: int, length: int) -> None:
        self.tracker = tracker
        self.offset = offset
        self.length = length

    def __enter__(self) -> None:
        self.epoch = self.tracker.mark_dirty(self.offset, self.length)

    def __exit__(self, *exc_info) -> None:
        tracker = self.tracker
        if tracker.epoch != self.epoch and self.length:
            tracker.mark_dirty(self.offset, self.length)


class _NotRecording:
    """An export without bitmaps: nothing to record (and nothing allocated)."""

    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc_info) -> None:
        pass


_NOT_RECORDING = _NotRecording()


class PayloadSource(Protocol):
    """Where a streamed WRITE's payload comes from (server/splice.py's SocketSplicer):
    it moves the next length bytes into sink, consuming them even after an error."""

    async def receive(self, sink: Callable[[int, int, int], tuple[int, OSError | None]],
                      offset: int, length: int, error: OSError | None = None
                      ) -> OSError | None: ...


class Export:
    def __init__(self, config: ExportConfig, image: RawImage,
                 tracker: DirtyTracker | None = None) -> None:
        self.name = config.name
        self.description = config.description
        self.image = image
        self.read_only = config.read_only or image.read_only
        self.size = image.size
        self.max_connections = config.max_connections
        self.tls_required = config.tls_required
        # Every connection shares this image and its bitmaps, so a FLUSH on one covers
        # writes acknowledged on all. Not offered with a limit of one connection,
        # where a multi-connection client would wait forever for its second socket.
        self.multi_conn = config.max_connections != 1
        self.tracker = tracker
        self.connections = 0
        self.stats = ExportStats()

    # -- negotiation ------------------------------------------------------------------

    def meta_contexts(self) -> Sequence[str]:
        names = [c.BASE_ALLOCATION, c.QEMU_ALLOCATION_DEPTH]
        if self.tracker is not None:
            names.extend(self.tracker.contexts())
        return names

    # -- changes: one verb per operation, each inside recording() ---------------------

    def recording(self, offset: int, length: int) -> _Recording | _NotRecording:
        """Wrap every change to [offset, offset+length) of the image (see _Recording)."""
        tracker = self.tracker
        if tracker is None:
            return _NOT_RECORDING
        return _Recording(tracker, offset, length)

    def write(self, offset: int, payload: Sequence[bytes | bytearray | memoryview]) -> None:
        """WRITE: the payload's buffers, back to back, at offset."""
        with self.recording(offset, sum(map(len, payload)) if len(payload) > 1
                            else len(payload[0])):
            self.image.pwritev(offset, payload)

    async def write_streamed(self, offset: int, length: int, head: memoryview,
                             source: PayloadSource) -> OSError | None:
        """WRITE whose payload is mostly still on its way: head (the part already
        received) is written at once, then source moves the rest straight into the
        image (RawImage.write_from_pipe). Returns the first error; the payload is
        consumed either way, so the connection stays in step."""
        with self.recording(offset, length):
            error: OSError | None = None
            try:
                self.image.pwrite(offset, head)  # before any await: head is borrowed
            except OSError as exc:
                error = exc
            return await source.receive(self.image.write_from_pipe, offset + len(head),
                                        length - len(head), error)

    def zero(self, offset: int, length: int, *, may_punch: bool = True,
             fast_only: bool = False) -> None:
        """WRITE_ZEROES: punched where allowed (not NO_HOLE), else zeroed in place.
        With ``fast_only`` (FAST_ZERO), fail with ENOTSUP rather than write zeros."""
        image = self.image
        with self.recording(offset, length):
            if may_punch and image.punch_hole(offset, length):
                return
            if image.zero_range(offset, length):
                return
            if fast_only:
                raise RequestError(errno.ENOTSUP, "zeroing this range would mean writing data")
            image.write_zeroes_slowly(offset, length)

    def trim(self, offset: int, length: int) -> None:
        """TRIM: a hint, but punching changes what reads return, hence the recording."""
        with self.recording(offset, length):
            self.image.punch_hole(offset, length)

    def flush(self) -> None:
        """Make every acknowledged write durable: bitmaps' journal first, then data."""
        if self.tracker is not None:
            self.tracker.make_durable()
        self.image.flush()

    # -- reads and block status ---------------------------------------------------------

    def read(self, offset: int, length: int, sparse: bool,
             nowait: bool = False) -> list[tuple[int, int, bytes | bytearray | None]] | None:
        """READ: data and (when sparse) hole pieces covering the range; with nowait,
        None unless every byte is in the page cache (see RawImage.read_pieces)."""
        return self.image.read_pieces(offset, length, sparse, nowait)

    def is_cached(self, offset: int, length: int) -> bool:
        return self.image.is_cached(offset, length)

    def data_runs(self, offset: int, length: int, sparse: bool) -> list[tuple[int, bool]] | None:
        """(length, is_data) runs of a READ sent with sendfile; None when the runs
        would not cover the range in one reply (too many extents)."""
        if not sparse:
            return [(length, True)]
        runs = list(self.image.allocation(offset, length, 1 << 16))
        return runs if sum(run for run, _ in runs) == length else None

    def send_to(self, sockfd: int, offset: int, count: int) -> int:
        """sendfile(2) part of a READ to a socket; how many bytes went."""
        return self.image.send_to(sockfd, offset, count)

    def cache(self, offset: int, length: int) -> None:
        """CACHE: a prefetch hint; failing to prefetch changes nothing."""
        try:
            self.image.readahead(offset, length)
        except OSError:
            pass

    def block_status(self, context: str, offset: int, length: int, limit: int) -> bytes:
        """One context's extents as BLOCK_STATUS descriptors, never past the request."""
        if context == c.BASE_ALLOCATION:
            return encode_words(self.image.allocation_words(
                offset, length, limit, 0, c.NBD_STATE_HOLE | c.NBD_STATE_ZERO))
        if context == c.QEMU_ALLOCATION_DEPTH:  # depth 1: in this (the only) layer
            return encode_words(self.image.allocation_words(offset, length, limit, 1, 0))
        if self.tracker is not None:
            lengths, first_dirty = self.tracker.dirty_runs(context, offset, length, limit)
            if first_dirty:
                return alternating_descriptors(lengths, c.NBD_STATE_DIRTY, 0)
            return alternating_descriptors(lengths, 0, c.NBD_STATE_DIRTY)
        raise RequestError(errno.EINVAL, f"no metadata context {context!r}")

    def describe(self) -> dict:
        """What status and the control socket report of this export."""
        return {
            "name": self.name,
            "image": self.image.path,
            "size": self.size,
            "read-only": self.read_only,
            "connections": self.connections,
            "bitmaps": self.tracker.query() if self.tracker is not None else [],
        }

    def hold(self, contexts: Iterable[str]) -> list[str]:
        """A connection starts exporting these contexts: its bitmaps become busy."""
        return self.tracker.hold(contexts) if self.tracker is not None else []

    def release(self, held: list[str]) -> None:
        if self.tracker is not None and held:
            self.tracker.release(held)

    def close(self) -> None:
        """After the final flush: persist the bitmaps (clean), then close the image."""
        try:
            if self.tracker is not None:
                self.tracker.close()
        finally:
            self.image.close()


class ExportCatalog:
    """The exports of one server, by name (what option haggling looks up)."""

    def __init__(self, exports: Sequence[Export] = ()) -> None:
        self._exports = {export.name: export for export in exports}

    def add(self, export: Export) -> None:
        self._exports[export.name] = export

    def remove(self, name: str) -> Export | None:
        return self._exports.pop(name, None)

    def find(self, name: str) -> Export | None:
        return self._exports.get(name)

    def listed(self) -> Sequence[Export]:
        return list(self._exports.values())

    def __iter__(self):
        return iter(self._exports.values())
