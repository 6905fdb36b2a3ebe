"""One point-in-time snapshot of a live image: copy-before-write and the frozen view.

A snapshot is a view of the image as it was at the instant it was taken. The live
image keeps changing; before a change lands on a region the snapshot still needs, the
old data is copied into the snapshot's scratch file (``preserve``, called from
``Export._record``). The snapshot reads preserved regions from the scratch file and
the rest from the live image, which has not changed there since the instant.

Per granule, two bits:

- ``held``: the snapshot serves this granule (all of them for a full snapshot; the
  granules dirty in the checkpoint's bitmap for an incremental one; cleared by TRIM on
  the snapshot export, which says "backed up, no longer needed").
- ``pending``: held, and not yet copied: still read from the live image.

So a held granule is read from the live image while pending and from the scratch file
once preserved; a granule not held cannot be read (EPERM), as QEMU's snapshot-access
node refuses it. The scratch file has the image's size and the same offsets, and is
sparse: holes of the live image stay holes, so preserving them costs nothing.

Concurrency without a lock on the read path: a writer copies the old data, then
clears ``pending``, and only then changes the live image. A reader plans a read from
the bits, reads, then checks that every granule it read from the live image is still
pending (and the snapshot not broken): if so, the live data it read was the old data.
If not, it plans again (and, after a few tries, reads under the lock, which holds off
the writers that would need to copy). Copies happen under the lock, so two writers
never copy the same granule, and a write that needs no copy (the common case once a
region was copied) takes no lock at all.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from array import array

from bitarray import bitarray
from bitarray.util import intervals

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.errors import RequestError
from nbdserve.image import RawImage

log = logging.getLogger("nbdserve.snapshots")

COPY_CHUNK = 1 << 20  # bytes copied per read/write pair when preserving
_ZEROS = bytes(COPY_CHUNK)
OPTIMISTIC_TRIES = 3  # lock-free read attempts before a read takes the lock

# Where a segment of a read comes from.
UNHELD, LIVE, SCRATCH = "unheld", "live", "scratch"


class Snapshot:
    def __init__(self, name: str, image: RawImage, scratch: RawImage, granularity_bits: int,
                 held: bitarray, *, bitmap: str | None = None,
                 dirty: Bitmap | None = None, fail_write: bool = False) -> None:
        self.name = name
        self.image = image
        self.scratch = scratch
        self.size = image.size
        self.shift = granularity_bits
        self.held = held
        self.pending = held.copy()
        self.bitmap = bitmap  # the checkpoint's frozen bitmap, when there is one
        self.dirty = dirty  # its bits as of the instant (qemu:dirty-bitmap:BITMAP)
        self.fail_write = fail_write
        self.lock = threading.Lock()
        self.broken = ""  # why, once a copy failed under the break-snapshot policy
        self.closed = False
        self.preserved_bytes = 0  # bytes of the image copied to the scratch file
        self.created = time.time()

    @property
    def granularity(self) -> int:
        return 1 << self.shift

    def _granules(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self.shift, ((offset + length - 1) >> self.shift) + 1

    # -- copy-before-write: the live export's side ----------------------------------------

    def preserve(self, offset: int, length: int) -> None:
        """Before [offset, offset+length) of the live image changes: copy what the
        snapshot still needs of it. A failed copy breaks the snapshot (the change goes
        ahead), or, under the fail-write policy, raises (the change fails)."""
        if not length:
            return
        shift = self.shift
        first, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        pending = self.pending
        if pending.find(1, first, stop) < 0:
            return  # nothing needed here: no lock, no copy
        with self.lock:
            if self.closed or self.broken:
                return
            try:
                if stop - first == 1:
                    if pending[first]:
                        self._copy(first, stop)
                else:
                    for value, start, end in intervals(pending[first:stop]):
                        if value:
                            self._copy(first + start, first + end)
            except OSError as exc:
                reason = f"copy-before-write failed: {exc.strerror or exc}"
                if self.fail_write:
                    log.error("snapshot %r: %s; failing the write to the live image "
                              "(on-cbw-error=fail-write), the snapshot stays valid",
                              self.name, reason)
                    raise OSError(exc.errno or errno.EIO, reason) from None
                self.broken = reason
                log.error("snapshot %r: %s; the snapshot is broken (its reads fail "
                          "with EIO), the live write goes ahead "
                          "(on-cbw-error=break-snapshot)", self.name, reason)

    def _copy(self, first: int, stop: int) -> None:
        """Copy granules [first, stop) from the live image to the scratch file, then
        mark them preserved (under the lock). Zeros are not written: the scratch file
        stays sparse there, and reads as zeros all the same."""
        shift = self.shift
        position = first << shift
        end = min(stop << shift, self.size)
        image, scratch = self.image, self.scratch
        while position < end:
            step = min(end - position, COPY_CHUNK)
            data = image.pread(position, step)
            if not _ZEROS.startswith(data):  # memcmp: cheaper than asking for holes
                scratch.pwrite(position, data)
            position += step
            self.preserved_bytes += step
            done = position >> shift if position < end else stop
            self.pending[first:done] = 0  # after the data: readers may use it now
            first = done

    # -- TRIM on the snapshot export: released ---------------------------------------------

    def discard(self, offset: int, length: int) -> None:
        """The client is done with [offset, offset+length) (QEMU's fleecing discard):
        whole granules inside it are no longer held or preserved, and their scratch
        space is freed."""
        granularity = self.granularity
        first = (offset + granularity - 1) >> self.shift
        end = offset + length
        stop = len(self.held) if end >= self.size else end >> self.shift
        if first >= stop:
            return
        with self.lock:
            self.held[first:stop] = 0
            self.pending[first:stop] = 0
            if not self.closed:
                start = first << self.shift
                self.scratch.punch_hole(start, min(stop << self.shift, self.size) - start)

    # -- the frozen view -------------------------------------------------------------------

    def _plan(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        """(start, end, source) byte segments covering [offset, offset+length)."""
        shift = self.shift
        first, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        pending = self.pending
        count = stop - first
        still = pending.count(1, first, stop)
        if still == count:
            return [(offset, offset + length, LIVE)]
        if not still and not self.held.count(0, first, stop):
            return [(offset, offset + length, SCRATCH)]
        segments = []
        held = self.held[first:stop]
        for is_pending, start, end in intervals(pending[first:stop]):
            if is_pending:
                segments.append((start, end, LIVE))
                continue
            for is_held, held_start, held_end in intervals(held[start:end]):
                segments.append((start + held_start, start + held_end,
                                 SCRATCH if is_held else UNHELD))
        end_offset = offset + length
        return [(max(offset, (first + a) << shift), min(end_offset, (first + b) << shift), kind)
                for a, b, kind in segments]

    def _still_valid(self, plan: list[tuple[int, int, str]]) -> bool:
        """After reading: was every live segment's data still the old data?"""
        if self.broken:
            return False
        pending, shift = self.pending, self.shift
        for start, end, source in plan:
            if source == LIVE:
                first, stop = start >> shift, ((end - 1) >> shift) + 1
                if pending.count(1, first, stop) != stop - first:
                    return False
        return True

    def _check_usable(self, plan: list[tuple[int, int, str]] = ()) -> None:
        if self.broken:
            raise OSError(errno.EIO, f"snapshot {self.name!r} is broken ({self.broken})")
        if self.closed:
            raise RequestError(errno.ESHUTDOWN, f"snapshot {self.name!r} was removed")
        for start, end, source in plan:
            if source == UNHELD:
                raise RequestError(
                    errno.EPERM, f"[{start}, {end}) is not held by snapshot {self.name!r} "
                    "(outside its bitmap, or released by TRIM)")

    def _consistently(self, offset: int, length: int, read, nowait: bool,
                      unheld_ok: bool = False):
        """Run read(plan) until its live data is known to be old; None when nowait
        would have to wait (for the lock). Unheld granules are refused (EPERM)
        unless unheld_ok."""
        def plan_for() -> list[tuple[int, int, str]]:
            self._check_usable()
            plan = self._plan(offset, length)
            if not unheld_ok:
                self._check_usable(plan)
            return plan

        for _ in range(OPTIMISTIC_TRIES):
            plan = plan_for()
            result = read(plan)
            if result is None or self._still_valid(plan):
                if result is not None:
                    self._check_usable()
                return result
        if nowait:
            return None  # busy with copies: a worker thread takes the lock
        with self.lock:  # no copy (so no live change of a pending granule) meanwhile
            return read(plan_for())

    def read_pieces(self, offset: int, length: int, sparse: bool,
                    nowait: bool = False) -> list[tuple[int, int, bytes | bytearray | None]] | None:
        """What RawImage.read_pieces gives, for the image as it was at the instant."""
        # The common cases first, without a plan: all from the live image (checked
        # again after reading), or all from the scratch file (preserved data never
        # changes). Anything else, or a race, goes the general way.
        shift = self.shift
        first, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        pending = self.pending
        if not self.broken and not self.closed:
            still = pending.count(1, first, stop)
            if still == stop - first:
                pieces = self.image.read_pieces(offset, length, sparse, nowait)
                if pieces is None or (pending.count(1, first, stop) == still
                                      and not self.broken):
                    return pieces
            elif not still and not self.held.count(0, first, stop):
                return self.scratch.read_pieces(offset, length, sparse, nowait)
        def read(plan):
            pieces = []
            for start, end, source in plan:
                image = self.image if source == LIVE else self.scratch
                part = image.read_pieces(start, end - start, sparse, nowait)
                if part is None:
                    return None
                pieces += part
            if not sparse and len(pieces) > 1:  # one piece, as RawImage gives it
                return [(offset, length, b"".join(piece[2] for piece in pieces))]
            return pieces
        return self._consistently(offset, length, read, nowait)

    # -- sendfile(2): only of preserved data ----------------------------------------------
    #
    # sendfile(2) does not copy: the socket's buffer refers to the file's pages until the
    # client has read them. A page of the live image may be preserved and overwritten in
    # that time, and the client would get the new data. Preserved data never changes,
    # so ranges held entirely in the scratch file may go out with sendfile; the rest is
    # read (copied) first.

    def data_runs(self, offset: int, length: int,
                  sparse: bool) -> list[tuple[int, bool]] | None:
        """(length, is_data) runs of a range to send from the scratch file, or None
        when it is not all there (the read path then copies it)."""
        shift = self.shift
        first, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        if self.broken or self.closed or self.pending.count(1, first, stop) or \
                self.held.count(0, first, stop):
            return None
        if not sparse:
            return [(length, True)]
        runs = list(self.scratch.allocation(offset, length, 1 << 16))
        return runs if sum(run for run, _ in runs) == length else None

    def send_to(self, sockfd: int, offset: int, count: int) -> int:
        return self.scratch.send_to(sockfd, offset, count)

    def is_cached(self, offset: int, length: int) -> bool:
        """Whether a sendfile reply may be tried: all preserved, and cached."""
        return self.data_runs(offset, length, False) is not None and \
            self.scratch.is_cached(offset, length)

    def allocation_words(self, offset: int, length: int, limit: int, data: int,
                         hole: int, typecode: str = "I") -> array:
        """base:allocation as of the instant, as RawImage.allocation_words gives it.
        Granules the snapshot does not hold are reported as data (safe)."""
        def read(plan):
            words = array(typecode)
            for start, end, source in plan:
                if len(words) >= 2 * limit:
                    break
                if source == UNHELD:
                    words.extend((end - start, data))
                    continue
                image = self.image if source == LIVE else self.scratch
                words.extend(image.allocation_words(start, end - start,
                                                    limit - len(words) // 2, data, hole,
                                                    typecode))
            return words
        words = self._consistently(offset, length, read, nowait=False, unheld_ok=True)
        del words[2 * limit:]
        return words

    # -- the snapshot as a whole -------------------------------------------------------------

    def scratch_bytes(self) -> int:
        """Bytes the scratch file takes on disk."""
        if self.closed:
            return 0
        try:
            return os.fstat(self.scratch.fd).st_blocks * 512
        except OSError:
            return 0

    def describe(self) -> dict:
        return {
            "name": self.name,
            "bitmap": self.bitmap,
            "granularity": self.granularity,
            "held-bytes": min(self.held.count(1) << self.shift, self.size),
            "pending-bytes": min(self.pending.count(1) << self.shift, self.size),
            "preserved-bytes": self.preserved_bytes,
            "scratch-bytes": self.scratch_bytes(),
            "scratch-file": self.scratch.path,
            "broken": self.broken or None,
            "on-cbw-error": "fail-write" if self.fail_write else "break-snapshot",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }

    def close(self) -> None:
        """Stop preserving and delete the scratch file (after the export went away)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.pending.setall(0)
            try:
                os.unlink(self.scratch.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("snapshot %r: cannot delete its scratch file %s: %s",
                            self.name, self.scratch.path, exc.strerror)
            self.scratch.close()
