"""An export: one image shared by every connection that names it.

This is the layer between the transmission phase and the image. It has one verb per
operation (read, write, write_from_pipe, zero, trim, flush, cache, block_status), and
every verb that changes the image runs its change through ``_record``, so dirty bitmaps
are marked, and the old data that point-in-time snapshots still need is preserved, for
every WRITE, WRITE_ZEROES and TRIM before it lands and before the reply goes out. It
encodes each metadata context's extents as BLOCK_STATUS descriptors.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from nbdserve.config import ExportConfig
from nbdserve.errors import RequestError
from nbdserve.image import RawImage
from nbdserve.metrics import ExportStats
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import alternating_descriptors, encode_words

if TYPE_CHECKING:
    from nbdserve.bitmaps.watch import ImageWatch

log = logging.getLogger(__name__)

_ZEROS = bytes(32 << 20)  # the largest WRITE payload: zero detection is one memcmp


def _nothing() -> None:
    """A change that changes nothing (TRIM with discard=ignore)."""


class ChangeRecorder(Protocol):
    """Marks changes in the recording bitmaps (nbdserve.bitmaps.tracking.Recorder)."""

    epoch: int  # changes whenever bits may have been reset (clear, checkpoint, ...)

    def mark_dirty(self, offset: int, length: int) -> int:
        """Record a change; returns `epoch` as it was before the marking."""


class DirtyTracker(Protocol):
    """What the export needs from the bitmaps (nbdserve.bitmaps implements it)."""

    recorder: ChangeRecorder

    def make_durable(self) -> None: ...

    def contexts(self) -> Sequence[str]: ...

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        """Lengths of alternating runs from offset (at most limit), and whether the
        first is dirty. Raises OSError (EINVAL) for a context that went away."""

    def hold(self, contexts: Iterable[str]) -> list[str]: ...

    def release(self, names: Iterable[str]) -> None: ...

    def watch_image(self, image_fd: int) -> ImageWatch | None:
        """Keep the crash journal's record of the image's times (bitmaps/watch.py)."""

    def close(self) -> None: ...


class Preserver(Protocol):
    """Something that must see a region before it changes: a snapshot's copy-before-
    write (nbdserve.snapshots.cbw.Snapshot implements it)."""

    def preserve(self, offset: int, length: int) -> None:
        """Called before [offset, offset+length) of the image changes; raising stops
        the change (the request then fails with that error)."""


class Follower(Protocol):
    """Something told of each change once it has landed, or failed: a migration's
    tracker (nbdserve.migration.tracking), which must never miss one that a copy
    pass read too early."""

    def changed(self, offset: int, length: int) -> None: ...


class ChangeGate:
    """Gives a snapshot an instant at which no change to the image is half done.

    Every change enters the gate before its bitmaps are marked and leaves it after its
    data landed; ``paused`` closes the gate, waits for the changes under way and holds
    back new ones until the block ends. Entering must be cheap, as every write does
    it: under the GIL, list.append and list.pop are atomic, so a change counts itself
    with one append and then tests the flag (in that order: a pause that saw no change
    under way was seen by any change that counted itself later).
    """

    def __init__(self) -> None:
        self.active: list[None] = []  # one item per change under way
        self.closed = False
        self._reopened = threading.Condition()
        self._pausing = threading.Lock()  # one pause at a time

    def wait_open(self) -> None:
        """A change found the gate closed: uncount, wait for it to open, count again."""
        active = self.active
        while self.closed:
            active.pop()
            with self._reopened:
                while self.closed:
                    self._reopened.wait()
            active.append(None)

    @contextlib.contextmanager
    def paused(self, timeout: float = 30.0) -> Iterator[None]:
        """Hold back every change for the block. Never from the event loop's thread:
        a change it makes would wait for this pause, and this pause for the loop."""
        with self._pausing:
            self.closed = True
            try:
                deadline = time.monotonic() + timeout
                while self.active:  # changes are short: polling costs nothing per write
                    if time.monotonic() > deadline:
                        raise OSError(errno.ETIMEDOUT, "changes to the image did not finish "
                                      f"within {timeout:g} s")
                    time.sleep(0.0002)
                yield
            finally:
                with self._reopened:
                    self.closed = False
                    self._reopened.notify_all()


class Export:
    parent: Export | None = None  # the export a snapshot export was taken of
    discard_only = False  # a snapshot export: reads, and TRIM to release what was read

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
        self.recorder = tracker.recorder if tracker is not None else None
        # READ is read planning, which is the image's: bound here, so the per-request
        # call costs nothing more for going through the export.
        self.read = image.read_pieces
        self.connections = 0
        self.stats = ExportStats()
        self.gate = ChangeGate()
        # What a crash leaves of the image's identity: the watch's at_rest turns False
        # at the first change after a rest (one attribute test per change).
        self.watch = tracker.watch_image(image.fd) if tracker is not None else None
        if self.watch is not None:
            self.watch.under_way = self.gate.active
        # Snapshots taken of this export (nbdserve.snapshots): a tuple, replaced whole,
        # so _record reads it without a lock.
        self.preservers: tuple[Preserver, ...] = ()
        # Told of every change after it landed (or failed): a migration's tracker
        # (nbdserve.migration). A tuple, replaced whole, like preservers.
        self.followers: tuple[Follower, ...] = ()
        self.migrating = False  # a migration copies this export (no snapshots meanwhile)
        self.moved_from: RawImage | None = None  # after a migration: the stale image
        self.scratch_dir = config.scratch_dir
        self.fail_write_on_cbw_error = config.on_cbw_error == "fail-write"
        self.discard = config.discard != "ignore"  # TRIM punches (or changes nothing)
        # Zero WRITEs become WRITE_ZEROES: None (off), or whether they may punch.
        self.detect_zeroes = None if config.detect_zeroes == "off" else \
            config.detect_zeroes == "unmap"

    # -- negotiation ------------------------------------------------------------------

    def meta_contexts(self) -> Sequence[str]:
        names = [c.BASE_ALLOCATION, c.QEMU_ALLOCATION_DEPTH]
        if self.tracker is not None:
            names.extend(self.tracker.contexts())
        return names

    # -- changes: one verb per operation, each recorded by _record ---------------------

    def _record(self, offset: int, length: int, change: Callable, *args):
        """The one place where a change to [offset, offset+length) of the image is
        recorded: every verb below runs its change through here.

        The bitmaps are marked before the image changes, so a crash between the two
        can only over-report; a failed change stays marked (over-reporting is always
        safe). If bitmaps were reset meanwhile (a clear or a checkpoint racing with
        this change), the change is marked again in the new epoch; without that, the
        new bitmap could miss a write that landed after it was made. Then every
        snapshot preserves the old data it still needs (copy-before-write), and only
        then does the change land. The gate lets a snapshot be taken between changes,
        never during one. The first change after a rest also tells the crash journal's
        watch (bitmaps/watch.py), before the image's times move. Followers (a
        migration) hear of the change after it landed. A change held at a closed gate
        while the export moved (a migration's switchover) is made on the new image.
        """
        gate = self.gate
        active = gate.active
        active.append(None)
        try:
            if gate.closed:
                gate.wait_open()
                change = self._rebind(change)
            recorder = self.recorder
            epoch = recorder.mark_dirty(offset, length) if recorder is not None else 0
            watch = self.watch
            if watch is not None and watch.at_rest:
                watch.unsettle()  # before the image's times move
            # (Each tuple is read once, and tested before it is walked: most exports
            # have neither, and iterating an empty tuple still makes an iterator.)
            preservers = self.preservers
            try:
                if preservers:
                    for preserver in preservers:
                        preserver.preserve(offset, length)
                return change(*args)
            finally:
                if recorder is not None and recorder.epoch != epoch:
                    recorder.mark_dirty(offset, length)
                followers = self.followers
                if followers:
                    for follower in followers:
                        follower.changed(offset, length)
        finally:
            active.pop()

    def _rebind(self, change: Callable) -> Callable:
        """A change bound to an image this export no longer uses: the same verb of the
        one it uses now (after a migration, the target)."""
        owner = getattr(change, "__self__", None)
        if owner is None or owner is self or owner is self.image:
            return change
        return getattr(self.image, change.__name__)

    def move_to(self, image, tracker: DirtyTracker) -> None:
        """A migration's switchover (under a closed gate): from now on the verbs act
        on the target, through ``image`` and ``tracker``; the local image stays open
        for reads under way and is closed with the export."""
        self.moved_from = self.image
        self.watch = None
        self.recorder = None
        self.followers = ()
        self.tracker = tracker
        self.image = image
        self.read = image.read_pieces
        self.detect_zeroes = None  # the target applies its own settings

    def write(self, offset: int, length: int,
              payload: Sequence[bytes | bytearray | memoryview]) -> None:
        """WRITE: the payload's buffers (length bytes in all), back to back, at offset.
        With detect-zeroes, a payload of zeros is zeroed instead (QEMU's
        detect-zeroes): no data written, and a hole where it may punch."""
        if self.detect_zeroes is not None and all(map(_ZEROS.startswith, payload)):
            self.zero(offset, length, may_punch=self.detect_zeroes)
            return
        if len(payload) == 1:  # most WRITEs: one buffer, one call less
            self._record(offset, length, self.image.pwrite, offset, payload[0])
            return
        self._record(offset, length, self.image.pwritev, offset, payload)

    def write_from_pipe(self, pipe_fd: int, offset: int,
                        count: int) -> tuple[int, OSError | None]:
        """Part of a WRITE whose payload is spliced from the socket (server/splice.py):
        count bytes waiting in a pipe go to offset. Each part is recorded before its
        data lands, so the parts together record the whole write. Returns the bytes
        moved and the error that stopped it, if any (RawImage.write_from_pipe)."""
        try:
            return self._record(offset, count, self.image.write_from_pipe, pipe_fd, offset,
                                count)
        except OSError as exc:
            # The image returns its errors, so this is the marking (the crash journal
            # cannot grow): nothing moved, and the splicer must hear it as a result.
            return 0, exc

    def zero(self, offset: int, length: int, *, may_punch: bool = True,
             fast_only: bool = False) -> None:
        """WRITE_ZEROES: punched where allowed (not NO_HOLE), else zeroed in place.
        With ``fast_only`` (FAST_ZERO), fail with ENOTSUP rather than write zeros."""
        self._record(offset, length, self._zero, offset, length, may_punch, fast_only)

    def _zero(self, offset: int, length: int, may_punch: bool, fast_only: bool) -> None:
        image = self.image
        if may_punch and image.punch_hole(offset, length):
            return
        if image.zero_range(offset, length):
            return
        if fast_only:
            raise RequestError(errno.ENOTSUP, "zeroing this range would mean writing data")
        image.write_zeroes_slowly(offset, length)

    def trim(self, offset: int, length: int) -> None:
        """TRIM: a hint, but punching changes what reads return, hence the recording.
        With discard=ignore the data stays, and the bitmaps still record the range
        (over-reporting is safe, and a client may rely on either answer)."""
        if not self.discard:
            self._record(offset, length, _nothing)
            return
        self._record(offset, length, self.image.punch_hole, offset, length)

    def flush(self) -> None:
        """Make every acknowledged write durable: bitmaps' journal first, then data."""
        if self.tracker is not None:
            self.tracker.make_durable()
        self.image.flush()

    # -- reads and block status ---------------------------------------------------------

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

    def block_status(self, context: str, offset: int, length: int, limit: int,
                     typecode: str = "I") -> bytes:
        """One context's extents as BLOCK_STATUS descriptors, never past the request:
        32-bit words, or with typecode "Q" BLOCK_STATUS_EXT's 64-bit ones."""
        if context == c.BASE_ALLOCATION:
            return encode_words(self.allocation_words(
                offset, length, limit, 0, c.NBD_STATE_HOLE | c.NBD_STATE_ZERO, typecode))
        if context == c.QEMU_ALLOCATION_DEPTH:  # depth 1: in this (the only) layer
            return encode_words(self.allocation_words(offset, length, limit, 1, 0, typecode))
        lengths, first_dirty = self.dirty_runs(context, offset, length, limit)
        if first_dirty:
            return alternating_descriptors(lengths, c.NBD_STATE_DIRTY, 0, typecode)
        return alternating_descriptors(lengths, 0, c.NBD_STATE_DIRTY, typecode)

    def allocation_words(self, offset: int, length: int, limit: int, data: int, hole: int,
                         typecode: str) -> array:
        return self.image.allocation_words(offset, length, limit, data, hole, typecode)

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        """A dirty bitmap's alternating clean and dirty runs (DirtyTracker.dirty_runs)."""
        if self.tracker is None:
            raise RequestError(errno.EINVAL, f"no metadata context {context!r}")
        return self.tracker.dirty_runs(context, offset, length, limit)

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
            if self.moved_from is not None:
                self.moved_from.close()


class ExportCatalog:
    """The exports of one server, by name (what option haggling looks up)."""

    def __init__(self, exports: Sequence[Export] = ()) -> None:
        self._exports = {export.name: export for export in exports}
        self._absent: dict[str, str] = {}  # names not served now, and why
        self.generation = 0  # counts the changes of what is served (protocol/replay.py)

    def add(self, export: Export) -> None:
        self._exports[export.name] = export
        self._absent.pop(export.name, None)
        self.generation += 1

    def mark_absent(self, name: str, reason: str) -> None:
        """A name clients may ask for that is not served now (an export waiting for
        a migration, or moved away): negotiation tells them why."""
        self._absent[name] = reason
        self.generation += 1

    def absence(self, name: str) -> str:
        return self._absent.get(name, "")

    def remove(self, name: str) -> Export | None:
        self.generation += 1
        return self._exports.pop(name, None)

    def find(self, name: str) -> Export | None:
        return self._exports.get(name)

    def listed(self) -> Sequence[Export]:
        return list(self._exports.values())

    def __iter__(self):
        return iter(self._exports.values())
