"""What `nbdserve qdb info|check|dump` report about a QDB file, as data.

Nothing is repaired or written. A file held by a running server is refused (what is
on disk is older than the server's bitmaps: ask the server). A file left in use by a
crash is read as the next server start would read it: its journal folded in, in
memory, and the report says so.
"""

from __future__ import annotations

import fcntl
import os

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.qdb import QdbContents, StoredBitmap, read_qdb
from nbdserve.bitmaps.recovery import bitmap_from_stored, replay_journal
from nbdserve.image import ImageIdentity, path_identity


class InUse(Exception):
    """A running server holds the file; the message says what to do instead."""


def held_by(qdb_path: str) -> str | None:
    """The pid (as text) of the process holding QDB.lock, or None if none does."""
    try:
        fd = os.open(qdb_path + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return None


def read_for_inspection(qdb_path: str, *, complete: bool = False) -> tuple[QdbContents, str]:
    """The file's contents as a server starting now would see them, and a note:
    "" for a cleanly saved file, else what was done about the crash. Raises InUse,
    QdbError or OSError."""
    holder = held_by(qdb_path)
    if holder is not None:
        raise InUse(f"{qdb_path} is in use by a running server (pid {holder}); what it "
                    "holds is newer than the file: use nbdserve bitmap list --control")
    contents = read_qdb(qdb_path, complete=complete)
    if not contents.in_use:
        return contents, ""
    size = contents.identity.size
    bitmaps = {b.name: bitmap_from_stored(b, size) for b in contents.bitmaps if b.bits is not None}
    reason = replay_journal(qdb_path + ".journal", contents, bitmaps, qdb_path,
                            _image_beside(qdb_path))
    for stored in contents.bitmaps:
        named = bitmaps.get(stored.name)
        if named is None:
            continue
        if reason is not None:
            stored.inconsistent, stored.problem = True, reason
        else:
            stored.bits = named.bitmap.bits
    if reason is not None:
        return contents, f"left in use by a crash; its bitmaps cannot be trusted: {reason}"
    return contents, "left in use by a crash: journal replayed, as the next start will"


def _image_beside(qdb_path: str) -> ImageIdentity | None:
    """The identity of IMAGE for IMAGE.qdb, where it exists (a crashed file is then
    checked as a start would check it); None for a QDB file kept elsewhere."""
    image = qdb_path.removesuffix(".qdb")
    if image == qdb_path:
        return None
    try:
        return path_identity(image)
    except OSError:
        return None


def dirty_ranges(stored: StoredBitmap, image_size: int) -> list[tuple[int, int]]:
    """(offset, length) of each dirty run of a readable stored bitmap."""
    return list(Bitmap(image_size, stored.granularity_bits, stored.bits).set_ranges())


def describe(contents: QdbContents, note: str = "") -> dict:
    """The header and every bitmap's state and dirty byte count (None if unreadable)."""
    size = contents.identity.size
    bitmaps = []
    for b in contents.bitmaps:
        if b.bits is None:
            dirty = None
        elif b.inconsistent:
            dirty = size  # what a server makes of it: all dirty, whatever the bits say
        else:
            dirty = Bitmap(size, b.granularity_bits, b.bits).count_bytes()
        bitmaps.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                        "dirty_bytes": dirty, "recording": b.recording,
                        "inconsistent": b.inconsistent or b.bits is None,
                        "generation": f"{b.generation:016x}", "problem": b.problem})
    return {"version": 1, "cluster_size": 1 << contents.cluster_bits,
            "image_size": size, "in_use": contents.in_use,
            "migration": contents.migration or None,
            "save_counter": contents.save_counter, "note": note, "bitmaps": bitmaps}


def damage(contents: QdbContents) -> list[str]:
    """One line for each bitmap whose data could not be read, then each finding of a
    complete check (read_for_inspection(..., complete=True))."""
    return [f"bitmap '{b.name}': {b.problem}" for b in contents.bitmaps
            if b.bits is None] + contents.findings


def dump(contents: QdbContents, names: tuple[str, ...] = ()) -> list[dict]:
    """Dirty extents of the named bitmaps (all when none are named). Raises
    LookupError for a name not in the file, ValueError for an unreadable bitmap."""
    chosen = [b for b in contents.bitmaps if not names or b.name in names]
    missing = set(names) - {b.name for b in chosen}
    if missing:
        raise LookupError(f"no bitmap named {', '.join(sorted(missing))}")
    out = []
    size = contents.identity.size
    for b in chosen:
        if b.bits is None:
            raise ValueError(f"bitmap '{b.name}' is unreadable: {b.problem}")
        if b.inconsistent:
            # Never the saved bits: they may under-report. A server treats it as all
            # dirty until it is cleared or removed, and so does this.
            out.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                        "dirty": [{"offset": 0, "length": size}],
                        "inconsistent": b.problem or "recorded as inconsistent"})
            continue
        out.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                    "dirty": [{"offset": o, "length": n} for o, n in dirty_ranges(b, size)]})
    return out
