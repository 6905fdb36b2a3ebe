"""Drive the handshake from the stream's callbacks: a thin adapter that moves bytes
between the connection and the sans-I/O HandshakeFraming (protocol/handshake.py).

The handshake runs without a task or coroutine: bytes are parsed as they arrive and
replies written at once. Per connection this is what a handshake rate is made of, and
a coroutine chain resumed for every option cost a third of it. Only STARTTLS, whose
TLS handshake is asynchronous, runs in a task.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from nbdserve.metrics import HANDSHAKE_FAILURES
from nbdserve.protocol.handshake import HandshakeFraming, Phase
from nbdserve.protocol.options import GREETING, OptionNegotiator, Outcome, Session
from nbdserve.server.stream import NbdStream
from nbdserve.tls import TlsConfig, subject_allowed, subject_string

log = logging.getLogger("nbdserve.handshake")

# Bound once: Enum member access is slow on 3.11 (see protocol/handshake.py).
_OPTIONS, _TLS, _TRANSMISSION = Phase.OPTIONS, Phase.TLS, Phase.TRANSMISSION
_ABORT = Outcome.ABORT

class Handshake:
    """The newstyle handshake of one connection. ``on_done`` receives the agreed
    session, or None when the connection is to be closed."""

    def __init__(self, stream: NbdStream, negotiator: OptionNegotiator, peer: str,
                 on_done: Callable[[Session | None], None], tls: TlsConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.stream = stream
        self.negotiator = negotiator
        self.framing = HandshakeFraming(negotiator)
        self.peer = peer
        self.on_done = on_done
        self.tls = tls
        self.ssl_context = ssl_context
        self.finished = False
        self.tls_task: asyncio.Task | None = None

    def start(self, greeted: bool = False) -> None:
        """Greet the client (unless the caller already did), then handle options."""
        if not greeted:
            self.stream.write(GREETING)
        self.stream.on_data = self.feed
        if self.stream.available():  # whatever was received before (none, when just accepted)
            self.feed()

    def feed(self) -> None:
        """Handle every complete message received so far. (No busy-polling between
        round trips, unlike the request loop: measured, it made a connect-and-go loop
        4-13 % slower, its spin taking a core the client needed.)"""
        try:
            self._feed()
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: handshake failed", self.peer)
            self.finish(None, "error")

    def _feed(self) -> None:
        stream = self.stream
        framing = self.framing
        while framing.reading and not stream.write_paused:
            consumed, result = framing.step(stream.unread())
            if consumed:
                stream.consume(consumed)
            if result is None:
                if consumed:
                    continue  # part of an oversized option was dropped: go on
                return  # incomplete: the buffer grows (to the payload limit at most)
            if result.replies:
                stream.write(result.replies)
            phase = framing.phase
            if phase is _OPTIONS:
                continue
            if phase is _TLS:
                stream.on_data = None
                self.tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            elif phase is _TRANSMISSION:
                self.finish(result.session)
            elif result.outcome is _ABORT:
                log.debug("%s: client aborted the handshake", self.peer)
                # A client that aborts after a refused GO was refused (nbdinfo asking
                # for an export that is not there); otherwise it just left.
                self.finish(None, "refused" if self.negotiator.go_refused else "aborted")
            else:
                log.warning("%s: %s; disconnecting", self.peer, result.note)
                self.finish(None, "refused")
            return

    def finish(self, session: Session | None, failure: str = "") -> None:
        """The handshake ended: in a session, or (None) in a failure of that kind
        (metrics.HandshakeFailures' reasons)."""
        if self.finished:
            return
        self.finished = True
        self.stream.on_data = None
        if session is None:
            HANDSHAKE_FAILURES.count(failure or "closed")
        self.on_done(session)

    async def _start_tls(self) -> None:
        try:
            failure = await start_tls(self.stream, self.peer, self.tls, self.ssl_context)
            if failure:
                self.finish(None, failure)
                return
        except Exception:
            log.exception("%s: TLS upgrade failed", self.peer)
            self.finish(None, "error")
            return
        self.framing.tls_started()
        self.stream.on_data = self.feed
        self.feed()  # whatever arrived during the TLS handshake

    def abandon(self) -> None:
        """The connection is gone: stop, and do not report (but count it)."""
        if not self.finished:
            HANDSHAKE_FAILURES.count("closed")
        self.finished = True
        self.stream.on_data = None
        if self.tls_task is not None:
            self.tls_task.cancel()


async def start_tls(stream: NbdStream, peer: str, tls: TlsConfig,
                    ssl_context: ssl.SSLContext) -> str:
    """The TLS handshake after STARTTLS, then the client-authentication policy.
    Returns "" when TLS is established, else the kind of failure."""
    try:
        await stream.start_tls(ssl_context)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        log.warning("%s: TLS handshake failed: %s", peer, str(exc) or type(exc).__name__)
        return "tls-handshake"
    ssl_object = stream.get_extra_info("ssl_object")
    if ssl_object is None or stream.transport.is_closing():
        # The connection ended during the TLS handshake (the handshake deadline, or the
        # client went away): nothing was established.
        log.debug("%s: the connection closed during the TLS handshake", peer)
        return "closed"
    subject = subject_string(stream.get_extra_info("peercert"))
    if not subject_allowed(subject, tls.allow_subjects):
        log.warning("%s: client certificate subject %r is not allowed; disconnecting",
                    peer, subject)
        return "tls-subject"
    log.info("%s: %s established%s", peer, ssl_object.version(),
             f" with client {subject}" if subject else "")
    return ""
