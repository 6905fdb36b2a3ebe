"""Request validation and reply framing, with literal bytes (spec: "Transmission")."""

from __future__ import annotations

from array import array

import pytest

from nbdserve.errors import nbd_error
from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c
from nbdserve.protocol.transmission import (
    REQUEST_HEADER,
    RequestValidator,
    alternating_descriptors,
    block_status_chunk,
    encode_words,
    error_chunk,
    none_chunk,
    offset_data_header,
    offset_hole_chunk,
    simple_reply,
)

RW = 0x0D6D  # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN CACHE FAST_ZERO
RO = 0x050F  # HAS_FLAGS READ_ONLY FLUSH FUA MULTI_CONN CACHE
SIZE = 1 << 20


def validator(flags=RW, structured=True, contexts=True):
    return RequestValidator(SIZE, flags, structured, contexts)


def test_request_header_layout():
    raw = bytes.fromhex("25609513" "0001" "0001" "0102030405060708" "0000000000001000"
                        "00000200")
    assert REQUEST_HEADER.unpack(raw) == (c.NBD_REQUEST_MAGIC, c.NBD_CMD_FLAG_FUA,
                                          c.NBD_CMD_WRITE, 0x0102030405060708, 4096, 512)


@pytest.mark.parametrize("command, flags, offset, length, expected", [
    # valid requests
    (c.NBD_CMD_READ, 0, 0, SIZE, 0),
    (c.NBD_CMD_READ, 0, SIZE, 0, 0),                       # length 0 succeeds
    (c.NBD_CMD_READ, c.NBD_CMD_FLAG_FUA | c.NBD_CMD_FLAG_DF, 0, 512, 0),
    (c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_FUA, SIZE - 1, 1, 0),
    (c.NBD_CMD_WRITE, 0, 0, 0, 0),
    (c.NBD_CMD_FLUSH, 0, 123, 456, 0),                     # be liberal: reserved fields
    (c.NBD_CMD_TRIM, c.NBD_CMD_FLAG_FUA, 0, SIZE, 0),
    (c.NBD_CMD_CACHE, 0, 0, SIZE, 0),
    (c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_NO_HOLE | c.NBD_CMD_FLAG_FAST_ZERO, 0, SIZE, 0),
    (c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_REQ_ONE | c.NBD_CMD_FLAG_FUA, 0, SIZE, 0),
    # past the end: ENOSPC for writes, EINVAL for the rest
    (c.NBD_CMD_READ, 0, SIZE - 1, 2, c.NBD_EINVAL),
    (c.NBD_CMD_WRITE, 0, SIZE, 1, c.NBD_ENOSPC),
    (c.NBD_CMD_WRITE_ZEROES, 0, SIZE - 512, 1024, c.NBD_ENOSPC),
    (c.NBD_CMD_TRIM, 0, 0, SIZE + 1, c.NBD_EINVAL),
    (c.NBD_CMD_CACHE, 0, 2 * SIZE, 1, c.NBD_EINVAL),
    (c.NBD_CMD_BLOCK_STATUS, 0, SIZE, 1, c.NBD_EINVAL),
    (c.NBD_CMD_READ, 0, (1 << 64) - 1, 1, c.NBD_EINVAL),    # offset overflow
    # flags that do not apply
    (c.NBD_CMD_READ, 0x8000, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_READ, c.NBD_CMD_FLAG_REQ_ONE, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_WRITE, c.NBD_CMD_FLAG_NO_HOLE, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_TRIM, c.NBD_CMD_FLAG_DF, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_CACHE, c.NBD_CMD_FLAG_NO_HOLE, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_BLOCK_STATUS, c.NBD_CMD_FLAG_FAST_ZERO, 0, 1, c.NBD_EINVAL),
    (c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_PAYLOAD_LEN, 0, 1, c.NBD_EINVAL),
    # unknown commands, oversized reads, block status rules
    (42, 0, 0, 0, c.NBD_EINVAL),
    (8, 0, 0, 0, c.NBD_EINVAL),                             # RESIZE: not offered
    (c.NBD_CMD_READ, 0, 0, (32 << 20) + 1, c.NBD_EINVAL),
    (c.NBD_CMD_BLOCK_STATUS, 0, 0, 0, c.NBD_EINVAL),
])
def test_validation_on_a_writable_export(command, flags, offset, length, expected):
    big = RequestValidator(1 << 40, RW, True, True) if length > SIZE and \
        command == c.NBD_CMD_READ else validator()
    assert big.check(command, flags, offset, length)[0] == expected


@pytest.mark.parametrize("command", [c.NBD_CMD_WRITE, c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES])
def test_read_only_export_refuses_changes_with_eperm_before_range_checks(command):
    assert validator(RO).check(command, 0, 0, 512)[0] == c.NBD_EPERM
    assert validator(RO).check(command, 0, SIZE, 512)[0] == c.NBD_EPERM


def test_read_only_export_still_reads_flushes_and_caches():
    v = validator(RO)
    for command in (c.NBD_CMD_READ, c.NBD_CMD_FLUSH, c.NBD_CMD_CACHE):
        assert v.check(command, c.NBD_CMD_FLAG_FUA, 0, 512) == (0, "")


def test_df_needs_structured_replies():
    assert validator(structured=False).check(c.NBD_CMD_READ, c.NBD_CMD_FLAG_DF, 0, 1)[0] == \
        c.NBD_EINVAL


def test_fast_zero_needs_the_transmission_flag():
    v = validator(RW & ~c.NBD_FLAG_SEND_FAST_ZERO)
    assert v.check(c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLAG_FAST_ZERO, 0, 1)[0] == c.NBD_EINVAL


def test_fua_needs_send_fua():
    v = validator(c.NBD_FLAG_HAS_FLAGS)
    assert v.check(c.NBD_CMD_READ, c.NBD_CMD_FLAG_FUA, 0, 1)[0] == c.NBD_EINVAL


def test_block_status_without_contexts_is_einval():
    assert validator(contexts=False).check(c.NBD_CMD_BLOCK_STATUS, 0, 0, 1)[0] == c.NBD_EINVAL


# -- replies --------------------------------------------------------------------------------

def test_simple_reply_bytes():
    assert simple_reply(0x1122334455667788, 28) == bytes.fromhex(
        "67446698" "0000001c" "1122334455667788")


def test_none_chunk_bytes():
    assert none_chunk(7) == bytes.fromhex("668e33ef" "0001" "0000" "0000000000000007"
                                          "00000000")


def test_offset_data_header_bytes():
    assert offset_data_header(1, 4096, 512, True) == bytes.fromhex(
        "668e33ef" "0001" "0001" "0000000000000001" "00000208" "0000000000001000")


def test_offset_hole_chunk_bytes():
    assert offset_hole_chunk(2, 0, 65536, False) == bytes.fromhex(
        "668e33ef" "0000" "0002" "0000000000000002" "0000000c" "0000000000000000" "00010000")


def test_error_chunk_bytes_and_message_cap():
    assert error_chunk(3, 22, "bad") == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000003" "00000009" "00000016" "0003") + b"bad"
    long = error_chunk(3, 5, "x" * 5000)
    assert len(long) - 20 < 900  # QEMU's client drops payloads over 1000 bytes


def test_block_status_chunk_bytes():
    descriptors = encode_words(array("I", [4096, 0, 61440, 3]))
    assert block_status_chunk(9, 1, descriptors, True) == bytes.fromhex(
        "668e33ef" "0001" "0005" "0000000000000009" "00000014" "00000001"
        "00001000" "00000000" "0000f000" "00000003")


@pytest.mark.parametrize("errno_name, expected", [
    ("EIO", c.NBD_EIO), ("ENOSPC", c.NBD_ENOSPC), ("EDQUOT", c.NBD_ENOSPC),
    ("EFBIG", c.NBD_ENOSPC), ("EROFS", c.NBD_EPERM), ("EACCES", c.NBD_EPERM),
    ("ENOMEM", c.NBD_ENOMEM), ("ELOOP", c.NBD_EIO),
])
def test_os_errors_map_to_nbd_errors_in_one_place(errno_name, expected):
    import errno
    assert nbd_error(OSError(getattr(errno, errno_name), "x")) == expected


def test_enotsup_and_eoverflow_only_with_the_flag_that_asks_for_them():
    """Spec: ENOTSUP SHOULD only answer FAST_ZERO and EOVERFLOW only a READ with DF;
    otherwise the client gets EINVAL."""
    import errno
    enotsup, eoverflow = OSError(errno.ENOTSUP, "x"), OSError(errno.EOVERFLOW, "x")
    assert nbd_error(enotsup, c.NBD_CMD_FLAG_FAST_ZERO) == c.NBD_ENOTSUP
    assert nbd_error(enotsup, c.NBD_CMD_FLAG_FUA) == c.NBD_EINVAL
    assert nbd_error(eoverflow, c.NBD_CMD_FLAG_DF) == c.NBD_EOVERFLOW
    assert nbd_error(eoverflow) == c.NBD_EINVAL


def test_non_os_errors_become_eio():
    assert nbd_error(RuntimeError("boom")) == c.NBD_EIO


# -- TransmissionRules: framing and the phase -------------------------------------------------

def rules(stopping=False):
    from nbdserve.protocol.transmission import TransmissionRules
    return TransmissionRules(validator(), stopping)


def test_frame_says_how_many_payload_bytes_follow():
    r = rules()
    assert r.frame(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, 4096) == 4096
    assert r.frame(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_WRITE, c.MAX_PAYLOAD) == c.MAX_PAYLOAD
    assert r.frame(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 1 << 30) == 0  # no payload


@pytest.mark.parametrize("magic, command, length", [
    (0x25609514, c.NBD_CMD_READ, 512),  # one bit off
    (c.NBD_REQUEST_MAGIC, c.NBD_CMD_WRITE, c.MAX_PAYLOAD + 1),  # cannot be read to stay in step
])
def test_frame_hangs_up_when_the_stream_cannot_stay_in_step(magic, command, length):
    from nbdserve.protocol import ProtocolViolation
    from nbdserve.protocol.transmission import Phase
    r = rules()
    with pytest.raises(ProtocolViolation):
        r.frame(magic, 0, command, length)
    assert r.phase is Phase.CLOSED


def test_disc_closes_and_stopping_answers_eshutdown():
    from nbdserve.protocol.transmission import DISCONNECT, Phase
    r = rules()
    assert r.check(c.NBD_CMD_READ, 0, 0, 512) == (0, "")
    r.stop()
    assert r.phase is Phase.STOPPING
    assert r.check(c.NBD_CMD_READ, 0, 0, 512)[0] == c.NBD_ESHUTDOWN
    assert r.check(42, 0, 0, 0)[0] == c.NBD_ESHUTDOWN  # even what would be EINVAL
    assert rules(stopping=True).check(c.NBD_CMD_FLUSH, 0, 0, 0)[0] == c.NBD_ESHUTDOWN
    assert r.frame(c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0) == DISCONNECT
    assert r.phase is Phase.CLOSED


# -- extended headers (issue 18) ---------------------------------------------------------------

def test_extended_reply_chunks_byte_for_byte():
    from nbdserve.protocol.transmission import (
        extended_block_status_chunk,
        extended_error_chunk,
        extended_none_chunk,
        extended_offset_data_header,
        extended_offset_hole_chunk,
    )
    head = "6e8a278c"  # NBD_EXTENDED_REPLY_MAGIC
    cookie, offset = "0000000000000007", "0000000100000000"  # the request's offset: 4 GiB
    assert extended_none_chunk(7, 1 << 32) == bytes.fromhex(
        head + "0001 0000" + cookie + offset + "0000000000000000")
    assert extended_error_chunk(7, 1 << 32, c.NBD_EINVAL, "no") == bytes.fromhex(
        head + "0001 8001" + cookie + offset + "0000000000000008" + "00000016 0002") + b"no"
    assert extended_offset_data_header(7, 1 << 32, (1 << 32) + 512, 4096, False) == \
        bytes.fromhex(head + "0000 0001" + cookie + offset + "0000000000001008"
                      + "0000000100000200")
    assert extended_offset_hole_chunk(7, 1 << 32, 1 << 32, 65536, True) == bytes.fromhex(
        head + "0001 0002" + cookie + offset + "000000000000000c" + "0000000100000000"
        + "00010000")
    descriptors = bytes.fromhex("0000000500000000 0000000000000001")  # 20 GiB, dirty
    assert extended_block_status_chunk(7, 1 << 32, 3, descriptors, True) == bytes.fromhex(
        head + "0001 0006" + cookie + offset + "0000000000000018" + "00000003 00000001"
    ) + descriptors


def test_wide_descriptors_carry_extents_above_4_gib():
    assert alternating_descriptors([5 << 32, 4096], c.NBD_STATE_DIRTY, 0, "Q") == \
        bytes.fromhex("0000000500000000 0000000000000001 0000000000001000 0000000000000000")


def test_extended_framing():
    from nbdserve.protocol.transmission import ExtendedTransmissionRules
    r = ExtendedTransmissionRules(validator())
    magic = c.NBD_EXTENDED_REQUEST_MAGIC
    payload_len = c.NBD_CMD_FLAG_PAYLOAD_LEN
    assert r.frame(magic, payload_len, c.NBD_CMD_WRITE, 4096) == 4096
    assert r.frame(magic, 0, c.NBD_CMD_WRITE, 4096) == 4096  # QEMU 10: no PAYLOAD_LEN
    assert r.frame(magic, 0, c.NBD_CMD_WRITE_ZEROES, 8 << 30) == 0  # an effect length
    assert r.frame(magic, payload_len, c.NBD_CMD_BLOCK_STATUS, 12) == 12
    assert r.frame(magic, payload_len, c.NBD_CMD_FLUSH, 3) == 3  # read, then refused
    with pytest.raises(ProtocolViolation):
        r.frame(magic, payload_len, c.NBD_CMD_TRIM, c.MAX_PAYLOAD + 1)
    with pytest.raises(ProtocolViolation):
        ExtendedTransmissionRules(validator()).frame(
            c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_READ, 512)  # a compact header now


def test_block_status_payloads():
    from nbdserve.protocol.transmission import parse_status_payload
    contexts = {1: "base:allocation", 2: "qemu:dirty-bitmap:b0"}
    assert parse_status_payload(bytes.fromhex("0000000200000000 00000002"), contexts) == \
        (8 << 30, [2])
    for bad in ("0000000200000000", "0000000200000000 000000", "0000000200000000 00000003",
                "0000000200000000 00000001 00000001"):
        with pytest.raises(ValueError):
            parse_status_payload(bytes.fromhex(bad), contexts)
