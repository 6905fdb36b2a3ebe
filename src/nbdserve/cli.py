"""Command line: `nbdserve serve IMAGE` and friends.

Options follow qemu-nbd's where the meaning is the same. Every value is checked here,
at the edge; the server receives valid configuration only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys

import click

from nbdserve import __version__
from nbdserve.bitmaps.bitmap import BitmapError, check_name, granularity_bits
from nbdserve.bitmaps.store import BitmapRequest, BitmapStore, StoreLocked, default_qdb_path
from nbdserve.export import Export, ExportCatalog, ExportConfig
from nbdserve.image import ImageError, RawImage, create_sparse, parse_size
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import ListenAddress, ListenError, bind
from nbdserve.tls import TLS_MODES, TLS_OFF, TlsConfig, TlsConfigError

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


class BitmapParam(click.ParamType):
    """NAME[,granularity=BYTES] (the name may itself contain commas)."""

    name = "BITMAP"

    def convert(self, value, param, ctx):
        if isinstance(value, BitmapRequest):
            return value
        name, granularity = value, None
        if ",granularity=" in value:
            name, text = value.rsplit(",granularity=", 1)
            try:
                granularity = parse_size(text)
                granularity_bits(granularity)
            except (ValueError, BitmapError) as exc:
                self.fail(str(exc), param, ctx)
        try:
            check_name(name)
        except BitmapError as exc:
            self.fail(str(exc), param, ctx)
        return BitmapRequest(name, granularity)


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
@click.option("--bitmap", "bitmaps", multiple=True, type=BitmapParam(),
              metavar="NAME[,granularity=BYTES]",
              help="Record writes in this dirty bitmap: created if absent (granularity "
                   "default 64K), enabled if disabled. Repeatable.")
@click.option("--qdb", "qdb_path", type=click.Path(dir_okay=False),
              help="QDB file holding the image's bitmaps [default: IMAGE.qdb].")
@click.option("--control", "control_path", type=click.Path(dir_okay=False),
              help="Unix socket (mode 0600) for bitmap commands (see `nbdserve bitmap`).")
@click.option("--tls", "tls_mode", type=click.Choice(TLS_MODES), default=TLS_OFF,
              show_default=True,
              help="off: STARTTLS refused. optional: TLS offered, required only by exports "
                   "marked so. require: nothing but STARTTLS and ABORT before TLS.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="Server private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="CA certificate(s) that sign client certificates (PEM).")
@click.option("--tls-verify-client", is_flag=True,
              help="Require a client certificate signed by --tls-ca.")
@click.option("--tls-allow-subject", "tls_allow_subjects", multiple=True, metavar="PATTERN",
              help="Admit only client certificates whose subject (RFC 4514, e.g. "
                   "'CN=backup,O=Example') matches this glob. Repeatable; implies "
                   "--tls-verify-client.")
@click.option("--handshake-timeout", default=10.0, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds a client may take to negotiate.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def serve(image, export_name, bind_address, port, socket_path, read_only, description,
          shared, create_size, bitmaps, qdb_path, control_path, tls_mode, tls_cert, tls_key,
          tls_ca, tls_verify_client, tls_allow_subjects, handshake_timeout,
          log_level) -> None:
    """Serve the raw image IMAGE over NBD until stopped (SIGTERM or SIGINT).

    The server keeps running after clients disconnect. Connections share one view of
    the image, so FLUSH on one connection covers writes acknowledged on all.

    Dirty bitmaps live in the QDB file beside the image. They are loaded whenever that
    file exists, or --bitmap or --control is given, and are offered to clients as the
    meta contexts qemu:dirty-bitmap:NAME. A crash journal (QDB.journal) keeps them
    exact across kill -9 and power loss.
    """
    setup_logging(log_level)
    tls = TlsConfig(tls_mode, tls_cert, tls_key, tls_ca, tls_verify_client,
                    tuple(tls_allow_subjects))
    try:
        tls.validate()
        if tls.mode != TLS_OFF:
            tls.server_context()  # fail now, not at the first client
    except TlsConfigError as exc:
        raise click.UsageError(str(exc)) from None
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
    qdb_path = qdb_path or default_qdb_path(image)
    store = None
    if bitmaps or control_path or os.path.exists(qdb_path):
        if read_only and bitmaps:
            raw.close()
            raise click.UsageError("--bitmap records writes; a read-only export has none")
        try:
            store = BitmapStore.open(qdb_path, raw.size, raw.identity, read_only=read_only,
                                     requests=bitmaps)
        except (StoreLocked, BitmapError, OSError) as exc:
            raw.close()
            raise click.ClickException(f"bitmaps: {exc}") from None
    catalog = ExportCatalog([Export(config, raw, tracker=store)])
    address = (ListenAddress(path=socket_path) if socket_path
               else ListenAddress(host=bind_address, port=port))
    try:
        sock = bind(address)
    except ListenError as exc:
        if store is not None:
            store.close()
        raw.close()
        raise click.ClickException(str(exc)) from None
    install_event_loop()
    server = Server(catalog, [sock], max_connections=shared,
                    handshake_timeout=handshake_timeout, control_path=control_path, tls=tls)
    try:
        asyncio.run(server.run())
    finally:
        if socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path)


# -- nbdserve bitmap ... ----------------------------------------------------------------------

class BitmapTarget:
    """Where `nbdserve bitmap` acts: a running server, or the QDB file offline."""

    def __init__(self, control: str | None, image: str | None, qdb: str | None,
                 export: str | None) -> None:
        if bool(control) == bool(image):
            raise click.UsageError("give either --control PATH (a running server) or "
                                   "--image IMAGE (offline)")
        self.control, self.image, self.qdb, self.export = control, image, qdb, export

    def run(self, command: str, arguments: dict | None = None):
        arguments = dict(arguments or {})
        if self.control:
            from nbdserve.control.client import ControlClient, ControlError
            if self.export is not None:
                arguments["export"] = self.export
            try:
                with ControlClient(self.control) as client:
                    return client.execute(command, arguments)
            except ControlError as exc:
                raise click.ClickException(exc.desc) from None
            except OSError as exc:
                raise click.ClickException(f"cannot reach {self.control}: {exc}") from None
        try:
            image = RawImage(self.image, read_only=True)
        except ImageError as exc:
            raise click.ClickException(str(exc)) from None
        try:
            store = BitmapStore.open(self.qdb or default_qdb_path(self.image), image.size,
                                     image.identity)
        except (StoreLocked, OSError) as exc:
            image.close()
            raise click.ClickException(str(exc)) from None
        try:
            if command == "query-bitmaps":
                return store.query()
            store.execute(command, arguments)
            return {}
        except BitmapError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            store.close()
            image.close()


def bitmap_target_options(function):
    function = click.option("--export", help="Export name, when the server has several.")(
        function)
    function = click.option("--qdb", type=click.Path(dir_okay=False),
                            help="QDB file, offline [default: IMAGE.qdb].")(function)
    function = click.option("--image", type=click.Path(exists=True, dir_okay=False),
                            help="Act on IMAGE's QDB file directly (no server may hold it).")(
        function)
    function = click.option("--control", type=click.Path(),
                            help="Control socket of a running server.")(function)
    return function


@main.group()
def bitmap() -> None:
    """Manage dirty bitmaps, on a running server (--control) or offline (--image)."""


def _target(control, image, qdb, export) -> BitmapTarget:
    return BitmapTarget(control, image, qdb, export)


@bitmap.command("list")
@bitmap_target_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def bitmap_list(control, image, qdb, export, as_json) -> None:
    """List bitmaps: granularity, dirty bytes, recording, busy, inconsistent, generation."""
    bitmaps = _target(control, image, qdb, export).run("query-bitmaps")
    if as_json:
        click.echo(json.dumps(bitmaps, indent=2))
        return
    if not bitmaps:
        click.echo("no bitmaps")
        return
    rows = [("NAME", "GRANULARITY", "DIRTY", "RECORDING", "BUSY", "INCONSISTENT",
             "GENERATION")]
    for b in bitmaps:
        rows.append((b["name"], str(b["granularity"]), str(b["count"]),
                     "yes" if b["recording"] else "no", "yes" if b["busy"] else "no",
                     "yes" if b["inconsistent"] else "no", b["generation"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                      strict=True)).rstrip())


@bitmap.command("add")
@click.argument("name")
@bitmap_target_options
@click.option("--granularity", type=SizeParam(), default="64K", show_default=True,
              help="Bytes per bit: a power of two from 512 to 2G.")
@click.option("--disabled", is_flag=True, help="Create it without recording.")
def bitmap_add(name, control, image, qdb, export, granularity, disabled) -> None:
    """Add a bitmap (recording unless --disabled)."""
    _target(control, image, qdb, export).run(
        "bitmap-add", {"name": name, "granularity": granularity, "disabled": disabled})


def _simple_bitmap_command(action: str, summary: str):
    @bitmap.command(action, help=summary)
    @click.argument("name")
    @bitmap_target_options
    def command(name, control, image, qdb, export) -> None:
        _target(control, image, qdb, export).run(f"bitmap-{action}", {"name": name})
    return command


_simple_bitmap_command("remove", "Remove a bitmap (allowed when inconsistent).")
_simple_bitmap_command("enable", "Start recording writes in a bitmap.")
_simple_bitmap_command("disable", "Stop recording: the bitmap becomes a frozen record.")
_simple_bitmap_command("clear", "Reset every bit (and the generation id).")


@bitmap.command("merge")
@click.argument("target")
@click.argument("sources", nargs=-1, required=True)
@bitmap_target_options
def bitmap_merge(target, sources, control, image, qdb, export) -> None:
    """OR the SOURCES into TARGET (same granularity; TARGET unchanged on failure)."""
    _target(control, image, qdb, export).run("bitmap-merge",
                                             {"target": target, "bitmaps": list(sources)})


@bitmap.command("checkpoint")
@click.argument("old")
@click.argument("new")
@bitmap_target_options
def bitmap_checkpoint(old, new, control, image, qdb, export) -> None:
    """Disable OLD and add a recording NEW atomically: OLD then holds exactly what was
    written since it was created, and NEW records from this instant on."""
    _target(control, image, qdb, export).run("bitmap-checkpoint", {"old": old, "new": new})


# -- nbdserve qdb ... -------------------------------------------------------------------------

@main.group()
def qdb() -> None:
    """Inspect QDB files (the on-disk form of an image's bitmaps)."""


def _read_qdb(path: str):
    from nbdserve.bitmaps.qdb import QdbError, read_qdb
    try:
        return read_qdb(path)
    except (QdbError, OSError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None


def _dirty_runs(stored, granularity_bits_: int, image_size: int):
    from bitarray.util import intervals
    granularity = 1 << granularity_bits_
    for value, start, stop in intervals(stored.bits) if len(stored.bits) else ():
        if value:
            yield start * granularity, min(stop * granularity, image_size) - start * granularity


@qdb.command("info")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def qdb_info(file, as_json) -> None:
    """Header and bitmaps of FILE."""
    contents = _read_qdb(file)
    size = contents.identity.size
    bitmaps = []
    for b in contents.bitmaps:
        dirty = sum(length for _, length in _dirty_runs(b, b.granularity_bits, size)) \
            if b.bits is not None else None
        bitmaps.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                        "dirty_bytes": dirty, "recording": b.recording,
                        "inconsistent": b.inconsistent or b.bits is None,
                        "generation": f"{b.generation:016x}", "problem": b.problem})
    info = {"version": 1, "cluster_size": 1 << contents.cluster_bits,
            "image_size": size, "in_use": contents.in_use,
            "save_counter": contents.save_counter, "bitmaps": bitmaps}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"file: {file}\nversion: 1\ncluster size: {info['cluster_size']}\n"
               f"image size: {size}\nin use: {'yes' if contents.in_use else 'no'}\n"
               f"save counter: {contents.save_counter}\nbitmaps: {len(bitmaps)}")
    for b in bitmaps:
        state = "recording" if b["recording"] else "disabled"
        if b["inconsistent"]:
            state += ", inconsistent"
        dirty = "unreadable" if b["dirty_bytes"] is None else f"{b['dirty_bytes']} bytes dirty"
        click.echo(f"  {b['name']}: granularity {b['granularity']}, {dirty}, {state}, "
                   f"generation {b['generation']}" + (f" ({b['problem']})" if b["problem"]
                                                       else ""))


@qdb.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def qdb_check(file) -> None:
    """Validate FILE completely; exit status 1 and a precise message on any damage."""
    contents = _read_qdb(file)
    damaged = [b for b in contents.bitmaps if b.bits is None]
    for b in damaged:
        click.echo(f"{file}: bitmap '{b.name}': {b.problem}", err=True)
    if damaged:
        sys.exit(1)
    note = " (in use by a server, or left in use by a crash)" if contents.in_use else ""
    click.echo(f"{file}: OK, {len(contents.bitmaps)} bitmaps{note}")


@qdb.command("dump")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--bitmap", "names", multiple=True, help="Only this bitmap (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def qdb_dump(file, names, as_json) -> None:
    """Dirty extents (offset, length) of each bitmap in FILE."""
    contents = _read_qdb(file)
    chosen = [b for b in contents.bitmaps if not names or b.name in names]
    missing = set(names) - {b.name for b in chosen}
    if missing:
        raise click.ClickException(f"no bitmap named {', '.join(sorted(missing))} in {file}")
    out = []
    for b in chosen:
        if b.bits is None:
            raise click.ClickException(f"bitmap '{b.name}' is unreadable: {b.problem}")
        runs = list(_dirty_runs(b, b.granularity_bits, contents.identity.size))
        out.append({"name": b.name, "granularity": 1 << b.granularity_bits,
                    "dirty": [{"offset": o, "length": n} for o, n in runs]})
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for b in out:
        click.echo(f"{b['name']} (granularity {b['granularity']}):")
        for run in b["dirty"]:
            click.echo(f"{run['offset']:>14} {run['length']:>14}  dirty")
