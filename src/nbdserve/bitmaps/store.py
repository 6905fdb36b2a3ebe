"""The bitmaps of one image: policy above the bits.

``BitmapStore`` loads the QDB file (replaying the crash journal), decides which bitmaps
can be trusted, marks writes (it is the export's DirtyTracker), runs QEMU-style
operations as atomic transactions, and persists: after every operation, and with the
in-use flag cleared on a clean close.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from bitarray import bitarray

from nbdserve.bitmaps.bitmap import (
    BitmapError,
    DirtyBitmap,
    check_name,
    granularity_bits,
    granule_count,
)
from nbdserve.bitmaps.journal import (
    Journal,
    JournalError,
    encode_group_record,
    read_journal,
)
from nbdserve.bitmaps.qdb import (
    ImageIdentity,
    QdbContents,
    QdbError,
    StoredBitmap,
    read_qdb,
    write_qdb,
)
from nbdserve.config import BitmapRequest
from nbdserve.errors import RequestError
from nbdserve.protocol import constants as c
from nbdserve.values import DEFAULT_GRANULARITY

log = logging.getLogger("nbdserve.bitmaps")

ACTIONS = ("bitmap-add", "bitmap-remove", "bitmap-enable", "bitmap-disable", "bitmap-clear",
           "bitmap-merge", "bitmap-checkpoint")


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
        self.save_counter = 0
        # Recording bitmaps grouped by granularity, each group with a summary whose
        # bit is set where every member is already dirty (see _refresh).
        self._groups: list[tuple[int, list[DirtyBitmap], bitarray]] = []
        self.epoch = 0  # bumped whenever bits may have been reset (see mark_dirty)
        self._lock_fd = -1
        self._unreadable = ""  # why the QDB file could not be read, when it could not
        self.closed = False

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, qdb_path: str, image_size: int, identity: Callable[[], ImageIdentity], *,
             read_only: bool = False,
             requests: Sequence[BitmapRequest] = ()) -> BitmapStore:
        store = cls(qdb_path, image_size, identity, read_only=read_only)
        store._lock_fd = take_lock(qdb_path)
        try:
            store._load()
            for request in requests:
                store._apply_request(request)
            if not read_only:
                store._save(in_use=True)  # from here on, the journal is authoritative
        except BaseException:
            store._unlock()
            raise
        return store

    def _load(self) -> None:
        if not os.path.exists(self.qdb_path):
            if os.path.exists(self.journal.path):
                self.journal.remove()  # a journal without its QDB file means nothing
            return
        try:
            contents = read_qdb(self.qdb_path)
        except (QdbError, OSError) as error:
            aside = f"{self.qdb_path}.corrupt-{int(time.time())}"
            os.rename(self.qdb_path, aside)
            log.error("QDB file %s is unusable (%s); kept as %s. Bitmaps named with --bitmap "
                      "will be inconsistent until cleared or removed.", self.qdb_path, error,
                      aside)
            self._unreadable = str(error)
            return
        self.save_counter = contents.save_counter
        for stored in contents.bitmaps:
            bitmap = self._from_stored(stored)
            self.bitmaps[bitmap.name] = bitmap
        reason = self._identity_problem(contents)
        if reason is None and contents.in_use:
            reason = self._replay_journal(contents)
        if reason is not None:
            log.warning("bitmaps of %s are inconsistent: %s", self.qdb_path, reason)
            for bitmap in self.bitmaps.values():
                self._make_inconsistent(bitmap, reason)
        self._refresh()

    def _from_stored(self, stored: StoredBitmap) -> DirtyBitmap:
        if stored.bits is None or len(stored.bits) != granule_count(
                self.image_size, stored.granularity_bits):
            bits = bitarray(granule_count(self.image_size, stored.granularity_bits),
                            endian="little")
            bits.setall(1)  # unusable: kept all-dirty (safe) and flagged inconsistent
            bitmap = DirtyBitmap(stored.name, stored.granularity_bits, self.image_size, bits,
                                 recording=stored.recording, generation=stored.generation)
            self._make_inconsistent(bitmap, stored.problem or "image size changed")
            log.warning("bitmap %r is inconsistent: %s", stored.name, bitmap.inconsistent_reason)
            return bitmap
        bitmap = DirtyBitmap(stored.name, stored.granularity_bits, self.image_size, stored.bits,
                             recording=stored.recording, generation=stored.generation)
        if stored.inconsistent:
            self._make_inconsistent(bitmap, "recorded as inconsistent in the QDB file")
        return bitmap

    def _identity_problem(self, contents: QdbContents) -> str | None:
        stored, now = contents.identity, self.identity()
        changed = []
        if stored.size != now.size:
            changed.append(f"size {stored.size} -> {now.size}")
        if stored.inode != now.inode or stored.device != now.device:
            changed.append("inode (the image was replaced)")
        if not contents.in_use and stored.mtime_ns != now.mtime_ns:
            # After a crash our own writes moved the mtime, so only a clean file says.
            changed.append("mtime")
        if changed:
            return "the image was changed while no server was running (" + \
                ", ".join(changed) + ")"
        return None

    def _replay_journal(self, contents: QdbContents) -> str | None:
        """The file was left in use (a crash): fold the journal in, or give up."""
        try:
            journal_counter, records = read_journal(self.journal.path)
        except JournalError as error:
            return f"the QDB file was left in use without a usable journal ({error})"
        if journal_counter > contents.save_counter:
            return "the journal is newer than the QDB file (an older QDB file was restored?)"
        by_generation = {b.generation: [b] for b in self.bitmaps.values()}
        groups: dict[int, list[DirtyBitmap]] = {}
        if journal_counter == contents.save_counter:
            # Group records name the bitmaps recording in this very save. An older
            # journal (a crash between a save and the journal's reset) is already
            # folded into the newer save.
            for bitmap in self.bitmaps.values():
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
                if stop > len(bitmap.bits) or record.granules == 0:
                    return f"journal record for {bitmap.name!r} lies outside the bitmap"
                bitmap.set_granules(record.first_granule, stop)
            applied += 1
        log.info("recovered bitmaps of %s after an unclean stop: %d journal records replayed",
                 self.qdb_path, applied)
        return None

    def _apply_request(self, request: BitmapRequest) -> None:
        bitmap = self.bitmaps.get(request.name)
        if bitmap is None:
            bitmap = DirtyBitmap.create(request.name, self.image_size,
                                        request.granularity or DEFAULT_GRANULARITY)
            if self._unreadable:
                # The file that may have held this bitmap is unreadable: an empty one
                # would under-report, so it starts inconsistent (all-dirty) instead.
                bitmap.bits.setall(1)
                self._make_inconsistent(bitmap, f"QDB file was unreadable: {self._unreadable}")
            self.bitmaps[bitmap.name] = bitmap
            log.info("created bitmap %r (granularity %d)", bitmap.name, bitmap.granularity)
        else:
            if request.granularity and request.granularity != bitmap.granularity:
                log.warning("bitmap %r exists with granularity %d; ignoring the requested %d",
                            bitmap.name, bitmap.granularity, request.granularity)
            if not bitmap.recording and not bitmap.inconsistent:
                bitmap.recording = True
                log.info("enabled bitmap %r", bitmap.name)
        self._refresh()

    @staticmethod
    def _make_inconsistent(bitmap: DirtyBitmap, reason: str) -> None:
        bitmap.inconsistent = True
        bitmap.inconsistent_reason = reason

    def _refresh(self) -> None:
        """Rebuild the recording groups; called after anything that changes bitmaps.

        A summary bit says "every recording bitmap of this granularity is dirty here",
        so the common write, to granules already dirty, costs one bit test per
        granularity however many bitmaps there are. Setting bits in a member never
        falsifies the summary; clearing one (clear, add, enable) goes through here.
        """
        groups: dict[int, list[DirtyBitmap]] = {}
        for bitmap in self.bitmaps.values():
            if bitmap.recording and not bitmap.inconsistent:
                groups.setdefault(bitmap.granularity_bits, []).append(bitmap)
        rebuilt = []
        for shift, members in groups.items():
            summary = members[0].bits.copy()
            for other in members[1:]:
                summary &= other.bits
            rebuilt.append((shift, members, summary))
        self._groups = rebuilt  # one assignment: mark_dirty reads it without the lock
        self.epoch += 1

    # -- the export's DirtyTracker -------------------------------------------------------

    def mark_dirty(self, offset: int, length: int) -> int:
        """Mark every recording bitmap; journal granules that go from clean to dirty.

        The journal record is written before the bits are set and before the caller
        writes data, so a process killed at any point never loses an acknowledged write.

        The common case, granules already dirty everywhere, is a summary test without
        the lock. Racing with a clear or a checkpoint (which reset bits, then bump
        `epoch`) is the caller's to settle: it reads `epoch` before marking and marks
        again if it changed by the time its data is written (Export.change). Returns
        the epoch as it was before marking.
        """
        epoch = self.epoch
        if not length:
            return epoch
        last = offset + length - 1
        for shift, _members, summary in self._groups:
            first, stop = offset >> shift, (last >> shift) + 1
            if not (summary[first] if stop - first == 1 else not summary.count(0, first, stop)):
                break  # something to record: do it all under the lock
        else:
            return epoch
        with self.lock:
            journal = self.journal
            for shift, members, summary in self._groups:
                first, stop = offset >> shift, (last >> shift) + 1
                if summary[first] if stop - first == 1 else not summary.count(0, first, stop):
                    continue  # already dirty in every member: nothing to do
                if journal.fd >= 0:  # one record for the group, before any bit is set
                    journal.append(encode_group_record(shift, first, stop - first))
                for bitmap in members:
                    bitmap.bits[first:stop] = 1
                summary[first:stop] = 1
        return epoch

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
            return self._by_context(context).runs(offset, length, limit)

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

    def execute(self, action: str, arguments: dict) -> None:
        self.transaction([(action, arguments)])

    def transaction(self, actions: Sequence[tuple[str, dict]]) -> None:
        """Apply all actions or none: every check runs first, against the state the
        earlier actions would leave; then everything is applied and saved under the
        lock, so no write falls between two actions."""
        with self.lock:
            if self.read_only:
                raise BitmapError("the bitmaps of a read-only export cannot be changed")
            plan = _Plan(self)
            steps = [plan.check(action, arguments) for action, arguments in actions]
            undo = self._snapshot(actions)
            for step in steps:
                step()
            self._refresh()
            try:
                self._save(in_use=True)
            except OSError:
                # Not persisted, so not done: the caller hears of the failure and the
                # bitmaps are exactly as before.
                self._restore(undo)
                raise
            for action, arguments in actions:
                log.info("bitmap %s %s", action.removeprefix("bitmap-"),
                         ", ".join(f"{k}={v}" for k, v in arguments.items()))

    def _snapshot(self, actions: Sequence[tuple[str, dict]]) -> list[tuple]:
        """What a failed transaction needs to be undone: every bitmap's state, and the
        bits of those it clears or merges into."""
        rewritten = {arguments.get("name") for action, arguments in actions
                     if action == "bitmap-clear"}
        rewritten |= {arguments.get("target") for action, arguments in actions
                      if action == "bitmap-merge"}
        return [(b, b.recording, b.generation, b.inconsistent, b.inconsistent_reason,
                 b.bits.copy() if b.name in rewritten else None)
                for b in self.bitmaps.values()]

    def _restore(self, snapshot: list[tuple]) -> None:
        self.bitmaps = {}
        for bitmap, recording, generation, inconsistent, reason, bits in snapshot:
            bitmap.recording, bitmap.generation = recording, generation
            bitmap.inconsistent, bitmap.inconsistent_reason = inconsistent, reason
            if bits is not None:
                bitmap.bits = bits
            self.bitmaps[bitmap.name] = bitmap
        self._refresh()

    # -- persistence -----------------------------------------------------------------------

    def _save(self, in_use: bool) -> None:
        counter = self.save_counter + 1
        contents = QdbContents(
            identity=self.identity(), in_use=in_use, save_counter=counter,
            bitmaps=[StoredBitmap(b.name, b.granularity_bits, b.generation, b.recording,
                                  b.inconsistent, b.bits) for b in self.bitmaps.values()],
        )
        write_qdb(self.qdb_path, contents)
        self.save_counter = counter
        if in_use:
            self.journal.reset(self.save_counter)
        else:
            self.journal.remove()

    def close(self) -> None:
        """Clean stop: save with the in-use flag cleared and the image's identity."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if not self.read_only:
                    self._save(in_use=False)
                    log.info("saved %d bitmaps to %s", len(self.bitmaps), self.qdb_path)
            finally:
                self.journal.close()
                self._unlock()

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


class _Plan:
    """Checks a transaction's actions against a simulated state, returning one closure
    per action that applies it. Nothing changes until every check has passed."""

    def __init__(self, store: BitmapStore) -> None:
        self.store = store
        # name -> (granularity_bits, recording, busy, inconsistent) as the plan goes
        self.state = {n: [b.granularity_bits, b.recording, b.busy > 0, b.inconsistent]
                      for n, b in store.bitmaps.items()}

    def _get(self, arguments: dict, key: str = "name") -> tuple[str, list]:
        name = arguments.get(key)
        if not isinstance(name, str):
            raise BitmapError(f"Parameter '{key}' is missing or not a string")
        if name not in self.state:
            raise BitmapError(f"Dirty bitmap '{name}' not found", "DeviceNotFound")
        return name, self.state[name]

    @staticmethod
    def _usable(name: str, state: list, *, allow_inconsistent: bool = False) -> None:
        if state[2]:
            raise BitmapError(f"Bitmap '{name}' is currently in use by another operation "
                              "and cannot be used")
        if state[3] and not allow_inconsistent:
            raise BitmapError(f"Bitmap '{name}' is inconsistent and cannot be used; remove or "
                              "clear it")

    def _new(self, arguments: dict, key: str = "name") -> tuple[str, int]:
        name = arguments.get(key)
        if not isinstance(name, str):
            raise BitmapError(f"Parameter '{key}' is missing or not a string")
        check_name(name)
        if name in self.state:
            raise BitmapError(f"Bitmap already exists: {name}")
        granularity = arguments.get("granularity", DEFAULT_GRANULARITY)
        return name, granularity_bits(granularity)

    def check(self, action: str, arguments: dict) -> Callable[[], None]:
        if not isinstance(arguments, dict):
            raise BitmapError("arguments must be an object")
        store = self.store
        bitmaps = store.bitmaps
        if action == "bitmap-add":
            name, gbits = self._new(arguments)
            recording = not arguments.get("disabled", False)
            self.state[name] = [gbits, recording, False, False]

            def add() -> None:
                bitmaps[name] = DirtyBitmap.create(name, store.image_size, 1 << gbits,
                                                   recording)
            return add
        if action == "bitmap-remove":
            name, state = self._get(arguments)
            self._usable(name, state, allow_inconsistent=True)
            del self.state[name]
            return lambda: bitmaps.pop(name)
        if action in ("bitmap-enable", "bitmap-disable"):
            name, state = self._get(arguments)
            self._usable(name, state)
            enable = action == "bitmap-enable"
            state[1] = enable
            return lambda: setattr(bitmaps[name], "recording", enable)
        if action == "bitmap-clear":
            name, state = self._get(arguments)
            self._usable(name, state, allow_inconsistent=True)
            state[3] = False
            return lambda: bitmaps[name].clear()
        if action == "bitmap-merge":
            target, state = self._get(arguments, "target")
            self._usable(target, state)
            sources = arguments.get("bitmaps")
            if not isinstance(sources, list) or not sources:
                raise BitmapError("Parameter 'bitmaps' must be a non-empty list")
            for source in sources:
                if not isinstance(source, str) or source not in self.state:
                    raise BitmapError(f"Dirty bitmap '{source}' not found", "DeviceNotFound")
                if self.state[source][3]:
                    raise BitmapError(f"Bitmap '{source}' is inconsistent and cannot be used")
                if self.state[source][0] != state[0]:
                    raise BitmapError(f"Bitmap '{source}' has granularity "
                                      f"{1 << self.state[source][0]} but '{target}' has "
                                      f"{1 << state[0]}; merge needs equal granularities")

            def merge() -> None:
                for source in sources:
                    bitmaps[target].merge_from(bitmaps[source])
            return merge
        if action == "bitmap-checkpoint":
            old, state = self._get(arguments, "old")
            self._usable(old, state)
            new_arguments = {"name": arguments.get("new"),
                             "granularity": arguments.get("granularity",
                                                          1 << state[0])}
            new, gbits = self._new(new_arguments)
            state[1] = False
            self.state[new] = [gbits, True, False, False]

            def checkpoint() -> None:
                bitmaps[old].recording = False
                bitmaps[new] = DirtyBitmap.create(new, store.image_size, 1 << gbits, True)
            return checkpoint
        raise BitmapError(f"unknown action {action!r} (known: {', '.join(ACTIONS)})",
                          "CommandNotFound")
