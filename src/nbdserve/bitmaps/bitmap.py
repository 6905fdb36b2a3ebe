"""Bits over the granules of an image, and a small vocabulary of verbs in bytes.

Bit n covers bytes [n * granularity, (n + 1) * granularity); a set bit means "may have
changed". Bits are stored LSB-first within each byte, the order of the QDB file (and of
qcow2 and QEMU). Like QEMU's hbitmap, this is only bits: what a bitmap is for (its name,
whether it records, is busy or inconsistent, its generation) is policy, kept in the
store (nbdserve.bitmaps.store), and how its extents look on the wire is the export's.
Nothing above this class touches the bit layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from bitarray import bitarray
from bitarray.util import intervals


def granule_count(image_size: int, granularity_bits: int) -> int:
    granularity = 1 << granularity_bits
    return (image_size + granularity - 1) // granularity


class Bitmap:
    __slots__ = ("size", "granularity_bits", "_bits")

    def __init__(self, size: int, granularity_bits: int, bits: bitarray | None = None) -> None:
        """A clean bitmap over size bytes, or one over existing bits (which it then
        owns; their length must match)."""
        count = granule_count(size, granularity_bits)
        if bits is None:
            bits = bitarray(count, endian="little")
            bits.setall(0)
        elif len(bits) != count:
            raise ValueError(f"{len(bits)} bits for {count} granules")
        self.size = size
        self.granularity_bits = granularity_bits
        self._bits = bits

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def bits(self) -> bitarray:
        """The bits themselves, one per granule, LSB-first as the QDB file stores them:
        not a copy. The same object for this bitmap's life (every change is made in
        place, through these methods), read where a call per look costs too much (the
        marking path, bitmaps/tracking.py) and written out by the store before the
        bitmap changes, under its lock."""
        return self._bits

    def __len__(self) -> int:
        """The number of granules."""
        return len(self._bits)

    def granules(self, offset: int, length: int) -> tuple[int, int]:
        """The granule range [first, stop) that [offset, offset+length) overlaps."""
        shift = self.granularity_bits
        return offset >> shift, ((offset + length - 1) >> shift) + 1

    # -- changing bits -------------------------------------------------------------------------

    def set(self, offset: int, length: int) -> None:
        """Set every granule that [offset, offset+length) overlaps."""
        if length > 0:
            first, stop = self.granules(offset, length)
            self._bits[first:stop] = 1

    def set_granules(self, first: int, stop: int) -> None:
        """Set granules [first, stop) (the crash journal records granules)."""
        if not 0 <= first < stop <= len(self._bits):
            raise ValueError(f"granules {first}..{stop} outside 0..{len(self._bits)}")
        self._bits[first:stop] = 1

    def set_all(self) -> None:
        self._bits.setall(1)

    def reset_all(self) -> None:
        self._bits.setall(0)

    def merge(self, other: Bitmap) -> None:
        """Set every granule set in other (same granularity and size)."""
        if not self.same_shape(other):
            raise ValueError("bitmaps of different granularity or size cannot be merged")
        self._bits |= other._bits

    def intersect(self, other: Bitmap) -> None:
        """Keep set only the granules set in both."""
        if not self.same_shape(other):
            raise ValueError("bitmaps of different granularity or size cannot be combined")
        self._bits &= other._bits

    def same_shape(self, other: Bitmap) -> bool:
        return (other.granularity_bits == self.granularity_bits
                and len(other._bits) == len(self._bits))

    @classmethod
    def summary_of(cls, members: list[Bitmap], shift: int) -> Bitmap:
        """A coarse summary of bitmaps of one shape: bit k set where every member has
        all the 2**shift granules from k << shift on set (a partial last group counts
        its missing granules as set). It costs 2**-shift of one member: 64 ways of
        slicing each member with a stride, no full-size temporary."""
        first = members[0]
        summary = cls(first.size, first.granularity_bits + shift)
        bits = summary._bits
        bits.setall(1)
        stride = 1 << shift
        for member in members:
            for phase in range(stride):
                column = member._bits[phase::stride]
                if len(column) < len(bits):  # the partial last group: missing = set
                    column.extend([1] * (len(bits) - len(column)))
                bits &= column
        return summary

    def update_summary(self, members: list[Bitmap], first: int, stop: int) -> None:
        """After members' granules [first, stop) were set: set the summary bits (this
        is the summary, made by summary_of) whose groups are now set in every member."""
        update_summary_bits(self._bits, self.granularity_bits - members[0].granularity_bits,
                            [member._bits for member in members], first, stop)

    def copy(self) -> Bitmap:
        return Bitmap(self.size, self.granularity_bits, self._bits.copy())

    # -- reading bits ----------------------------------------------------------------------------

    def is_set(self, offset: int, length: int) -> bool:
        """Whether every granule that [offset, offset+length) overlaps is set. (On the
        per-write path: kept to one call.)"""
        shift = self.granularity_bits
        first, stop = offset >> shift, ((offset + length - 1) >> shift) + 1
        if stop - first == 1:
            return bool(self._bits[first])
        return not self._bits.count(0, first, stop)

    def count_bytes(self) -> int:
        """Bytes of the image inside set granules (the last granule may be partial)."""
        bits = self._bits
        dirty = bits.count(1)
        if dirty and bits[-1]:
            tail = self.size - (len(bits) - 1) * self.granularity
            return (dirty - 1) * self.granularity + tail
        return dirty * self.granularity

    def runs(self, offset: int, length: int, limit: int) -> tuple[list[int], bool]:
        """Lengths of the alternating clean/set runs from offset, and whether the
        first is set.

        Runs follow granule boundaries, except where the request starts or ends inside
        a granule. At most ``limit`` runs; the caller asks again for the rest. The run
        boundaries are found in C (xor of neighbours, then a bit search), so the cost
        per run is a few list operations.
        """
        shift = self.granularity_bits
        end = offset + length
        first = offset >> shift
        window = self._bits[first:((end - 1) >> shift) + 1]
        changes = (window[1:] ^ window[:-1]).search(1) if len(window) > 1 else iter(())
        stops = [(first + index + 1) << shift for index in islice(changes, limit)]
        if len(stops) < limit:
            stops.append(end)
        lengths = [stop - start for start, stop in zip([offset, *stops], stops, strict=False)]
        return lengths, bool(window[0])

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, set) pairs from offset, cut to the request."""
        lengths, first_set = self.runs(offset, length, limit)
        return [(run, first_set ^ bool(index & 1)) for index, run in enumerate(lengths)]

    def resample(self, to_shift: int) -> bitarray:
        """These bits in granules of 1 << to_shift bytes: a granule is set where any
        byte of it was (finer: each bit spreads; coarser: bits are OR-ed)."""
        size, from_shift = self.size, self.granularity_bits
        count = ((size - 1) >> to_shift) + 1 if size else 0
        if to_shift > from_shift:
            # Coarser: OR neighbours pairwise, once per doubling (C loops; a pause
            # resamples a bitmap of a few hundred thousand scattered bits).
            bits = self._bits.copy()
            bits.extend(bitarray(-len(bits) % (1 << (to_shift - from_shift))))
            for _ in range(to_shift - from_shift):
                bits = bits[0::2] | bits[1::2]
            return bits[:count]
        out = bitarray(count, endian="little")
        out.setall(0)
        for value, start, stop in intervals(self._bits):
            if value:
                end = min(stop << from_shift, size)
                out[(start << from_shift) >> to_shift:((end - 1) >> to_shift) + 1] = 1
        return out

    def set_ranges(self) -> Iterator[tuple[int, int]]:
        """(offset, length) of every run of set granules, in bytes, cut to the image."""
        granularity = self.granularity
        if not len(self._bits):
            return
        for value, start, stop in intervals(self._bits):
            if value:
                yield start * granularity, min(stop * granularity, self.size) - start * granularity


def all_set(members: list[bitarray], first: int, stop: int) -> bool:
    """Whether granules [first, stop) are set in every one of these bits (the marking
    path's look, one call for a group: bitmaps/tracking.py). Loops, not all() over a
    generator: a third of the time for four members."""
    if stop - first == 1:
        for bits in members:  # noqa: SIM110
            if not bits[first]:
                return False
        return True
    for bits in members:  # noqa: SIM110
        if bits.count(0, first, stop):
            return False
    return True


def update_summary_bits(summary: bitarray, shift: int, members: list[bitarray], first: int,
                        stop: int) -> None:
    """Bitmap.update_summary on the bits themselves: after granules [first, stop) were
    set in every member, set the summary bits (2**shift granules each) whose groups
    are now set in every member."""
    for group in range(first >> shift, ((stop - 1) >> shift) + 1):
        low = group << shift
        if all_set(members, low, low + (1 << shift)):
            summary[group] = 1
