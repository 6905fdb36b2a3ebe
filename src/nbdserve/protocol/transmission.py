"""The transmission phase, sans I/O (spec: "Transmission"): request framing, every
rule a request must pass, and reply encoding.

``TransmissionRules`` decides, from a request header alone, how many payload bytes
follow it and whether the connection must end (a bad magic, an oversized WRITE, DISC);
then what error, if any, the request earns (``check``), including ESHUTDOWN once the
server is stopping. The asyncio layer (server/transmission.py) only moves bytes.

Pure functions and precompiled structs: this is the per-request hot path, so it avoids
per-request objects and copies where it can.
"""

from __future__ import annotations

import enum
import functools
import struct
import sys
from array import array

from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c

REQUEST_HEADER = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
# Extended headers (NBD_OPT_EXTENDED_HEADERS): the same fields, a 64-bit length.
EXTENDED_REQUEST_HEADER = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")  # chunk header + offset
OFFSET_HOLE_CHUNK = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
ERROR_CHUNK_HEADER = struct.Struct(">IHHQIIH")  # chunk header + error + message length
BLOCK_STATUS_HEADER = struct.Struct(">IHHQII")  # chunk header + context id
# Extended reply chunks: magic, flags, type, cookie, the request's offset, a 64-bit
# payload length; then each type's fields as in the compact form.
EXTENDED_CHUNK_HEADER = struct.Struct(">IHHQQQ")
EXTENDED_OFFSET_DATA_HEADER = struct.Struct(">IHHQQQQ")  # + offset
EXTENDED_OFFSET_HOLE_CHUNK = struct.Struct(">IHHQQQQI")  # + offset + hole size
EXTENDED_ERROR_CHUNK_HEADER = struct.Struct(">IHHQQQIH")  # + error + message length
EXTENDED_BLOCK_STATUS_HEADER = struct.Struct(">IHHQQQII")  # + context id + count

_WRITE_COMMANDS = (c.NBD_CMD_WRITE, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_TRIM)
# Bound once for check(), which runs per request: a module attribute costs a lookup
# more than a global, and a tuple of them would be built at every call.
_RANGELESS = frozenset((c.NBD_CMD_DISC, c.NBD_CMD_FLUSH))  # offset and length unused
_CMD_READ, _CMD_WRITE = c.NBD_CMD_READ, c.NBD_CMD_WRITE
_CMD_WRITE_ZEROES, _CMD_TRIM = c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_TRIM
_CMD_BLOCK_STATUS, _MAX_PAYLOAD = c.NBD_CMD_BLOCK_STATUS, c.MAX_PAYLOAD
_EINVAL, _EPERM, _ENOSPC = c.NBD_EINVAL, c.NBD_EPERM, c.NBD_ENOSPC
_VALID = (0, "")
_BIG_ENDIAN_HOST = sys.byteorder == "big"


class RequestValidator:
    """Every spec rule a request must pass, each with the error it earns.

    Built once per connection from what was negotiated, so ``check`` is a handful of
    comparisons per request.
    """

    __slots__ = ("size", "read_only", "discard_only", "allowed_flags", "has_contexts")

    def __init__(self, size: int, transmission_flags: int, structured_replies: bool,
                 has_contexts: bool, discard_only: bool = False,
                 extended_headers: bool = False) -> None:
        self.size = size
        self.read_only = bool(transmission_flags & c.NBD_FLAG_READ_ONLY)
        # A snapshot export: not flagged read-only (TRIM is how a client releases what
        # it backed up), but WRITE and WRITE_ZEROES earn EPERM all the same.
        self.discard_only = discard_only
        self.has_contexts = has_contexts
        fua = c.NBD_CMD_FLAG_FUA if transmission_flags & c.NBD_FLAG_SEND_FUA else 0
        # Spec: FUA is valid on any command once SEND_FUA is advertised; every other
        # flag belongs to one command and only once its feature was negotiated.
        zero_flags = fua | c.NBD_CMD_FLAG_NO_HOLE
        if transmission_flags & c.NBD_FLAG_SEND_FAST_ZERO:
            zero_flags |= c.NBD_CMD_FLAG_FAST_ZERO
        # Extended headers: PAYLOAD_LEN on WRITE (where it is the rule), and on
        # BLOCK_STATUS once BLOCK_STATUS_PAYLOAD is advertised.
        payload_len = c.NBD_CMD_FLAG_PAYLOAD_LEN if extended_headers else 0
        status_payload = payload_len if \
            transmission_flags & c.NBD_FLAG_BLOCK_STATUS_PAYLOAD else 0
        self.allowed_flags = {
            c.NBD_CMD_READ: fua | (c.NBD_CMD_FLAG_DF if structured_replies else 0),
            c.NBD_CMD_WRITE: fua | payload_len,
            c.NBD_CMD_DISC: fua,
            c.NBD_CMD_FLUSH: fua,
            c.NBD_CMD_TRIM: fua,
            c.NBD_CMD_CACHE: fua,
            c.NBD_CMD_WRITE_ZEROES: zero_flags,
            c.NBD_CMD_BLOCK_STATUS: fua | c.NBD_CMD_FLAG_REQ_ONE | status_payload,
        }

    def check(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """Return (0, "") for a valid request, else (NBD error, short reason)."""
        allowed = self.allowed_flags.get(command)
        if allowed is None:
            return _EINVAL, f"unknown command {command}"
        if self.read_only and command in _WRITE_COMMANDS:
            return _EPERM, "export is read-only"
        if self.discard_only and command in _WRITE_COMMANDS and command != _CMD_TRIM:
            return _EPERM, "a snapshot is read-only (TRIM releases what was backed up)"
        if offset + length > self.size and command not in _RANGELESS:
            # Spec: writes past the end earn ENOSPC, everything else EINVAL.
            if command in (_CMD_WRITE, _CMD_WRITE_ZEROES):  # (the error path)
                return _ENOSPC, "request past the end of the export"
            return _EINVAL, "request past the end of the export"
        if flags & ~allowed:
            return _EINVAL, f"flags 0x{flags:x} not valid for this command"
        if command == _CMD_READ and length > _MAX_PAYLOAD:
            return _EINVAL, "read larger than 32 MiB"
        if command == _CMD_BLOCK_STATUS:
            if not self.has_contexts:
                return _EINVAL, "no metadata context negotiated"
            if length == 0:
                return _EINVAL, "block status needs a non-zero length"
        return _VALID


class Phase(enum.Enum):
    SERVING = "serving"
    STOPPING = "stopping"  # the server is shutting down: requests earn ESHUTDOWN
    CLOSED = "closed"  # DISC received or the client broke the framing: nothing more


DISCONNECT = -1  # what frame() returns for NBD_CMD_DISC


class TransmissionRules:
    """Framing and validation of one connection's requests, with its phase."""

    __slots__ = ("validator", "phase", "check")

    def __init__(self, validator: RequestValidator, stopping: bool = False) -> None:
        self.validator = validator
        self.phase = Phase.SERVING
        # check(command, flags, offset, length) -> (0, "") or (NBD error, reason): the
        # validator's while serving, ESHUTDOWN for everything once stopping. Bound
        # per phase, so the per-request call is the rule itself.
        self.check = validator.check
        if stopping:
            self.stop()

    def frame(self, magic: int, flags: int, command: int, length: int) -> int:
        """Payload bytes that follow this header (a WRITE's length, else 0), or
        DISCONNECT for DISC. Raises ProtocolViolation when the only safe answer is to
        hang up: after a bad magic or an unreadable payload the stream is out of step."""
        if magic != c.NBD_REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise ProtocolViolation(f"bad request magic 0x{magic:x}")
        if command == c.NBD_CMD_WRITE:
            if length > c.MAX_PAYLOAD:
                # Spec: a payload over the advertised maximum may be treated as hostile,
                # and reading 4 GiB to stay in step is not an option; QEMU hangs up too.
                self.phase = Phase.CLOSED
                raise ProtocolViolation(f"write payload of {length} bytes")
            return length
        if command == c.NBD_CMD_DISC:
            self.phase = Phase.CLOSED
            return DISCONNECT
        return 0

    @staticmethod
    def _shutting_down(command: int, flags: int, offset: int,
                       length: int) -> tuple[int, str]:
        # Spec: once ESHUTDOWN is sent the client must disconnect; requests already
        # accepted still complete.
        return c.NBD_ESHUTDOWN, "server is shutting down"

    @property
    def closed(self) -> bool:
        """DISC was received, or the framing broke: nothing more will be read."""
        return self.phase is Phase.CLOSED

    def stop(self) -> None:
        """The server is shutting down: from now on every request earns ESHUTDOWN."""
        if self.phase is Phase.SERVING:
            self.phase = Phase.STOPPING
            self.check = self._shutting_down


class ExtendedTransmissionRules(TransmissionRules):
    """The same rules for a connection that negotiated extended headers: only the
    framing differs (a class of its own, so the compact path carries no test for it)."""

    __slots__ = ()

    def frame(self, magic: int, flags: int, command: int, length: int) -> int:
        """The same for a 32-byte request. With PAYLOAD_LEN the length is the payload's
        (any command: one that takes none is read and then refused); without it, the
        effect length and no payload, except for WRITE, whose length is its payload
        either way: QEMU 10's client sends WRITE without the flag, and QEMU's server
        takes it (docs/protocol.md)."""
        if magic != c.NBD_EXTENDED_REQUEST_MAGIC:
            self.phase = Phase.CLOSED
            raise ProtocolViolation(f"bad extended request magic 0x{magic:x}")
        if command == c.NBD_CMD_DISC:
            self.phase = Phase.CLOSED
            return DISCONNECT
        if command == c.NBD_CMD_WRITE or flags & c.NBD_CMD_FLAG_PAYLOAD_LEN:
            if length > c.MAX_PAYLOAD:
                self.phase = Phase.CLOSED
                raise ProtocolViolation(f"request payload of {length} bytes")
            return length
        return 0


_SIMPLE_REPLY_MAGIC = c.NBD_SIMPLE_REPLY_MAGIC


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(_SIMPLE_REPLY_MAGIC, error, cookie)


# simple_ok(cookie) is simple_reply(cookie) for a request that succeeded (one per
# WRITE), bound in C so the call costs no Python frame.
simple_ok = functools.partial(SIMPLE_REPLY.pack, _SIMPLE_REPLY_MAGIC, 0)


def none_chunk(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(
        c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_NONE, cookie, 0
    )


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    text = message.encode()[: c.MAX_ERROR_MESSAGE]
    return ERROR_CHUNK_HEADER.pack(
        c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_ERROR,
        cookie, 6 + len(text), error, len(text),
    ) + text


def offset_data_header(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return OFFSET_DATA_HEADER.pack(
        c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset,
    )


def offset_hole_chunk(cookie: int, offset: int, length: int, done: bool) -> bytes:
    return OFFSET_HOLE_CHUNK.pack(
        c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, length,
    )


def encode_words(words: array) -> bytes:
    """[length, flags, length, flags, ...] (native u32) as the big-endian descriptors
    of a status chunk. The array is byte-swapped in place."""
    if not _BIG_ENDIAN_HOST:
        words.byteswap()
    return words.tobytes()


def alternating_descriptors(lengths: list[int], first: int, second: int,
                            typecode: str = "I") -> bytes:
    """Descriptors for runs whose flags alternate (first, second, first, ...), as a
    dirty bitmap's clean and dirty runs do; typecode "Q" for BLOCK_STATUS_EXT."""
    count = len(lengths)
    words = array(typecode, bytes(2 * array(typecode).itemsize * count))
    words[0::2] = array(typecode, lengths)
    words[1::2] = array(typecode, ([first, second] * ((count + 1) // 2))[:count])
    return encode_words(words)


def block_status_chunk(cookie: int, context_id: int, descriptors: bytes, done: bool) -> bytes:
    return BLOCK_STATUS_HEADER.pack(
        c.NBD_STRUCTURED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_BLOCK_STATUS, cookie, 4 + len(descriptors), context_id,
    ) + descriptors


# -- extended headers ---------------------------------------------------------------------

STATUS_PAYLOAD_HEAD = struct.Struct(">Q")


def parse_status_payload(payload: bytes, contexts: dict[int, str]) -> tuple[int, list[int]]:
    """A BLOCK_STATUS payload (BLOCK_STATUS_PAYLOAD): the u64 effect length, then the
    u32 ids of the contexts to answer for, each selected once. Raises ValueError."""
    if len(payload) < 12 or (len(payload) - 8) % 4:
        raise ValueError(f"a block status payload of {len(payload)} bytes")
    (effect,) = STATUS_PAYLOAD_HEAD.unpack_from(payload)
    ids = list(struct.unpack_from(f">{(len(payload) - 8) // 4}I", payload, 8))
    if len(set(ids)) != len(ids) or not all(i in contexts for i in ids):
        raise ValueError("a block status payload naming a context twice or one not selected")
    return effect, ids


def extended_none_chunk(cookie: int, offset: int) -> bytes:
    return EXTENDED_CHUNK_HEADER.pack(c.NBD_EXTENDED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE,
                                      c.NBD_REPLY_TYPE_NONE, cookie, offset, 0)


def extended_error_chunk(cookie: int, offset: int, error: int, message: str) -> bytes:
    text = message.encode()[: c.MAX_ERROR_MESSAGE]
    return EXTENDED_ERROR_CHUNK_HEADER.pack(
        c.NBD_EXTENDED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE, c.NBD_REPLY_TYPE_ERROR,
        cookie, offset, 6 + len(text), error, len(text),
    ) + text


def extended_offset_data_header(cookie: int, offset: int, position: int, length: int,
                                done: bool) -> bytes:
    return EXTENDED_OFFSET_DATA_HEADER.pack(
        c.NBD_EXTENDED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_OFFSET_DATA, cookie, offset, 8 + length, position,
    )


def extended_offset_hole_chunk(cookie: int, offset: int, position: int, length: int,
                               done: bool) -> bytes:
    return EXTENDED_OFFSET_HOLE_CHUNK.pack(
        c.NBD_EXTENDED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_OFFSET_HOLE, cookie, offset, 12, position, length,
    )


def extended_block_status_chunk(cookie: int, offset: int, context_id: int,
                                descriptors: bytes, done: bool) -> bytes:
    """BLOCK_STATUS_EXT: descriptors are (u64 length, u64 flags) pairs."""
    return EXTENDED_BLOCK_STATUS_HEADER.pack(
        c.NBD_EXTENDED_REPLY_MAGIC, c.NBD_REPLY_FLAG_DONE if done else 0,
        c.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, cookie, offset, 8 + len(descriptors),
        context_id, len(descriptors) // 16,
    ) + descriptors
