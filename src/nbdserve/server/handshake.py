"""Drive the handshake from the stream's callbacks: a thin adapter that moves bytes
between the connection and the sans-I/O HandshakeFraming (protocol/handshake.py).

The handshake runs without a task or coroutine: bytes are parsed as they arrive and
replies written at once. Per connection this is what a handshake rate is made of, and
a coroutine chain resumed for every option cost a third of it. Only STARTTLS, whose
TLS handshake is asynchronous, runs in a task. A client that sends what an earlier one
sent gets the earlier answers (protocol/replay.py), without the haggling: about 15 %
of a short connection's CPU (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from nbdserve.metrics import HANDSHAKE_FAILURES
from nbdserve.protocol.handshake import HandshakeFraming, Phase
from nbdserve.protocol.options import GREETING, OptionNegotiator, Outcome, Session
from nbdserve.protocol.replay import MAX_HISTORY, Transcripts
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
                 ssl_context: ssl.SSLContext | None = None,
                 transcripts: Transcripts | None = None) -> None:
        self.stream = stream
        self.negotiator = negotiator
        self.framing = HandshakeFraming(negotiator)
        self.peer = peer
        self.on_done = on_done
        self.tls = tls
        self.ssl_context = ssl_context
        self.finished = False
        self.tls_task: asyncio.Task | None = None
        # Earlier negotiations to replay (protocol/replay.py; None with TLS, which
        # this does not cover): the client's bytes handled so far, and the negotiator's
        # state after a replayed history, taken up only if the client then goes on
        # differently from every earlier one.
        self.transcripts = transcripts
        self.history = b""
        self.resume_from: tuple | None = None

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
        transcripts = self.transcripts
        if transcripts is not None and not self.stream.write_paused:
            if len(self.history) + self.stream.available() <= MAX_HISTORY:
                self._replay_or_record(transcripts)
                return
            self._resume()  # longer than any transcript: haggle from here on
            self.transcripts = None
        session = self._haggle(None)
        if session is not None:
            self.finish(session)

    def _replay_or_record(self, transcripts: Transcripts) -> None:
        """Answer from the table what an earlier client sent just so; else haggle, and
        record the answer for later clients."""
        stream = self.stream
        received = bytes(stream.unread())
        start = len(self.history)
        history = self.history + received
        transcript = transcripts.find(start, history)
        if transcript is not None:  # answered before: answer the same
            stream.consume(len(received))
            self.history = history
            if transcript.replies:
                stream.write(transcript.replies)
            if transcript.session is not None:
                self.finish(transcript.session)
            else:
                self.resume_from = transcript.state
            return
        self._resume()
        sent: list[bytes] = []
        session = self._haggle(sent)
        # (Recorded before finish: entering transmission may read the first request.)
        unread = stream.available()
        self.history = history[:len(history) - unread]
        framing, negotiator = self.framing, self.negotiator
        if not unread and not framing.discarding and not negotiator.listed and (
                framing.phase is _OPTIONS or session is not None):
            transcripts.record(start, self.history, b"".join(sent), session,
                               negotiator.snapshot(), negotiator.names)
        if session is not None:
            self.finish(session)

    def _resume(self) -> None:
        """The client goes its own way after a replayed history: the negotiator takes
        up the state that history left."""
        if self.resume_from is not None:
            self.negotiator.restore(self.resume_from)
            self.framing.resume_options()
            self.resume_from = None

    def _haggle(self, sent: list[bytes] | None) -> Session | None:
        """Handle every complete message received; the replies go out (and into sent).
        Returns the session when a GO ended the handshake, for the caller to finish."""
        stream = self.stream
        framing = self.framing
        while framing.reading and not stream.write_paused:
            consumed, result = framing.step(stream.unread())
            if consumed:
                stream.consume(consumed)
            if result is None:
                if consumed:
                    continue  # part of an oversized option was dropped: go on
                return None  # incomplete: the buffer grows (to the payload limit at most)
            if result.replies:
                stream.write(result.replies)
                if sent is not None:
                    sent.append(result.replies)
            phase = framing.phase
            if phase is _OPTIONS:
                continue
            if phase is _TLS:
                stream.on_data = None
                self.tls_task = asyncio.get_running_loop().create_task(self._start_tls())
            elif phase is _TRANSMISSION:
                return result.session
            elif result.outcome is _ABORT:
                log.debug("%s: client aborted the handshake", self.peer)
                # A client that aborts after a refused GO was refused (nbdinfo asking
                # for an export that is not there); otherwise it just left.
                self.finish(None, "refused" if self.negotiator.go_refused else "aborted")
            else:
                log.warning("%s: %s; disconnecting", self.peer, result.note)
                self.finish(None, "refused")
            return None
        return None

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
