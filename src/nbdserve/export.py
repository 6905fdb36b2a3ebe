"""An export: one image shared by every connection that names it.

This is the layer between the transmission phase and the image. It owns the one entry
point through which every change reaches the image (``change``), so that dirty bitmaps
are marked for every WRITE, WRITE_ZEROES and TRIM before the reply goes out, and it
answers block-status queries for each metadata context the export offers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from nbdserve.image import RawImage
from nbdserve.metrics import ExportStats
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import encode_words

log = logging.getLogger(__name__)


class DirtyTracker(Protocol):
    """What the export needs from the bitmaps (nbdserve.bitmaps implements it)."""

    epoch: int  # changes whenever bits may have been reset (clear, checkpoint, ...)

    def mark_dirty(self, offset: int, length: int) -> int:
        """Record a change; returns `epoch` as it was before the marking."""

    def make_durable(self) -> None: ...

    def contexts(self) -> Sequence[str]: ...

    def encoded_extents(self, name: str, offset: int, length: int, limit: int) -> bytes: ...

    def hold(self, contexts: Iterable[str]) -> list[str]: ...

    def release(self, names: Iterable[str]) -> None: ...

    def close(self) -> None: ...


class FastZeroUnsupported(OSError):
    """FAST_ZERO asked for a zeroing that would have to write data (spec: ENOTSUP)."""


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    image_path: str
    description: str = ""
    read_only: bool = False
    max_connections: int = 0  # 0 = unlimited
    tls_required: bool = False  # with --tls optional: only over TLS


class Export:
    def __init__(self, config: ExportConfig, image: RawImage,
                 tracker: DirtyTracker | None = None) -> None:
        self.config = config
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

    # -- the single write entry point -------------------------------------------------

    def change(self, command: int, offset: int, length: int, flags: int = 0,
               payload: Sequence[bytes | bytearray | memoryview] = ()) -> None:
        """Apply WRITE, WRITE_ZEROES or TRIM; the bitmaps learn of it first.

        A WRITE's payload comes as buffers to be written back to back. Marking comes
        before the data moves so that a crash between the two can only over-report. A
        failed request still marks: over-reporting is always safe.
        """
        tracker = self.tracker
        epoch = self.mark(offset, length)
        image = self.image
        try:
            if command == c.NBD_CMD_WRITE:
                image.pwritev(offset, payload)
            elif command == c.NBD_CMD_WRITE_ZEROES:
                self._write_zeroes(offset, length, flags)
            elif command == c.NBD_CMD_TRIM:
                # A hint; punching changes what reads return, hence the mark above.
                image.punch_hole(offset, length)
            else:
                raise ValueError(f"command {command} does not change the image")
        finally:
            if tracker is not None and tracker.epoch != epoch:  # confirm(), inlined
                self.confirm(epoch, offset, length)

    async def write_streamed(self, offset: int, length: int, head: memoryview,
                             receive: Callable[[int, int, int, OSError | None],
                                               Awaitable[OSError | None]]) -> OSError | None:
        """A WRITE whose payload is mostly still on its way (server/splice.py): marked
        as change() marks, head (the part already received) written at once, then
        receive(fd, offset, length, error) moves the rest straight into the image.
        Returns the first error; the payload is consumed either way."""
        epoch = self.mark(offset, length)
        try:
            error: OSError | None = None
            try:
                self.image.pwrite(offset, head)  # before any await: head is borrowed
            except OSError as exc:
                error = exc
            return await receive(self.image.fd, offset + len(head), length - len(head),
                                 error)
        finally:
            self.confirm(epoch, offset, length)

    def mark(self, offset: int, length: int) -> int:
        """The one place where changes are recorded in the bitmaps. Both ways a write
        reaches the image (change() and write_streamed()) call it before the image
        changes, then confirm() once the data is written. Returns what confirm() needs."""
        tracker = self.tracker
        return tracker.mark_dirty(offset, length) if tracker is not None else 0

    def confirm(self, epoch: int, offset: int, length: int) -> None:
        """After the data moved: if bitmaps were reset meanwhile (a clear or a
        checkpoint racing with this write), record the write again, in the new
        epoch. Without this the new bitmap could miss a write that landed after it."""
        tracker = self.tracker
        if tracker is not None and tracker.epoch != epoch and length:
            tracker.mark_dirty(offset, length)

    def _write_zeroes(self, offset: int, length: int, flags: int) -> None:
        image = self.image
        if not flags & c.NBD_CMD_FLAG_NO_HOLE and image.punch_hole(offset, length):
            return
        if image.zero_range(offset, length):
            return
        if flags & c.NBD_CMD_FLAG_FAST_ZERO:
            raise FastZeroUnsupported(95, "zeroing this range would mean writing data")
        image.write_zeroes_slowly(offset, length)

    def flush(self) -> None:
        """Make every acknowledged write durable: bitmaps' journal first, then data."""
        if self.tracker is not None:
            self.tracker.make_durable()
        self.image.flush()

    # -- reads and block status ---------------------------------------------------------

    def block_status(self, context: str, offset: int, length: int, limit: int) -> bytes:
        """One context's extents as BLOCK_STATUS descriptors, never past the request."""
        if context == c.BASE_ALLOCATION:
            return encode_words(self.image.allocation_words(
                offset, length, limit, 0, c.NBD_STATE_HOLE | c.NBD_STATE_ZERO))
        if context == c.QEMU_ALLOCATION_DEPTH:  # depth 1: in this (the only) layer
            return encode_words(self.image.allocation_words(offset, length, limit, 1, 0))
        if self.tracker is not None:
            return self.tracker.encoded_extents(context, offset, length, limit)
        raise KeyError(context)

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
