"""Connections: from accept, through the handshake, to the end of transmission.

``Connections`` greets each client (or queues it while the connection limit is
reached), runs its handshake under a deadline, then its transmission phase, and keeps
the book-keeping shutdown and status need: the live connections, the slots they hold,
the queue of waiting clients. Listening sockets and the server's life are
lifecycle.py's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor

from nbdserve.config import HANDSHAKE_TIMEOUT
from nbdserve.export import Export, ExportCatalog
from nbdserve.logs import Sampler
from nbdserve.metrics import HANDSHAKE_FAILURES
from nbdserve.protocol.options import GREETING, OptionNegotiator, Session
from nbdserve.protocol.replay import Transcripts
from nbdserve.server.handshake import Handshake
from nbdserve.server.polling import Census, Poller
from nbdserve.server.stream import NbdStream
from nbdserve.server.transmission import Transmission, first_is_disc
from nbdserve.tls import TlsConfig

log = logging.getLogger("nbdserve.server")
# Each connection's two lines (connected, disconnected), for at most 20 connections a
# second; more are counted in one line (logs.Sampler).
CONNECTION_LINES = Sampler(log, "connections")

# Clients queued behind a connection limit (-e), at most: each holds a descriptor, and
# an unbounded queue lets anyone exhaust them. 128 is the listen backlog we ask for,
# the queue qemu-nbd's waiting clients sit in. Beyond it a client is hung up on at once.
WAITING_MAX = 128
# Connections in the handshake at once. Each may hold up to an option payload (64 KiB)
# plus its receive buffer and, after STARTTLS, OpenSSL's buffers: this bounds handshake
# memory across all connections (about 256 x 100 KiB). More wait, greeted in turn, in
# the same bounded queue as clients over the connection limit.
HANDSHAKES_MAX = 256


_EXPIRED = float("inf")  # a handshake already cut off


def _settle(future: asyncio.Future, _task: object = None) -> None:
    if not future.done():
        future.set_result(None)


def _nothing() -> None:
    pass


class Connection:
    """Book-keeping for one client, so shutdown and status can find it."""

    def __init__(self, stream: NbdStream, peer: str, sock: socket.socket | None,
                 unix: bool) -> None:
        self.stream = stream
        self.peer = peer
        self.sock = sock  # uvloop builds a new socket object per lookup: keep this one
        self.unix = unix
        self.session: Session | None = None  # set once it is in transmission
        self.features: list[str] = []
        # What serves its requests, built at the first one that is not DISC
        # (Connections.first_request): None before that, and for good on a connection
        # that only looks at the handshake's answers and says goodbye.
        self.transmission: Transmission | None = None
        self.task: asyncio.Task | None = None  # the transmission phase, once it starts
        self.handshake: Handshake | None = None
        self.deadline = 0.0  # when its handshake must be over (the loop's clock)
        self.has_slot = False  # counted against max_connections
        self.lost: asyncio.Future | None = None  # set when the client is gone
        self.gone = False  # the connection is closed
        self.poller: Poller | None = None  # busy-polling its socket (polling.py)
        self.held: list[str] = []  # the bitmaps its meta contexts keep busy
        self.logged = False  # its "connected" line was logged (and so is its last)
        self.ended = False  # its transmission phase is over and accounted for

    def wait_lost(self) -> asyncio.Future:
        if self.lost is None:
            self.lost = asyncio.get_running_loop().create_future()
            if self.gone:
                self.lost.set_result(None)
        return self.lost

    def finished(self) -> asyncio.Future:
        """What to wait for until this client is gone and its book-keeping done: the
        request loop's task once it runs, else the connection's end (a transmission
        served from callbacks alone ends in connection_lost)."""
        return self.task if self.task is not None else self.wait_lost()

    def hang_up(self) -> None:
        """End the connection now: its request loop, or the connection itself."""
        if self.task is not None:
            self.task.cancel()
        else:
            self.stream.close()

    def describe(self) -> dict:
        state = "handshake" if self.has_slot else "waiting"  # for a connection slot
        entry = {"peer": self.peer, "export": None, "state": state}
        if self.session is not None:
            transmission = self.transmission
            entry.update({
                "export": self.session.export.name, "state": "transmission",
                "features": self.features,
                "in_flight": len(transmission.tasks) if transmission is not None else 0,
                "requests": transmission.requests if transmission is not None else 0,
            })
        return entry


class Connections:
    def __init__(self, catalog: ExportCatalog, executor: Executor, census: Census, *,
                 max_connections: int = 0, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 tls: TlsConfig, ssl_context: ssl.SSLContext | None,
                 on_change: Callable[[], None],
                 on_idle: Callable[[], None] = lambda: None,
                 on_unused: Callable[[Export], None] = lambda export: None) -> None:
        self.catalog = catalog
        self.executor = executor
        self.census = census
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.tls = tls  # replaced together with ssl_context on reload
        self.ssl_context = ssl_context
        self.on_change = on_change  # a connection entered or left transmission
        self.on_idle = on_idle  # the last connection went away
        self.on_unused = on_unused  # an export's last connection went away
        self.live: set[Connection] = set()
        self.active = 0  # connections holding a slot (handshake or transmission)
        self.waiting: collections.deque[Connection] = collections.deque()
        self.max_handshakes = HANDSHAKES_MAX
        self.accepted = 0
        self.stopping = False
        # One timer for every handshake's deadline (sweep_handshakes), armed while
        # handshakes run: a timer per connection cost 3 us of every handshake.
        self.sweep: asyncio.TimerHandle | None = None
        # Negotiations seen before, replayed to clients that repeat them (replay.py).
        self.transcripts = Transcripts(catalog)

    def __iter__(self):
        return iter(list(self.live))

    def is_stopping(self) -> bool:
        return self.stopping

    def stop(self) -> None:
        """Shutdown begins: requests from now on earn ESHUTDOWN, options ERR_SHUTDOWN."""
        self.stopping = True
        self.transcripts.disable()
        for conn in self.live:
            if conn.transmission is not None:
                conn.transmission.stop()

    def inflight(self) -> list[asyncio.Task]:
        return [task for conn in self.live if conn.transmission
                for task in conn.transmission.tasks]

    def using(self, export) -> list[Connection]:
        return [conn for conn in self.live
                if conn.session is not None and conn.session.export is export]

    # -- accepting ------------------------------------------------------------------------------

    def connection_made(self, stream: NbdStream) -> None:
        """A client connected: greet it (or queue it for a slot), then register it."""
        greeted = not self.stopping and self.may_begin()
        if greeted:
            stream.write(GREETING)  # first: the client waits for nothing else
        sock = stream.get_extra_info("socket")
        self.accepted += 1
        family = stream.family or (sock.family if sock is not None else socket.AF_UNIX)
        if family in (socket.AF_INET, socket.AF_INET6):
            address = stream.get_extra_info("peername")
            if address is None:  # reset before we looked: the peer is already gone
                peer = f"tcp#{self.accepted}"
            else:
                host, port = address[:2]
                peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            peer = f"unix#{self.accepted}"
        connection = Connection(stream, peer, sock, family == socket.AF_UNIX)
        self.live.add(connection)
        stream.on_lost = functools.partial(self.connection_lost, connection)
        if greeted:
            self.begin_handshake(connection, greeted=True)
        elif self.stopping:
            stream.close()
        elif len(self.waiting) >= WAITING_MAX:
            log.warning("%s: %d clients already wait for a connection slot; disconnecting",
                        peer, WAITING_MAX)
            stream.close()
        else:
            # Like qemu-nbd -e: a client over the limit waits, as if in the backlog.
            stream.transport.pause_reading()
            self.waiting.append(connection)

    def connection_lost(self, connection: Connection) -> None:
        # The stream's callback refers to the connection, which refers to the stream:
        # break that now, so the buffers go with the connection and not whenever the
        # cycle collector next runs (issue 12: memory not given back).
        connection.stream.on_lost = None
        connection.stream.on_data = None  # (first_request's, which refers to it)
        if connection.handshake is not None:
            log.debug("%s: client left during the handshake", connection.peer)
            connection.handshake.abandon()
            connection.handshake = None
            self.census.handshaking -= 1
        transmission = connection.transmission
        finishing = None
        if transmission is not None and connection.task is None:
            # Served from the stream's callbacks to the end (no request loop ran):
            # nothing else will end its transmission phase.
            if not transmission.rules.closed:
                log.debug("%s: client closed the connection", connection.peer)
            if transmission.tasks:
                self.start_loop(connection)  # it lets them finish, then ends it
                finishing = connection.task
            else:
                self.end_transmission(connection)
        elif transmission is None and connection.session is not None:
            # In transmission, and no request but DISC (or none) came.
            if not connection.ended:
                log.debug("%s: client closed the connection", connection.peer)
            self.end_transmission(connection)
        connection.gone = True
        self.live.discard(connection)
        lost = connection.lost
        if lost is not None and not lost.done():
            if finishing is not None:  # gone once that loop has ended it
                finishing.add_done_callback(functools.partial(_settle, lost))
            else:
                lost.set_result(None)
        if connection.has_slot:
            connection.has_slot = False
            self.active -= 1
            self.admit_waiting()
        elif connection in self.waiting:
            self.waiting.remove(connection)
        if not self.live:
            self.on_idle()

    def may_begin(self) -> bool:
        """Whether one more client may start its handshake now (the connection limit,
        and the bound on handshakes at once)."""
        return not (self.max_connections and self.active >= self.max_connections) and \
            self.census.handshaking < self.max_handshakes

    def admit_waiting(self) -> None:
        """A slot or a handshake ended: greet waiting clients while they may begin."""
        while self.waiting and not self.stopping and self.may_begin():
            waiting = self.waiting.popleft()
            if not waiting.stream.transport.is_closing():
                waiting.stream.transport.resume_reading()
                self.begin_handshake(waiting)

    # -- the handshake --------------------------------------------------------------------------

    def begin_handshake(self, connection: Connection, greeted: bool = False) -> None:
        self.active += 1
        connection.has_slot = True
        negotiator = OptionNegotiator(self.catalog, shutting_down=self.is_stopping,
                                      tls_mode=self.tls.mode)
        self.census.handshaking += 1
        # (Not with TLS: what a client may do depends on its certificate and on TLS
        # being active, which a replay would have to know.)
        transcripts = self.transcripts if self.tls.mode == "off" else None
        connection.handshake = Handshake(
            connection.stream, negotiator, connection.peer,
            functools.partial(self.handshake_done, connection), self.tls, self.ssl_context,
            transcripts)
        loop = connection.stream.loop
        connection.deadline = loop.time() + self.handshake_timeout
        if self.sweep is None:
            self.sweep = loop.call_later(self.sweep_interval(), self.sweep_handshakes)
        connection.handshake.start(greeted)

    def sweep_interval(self) -> float:
        """How often handshake deadlines are checked: a client is cut off between
        handshake_timeout and a quarter more (at most a second more) after it began."""
        return min(1.0, self.handshake_timeout / 4)

    def sweep_handshakes(self) -> None:
        """Cut off the handshakes past their deadline; check again while any run."""
        self.sweep = None
        now = asyncio.get_running_loop().time()
        running = False
        for connection in list(self.live):
            if connection.handshake is None or connection.deadline == _EXPIRED:
                continue
            if now >= connection.deadline:
                self.handshake_expired(connection)
            else:
                running = True
        if running:
            self.sweep = asyncio.get_running_loop().call_later(self.sweep_interval(),
                                                               self.sweep_handshakes)

    def handshake_expired(self, connection: Connection) -> None:
        log.warning("%s: handshake not finished in %g s; disconnecting", connection.peer,
                    self.handshake_timeout)
        HANDSHAKE_FAILURES.count("timeout")
        connection.deadline = _EXPIRED  # (closing takes a turn of the loop)
        if connection.handshake is not None:
            connection.handshake.finished = True  # counted here, not again as closed
        connection.stream.close()

    def handshake_done(self, connection: Connection, session: Session | None) -> None:
        connection.handshake = None
        self.census.handshaking -= 1
        self.admit_waiting()
        if session is None:
            connection.stream.close()
            return
        self.enter_transmission(connection, session)

    # -- transmission ----------------------------------------------------------------------------

    def enter_transmission(self, connection: Connection, session: Session) -> None:
        """The handshake agreed on a session: account for the connection, then wait
        for its first request (first_request)."""
        export = session.export
        features = ["tls"] if session.tls else []
        if session.extended_headers:
            features.append("extended-headers")
        elif session.structured_replies:
            features.append("structured-replies")
        features += list(session.meta_contexts.values())
        connection.session = session
        connection.features = features
        connection.logged = CONNECTION_LINES.admit()
        if connection.logged:
            log.info("%s: connected to export %r (flags 0x%04x%s)", connection.peer,
                     export.name, session.transmission_flags,
                     "; " + ", ".join(features) if features else "")
        export.connections += 1
        self.census.transmitting += 1
        self.on_change()
        connection.held = export.hold(session.meta_contexts.values())
        stream = connection.stream
        stream.on_data = functools.partial(self.first_request, connection)
        if stream.available():  # it came with the GO
            self.first_request(connection)

    def first_request(self, connection: Connection) -> None:
        """Bytes arrived on a connection in transmission that has served nothing yet.
        What serves requests (a Transmission: the request rules, the reply writer, the
        large receive buffer, busy-polling) is built now, unless the request is DISC:
        then the client only wanted the handshake's answers (nbdinfo --size, a health
        probe), and it is hung up on at once: an eighth of such a connection's cost
        (docs/performance.md)."""
        stream = connection.stream
        disc = first_is_disc(stream, connection.session.extended_headers)
        if disc is None:
            return  # the header is on its way
        stream.on_data = None
        if disc:
            log.debug("%s: client disconnected (DISC)", connection.peer)
            self.end_transmission(connection)  # (connection_lost finds it ended)
            stream.close()
            return
        self.serve(connection)

    def serve(self, connection: Connection) -> None:
        """Serve a connection's requests, from the stream's callbacks: a task for its
        request loop starts only when a request needs one (start_loop), so a client
        that asks a few things and sends DISC (nbdinfo --map) never costs one."""
        sock = connection.sock
        session = connection.session
        if self.census.poll_max_ns and sock is not None:
            connection.poller = Poller(sock.fileno(), self.census)
        transmission = Transmission(connection.stream, session, self.executor,
                                    connection.peer, stopping=self.stopping, sock=sock,
                                    unix=connection.unix, poller=connection.poller)
        connection.transmission = transmission
        transmission.serve_from_callbacks(functools.partial(self.start_loop, connection))

    def start_loop(self, connection: Connection) -> None:
        """A request needs the request loop (Transmission.run): start its task, which
        serves the connection from now on and ends it."""
        if connection.task is None:
            connection.task = connection.stream.loop.create_task(
                self.serve_transmission(connection))

    async def serve_transmission(self, connection: Connection) -> None:
        stream = connection.stream
        transmission = connection.transmission
        try:
            await transmission.run()
            transport = transmission.transport
            # (asyncio's TLS transport cannot say its buffer size once it is closed)
            if not transport.is_closing() and transport.get_write_buffer_size():
                with contextlib.suppress(ConnectionError):
                    await stream.drain()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: connection failed", connection.peer)
        finally:
            self.end_transmission(connection)
            stream.close()
            stream.release_buffers()
            with contextlib.suppress(Exception):
                await stream.wait_closed()

    def end_transmission(self, connection: Connection) -> None:
        """The transmission phase is over: undo what enter_transmission counted."""
        if connection.ended:
            return
        connection.ended = True
        # Let go of what refers back to the connection and its stream, so both go
        # when it does (not whenever the cycle collector next runs: issue 12).
        connection.stream.on_arrival = connection.stream.on_data = None
        transmission = connection.transmission
        if transmission is not None:
            transmission.start_loop = _nothing
        export = connection.session.export
        export.release(connection.held)
        export.connections -= 1
        if not export.connections:
            self.on_unused(export)
        self.census.transmitting -= 1
        self.on_change()
        if connection.logged:
            log.info("%s: disconnected from export %r after %d requests", connection.peer,
                     export.name, transmission.requests if transmission is not None else 0)
