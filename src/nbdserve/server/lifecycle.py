"""The server's life: accept connections, run each through handshake and
transmission, and stop gracefully on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from nbdserve import systemd
from nbdserve.control.server import ControlServer
from nbdserve.export import ExportCatalog
from nbdserve.metrics import start_metrics_server
from nbdserve.protocol.options import GREETING, OptionNegotiator, Session
from nbdserve.server.handshake import Handshake
from nbdserve.server.listener import describe
from nbdserve.server.polling import Census, Poller
from nbdserve.server.stream import NbdStream
from nbdserve.server.transmission import Transmission
from nbdserve.tls import TLS_OFF, TlsConfig

log = logging.getLogger("nbdserve.server")

POLL_MAX_US = 50  # longest busy-polling window (see server/polling.py); 0: never
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may spend haggling before GO
SHUTDOWN_GRACE = 30.0  # seconds in-flight requests get to finish on SIGTERM
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates to systemd
SHUTDOWN_LINGER = 2.0  # seconds clients get to read ESHUTDOWN and disconnect themselves


class Connection:
    """Book-keeping for one client, so shutdown can find it."""

    def __init__(self, writer: NbdStream, peer: str) -> None:
        self.writer = writer
        self.peer = peer
        self.session = None
        self.features: list[str] = []
        self.sock: socket.socket | None = None
        self.transmission: Transmission | None = None
        self.task: asyncio.Task | None = None  # the transmission phase, once it starts
        self.handshake: Handshake | None = None
        self.timer: asyncio.TimerHandle | None = None  # the handshake's deadline
        self.has_slot = False  # counted against max_connections
        self.lost: asyncio.Future | None = None  # set when the client is gone
        self.poller: Poller | None = None  # busy-polling its socket (polling.py)

    def wait_lost(self) -> asyncio.Future:
        if self.lost is None:
            self.lost = asyncio.get_running_loop().create_future()
        return self.lost


class Server:
    def __init__(self, catalog: ExportCatalog, sockets: Sequence[socket.socket], *,
                 max_connections: int = 0, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 workers: int = 8, poll_max_us: int = POLL_MAX_US,
                 control_path: str | None = None,
                 tls: TlsConfig | None = None, metrics: tuple[str, int] | None = None,
                 on_reload: Callable[[], Awaitable[None]] | None = None) -> None:
        self.catalog = catalog
        self.sockets = list(sockets)
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="nbdserve-io")
        self.connections: set[Connection] = set()
        self.census = Census(poll_max_us * 1000)
        self.active = 0  # connections holding a slot (handshake or transmission)
        self.waiting: collections.deque[Connection] = collections.deque()
        self.stopping = False
        self.accepted = 0
        self.tls = tls or TlsConfig()
        self.ssl_context = self.tls.server_context() if self.tls.mode != TLS_OFF else None
        self.stop_requested = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self.control = ControlServer(catalog, control_path, self.executor,
                                     status=self.status) if control_path else None
        self.metrics = metrics
        self.metrics_server = None
        self.on_reload = on_reload
        self.notify_enabled = systemd.enabled()
        self.status_pending = False

    def is_shutting_down(self) -> bool:
        return self.stopping

    # -- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.control is not None:
            await self.control.start()
        if self.metrics is not None:
            for export in self.catalog:
                export.stats.timing = True
            self.metrics_server = start_metrics_server(
                *self.metrics, exports=lambda: list(self.catalog),
                accepted=lambda: self.accepted)
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            def factory() -> NbdStream:
                return NbdStream(self.connection_made, loop)
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock)
            else:
                server = await loop.create_server(factory, sock=sock)
            self._servers.append(server)
            for export in self.catalog:
                log.info("serving export %r (%s, %d bytes%s) on %s", export.name,
                         export.image.path, export.size,
                         ", read-only" if export.read_only else "", describe(sock))

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        if self.on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        await self.start()
        log.info("ready (pid %d)", os.getpid())
        systemd.notify("READY=1", self.status_line())
        await self.stop_requested.wait()
        systemd.notify("STOPPING=1")
        await self.shutdown()

    def request_reload(self) -> None:
        log.info("received SIGHUP, reloading the configuration")

        async def reload() -> None:
            systemd.notify("RELOADING=1")
            try:
                await self.on_reload()
            except Exception:
                log.exception("reload failed")
            systemd.notify("READY=1", self.status_line())
        asyncio.get_running_loop().create_task(reload())

    def set_tls(self, tls: TlsConfig) -> None:
        """New TLS settings, for connections from now on."""
        try:
            context = tls.server_context() if tls.mode != TLS_OFF else None
        except Exception as exc:
            log.error("reload: TLS settings refused: %s", exc)
            return
        self.tls, self.ssl_context = tls, context
        log.info("reload: TLS mode is now %s", tls.mode)

    async def remove_export(self, name: str) -> None:
        """Take an export away: new clients no longer find it, its connections are
        closed after their in-flight requests, and it is flushed and closed."""
        export = self.catalog.remove(name)
        if export is None:
            return
        users = [conn for conn in self.connections
                 if conn.transmission is not None and conn.transmission.export is export]
        for conn in users:
            await conn.transmission.finish_inflight()
            if conn.task is not None:
                conn.task.cancel()
        if users:
            await asyncio.wait([c.task for c in users if c.task is not None], timeout=5)
        loop = asyncio.get_running_loop()
        try:
            if not export.read_only:
                await loop.run_in_executor(self.executor, export.flush)
        finally:
            await loop.run_in_executor(self.executor, export.close)
        log.info("export %r removed (%d clients disconnected)", name, len(users))

    def status_changed(self) -> None:
        """Tell the service manager the new connection count, at most once per
        STATUS_INTERVAL: a datagram per connect and disconnect would cost every
        handshake."""
        if self.status_pending or not self.notify_enabled:
            return
        self.status_pending = True

        def send() -> None:
            self.status_pending = False
            systemd.notify(self.status_line())
        asyncio.get_running_loop().call_later(STATUS_INTERVAL, send)

    def status_line(self) -> str:
        exports = list(self.catalog)
        connections = sum(e.connections for e in exports)
        return f"STATUS=serving {len(exports)} exports, {connections} connections"

    def status(self) -> dict:
        """What `nbdserve status` shows."""
        connections = []
        for conn in self.connections:
            session = conn.session
            entry = {"peer": conn.peer, "export": None, "state": "handshake"}
            if session is not None and conn.transmission is not None:
                entry.update({
                    "export": session.export.name, "state": "transmission",
                    "features": conn.features,
                    "in_flight": len(conn.transmission.tasks),
                    "requests": conn.transmission.requests,
                })
            connections.append(entry)
        return {
            "exports": [{"name": e.name, "image": e.image.path, "size": e.size,
                         "read-only": e.read_only, "connections": e.connections,
                         "bitmaps": e.tracker.query() if e.tracker is not None else []}
                        for e in self.catalog],
            "connections": connections,
            "accepted": self.accepted,
            "tls": self.tls.mode,
        }

    def request_stop(self, signum: int | None = None) -> None:
        if signum is not None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop_requested.set()

    # -- one connection ---------------------------------------------------------------------

    def connection_made(self, stream: NbdStream) -> None:
        """A client connected: greet it (or queue it for a slot), then register it."""
        greeted = not self.stopping and not (self.max_connections
                                             and self.active >= self.max_connections)
        if greeted:
            stream.write(GREETING)  # first: the client waits for nothing else
        sock = stream.get_extra_info("socket")
        self.accepted += 1
        family = sock.family if sock is not None else socket.AF_UNIX
        if family in (socket.AF_INET, socket.AF_INET6):
            host, port = stream.get_extra_info("peername")[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            peer = f"unix#{self.accepted}"
        connection = Connection(stream, peer)
        connection.sock = sock  # uvloop builds a new socket object per lookup: keep it
        self.connections.add(connection)
        stream.on_lost = functools.partial(self.connection_lost, connection)
        if greeted:
            self.begin_handshake(connection, greeted=True)
        elif self.stopping:
            stream.close()
        else:
            # Like qemu-nbd -e: a client over the limit waits, as if in the backlog.
            stream.transport.pause_reading()
            self.waiting.append(connection)

    def begin_handshake(self, connection: Connection, greeted: bool = False) -> None:
        self.active += 1
        connection.has_slot = True
        stream = connection.writer
        negotiator = OptionNegotiator(self.catalog, shutting_down=self.is_shutting_down,
                                      tls_mode=self.tls.mode)
        sock = connection.sock
        if self.census.poll_max_ns and sock is not None:
            connection.poller = Poller(sock.fileno(), self.census)
        self.census.handshaking += 1
        connection.handshake = Handshake(
            stream, negotiator, connection.peer,
            functools.partial(self.handshake_done, connection), self.tls, self.ssl_context,
            connection.poller)
        connection.timer = connection.writer.loop.call_later(
            self.handshake_timeout, self.handshake_expired, connection)
        connection.handshake.start(greeted)

    def handshake_expired(self, connection: Connection) -> None:
        log.warning("%s: handshake not finished in %.0f s; disconnecting", connection.peer,
                    self.handshake_timeout)
        connection.writer.close()

    def handshake_done(self, connection: Connection, session: Session | None) -> None:
        connection.timer.cancel()
        connection.handshake = None
        self.census.handshaking -= 1
        if session is None:
            connection.writer.close()
            return
        connection.task = connection.writer.loop.create_task(
            self.serve_transmission(connection, session))

    def connection_lost(self, connection: Connection) -> None:
        if connection.timer is not None:
            connection.timer.cancel()
        if connection.handshake is not None:
            log.debug("%s: client left during the handshake", connection.peer)
            connection.handshake.abandon()
            connection.handshake = None
            self.census.handshaking -= 1
        self.connections.discard(connection)
        if connection.lost is not None and not connection.lost.done():
            connection.lost.set_result(None)
        if connection.has_slot:
            connection.has_slot = False
            self.active -= 1
            while self.waiting and not self.stopping:
                waiting = self.waiting.popleft()
                if not waiting.writer.transport.is_closing():
                    waiting.writer.transport.resume_reading()
                    self.begin_handshake(waiting)
                    break
        elif connection in self.waiting:
            self.waiting.remove(connection)

    async def serve_transmission(self, connection: Connection, session: Session) -> None:
        peer = connection.peer
        stream = connection.writer
        try:
            await self.transmission_phase(connection, session)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("%s: connection failed", peer)
        finally:
            stream.close()
            stream.release_buffers()
            with contextlib.suppress(Exception):
                await stream.wait_closed()

    async def transmission_phase(self, connection: Connection, session: Session) -> None:
        peer = connection.peer
        stream = connection.writer
        export = session.export
        features = ["tls"] if session.tls else []
        features += ["structured-replies"] if session.structured_replies else []
        features += list(session.meta_contexts.values())
        connection.session = session
        connection.features = features
        log.info("%s: connected to export %r (flags 0x%04x%s)", peer, export.name,
                 session.transmission_flags,
                 "; " + ", ".join(features) if features else "")
        transmission = Transmission(stream, session, self.executor, peer,
                                    stopping=self.stopping, sock=connection.sock,
                                    poller=connection.poller)
        connection.transmission = transmission
        export.connections += 1
        self.census.transmitting += 1
        self.status_changed()
        held = export.hold(session.meta_contexts.values())
        try:
            await transmission.run()
            if transmission.transport.get_write_buffer_size():
                with contextlib.suppress(ConnectionError):
                    await stream.drain()
        finally:
            export.release(held)
            export.connections -= 1
            self.census.transmitting -= 1
            self.status_changed()
            log.info("%s: disconnected from export %r after %d requests", peer, export.name,
                     transmission.requests)

    # -- stopping ---------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, flush, close everything."""
        self.stopping = True
        for conn in self.connections:
            if conn.transmission is not None:
                conn.transmission.stop()
        for server in self._servers:
            server.close()
        if self.control is not None:
            await self.control.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        inflight = [task for conn in self.connections if conn.transmission
                    for task in conn.transmission.tasks]
        if inflight:
            log.info("waiting for %d in-flight requests", len(inflight))
            await asyncio.wait(inflight, timeout=SHUTDOWN_GRACE)
        # Requests arriving now get ESHUTDOWN, after which a client MUST disconnect
        # (spec); give them a moment to do so before hanging up on them.
        # Clients in the handshake get ERR_SHUTDOWN for their next option; clients
        # still waiting for a slot are never greeted.
        for conn in list(self.waiting):
            conn.writer.close()
        lingering = [conn.task if conn.task is not None else conn.wait_lost()
                     for conn in self.connections]
        if lingering:
            await asyncio.wait(lingering, timeout=SHUTDOWN_LINGER)
        loop = asyncio.get_running_loop()
        for conn in list(self.connections):
            # Flush queued replies, then hang up.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.writer.drain()
            if conn.task is not None:
                conn.task.cancel()
            else:
                conn.writer.close()
        remaining = [conn.task for conn in self.connections if conn.task is not None]
        if remaining:
            await asyncio.wait(remaining, timeout=5)
        for export in self.catalog:
            try:
                if not export.read_only:
                    await loop.run_in_executor(self.executor, export.flush)
            except OSError as exc:
                log.error("flushing export %r failed: %s", export.name, exc)
            try:
                await loop.run_in_executor(self.executor, export.close)
            except Exception:
                log.exception("closing export %r failed", export.name)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.executor.shutdown(wait=True)
        log.info("stopped")
