"""What `nbdserve qdb info|check|dump` report about a QDB file, as data.

The file is read as it is on disk; nothing is locked, repaired or written.
"""

from __future__ import annotations

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.qdb import QdbContents, StoredBitmap


def dirty_ranges(stored: StoredBitmap, image_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each dirty run of a readable stored bitmap."""
    return list(Bitmap(image_size, stored.granularity_bits, stored.bits).set_ranges())


def describe(contents: QdbContents) -> dict:
    """The header and every bitmap's state and dirty byte count (None if unreadable)."""
    size = contents.identity.size
    bitmaps = []
    for b in contents.bitmaps:
        dirty = (Bitmap(size, b.granularity_bits, b.bits).count_bytes()
                 if b.bits is not None else None)
        bitmaps.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                        "dirty_bytes": dirty, "recording": b.recording,
                        "inconsistent": b.inconsistent or b.bits is None,
                        "generation": f"{b.generation:016x}", "problem": b.problem})
    return {"version": 1, "cluster_size": 1 << contents.cluster_bits,
            "image_size": size, "in_use": contents.in_use,
            "save_counter": contents.save_counter, "bitmaps": bitmaps}


def damage(contents: QdbContents) -> list[str]:
    """One line for each bitmap whose data could not be read."""
    return [f"bitmap '{b.name}': {b.problem}" for b in contents.bitmaps if b.bits is None]


def dump(contents: QdbContents, names: tuple[str, ...] = ()) -> list[dict]:
    """Dirty extents of the named bitmaps (all when none are named). Raises
    LookupError for a name not in the file, ValueError for an unreadable bitmap."""
    chosen = [b for b in contents.bitmaps if not names or b.name in names]
    missing = set(names) - {b.name for b in chosen}
    if missing:
        raise LookupError(f"no bitmap named {', '.join(sorted(missing))}")
    out = []
    for b in chosen:
        if b.bits is None:
            raise ValueError(f"bitmap '{b.name}' is unreadable: {b.problem}")
        out.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                    "dirty": [{"offset": o, "length": n}
                              for o, n in dirty_ranges(b, contents.identity.size)]})
    return out
