"""The crash journal beside a QDB file (dm-era's rule).

Before the first write to a clean granule is acknowledged, a record naming the newly
dirty granules is stored here. The file is mapped shared (mmap), so the record is in the
kernel's page cache the moment it is stored, before the data is written: a killed
process loses nothing, and a record costs no system call (a write(2) per record was
half the cost of dirty tracking). The journal is fdatasync'ed before any FLUSH or FUA
reply, which writes mapped pages back too, so it is durable no later than the data it
covers. At start-up the records are replayed onto the bitmaps of the QDB file, which is
then saved anew.

The file is allocated ahead (fallocate, so that a full disk is an error at growth and
never a fault on a mapped page); the records end at the first all-zero record.

Layout (big-endian): a 32-byte header, a 32-byte watch slot (version 3), then 32-byte
records, then zeros.
  header: magic "QDBJ", u32 version (3; 1 and 2, which have no watch slot, are still
          read), u64 save_counter (the QDB save it extends), u64 reserved 0, u32 CRC-32
          of the preceding 24 bytes, u32 reserved 0
  watch slot (bitmaps/watch.py), rewritten in place: u64 image ctime (ns), u64 image
          mtime (ns), u64 heartbeat (ns since the epoch), u32 reserved 0, u32 CRC-32 of
          the preceding 28 bytes. All zero: the image has not changed since the QDB
          save this journal extends. A heartbeat of 0: the image was at rest with this
          ctime and mtime. Otherwise: changes were under way at the heartbeat's time.
  record, version 2: u64 generation, u64 first granule, u64 granule count,
          u32 granularity bits, u32 CRC-32 of the preceding 28 bytes.
          Generation 0 is a group record: it applies to every bitmap with that
          granularity that was recording in the save the journal extends (the set
          cannot change without a new save and a new journal). One group record per
          transition, however many bitmaps, is what keeps transitions cheap.
          Otherwise it applies to the bitmap of that generation (granularity bits 0).
  record, version 1: u64 generation, u64 first granule, u64 granule count,
          u32 CRC-32 of the preceding 24 bytes, u32 reserved 0
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

from nbdserve.bitmaps.files import fsync_directory, replace_atomically

JOURNAL_MAGIC = b"QDBJ"
JOURNAL_VERSION = 3
HEADER = struct.Struct(">4sIQQII")
WATCH = struct.Struct(">QQQII")
WATCH_BODY = struct.Struct(">QQQI")
WATCH_UNSET = bytes(WATCH.size)
RECORD = struct.Struct(">QQQII")  # version 2: ..., granularity bits, CRC
RECORD_BODY = struct.Struct(">QQQI")
RECORD_V1_BODY = struct.Struct(">QQQ")
assert HEADER.size == RECORD.size == 32
_ZERO_RECORD = bytes(RECORD.size)
INITIAL_SIZE = 64 << 10  # bytes allocated at first; doubled when full


class JournalError(Exception):
    """The journal cannot be trusted; its bitmaps must be treated as inconsistent."""


@dataclass(frozen=True, slots=True)
class JournalRecord:
    generation: int  # 0: a group record (see granularity_bits)
    first_granule: int
    granules: int
    granularity_bits: int = 0  # of the group, for generation 0


def encode_record(generation: int, first: int, count: int) -> bytes:
    """A record for the bitmap of one generation."""
    return RECORD.pack(generation, first, count, 0,
                       zlib.crc32(RECORD_BODY.pack(generation, first, count, 0)))


def encode_group_record(granularity_bits: int, first: int, count: int) -> bytes:
    """A record for every recording bitmap with this granularity."""
    return RECORD.pack(0, first, count, granularity_bits,
                       zlib.crc32(RECORD_BODY.pack(0, first, count, granularity_bits)))


def encode_header(save_counter: int, watch: bytes = WATCH_UNSET) -> bytes:
    """The header and the watch slot: everything before the first record."""
    body = struct.pack(">4sIQQ", JOURNAL_MAGIC, JOURNAL_VERSION, save_counter, 0)
    return body + struct.pack(">II", zlib.crc32(body) & 0xFFFFFFFF, 0) + watch


def encode_watch(ctime_ns: int, mtime_ns: int, heartbeat_ns: int) -> bytes:
    return WATCH.pack(ctime_ns, mtime_ns, heartbeat_ns, 0,
                      zlib.crc32(WATCH_BODY.pack(ctime_ns, mtime_ns, heartbeat_ns, 0)))


@dataclass(frozen=True, slots=True)
class WatchSlot:
    """What the watch slot said (see the module's docstring)."""

    ctime_ns: int
    mtime_ns: int
    heartbeat_ns: int
    unset: bool = False  # all zero: no change since the QDB save
    damaged: bool = False  # a torn or corrupted slot: nothing can be concluded


class JournalContents(NamedTuple):
    save_counter: int
    records: list[JournalRecord]
    watch: WatchSlot | None  # None: a journal from before the slot (version 1 or 2)


def decode_watch(raw: bytes) -> WatchSlot:
    if raw == WATCH_UNSET:
        return WatchSlot(0, 0, 0, unset=True)
    ctime_ns, mtime_ns, heartbeat_ns, reserved, crc = WATCH.unpack(raw)
    if zlib.crc32(raw[:28]) != crc or reserved:
        return WatchSlot(0, 0, 0, damaged=True)
    return WatchSlot(ctime_ns, mtime_ns, heartbeat_ns)


def read_journal(path: str) -> JournalContents:
    """Return the save counter, the records and the watch slot; a torn last record (a
    crash mid-append) is ignored, any other damage raises JournalError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise JournalError("journal is missing") from None
    if len(data) < HEADER.size:
        raise JournalError("journal header is truncated")
    magic, version, save_counter, reserved, crc, reserved2 = HEADER.unpack_from(data)
    if magic != JOURNAL_MAGIC or version not in (1, 2, JOURNAL_VERSION):
        raise JournalError("journal has a bad magic or version")
    if zlib.crc32(data[:24]) & 0xFFFFFFFF != crc or reserved or reserved2:
        raise JournalError("journal header checksum mismatch")
    records = []
    watch = None
    start = HEADER.size
    if version >= 3:
        if len(data) < HEADER.size + WATCH.size:
            raise JournalError("journal watch slot is truncated")
        watch = decode_watch(data[HEADER.size : HEADER.size + WATCH.size])
        start += WATCH.size
    body = data[start:]
    whole = len(body) // RECORD.size
    for index in range(whole):
        chunk = body[index * RECORD.size : (index + 1) * RECORD.size]
        if chunk == _ZERO_RECORD:
            break  # the allocated space after the last record
        if version == 1:
            generation, first, count, crc, reserved = RECORD.unpack(chunk)
            bits, valid = 0, zlib.crc32(chunk[:24]) == crc and not reserved
        else:
            generation, first, count, bits, crc = RECORD.unpack(chunk)
            valid = zlib.crc32(chunk[:28]) == crc and (bits == 0) == (generation != 0)
        if not valid:
            if not body[(index + 1) * RECORD.size:].strip(b"\0"):
                break  # a torn final record was never acknowledged
            raise JournalError(f"journal record {index} is corrupted")
        records.append(JournalRecord(generation, first, count, bits))
    return JournalContents(save_counter, records, watch)


class Journal:
    """The open journal of a running server."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.map: mmap.mmap | None = None
        self.end = 0  # where the next record goes
        self.unsynced = False
        self.watch = WATCH_UNSET  # the slot's bytes, carried into a reset journal

    def reset(self, save_counter: int) -> None:
        """Start an empty journal that extends the QDB save `save_counter` (the watch
        slot carries over: it describes the image, not the save)."""
        head = encode_header(save_counter, self.watch)
        replace_atomically(self.path, head)
        self.close()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        self.end = len(head)
        self._grow(INITIAL_SIZE)
        self.unsynced = False

    def store_watch(self, slot: bytes) -> None:
        """Rewrite the watch slot in place (a store into the mapping, no system call).
        It does not make the next FLUSH sync the journal: the slot guards against a
        kill, which the page cache survives. After a power loss a stale slot can only
        disagree with the image, which makes the bitmaps inconsistent (safe); the
        records, which the bits depend on, are synced as before."""
        self.watch = slot
        if self.map is not None:
            self.map[HEADER.size : HEADER.size + WATCH.size] = slot

    def append(self, records: bytes) -> None:
        end = self.end + len(records)
        if end > len(self.map):
            self._grow(max(2 * len(self.map), end))
        self.map[self.end:end] = records
        self.end = end
        self.unsynced = True

    def _grow(self, size: int) -> None:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        os.posix_fallocate(self.fd, 0, size)  # ENOSPC here, not SIGBUS on a store
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)

    def sync(self) -> None:
        if self.unsynced and self.fd >= 0:
            self.unsynced = False
            os.fdatasync(self.fd)  # mapped pages included

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fsync_directory(os.path.dirname(os.path.abspath(self.path)))
