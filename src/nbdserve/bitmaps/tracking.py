"""Marking writes in the recording bitmaps: the per-write hot path of the bitmaps.

``Recorder.mark_dirty`` sets the granules a change touches in every recording bitmap,
and writes a crash-journal record for granules that go from clean to dirty before any
bit is set (and before the caller writes data), so a process killed at any point never
loses an acknowledged write (dm-era's rule).

Recording bitmaps are grouped by granularity. A group of one is its own summary. A
group of several has a coarse summary, 64 granules to a bit, set where every member is
dirty over all 64 (Bitmap.summary_of): it costs 1/64 of a member, so each bitmap costs
its bits about once in memory (issue 11: an exact summary was a whole extra bitmap).
A write to granules already dirty costs one summary test per granularity once the
bitmaps are dirty in whole groups of 64, else one test per member; it takes no lock
either way. Setting bits in a member never falsifies a summary; anything that resets
bits (clear, add, enable, checkpoint) calls ``refresh``, which bumps ``epoch``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from bitarray import bitarray

from nbdserve.bitmaps.bitmap import Bitmap, all_set, update_summary_bits
from nbdserve.bitmaps.journal import Journal, encode_group_record
from nbdserve.bitmaps.policy import DirtyBitmap

SUMMARY_SHIFT = 6  # a coarse summary bit covers 64 granules


class Recorder:
    def __init__(self, journal: Journal, lock: threading.RLock) -> None:
        self.journal = journal
        self.lock = lock  # the store's: operations and marking exclude each other
        # One tuple per recording group (one granularity), read by mark_dirty without
        # the lock, so the bits themselves (a call per look would cost more than the
        # look): the summary's bits and granularity, the members' granularity and
        # bits, and whether the summary is a coarse one of several members (else it
        # is the one member's own bits).
        self.groups: list[tuple[bitarray, int, int, list[bitarray], bool]] = []
        # With one group (every recording bitmap of one granularity, the usual case):
        # its summary's bits and granularity, for mark_dirty's first look.
        self.only: tuple[bitarray, int] | None = None
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
            bitmaps = [member.bitmap for member in members]
            # One member is its own (exact) summary; several share a coarse one.
            coarse = len(bitmaps) > 1
            summary = Bitmap.summary_of(bitmaps, SUMMARY_SHIFT) if coarse else bitmaps[0]
            rebuilt.append((summary.bits, summary.granularity_bits, shift,
                            [bitmap.bits for bitmap in bitmaps], coarse))
        self.groups = rebuilt  # one assignment: mark_dirty reads it without the lock
        self.only = rebuilt[0][:2] if len(rebuilt) == 1 else None
        self.epoch += 1

    def mark_dirty(self, offset: int, length: int) -> int:
        """Mark [offset, offset+length) in every recording bitmap; returns `epoch` as
        it was before marking.

        Racing with a clear or a checkpoint (which reset bits, then bump `epoch`) is
        the caller's to settle: it marks again if the epoch changed by the time its
        data is written (Export._record).
        """
        epoch = self.epoch
        only = self.only
        if only is not None:  # one granularity: a write within one summary bit, set
            summary, summary_shift = only
            first = offset >> summary_shift
            if first == (offset + length - 1) >> summary_shift and summary[first]:
                return epoch
        if not length:
            return epoch
        # Most writes land where every bitmap is dirty already: that look is made
        # here, without a call per group (this runs for every write).
        last = offset + length - 1
        for summary, summary_shift, shift, members, coarse in self.groups:
            first = offset >> summary_shift
            if first == last >> summary_shift:
                if summary[first]:
                    continue
            elif not summary.count(0, first, (last >> summary_shift) + 1):
                continue
            # The coarse summary could not say (most writes while its groups of 64
            # fill up, after a clear): ask the members.
            if coarse and all_set(members, offset >> shift, (last >> shift) + 1):
                continue
            break  # something to record: do it all under the lock
        else:
            return epoch
        with self.lock:
            journal = self.journal
            for summary, summary_shift, shift, members, coarse in self.groups:
                first, stop = offset >> shift, (last >> shift) + 1
                if all_set(members, first, stop):
                    continue  # already dirty in every member: nothing to do
                if journal.fd >= 0:  # one record for the group, before any bit is set
                    journal.append(encode_group_record(shift, first, stop - first))
                if stop - first == 1:
                    for bits in members:
                        bits[first] = 1
                else:
                    for bits in members:
                        bits[first:stop] = 1
                if coarse:
                    update_summary_bits(summary, summary_shift - shift, members, first, stop)
        return epoch
