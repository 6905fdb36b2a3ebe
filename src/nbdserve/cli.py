"""Command line: `nbdserve serve IMAGE` and friends.

Options follow qemu-nbd's where the meaning is the same. Every value is checked here,
at the edge; the server receives valid configuration only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

import click

from nbdserve import __version__
from nbdserve.export import Export, ExportCatalog, ExportConfig
from nbdserve.image import ImageError, RawImage, create_sparse, parse_size
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import ListenAddress, ListenError, bind

log = logging.getLogger("nbdserve")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="nbdserve[%(process)d]: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def install_event_loop() -> None:
    """uvloop measured fastest (see docs/performance.md); asyncio's loop is the fallback."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class SizeParam(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nbdserve")
def main() -> None:
    """nbdserve: an NBD server for raw images with persistent dirty bitmaps.

    Run `nbdserve COMMAND --help` for the options of each command.
    """


@main.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-x", "--export-name", default="", show_default=True,
              help="Name of the export (clients that name no export get \"\").")
@click.option("-b", "--bind", "bind_address", default="127.0.0.1", show_default=True,
              help="Address to listen on (IPv4 or IPv6, e.g. ::1 or 0.0.0.0).")
@click.option("-p", "--port", default=10809, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0 picks a free one; the log says which).")
@click.option("-k", "--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this Unix socket instead of TCP.")
@click.option("-r", "--read-only", is_flag=True, help="Refuse writes (EPERM).")
@click.option("-D", "--description", default="", help="Description shown to clients.")
@click.option("-e", "--shared", default=0, show_default=True, type=click.IntRange(0),
              help="Concurrent connection limit (0 = unlimited). Extra clients wait. "
                   "Multi-conn is advertised unless the limit is 1.")
@click.option("--create", "create_size", type=SizeParam(),
              help="Create a sparse image of this size (e.g. 10G) if IMAGE does not exist.")
@click.option("--handshake-timeout", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds a client may take to negotiate.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(image, export_name, bind_address, port, socket_path, read_only, description,
          shared, create_size, handshake_timeout, log_level) -> None:
    """Serve the raw image IMAGE over NBD until stopped (SIGTERM or SIGINT).

    The server keeps running after clients disconnect. Connections share one view of
    the image, so FLUSH on one connection covers writes acknowledged on all.
    """
    setup_logging(log_level)
    if len(export_name.encode()) > 4096 or "\0" in export_name:
        raise click.BadParameter("at most 4096 bytes, no NUL", param_hint="--export-name")
    if len(description.encode()) > 4096:
        raise click.BadParameter("at most 4096 bytes", param_hint="--description")
    if create_size is not None and not os.path.exists(image):
        try:
            create_sparse(image, create_size)
        except (ImageError, OSError) as exc:
            raise click.ClickException(f"cannot create {image}: {exc}") from None
        log.info("created sparse image %s of %d bytes", image, create_size)
    try:
        raw = RawImage(image, read_only=read_only)
    except ImageError as exc:
        raise click.ClickException(str(exc)) from None
    config = ExportConfig(name=export_name, image_path=image, description=description,
                          read_only=read_only, max_connections=shared)
    catalog = ExportCatalog([Export(config, raw)])
    address = (ListenAddress(path=socket_path) if socket_path
               else ListenAddress(host=bind_address, port=port))
    try:
        sock = bind(address)
    except ListenError as exc:
        raw.close()
        raise click.ClickException(str(exc)) from None
    install_event_loop()
    server = Server(catalog, [sock], max_connections=shared,
                    handshake_timeout=handshake_timeout)
    try:
        asyncio.run(server.run())
    finally:
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)
