"""Fuzzing: the sans-I/O codecs with hypothesis, and a mutating stream client against a
real server. CI runs a bounded number of examples and streams; NBDSERVE_SLOW=1 (with
-m slow) runs the long versions (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_options_codec import FakeCatalog, FakeExport

from conftest import run
from nbdserve.backup.chain import ChainError, Point
from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c
from nbdserve.protocol.handshake import HandshakeFraming
from nbdserve.protocol.options import OptionNegotiator
from nbdserve.protocol.transmission import (
    ExtendedTransmissionRules,
    RequestValidator,
    TransmissionRules,
)

SLOW = os.environ.get("NBDSERVE_SLOW") == "1"
EXAMPLES = 3000 if SLOW else 300
OPTIONS = [c.NBD_OPT_EXPORT_NAME, c.NBD_OPT_ABORT, c.NBD_OPT_LIST, c.NBD_OPT_STARTTLS,
           c.NBD_OPT_INFO, c.NBD_OPT_GO, c.NBD_OPT_STRUCTURED_REPLY,
           c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT]


@st.composite
def option_streams(draw) -> bytes:
    """Client flags, then options: mostly well framed, with random magic, numbers,
    lengths and payloads mixed in."""
    parts = [struct.pack(">I", draw(st.sampled_from([1, 3, 0, 2, 7])))]
    for _ in range(draw(st.integers(0, 6))):
        magic = c.IHAVEOPT if draw(st.integers(0, 9)) else draw(st.integers(0, 2**64 - 1))
        option = draw(st.one_of(st.sampled_from(OPTIONS), st.integers(0, 2**32 - 1)))
        payload = draw(st.binary(max_size=120))
        length = len(payload) if draw(st.integers(0, 7)) else draw(st.integers(0, 2**32 - 1))
        parts.append(struct.pack(">QII", magic, option, length) + payload)
    return b"".join(parts)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(stream=option_streams(), split=st.integers(1, 64))
def test_handshake_framing_survives_any_option_stream(stream, split):
    """Fed in arbitrary pieces, the framing consumes, replies or closes; it never raises
    and never consumes bytes that are not there."""
    negotiator = OptionNegotiator(FakeCatalog(FakeExport(""), FakeExport("other")))
    framing = HandshakeFraming(negotiator)
    buffered = b""
    for start in range(0, len(stream), split):
        buffered += stream[start:start + split]
        while framing.reading and buffered:
            consumed, result = framing.step(buffered)
            assert 0 <= consumed <= len(buffered)
            buffered = buffered[consumed:]
            if result is not None:
                assert isinstance(result.replies, bytes)
            elif not consumed:
                break  # more bytes needed


@settings(max_examples=EXAMPLES, deadline=None)
@given(magic=st.one_of(st.sampled_from([c.NBD_REQUEST_MAGIC, c.NBD_EXTENDED_REQUEST_MAGIC]),
                      st.integers(0, 2**32 - 1)),
       flags=st.integers(0, 2**16 - 1), command=st.integers(0, 2**16 - 1),
       offset=st.integers(0, 2**64 - 1), length=st.integers(0, 2**64 - 1),
       transmission_flags=st.integers(0, 2**16 - 1), structured=st.booleans(),
       contexts=st.booleans(), discard_only=st.booleans(), extended=st.booleans())
def test_request_rules_answer_every_header(magic, flags, command, offset, length,
                                           transmission_flags, structured, contexts,
                                           discard_only, extended):
    """Every header, compact or extended, is framed (or is a protocol violation) and
    checked to a valid NBD error or 0; nothing else escapes, and no payload over the
    maximum is ever asked to be read."""
    if not extended:
        length &= 2**32 - 1
    kind = ExtendedTransmissionRules if extended else TransmissionRules
    rules = kind(RequestValidator(64 << 20, transmission_flags, structured, contexts,
                                  discard_only, extended))
    try:
        wanted = rules.frame(magic, flags, command, length)
    except ProtocolViolation:
        return
    assert wanted <= c.MAX_PAYLOAD
    error, reason = rules.check(command, flags, offset, length)
    assert error in (0, c.NBD_EPERM, c.NBD_EINVAL, c.NBD_ENOSPC, c.NBD_EOVERFLOW)
    assert isinstance(reason, str)
    if error == 0:
        assert offset + length <= 64 << 20 or command in (c.NBD_CMD_DISC, c.NBD_CMD_FLUSH)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.text(max_size=12), children, max_size=6), max_leaves=30)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=JSON_VALUES, keep_format=st.booleans())
def test_a_backup_point_file_is_read_or_refused(tmp_path, document, keep_format):
    """Whatever a point's JSON holds, loading it gives a point or a ChainError."""
    if keep_format and isinstance(document, dict):
        document = {"format": "nbdserve-backup-point", "version": 1, **document}
    path = tmp_path / "000000.json"
    path.write_text(json.dumps(document))
    try:
        Point.load(str(path))
    except ChainError:
        pass


# -- a mutating client against a real server ---------------------------------------------------

def valid_stream(rng: random.Random) -> bytes:
    """A handshake that reaches transmission, then a burst of requests."""
    context = b"base:allocation"
    meta = (struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", len(context))
            + context)
    parts = [struct.pack(">I", 3),
             struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_STRUCTURED_REPLY, 0),
             struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_SET_META_CONTEXT, len(meta)) + meta,
             struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_GO, 6) + struct.pack(">IH", 0, 0)]
    for cookie in range(rng.randint(1, 12)):
        command = rng.choice([c.NBD_CMD_READ, c.NBD_CMD_WRITE, c.NBD_CMD_BLOCK_STATUS,
                              c.NBD_CMD_TRIM, c.NBD_CMD_WRITE_ZEROES, c.NBD_CMD_FLUSH,
                              c.NBD_CMD_CACHE])
        offset = rng.randrange(0, 64 << 20, 512)
        length = rng.choice([512, 4096, 65536, 1 << 20])
        header = struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, command, cookie, offset,
                             length)
        parts.append(header + (bytes(rng.randrange(256) for _ in range(16)) * (length // 16)
                               if command == c.NBD_CMD_WRITE else b""))
    if rng.random() < 0.5:
        parts.append(struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0))
    return b"".join(parts)


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.random()
        position = rng.randrange(len(data)) if data else 0
        if kind < 0.5 and data:  # flip a byte, mostly in the first 200 (headers)
            position = rng.randrange(min(len(data), 200)) if rng.random() < 0.7 else position
            data[position] ^= 1 << rng.randrange(8)
        elif kind < 0.7:
            del data[position:]  # truncate
        elif kind < 0.85:
            data[position:position] = os.urandom(rng.randint(1, 64))  # insert garbage
        else:
            data[position:position] = data[position:position + rng.randint(1, 64)]
    return bytes(data)


def exchange(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(1 << 16):
                pass
        except (OSError, TimeoutError):
            pass  # the server hung up or went quiet: both are fine; dying is not


@pytest.mark.parametrize("streams", [2000 if SLOW else 150])
def test_mutated_streams_never_hurt_the_server(image, start_server, tmp_path, streams):
    seed = int(os.environ.get("NBDSERVE_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"fuzz seed: NBDSERVE_SEED={seed}")
    rng = random.Random(seed)
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--bitmap", "b0", "--control", str(control))
    for _ in range(streams):
        exchange(str(server.unix), mutate(rng, valid_stream(rng)))
    # Still serving, still answering its control socket; no traceback in its log (the
    # fixture checks that when the test ends).
    assert run("nbdinfo", "--size", server.uri()).stdout.strip() == str(64 << 20)
    assert server.proc.poll() is None
    run("qemu-io", "-f", "raw", "-c", "write -P 9 0 64k", "-c", "read -P 9 0 64k",
        server.qemu_uri)
