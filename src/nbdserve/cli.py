"""Command line: `nbdserve serve IMAGE` and friends.

Options follow qemu-nbd's where the meaning is the same. The CLI only maps options onto
the configuration's types (config.py checks every value, for the file and the command
line alike) and onto the bitmap and control commands; the server receives valid
configuration only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time

import click

from nbdserve import __version__
from nbdserve.bitmaps import inspection
from nbdserve.bitmaps.offline import run_offline
from nbdserve.bitmaps.policy import BitmapError
from nbdserve.bitmaps.store import StoreLocked
from nbdserve.config import (
    CACHE_MODES,
    CBW_ERROR_POLICIES,
    DEFAULT_LISTEN,
    DETECT_ZEROES_MODES,
    DISCARD_MODES,
    POLL_MAX_US,
    BitmapRequest,
    ConfigError,
    ListenAddress,
    ServeConfig,
    check_socket_directories,
    load_config,
    make_export,
    parse_bitmap,
    parse_listen,
    with_overrides,
)
from nbdserve.image import ImageError
from nbdserve.logs import setup_logging
from nbdserve.server.lifecycle import HANDLED_SIGNALS
from nbdserve.server.service import Service, ServiceError
from nbdserve.tls import TLS_MODES, TLS_OFF, TlsConfig, TlsConfigError
from nbdserve.values import parse_size

log = logging.getLogger("nbdserve")


def install_event_loop() -> None:
    """uvloop measured fastest (see docs/performance.md); asyncio's loop is the fallback."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a declared dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping every large buffer: by default a read
    buffer of 256 KiB or more gets fresh pages from mmap(2), faulted in one by one and
    unmapped when freed, which measured 127 µs per 256 KiB read against 48 µs from the
    heap. Buffers up to the largest request (32 MiB) come from the heap, and up to
    16 MiB of freed heap is kept for the next ones."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, (32 << 20) + 4096)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: its defaults are not ours to fix
        pass


class _Param(click.ParamType):
    """A click type from a parsing function that raises ValueError."""

    def __init__(self, name: str, kind: type, parse) -> None:
        self.name, self.kind, self.parse = name, kind, parse

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _bitmap_option(text: str) -> BitmapRequest:
    """NAME[,granularity=BYTES], read as the configuration file reads it."""
    try:
        return parse_bitmap(text, "--bitmap")
    except ConfigError as exc:
        raise ValueError(str(exc).removeprefix("--bitmap: ")) from None


def BitmapParam() -> _Param:  # noqa: N802 (a click type, used like a class)
    return _Param("BITMAP", BitmapRequest, _bitmap_option)


def SizeParam() -> _Param:  # noqa: N802
    return _Param("SIZE", int, parse_size)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nbdserve")
def main() -> None:
    """nbdserve: an NBD server for raw images with persistent dirty bitmaps.

    Run `nbdserve COMMAND --help` for the options of each command.
    """


@main.command()
@click.argument("image", type=click.Path(dir_okay=False), required=False)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML configuration file (docs/configuration.md). Options given on "
                   "the command line override it; IMAGE adds an export to it.")
@click.option("-x", "--export-name", default=None,
              help="Name of IMAGE's export [default: \"\"].")
@click.option("-b", "--bind", "bind_address", default=None,
              help="Address to listen on, IPv4 or IPv6 [default: 127.0.0.1].")
@click.option("-p", "--port", default=None, type=click.IntRange(0, 65535),
              help="TCP port; 0 picks a free one and the log says which [default: 10809].")
@click.option("-k", "-U", "--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this Unix socket instead of TCP; '-' makes one in a private "
                   "directory, removed at exit (see --run).")
@click.option("--fork", is_flag=True,
              help="Return once the server accepts connections, printing its URIs; the "
                   "server goes on in the background (logging to stderr only if that is "
                   "a file).")
@click.option("--pid-file", type=click.Path(dir_okay=False),
              help="Write the server's pid here once it accepts connections; removed at "
                   "exit.")
@click.option("--run", "run_command", metavar="COMMAND",
              help="Once ready, run COMMAND (sh -c) with $uri, $nbd, $unixsocket, $port, "
                   "$host and $exportname set; then stop and exit with its status.")
@click.option("--exit-with-parent", is_flag=True,
              help="Stop (gracefully) when the parent process exits.")
@click.option("--oneshot", is_flag=True,
              help="Stop when the last client disconnects (qemu-nbd's default without -t).")
@click.option("-r", "--read-only", is_flag=True, help="Refuse writes to IMAGE (EPERM).")
@click.option("-D", "--description", default="", help="Description shown to clients.")
@click.option("-e", "--shared", default=None, type=click.IntRange(0),
              help="Concurrent connection limit; 0 = unlimited [default: 0]. Extra clients "
                   "wait. Multi-conn is advertised unless the limit is 1.")
@click.option("--create", "create_size", type=SizeParam(),
              help="Create a sparse image of this size (e.g. 10G) if IMAGE does not exist.")
@click.option("--bitmap", "bitmaps", multiple=True, type=BitmapParam(),
              metavar="NAME[,granularity=BYTES]",
              help="Record writes in this dirty bitmap: created if absent (granularity "
                   "default 64K), enabled if disabled. Repeatable.")
@click.option("--qdb", "qdb_path", type=click.Path(dir_okay=False),
              help="QDB file holding IMAGE's bitmaps [default: IMAGE.qdb].")
@click.option("--scratch-dir", type=click.Path(file_okay=False),
              help="Where IMAGE's snapshots keep the data they preserve (sparse scratch "
                   "files, deleted with the snapshot) [default: the QDB file's directory].")
@click.option("--on-cbw-error", type=click.Choice(CBW_ERROR_POLICIES), default=None,
              help="When a snapshot cannot preserve data (scratch disk full, EIO): break "
                   "the snapshot and let the write through, or fail the write and keep "
                   "the snapshot [default: break-snapshot].")
@click.option("-o", "--offset", type=SizeParam(), default=None,
              help="IMAGE starts this far into the file (a multiple of 512), as "
                   "qemu-nbd's --offset; the export is the rest of the file.")
@click.option("--cache", type=click.Choice(CACHE_MODES), default=None,
              help="writeback: through the host's page cache; none: O_DIRECT, so the data "
                   "is not cached on the host a second time [default: writeback].")
@click.option("--discard", type=click.Choice(DISCARD_MODES), default=None,
              help="TRIM on IMAGE punches holes (unmap), or is accepted and changes "
                   "nothing (ignore; bitmaps still record it) [default: unmap].")
@click.option("--detect-zeroes", type=click.Choice(DETECT_ZEROES_MODES), default=None,
              help="WRITEs of zeros to IMAGE become WRITE_ZEROES: zeroed in place (on) or "
                   "punched (unmap, needs --discard=unmap) [default: off].")
@click.option("--incoming", metavar="HOST:PORT",
              help="Wait for a migration of IMAGE (and its bitmaps) on HOST:PORT or "
                   "unix:PATH, and serve it once it completed (docs/migration.md).")
@click.option("--force", is_flag=True,
              help="Serve IMAGE even though its QDB file says it was migrated away or "
                   "is a migration target that did not complete.")
@click.option("--control", "control_path", type=click.Path(dir_okay=False),
              help="Unix socket (mode 0600) for bitmap, snapshot and status commands.")
@click.option("--metrics", "metrics_address", metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
@click.option("--tls", "tls_mode", type=click.Choice(TLS_MODES), default=None,
              help="off: STARTTLS refused. optional: TLS offered, required only by exports "
                   "marked so. require: nothing but STARTTLS and ABORT before TLS. "
                   "[default: off]")
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
@click.option("--handshake-timeout", default=None, type=click.FloatRange(min=0.1),
              help="Seconds a client may take to negotiate [default: 10].")
@click.option("--poll-max-us", default=None, type=click.IntRange(0, 10_000),
              help="Longest time, in microseconds, a lone busy connection watches its "
                   "socket before sleeping; adapts to the client, 0 turns it off. Cuts "
                   f"queue-depth-1 latency at the cost of some CPU [default: {POLL_MAX_US}].")
@click.option("--log-level", default=None,
              type=click.Choice(["debug", "info", "warning", "error"]),
              help="[default: info]")
@click.option("--log-format", default=None, type=click.Choice(["text", "json"]),
              help="One line per event, as text or JSON objects [default: text].")
def serve(image, config_path, export_name, bind_address, port, socket_path, fork, pid_file,
          run_command, exit_with_parent, oneshot, read_only,
          description, shared, create_size, bitmaps, qdb_path, scratch_dir, on_cbw_error,
          offset, cache, discard, detect_zeroes, incoming, force, control_path,
          metrics_address,
          tls_mode, tls_cert, tls_key, tls_ca, tls_verify_client, tls_allow_subjects,
          handshake_timeout, poll_max_us, log_level, log_format) -> None:
    """Serve raw images over NBD until stopped (SIGTERM or SIGINT).

    Serve IMAGE, or the exports of --config, or both. The server keeps running after
    clients disconnect. Connections share one view of each image, so FLUSH on one
    connection covers writes acknowledged on all. SIGHUP reloads --config: exports
    that did not change keep their clients.

    Dirty bitmaps live in the QDB file beside each image. They are loaded whenever that
    file exists, or bitmaps or --control are configured, and are offered to clients as
    the meta contexts qemu:dirty-bitmap:NAME. A crash journal (QDB.journal) keeps them
    exact across kill -9, and across power loss for every write the client flushed
    (FLUSH or FUA).

    Under systemd, READY=1 is sent once connections are accepted, and sockets passed by
    socket activation (LISTEN_FDS) are used instead of binding.

    From scripts: --fork returns once the server accepts connections and prints its
    URIs (with -p 0, the port it chose); --run runs a command against it and exits
    with the command's status (with -U -, on a private socket).
    """
    from nbdserve.server import scripting
    if fork and (run_command or exit_with_parent):
        raise click.UsageError("--fork goes with neither --run nor --exit-with-parent")
    private_directory = None
    if socket_path == "-":
        socket_path, private_directory = scripting.private_socket()
    options = dict(image=image, export_name=export_name, bind_address=bind_address, port=port,
                   socket_path=socket_path, read_only=read_only, description=description,
                   shared=shared, create_size=create_size, bitmaps=bitmaps, qdb_path=qdb_path,
                   scratch_dir=scratch_dir, on_cbw_error=on_cbw_error,
                   offset=offset, cache=cache, discard=discard, detect_zeroes=detect_zeroes,
                   incoming=incoming, force=force, control_path=control_path,
                   metrics_address=metrics_address,
                   tls_mode=tls_mode, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
                   tls_verify_client=tls_verify_client,
                   tls_allow_subjects=tls_allow_subjects,
                   handshake_timeout=handshake_timeout, poll_max_us=poll_max_us,
                   log_level=log_level, log_format=log_format)

    def build() -> ServeConfig:
        base = load_config(config_path) if config_path else ServeConfig()
        return config_from_options(base, **options)

    try:
        config = build()
        check_socket_directories(config)
        if config.tls.mode != TLS_OFF:
            config.tls.server_context()  # fail now, not at the first client
    except (ConfigError, TlsConfigError) as exc:
        scripting.remove_private_directory(private_directory)
        raise click.UsageError(str(exc)) from None
    setup_logging(config.log_level, config.log_format)
    if exit_with_parent:
        scripting.exit_with_parent()
    # From the moment a listener exists a supervisor may signal us: hold SIGTERM, SIGINT
    # and SIGHUP until Server.run has its handlers (it unblocks them), so a stop that
    # early is graceful too, never the default action with the bitmaps left in use.
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    service = Service(config, reload_config=build if config_path else None)
    tune_malloc()
    try:
        server = service.open()
    except ServiceError as exc:
        scripting.remove_private_directory(private_directory)
        raise click.ClickException(str(exc)) from None
    ready = scripting.Ready(export=config.exports[-1].name, pid_file=pid_file,
                            run=run_command)
    if fork:
        ready.notify_fd = scripting.fork()
    server.ready = ready
    server.oneshot = oneshot
    install_event_loop()
    try:
        status = asyncio.run(server.run())
    finally:
        service.cleanup()
        scripting.remove_private_directory(private_directory)
    if status:
        sys.exit(status)


def config_from_options(base: ServeConfig, *, image, export_name, bind_address, port,
                        socket_path, read_only, description, shared, create_size, bitmaps,
                        qdb_path, scratch_dir, on_cbw_error, offset, discard,
                        detect_zeroes, control_path, metrics_address, incoming=None,
                        force=False, cache=None,
                        tls_mode, tls_cert, tls_key, tls_ca, tls_verify_client,
                        tls_allow_subjects, handshake_timeout, poll_max_us, log_level,
                        log_format) -> ServeConfig:
    """The command line over the file: what is given replaces what the file says."""
    listen = None
    if socket_path:
        listen = (ListenAddress(path=socket_path),)
    elif bind_address is not None or port is not None:
        listen = (ListenAddress(bind_address or DEFAULT_LISTEN.host,
                                port if port is not None else DEFAULT_LISTEN.port),)
    metrics = None
    if metrics_address:
        address = parse_listen(metrics_address, "--metrics")
        if address.path is not None:
            raise ConfigError("--metrics: must be HOST:PORT")
        metrics = (address.host, address.port)
    tls = base.tls
    if tls_mode or tls_cert or tls_key or tls_ca or tls_verify_client or tls_allow_subjects:
        tls = TlsConfig(tls_mode or tls.mode, tls_cert or tls.cert, tls_key or tls.key,
                        tls_ca or tls.ca, tls_verify_client or tls.verify_client,
                        tuple(tls_allow_subjects) or tls.allow_subjects)
    exports = base.exports
    if image is not None:
        name = export_name if export_name is not None else ""
        mine = make_export(name=name, image=image, description=description,
                           read_only=read_only, max_connections=shared or 0,
                           qdb=qdb_path, bitmaps=tuple(bitmaps), create=create_size,
                           scratch_dir=scratch_dir, on_cbw_error=on_cbw_error,
                           discard=discard, detect_zeroes=detect_zeroes, offset=offset or 0,
                           incoming=incoming, force=force, cache=cache)
        exports = tuple(e for e in exports if e.name != name) + (mine,)
    elif (export_name is not None or read_only or bitmaps or create_size or qdb_path
          or scratch_dir or on_cbw_error or discard or detect_zeroes or offset or incoming
          or force or cache):
        raise ConfigError("-x, -r, --bitmap, --create, --qdb, --scratch-dir, --on-cbw-error, "
                          "-o, --cache, --discard, --detect-zeroes, --incoming and --force "
                          "describe IMAGE: give one")
    config = with_overrides(base, listen=listen, exports=exports, control=control_path,
                            metrics=metrics, max_connections=shared,
                            handshake_timeout=handshake_timeout, poll_max_us=poll_max_us,
                            log_level=log_level, log_format=log_format, tls=tls)
    config.validate()
    return config


@main.command()
# The control socket's path is not checked by click: a socket the user may not open is
# a runtime error (exit 1) from connecting, not a usage error.
@click.option("--control", required=True, type=click.Path(readable=False),
              help="Control socket of the running server.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--bytes", "raw_bytes", is_flag=True,
              help="Sizes in bytes, not in binary units with percentages.")
def status(control, as_json, raw_bytes) -> None:
    """Exports, connections, bitmaps and snapshots of a running server."""
    state = _control_call(control, "query-status", {})
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    from nbdserve.inspect import human

    def size(value: int, whole: int | None = None) -> str:
        if raw_bytes:
            return str(value)
        share = f" ({100 * value / whole:.1f} %)" if whole else ""
        return human(value) + share

    sizes = {e["name"]: e["size"] for e in state["exports"]}
    click.echo(f"TLS: {state['tls']}; connections accepted since start: {state['accepted']}; "
               f"listening on {', '.join(state.get('listen', [])) or '-'}")
    if state.get("migration"):
        outgoing = state["migration"]
        click.echo(f"migration of export {_quoted(outgoing['export'])} to "
                   f"{outgoing['target']}: {outgoing['phase']} (nbdserve migrate status)")
    for waiting in state.get("incoming", []):
        click.echo(f"export {_quoted(waiting['export'])} waits for a migration on "
                   f"{waiting['listen']}: {waiting['state']}")
    click.echo("")
    _table(["EXPORT", "IMAGE", "SIZE", "MODE", "CONNECTIONS"],
           [[e["name"] or '""', e["image"], size(e["size"]),
             "ro" if e["read-only"] else "rw", str(e["connections"])]
            for e in state["exports"]])
    click.echo("")
    _table(["PEER", "EXPORT", "STATE", "FEATURES", "IN-FLIGHT", "REQUESTS"],
           [[c["peer"], c["export"] if c["export"] is not None else "-", c["state"],
             ",".join(c.get("features", [])) or "-", str(c.get("in_flight", "-")),
             str(c.get("requests", "-"))] for c in state["connections"]] or [["(none)"]])
    bitmaps = [[e["name"] or '""', b["name"], size(b["granularity"]),
                size(b["count"], e["size"]),
                "yes" if b["recording"] else "no", "yes" if b["busy"] else "no",
                "yes" if b["inconsistent"] else "no"]
               for e in state["exports"] for b in e["bitmaps"]]
    if bitmaps:
        click.echo("")
        _table(["EXPORT", "BITMAP", "GRANULARITY", "DIRTY", "RECORDING", "BUSY",
                "INCONSISTENT"], bitmaps)
    if state.get("snapshots"):
        click.echo("")
        _snapshot_table(state["snapshots"], lambda value, snap: size(
            value, sizes.get(snap["export"])))


def _table(header: list[str], rows: list[list[str]]) -> None:
    rows = [header, *rows]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in rows)
              for i in range(len(header))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths,
                                                                      strict=False)).rstrip())


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
            if self.export is not None:
                arguments["export"] = self.export
            return _control_call(self.control, command, arguments)
        try:
            return run_offline(self.image, self.qdb, command, arguments)
        except (ImageError, StoreLocked, OSError, BitmapError) as exc:
            raise click.ClickException(str(exc)) from None


def bitmap_target_options(function):
    function = click.option("--export", help="Export name, when the server has several.")(
        function)
    function = click.option("--qdb", type=click.Path(dir_okay=False),
                            help="QDB file, offline [default: IMAGE.qdb].")(function)
    function = click.option("--image", type=click.Path(exists=True, dir_okay=False),
                            help="Act on IMAGE's QDB file directly (no server may hold it).")(
        function)
    function = click.option("--control", type=click.Path(readable=False),
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
@click.option("--snapshot", "with_snapshot", is_flag=True,
              help="At the same instant, export a snapshot of the image as it is then "
                   "(running server only): back up OLD's dirty extents from it.")
@click.option("--snapshot-name", metavar="NAME",
              help="The snapshot's export name [default: EXPORT@OLD].")
def bitmap_checkpoint(old, new, control, image, qdb, export, with_snapshot,
                      snapshot_name) -> None:
    """Disable OLD and add a recording NEW atomically: OLD then holds exactly what was
    written since it was created, and NEW records from this instant on.

    With --snapshot, a point-in-time export of the image at that instant appears
    (docs/snapshots.md); its name is printed.
    """
    if snapshot_name is not None and not with_snapshot:
        raise click.UsageError("--snapshot-name goes with --snapshot")
    arguments = {"old": old, "new": new}
    if with_snapshot:
        if image:
            raise click.UsageError("--snapshot needs a running server (--control): "
                                   "offline, the image does not change")
        arguments["snapshot"] = True
        if snapshot_name is not None:
            arguments["snapshot-name"] = snapshot_name
    result = _target(control, image, qdb, export).run("bitmap-checkpoint", arguments)
    if with_snapshot:
        click.echo(result["snapshot"])


# -- nbdserve snapshot ... --------------------------------------------------------------------

@main.group()
def snapshot() -> None:
    """Point-in-time exports of a running server's images (docs/snapshots.md)."""


def _control_call(control: str, command: str, arguments: dict):
    """One control command; its errors as one CLI line (exit status 1)."""
    from nbdserve.control.client import ControlClient, ControlError
    try:
        with ControlClient(control) as client:
            return client.execute(command, arguments)
    except ControlError as exc:
        raise click.ClickException(exc.desc) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach {control}: {exc}") from None


_control_option = click.option("--control", required=True, type=click.Path(readable=False),
                               help="Control socket of the running server.")


@snapshot.command("add")
@click.argument("name")
@_control_option
@click.option("--export", help="The live export, when the server has several.")
@click.option("--bitmap", metavar="NEW",
              help="At the same instant, add bitmap NEW, recording from then on (where "
                   "the next incremental backup starts).")
def snapshot_add(name, control, export, bitmap) -> None:
    """Export NAME: the image as it is now, all of it (for a full backup)."""
    arguments = {"name": name} | ({"export": export} if export is not None else {})
    if bitmap is not None:
        arguments["bitmap"] = bitmap
    click.echo(_control_call(control, "snapshot-add", arguments)["name"])


@snapshot.command("list")
@_control_option
@click.option("--export", help="Only the snapshots of this export.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def snapshot_list(control, export, as_json) -> None:
    """Snapshots: what they hold, what they preserved, their scratch space, and
    whether they are broken."""
    arguments = {"export": export} if export is not None else {}
    taken = _control_call(control, "query-snapshots", arguments)
    if as_json:
        click.echo(json.dumps(taken, indent=2))
        return
    if not taken:
        click.echo("no snapshots")
        return
    _snapshot_table(taken)


def _snapshot_table(taken: list[dict], size=lambda value, snap: str(value)) -> None:
    _table(["SNAPSHOT", "OF", "BITMAP", "HELD", "PRESERVED", "SCRATCH", "CONNECTIONS",
            "STATE"],
           [[s["name"], s["export"] or '""', s["bitmap"] or "-", size(s["held-bytes"], s),
             size(s["preserved-bytes"], s), size(s["scratch-bytes"], s),
             str(s["connections"]),
             f"broken: {s['broken']}" if s["broken"] else "ok"] for s in taken])


@snapshot.command("remove")
@click.argument("name")
@_control_option
@click.option("--force", is_flag=True, help="Disconnect the snapshot's clients first.")
def snapshot_remove(name, control, force) -> None:
    """Remove snapshot NAME and delete its scratch data (refused while in use)."""
    _control_call(control, "snapshot-remove", {"name": name, "force": force})


# -- nbdserve migrate ... ---------------------------------------------------------------------

@main.group()
def migrate() -> None:
    """Move a served export and its dirty bitmaps to another nbdserve, live
    (docs/migration.md)."""


@migrate.command("start")
@click.argument("target", metavar="HOST:PORT")
@_control_option
@click.option("--export", help="The export, when the server has several.")
@click.option("--max-downtime", type=click.IntRange(1), default=300, show_default=True,
              metavar="MS", help="The longest pause clients may see at the switchover.")
@click.option("--bandwidth", type=SizeParam(), default="0", show_default=True,
              metavar="BYTES/S", help="Limit the copy's rate (0: no limit; 100M, 1G...).")
@click.option("--plain", is_flag=True,
              help="Over TCP without TLS (otherwise refused when this server has no "
                   "certificates).")
@click.option("--tls-hostname", metavar="NAME",
              help="The name the target's certificate carries [default: HOST].")
@click.option("--wait", is_flag=True,
              help="Return when the migration ends; exit 0 only if it completed.")
def migrate_start(target, control, export, max_downtime, bandwidth, plain, tls_hostname,
                  wait) -> None:
    """Start migrating to the server waiting with --incoming HOST:PORT (or
    unix:PATH). Clients keep working; at the end they see one short pause, and
    connections still open here are forwarded to the target."""
    try:
        parse_listen(target, "HOST:PORT")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    arguments = {"uri": target, "max-downtime": max_downtime, "bandwidth": bandwidth,
                 "plain": plain}
    if export is not None:
        arguments["export"] = export
    if tls_hostname is not None:
        arguments["tls-hostname"] = tls_hostname
    _control_call(control, "migrate-start", arguments)
    if wait:
        state = _follow_migration(control, sys.stderr.isatty())
        if state["phase"] != "completed":
            raise click.ClickException(f"migration {state['phase']}: {state['error']}")


def _follow_migration(control: str, bar: bool) -> dict:
    """Poll query-migrate until the migration ends (a progress bar on a terminal)."""
    progress = _Progress(bar)
    advance = None
    shown = 0
    try:
        while True:
            state = _control_call(control, "query-migrate", {})["outgoing"]
            if state is None:
                raise click.ClickException("no migration from this server")
            if advance is None:
                advance = progress(state["size"], f"migrating {_quoted(state['export'])}")
            copied = min(state["data-bytes"] + state["zero-bytes"], state["size"])
            advance(max(copied - shown, 0))
            shown = max(shown, copied)
            if state["phase"] in ("completed", "failed", "cancelled"):
                return state
            time.sleep(0.2)
    finally:
        progress.stop()


@migrate.command("status")
@_control_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def migrate_status(control, as_json) -> None:
    """The latest migration from this server, and exports waiting for one."""
    state = _control_call(control, "query-migrate", {})
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    from nbdserve.inspect import human
    outgoing = state["outgoing"]
    if outgoing is None:
        click.echo("no migration from this server")
    else:
        expected = outgoing["expected-downtime-ms"]
        rows = [
            ("export", _quoted(outgoing["export"])), ("target", outgoing["target"]),
            ("phase", outgoing["phase"] + (f": {outgoing['error']}" if outgoing["error"]
                                           else "")),
            ("passes", str(outgoing["passes"])),
            ("sent", f"{human(outgoing['data-bytes'])} of data, "
                     f"{human(outgoing['zero-bytes'])} as holes, "
                     f"{human(outgoing['bitmap-bytes'])} of bitmaps"),
            ("remaining dirty", human(outgoing["remaining-bytes"])),
            ("rate", f"{human(outgoing['rate'])}/s"),
            ("expected downtime", f"{expected} ms"),
            ("pause", f"{outgoing['pause-ms']} ms (quiesce {outgoing['quiesce-ms']} ms, "
                      f"{human(outgoing['pause-data-bytes'])} of data and "
                      f"{outgoing['pause-bitmap-bytes']} bytes of bitmaps)"),
            ("elapsed", f"{outgoing['elapsed-s']} s"),
        ]
        for key, value in rows:
            click.echo(f"{key + ':':19}{value}")
    for waiting in state["incoming"]:
        click.echo(f"incoming: export {_quoted(waiting['export'])} on {waiting['listen']}: "
                   f"{waiting['state']}" + (f" (last failure: {waiting['last-error']})"
                                            if waiting["last-error"] else ""))


def _quoted(name: str) -> str:
    return name or '""'


@migrate.command("cancel")
@_control_option
def migrate_cancel(control) -> None:
    """Stop the migration under way; the export stays here, as it was."""
    _control_call(control, "migrate-cancel", {})


# -- nbdserve qdb ... -------------------------------------------------------------------------

@main.group()
def qdb() -> None:
    """Inspect QDB files (the on-disk form of an image's bitmaps)."""


def _read_qdb(path: str, complete: bool = False):
    """(contents, note): as a server starting now would read them (see inspection)."""
    from nbdserve.bitmaps.qdb import QdbError
    try:
        return inspection.read_for_inspection(path, complete=complete)
    except inspection.InUse as exc:
        raise click.ClickException(str(exc)) from None
    except (QdbError, OSError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None


@qdb.command("adopt")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("--qdb", "qdb_path", type=click.Path(dir_okay=False),
              help="QDB file holding IMAGE's bitmaps [default: IMAGE.qdb].")
def qdb_adopt(image, qdb_path) -> None:
    """Trust IMAGE's bitmaps after a restore or an offline copy: you vouch that IMAGE
    holds exactly the content its bitmaps were last saved with.

    Without this, an image whose inode, device or modification time changed while no
    server ran (a copy, a restore) has inconsistent bitmaps at the next start. No
    server may hold the file; one left in use by a crash is refused.
    """
    from nbdserve.bitmaps.offline import MoveError, adopt
    try:
        line = adopt(image, qdb_path)
    except (MoveError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(line)


@qdb.command("move")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("target", type=click.Path(dir_okay=False))
def qdb_move(source, target) -> None:
    """Move SOURCE and its bitmaps (SOURCE.qdb) to TARGET together.

    A rename where the file system allows it; across file systems a sparse copy whose
    identity the QDB file then records (no vouching needed: this command made the
    copy). No server may hold the bitmaps, and SOURCE must be as they were saved.
    """
    from nbdserve.bitmaps.offline import MoveError, move
    try:
        click.echo(move(source, target))
    except (MoveError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@qdb.command("info")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def qdb_info(file, as_json) -> None:
    """Header and bitmaps of FILE."""
    info = inspection.describe(*_read_qdb(file))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"file: {file}\nversion: 1\ncluster size: {info['cluster_size']}\n"
               f"image size: {info['image_size']}\n"
               f"in use: {'yes' if info['in_use'] else 'no'}\n"
               f"save counter: {info['save_counter']}\nbitmaps: {len(info['bitmaps'])}")
    if info["migration"]:
        click.echo("migration: " + MIGRATION_NOTES[info["migration"]])
    if info["note"]:
        click.echo(f"note: {info['note']}")
    for b in info["bitmaps"]:
        state = "recording" if b["recording"] else "disabled"
        if b["inconsistent"]:
            state += ", inconsistent"
        dirty = "unreadable" if b["dirty_bytes"] is None else f"{b['dirty_bytes']} bytes dirty"
        click.echo(f"  {b['name']}: granularity {b['granularity']}, {dirty}, {state}, "
                   f"generation {b['generation']}" + (f" ({b['problem']})" if b["problem"]
                                                       else ""))


MIGRATION_NOTES = {
    "moved": "the image was migrated away; this copy is stale (serve needs --force)",
    "incoming": "the image is the target of a migration that did not complete",
}


@qdb.command("check")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
def qdb_check(file) -> None:
    """Validate FILE completely; exit status 1 and a precise message on any damage."""
    contents, note = _read_qdb(file, complete=True)
    problems = inspection.damage(contents)
    for problem in problems:
        click.echo(f"{file}: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{file}: OK, {len(contents.bitmaps)} bitmaps" + (f" ({note})" if note else ""))


@qdb.command("dump")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--bitmap", "names", multiple=True, help="Only this bitmap (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def qdb_dump(file, names, as_json) -> None:
    """Dirty extents (offset, length) of each bitmap in FILE."""
    try:
        contents, note = _read_qdb(file)
        out = inspection.dump(contents, tuple(names))
    except LookupError as exc:
        raise click.ClickException(f"{exc.args[0]} in {file}") from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    if note:
        click.echo(f"# {file}: {note}")
    for b in out:
        click.echo(f"{b['name']} (granularity {b['granularity']}):" + (
            f" inconsistent, all dirty ({b['inconsistent']})" if "inconsistent" in b else ""))
        for run in b["dirty"]:
            click.echo(f"{run['offset']:>14} {run['length']:>14}  dirty")


# -- nbdserve backup ... ---------------------------------------------------------------------

@main.group()
def backup() -> None:
    """Incremental backups into a chain of restore points (docs/backup.md)."""


class _Progress:
    """A progress bar on a terminal (rich), nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))

    def __call__(self, total: int, label: str):
        if self.bar is None:
            return lambda n: None
        self.bar.start()
        task = self.bar.add_task(label, total=total)
        return lambda n: self.bar.advance(task, n)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _backup_errors():
    from nbdserve.backup.chain import ChainError
    from nbdserve.backup.copy import SourceError
    from nbdserve.backup.run import BackupError
    return (ChainError, SourceError, BackupError, OSError)


@backup.command("run")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--control", type=click.Path(readable=False),
              help="Control socket of the nbdserve serving the image: each run takes a "
                   "snapshot and manages the bitmaps itself.")
@click.option("--export", help="The export, when the server has several (with --control).")
@click.option("--uri", help="Any NBD server instead (nbd://HOST:PORT/EXPORT or "
                            "nbd+unix:///EXPORT?socket=PATH): you make the checkpoints.")
@click.option("--bitmap", help="With --uri: the bitmap whose dirty extents an incremental "
                               "copies (qemu:dirty-bitmap:NAME).")
@click.option("--full", is_flag=True, help="A full backup even where an incremental would do.")
@click.option("--compression", type=click.Choice(["zstd", "none"]), default="zstd",
              show_default=True, help="How chunks are stored.")
@click.option("--connections", type=click.IntRange(1, 16), default=4, show_default=True,
              help="Connections to read with, when the server offers multi-conn.")
@click.option("--json", "as_json", is_flag=True, help="One JSON line per run, no progress bar.")
def backup_run(dest, control, export, uri, bitmap, full, compression, connections,
               as_json) -> None:
    """Add a restore point to the chain in DEST: the first run is a full backup,
    every later one an incremental."""
    from nbdserve.backup import run as backup_runs
    if bool(control) == bool(uri):
        raise click.UsageError("give either --control PATH (nbdserve) or --uri URI")
    if control and bitmap:
        raise click.UsageError("--bitmap goes with --uri; with --control the run manages "
                               "the bitmaps")
    if uri and export:
        raise click.UsageError("--export goes with --control; a URI names its export")
    progress = _Progress(not as_json and sys.stderr.isatty())
    install_event_loop()
    tune_malloc()
    try:
        if control:
            outcome = backup_runs.run_with_control(dest, control, export, full=full,
                                                   compression=compression,
                                                   progress=progress,
                                                   connections=connections)
        else:
            outcome = backup_runs.run_with_uri(dest, uri, bitmap, full=full,
                                               compression=compression, progress=progress,
                                               connections=connections)
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        progress.stop()
    summary = outcome.summary()
    if as_json:
        click.echo(json.dumps(summary))
        return
    if outcome.reason and outcome.point.index:
        click.echo(f"full backup: {outcome.reason}", err=True)
    click.echo(f"point {summary['point']} ({summary['kind']}): {summary['bytes_read']} bytes "
               f"read, {summary['bytes_stored']} stored, {summary['seconds']} s")


@backup.command("list")
@click.argument("dest", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def backup_list(dest, as_json) -> None:
    """The restore points of DEST."""
    from nbdserve.backup.chain import Chain
    try:
        chain = Chain.open(dest)
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    rows = [{"point": p.index, "kind": p.kind, "created": p.created, "size": p.size,
             "bytes": p.logical_bytes, "stored": p.stored_bytes, "bitmap": p.bitmap,
             "export": p.export} for p in chain.points]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no restore points")
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(box=None, header_style="bold")
    for column in ("POINT", "KIND", "CREATED", "IMAGE SIZE", "CHANGED", "STORED"):
        table.add_column(column, justify="right" if column != "KIND" else "left")
    for row in rows:
        table.add_row(str(row["point"]), row["kind"], row["created"], str(row["size"]),
                      str(row["bytes"]), str(row["stored"]))
    Console(width=200).print(table)


@backup.command("verify")
@click.argument("dest", type=click.Path(exists=True, file_okay=False))
def backup_verify(dest) -> None:
    """Check every checksum of every point; exit 1 naming each damaged extent."""
    from nbdserve.backup.restore import verify
    try:
        checked, problems = verify(dest)
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    for problem in problems:
        click.echo(f"{dest}: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{dest}: OK, {checked} chunks")


@backup.command("restore")
@click.argument("dest", type=click.Path(exists=True, file_okay=False))
@click.argument("target")
@click.option("--until", type=click.IntRange(0), help="Restore point [default: the newest].")
@click.option("--force", is_flag=True, help="Replace an existing, non-empty TARGET file.")
def backup_restore(dest, target, until, force) -> None:
    """Write a restore point to TARGET: a file (created sparse), a block device or an NBD
    URI. Only data is written; holes stay holes."""
    from nbdserve.backup.restore import restore
    progress = _Progress(sys.stderr.isatty())
    install_event_loop()
    try:
        written = restore(dest, target, until, force=force, progress=progress)
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        progress.stop()
    click.echo(f"restored {written} bytes of data to {target}")


@backup.command("merge")
@click.argument("dest", type=click.Path(exists=True, file_okay=False))
@click.option("--until", type=click.IntRange(0), required=True,
              help="Fold every point up to this one into one full backup.")
def backup_merge(dest, until) -> None:
    """Fold old points into a full backup (retention); later points stay valid."""
    from nbdserve.backup.restore import merge
    try:
        point = merge(dest, until)
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"point {point.index} is now a full backup ({point.stored_bytes} bytes "
               "stored)")


@backup.command("serve")
@click.argument("dest", type=click.Path(exists=True, file_okay=False))
@click.option("--until", type=click.IntRange(0), help="Restore point [default: the newest].")
@click.option("-x", "--export-name", default="", help="Export name [default: \"\"].")
@click.option("-b", "--bind", "bind_address", default=None,
              help="Address to listen on [default: 127.0.0.1].")
@click.option("-p", "--port", default=None, type=click.IntRange(0, 65535),
              help="TCP port [default: 10809].")
@click.option("-k", "--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Listen on this Unix socket instead of TCP.")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]))
def backup_serve(dest, until, export_name, bind_address, port, socket_path,
                 log_level) -> None:
    """Serve a restore point read-only, straight from the chain (instant restore: boot
    from it or copy it with qemu-img convert), until stopped."""
    from nbdserve.backup.restore import ChainImage
    from nbdserve.config import ExportConfig
    from nbdserve.export import Export, ExportCatalog
    from nbdserve.server.lifecycle import Server
    from nbdserve.server.service import listening_sockets
    if socket_path:
        listen = (ListenAddress(path=socket_path),)
    else:
        listen = (ListenAddress(bind_address or DEFAULT_LISTEN.host,
                                port if port is not None else DEFAULT_LISTEN.port),)
    config = ServeConfig(listen=listen)
    try:
        check_socket_directories(config)
        image = ChainImage(dest, until)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    except _backup_errors() as exc:
        raise click.ClickException(str(exc)) from None
    setup_logging(log_level)
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        sockets, paths = listening_sockets(config)
    except ServiceError as exc:
        image.close()
        raise click.ClickException(str(exc)) from None
    export = Export(ExportConfig(export_name, dest, read_only=True), image)
    server = Server(ExportCatalog([export]), sockets)
    install_event_loop()
    try:
        status = asyncio.run(server.run())
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if status:
        sys.exit(status)


# -- nbdserve list / info / map: any NBD server, with our own client ----------------------------

def _inspect(coroutine):
    from nbdserve.backup.copy import SourceError
    from nbdserve.inspect import InspectError
    try:
        return asyncio.run(coroutine)
    except (InspectError, SourceError) as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"the server closed the connection: {exc}") from None


@main.command("list")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(uri, as_json) -> None:
    """The exports of the NBD server at URI: names, sizes, descriptions."""
    from nbdserve import inspect
    exports = _inspect(inspect.list_exports(uri))
    if as_json:
        click.echo(json.dumps(exports, indent=2))
        return
    _table(["EXPORT", "SIZE", "DESCRIPTION"],
           [[e["name"] or '""', "?" if e["size"] is None else str(e["size"]),
             e["description"]] for e in exports] or [["(none)"]])


@main.command("info")
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info_command(uri, as_json) -> None:
    """One export of the NBD server at URI: size, flags, block sizes, meta contexts."""
    from nbdserve import inspect
    info = _inspect(inspect.export_info(uri))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "contexts":
            for context in value:
                click.echo(f"contexts: {context}")
        elif key == "export":
            click.echo(f"export: {value or chr(34) * 2}")
        elif key != "flags":
            click.echo(f"{key}: {str(value).lower() if isinstance(value, bool) else value}")


@main.command("map")
@click.argument("uri")
@click.option("--context", default="base:allocation", show_default=True,
              help="The meta context, e.g. qemu:dirty-bitmap:NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--picture", is_flag=True,
              help="Draw the disk as a strip of cells shaded by how much of each is data "
                   "(or dirty), with a legend.")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False),
              help="Write the picture as an SVG file.")
@click.option("--width", type=click.IntRange(8, 400), default=64, show_default=True,
              help="Cells per line of the picture.")
def map_command(uri, context, as_json, picture, svg_path, width) -> None:
    """Extents of one meta context of the export at URI (like nbdinfo --map)."""
    from nbdserve import inspect
    size, found = _inspect(inspect.extents(uri, context))
    if svg_path:
        with open(svg_path, "w") as f:
            f.write(inspect.svg(size, found, context))
    if picture:
        click.echo(inspect.picture(size, found, context, width=width))
        return
    if as_json:
        click.echo(json.dumps([{"offset": e.offset, "length": e.length, "type": e.flags,
                                "description": inspect.describe_flags(context, e.flags)}
                               for e in found], indent=2))
        return
    if not svg_path:
        for e in found:
            click.echo(f"{e.offset:>14} {e.length:>14} {e.flags:>4}  "
                       f"{inspect.describe_flags(context, e.flags)}")
