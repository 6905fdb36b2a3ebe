"""Opening an image's bitmaps: read the QDB file, decide what can be trusted, and
replay the crash journal after an unclean stop.

Every bitmap the file holds comes back; one that cannot be trusted comes back
inconsistent (all-dirty, so it never under-reports), with the reason:
- its data is damaged, or its size does not fit the image;
- the image changed while no server was running: its size or inode differ; after a
  clean stop, its mtime or ctime differ from the saved ones; after a crash, its times
  do not fit what the crash journal's watch slot says (bitmaps/watch.py);
- the file was left in use (a crash) and the journal is missing, unreadable, newer than
  the file, or names granules outside a bitmap.
A file that cannot be read at all is moved aside (QDB.corrupt-TIME) and reported.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nbdserve.bitmaps.bitmap import Bitmap, granule_count
from nbdserve.bitmaps.journal import Journal, JournalError, WatchSlot, read_journal
from nbdserve.bitmaps.policy import DirtyBitmap
from nbdserve.bitmaps.qdb import (
    FileView,
    ImageIdentity,
    QdbContents,
    QdbError,
    SalvagedBitmap,
    StoredBitmap,
    decode_qdb,
    salvage_bitmaps,
)
from nbdserve.bitmaps.watch import GRACE_NS

log = logging.getLogger("nbdserve.bitmaps")


@dataclass
class Recovered:
    bitmaps: dict[str, DirtyBitmap] = field(default_factory=dict)
    save_counter: int = 0
    unreadable: str = ""  # why the QDB file could not be read, when it could not


def recover(qdb_path: str, journal: Journal, image_size: int,
            identity: Callable[[], ImageIdentity]) -> Recovered:
    if not os.path.exists(qdb_path):
        if os.path.exists(journal.path):
            journal.remove()  # a journal without its QDB file means nothing
        return Recovered()
    try:
        with open(qdb_path, "rb") as f:
            data = FileView(f.fileno())
            try:
                contents = decode_qdb(data)
            except (QdbError, OSError) as error:
                found = salvage_bitmaps(data)
                problem = error
            else:
                problem = None
    except OSError as error:
        found, problem = [], error
    if problem is not None:
        return _unreadable(qdb_path, found, problem, image_size)
    recovered = Recovered(save_counter=contents.save_counter)
    for stored in contents.bitmaps:
        bitmap = bitmap_from_stored(stored, image_size)
        recovered.bitmaps[bitmap.name] = bitmap
    now = identity()
    reason = _identity_problem(contents, now)
    if reason is None and contents.in_use:
        reason = replay_journal(journal.path, contents, recovered.bitmaps, qdb_path, now)
    if reason is not None:
        log.warning("bitmaps of %s are inconsistent: %s", qdb_path, reason)
        for bitmap in recovered.bitmaps.values():
            bitmap.make_inconsistent(reason)
    return recovered


def _unreadable(qdb_path: str, found: list[SalvagedBitmap], error: Exception,
                image_size: int) -> Recovered:
    """The file cannot be used: keep it aside for inspection, and bring back every
    bitmap its header (or the header's copy) still names, inconsistent, so none
    vanishes; bitmaps named with --bitmap come back the same way (BitmapStore)."""
    aside = f"{qdb_path}.corrupt-{int(time.time())}"
    os.rename(qdb_path, aside)
    recovered = Recovered(unreadable=str(error))
    reason = f"the QDB file was damaged ({error}); kept as {aside}"
    for salvaged in found:
        bitmap = Bitmap(image_size, salvaged.granularity_bits)
        bitmap.set_all()
        named = DirtyBitmap(salvaged.name, bitmap, recording=salvaged.recording,
                            generation=salvaged.generation)
        named.make_inconsistent(reason)
        recovered.bitmaps[salvaged.name] = named
    log.error("QDB file %s is unusable (%s); kept as %s. %s", qdb_path, error, aside,
              f"Its bitmaps {', '.join(map(repr, recovered.bitmaps))} are inconsistent "
              "until cleared or removed." if recovered.bitmaps else
              "No bitmap names could be read from it; bitmaps named with --bitmap will "
              "be inconsistent until cleared or removed.")
    return recovered


def bitmap_from_stored(stored: StoredBitmap, image_size: int) -> DirtyBitmap:
    gbits = stored.granularity_bits
    if stored.bits is None or len(stored.bits) != granule_count(image_size, gbits):
        bitmap = Bitmap(image_size, gbits)
        bitmap.set_all()  # unusable: kept all-dirty (safe) and flagged inconsistent
        named = DirtyBitmap(stored.name, bitmap, recording=stored.recording,
                            generation=stored.generation)
        named.make_inconsistent(stored.problem or "image size changed")
        log.warning("bitmap %r is inconsistent: %s", stored.name, named.inconsistent_reason)
        return named
    named = DirtyBitmap(stored.name, Bitmap(image_size, gbits, stored.bits),
                        recording=stored.recording, generation=stored.generation)
    if stored.inconsistent:
        named.make_inconsistent("recorded as inconsistent in the QDB file")
    return named


def _identity_problem(contents: QdbContents, now: ImageIdentity) -> str | None:
    stored = contents.identity
    changed = []
    if stored.size != now.size:
        changed.append(f"size {stored.size} -> {now.size}")
    if stored.inode != now.inode or stored.device != now.device:
        changed.append("inode (the image was replaced)")
    if not contents.in_use:
        # After a crash our own writes moved the times: the journal's watch slot says.
        if stored.mtime_ns != now.mtime_ns:
            changed.append("mtime")
        if stored.ctime_ns and stored.ctime_ns != now.ctime_ns:
            changed.append("ctime")
    if changed:
        return "the image was changed while no server was running (" + \
            ", ".join(changed) + ")"
    return None


def changed_after_crash(watch: WatchSlot | None, saved: ImageIdentity,
                        now: ImageIdentity) -> str | None:
    """Did something change the image after the server that left this journal died?
    (The rules are bitmaps/watch.py's.)"""
    if watch is None:
        log.warning("the crash journal predates the image watch: a change made to the "
                    "image after that crash cannot be detected")
        return None
    if watch.damaged:
        return "the crash journal's watch slot is damaged: the image's state is unknown"
    if watch.unset or not watch.heartbeat_ns:
        ctime, mtime = (saved.ctime_ns, saved.mtime_ns) if watch.unset else \
            (watch.ctime_ns, watch.mtime_ns)
        if now.mtime_ns != mtime or ctime and now.ctime_ns != ctime:
            return ("the image was changed after the server stopped without saving "
                    f"(its ctime is {_when(now.ctime_ns)}; the server last saw it at rest "
                    f"with {_when(ctime)})")
        return None
    latest = watch.heartbeat_ns + GRACE_NS
    if now.ctime_ns > latest or now.mtime_ns > latest:
        return ("the image was changed after the server stopped without saving (its "
                f"ctime is {_when(now.ctime_ns)}; the server's last heartbeat was "
                f"{_when(watch.heartbeat_ns)})")
    return None


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 10**9)) + \
        f".{ns % 10**9:09d} UTC"


def replay_journal(path: str, contents: QdbContents, bitmaps: dict[str, DirtyBitmap],
                   qdb_path: str, now: ImageIdentity | None) -> str | None:
    """The file was left in use (a crash): fold the journal in, or say why not. With
    the image's identity `now`, first check that nothing changed the image after the
    server died (the watch slot)."""
    try:
        journal_counter, records, watch = read_journal(path)
    except JournalError as error:
        return f"the QDB file was left in use without a usable journal ({error})"
    if now is not None:
        problem = changed_after_crash(watch, contents.identity, now)
        if problem is not None:
            return problem
    if journal_counter > contents.save_counter:
        return "the journal is newer than the QDB file (an older QDB file was restored?)"
    by_generation = {b.generation: [b] for b in bitmaps.values()}
    groups: dict[int, list[DirtyBitmap]] = {}
    if journal_counter == contents.save_counter:
        # Group records name the bitmaps recording in this very save. An older
        # journal (a crash between a save and the journal's reset) is already
        # folded into the newer save.
        for bitmap in bitmaps.values():
            if bitmap.recording:
                groups.setdefault(bitmap.granularity_bits, []).append(bitmap)
    applied = 0
    for record in records:
        if record.generation:
            targets = by_generation.get(record.generation, [])
        else:
            targets = groups.get(record.granularity_bits, [])
        # No target: a bitmap cleared or removed since, whose old records are moot.
        stop = record.first_granule + record.granules
        for bitmap in targets:
            if stop > len(bitmap.bitmap) or record.granules == 0:
                return f"journal record for {bitmap.name!r} lies outside the bitmap"
            bitmap.bitmap.set_granules(record.first_granule, stop)
        applied += 1
    log.info("recovered bitmaps of %s after an unclean stop: %d journal records replayed",
             qdb_path, applied)
    return None
