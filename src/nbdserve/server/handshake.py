"""Drive option haggling from the stream's callbacks: a thin adapter around the
sans-I/O OptionNegotiator.

The handshake runs without a task or coroutine: bytes are parsed as they arrive and
replies written at once. Per connection this is what a handshake rate is made of, and
a coroutine chain resumed for every option cost a third of it. Only STARTTLS, whose
TLS handshake is asynchronous, runs in a task.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable

from nbdserve.protocol import constants as c
from nbdserve.protocol.options import (
    GREETING,
    OPTION_HEADER,
    OptionNegotiator,
    Outcome,
    ProtocolViolation,
    Session,
)
from nbdserve.server.polling import Poller
from nbdserve.server.stream import NbdStream
from nbdserve.tls import TlsConfig, subject_allowed, subject_string

log = logging.getLogger("nbdserve.handshake")

CLIENT_FLAGS_SIZE = 4


class Handshake:
    """The newstyle handshake of one connection. ``on_done`` receives the agreed
    session, or None when the connection is to be closed."""

    def __init__(self, stream: NbdStream, negotiator: OptionNegotiator, peer: str,
                 on_done: Callable[[Session | None], None], tls: TlsConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 poller: Poller | None = None) -> None:
        self.stream = stream
        self.poller = poller  # busy-polls between round trips (polling.py)
        self.waiting_since = 0
        self.negotiator = negotiator
        self.peer = peer
        self.on_done = on_done
        self.tls = tls
        self.ssl_context = ssl_context
        self.flags_received = False
        self.finished = False
        self.tls_task: asyncio.Task | None = None

    def start(self, greeted: bool = False) -> None:
        """Greet the client (unless the caller already did), then handle options."""
        if not greeted:
            self.stream.write(GREETING)
        self.stream.consumer = self.feed
        self.feed()

    def feed(self) -> None:
        """Handle every complete message received so far."""
        poller = self.poller
        if poller is not None and self.waiting_since:
            poller.adapt(time.perf_counter_ns() - self.waiting_since)
            self.waiting_since = 0
        try:
            self._feed()
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: handshake failed", self.peer)
            self.finish(None)
            return
        if poller is not None and self.stream.consumer is not None and \
                poller.allowed(self.stream.transport.get_write_buffer_size() > 0):
            self.waiting_since = time.perf_counter_ns()
            poller.spin(self.waiting_since)

    def _feed(self) -> None:
        stream = self.stream
        negotiator = self.negotiator
        while stream.consumer is not None and not stream.write_paused:
            if not self.flags_received:
                if stream.available() < CLIENT_FLAGS_SIZE:
                    return
                self.flags_received = True
                try:
                    negotiator.handle_client_flags(stream.take(CLIENT_FLAGS_SIZE))
                except ProtocolViolation as error:
                    log.warning("%s: %s; disconnecting", self.peer, error)
                    self.finish(None)
                    return
                continue
            header = stream.peek_struct(OPTION_HEADER)
            if header is None:
                return
            magic, option, length = header
            if magic != c.IHAVEOPT:
                log.warning("%s: bad option magic 0x%x; disconnecting", self.peer, magic)
                self.finish(None)
                return
            if length > c.MAX_OPTION_LENGTH:
                log.warning("%s: option payload of %d bytes; disconnecting", self.peer,
                            length)
                self.finish(None)
                return
            if stream.available() < OPTION_HEADER.size + length:
                return  # the receive buffer grows until the payload is in
            stream.take(OPTION_HEADER.size)
            payload = stream.take(length) if length else b""
            result = negotiator.handle_option(option, payload)
            if result.replies:
                stream.write(result.replies)
            outcome = result.outcome
            if outcome is Outcome.CONTINUE:
                continue
            if outcome is Outcome.STARTTLS:
                stream.consumer = None
                self.poller = None  # TLS may hold bytes the socket does not show
                self.tls_task = asyncio.get_running_loop().create_task(self._start_tls())
                return
            if outcome is Outcome.TRANSMISSION:
                self.finish(result.session)
            elif outcome is Outcome.DISCONNECT:
                log.warning("%s: %s; disconnecting", self.peer, result.note)
                self.finish(None)
            else:
                log.debug("%s: client aborted the handshake", self.peer)
                self.finish(None)
            return

    def finish(self, session: Session | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.stream.consumer = None
        self.on_done(session)

    async def _start_tls(self) -> None:
        try:
            if not await start_tls(self.stream, self.peer, self.tls, self.ssl_context):
                self.finish(None)
                return
        except Exception:
            log.exception("%s: TLS upgrade failed", self.peer)
            self.finish(None)
            return
        self.negotiator.tls_started()
        self.stream.consumer = self.feed
        self.feed()  # whatever arrived during the TLS handshake

    def abandon(self) -> None:
        """The connection is gone: stop, and do not report."""
        self.finished = True
        self.stream.consumer = None
        if self.tls_task is not None:
            self.tls_task.cancel()


async def start_tls(stream: NbdStream, peer: str, tls: TlsConfig,
                    ssl_context: ssl.SSLContext) -> bool:
    """The TLS handshake after STARTTLS, then the client-authentication policy."""
    try:
        await stream.start_tls(ssl_context)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        log.warning("%s: TLS handshake failed: %s", peer, exc)
        return False
    subject = subject_string(stream.get_extra_info("peercert"))
    if not subject_allowed(subject, tls.allow_subjects):
        log.warning("%s: client certificate subject %r is not allowed; disconnecting",
                    peer, subject)
        return False
    ssl_object = stream.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else "TLS"
    log.info("%s: %s established%s", peer, version,
             f" with client {subject}" if subject else "")
    return True
