"""Work on an image's bitmaps while no server holds them: one bitmap command (what
`nbdserve bitmap ... --image IMAGE` does), and adopting or moving an image with its
bitmaps (`nbdserve qdb adopt|move`)."""

from __future__ import annotations

import contextlib
import errno
import os

from nbdserve.bitmaps.qdb import write_qdb
from nbdserve.bitmaps.store import BitmapStore, default_qdb_path
from nbdserve.image import RawImage, path_identity


def run_offline(image_path: str, qdb_path: str | None, command: str, arguments: dict):
    """Run a control command ("query-bitmaps" or a bitmap action) on the QDB file.

    Raises ImageError, StoreLocked (a server holds it), OSError or BitmapError.
    """
    image = RawImage(image_path, read_only=True)
    try:
        store = BitmapStore.open(qdb_path or default_qdb_path(image_path), image.size,
                                 image.identity)
        try:
            if command == "query-bitmaps":
                return store.query()
            store.execute(command, arguments)
            return {}
        finally:
            store.close()
    finally:
        image.close()


class MoveError(Exception):
    """An adopt or move was refused; the message is for the operator."""


def _cleanly_saved(qdb_path: str):
    """Lock the QDB file (no server may hold it) and read it; it must have been saved
    by a clean stop. Returns (lock fd, contents)."""
    from nbdserve.bitmaps.qdb import QdbError, read_qdb
    from nbdserve.bitmaps.store import StoreLocked, take_lock
    if not os.path.exists(qdb_path):
        raise MoveError(f"{qdb_path} does not exist")
    try:
        lock = take_lock(qdb_path)
    except StoreLocked as exc:
        raise MoveError(str(exc)) from None
    try:
        contents = read_qdb(qdb_path)
    except (QdbError, OSError) as exc:
        os.close(lock)
        raise MoveError(f"{qdb_path}: {exc}") from None
    if contents.in_use:
        os.close(lock)
        raise MoveError(f"{qdb_path} was left in use by a crash: start a server on its "
                        "image once (it replays the journal), stop it, then try again")
    return lock, contents


def adopt(image_path: str, qdb_path: str | None = None) -> str:
    """The operator vouches that IMAGE holds exactly the content its bitmaps were last
    saved with (a restore, or a copy made while no server ran): record the image's
    identity as it is now, so the bitmaps are trusted at the next start. Returns a
    line saying what was done."""
    qdb_path = qdb_path or default_qdb_path(image_path)
    lock, contents = _cleanly_saved(qdb_path)
    try:
        now = path_identity(image_path)
        if now.size != contents.identity.size:
            raise MoveError(f"{image_path} is {now.size} bytes; its bitmaps cover "
                            f"{contents.identity.size}: they cannot be adopted")
        before = contents.identity
        contents.identity = now
        write_qdb(qdb_path, contents)
    finally:
        os.close(lock)
    return (f"adopted {len(contents.bitmaps)} bitmaps of {qdb_path} for {image_path} "
            f"(inode {before.inode} -> {now.inode}, device {before.device} -> {now.device}, "
            f"mtime {before.mtime_ns} -> {now.mtime_ns}); the operator vouches that the "
            "image is unchanged since they were saved")


def move(source: str, target: str) -> str:
    """Move an image and its bitmaps together: a rename where it can be (then only
    the ctime changes, and the QDB file records it), else a sparse copy whose
    identity the QDB file then records (we made the copy, so nobody needs to vouch
    for it). Returns a line for the user."""
    source_qdb, target_qdb = default_qdb_path(source), default_qdb_path(target)
    for path in (target, target_qdb):
        if os.path.lexists(path):
            raise MoveError(f"{path} exists; not replacing it")
    lock, contents = _cleanly_saved(source_qdb)
    try:
        if path_identity(source) != contents.identity:
            raise MoveError(f"{source} changed since its bitmaps were saved: they are not "
                            "valid for it, so they cannot move with it")
        try:
            os.rename(source, target)
            os.rename(source_qdb, target_qdb)
            # A rename sets the inode's change time: record it, or the next start
            # would take the move for a change.
            contents.identity = path_identity(target)
            write_qdb(target_qdb, contents)
            how = "renamed"
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise MoveError(f"cannot move {source}: {exc.strerror}") from None
            _sparse_copy(source, target)
            contents.identity = path_identity(target)
            write_qdb(target_qdb, contents)
            os.unlink(source)
            os.unlink(source_qdb)
            how = "copied (another file system) and removed"
        for leftover in (source_qdb + ".journal",):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    finally:
        os.close(lock)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(source_qdb + ".lock")
    return f"moved {source} and its {len(contents.bitmaps)} bitmaps to {target} ({how})"


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """copy_file_range(2) where the kernel allows it across these file systems, else
    reads and writes."""
    while start < end:
        try:
            copied = os.copy_file_range(src, dst, end - start, start, start)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            data = os.pread(src, min(end - start, 8 << 20), start)
            copied = os.pwrite(dst, data, start) if data else 0
        if copied == 0:
            raise OSError(errno.EIO, "short copy")
        start += copied


def _sparse_copy(source: str, target: str) -> None:
    """Copy the data extents only (holes stay holes), then make it durable."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        position = 0
        while position < size:
            try:
                start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole is left
                raise
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            _copy_range(src.fileno(), dst.fileno(), start, end)
            position = end
        os.fsync(dst.fileno())
