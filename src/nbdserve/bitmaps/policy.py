"""What a named dirty bitmap is, above its bits: QEMU's rules for one bitmap.

A ``DirtyBitmap`` has a name, its ``Bitmap`` (the bits), and the states that decide
what may be done with it: recording (enabled) or disabled, busy (exported by a
connection, so no operation may change it), inconsistent (its bits cannot be trusted:
all-dirty, usable only by clear or remove), and a generation id that names one life of
its contents (a new one after clear). The store applies these rules; the bits know
nothing of them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from nbdserve import values
from nbdserve.bitmaps.bitmap import Bitmap


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


@dataclass(eq=False)
class DirtyBitmap:
    name: str
    bitmap: Bitmap
    recording: bool = True
    inconsistent: bool = False
    generation: int = field(default_factory=new_generation)
    busy: int = 0  # how many holders (exporting connections) have it
    inconsistent_reason: str = ""

    @classmethod
    def create(cls, name: str, image_size: int,
               granularity: int = values.DEFAULT_GRANULARITY,
               recording: bool = True) -> DirtyBitmap:
        check_name(name)
        return cls(name, Bitmap(image_size, granularity_bits(granularity)),
                   recording=recording)

    @property
    def granularity(self) -> int:
        return self.bitmap.granularity

    @property
    def granularity_bits(self) -> int:
        return self.bitmap.granularity_bits

    def clear(self) -> None:
        """Reset every bit; a new life (generation), and trusted again."""
        self.bitmap.reset_all()
        self.generation = new_generation()
        self.inconsistent = False
        self.inconsistent_reason = ""

    def make_inconsistent(self, reason: str) -> None:
        self.inconsistent = True
        self.inconsistent_reason = reason

    def info(self) -> dict:
        """What list/query reports (QEMU's field names where they exist)."""
        return {
            "name": self.name,
            "granularity": self.granularity,
            "count": self.bitmap.count_bytes(),
            "recording": self.recording,
            "busy": self.busy > 0,
            "persistent": True,
            "inconsistent": self.inconsistent,
            "generation": f"{self.generation:016x}",
        }
