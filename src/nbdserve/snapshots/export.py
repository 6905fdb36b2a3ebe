"""A snapshot served as an export of its own (QEMU's snapshot-access node over NBD).

Clients read it like any export. It is not read-only on the wire: TRIM is how a backup
client says it has finished with a range (QEMU's fleecing discard), so the export
advertises SEND_TRIM and no READ_ONLY flag, as QEMU's fleecing exports do; WRITE and
WRITE_ZEROES are refused with EPERM (the request validator refuses them before any
payload is used: see ``discard_only``), and WRITE_ZEROES is not advertised.

Meta contexts: ``base:allocation`` as of the instant, and for a snapshot taken with a
checkpoint ``qemu:dirty-bitmap:OLD``, the frozen bitmap's bits as of the instant (a
copy: removing or clearing the bitmap later does not change what the snapshot says).
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Iterable, Sequence

from nbdserve.config import ExportConfig
from nbdserve.errors import RequestError
from nbdserve.export import Export
from nbdserve.protocol import constants as c
from nbdserve.snapshots.cbw import Snapshot


class SnapshotExport(Export):
    discard_only = True

    def __init__(self, parent: Export, snapshot: Snapshot) -> None:
        what = f"of {parent.name!r}" + (f" at checkpoint {snapshot.bitmap!r}"
                                         if snapshot.bitmap else "")
        config = ExportConfig(name=snapshot.name, image=parent.image.path,
                              description=f"point-in-time snapshot {what}",
                              tls_required=parent.tls_required)
        super().__init__(config, parent.image)
        self.parent = parent
        self.snapshot = snapshot
        self.read = snapshot.read_pieces
        self.stats.timing = parent.stats.timing

    def meta_contexts(self) -> Sequence[str]:
        names = [c.BASE_ALLOCATION]
        if self.snapshot.bitmap is not None:
            names.append(c.QEMU_DIRTY_BITMAP_PREFIX + self.snapshot.bitmap)
        return names

    # -- changes: refused, but for TRIM ---------------------------------------------------

    def _refuse(self, *_args, **_kwargs):
        raise RequestError(errno.EPERM, "a snapshot is read-only (TRIM releases what was "
                                        "backed up)")

    write = zero = _refuse

    def write_from_pipe(self, pipe_fd: int, offset: int,
                        count: int) -> tuple[int, OSError | None]:
        return 0, RequestError(errno.EPERM, "a snapshot is read-only")

    def trim(self, offset: int, length: int) -> None:
        """TRIM: the client is done with this range; its scratch space is freed."""
        self.snapshot.discard(offset, length)

    def flush(self) -> None:
        """Nothing to make durable: the scratch file does not outlive the process."""

    # -- reads -----------------------------------------------------------------------------

    def is_cached(self, offset: int, length: int) -> bool:
        return self.snapshot.is_cached(offset, length)

    def data_runs(self, offset: int, length: int, sparse: bool):
        return self.snapshot.data_runs(offset, length, sparse)

    def send_to(self, sockfd: int, offset: int, count: int) -> int:
        return self.snapshot.send_to(sockfd, offset, count)

    def allocation_words(self, offset: int, length: int, limit: int, data: int, hole: int,
                         typecode: str) -> array:
        return self.snapshot.allocation_words(offset, length, limit, data, hole, typecode)

    def dirty_runs(self, context: str, offset: int, length: int,
                   limit: int) -> tuple[list[int], bool]:
        snapshot = self.snapshot
        if snapshot.dirty is not None and \
                context == c.QEMU_DIRTY_BITMAP_PREFIX + (snapshot.bitmap or ""):
            return snapshot.dirty.runs(offset, length, limit)
        raise RequestError(errno.EINVAL, f"no metadata context {context!r}")

    # -- the rest --------------------------------------------------------------------------

    def hold(self, contexts: Iterable[str]) -> list[str]:
        return []  # the snapshot's bitmap is its own copy: nothing of the store is held

    def describe(self) -> dict:
        return {**super().describe(), "read-only": True, "bitmaps": [],
                "snapshot-of": self.parent.name, "snapshot": self.snapshot.describe()}

    def close(self) -> None:
        """Stop preserving for this snapshot and delete its scratch data; the image
        is the parent's and stays open."""
        self.parent.preservers = tuple(p for p in self.parent.preservers
                                       if p is not self.snapshot)
        self.snapshot.close()
