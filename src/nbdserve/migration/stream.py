"""The migration channel between two nbdserve processes: framing, sans-I/O.

Every message is a 24-byte header, then ``payload_length`` bytes:

    u8  kind          (Kind)
    u8  zero[3]
    u32 payload_length
    u64 offset        (DATA, ZERO: where in the image; BITS: the bitmap's index)
    u64 length        (DATA, ZERO: how many bytes; BITS: the first granule)

all big-endian. The source speaks first (HELLO) and the target answers each step that
needs an answer (WELCOME, READY, DONE); either side may send ABORT with a reason and
hang up. Metadata payloads (HELLO, WELCOME, BITMAPS) are JSON; DATA carries the bytes
and BITS a bitmap's bits, LSB-first as the QDB file stores them, from a granule that
is a multiple of 8. docs/migration.md tells the whole conversation.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass

from bitarray import bitarray

from nbdserve.bitmaps.bitmap import granule_count
from nbdserve.values import MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, check_bitmap_name

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">B3xIQQ")
MAX_PAYLOAD = 40 << 20  # the largest DATA (32 MiB) with room to spare
MAX_META = 16 << 20  # JSON payloads: a few thousand bitmaps at most


class Kind(enum.IntEnum):
    HELLO = 1  # source: {"protocol", "export", "size"}
    WELCOME = 2  # target: {"export", "listen"}: where it will serve NBD; ready
    DATA = 3  # bytes at offset
    ZERO = 4  # [offset, offset+length) reads as zeros (punched)
    BITMAPS = 5  # source: every bitmap's description (JSON list); bits follow as BITS
    BITS = 6  # part of one bitmap's bits
    SWITCHOVER = 7  # source, paused: everything is sent; make it durable
    READY = 8  # target: data and bitmaps are durable
    GO = 9  # source: the source has stopped for good; serve
    DONE = 10  # target: serving
    ABORT = 11  # either side: UTF-8 reason; the migration ends
    SYNC = 12  # source, before the pause: make what you have durable now...
    SYNCED = 13  # target: ...done (so the pause's own sync has little left to write)


class ChannelError(Exception):
    """The peer broke the channel's rules, or aborted; the message says which."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    offset: int = 0
    length: int = 0
    payload: bytes = b""

    def meta(self):
        """A JSON payload, decoded; ChannelError if it is not JSON."""
        try:
            return json.loads(self.payload)
        except (ValueError, RecursionError) as exc:
            raise ChannelError(f"{self.kind.name}: payload is not JSON ({exc})") from None


def encode(kind: Kind, offset: int = 0, length: int = 0, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, len(payload), offset, length) + payload


def encode_meta(kind: Kind, value) -> bytes:
    return encode(kind, payload=json.dumps(value).encode())


def decode_header(header: bytes) -> tuple[Kind, int, int, int]:
    """(kind, payload length, offset, length); ChannelError for a header no peer
    sends."""
    raw_kind, payload_length, offset, length = HEADER.unpack(header)
    try:
        kind = Kind(raw_kind)
    except ValueError:
        raise ChannelError(f"unknown message kind {raw_kind}") from None
    if header[1:4] != b"\0\0\0":
        raise ChannelError("reserved header bytes are not zero")
    limit = MAX_PAYLOAD if kind in (Kind.DATA, Kind.BITS) else MAX_META
    if payload_length > limit:
        raise ChannelError(f"{kind.name} payload of {payload_length} bytes is over {limit}")
    if kind == Kind.DATA and payload_length != length:
        raise ChannelError(f"DATA of {length} bytes carries {payload_length}")
    return kind, payload_length, offset, length


# -- bitmaps ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BitmapMeta:
    """What the target needs to rebuild a bitmap besides its bits."""

    name: str
    granularity_bits: int
    generation: int
    recording: bool
    inconsistent: bool
    granules: int

    def as_json(self) -> dict:
        return {"name": self.name, "granularity-bits": self.granularity_bits,
                "generation": self.generation, "recording": self.recording,
                "inconsistent": self.inconsistent, "granules": self.granules}

    @classmethod
    def from_json(cls, value, image_size: int) -> BitmapMeta:
        """A description from BITMAPS, checked against the image it is for (its bits
        are allocated from it: a wrong count must not cost memory)."""
        try:
            meta = cls(str(value["name"]), int(value["granularity-bits"]),
                       int(value["generation"]), bool(value["recording"]),
                       bool(value["inconsistent"]), int(value["granules"]))
            check_bitmap_name(meta.name)
        except (KeyError, TypeError, ValueError) as exc:
            raise ChannelError(f"BITMAPS: a bitmap's description is wrong ({exc})") from None
        if not MIN_GRANULARITY_BITS <= meta.granularity_bits <= MAX_GRANULARITY_BITS or \
                meta.granules != granule_count(image_size, meta.granularity_bits) or \
                not 0 <= meta.generation < 1 << 64:
            raise ChannelError(f"BITMAPS: bitmap {meta.name!r} does not fit a "
                               f"{image_size}-byte image")
        return meta


def bits_message(index: int, bits: bitarray, first: int, stop: int) -> bytes:
    """BITS for granules [first, stop) of a bitmap, widened to whole bytes."""
    first &= ~7
    stop = min((stop + 7) & ~7, len(bits))
    return encode(Kind.BITS, index, first, bits[first:stop].tobytes())


def apply_bits(bits: bitarray, first: int, payload: bytes) -> None:
    """Overwrite a bitmap's bits from granule ``first`` with a BITS payload (the
    source's values there, which are the truth, whatever the target had)."""
    if first % 8 or first > len(bits):
        raise ChannelError(f"BITS from granule {first}: not a byte boundary inside the bitmap")
    part = bitarray(endian="little")
    part.frombytes(payload)
    stop = min(first + len(part), len(bits))
    if first + len(part) - stop >= 8:
        raise ChannelError(f"BITS from granule {first} run past the bitmap's end")
    bits[first:stop] = part[:stop - first]
