"""The bitmaps of one image, as the export and the control socket see them.

``BitmapStore`` holds the image's named bitmaps and applies their policy: it opens them
(recovery.py), marks writes (tracking.py; it is the export's DirtyTracker), answers
block status for each ``qemu:dirty-bitmap:NAME`` context, keeps exported bitmaps busy
while a connection holds them, runs operations as atomic transactions
(transactions.py), and persists: after every operation, with the in-use flag set while
it runs and cleared on a clean close. Only one process may hold an image's bitmaps
(QDB.lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.journal import Journal
from nbdserve.bitmaps.policy import BitmapError, DirtyBitmap
from nbdserve.bitmaps.qdb import ImageIdentity, QdbContents, StoredBitmap, write_qdb
from nbdserve.bitmaps.recovery import recover
from nbdserve.bitmaps.tracking import Recorder
from nbdserve.bitmaps.transactions import ACTIONS, Plan, Undo
from nbdserve.bitmaps.watch import ImageWatch
from nbdserve.config import BitmapRequest
from nbdserve.errors import RequestError
from nbdserve.protocol import constants as c
from nbdserve.values import DEFAULT_GRANULARITY

log = logging.getLogger("nbdserve.bitmaps")

__all__ = ["ACTIONS", "BitmapStore", "StoreLocked", "default_qdb_path"]


class StoreLocked(Exception):
    """Another process holds this image's bitmaps."""


def default_qdb_path(image_path: str) -> str:
    return image_path + ".qdb"


def take_lock(qdb_path: str) -> int:
    """Exclusive lock on QDB.lock (the QDB file itself is replaced by rename)."""
    path = qdb_path + ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StoreLocked(f"the bitmaps of this image are in use by another process "
                          f"(pid {holder or '?'}; lock {path})") from None
    with contextlib.suppress(OSError):  # the pid is for messages; a full disk may refuse it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class BitmapStore:
    def __init__(self, qdb_path: str, image_size: int,
                 identity: Callable[[], ImageIdentity], *, read_only: bool = False) -> None:
        self.qdb_path = qdb_path
        self.image_size = image_size
        self.identity = identity
        self.read_only = read_only
        self.bitmaps: dict[str, DirtyBitmap] = {}
        self.lock = threading.RLock()
        self.journal = Journal(qdb_path + ".journal")
        self.recorder = Recorder(self.journal, self.lock)
        self.mark_dirty = self.recorder.mark_dirty
        self.save_counter = 0
        self._lock_fd = -1
        self._unreadable = ""  # why the QDB file could not be read, when it could not
        self.closed = False
        self.watch: ImageWatch | None = None
        self.frozen = ""  # why operations are refused now (a migration is under way)

    def watch_image(self, image_fd: int) -> ImageWatch | None:
        """Keep the crash journal's watch slot up to date for this image (watch.py);
        None where nothing is journaled (read-only)."""
        if self.read_only or self.journal.fd < 0:
            return None
        if self.watch is None:
            self.watch = ImageWatch(self.journal, image_fd, self.lock)
        return self.watch

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, qdb_path: str, image_size: int, identity: Callable[[], ImageIdentity], *,
             read_only: bool = False,
             requests: Sequence[BitmapRequest] = ()) -> BitmapStore:
        store = cls(qdb_path, image_size, identity, read_only=read_only)
        store._lock_fd = take_lock(qdb_path)
        try:
            recovered = recover(qdb_path, store.journal, image_size, identity)
            store.bitmaps = recovered.bitmaps
            store.save_counter = recovered.save_counter
            store._unreadable = recovered.unreadable
            for request in requests:
                store._apply_request(request)
            store._refresh()
            if not read_only:
                try:
                    store._save(in_use=True)  # from here on, the journal is authoritative
                except OSError as exc:
                    store._cannot_persist(exc)
        except BaseException:
            store._unlock()
            raise
        return store

    def _cannot_persist(self, exc: OSError) -> None:
        """The QDB file or the journal could not be written at start (a full disk):
        serve anyway, but nothing could vouch for these bitmaps after a crash, so they
        are inconsistent from now on (all dirty, not exported, until cleared or
        removed). No journal is left behind: an empty one would claim nothing changed.
        After a crash the file is then either the old clean one, whose identity no
        longer matches the written image, or in use without a journal: inconsistent
        either way, never silently wrong."""
        with contextlib.suppress(OSError):
            self.journal.remove()
        reason = f"the bitmaps could not be saved at start ({exc.strerror or exc})"
        for bitmap in self.bitmaps.values():
            bitmap.bitmap.set_all()
            bitmap.make_inconsistent(reason)
        self._refresh()
        log.error("%s: %s; serving without them: they are inconsistent until cleared or "
                  "removed", self.qdb_path, reason)

    def _apply_request(self, request: BitmapRequest) -> None:
        """`--bitmap NAME[,granularity=BYTES]`: create if absent, enable."""
        bitmap = self.bitmaps.get(request.name)
        if bitmap is None:
            bitmap = DirtyBitmap.create(request.name, self.image_size,
                                        request.granularity or DEFAULT_GRANULARITY)
            if self._unreadable:
                # The file that may have held this bitmap is unreadable: an empty one
                # would under-report, so it starts inconsistent (all-dirty) instead.
                bitmap.bitmap.set_all()
                bitmap.make_inconsistent(f"QDB file was unreadable: {self._unreadable}")
            self.bitmaps[bitmap.name] = bitmap
            log.info("created bitmap %r (granularity %d)", bitmap.name, bitmap.granularity)
        else:
            if request.granularity and request.granularity != bitmap.granularity:
                log.warning("bitmap %r exists with granularity %d; ignoring the requested %d",
                            bitmap.name, bitmap.granularity, request.granularity)
            if not bitmap.recording and not bitmap.inconsistent:
                bitmap.recording = True
                log.info("enabled bitmap %r", bitmap.name)

    def _refresh(self) -> None:
        """After anything that changes which bitmaps record or resets bits."""
        self.recorder.refresh(self.bitmaps.values())

    # -- the export's DirtyTracker (marking is the recorder's) ------------------------------

    def make_durable(self) -> None:
        with self.lock:
            self.journal.sync()

    def contexts(self) -> list[str]:
        with self.lock:
            return [c.QEMU_DIRTY_BITMAP_PREFIX + b.name for b in self.bitmaps.values()
                    if not b.inconsistent]

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        with self.lock:
            return self._by_context(context).bitmap.runs(offset, length, limit)

    def _by_context(self, context: str) -> DirtyBitmap:
        name = context.removeprefix(c.QEMU_DIRTY_BITMAP_PREFIX)
        bitmap = self.bitmaps.get(name)
        if bitmap is None or not context.startswith(c.QEMU_DIRTY_BITMAP_PREFIX):
            raise RequestError(errno.EINVAL, f"bitmap {name!r} no longer exists")
        if bitmap.inconsistent:
            raise RequestError(errno.EINVAL, f"bitmap {name!r} is inconsistent")
        return bitmap

    def hold(self, contexts: Iterable[str]) -> list[str]:
        """Mark exported bitmaps busy for a connection; returns what it must release."""
        held = []
        with self.lock:
            for context in contexts:
                name = context.removeprefix(c.QEMU_DIRTY_BITMAP_PREFIX)
                if context.startswith(c.QEMU_DIRTY_BITMAP_PREFIX) and name in self.bitmaps:
                    self.bitmaps[name].busy += 1
                    held.append(name)
        return held

    def release(self, names: Iterable[str]) -> None:
        with self.lock:
            for name in names:
                bitmap = self.bitmaps.get(name)
                if bitmap is not None and bitmap.busy:
                    bitmap.busy -= 1

    # -- operations ------------------------------------------------------------------------

    def query(self) -> list[dict]:
        with self.lock:
            return [b.info() for b in self.bitmaps.values()]

    def frozen_copy(self, name: str) -> Bitmap:
        """A copy of a bitmap's bits as they are now (a snapshot's view of its
        checkpoint)."""
        with self.lock:
            bitmap = self.bitmaps.get(name)
            if bitmap is None:
                raise BitmapError(f"Dirty bitmap '{name}' not found", "DeviceNotFound")
            return bitmap.bitmap.copy()

    def execute(self, action: str, arguments: dict) -> None:
        self.transaction([(action, arguments)])

    def transaction(self, actions: Sequence[tuple[str, dict]]) -> None:
        """Apply all actions or none: every check runs first, against the state the
        earlier actions would leave; then everything is applied and saved under the
        lock, so no write falls between two actions."""
        with self.lock:
            if self.read_only:
                raise BitmapError("the bitmaps of a read-only export cannot be changed")
            if self.frozen:
                raise BitmapError(self.frozen)
            plan = Plan(self.bitmaps, self.image_size)
            steps = [plan.check(action, arguments) for action, arguments in actions]
            undo = Undo(self.bitmaps, actions)
            for step in steps:
                step()
            self._refresh()
            try:
                self._save(in_use=True)
            except OSError:
                # Not persisted, so not done: the caller hears of the failure and the
                # bitmaps are exactly as before.
                self.bitmaps = undo.restore()
                self._refresh()
                raise
            for action, arguments in actions:
                log.info("bitmap %s %s", action.removeprefix("bitmap-"),
                         ", ".join(f"{k}={v}" for k, v in arguments.items()))

    # -- persistence -----------------------------------------------------------------------

    def stored(self, *, copy: bool = False) -> list[StoredBitmap]:
        """Every bitmap as the QDB file stores it; with ``copy``, bits that stay as
        they are now (a migration sends them while writes go on)."""
        with self.lock:
            return [StoredBitmap(b.name, b.granularity_bits, b.generation, b.recording,
                                 b.inconsistent,
                                 b.bitmap.bits.copy() if copy else b.bitmap.bits)
                    for b in self.bitmaps.values()]

    def _save(self, in_use: bool, migration: str = "") -> None:
        counter = self.save_counter + 1
        contents = QdbContents(identity=self.identity(), in_use=in_use, save_counter=counter,
                               bitmaps=self.stored(), migration=migration)
        write_qdb(self.qdb_path, contents)
        self.save_counter = counter
        if in_use:
            self.journal.reset(self.save_counter)
        else:
            self.journal.remove()

    def close(self, moved: bool = False) -> None:
        """Clean stop: save with the in-use flag cleared and the image's identity;
        ``moved``: the image was migrated away, and the file says so (serving this
        copy again takes --force)."""
        if self.watch is not None:
            self.watch.stop()  # not under the lock, which the watch's thread takes
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if not self.read_only:
                    self._save(in_use=False, migration="moved" if moved else "")
                    log.info("saved %d bitmaps to %s%s", len(self.bitmaps), self.qdb_path,
                             " (marked as moved)" if moved else "")
            except OSError as exc:
                # What is on disk stays safe: an in-use file with its journal (replayed
                # at the next start), or else an identity the image no longer has.
                log.error("could not save the bitmaps to %s (%s); the next start "
                          "recovers them from the crash journal, or makes them "
                          "inconsistent where it cannot", self.qdb_path,
                          exc.strerror or exc)
            finally:
                self.journal.close()
                self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
