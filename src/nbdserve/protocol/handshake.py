"""Framing of the newstyle handshake (spec: "Newstyle negotiation"), sans I/O.

After the server's greeting the client sends its 32-bit flags, then options, each an
IHAVEOPT header and a payload. ``HandshakeFraming.step`` takes the bytes received so
far and returns how many it consumed and what the option haggling made of them
(``OptionNegotiator``, in options.py). What is legal next is the explicit ``phase``.
"""

from __future__ import annotations

import enum
import struct

from nbdserve.protocol import ProtocolViolation
from nbdserve.protocol import constants as c
from nbdserve.protocol.options import OPTION_HEADER, OptionNegotiator, OptionResult, Outcome

CLIENT_FLAGS = struct.Struct(">I")


class Phase(enum.Enum):
    CLIENT_FLAGS = "client flags"  # the greeting is out; the client's flags come next
    OPTIONS = "options"  # haggling
    TLS = "tls"  # STARTTLS acknowledged; the TLS handshake runs below us
    TRANSMISSION = "transmission"  # GO or EXPORT_NAME succeeded
    CLOSED = "closed"  # ABORT, a violation, or a refusal that ends the connection


_FLAGS_ACCEPTED = OptionResult(b"")  # the client's flags need no reply

# Members bound once: on Python 3.11 every `Phase.X` goes through EnumType's attribute
# hooks (about three times a plain attribute), and these run per option.
_CLIENT_FLAGS, _OPTIONS, _TLS = Phase.CLIENT_FLAGS, Phase.OPTIONS, Phase.TLS
_TRANSMISSION, _CLOSED = Phase.TRANSMISSION, Phase.CLOSED
_CONTINUE, _GO, _STARTTLS = Outcome.CONTINUE, Outcome.TRANSMISSION, Outcome.STARTTLS


def _closing(note: str) -> OptionResult:
    return OptionResult(b"", Outcome.DISCONNECT, note=note)


class HandshakeFraming:
    """One connection's handshake: bytes in, option results out."""

    __slots__ = ("negotiator", "phase", "reading", "max_option_length", "discarding",
                 "discarded_option", "discarded_length")

    def __init__(self, negotiator: OptionNegotiator,
                 max_option_length: int = c.MAX_OPTION_LENGTH) -> None:
        self.negotiator = negotiator
        self.max_option_length = max_option_length
        self.phase = _CLIENT_FLAGS
        self.reading = True
        self.discarding = 0  # bytes of an oversized option's payload still to consume
        self.discarded_option = self.discarded_length = 0

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        # Whether bytes from the client are expected now (a plain attribute: the
        # adapter asks after every message).
        self.reading = phase is _CLIENT_FLAGS or phase is _OPTIONS

    def step(self, unread: memoryview | bytes) -> tuple[int, OptionResult | None]:
        """Handle the first complete message in ``unread``.

        Returns (bytes consumed, result); result None means a message is incomplete
        and more bytes are needed (bytes may still have been consumed: the payload of
        an option too large to receive, which is dropped as it arrives). A result's
        outcome moves the phase on; replies in it go to the client first.
        """
        if self.discarding:
            dropped = min(len(unread), self.discarding)
            self.discarding -= dropped
            if self.discarding:
                return dropped, None
            result = self.negotiator.refuse_oversized(self.discarded_option,
                                                      self.discarded_length)
            if result.outcome is not _CONTINUE:
                self._enter(_CLOSED)
            return dropped, result
        if self.phase is _CLIENT_FLAGS:
            if len(unread) < CLIENT_FLAGS.size:
                return 0, None
            try:
                self.negotiator.handle_client_flags(bytes(unread[:CLIENT_FLAGS.size]))
            except ProtocolViolation as error:
                self._enter(_CLOSED)
                return CLIENT_FLAGS.size, _closing(str(error))
            self.phase = _OPTIONS  # (reading stays True)
            return CLIENT_FLAGS.size, _FLAGS_ACCEPTED
        if self.phase is not _OPTIONS:
            raise RuntimeError(f"no client bytes are expected in the {self.phase.value} phase")
        if len(unread) < OPTION_HEADER.size:
            return 0, None
        magic, option, length = OPTION_HEADER.unpack_from(unread)
        if magic != c.IHAVEOPT:
            self._enter(_CLOSED)
            return 0, _closing(f"bad option magic 0x{magic:x}")
        if length > self.max_option_length:
            # Spec: a server may treat an absurd length as hostile and hang up.
            self._enter(_CLOSED)
            return 0, _closing(f"option payload of {length} bytes")
        if length > self.negotiator.payload_limit():
            # More than any option needs (or any data at all before TLS when TLS is
            # required): consumed as it arrives, never buffered, then refused.
            self.discarding = length
            self.discarded_option, self.discarded_length = option, length
            return OPTION_HEADER.size, None
        end = OPTION_HEADER.size + length
        if len(unread) < end:
            return 0, None
        payload = bytes(unread[OPTION_HEADER.size:end]) if length else b""
        result = self.negotiator.handle_option(option, payload)
        # Per option of every connection, so written out: identity tests, not a dict
        # (an Enum's __hash__ is Python code), and the phase set in place.
        outcome = result.outcome
        if outcome is not _CONTINUE:
            if outcome is _GO:
                self.phase, self.reading = _TRANSMISSION, False
            elif outcome is _STARTTLS:
                self._enter(_TLS)
            else:  # ABORT, DISCONNECT
                self._enter(_CLOSED)
        return end, result

    def resume_options(self) -> None:
        """Haggling goes on from a replayed history (replay.py), which always ends
        in the options phase unless it ended the handshake."""
        self._enter(_OPTIONS)

    def tls_started(self) -> None:
        """The TLS handshake succeeded: haggling starts over, encrypted."""
        if self.phase is not _TLS:
            raise RuntimeError("TLS started outside STARTTLS")
        self.negotiator.tls_started()
        self._enter(_OPTIONS)
