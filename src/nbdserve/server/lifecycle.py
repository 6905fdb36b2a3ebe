"""The server's life: start the listeners, the control socket and the metrics
endpoint; react to signals (SIGTERM and SIGINT stop, SIGHUP reloads); take exports
away; and shut down gracefully. Each connection's own life is connections.py's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from nbdserve import systemd
from nbdserve.config import HANDSHAKE_TIMEOUT, POLL_MAX_US
from nbdserve.control.server import ControlServer
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import RawImage
from nbdserve.metrics import start_metrics_server
from nbdserve.migration.request import MigrationRequest
from nbdserve.migration.source import Migration, MigrationError
from nbdserve.migration.target import IncomingMigration
from nbdserve.server.connections import Connections
from nbdserve.server.listener import describe
from nbdserve.server.polling import Census
from nbdserve.server.scripting import Ready
from nbdserve.server.stream import NbdStream
from nbdserve.snapshots.manager import describe_all as describe_snapshots
from nbdserve.tls import TLS_OFF, TlsConfig

log = logging.getLogger("nbdserve.server")

HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
SHUTDOWN_GRACE = 30.0  # seconds in-flight requests get to finish on SIGTERM
STATUS_INTERVAL = 1.0  # seconds between STATUS= updates to systemd
SHUTDOWN_LINGER = 2.0  # seconds clients get to read ESHUTDOWN and disconnect themselves


class Server:
    def __init__(self, catalog: ExportCatalog, sockets: Sequence[socket.socket], *,
                 max_connections: int = 0, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 workers: int = 8, poll_max_us: int = POLL_MAX_US,
                 control_path: str | None = None,
                 tls: TlsConfig | None = None, metrics: tuple[str, int] | None = None,
                 on_reload: Callable[[], Awaitable[None]] | None = None,
                 ready: Ready | None = None, oneshot: bool = False,
                 incoming: Sequence[IncomingMigration] = ()) -> None:
        self.catalog = catalog
        self.incoming = list(incoming)  # exports waiting for a migration (--incoming)
        for waiting in self.incoming:
            catalog.mark_absent(waiting.settings.name, "it waits for an incoming migration")
        self.migration: Migration | None = None  # the latest one from here
        self.moved: list[Export] = []  # migrated away: closed when their clients are
        self.ready = ready  # --pid-file, --fork, --run (server/scripting.py)
        self.oneshot = oneshot  # stop when the last client has gone
        self.exit_status = 0
        self.sockets = list(sockets)
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="nbdserve-io")
        self.census = Census(poll_max_us * 1000)
        tls = tls or TlsConfig()
        self.connections = Connections(
            catalog, self.executor, self.census, max_connections=max_connections,
            handshake_timeout=handshake_timeout, tls=tls,
            ssl_context=tls.server_context() if tls.mode != TLS_OFF else None,
            on_change=self.status_changed, on_idle=self.idle, on_unused=self.unused)
        self.stop_requested = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self.control = ControlServer(catalog, control_path, self.executor,
                                     status=self.describe,
                                     remove_export=self.remove_export,
                                     migrate=self.migrate_command) \
            if control_path else None
        self.metrics = metrics
        self.metrics_server = None
        self.on_reload = on_reload
        self.notify_enabled = systemd.enabled()
        self.status_pending = False

    @property
    def tls(self) -> TlsConfig:
        return self.connections.tls

    # -- running ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for waiting in self.incoming:
            waiting.start()
        if self.control is not None:
            await self.control.start()
        if self.metrics is not None:
            for export in self.catalog:
                export.stats.timing = True
            self.metrics_server = start_metrics_server(
                *self.metrics, exports=lambda: list(self.catalog),
                accepted=lambda: self.connections.accepted,
                replayed=lambda: self.connections.transcripts.handshakes,
                migrations=lambda: (self.migration.describe() if self.migration else None,
                                    [waiting.describe() for waiting in self.incoming]))
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            def factory(family: int = sock.family) -> NbdStream:
                stream = NbdStream(self.connections.connection_made, loop)
                stream.family = family
                return stream
            if sock.family == socket.AF_UNIX:
                server = await loop.create_unix_server(factory, sock=sock)
            else:
                server = await loop.create_server(factory, sock=sock)
            self._servers.append(server)
            for export in self.catalog:
                log.info("serving export %r (%s, %d bytes%s) on %s", export.name,
                         export.image.path, export.size,
                         ", read-only" if export.read_only else "", describe(sock))
            for waiting in self.incoming:
                log.info("serving export %r (%s, once its incoming migration completed) "
                         "on %s", waiting.settings.name, waiting.settings.image,
                         describe(sock))
        for export in self.catalog:
            image = export.image
            if type(image) is RawImage and image.cache_unknown and not image.in_memory:
                log.info("%s: its file system (%s) cannot tell whether data is in the "
                         "page cache (RWF_NOWAIT), so every READ of export %r goes to a "
                         "worker thread", image.path, image.filesystem or "unknown",
                         export.name)

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then shut down gracefully. Returns the exit
        status: 0, or 1 when the server could not start (exports closed cleanly)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        if self.on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        # Signals that arrived while the service was being opened (blocked until now,
        # see cli.serve) are delivered here, to the handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        try:
            await self.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            await self.shutdown()
            return 1
        log.info("ready (pid %d)", os.getpid())
        systemd.notify("READY=1", self.status_line())
        try:
            if self.ready is not None:
                await self.ready.arrived([describe(sock) for sock in self.sockets],
                                         self.stop_with)
            await self.stop_requested.wait()
            systemd.notify("STOPPING=1")
            await self.shutdown()
        finally:
            if self.ready is not None:
                self.ready.finish()
        return self.exit_status

    def stop_with(self, status: int) -> None:
        """Stop, and exit with this status (a --run command's)."""
        self.exit_status = status
        self.request_stop()

    def idle(self) -> None:
        """The last client has gone: a one-shot server stops."""
        if self.oneshot and not self.stop_requested.is_set():
            log.info("the last client disconnected; stopping (one-shot)")
            self.request_stop()

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
        self.connections.tls, self.connections.ssl_context = tls, context
        log.info("reload: TLS mode is now %s", tls.mode)

    async def remove_export(self, name: str) -> None:
        """Take an export away: new clients no longer find it, its connections are
        closed after their in-flight requests, and it is flushed and closed. Its
        snapshots go first."""
        export = self.catalog.find(name)
        if export is None:
            return
        for dependent in [e for e in self.catalog if e.parent is export]:
            await self.remove_export(dependent.name)
        self.catalog.remove(name)
        users = self.connections.using(export)
        for conn in users:
            if conn.transmission is not None:
                await conn.transmission.finish_inflight()
            conn.hang_up()
        if users:
            await asyncio.wait([c.finished() for c in users], timeout=5)
        loop = asyncio.get_running_loop()
        try:
            if not export.read_only:
                await loop.run_in_executor(self.executor, export.flush)
        finally:
            await loop.run_in_executor(self.executor, export.close)
        log.info("export %r removed (%d clients disconnected)", name, len(users))

    # -- migrations (nbdserve.migration) ---------------------------------------------------

    def export_arrived(self, export: Export) -> None:
        """An incoming migration completed (called from its thread): serve it."""
        done = threading.Event()

        def add() -> None:
            if self.metrics is not None:
                export.stats.timing = True
            self.catalog.add(export)
            done.set()
        self.loop.call_soon_threadsafe(add)
        done.wait(10)  # DONE goes to the source once clients can connect here

    def export_moved(self, export: Export, where: str) -> None:
        """A migration from here completed (called from its thread): new clients are
        told where the export went; open connections are forwarded until they
        close, and then the export is closed."""
        def remove() -> None:
            if self.catalog.find(export.name) is export:
                self.catalog.remove(export.name)
            self.catalog.mark_absent(export.name, f"it was migrated to {where}")
            self.moved.append(export)
            self.unused(export)
        self.loop.call_soon_threadsafe(remove)

    def unused(self, export: Export) -> None:
        """An export's last connection closed: a migrated one has no more use (its
        forwarding connection to the target goes, and with it what it holds there)."""
        if export.connections or export not in self.moved:
            return
        self.moved.remove(export)
        self.loop.run_in_executor(self.executor, export.close)
        log.info("export %r: the last connection forwarded to its new server closed",
                 export.name)

    async def migrate_command(self, command: str, arguments: dict):
        """migrate-start, query-migrate and migrate-cancel (docs/control.md)."""
        if command == "query-migrate":
            return {"outgoing": self.migration.describe() if self.migration else None,
                    "incoming": [waiting.describe() for waiting in self.incoming]}
        if command == "migrate-cancel":
            if self.migration is None or not self.migration.cancel():
                raise MigrationError("no migration that can still be cancelled")
            return {}
        if self.migration is not None and not self.migration.done.is_set():
            raise MigrationError(f"a migration of export {self.migration.export.name!r} is "
                                 "under way")
        request = MigrationRequest.from_arguments(arguments, self.tls)
        export = self.catalog.find(request.export) if request.export is not None else None
        if request.export is None:
            live = [e for e in self.catalog if e.parent is None]
            if len(live) != 1:
                raise MigrationError("several exports are served: name one with \"export\"")
            export = live[0]
        if export is None or export.parent is not None:
            raise MigrationError(f"export {request.export!r} not found")
        if any(e.parent is export for e in self.catalog):
            raise MigrationError(f"export {export.name!r} has snapshots: remove them first "
                                 "(they do not migrate)")
        migration = Migration(export, request.address, max_downtime_ms=request.max_downtime_ms,
                              bandwidth=request.bandwidth, ssl_context=request.ssl_context,
                              forward_tls=request.forward_tls,
                              server_hostname=request.tls_hostname, moved=self.export_moved)
        migration.start()
        self.migration = migration
        return {"export": export.name, "target": str(request.address)}

    def status_changed(self) -> None:
        """Tell the service manager the new connection count, at most once per
        STATUS_INTERVAL: a datagram per connect and disconnect would cost every
        handshake."""
        if self.status_pending or not self.notify_enabled:
            return
        self.status_pending = True
        # (A method, not an inner function: one would make a cell on every call, and
        # this runs twice per connection.)
        asyncio.get_running_loop().call_later(STATUS_INTERVAL, self.send_status)

    def send_status(self) -> None:
        self.status_pending = False
        systemd.notify(self.status_line())

    def status_line(self) -> str:
        exports = list(self.catalog)
        connections = sum(e.connections for e in exports)
        return f"STATUS=serving {len(exports)} exports, {connections} connections"

    def describe(self) -> dict:
        """What `nbdserve status` and the control socket's query-status show."""
        return {
            "exports": [export.describe() for export in self.catalog],
            "snapshots": describe_snapshots(self.catalog),
            "connections": [conn.describe() for conn in self.connections],
            "accepted": self.connections.accepted,
            "tls": self.tls.mode,
            "listen": [describe(sock) for sock in self.sockets],
            "migration": self.migration.describe() if self.migration else None,
            "incoming": [waiting.describe() for waiting in self.incoming],
        }

    def request_stop(self, signum: int | None = None) -> None:
        if signum is not None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop_requested.set()

    # -- stopping ---------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, flush, close everything."""
        connections = self.connections
        connections.stop()
        for waiting in self.incoming:
            await asyncio.get_running_loop().run_in_executor(self.executor, waiting.stop)
        if self.migration is not None and not self.migration.done.is_set():
            # Cancelled before the switchover; a switchover under way is let finish.
            self.migration.cancel()
            await asyncio.get_running_loop().run_in_executor(self.executor,
                                                             self.migration.done.wait, 30)
        for server in self._servers:
            server.close()
        if self.control is not None:
            await self.control.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        inflight = connections.inflight()
        if inflight:
            log.info("waiting for %d in-flight requests", len(inflight))
            await asyncio.wait(inflight, timeout=SHUTDOWN_GRACE)
        # Requests arriving now get ESHUTDOWN, after which a client MUST disconnect
        # (spec); give them a moment to do so before hanging up on them.
        # Clients in the handshake get ERR_SHUTDOWN for their next option; clients
        # still waiting for a slot are never greeted.
        for conn in list(connections.waiting):
            conn.stream.close()
        lingering = [conn.finished() for conn in connections]
        if lingering:
            await asyncio.wait(lingering, timeout=SHUTDOWN_LINGER)
        loop = asyncio.get_running_loop()
        for conn in connections:
            # Flush queued replies, then hang up.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.stream.drain()
            conn.hang_up()
        remaining = [conn.finished() for conn in connections]
        if remaining:
            await asyncio.wait(remaining, timeout=5)
        for export in list(self.catalog) + self.moved:
            try:
                if not export.read_only:
                    await loop.run_in_executor(self.executor, export.flush)
            except OSError as exc:
                log.error("flushing export %r failed: %s", export.name, exc)
            if export.tracker is not None:
                size = sum(export.size // b["granularity"] // 8
                           for b in export.tracker.query())
                if size >= 16 << 20:
                    log.info("saving the bitmaps of export %r (%d MiB)", export.name,
                             size >> 20)
                systemd.ask_for_time(f"saving the bitmaps of export {export.name!r}", size)
            try:
                await loop.run_in_executor(self.executor, export.close)
            except Exception:
                log.exception("closing export %r failed", export.name)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self.executor.shutdown(wait=True)
        log.info("stopped")
