"""The crash journal beside a QDB file (dm-era's rule).

Before the first write to a clean granule is acknowledged, a record naming the newly
dirty granules is appended here with one write(2). The record reaches the kernel before
the data does, so a killed process loses nothing; it is fdatasync'ed before any FLUSH
or FUA reply, so it is durable no later than the data it covers. At start-up the
records are replayed onto the bitmaps of the QDB file, which is then saved anew.

Layout (big-endian): a 32-byte header, then 32-byte records.
  header: magic "QDBJ", u32 version 1, u64 save_counter (the QDB save it extends),
          u64 reserved 0, u32 CRC-32 of the preceding 24 bytes, u32 reserved 0
  record: u64 bitmap generation, u64 first granule, u64 granule count,
          u32 CRC-32 of the preceding 24 bytes, u32 reserved 0
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from nbdserve.bitmaps.files import fsync_directory, replace_atomically

JOURNAL_MAGIC = b"QDBJ"
JOURNAL_VERSION = 1
HEADER = struct.Struct(">4sIQQII")
RECORD = struct.Struct(">QQQII")
RECORD_BODY = struct.Struct(">QQQ")
assert HEADER.size == RECORD.size == 32


class JournalError(Exception):
    """The journal cannot be trusted; its bitmaps must be treated as inconsistent."""


@dataclass(frozen=True, slots=True)
class JournalRecord:
    generation: int
    first_granule: int
    granules: int


def encode_record(generation: int, first: int, count: int) -> bytes:
    body = RECORD_BODY.pack(generation, first, count)
    return body + struct.pack(">II", zlib.crc32(body) & 0xFFFFFFFF, 0)


def encode_header(save_counter: int) -> bytes:
    body = struct.pack(">4sIQQ", JOURNAL_MAGIC, JOURNAL_VERSION, save_counter, 0)
    return body + struct.pack(">II", zlib.crc32(body) & 0xFFFFFFFF, 0)


def read_journal(path: str) -> tuple[int, list[JournalRecord]]:
    """Return (save_counter, records); a torn last record (a crash mid-append) is
    ignored, any other damage raises JournalError."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise JournalError("journal is missing") from None
    if len(data) < HEADER.size:
        raise JournalError("journal header is truncated")
    magic, version, save_counter, reserved, crc, reserved2 = HEADER.unpack_from(data)
    if magic != JOURNAL_MAGIC or version != JOURNAL_VERSION:
        raise JournalError("journal has a bad magic or version")
    if zlib.crc32(data[:24]) & 0xFFFFFFFF != crc or reserved or reserved2:
        raise JournalError("journal header checksum mismatch")
    records = []
    body = data[HEADER.size:]
    whole = len(body) // RECORD.size
    for index in range(whole):
        chunk = body[index * RECORD.size : (index + 1) * RECORD.size]
        generation, first, count, crc, reserved = RECORD.unpack(chunk)
        if zlib.crc32(chunk[:24]) & 0xFFFFFFFF != crc or reserved:
            if index == whole - 1:
                break  # a torn final record was never acknowledged
            raise JournalError(f"journal record {index} is corrupted")
        records.append(JournalRecord(generation, first, count))
    return save_counter, records


class Journal:
    """The open journal of a running server."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.unsynced = False

    def reset(self, save_counter: int) -> None:
        """Start an empty journal that extends the QDB save `save_counter`."""
        replace_atomically(self.path, encode_header(save_counter))
        self.close()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.unsynced = False

    def append(self, records: bytes) -> None:
        view = memoryview(records)
        while view:
            view = view[os.write(self.fd, view):]
        self.unsynced = True

    def sync(self) -> None:
        if self.unsynced and self.fd >= 0:
            self.unsynced = False
            os.fdatasync(self.fd)

    def close(self) -> None:
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
