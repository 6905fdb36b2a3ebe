"""What a crashed server leaves behind about its image: the crash journal's watch slot.

After a clean stop the QDB file holds the image's identity (size, inode, mtime,
ctime), and any difference at the next start means the image changed while no server
ran. After ``kill -9`` there is no final identity: the server's own writes moved the
times. This watch lets the journal carry one, at a cost of one attribute test per
change:

- The first change after the image was at rest stores a heartbeat (the wall clock)
  in the slot and wakes the watch thread. That is one store into the mapped journal.
- The thread looks ``PERIOD`` later. A change in progress at that instant: a fresh
  heartbeat, and another look later. None: it reads the image's ctime and mtime
  (fstat) and stores them with no heartbeat: at rest. That holds until the next
  change, which unsettles again before it lands, so the stored times are exact.

After a crash (recovery.py) the slot decides:
- at rest: the image's ctime and mtime must be exactly those stored. Reading the
  ctime also makes the kernel give the next change a fine-grained one (Linux 6.13
  and later), so even a write a microsecond after the crash shows;
- changes under way: every change the server made has a ctime no later than the
  last heartbeat plus ``GRACE`` (a heartbeat is stored at least every PERIOD while
  changes are under way; GRACE adds room for a late wake-up). A ctime past that is a
  change made after the server died. A change made within GRACE of a crash that
  happened mid-write cannot be told from the server's own: that window is the cost
  of not reading the ctime after every write (an fstat per write costs more than a
  fifth of a 4 KiB write here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sized

from nbdserve.bitmaps.journal import Journal, encode_watch

PERIOD = 0.02  # seconds between looks while changes go on
GRACE_NS = 500_000_000  # after a crash mid-write: ctime may pass the heartbeat by this


class ImageWatch:
    def __init__(self, journal: Journal, image_fd: int, lock: threading.RLock) -> None:
        self.journal = journal
        self.image_fd = image_fd
        # The export's count of changes under way (ChangeGate.active): set by the export.
        self.under_way: Sized = ()
        self.at_rest = True  # the slot says the image is at rest (or unchanged)
        self._lock = lock  # the store's, which also guards the journal's mapping
        self._changes = 0  # bumped by each unsettle: a look that raced one stores nothing
        self._wake = threading.Event()
        self._stopped = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbdserve-watch", daemon=True)
        self._thread.start()

    def unsettle(self) -> None:
        """A change is about to land (Export._record, any thread, before the change;
        called only while ``at_rest``)."""
        with self._lock:
            self.at_rest = False
            self._changes += 1
            self.journal.store_watch(encode_watch(0, 0, time.time_ns()))
        self._wake.set()

    def _run(self) -> None:
        # _stopped is tested before each wait: a look that found the image at rest
        # clears the event, possibly after stop() set it. The pause before a look
        # waits on _stopping, so a stop never waits for it.
        while not self._stopped:
            self._wake.wait()
            if not self._stopping.wait(PERIOD):
                self._look()

    def _look(self) -> None:
        """Store the image's times if no change is under way, else a heartbeat."""
        with self._lock:
            changes = self._changes
            self.at_rest = True  # a change that starts now calls unsettle
            if self.under_way:
                self._busy()
                return
        # Nothing under way, and any change that starts from here on unsettles: the
        # times read now are final unless _changes moves.
        st = os.fstat(self.image_fd)
        with self._lock:
            if self._changes != changes:
                return  # that change stored its heartbeat and woke us again
            if self.under_way:
                self._busy()
                return
            self.journal.store_watch(encode_watch(st.st_ctime_ns, st.st_mtime_ns, 0))
            self._wake.clear()

    def _busy(self) -> None:
        self.at_rest = False
        self.journal.store_watch(encode_watch(0, 0, time.time_ns()))

    def stop(self) -> None:
        self._stopped = True
        self._stopping.set()
        self._wake.set()
        self._thread.join()

