"""Negotiations replayed (protocol/replay.py): a client that repeats an earlier
handshake gets the earlier answers, and never an answer that no longer holds."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time

import pytest
from test_options_codec import FakeCatalog, FakeExport, info_payload, meta_payload
from test_wire import recv_exactly, serve_in_process

from conftest import NBDSERVE, NBDSH, run
from nbdserve.image import RawImage
from nbdserve.protocol import constants as c
from nbdserve.protocol.options import OptionNegotiator
from nbdserve.protocol.replay import MAX_HISTORY, MAX_TRANSCRIPTS, Transcripts, export_view


def option(opt: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QII", c.IHAVEOPT, opt, len(payload)) + payload


FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES
GO = option(c.NBD_OPT_GO, info_payload(b""))  # the default export, no INFO asked
META = meta_payload(b"", b"base:allocation")


def record(transcripts: Transcripts, history: bytes, names=("",)) -> None:
    transcripts.record(0, history, b"answer", None, ("state",), tuple(names))


# -- the table, sans I/O ---------------------------------------------------------------------


def test_a_transcript_holds_while_its_exports_look_the_same():
    export = FakeExport("")
    catalog = FakeCatalog(export)
    transcripts = Transcripts(catalog)
    record(transcripts, b"history")
    assert transcripts.find(0, b"history").replies == b"answer"
    assert transcripts.find(0, b"other") is None
    # The same bytes, but the client had its answer to the first three already: the
    # answer kept is to all seven, so it is not this one's.
    assert transcripts.find(3, b"history") is None
    assert transcripts.replayed == 1


@pytest.mark.parametrize("change", [
    "size", "read_only", "discard_only", "multi_conn", "tls_required", "description",
    "contexts", "full", "replaced", "removed",
])
def test_a_transcript_is_dropped_when_an_export_it_looked_up_changes(change):
    export = FakeExport("", max_connections=2)
    catalog = FakeCatalog(export)
    transcripts = Transcripts(catalog)
    record(transcripts, b"history")
    if change == "size":
        export.size += 512
    elif change == "contexts":
        export.contexts = export.contexts + ["qemu:dirty-bitmap:new"]
    elif change == "full":
        export.connections = 2
    elif change == "replaced":
        catalog.exports[""] = FakeExport("", max_connections=2)  # equal, not the same
    elif change == "removed":
        del catalog.exports[""]
    elif change == "description":
        export.description = "changed"
    else:
        setattr(export, change, not getattr(export, change))
    assert transcripts.find(0, b"history") is None
    assert (0, b"history") not in transcripts.table  # (recorded anew by the next haggling)


def test_the_table_is_forgotten_when_exports_come_or_go(image):
    """Not only dropped when found stale: a transcript must not keep an export (and its
    image and bitmaps) alive after the server let go of it."""
    from nbdserve.config import ExportConfig
    from nbdserve.export import Export, ExportCatalog
    served = Export(ExportConfig("", str(image)), RawImage(str(image)))
    catalog = ExportCatalog([served])
    transcripts = Transcripts(catalog)
    transcripts.record(0, b"history", b"answer", None, (), ("",))
    assert transcripts.find(0, b"history") is not None
    catalog.mark_absent("elsewhere", "it was migrated to elsewhere")
    assert transcripts.find(0, b"history") is None and not transcripts.table
    transcripts.record(0, b"history", b"answer", None, (), ("",))
    catalog.remove("")
    transcripts.record(0, b"other", b"answer", None, (), ())
    assert list(transcripts.table) == [(0, b"other")]
    served.image.close()


def test_a_name_not_served_is_remembered_with_why():
    catalog = FakeCatalog(FakeExport(""))
    reasons = {"gone": "it waits for an incoming migration"}
    catalog.absence = lambda name: reasons.get(name, "")
    transcripts = Transcripts(catalog)
    record(transcripts, b"history", names=("gone",))
    assert export_view(catalog, "gone") == reasons["gone"]
    assert transcripts.find(0, b"history") is not None
    reasons["gone"] = "it was migrated to elsewhere"
    assert transcripts.find(0, b"history") is None


def test_the_table_is_bounded():
    transcripts = Transcripts(FakeCatalog(FakeExport("")))
    record(transcripts, bytes(MAX_HISTORY + 1))  # too long to keep
    transcripts.record(0, b"long answer", bytes(8192), None, (), ())
    assert not transcripts.table
    for i in range(MAX_TRANSCRIPTS):
        record(transcripts, b"%d" % i)
    assert len(transcripts.table) == MAX_TRANSCRIPTS
    record(transcripts, b"one more")  # full: everything goes, the newest stays
    assert list(transcripts.table) == [(0, b"one more")]
    transcripts.disable()
    record(transcripts, b"after")
    assert not transcripts.table and transcripts.find(0, b"one more") is None


def test_a_negotiator_restored_from_a_snapshot_answers_as_the_original():
    """The state a replayed history leaves: a negotiator taking it up answers the next
    options byte for byte as the one that recorded it."""
    catalog = FakeCatalog(FakeExport(""))
    original = OptionNegotiator(catalog)
    original.handle_client_flags(FLAGS)
    original.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    original.handle_option(c.NBD_OPT_SET_META_CONTEXT, META)
    state = original.snapshot()
    original.meta_contexts[9] = "changed later"  # the snapshot holds its own copy
    original.meta_contexts.pop(9)
    resumed = OptionNegotiator(catalog)
    resumed.restore(state)
    for opt, payload in ((c.NBD_OPT_LIST_META_CONTEXT, META), (c.NBD_OPT_GO, GO[16:])):
        assert resumed.handle_option(opt, payload) == original.handle_option(opt, payload)
    assert resumed.names == original.names == ("",)  # (SET, LIST and GO named it)


def test_a_session_shared_by_replayed_connections_cannot_be_changed():
    """Connections whose handshakes were the same share the one Session the recorded
    GO made: its selected contexts are read-only, and what the negotiator that made
    it selects later does not reach it."""
    negotiator = OptionNegotiator(FakeCatalog(FakeExport("")))
    negotiator.handle_client_flags(FLAGS)
    negotiator.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    negotiator.handle_option(c.NBD_OPT_SET_META_CONTEXT, META)
    session = negotiator.handle_option(c.NBD_OPT_GO, GO[16:]).session
    assert dict(session.meta_contexts) == {1: "base:allocation"}
    with pytest.raises(TypeError):
        session.meta_contexts[2] = "qemu:dirty-bitmap:b0"
    negotiator.meta_contexts[2] = "qemu:dirty-bitmap:b0"
    assert dict(session.meta_contexts) == {1: "base:allocation"}


# -- in a server ------------------------------------------------------------------------------


LIBNBD_CONNECTIONS = """
import nbd, sys
uri, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    print(h.get_size(), h.can_meta_context("base:allocation"), h.can_trim(),
          h.pread(8, 4096).hex())
    h.shutdown()
"""


async def test_libnbd_connections_in_a_row_are_replayed_and_answered_alike(tmp_path):
    """In-process server: 20 libnbd connections, each with structured replies and a
    meta context. After the first few, the handshakes come from the table, and every
    connection still sees the export as it is."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    sock = str(tmp_path / "inprocess.sock")
    server = await serve_in_process(RawImage(str(path)), sock)
    try:
        client = await asyncio.create_subprocess_exec(
            "/usr/bin/python3", "-c", LIBNBD_CONNECTIONS, f"nbd+unix:///?socket={sock}", "20",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err.decode()
        handshakes = server.connections.transcripts.handshakes
    finally:
        await asyncio.wait_for(server.shutdown(), 30)
    expected = f"{1 << 20} True True {path.read_bytes()[4096:4104].hex()}"
    assert out.decode().splitlines() == [expected] * 20
    # libnbd sends each option once the one before is answered, so every GO after the
    # first is the same bytes from the same point: answered from the table.
    assert handshakes == 19


def exchange(sock: socket.socket, data: bytes, replies: int) -> list[tuple[int, int, bytes]]:
    """Send data; read that many option replies: (option, type, data) each."""
    sock.sendall(data)
    got = []
    for _ in range(replies):
        _magic, opt, reply_type, length = struct.unpack(">QIII", recv_exactly(sock, 20))
        got.append((opt, reply_type, recv_exactly(sock, length)))
    return got


def block_status_context_ids(sock: socket.socket) -> list[int]:
    """BLOCK_STATUS of the first 4 KiB, after GO: the context ids of its chunks."""
    sock.sendall(struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_BLOCK_STATUS, 7,
                             0, 4096))
    ids = []
    while True:
        _magic, flags, kind, _cookie, length = struct.unpack(">IHHQI", recv_exactly(sock, 20))
        data = recv_exactly(sock, length)
        if kind == c.NBD_REPLY_TYPE_BLOCK_STATUS:
            ids.append(struct.unpack(">I", data[:4])[0])
        if flags & c.NBD_REPLY_FLAG_DONE:
            return ids


def go_its_own_way(path: str, meta_payload: bytes) -> list:
    """Two raw clients: the first negotiates structured replies and GO; the second
    repeats its first message (flags and STRUCTURED_REPLY, in one send), then asks for
    a meta context, which the first never did."""
    structured = FLAGS + option(c.NBD_OPT_STRUCTURED_REPLY)
    meta = option(c.NBD_OPT_SET_META_CONTEXT, meta_payload)
    seen = []
    for second in (False, True):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            recv_exactly(sock, 18)
            seen.append(exchange(sock, structured, 1))
            if second:
                seen.append(exchange(sock, meta, 2))
            seen.append(exchange(sock, GO, 3)[-1][1])  # EXPORT, BLOCK_SIZE, ACK
            if second:
                seen.append(block_status_context_ids(sock))
    return seen


@pytest.mark.parametrize("meta_payload", [
    META,
    # Longer than any transcript is kept for: the rest of the handshake is haggled
    # without look-ups, from the same state.
    meta_payload(b"", b"base:allocation", *[b"unknown:%04d" % i for i in range(100)]),
], ids=["short", "past-the-history-limit"])
async def test_a_client_that_goes_on_differently_is_haggled_with_from_where_it_is(
        tmp_path, meta_payload):
    """The second client's first message is answered from the table; its next is not
    in it, and the negotiator takes up the state the first left (structured replies
    on): the meta context is granted, and BLOCK_STATUS answers for it."""
    assert meta_payload == META or len(meta_payload) > MAX_HISTORY
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "inprocess.sock")
    server = await serve_in_process(RawImage(str(path)), sock)
    try:
        seen = await asyncio.wait_for(asyncio.to_thread(go_its_own_way, sock, meta_payload), 30)
        replayed = server.connections.transcripts.replayed
    finally:
        await asyncio.wait_for(server.shutdown(), 30)
    ack = [(c.NBD_OPT_STRUCTURED_REPLY, c.NBD_REP_ACK, b"")]
    first_ack, first_go, second_ack, meta, second_go, status_ids = seen
    assert first_ack == second_ack == ack
    assert first_go == second_go == c.NBD_REP_ACK
    assert meta == [
        (c.NBD_OPT_SET_META_CONTEXT, c.NBD_REP_META_CONTEXT,
         struct.pack(">I", 1) + b"base:allocation"),
        (c.NBD_OPT_SET_META_CONTEXT, c.NBD_REP_ACK, b""),
    ]
    assert status_ids == [1]
    assert replayed >= 1  # the second client's first message


def test_a_bitmap_added_between_handshakes_is_offered_to_the_next_client(
        image, start_server, tmp_path):
    """A real server and nbdsh: clients asking for a bitmap that does not exist yet
    are told so, in handshakes that repeat; once it is added (control socket), the
    same handshake is haggled anew and the bitmap offered."""
    control = tmp_path / "ctl.sock"
    server = start_server(image, "--control", str(control))
    script = ("h.add_meta_context('qemu:dirty-bitmap:later')\n"
              f"h.connect_uri({server.uri()!r})\n"
              "print(h.can_meta_context('qemu:dirty-bitmap:later'))\n")
    for _ in range(3):
        assert run(*NBDSH, "-c", script).stdout.strip() == "False"
    run(*NBDSERVE, "bitmap", "add", "later", "--control", str(control))
    for _ in range(2):
        assert run(*NBDSH, "-c", script).stdout.strip() == "True"


ALPHABET = [
    option(c.NBD_OPT_STRUCTURED_REPLY),
    option(c.NBD_OPT_EXTENDED_HEADERS),
    option(c.NBD_OPT_SET_META_CONTEXT, META),
    option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"qemu:allocation-depth",
                                                    b"base:allocation")),
    option(c.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"", b"base:")),
    option(c.NBD_OPT_INFO, info_payload(b"", c.NBD_INFO_NAME)),
    option(c.NBD_OPT_INFO, info_payload(b"elsewhere")),
    option(c.NBD_OPT_STARTTLS),  # refused: no TLS here
    option(99, b"what?"),
]
ENDINGS = [GO, option(c.NBD_OPT_GO, info_payload(b"", c.NBD_INFO_BLOCK_SIZE)),
           option(c.NBD_OPT_ABORT)]


def expected_replies(catalog, messages: list[bytes]) -> tuple[list[bytes], bool]:
    """What a fresh negotiator answers to each message (the reference), and whether it
    agreed on extended headers."""
    from nbdserve.protocol.handshake import HandshakeFraming
    negotiator = OptionNegotiator(catalog)
    framing = HandshakeFraming(negotiator)
    answers = []
    for message in messages:
        consumed, result = framing.step(message)
        assert consumed == len(message)
        answers.append(result.replies)
    return answers, negotiator.extended_headers


def disc(extended: bool) -> bytes:
    if extended:
        return struct.pack(">IHHQQQ", c.NBD_EXTENDED_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0)
    return struct.pack(">IHHQQI", c.NBD_REQUEST_MAGIC, 0, c.NBD_CMD_DISC, 0, 0, 0)


def random_walks(path: str, catalog, seed: int) -> int:
    """Clients one after another, each sending a few options drawn from a small set
    (so that many share a beginning) and then GO or ABORT. Most messages go one per
    send; some two at once, some in two pieces (the server then sees part of one), and
    some GOs come with the DISC behind them. Every reply must be the reference's, byte
    for byte. Returns the connections."""
    rng = random.Random(seed)
    for _ in range(60):
        messages = [FLAGS] + [rng.choice(ALPHABET) for _ in range(rng.randrange(4))]
        messages.append(rng.choice(ENDINGS))
        expected, extended = expected_replies(catalog, messages)
        goodbye = disc(extended) if messages[-1] != ENDINGS[-1] else b""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            recv_exactly(sock, 18)
            i = 0
            while i < len(messages):
                count = 2 if i + 1 < len(messages) and rng.random() < 0.2 else 1
                data = b"".join(messages[i:i + count])
                if i + count == len(messages) and goodbye and rng.random() < 0.3:
                    data, goodbye = data + goodbye, b""  # the first request, pipelined
                if count == 1 and len(data) > 1 and rng.random() < 0.2:
                    cut = rng.randrange(1, len(data))
                    sock.sendall(data[:cut])
                    time.sleep(0.002)  # (so that the server reads the piece alone)
                    data = data[cut:]
                sock.sendall(data)
                answer = b"".join(expected[i:i + count])
                assert recv_exactly(sock, len(answer)) == answer, messages
                i += count
            if goodbye:  # (not after ABORT, nor sent already: the server hung up)
                sock.sendall(goodbye)
            assert sock.recv(1) == b""  # and nothing more
    return 60


async def test_random_handshakes_get_the_reference_answers_replayed_or_not(tmp_path):
    """In-process server: random option sequences, many sharing their beginnings, are
    answered byte for byte as a fresh negotiator answers them, whether from the table,
    from a negotiator that took up a replayed state, or haggled from the start."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    sock = str(tmp_path / "inprocess.sock")
    server = await serve_in_process(RawImage(str(path)), sock)
    try:
        for seed in range(3):
            await asyncio.wait_for(asyncio.to_thread(
                random_walks, sock, server.catalog, seed), 60)
        replayed = server.connections.transcripts.replayed
    finally:
        await asyncio.wait_for(server.shutdown(), 30)
    assert replayed >= 100  # most of the 180 clients repeat at least their flags
