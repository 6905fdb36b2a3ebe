"""The whole service from a ServeConfig: open exports, bind or inherit listeners, run
the server, and reload the configuration on SIGHUP."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable

from nbdserve import systemd as systemd_glue
from nbdserve.bitmaps.store import BitmapStore, default_qdb_path
from nbdserve.config import ConfigError, ExportConfig, ServeConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import ImageError, RawImage, create_sparse
from nbdserve.server import listener
from nbdserve.server.lifecycle import Server

log = logging.getLogger("nbdserve.service")


class ServiceError(Exception):
    """The service cannot start; the message is for the operator."""


def open_export(settings: ExportConfig, *, with_control: bool) -> Export:
    """Open one export's image and, where wanted, its bitmaps."""
    if settings.create is not None and not os.path.exists(settings.image):
        try:
            create_sparse(settings.image, settings.create)
        except (ImageError, OSError) as exc:
            raise ServiceError(f"cannot create {settings.image}: {exc}") from None
        log.info("created sparse image %s of %d bytes", settings.image, settings.create)
    try:
        image = RawImage(settings.image, read_only=settings.read_only)
    except ImageError as exc:
        raise ServiceError(str(exc)) from None
    qdb = settings.qdb or default_qdb_path(settings.image)
    store = None
    if settings.bitmaps or with_control and not settings.read_only or os.path.exists(qdb):
        try:
            store = BitmapStore.open(qdb, image.size, image.identity,
                                     read_only=settings.read_only, requests=settings.bitmaps)
        except Exception as exc:
            image.close()
            raise ServiceError(f"export {settings.name!r}: bitmaps: {exc}") from None
    return Export(settings, image, tracker=store)


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

    def open(self) -> Server:
        # Listeners first: a port in use must fail before any image or QDB file is
        # touched (nothing to undo, no bitmaps marked in use and saved again).
        sockets, self.socket_paths = listening_sockets(self.config)
        exports = []
        try:
            for settings in self.config.exports:
                exports.append(open_export(settings, with_control=bool(self.config.control)))
                self.settings[settings.name] = settings
        except ServiceError:
            for export in exports:
                export.close()
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
                             on_reload=self.reload if self.reload_config else None)
        return self.server

    def cleanup(self) -> None:
        for path in self.socket_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def reload(self) -> None:
        """SIGHUP: read the configuration again. Exports whose settings did not change
        keep their clients; changed and removed ones are closed; new ones are opened."""
        server = self.server
        try:
            new = self.reload_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        wanted = {s.name: s for s in new.exports}
        for name, settings in list(self.settings.items()):
            if wanted.get(name) != settings:
                await server.remove_export(name)
                del self.settings[name]
        for name, settings in wanted.items():
            if name in self.settings:
                continue
            try:
                export = open_export(settings, with_control=bool(new.control))
            except ServiceError as exc:
                log.error("reload: export %r not added: %s", name, exc)
                continue
            server.catalog.add(export)
            self.settings[name] = settings
            log.info("reload: export %r added (%s)", name, settings.image)
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
