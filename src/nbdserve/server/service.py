"""The whole service from a ServeConfig: open exports, bind or inherit listeners, run
the server, and reload the configuration on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from nbdserve import systemd as systemd_glue
from nbdserve.bitmaps.qdb import migration_state
from nbdserve.bitmaps.store import BitmapStore, default_qdb_path
from nbdserve.config import ConfigError, ExportConfig, ServeConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import ImageError, create_sparse, open_image
from nbdserve.migration.target import IncomingMigration
from nbdserve.server import listener
from nbdserve.server.lifecycle import Server
from nbdserve.snapshots.manager import remove_stale_scratch
from nbdserve.tls import TLS_OFF, TlsConfig

log = logging.getLogger("nbdserve.service")


class ServiceError(Exception):
    """The service cannot start; the message is for the operator."""


def open_export(settings: ExportConfig, *, with_control: bool) -> Export:
    """Open one export's image and, where wanted, its bitmaps."""
    qdb = settings.qdb or default_qdb_path(settings.image)
    state = migration_state(qdb)
    if state and not settings.force:
        raise ServiceError(MIGRATION_REFUSALS[state].format(image=settings.image, qdb=qdb))
    if settings.create is not None and not os.path.exists(settings.image):
        try:
            create_sparse(settings.image, settings.create)
        except (ImageError, OSError) as exc:
            raise ServiceError(f"cannot create {settings.image}: {exc}") from None
        log.info("created sparse image %s of %d bytes", settings.image, settings.create)
    try:
        image = open_image(settings.image, read_only=settings.read_only,
                           offset=settings.offset, cache=settings.cache)
    except ImageError as exc:
        raise ServiceError(str(exc)) from None
    store = None
    if settings.bitmaps or with_control and not settings.read_only or os.path.exists(qdb):
        announce_bitmap_work(f"loading the bitmaps of export {settings.name!r}",
                             qdb_bytes(qdb))
        started = time.monotonic()
        try:
            store = BitmapStore.open(qdb, image.size, image.identity,
                                     read_only=settings.read_only, requests=settings.bitmaps)
        except Exception as exc:
            image.close()
            raise ServiceError(f"export {settings.name!r}: bitmaps: {exc}") from None
        log.info("loaded %d bitmaps of export %r in %.2f s", len(store.query()),
                 settings.name, time.monotonic() - started)
    export = Export(settings, image, tracker=store)
    # Snapshots' scratch files: beside the QDB file unless configured. Whatever a
    # crash left there is deleted now: snapshots do not outlive the process.
    export.scratch_dir = settings.scratch_dir or os.path.dirname(os.path.abspath(qdb))
    remove_stale_scratch(export.scratch_dir, settings.image)
    return export


MIGRATION_REFUSALS = {
    "moved": "{image} was migrated to another server ({qdb} says so): this copy is stale; "
             "serve it anyway with --force",
    "incoming": "{image} is the target of a migration that did not complete ({qdb} says "
                "so): receive it again with --incoming ADDRESS, or serve the partial "
                "image with --force",
}


def open_incoming(settings: ExportConfig, tls: TlsConfig,
                  arrived: Callable[[Export], None],
                  listeners: Callable[[], list[str]]) -> IncomingMigration:
    """An export that waits for a migration (--incoming): its channel's listener is
    bound now, so a port in use fails the start."""
    try:
        sock = listener.bind(settings.incoming)
    except listener.ListenError as exc:
        raise ServiceError(f"export {settings.name!r}: --incoming: {exc}") from None
    context = tls.server_context() if tls.mode != TLS_OFF else None
    incoming = IncomingMigration(settings, sock, context,
                                 lambda ready: open_export(ready, with_control=True),
                                 arrived, listeners, allow_subjects=tls.allow_subjects)
    try:
        incoming.lock()
    except Exception as exc:
        sock.close()
        raise ServiceError(f"export {settings.name!r}: {exc}") from None
    return incoming


def qdb_bytes(path: str) -> int:
    try:
        return os.path.getsize(path) + os.path.getsize(path + ".journal")
    except OSError:
        return 0


def announce_bitmap_work(what: str, size: int) -> None:
    """Before loading or saving bitmaps: say so in the log and to systemd, and ask it
    for time (EXTEND_TIMEOUT_USEC), so a slow start or stop is not killed midway."""
    if size >= 16 << 20:
        log.info("%s (%d MiB)", what, size >> 20)
    systemd_glue.ask_for_time(what, size)


def check_image(settings: ExportConfig) -> None:
    """Would this export's image open? (Exists, or can be created; a file or block
    device; a size that is a multiple of 512.) Raises ServiceError."""
    if settings.create is not None and not os.path.exists(settings.image):
        if not os.access(os.path.dirname(os.path.abspath(settings.image)), os.W_OK):
            raise ServiceError(f"cannot create {settings.image}: directory not writable")
        return
    try:
        open_image(settings.image, read_only=True, offset=settings.offset,
                   cache=settings.cache).close()
    except ImageError as exc:
        raise ServiceError(str(exc)) from None


def listening_sockets(config: ServeConfig) -> tuple[list[socket.socket], list[str]]:
    """Sockets inherited from systemd when there are any, else the configured ones.
    Returns the sockets and the Unix socket paths we created (removed at exit)."""
    inherited = systemd_glue.listen_fds()
    if inherited:
        log.info("using %d listening sockets from the service manager", len(inherited))
        return inherited, []
    sockets, paths = [], []
    try:
        for address in config.listen:
            sockets.append(listener.bind(address))
            if address.path is not None:
                paths.append(address.path)
    except listener.ListenError as exc:
        for sock in sockets:
            sock.close()
        raise ServiceError(str(exc)) from None
    return sockets, paths


class Service:
    def __init__(self, config: ServeConfig, reload_config: Callable[[], ServeConfig] | None):
        self.config = config
        self.reload_config = reload_config
        self.settings: dict[str, ExportConfig] = {}
        self.server: Server | None = None
        self.socket_paths: list[str] = []
        self.reloading = asyncio.Lock()  # one reload at a time
        self._previous: dict[str, ExportConfig] = {}  # what a failed reopen puts back

    def open(self) -> Server:
        # Listeners first: a port in use must fail before any image or QDB file is
        # touched (nothing to undo, no bitmaps marked in use and saved again).
        sockets, self.socket_paths = listening_sockets(self.config)
        exports = []
        incoming: list[IncomingMigration] = []
        try:
            for settings in self.config.exports:
                if settings.incoming is not None:
                    incoming.append(open_incoming(settings, self.config.tls,
                                                  self._arrived, self._listeners))
                else:
                    exports.append(open_export(settings,
                                               with_control=bool(self.config.control)))
                self.settings[settings.name] = settings
            self._previous = dict(self.settings)
        except ServiceError:
            for export in exports:
                export.close()
            for waiting in incoming:
                waiting.sock.close()
                waiting.unlock()
            for sock in sockets:
                sock.close()
            self.cleanup()
            raise
        config = self.config
        self.server = Server(ExportCatalog(exports), sockets,
                             max_connections=config.max_connections,
                             handshake_timeout=config.handshake_timeout,
                             poll_max_us=config.poll_max_us,
                             control_path=config.control, tls=config.tls,
                             metrics=config.metrics,
                             on_reload=self.reload if self.reload_config else None,
                             incoming=incoming)
        return self.server

    def _arrived(self, export: Export) -> None:
        """A migration into this server completed (from the incoming thread)."""
        self.server.export_arrived(export)

    def _listeners(self) -> list[str]:
        return [listener.describe(sock) for sock in self.server.sockets] \
            if self.server is not None else []

    def cleanup(self) -> None:
        for path in self.socket_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def reload(self) -> None:
        """SIGHUP: read the configuration again and apply all of it, or none of it.

        Reloads run one at a time (a second SIGHUP waits for the first). Every export
        to add or change is checked, its image opened, before anything changes; if one
        fails, the running configuration stays as it was. Exports whose settings did
        not change keep their clients; changed and removed ones are closed; new ones
        are opened.
        """
        async with self.reloading:
            await self._reload()

    async def _reload(self) -> None:
        server = self.server
        try:
            new = self.reload_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        wanted = {s.name: s for s in new.exports}
        changed = [name for name, settings in self.settings.items()
                   if name in wanted and wanted[name] != settings]
        removed = [name for name in self.settings if name not in wanted]
        added = [name for name in wanted if name not in self.settings]
        # Check first. A new export is opened now and kept; a changed one can only be
        # checked (its QDB file is still locked by the running export), then reopened.
        opened: dict[str, Export] = {}
        try:
            for name in added:
                opened[name] = open_export(wanted[name], with_control=bool(new.control))
            for name in changed:
                check_image(wanted[name])
        except ServiceError as exc:
            for export in opened.values():
                export.close()
            log.error("reload refused, keeping the running configuration: export %r: %s",
                      name, exc)
            return
        for name in removed + changed:
            await server.remove_export(name)
            del self.settings[name]
        for name in changed:
            try:
                opened[name] = open_export(wanted[name], with_control=bool(new.control))
            except ServiceError as exc:
                # Checked a moment ago; if it fails now, put the old export back.
                log.error("reload: export %r could not be reopened (%s); keeping its "
                          "previous settings", name, exc)
                wanted[name] = self._previous[name]
                opened[name] = open_export(wanted[name], with_control=bool(new.control))
        for name, export in opened.items():
            server.catalog.add(export)
            self.settings[name] = wanted[name]
            log.info("reload: export %r %s (%s)", name,
                     "changed" if name in changed else "added", wanted[name].image)
        self._previous = dict(self.settings)
        if new.tls != server.tls:
            server.set_tls(new.tls)
        logging.getLogger().setLevel(new.log_level.upper())
        server.connections.handshake_timeout = new.handshake_timeout
        server.census.set_poll_max(new.poll_max_us * 1000)
        for key in ("listen", "control", "metrics", "max_connections"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload: %s changed; that takes a restart",
                            key.replace("_", "-"))
        self.config = new
        log.info("configuration reloaded: %d exports", len(self.settings))
