"""Option haggling, byte for byte (spec: "Option types"; checklist §19 Handshake/Options)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from nbdserve.protocol import constants as c
from nbdserve.protocol.options import (
    GREETING,
    OptionError,
    OptionNegotiator,
    Outcome,
    ProtocolViolation,
    decode_string,
    parse_client_flags,
)

REP = bytes.fromhex("0003e889045565a9")


@dataclass
class FakeExport:
    name: str
    size: int = 1 << 20
    description: str = ""
    read_only: bool = False
    discard_only: bool = False
    multi_conn: bool = True
    tls_required: bool = False
    max_connections: int = 0
    connections: int = 0
    contexts: list[str] = field(default_factory=lambda: [
        "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"])

    def meta_contexts(self):
        return self.contexts


class FakeCatalog:
    generation = 0

    def __init__(self, *exports):
        self.exports = {e.name: e for e in exports}

    def find(self, name):
        return self.exports.get(name)

    def listed(self):
        return list(self.exports.values())

    def absence(self, name):
        return ""


def negotiator(*exports, fixed=True, no_zeroes=True, **kwargs):
    catalog = FakeCatalog(*(exports or (FakeExport(""),)))
    n = OptionNegotiator(catalog, **kwargs)
    flags = (1 if fixed else 0) | (2 if no_zeroes else 0)
    n.handle_client_flags(struct.pack(">I", flags))
    return n


def reply(option: int, kind: int, data: bytes = b"") -> bytes:
    return REP + struct.pack(">III", option, kind, len(data)) + data


def replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    """Split encoded option replies into (option, type, data)."""
    out = []
    while raw:
        assert raw[:8] == REP
        option, kind, length = struct.unpack_from(">III", raw, 8)
        out.append((option, kind, raw[20 : 20 + length]))
        raw = raw[20 + length :]
    return out


def info_payload(name: bytes, *infos: int) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos),
                                                             *infos)


def meta_payload(name: bytes, *queries: bytes) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q
    return out


# -- greeting and client flags -------------------------------------------------------------

def test_greeting_is_fixed_newstyle_with_no_zeroes():
    assert GREETING == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"


@pytest.mark.parametrize("flags, expected", [(0, (False, False)), (1, (True, False)),
                                             (3, (True, True))])
def test_client_flags(flags, expected):
    assert parse_client_flags(struct.pack(">I", flags)) == expected


@pytest.mark.parametrize("flags", [4, 0x80000000, 0x7])
def test_unknown_client_flag_bits_drop_the_connection(flags):
    with pytest.raises(ProtocolViolation):
        parse_client_flags(struct.pack(">I", flags))


# -- EXPORT_NAME --------------------------------------------------------------------------

def test_export_name_with_no_zeroes_is_ten_bytes():
    n = negotiator(FakeExport("", size=4096))
    result = n.handle_option(c.NBD_OPT_EXPORT_NAME, b"")
    assert result.outcome is Outcome.TRANSMISSION
    assert result.replies == struct.pack(">QH", 4096, 0x0d6d)


def test_export_name_without_no_zeroes_pads_124_bytes():
    n = negotiator(FakeExport("disk", size=8192), fixed=False, no_zeroes=False)
    result = n.handle_option(c.NBD_OPT_EXPORT_NAME, b"disk")
    assert result.replies == struct.pack(">QH", 8192, 0x0d6d) + bytes(124)


def test_export_name_of_unknown_export_hangs_up():
    result = negotiator().handle_option(c.NBD_OPT_EXPORT_NAME, b"nope")
    assert result.outcome is Outcome.DISCONNECT and result.replies == b""


def test_non_fixed_client_may_send_only_export_name():
    result = negotiator(fixed=False).handle_option(c.NBD_OPT_LIST, b"")
    assert result.outcome is Outcome.DISCONNECT


# -- ABORT, LIST, STARTTLS, unknown options -------------------------------------------------

def test_abort_is_acknowledged_then_closed():
    result = negotiator().handle_option(c.NBD_OPT_ABORT, b"ignored")
    assert result.outcome is Outcome.ABORT
    assert result.replies == reply(2, c.NBD_REP_ACK)


def test_list_sends_names_with_descriptions_then_ack():
    n = negotiator(FakeExport("a", description="first disk"), FakeExport("b"))
    result = n.handle_option(c.NBD_OPT_LIST, b"")
    assert result.replies == (
        reply(3, c.NBD_REP_SERVER, b"\x00\x00\x00\x01a" + b"first disk")
        + reply(3, c.NBD_REP_SERVER, b"\x00\x00\x00\x01b")
        + reply(3, c.NBD_REP_ACK)
    )


def test_list_with_data_is_invalid():
    result = negotiator().handle_option(c.NBD_OPT_LIST, b"x")
    assert replies(result.replies)[0][1] == c.NBD_REP_ERR_INVALID
    assert result.outcome is Outcome.CONTINUE


def test_starttls_without_tls_is_policy_refused():
    n = negotiator()
    assert replies(n.handle_option(c.NBD_OPT_STARTTLS, b"").replies)[0][1] == \
        c.NBD_REP_ERR_POLICY
    assert replies(n.handle_option(c.NBD_OPT_STARTTLS, b"x").replies)[0][1] == \
        c.NBD_REP_ERR_INVALID


@pytest.mark.parametrize("option", [c.NBD_OPT_PEEK_EXPORT, 99, 0xFFFFFFFF])
def test_unknown_options_are_unsupported(option):
    result = negotiator().handle_option(option, b"payload")
    ((echoed, kind, message),) = replies(result.replies)
    assert (echoed, kind) == (option, c.NBD_REP_ERR_UNSUP)
    assert message  # carries a human-readable reason
    assert result.outcome is Outcome.CONTINUE


def test_too_many_options_disconnect():
    n = negotiator(max_options=3)
    for _ in range(3):
        assert n.handle_option(99, b"").outcome is Outcome.CONTINUE
    assert n.handle_option(99, b"").outcome is Outcome.DISCONNECT


# -- STRUCTURED_REPLY ---------------------------------------------------------------------

def test_structured_reply_once_then_invalid():
    n = negotiator()
    assert n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"").replies == reply(8, c.NBD_REP_ACK)
    assert replies(n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"").replies)[0][1] == \
        c.NBD_REP_ERR_INVALID


def test_structured_reply_with_data_is_invalid():
    n = negotiator()
    assert replies(n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"x").replies)[0][1] == \
        c.NBD_REP_ERR_INVALID
    assert not n.structured_replies


# -- INFO and GO ----------------------------------------------------------------------------

def test_info_reports_export_block_size_name_and_description():
    n = negotiator(FakeExport("disk", size=1 << 30, description="hello"))
    result = n.handle_option(c.NBD_OPT_INFO, info_payload(b"disk", 1, 2, 3))
    assert result.outcome is Outcome.CONTINUE
    got = replies(result.replies)
    assert got == [
        (6, c.NBD_REP_INFO, b"\x00\x00" + struct.pack(">QH", 1 << 30, 0x0d6d)),
        (6, c.NBD_REP_INFO, b"\x00\x03" + struct.pack(">III", 1, 4096, 32 << 20)),
        (6, c.NBD_REP_INFO, b"\x00\x01disk"),
        (6, c.NBD_REP_INFO, b"\x00\x02hello"),
        (6, c.NBD_REP_ACK, b""),
    ]


def test_go_enters_transmission_and_adds_df_after_structured_replies():
    n = negotiator(FakeExport("", read_only=True))
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    result = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert result.outcome is Outcome.TRANSMISSION
    flags = c.NBD_FLAG_HAS_FLAGS | c.NBD_FLAG_READ_ONLY | c.NBD_FLAG_SEND_FLUSH | \
        c.NBD_FLAG_SEND_FUA | c.NBD_FLAG_SEND_CACHE | c.NBD_FLAG_CAN_MULTI_CONN | \
        c.NBD_FLAG_SEND_DF
    assert replies(result.replies)[0][2] == b"\x00\x00" + struct.pack(">QH", 1 << 20, flags)
    assert result.session.structured_replies
    assert result.session.transmission_flags == flags


def test_single_connection_export_does_not_offer_multi_conn():
    n = negotiator(FakeExport("", multi_conn=False))
    result = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert not result.session.transmission_flags & c.NBD_FLAG_CAN_MULTI_CONN


def test_go_for_unknown_export_is_err_unknown_without_info():
    result = negotiator().handle_option(c.NBD_OPT_GO, info_payload(b"nope"))
    assert [kind for _, kind, _ in replies(result.replies)] == [c.NBD_REP_ERR_UNKNOWN]
    assert result.outcome is Outcome.CONTINUE


@pytest.mark.parametrize("payload", [
    b"",                                           # too short
    b"\x00\x00\x00\x05abc\x00\x00",                # name length past the payload
    b"\x00\x00\x00\x00\x00\x02\x00\x01",           # two infos announced, one sent
    b"\x00\x00\x00\x00\x00\x00\xff",               # trailing byte
    b"\x00\x00\x00\x02a\x00\x00\x00",              # NUL in the name
    b"\x00\x00\x00\x02\xff\xfe\x00\x00",           # not UTF-8
    struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00",  # name over 4096 bytes
])
def test_malformed_info_requests_are_invalid(payload):
    for option in (c.NBD_OPT_INFO, c.NBD_OPT_GO):
        result = negotiator().handle_option(option, payload)
        assert [kind for _, kind, _ in replies(result.replies)] == [c.NBD_REP_ERR_INVALID]


def test_unknown_info_requests_are_ignored():
    result = negotiator().handle_option(c.NBD_OPT_INFO, info_payload(b"", 77))
    assert replies(result.replies)[-1][1] == c.NBD_REP_ACK


# -- meta contexts -------------------------------------------------------------------------

def meta_names(raw: bytes) -> list[tuple[int, str]]:
    return [(struct.unpack_from(">I", data)[0], data[4:].decode())
            for _, kind, data in replies(raw) if kind == c.NBD_REP_META_CONTEXT]


@pytest.mark.parametrize("queries, expected", [
    ((), ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
    ((b"base:",), ["base:allocation"]),
    ((b"qemu:",), ["qemu:allocation-depth", "qemu:dirty-bitmap:b0"]),
    ((b"qemu:dirty-bitmap:",), ["qemu:dirty-bitmap:b0"]),
    ((b"qemu:dirty-bitmap:b0", b"base:allocation"),
     ["qemu:dirty-bitmap:b0", "base:allocation"]),
    ((b"x-foo:bar", b"nocolon", b"base:other"), []),
])
def test_list_meta_context_matches_like_qemu(queries, expected):
    result = negotiator().handle_option(c.NBD_OPT_LIST_META_CONTEXT,
                                        meta_payload(b"", *queries))
    assert meta_names(result.replies) == [(0, name) for name in expected]
    assert replies(result.replies)[-1][1] == c.NBD_REP_ACK


def test_list_meta_context_on_unknown_export():
    result = negotiator().handle_option(c.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"nope"))
    assert replies(result.replies)[0][1] == c.NBD_REP_ERR_UNKNOWN


@pytest.mark.parametrize("payload", [
    b"\x00\x00\x00",
    b"\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x01a",      # count says 2, one present
    b"\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09base:",  # query length past the end
    meta_payload(b"", b"base:allocation") + b"\x00",           # trailing byte
])
def test_malformed_meta_requests_are_invalid(payload):
    for option in (c.NBD_OPT_LIST_META_CONTEXT, c.NBD_OPT_SET_META_CONTEXT):
        n = negotiator()
        n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
        assert replies(n.handle_option(option, payload).replies)[0][1] == c.NBD_REP_ERR_INVALID


def test_set_meta_context_needs_structured_replies():
    result = negotiator().handle_option(c.NBD_OPT_SET_META_CONTEXT,
                                        meta_payload(b"", b"base:allocation"))
    assert replies(result.replies)[0][1] == c.NBD_REP_ERR_INVALID


def test_set_meta_context_selects_exact_names_only():
    n = negotiator()
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    result = n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(
        b"", b"base:", b"qemu:dirty-bitmap:", b"qemu:dirty-bitmap:missing",
        b"qemu:dirty-bitmap:b0", b"base:allocation", b"base:allocation"))
    assert meta_names(result.replies) == [(1, "qemu:dirty-bitmap:b0"), (2, "base:allocation")]
    go = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert go.session.meta_contexts == {1: "qemu:dirty-bitmap:b0", 2: "base:allocation"}


def test_each_set_replaces_the_selection():
    n = negotiator()
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"base:allocation"))
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b""))
    assert n.handle_option(c.NBD_OPT_GO, info_payload(b"")).session.meta_contexts == {}


def test_failed_set_still_clears_the_selection():
    n = negotiator()
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"base:allocation"))
    bad = n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"nope", b"base:allocation"))
    assert replies(bad.replies)[0][1] == c.NBD_REP_ERR_UNKNOWN
    assert n.handle_option(c.NBD_OPT_GO, info_payload(b"")).session.meta_contexts == {}


def test_contexts_set_for_another_export_are_dropped_at_go():
    n = negotiator(FakeExport("a"), FakeExport("b"))
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"a", b"base:allocation"))
    assert n.handle_option(c.NBD_OPT_GO, info_payload(b"b")).session.meta_contexts == {}


# -- shutdown --------------------------------------------------------------------------------

def test_options_during_shutdown_get_err_shutdown_but_abort_is_acked():
    n = negotiator(shutting_down=lambda: True)
    assert replies(n.handle_option(c.NBD_OPT_GO, info_payload(b"")).replies)[0][1] == \
        c.NBD_REP_ERR_SHUTDOWN
    assert n.handle_option(c.NBD_OPT_ABORT, b"").replies == reply(2, c.NBD_REP_ACK)
    assert n.handle_option(c.NBD_OPT_EXPORT_NAME, b"").outcome is Outcome.DISCONNECT


# -- TLS (spec: "TLS support"; checklist §12) ------------------------------------------------

def kinds(result) -> list[int]:
    return [kind for _, kind, _ in replies(result.replies)]


def test_starttls_in_require_mode_is_acked_and_resets_negotiation():
    n = negotiator(tls_mode="require")
    result = n.handle_option(c.NBD_OPT_STARTTLS, b"")
    assert result.outcome is Outcome.STARTTLS and result.replies == reply(5, c.NBD_REP_ACK)
    n.tls_started()
    assert kinds(n.handle_option(c.NBD_OPT_STARTTLS, b"")) == [c.NBD_REP_ERR_INVALID]
    go = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert go.outcome is Outcome.TRANSMISSION and go.session.tls


@pytest.mark.parametrize("option, payload", [
    (c.NBD_OPT_LIST, b""), (c.NBD_OPT_INFO, info_payload(b"")), (c.NBD_OPT_GO, info_payload(b"")),
    (c.NBD_OPT_STRUCTURED_REPLY, b""), (99, b"xyz"),
    (c.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"")),
])
def test_require_mode_refuses_everything_before_tls(option, payload):
    n = negotiator(FakeExport("secret-name"), tls_mode="require")
    result = n.handle_option(option, payload)
    assert kinds(result) == [c.NBD_REP_ERR_TLS_REQD]
    assert b"secret-name" not in result.replies  # LIST leaks no export name


def test_require_mode_abort_acks_and_export_name_hangs_up():
    n = negotiator(tls_mode="require")
    assert n.handle_option(c.NBD_OPT_ABORT, b"").outcome is Outcome.ABORT
    n = negotiator(tls_mode="require")
    assert n.handle_option(c.NBD_OPT_EXPORT_NAME, b"").outcome is Outcome.DISCONNECT


def test_everything_negotiated_before_starttls_is_forgotten():
    n = negotiator(tls_mode="optional")
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"base:allocation"))
    n.handle_option(c.NBD_OPT_STARTTLS, b"")
    n.tls_started()
    session = n.handle_option(c.NBD_OPT_GO, info_payload(b"")).session
    assert not session.structured_replies and session.meta_contexts == {}
    assert not session.transmission_flags & c.NBD_FLAG_SEND_DF


def test_optional_mode_guards_tls_only_exports():
    n = negotiator(FakeExport("open"), FakeExport("secure", tls_required=True),
                   tls_mode="optional")
    listing = n.handle_option(c.NBD_OPT_LIST, b"")
    assert b"secure" not in listing.replies and b"open" in listing.replies
    assert kinds(n.handle_option(c.NBD_OPT_GO, info_payload(b"secure"))) == \
        [c.NBD_REP_ERR_TLS_REQD]
    assert kinds(n.handle_option(c.NBD_OPT_LIST_META_CONTEXT, meta_payload(b"secure"))) == \
        [c.NBD_REP_ERR_POLICY]
    assert n.handle_option(c.NBD_OPT_GO, info_payload(b"open")).outcome is \
        Outcome.TRANSMISSION
    n = negotiator(FakeExport("secure", tls_required=True), tls_mode="optional")
    assert n.handle_option(c.NBD_OPT_EXPORT_NAME, b"secure").outcome is Outcome.DISCONNECT
    n = negotiator(FakeExport("secure", tls_required=True), tls_mode="optional")
    n.handle_option(c.NBD_OPT_STARTTLS, b"")
    n.tls_started()
    assert b"secure" in n.handle_option(c.NBD_OPT_LIST, b"").replies
    assert n.handle_option(c.NBD_OPT_GO, info_payload(b"secure")).outcome is \
        Outcome.TRANSMISSION


def test_off_mode_never_sends_tls_reqd():
    n = negotiator(FakeExport("", tls_required=True), tls_mode="off")
    for option, payload in [(c.NBD_OPT_GO, info_payload(b"")), (c.NBD_OPT_LIST, b""),
                            (c.NBD_OPT_STARTTLS, b"")]:
        assert c.NBD_REP_ERR_TLS_REQD not in kinds(n.handle_option(option, payload))


def test_per_export_connection_limit():
    full = FakeExport("busy", max_connections=2, connections=2)
    n = negotiator(full)
    assert kinds(n.handle_option(c.NBD_OPT_GO, info_payload(b"busy"))) == [c.NBD_REP_ERR_POLICY]
    assert kinds(n.handle_option(c.NBD_OPT_INFO, info_payload(b"busy")))[-1] == c.NBD_REP_ACK
    assert n.handle_option(c.NBD_OPT_EXPORT_NAME, b"busy").outcome is Outcome.DISCONNECT
    full.connections = 1
    assert negotiator(full).handle_option(c.NBD_OPT_GO, info_payload(b"busy")).outcome is \
        Outcome.TRANSMISSION


# -- HandshakeFraming: client flags and option headers, with the phase -------------------

def framing(*exports, **kwargs):
    from nbdserve.protocol.handshake import HandshakeFraming
    catalog = FakeCatalog(*(exports or (FakeExport(""),)))
    return HandshakeFraming(OptionNegotiator(catalog), **kwargs)


def test_framing_waits_for_whole_messages_and_moves_through_its_phases():
    from nbdserve.protocol.handshake import Phase
    f = framing()
    assert f.phase is Phase.CLIENT_FLAGS and f.step(b"\0\0\0") == (0, None)
    consumed, result = f.step(bytes.fromhex("00000003") + b"extra")
    assert consumed == 4 and result.replies == b"" and f.phase is Phase.OPTIONS
    go = bytes.fromhex("49484156454f5054" "00000007" "00000006" "00000000" "0000")
    assert f.step(go[:-1]) == (0, None)  # the payload is not all here yet
    consumed, result = f.step(go + b"next")
    assert consumed == len(go) and result.outcome is Outcome.TRANSMISSION
    assert f.phase is Phase.TRANSMISSION and not f.reading
    with pytest.raises(RuntimeError):
        f.step(b"more")  # nothing is read after GO


@pytest.mark.parametrize("message, note", [
    (bytes.fromhex("00000004"), "client flags 0x4 set unknown bits"),
])
def test_framing_closes_on_bad_client_flags(message, note):
    from nbdserve.protocol.handshake import Phase
    f = framing()
    consumed, result = f.step(message)
    assert (consumed, result.outcome, result.note) == (4, Outcome.DISCONNECT, note)
    assert f.phase is Phase.CLOSED


@pytest.mark.parametrize("header, note", [
    (bytes.fromhex("49484156454f5055" "00000001" "00000000"), "bad option magic"),
    (bytes.fromhex("49484156454f5054" "00000001" "02000001"), "option payload of 33554433"),
])
def test_framing_closes_on_a_bad_option_header(header, note):
    from nbdserve.protocol.handshake import Phase
    f = framing()
    f.step(bytes.fromhex("00000003"))
    consumed, result = f.step(header)
    assert result.outcome is Outcome.DISCONNECT and note in result.note
    assert consumed == 0 and f.phase is Phase.CLOSED


def test_framing_after_starttls_expects_the_tls_handshake_then_options_again():
    from nbdserve.protocol.handshake import Phase
    catalog = FakeCatalog(FakeExport(""))
    from nbdserve.protocol.handshake import HandshakeFraming
    f = HandshakeFraming(OptionNegotiator(catalog, tls_mode="require"))
    f.step(bytes.fromhex("00000003"))
    consumed, result = f.step(bytes.fromhex("49484156454f5054" "00000005" "00000000"))
    assert result.outcome is Outcome.STARTTLS and f.phase is Phase.TLS and not f.reading
    f.tls_started()
    assert f.phase is Phase.OPTIONS


def test_an_option_larger_than_any_option_needs_is_dropped_as_it_arrives():
    """Consumed chunk by chunk, never buffered whole, then ERR_TOO_BIG; haggling goes
    on."""
    f = framing()
    f.step(bytes.fromhex("00000003"))
    length = c.MAX_OPTION_PAYLOAD + 1
    header = struct.pack(">QII", c.IHAVEOPT, c.NBD_OPT_SET_META_CONTEXT, length)
    assert f.step(header + b"x" * 100) == (16, None)  # the header only; the rest is data
    consumed, result = f.step(b"x" * 40_000)
    assert (consumed, result) == (40_000, None)
    consumed, result = f.step(b"x" * (length - 40_000) + b"next option")
    assert consumed == length - 40_000  # not a byte of what follows
    _magic, option, kind, _length = struct.unpack(">QIII", result.replies[:20])
    assert (option, kind) == (c.NBD_OPT_SET_META_CONTEXT, c.NBD_REP_ERR_TOO_BIG)
    assert result.outcome is Outcome.CONTINUE and f.reading


@pytest.mark.parametrize("option, expected", [
    (c.NBD_OPT_INFO, c.NBD_REP_ERR_TLS_REQD),
    (c.NBD_OPT_STARTTLS, c.NBD_REP_ERR_INVALID),  # takes no data
    (99, c.NBD_REP_ERR_TLS_REQD),
])
def test_before_tls_in_require_mode_no_option_data_is_buffered(option, expected):
    from nbdserve.protocol.handshake import HandshakeFraming
    f = HandshakeFraming(OptionNegotiator(FakeCatalog(FakeExport("")), tls_mode="require"))
    f.step(bytes.fromhex("00000003"))
    assert f.step(struct.pack(">QII", c.IHAVEOPT, option, 10)) == (16, None)
    consumed, result = f.step(b"0123456789")
    assert consumed == 10 and struct.unpack(">I", result.replies[12:16])[0] == expected


# -- extended headers (issue 18; spec extension-ext-header, reference §9) ----------------------

EXTENDED_HEADERS = 11


def test_extended_headers_are_acknowledged_byte_for_byte():
    n = negotiator()
    result = n.handle_option(EXTENDED_HEADERS, b"")
    assert result.replies == REP + bytes.fromhex("0000000b 00000001 00000000")
    assert result.outcome is Outcome.CONTINUE


def test_extended_headers_with_data_a_second_time_and_then_structured_replies():
    n = negotiator()
    ((_, kind, _),) = replies(n.handle_option(EXTENDED_HEADERS, b"x").replies)
    assert kind == c.NBD_REP_ERR_INVALID  # data present
    assert not n.extended_headers
    n.handle_option(EXTENDED_HEADERS, b"")
    ((_, kind, _),) = replies(n.handle_option(EXTENDED_HEADERS, b"").replies)
    assert kind == c.NBD_REP_ERR_INVALID  # a second one
    ((_, kind, _),) = replies(n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"").replies)
    assert kind == c.NBD_REP_ERR_EXT_HEADER_REQD == 0x8000000A  # EH takes precedence


def test_structured_replies_first_then_extended_headers_is_fine():
    n = negotiator()
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    ((_, kind, _),) = replies(n.handle_option(EXTENDED_HEADERS, b"").replies)
    assert kind == c.NBD_REP_ACK


def test_export_name_after_extended_headers_hangs_up():
    n = negotiator()
    n.handle_option(EXTENDED_HEADERS, b"")
    result = n.handle_option(c.NBD_OPT_EXPORT_NAME, b"")
    assert (result.replies, result.outcome) == (b"", Outcome.DISCONNECT)


def test_starttls_forgets_extended_headers():
    n = negotiator(tls_mode="optional")
    n.handle_option(EXTENDED_HEADERS, b"")
    n.tls_started()
    assert not n.extended_headers and not n.structured_replies


def test_go_with_extended_headers_and_contexts_offers_block_status_payload():
    n = negotiator()
    n.handle_option(EXTENDED_HEADERS, b"")
    result = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert result.session.extended_headers and result.session.structured_replies
    assert not result.session.transmission_flags & c.NBD_FLAG_BLOCK_STATUS_PAYLOAD
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"base:allocation"))
    result = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    # HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|DF|MULTI_CONN|CACHE|FAST_ZERO|STATUS_PAYLOAD
    assert result.session.transmission_flags == 0x1DED
    (export_info,) = [d for _, kind, d in replies(result.replies)
                      if kind == c.NBD_REP_INFO and d[:2] == b"\0\0"]
    assert export_info == bytes.fromhex("0000 0000000000100000 1ded")


def test_without_extended_headers_nothing_changes():
    n = negotiator()
    n.handle_option(c.NBD_OPT_STRUCTURED_REPLY, b"")
    n.handle_option(c.NBD_OPT_SET_META_CONTEXT, meta_payload(b"", b"base:allocation"))
    result = n.handle_option(c.NBD_OPT_GO, info_payload(b""))
    assert not result.session.extended_headers
    assert result.session.transmission_flags == 0x0DED


@pytest.mark.parametrize("raw", [b"\0", b"disk\0", b"\0disk", b"di\0sk"])
def test_a_string_with_nul_is_refused(raw):
    """Spec: names and queries hold no NUL, wherever it is."""
    with pytest.raises(OptionError) as refused:
        decode_string(raw, "export name")
    assert refused.value.reply_type == c.NBD_REP_ERR_INVALID
    assert refused.value.message == "export name contains NUL"


def test_strings_without_nul_are_decoded():
    assert decode_string(b"", "export name") == ""
    assert decode_string("qemu:dirty-bitmap:b0 é".encode(), "query") == \
        "qemu:dirty-bitmap:b0 é"
