"""Taking, listing and removing point-in-time snapshots of an export.

A snapshot is taken while the export's changes are paused (ChangeGate): no write is
half done at its instant. Taken with a checkpoint, the bitmap checkpoint and the start
of copy-before-write happen in that one pause, so the frozen bitmap OLD holds exactly
what changed up to the snapshot's instant and NEW everything after it.

Scratch files are named IMAGE.snapshot-PID-N.scratch in the scratch directory (beside
the QDB file unless configured), and are locked (flock) while a server uses them. A
snapshot does not survive the process: files left by a crash are deleted when the
export is next opened (``remove_stale_scratch``); a file still locked belongs to a
running server and is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import logging
import os
import threading

from bitarray import bitarray

from nbdserve.export import Export, ExportCatalog
from nbdserve.image import ImageError, RawImage
from nbdserve.snapshots.cbw import Snapshot
from nbdserve.snapshots.export import SnapshotExport

log = logging.getLogger("nbdserve.snapshots")

_serial = itertools.count(1)
_taking = threading.Lock()  # one snapshot taken at a time: names are checked, then added


class SnapshotError(Exception):
    """A snapshot command that cannot be done; the message is for the operator."""


def scratch_pattern(directory: str, image_path: str) -> str:
    return os.path.join(directory, glob.escape(os.path.basename(image_path))
                        + ".snapshot-*.scratch")


def remove_stale_scratch(directory: str, image_path: str) -> int:
    """Delete scratch files a crashed server left for this image; returns how many.
    A file some running process holds locked is not stale and stays."""
    removed = 0
    for path in glob.glob(scratch_pattern(directory, image_path)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale snapshot scratch files of %s from %s", removed,
                 image_path, directory)
    return removed


def create_scratch(export: Export) -> RawImage:
    """A new sparse scratch file of the image's size, locked for this process."""
    directory = export.scratch_dir
    path = os.path.join(directory, f"{os.path.basename(export.image.path)}.snapshot-"
                                   f"{os.getpid()}-{next(_serial)}.scratch")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, export.size)
        finally:
            os.close(fd)
        scratch = RawImage(path)
    except (OSError, ImageError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise SnapshotError(f"cannot create a scratch file in {directory}: {reason}") from None
    fcntl.flock(scratch.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return scratch


def check_name(catalog: ExportCatalog, name) -> None:
    if not isinstance(name, str) or not name:
        raise SnapshotError("a snapshot needs a non-empty name (its export name)")
    if len(name.encode()) > 4096 or "\0" in name:
        raise SnapshotError("a snapshot's name is at most 4096 bytes, with no NUL")
    if catalog.find(name) is not None:
        raise SnapshotError(f"an export named {name!r} exists already")


def default_name(export: Export, bitmap: str) -> str:
    """EXPORT@OLD (just @OLD for the default export, whose name is empty)."""
    return f"{export.name}@{bitmap}"


def take_snapshot(catalog: ExportCatalog, export: Export, name: str, *,
                  checkpoint: tuple[str, str] | None = None,
                  new_bitmap: str | None = None,
                  granularity: int | None = None) -> SnapshotExport:
    """Take a snapshot of export and add it to the catalog as export ``name``. At the
    same instant, with ``checkpoint`` (OLD, NEW): OLD freezes and NEW starts recording,
    and the snapshot holds what OLD has dirty; with ``new_bitmap``: a new bitmap starts
    recording, and the snapshot holds everything (a full backup's starting point)."""
    with _taking:
        check_name(catalog, name)
        if export.discard_only:
            raise SnapshotError(f"{export.name!r} is a snapshot; take one of the live export")
        if (checkpoint is not None or new_bitmap is not None) and export.tracker is None:
            raise SnapshotError(f"export {export.name!r} has no bitmaps enabled")
        scratch = create_scratch(export)
        try:
            with export.gate.paused():
                snapshot = _start(export, name, scratch, checkpoint, new_bitmap, granularity)
                export.preservers = (*export.preservers, snapshot)
        except BaseException:
            scratch.close()
            with contextlib.suppress(OSError):
                os.unlink(scratch.path)
            raise
        snapshot_export = SnapshotExport(export, snapshot)
        catalog.add(snapshot_export)
    log.info("snapshot %r of export %r taken%s; scratch file %s", name, export.name,
             f" with checkpoint {checkpoint[0]} -> {checkpoint[1]}" if checkpoint else "",
             scratch.path)
    return snapshot_export


COPY_GRANULE_MIN = 12  # 4 KiB: a first write to a region copies this much at least
COPY_BITS_MAX = 8 << 20  # bytes per bit array; coarser granules for larger images


def copy_shift(size: int) -> int:
    """The granule a snapshot copies in: 4 KiB (so the first 4 KiB write to a region
    copies 4 KiB, not 64), coarser where the bits would pass 8 MiB (above 256 GiB)."""
    shift = COPY_GRANULE_MIN
    while (size >> shift) > COPY_BITS_MAX * 8:
        shift += 1
    return shift


def _start(export: Export, name: str, scratch: RawImage, checkpoint: tuple[str, str] | None,
           new_bitmap: str | None, granularity: int | None) -> Snapshot:
    """The instant itself (changes are paused): the bitmaps' part, then the snapshot's
    bits."""
    fail_write = export.fail_write_on_cbw_error
    shift = (granularity.bit_length() - 1) if granularity else copy_shift(export.size)
    if checkpoint is None:
        if new_bitmap is not None:
            _transaction(export, [("bitmap-add", {"name": new_bitmap})])
        held = bitarray(((export.size - 1) >> shift) + 1 if export.size else 0,
                        endian="little")
        held.setall(1)
        return Snapshot(name, export.image, scratch, shift, held, fail_write=fail_write)
    old, new = checkpoint
    _transaction(export, [("bitmap-checkpoint", {"old": old, "new": new})])
    dirty = export.tracker.frozen_copy(old)
    held = dirty.resample(shift)
    return Snapshot(name, export.image, scratch, shift, held, bitmap=old, dirty=dirty,
                    fail_write=fail_write)


def _transaction(export: Export, actions: list[tuple[str, dict]]) -> None:
    """The bitmaps' part of the instant. A BitmapError (no such bitmap, busy, ...) goes
    to the caller as it is; nothing changed then."""
    try:
        export.tracker.transaction(actions)
    except OSError as exc:
        raise SnapshotError(f"the bitmaps could not be saved: {exc.strerror or exc}") \
            from None


def snapshots_of(catalog: ExportCatalog, export: Export | None = None) -> list[SnapshotExport]:
    return [e for e in catalog if isinstance(e, SnapshotExport)
            and (export is None or e.parent is export)]


def describe_all(catalog: ExportCatalog, export: Export | None = None) -> list[dict]:
    return [{**e.snapshot.describe(), "export": e.parent.name, "connections": e.connections}
            for e in snapshots_of(catalog, export)]


def find_snapshot(catalog: ExportCatalog, name) -> SnapshotExport:
    export = catalog.find(name) if isinstance(name, str) else None
    if not isinstance(export, SnapshotExport):
        raise SnapshotError(f"snapshot {name!r} not found")
    return export


def check_removable(snapshot_export: SnapshotExport, force: bool) -> None:
    if snapshot_export.connections and not force:
        raise SnapshotError(
            f"snapshot {snapshot_export.name!r} is in use by "
            f"{snapshot_export.connections} connection(s); force the removal to "
            "disconnect them")

