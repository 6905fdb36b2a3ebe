"""Marking writes in the recording bitmaps: the per-write hot path of the bitmaps.

``Recorder.mark_dirty`` sets the granules a change touches in every recording bitmap,
and writes a crash-journal record for granules that go from clean to dirty before any
bit is set (and before the caller writes data), so a process killed at any point never
loses an acknowledged write (dm-era's rule).

Recording bitmaps are grouped by granularity, each group with a summary bitmap whose
granule is set where every member is already dirty (a group of one is its own summary).
The common write, to granules already dirty, costs one summary test per granularity
however many bitmaps there are, and takes no lock. Setting bits in a member never
falsifies a summary; anything that resets bits (clear, add, enable, checkpoint) calls
``refresh``, which bumps ``epoch``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.journal import Journal, encode_group_record
from nbdserve.bitmaps.policy import DirtyBitmap


class Recorder:
    def __init__(self, journal: Journal, lock: threading.RLock) -> None:
        self.journal = journal
        self.lock = lock  # the store's: operations and marking exclude each other
        self.groups: list[tuple[int, list[DirtyBitmap], Bitmap]] = []
        self.epoch = 0  # bumped whenever bits may have been reset (see mark_dirty)

    def refresh(self, bitmaps: Iterable[DirtyBitmap]) -> None:
        """Rebuild the recording groups and their summaries; called (under the lock)
        after anything that changes which bitmaps record or resets bits."""
        groups: dict[int, list[DirtyBitmap]] = {}
        for bitmap in bitmaps:
            if bitmap.recording and not bitmap.inconsistent:
                groups.setdefault(bitmap.granularity_bits, []).append(bitmap)
        rebuilt = []
        for shift, members in groups.items():
            if len(members) == 1:
                # One member is its own summary: no copy, so one recording bitmap costs
                # its bits once (issue 11: a resident bitmap cost twice its size).
                summary = members[0].bitmap
            else:
                summary = members[0].bitmap.copy()
                for other in members[1:]:
                    summary.intersect(other.bitmap)
            rebuilt.append((shift, members, summary))
        self.groups = rebuilt  # one assignment: mark_dirty reads it without the lock
        self.epoch += 1

    def mark_dirty(self, offset: int, length: int) -> int:
        """Mark [offset, offset+length) in every recording bitmap; returns `epoch` as
        it was before marking.

        Racing with a clear or a checkpoint (which reset bits, then bump `epoch`) is
        the caller's to settle: it marks again if the epoch changed by the time its
        data is written (Export._record).
        """
        epoch = self.epoch
        if not length:
            return epoch
        for _shift, _members, summary in self.groups:
            if not summary.is_set(offset, length):
                break  # something to record: do it all under the lock
        else:
            return epoch
        with self.lock:
            journal = self.journal
            for shift, members, summary in self.groups:
                if summary.is_set(offset, length):
                    continue  # already dirty in every member: nothing to do
                if journal.fd >= 0:  # one record for the group, before any bit is set
                    first, stop = summary.granules(offset, length)
                    journal.append(encode_group_record(shift, first, stop - first))
                for bitmap in members:
                    bitmap.bitmap.set(offset, length)
                summary.set(offset, length)
        return epoch
