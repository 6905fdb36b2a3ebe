"""One dirty bitmap: bits over granules of an image, and a small vocabulary of verbs.

Bit n covers bytes [n * granularity, (n + 1) * granularity); a set bit means "may have
changed". Bits are stored LSB-first within each byte, the order of the QDB file (and of
qcow2 and QEMU). Everything above this class speaks only its verbs (mark, clear,
merge, extents, count); none of it touches the bit layout.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from itertools import islice

from bitarray import bitarray

from nbdserve import values


class BitmapError(Exception):
    """A bitmap operation was refused; the message is for the user."""

    def __init__(self, message: str, error_class: str = "GenericError") -> None:
        super().__init__(message)
        self.error_class = error_class


def check_name(name: str) -> None:
    try:
        values.check_bitmap_name(name)
    except ValueError as exc:
        raise BitmapError(str(exc)) from None


def granularity_bits(granularity: int) -> int:
    """Validate a granularity in bytes and return its log2."""
    try:
        return values.granularity_bits(granularity)
    except ValueError as exc:
        raise BitmapError(str(exc)) from None


def new_generation() -> int:
    """A random, non-zero id that names one life of a bitmap (until clear or removal)."""
    return secrets.randbits(64) or 1


def granule_count(image_size: int, granularity_bits_: int) -> int:
    granularity = 1 << granularity_bits_
    return (image_size + granularity - 1) // granularity


@dataclass(eq=False)
class DirtyBitmap:
    name: str
    granularity_bits: int
    image_size: int
    bits: bitarray
    recording: bool = True
    inconsistent: bool = False
    generation: int = field(default_factory=new_generation)
    busy: int = 0  # how many holders (exporting connections) have it
    inconsistent_reason: str = ""

    @classmethod
    def create(cls, name: str, image_size: int, granularity: int = values.DEFAULT_GRANULARITY,
               recording: bool = True) -> DirtyBitmap:
        check_name(name)
        gbits = granularity_bits(granularity)
        bits = bitarray(granule_count(image_size, gbits), endian="little")
        bits.setall(0)
        return cls(name, gbits, image_size, bits, recording=recording)

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    # -- verbs ----------------------------------------------------------------------------

    def granules(self, offset: int, length: int) -> tuple[int, int]:
        """The granule range [first, stop) that [offset, offset+length) overlaps."""
        shift = self.granularity_bits
        return offset >> shift, ((offset + length - 1) >> shift) + 1

    def set_granules(self, first: int, stop: int) -> None:
        self.bits[first:stop] = 1

    def mark(self, offset: int, length: int) -> None:
        """Mark every granule that [offset, offset+length) overlaps."""
        if length > 0:
            first, stop = self.granules(offset, length)
            self.bits[first:stop] = 1

    def clear(self) -> None:
        self.bits.setall(0)
        self.generation = new_generation()
        self.inconsistent = False
        self.inconsistent_reason = ""

    def merge_from(self, other: DirtyBitmap) -> None:
        if other.granularity_bits != self.granularity_bits or len(other.bits) != len(self.bits):
            raise BitmapError(
                f"Bitmap '{other.name}' has granularity {other.granularity} and "
                f"'{self.name}' has {self.granularity}; they cannot be merged")
        self.bits |= other.bits

    def dirty_bytes(self) -> int:
        dirty = self.bits.count(1)
        if dirty and self.bits[-1]:
            # The last granule may be partial: count only the bytes inside the image.
            tail = self.image_size - (len(self.bits) - 1) * self.granularity
            return (dirty - 1) * self.granularity + tail
        return dirty * self.granularity

    def runs(self, offset: int, length: int, limit: int) -> tuple[list[int], bool]:
        """Lengths of the alternating clean/dirty runs from offset, and whether the
        first is dirty.

        Runs follow granule boundaries, except where the request starts or ends inside
        a granule. At most ``limit`` runs; the caller asks again for the rest. The run
        boundaries are found in C (xor of neighbours, then a bit search), so the cost
        per run is a few list operations.
        """
        shift = self.granularity_bits
        end = offset + length
        first = offset >> shift
        window = self.bits[first:((end - 1) >> shift) + 1]
        changes = (window[1:] ^ window[:-1]).search(1) if len(window) > 1 else iter(())
        stops = [(first + index + 1) << shift for index in islice(changes, limit)]
        if len(stops) < limit:
            stops.append(end)
        lengths = [stop - start for start, stop in zip([offset, *stops], stops, strict=False)]
        return lengths, bool(window[0])

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        """(length, dirty) pairs from offset, cut to the request."""
        lengths, dirty = self.runs(offset, length, limit)
        return [(run, dirty ^ bool(index & 1)) for index, run in enumerate(lengths)]

    def info(self) -> dict:
        """What list/query reports (QEMU's field names where they exist)."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "count": self.dirty_bytes(),
            "recording": self.recording,
            "busy": self.busy > 0,
            "persistent": True,
            "inconsistent": self.inconsistent,
            "generation": f"{self.generation:016x}",
        }
