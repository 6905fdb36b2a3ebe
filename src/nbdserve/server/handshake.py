"""Drive option haggling over a stream: a thin adapter around OptionNegotiator."""

from __future__ import annotations

import logging
import ssl

from nbdserve.protocol import constants as c
from nbdserve.protocol.options import (
    GREETING,
    OPTION_HEADER,
    OptionNegotiator,
    Outcome,
    ProtocolViolation,
    Session,
)
from nbdserve.server.stream import NbdStream
from nbdserve.tls import TlsConfig, subject_allowed, subject_string

log = logging.getLogger("nbdserve.handshake")


async def negotiate(reader: NbdStream, writer: NbdStream,
                    negotiator: OptionNegotiator, peer: str, tls: TlsConfig | None = None,
                    ssl_context: ssl.SSLContext | None = None) -> Session | None:
    """Run the newstyle handshake; return the agreed session, or None to hang up."""
    writer.write(GREETING)
    await writer.drain()
    try:
        negotiator.handle_client_flags(await reader.readexactly(4))
    except ProtocolViolation as error:
        log.warning("%s: %s; disconnecting", peer, error)
        return None
    while True:
        magic, option, length = OPTION_HEADER.unpack(await reader.readexactly(16))
        if magic != c.IHAVEOPT:
            log.warning("%s: bad option magic 0x%x; disconnecting", peer, magic)
            return None
        if length > c.MAX_OPTION_LENGTH:
            log.warning("%s: option payload of %d bytes; disconnecting", peer, length)
            return None
        payload = await reader.readexactly(length) if length else b""
        result = negotiator.handle_option(option, payload)
        if result.replies:
            writer.write(result.replies)
            await writer.drain()
        if result.outcome is Outcome.CONTINUE:
            continue
        if result.outcome is Outcome.STARTTLS:
            if not await start_tls(writer, peer, tls, ssl_context):
                return None
            negotiator.tls_started()
            continue
        if result.outcome is Outcome.TRANSMISSION:
            return result.session
        if result.outcome is Outcome.DISCONNECT:
            log.warning("%s: %s; disconnecting", peer, result.note)
        else:
            log.debug("%s: client aborted the handshake", peer)
        return None


async def start_tls(writer: NbdStream, peer: str, tls: TlsConfig,
                    ssl_context: ssl.SSLContext) -> bool:
    """The TLS handshake after STARTTLS, then the client-authentication policy."""
    try:
        await writer.start_tls(ssl_context)
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        log.warning("%s: TLS handshake failed: %s", peer, exc)
        return False
    subject = subject_string(writer.get_extra_info("peercert"))
    if not subject_allowed(subject, tls.allow_subjects):
        log.warning("%s: client certificate subject %r is not allowed; disconnecting",
                    peer, subject)
        return False
    ssl_object = writer.get_extra_info("ssl_object")
    version = ssl_object.version() if ssl_object is not None else "TLS"
    log.info("%s: %s established%s", peer, version,
             f" with client {subject}" if subject else "")
    return True
