"""Option haggling (spec: "Option types"), as a sans-I/O state machine.

The asyncio layer reads an option header and its payload and hands both to
``OptionNegotiator.handle_option``; it gets back the encoded replies and what to do
next. Nothing here touches a socket, so every rule is tested with literal bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple, Protocol

from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c

GREETING = struct.pack(
    ">QQH", c.NBDMAGIC, c.IHAVEOPT, c.NBD_FLAG_FIXED_NEWSTYLE | c.NBD_FLAG_NO_ZEROES
)
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
KNOWN_CLIENT_FLAGS = c.NBD_FLAG_C_FIXED_NEWSTYLE | c.NBD_FLAG_C_NO_ZEROES


class ExportView(Protocol):
    """What negotiation needs to know about an export (nbdserve.export.Export has it)."""

    name: str
    description: str
    size: int
    read_only: bool
    multi_conn: bool
    tls_required: bool
    max_connections: int  # 0 = unlimited
    connections: int  # in transmission now
    discard_only: bool  # reads and TRIM only (a snapshot export)

    def meta_contexts(self) -> Sequence[str]: ...


class ExportCatalog(Protocol):
    generation: int  # moves on whenever an export is added or removed

    def find(self, name: str) -> ExportView | None: ...

    def listed(self) -> Sequence[ExportView]: ...

    def absence(self, name: str) -> str:
        """Why a name that is not served is not (a migration), or ""."""


def at_connection_limit(export: ExportView) -> bool:
    """Whether the export has as many connections as it allows (GO is refused)."""
    return bool(export.max_connections) and export.connections >= export.max_connections


class Outcome(enum.Enum):
    CONTINUE = "continue"  # send the replies, read the next option
    ABORT = "abort"  # send the replies (the ACK), then close
    DISCONNECT = "disconnect"  # close without sending anything more
    TRANSMISSION = "transmission"  # send the replies, then enter transmission
    STARTTLS = "starttls"  # send the ACK, then run the TLS handshake


class Session(NamedTuple):
    """What haggling agreed, handed to the transmission phase. (A named tuple: made
    once per connection, at a third of a frozen dataclass's cost.) Connections whose
    handshakes were the same share one (replay.py): nothing may change it, and its
    meta_contexts is a read-only view, so nothing can."""

    export: ExportView
    structured_replies: bool
    transmission_flags: int
    meta_contexts: Mapping[int, str]
    tls: bool = False
    extended_headers: bool = False


@dataclass(slots=True)
class OptionResult:
    replies: bytes
    outcome: Outcome = Outcome.CONTINUE
    session: Session | None = None
    note: str = ""  # a short reason, for the log, when the outcome is not CONTINUE


class OptionError(Exception):
    """An option is refused with an NBD_REP_ERR_* reply; the haggling goes on."""

    def __init__(self, reply_type: int, message: str) -> None:
        super().__init__(message)
        self.reply_type = reply_type
        self.message = message


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(c.NBD_REP_MAGIC, option, reply_type, len(data)) + data


def encode_option_error(option: int, reply_type: int, message: str) -> bytes:
    return encode_option_reply(option, reply_type, message.encode()[: c.MAX_ERROR_MESSAGE])


# The replies to INFO and GO that are the same for every export and connection.
_BLOCK_SIZE_INFO = {
    option: encode_option_reply(option, c.NBD_REP_INFO, INFO_BLOCK_SIZE.pack(
        c.NBD_INFO_BLOCK_SIZE, c.MIN_BLOCK_SIZE, c.PREFERRED_BLOCK_SIZE, c.MAX_PAYLOAD))
    for option in (c.NBD_OPT_INFO, c.NBD_OPT_GO)
}
_INFO_OR_GO_ACK = {option: encode_option_reply(option, c.NBD_REP_ACK)
                   for option in (c.NBD_OPT_INFO, c.NBD_OPT_GO)}

_OPTIONS_WITHOUT_DATA = frozenset((c.NBD_OPT_ABORT, c.NBD_OPT_LIST, c.NBD_OPT_STARTTLS,
                                   c.NBD_OPT_STRUCTURED_REPLY, c.NBD_OPT_EXTENDED_HEADERS))


def parse_client_flags(data: bytes) -> tuple[bool, bool]:
    """Return (fixed_newstyle, no_zeroes); unknown bits MUST drop the connection."""
    (flags,) = U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise ProtocolViolation(f"client flags 0x{flags:x} set unknown bits")
    return bool(flags & c.NBD_FLAG_C_FIXED_NEWSTYLE), bool(flags & c.NBD_FLAG_C_NO_ZEROES)


def decode_string(raw: bytes, what: str) -> str:
    """Spec: strings are UTF-8, at most 4096 bytes, with no NUL."""
    if not raw:
        return ""  # the default export's name, in most requests
    if len(raw) > c.NBD_MAX_STRING:
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{what} longer than 4096 bytes")
    if 0 in raw:  # (the byte value: a bytes needle costs CPython a TypeError, cleared)
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(c.NBD_REP_ERR_INVALID, f"{what} is not valid UTF-8") from None


def _export_name_prefix(payload: bytes, rest: int) -> tuple[str, int]:
    """The u32-length-prefixed export name that starts INFO, GO, LIST_META_CONTEXT and
    SET_META_CONTEXT requests, followed by at least `rest` more bytes. Returns the name
    and the offset after it."""
    if len(payload) < 4 + rest:
        raise OptionError(c.NBD_REP_ERR_INVALID, "request too short")
    (name_length,) = U32.unpack_from(payload, 0)
    if name_length > len(payload) - 4 - rest:
        raise OptionError(c.NBD_REP_ERR_INVALID, "name length exceeds the request")
    return decode_string(payload[4 : 4 + name_length], "export name"), 4 + name_length


def parse_info_request(payload: bytes) -> tuple[str, list[int]]:
    """INFO and GO: u32 name length, name, u16 count, count x u16 info types."""
    name, position = _export_name_prefix(payload, 2)
    name_length = position - 4
    (count,) = U16.unpack_from(payload, position)
    if len(payload) != 6 + name_length + 2 * count:
        raise OptionError(c.NBD_REP_ERR_INVALID, "information request count does not match")
    if not count:
        return name, []
    return name, list(struct.unpack_from(f">{count}H", payload, 6 + name_length))


def parse_meta_request(payload: bytes) -> tuple[str, list[str]]:
    """LIST and SET_META_CONTEXT: u32 name length, name, u32 count, count x (u32, query)."""
    name, position = _export_name_prefix(payload, 4)
    (count,) = U32.unpack_from(payload, position)
    position += 4
    queries = []
    for _ in range(count):
        if position + 4 > len(payload):
            raise OptionError(c.NBD_REP_ERR_INVALID, "query count exceeds the request")
        (length,) = U32.unpack_from(payload, position)
        position += 4
        if length > len(payload) - position:
            raise OptionError(c.NBD_REP_ERR_INVALID, "query length exceeds the request")
        queries.append(decode_string(payload[position : position + length], "query"))
        position += length
    if position != len(payload):
        raise OptionError(c.NBD_REP_ERR_INVALID, "trailing bytes after the queries")
    return name, queries


def match_list_query(query: str, available: Sequence[str]) -> list[str]:
    """LIST_META_CONTEXT: exact names plus the namespace wildcards of base: and qemu:."""
    if query in ("base:", "qemu:", c.QEMU_DIRTY_BITMAP_PREFIX):
        return [name for name in available if name.startswith(query)]
    return [query] if query in available else []


def transmission_flags(export: ExportView, structured_replies: bool,
                       status_payload: bool = False) -> int:
    flags = (
        c.NBD_FLAG_HAS_FLAGS
        | c.NBD_FLAG_SEND_FLUSH
        | c.NBD_FLAG_SEND_FUA
        | c.NBD_FLAG_SEND_CACHE
    )
    if export.read_only:
        flags |= c.NBD_FLAG_READ_ONLY
    elif export.discard_only:
        # A snapshot export: read-only but for TRIM, which releases what was backed
        # up (QEMU's fleecing exports are writable for the same reason).
        flags |= c.NBD_FLAG_SEND_TRIM
    else:
        flags |= (
            c.NBD_FLAG_SEND_TRIM | c.NBD_FLAG_SEND_WRITE_ZEROES | c.NBD_FLAG_SEND_FAST_ZERO
        )
    if export.multi_conn:
        flags |= c.NBD_FLAG_CAN_MULTI_CONN
    if structured_replies:
        flags |= c.NBD_FLAG_SEND_DF  # spec: DF only once structured replies are on
    if status_payload:
        flags |= c.NBD_FLAG_BLOCK_STATUS_PAYLOAD
    return flags


class OptionNegotiator:
    """The server side of option haggling for one connection."""

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        shutting_down: Callable[[], bool] = lambda: False,
        max_options: int = c.MAX_OPTIONS_BEFORE_GO,
        tls_mode: str = "off",
    ) -> None:
        self.catalog = catalog
        self.go_refused = False  # a GO was refused (the export, TLS, the limit...)
        self.shutting_down = shutting_down
        self.max_options = max_options
        self.tls_mode = tls_mode  # "off", "optional" (SELECTIVETLS), "require" (FORCEDTLS)
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.structured_replies = False
        self.extended_headers = False
        self.options_seen = 0
        # The selection of the last SET_META_CONTEXT and the export it named.
        self.meta_export: str | None = None
        self.meta_contexts: dict[int, str] = {}
        # What the answers so far depended on, for replaying them (replay.py): the
        # export names looked up, and whether the whole catalog was (LIST).
        self.names: tuple[str, ...] = ()
        self.listed = False

    def snapshot(self) -> tuple:
        """The state the answers so far left (TLS off, not shutting down), for
        restore: another connection whose client sent the same bytes resumes here."""
        return (self.go_refused, self.fixed_newstyle, self.no_zeroes,
                self.structured_replies, self.extended_headers, self.options_seen,
                self.meta_export, dict(self.meta_contexts), self.names)

    def restore(self, state: tuple) -> None:
        (self.go_refused, self.fixed_newstyle, self.no_zeroes, self.structured_replies,
         self.extended_headers, self.options_seen, self.meta_export, contexts,
         self.names) = state
        self.meta_contexts = dict(contexts)

    def _find(self, name: str) -> ExportView | None:
        if name not in self.names:
            self.names += (name,)
        return self.catalog.find(name)

    def payload_limit(self) -> int:
        """The largest option payload worth receiving now. Before TLS in FORCEDTLS
        mode none is: every option but STARTTLS and ABORT (which take no data) is
        refused whatever it says, so a client that has not authenticated gets no
        buffer grown for it."""
        if self.tls_mode == "require" and not self.tls_active:
            return 0
        return c.MAX_OPTION_PAYLOAD

    def refuse_oversized(self, option: int, length: int) -> OptionResult:
        """An option whose payload (over payload_limit()) was consumed unread."""
        self.options_seen += 1
        if self.options_seen > self.max_options:
            return OptionResult(b"", Outcome.DISCONNECT, note="too many options")
        if option == c.NBD_OPT_EXPORT_NAME or not self.fixed_newstyle:
            # No error reply exists for EXPORT_NAME (and a name is at most 4096 bytes).
            return OptionResult(b"", Outcome.DISCONNECT,
                                note=f"option {option} with {length} bytes of data")
        if option in _OPTIONS_WITHOUT_DATA:
            reply, message = c.NBD_REP_ERR_INVALID, "this option takes no data"
        elif self.tls_mode == "require" and not self.tls_active:
            reply, message = c.NBD_REP_ERR_TLS_REQD, "this option needs TLS first"
        elif option not in self._handlers:
            reply, message = c.NBD_REP_ERR_UNSUP, f"option {option} unsupported"
        else:
            reply, message = (c.NBD_REP_ERR_TOO_BIG,
                              f"option data of {length} bytes is over the limit")
        return OptionResult(encode_option_error(option, reply, message))

    def handle_client_flags(self, data: bytes) -> None:
        self.fixed_newstyle, self.no_zeroes = parse_client_flags(data)

    def handle_option(self, option: int, payload: bytes) -> OptionResult:
        self.options_seen += 1
        if self.options_seen > self.max_options:
            return OptionResult(b"", Outcome.DISCONNECT, note="too many options")
        if option == c.NBD_OPT_EXPORT_NAME:
            if self.extended_headers:
                # Spec: a client that negotiated extended headers MUST NOT use it;
                # there is no error reply for EXPORT_NAME.
                return OptionResult(b"", Outcome.DISCONNECT,
                                    note="EXPORT_NAME after EXTENDED_HEADERS")
            return self._export_name(payload)
        if not self.fixed_newstyle:
            # Only EXPORT_NAME exists for non-fixed clients; QEMU hangs up too.
            return OptionResult(b"", Outcome.DISCONNECT, note="option from non-fixed client")
        if option == c.NBD_OPT_ABORT:
            return OptionResult(
                encode_option_reply(option, c.NBD_REP_ACK), Outcome.ABORT, note="abort"
            )
        if self.shutting_down():
            return OptionResult(
                encode_option_error(option, c.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
            )
        if self.tls_mode == "require" and not self.tls_active and option != c.NBD_OPT_STARTTLS:
            # FORCEDTLS: everything but STARTTLS and ABORT waits for TLS (spec).
            name = c.OPTION_NAMES.get(option, str(option))
            return OptionResult(encode_option_error(option, c.NBD_REP_ERR_TLS_REQD,
                                                    f"option {name} needs TLS first"))
        handler = self._handlers.get(option)
        if handler is None:
            name = c.OPTION_NAMES.get(option, str(option))
            return OptionResult(
                encode_option_error(option, c.NBD_REP_ERR_UNSUP, f"option {name} unsupported")
            )
        try:
            return handler(self, option, payload)
        except OptionError as error:
            if option == c.NBD_OPT_GO:
                self.go_refused = True  # a handshake that ends now was refused
            return OptionResult(encode_option_error(option, error.reply_type, error.message))

    # -- one method per option ------------------------------------------------------

    def _export_name(self, payload: bytes) -> OptionResult:
        # No error reply exists for EXPORT_NAME: any refusal is a hard disconnect.
        if self.shutting_down():
            return OptionResult(b"", Outcome.DISCONNECT, note="shutting down")
        if self.tls_mode == "require" and not self.tls_active:
            return OptionResult(b"", Outcome.DISCONNECT, note="EXPORT_NAME before TLS")
        try:
            name = decode_string(payload, "export name")
        except OptionError as error:
            return OptionResult(b"", Outcome.DISCONNECT, note=error.message)
        export = self._find(name)
        if export is None:
            return OptionResult(b"", Outcome.DISCONNECT, note=self._unknown(name))
        if self._needs_tls(export):
            return OptionResult(b"", Outcome.DISCONNECT,
                                note=f"export {name!r} requires TLS")
        if at_connection_limit(export):
            return OptionResult(b"", Outcome.DISCONNECT,
                                note=f"export {name!r} is at its connection limit")
        session = self._session(export)
        reply = EXPORT_NAME_REPLY.pack(export.size, session.transmission_flags)
        if not self.no_zeroes:
            reply += bytes(124)
        return OptionResult(reply, Outcome.TRANSMISSION, session)

    def _list(self, option: int, payload: bytes) -> OptionResult:
        if payload:
            raise OptionError(c.NBD_REP_ERR_INVALID, "LIST takes no data")
        replies = []
        self.listed = True
        for export in self.catalog.listed():
            if self._needs_tls(export):
                continue  # SELECTIVETLS: TLS-only exports stay hidden until TLS is on
            name = export.name.encode()
            data = U32.pack(len(name)) + name + export.description.encode()
            replies.append(encode_option_reply(option, c.NBD_REP_SERVER, data))
        replies.append(encode_option_reply(option, c.NBD_REP_ACK))
        return OptionResult(b"".join(replies))

    def _starttls(self, option: int, payload: bytes) -> OptionResult:
        if payload:
            raise OptionError(c.NBD_REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_mode == "off":
            raise OptionError(c.NBD_REP_ERR_POLICY, "TLS is not configured on this server")
        if self.tls_active:
            raise OptionError(c.NBD_REP_ERR_INVALID, "TLS is already active")
        return OptionResult(encode_option_reply(option, c.NBD_REP_ACK), Outcome.STARTTLS)

    def tls_started(self) -> None:
        """The TLS handshake succeeded: forget everything negotiated before it (spec)."""
        self.tls_active = True
        self.structured_replies = False
        self.extended_headers = False
        self.meta_contexts = {}
        self.meta_export = None

    def _structured_reply(self, option: int, payload: bytes) -> OptionResult:
        if payload:
            raise OptionError(c.NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        if self.extended_headers:
            # Extended headers take precedence (as QEMU answers).
            raise OptionError(c.NBD_REP_ERR_EXT_HEADER_REQD,
                              "extended headers are negotiated already")
        if self.structured_replies:
            raise OptionError(c.NBD_REP_ERR_INVALID, "structured replies already negotiated")
        self.structured_replies = True
        return OptionResult(encode_option_reply(option, c.NBD_REP_ACK))

    def _extended_headers(self, option: int, payload: bytes) -> OptionResult:
        """32-byte requests and reply chunks with 64-bit lengths (docs/protocol.md).
        Structured replies come with them (a client may have asked for those first)."""
        if payload:
            raise OptionError(c.NBD_REP_ERR_INVALID, "EXTENDED_HEADERS takes no data")
        if self.extended_headers:
            raise OptionError(c.NBD_REP_ERR_INVALID, "extended headers already negotiated")
        self.extended_headers = True
        self.structured_replies = True
        return OptionResult(encode_option_reply(option, c.NBD_REP_ACK))

    def _info_or_go(self, option: int, payload: bytes) -> OptionResult:
        name, requested = parse_info_request(payload)
        export = self._find(name)
        if export is None:
            raise OptionError(c.NBD_REP_ERR_UNKNOWN, self._unknown(name))
        if self._needs_tls(export):
            raise OptionError(c.NBD_REP_ERR_TLS_REQD, f"export {name!r} requires TLS")
        if option == c.NBD_OPT_GO and at_connection_limit(export):
            raise OptionError(c.NBD_REP_ERR_POLICY,
                              f"export {name!r} is at its limit of {export.max_connections} "
                              "connections")
        session = self._session(export, informing=option == c.NBD_OPT_INFO)
        replies = [
            self._info(option, INFO_EXPORT.pack(c.NBD_INFO_EXPORT, export.size,
                                                session.transmission_flags)),
            # Sent even unasked (as QEMU does): clients ignore what they did not ask for.
            _BLOCK_SIZE_INFO[option],
        ]
        if c.NBD_INFO_NAME in requested:
            replies.append(self._info(option, U16.pack(c.NBD_INFO_NAME)
                                      + export.name.encode()))
        if c.NBD_INFO_DESCRIPTION in requested and export.description:
            replies.append(self._info(option, U16.pack(c.NBD_INFO_DESCRIPTION)
                                      + export.description.encode()))
        replies.append(_INFO_OR_GO_ACK[option])
        if option == c.NBD_OPT_INFO:
            return OptionResult(b"".join(replies))
        return OptionResult(b"".join(replies), Outcome.TRANSMISSION, session)

    def _list_meta_context(self, option: int, payload: bytes) -> OptionResult:
        # Allowed before STRUCTURED_REPLY (spec: SHOULD NOT; QEMU and nbdkit accept it).
        name, queries = parse_meta_request(payload)
        export = self._meta_export(name)
        available = list(export.meta_contexts())
        if queries:
            found: list[str] = []
            for query in queries:
                found.extend(n for n in match_list_query(query, available) if n not in found)
        else:
            found = available
        replies = [self._meta_reply(option, 0, context) for context in found]
        replies.append(encode_option_reply(option, c.NBD_REP_ACK))
        return OptionResult(b"".join(replies))

    def _set_meta_context(self, option: int, payload: bytes) -> OptionResult:
        # The selection is replaced even when this SET fails (spec).
        self.meta_contexts = {}
        self.meta_export = None
        if not self.structured_replies:
            # Check the framing first so a malformed request still gets ERR_INVALID.
            parse_meta_request(payload)
            raise OptionError(c.NBD_REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies")
        name, queries = parse_meta_request(payload)
        export = self._meta_export(name)
        available = export.meta_contexts()
        replies = []
        for query in queries:
            # SET takes exact names only: wildcards and unknown names select nothing.
            if query in available and query not in self.meta_contexts.values():
                context_id = len(self.meta_contexts) + 1
                self.meta_contexts[context_id] = query
                replies.append(self._meta_reply(option, context_id, query))
        self.meta_export = name
        replies.append(encode_option_reply(option, c.NBD_REP_ACK))
        return OptionResult(b"".join(replies))

    _handlers: dict[int, Callable[[OptionNegotiator, int, bytes], OptionResult]] = {
        c.NBD_OPT_LIST: _list,
        c.NBD_OPT_STARTTLS: _starttls,
        c.NBD_OPT_INFO: _info_or_go,
        c.NBD_OPT_GO: _info_or_go,
        c.NBD_OPT_STRUCTURED_REPLY: _structured_reply,
        c.NBD_OPT_EXTENDED_HEADERS: _extended_headers,
        c.NBD_OPT_LIST_META_CONTEXT: _list_meta_context,
        c.NBD_OPT_SET_META_CONTEXT: _set_meta_context,
    }

    # -- helpers --------------------------------------------------------------------

    def _meta_export(self, name: str) -> ExportView:
        export = self._find(name)
        if export is None:
            raise OptionError(c.NBD_REP_ERR_UNKNOWN, self._unknown(name))
        if self._needs_tls(export):
            # ERR_TLS_REQD is reserved for INFO, GO and EXPORT_NAME (spec).
            raise OptionError(c.NBD_REP_ERR_POLICY, f"export {name!r} requires TLS")
        return export

    def _unknown(self, name: str) -> str:
        why = self.catalog.absence(name)
        return f"export {name!r} not available" + (f": {why}" if why else "")

    def _needs_tls(self, export: ExportView) -> bool:
        return self.tls_mode == "optional" and export.tls_required and not self.tls_active

    def _session(self, export: ExportView, informing: bool = False) -> Session:
        # Contexts chosen by SET for another export do not carry over (spec).
        contexts = dict(self.meta_contexts) if self.meta_export == export.name else {}
        # BLOCK_STATUS_PAYLOAD: with extended headers, and (spec: SHOULD NOT
        # otherwise) only when GO enters transmission with contexts selected; INFO
        # announces it, as QEMU does.
        status_payload = self.extended_headers and (informing or bool(contexts))
        return Session(
            export=export,
            structured_replies=self.structured_replies,
            transmission_flags=transmission_flags(export, self.structured_replies,
                                                  status_payload),
            meta_contexts=MappingProxyType(contexts),
            tls=self.tls_active,
            extended_headers=self.extended_headers,
        )

    @staticmethod
    def _info(option: int, body: bytes) -> bytes:
        return encode_option_reply(option, c.NBD_REP_INFO, body)

    @staticmethod
    def _meta_reply(option: int, context_id: int, name: str) -> bytes:
        return encode_option_reply(
            option, c.NBD_REP_META_CONTEXT, U32.pack(context_id) + name.encode()
        )
