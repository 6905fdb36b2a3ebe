"""What changed while a migration copies: the export's recording path tells this
tracker of every change once it has landed (or failed; it is one of the export's
followers), so a pass that read a region before a change landed there finds it
marked in the next pass. (Marked before landing, a change taken by the current pass
and landing after its read would be lost.)

Two bitmaps, one marking: ``dirty`` is what the next pass copies (taken whole, and
replaced by a clean one, at the start of each pass); ``since_bitmaps`` is where the
dirty bitmaps may have gained bits since they were sent, which is all the pause has
to send of them. A lock makes taking and marking exclusive, so no mark falls between
the copy that is taken and the clean one that replaces it.
"""

from __future__ import annotations

import threading

from nbdserve.bitmaps.bitmap import Bitmap

MIN_GRANULARITY_BITS = 12  # 4 KiB: a 4 KiB write costs 4 KiB again, not 64 KiB
MAX_BITS = 1 << 26  # 8 MiB per bitmap: coarser granules only above 256 GiB


def tracker_granularity_bits(size: int) -> int:
    """The finest granularity whose bitmap stays within MAX_BITS bits. (A writer of
    random 4 KiB blocks at 20 MB/s dirties 320 MB/s in 64 KiB granules: more than a
    copy can send, so a migration would never converge.)"""
    bits = MIN_GRANULARITY_BITS
    while size >> bits > MAX_BITS:
        bits += 1
    return bits


class MigrationTracker:
    def __init__(self, size: int, granularity_bits: int | None = None) -> None:
        if granularity_bits is None:
            granularity_bits = tracker_granularity_bits(size)
        self.size = size
        self.granularity_bits = granularity_bits
        self.lock = threading.Lock()
        self.dirty = Bitmap(size, granularity_bits)
        self.since_bitmaps = Bitmap(size, granularity_bits)

    def changed(self, offset: int, length: int) -> None:
        """The export's recording path: [offset, offset+length) has changed."""
        with self.lock:
            self.dirty.set(offset, length)
            self.since_bitmaps.set(offset, length)

    def take(self) -> Bitmap:
        """What changed since the last take; marking goes on in a clean bitmap."""
        fresh = Bitmap(self.size, self.granularity_bits)
        with self.lock:
            taken, self.dirty = self.dirty, fresh
        return taken

    def bitmaps_sent(self) -> None:
        """The dirty bitmaps were sent just after this: track their changes anew."""
        fresh = Bitmap(self.size, self.granularity_bits)
        with self.lock:
            self.since_bitmaps = fresh

    def dirty_bytes(self) -> int:
        with self.lock:
            return self.dirty.count_bytes()
