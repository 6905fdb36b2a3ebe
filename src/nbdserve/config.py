"""Configuration as data: the TOML file and the command line both become a ServeConfig,
validated here, once; the server receives only valid values.

The keys are documented in docs/configuration.md, with examples/nbdserve.toml.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace

from nbdserve.tls import TLS_MODES, TLS_OFF, TlsConfig, TlsConfigError
from nbdserve.values import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    check_bitmap_name,
    granularity_bits,
    parse_size,
)

HANDSHAKE_TIMEOUT = 10.0  # seconds a client may spend haggling before GO
POLL_MAX_US = 100  # longest busy-polling window (see server/polling.py); 0: never
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# What a snapshot's failed copy-before-write does (docs/snapshots.md): break the
# snapshot and let the write proceed, or fail the write and keep the snapshot.
CBW_ERROR_POLICIES = ("break-snapshot", "fail-write")
DISCARD_MODES = ("unmap", "ignore")  # TRIM punches holes, or changes nothing
CACHE_MODES = ("writeback", "none")  # the host's page cache, or O_DIRECT
DETECT_ZEROES_MODES = ("off", "on", "unmap")  # zero WRITEs become WRITE_ZEROES


class ConfigError(Exception):
    """A bad setting: the message names the key and the reason."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.host and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


DEFAULT_LISTEN = ListenAddress(DEFAULT_HOST, DEFAULT_PORT)


@dataclass(frozen=True, slots=True)
class BitmapRequest:
    """`--bitmap NAME[,granularity=BYTES]`: create if absent, enable."""

    name: str
    granularity: int | None = None


@dataclass(frozen=True)
class ExportConfig:
    """One export, as the file or the command line describes it; the export is
    built from this directly (nbdserve.export.Export)."""

    name: str
    image: str
    description: str = ""
    read_only: bool = False
    max_connections: int = 0
    tls_required: bool = False
    qdb: str | None = None
    bitmaps: tuple[BitmapRequest, ...] = ()
    create: int | None = None
    scratch_dir: str | None = None  # snapshots' scratch files [default: beside the QDB]
    on_cbw_error: str = CBW_ERROR_POLICIES[0]
    discard: str = DISCARD_MODES[0]
    detect_zeroes: str = DETECT_ZEROES_MODES[0]
    cache: str = CACHE_MODES[0]
    offset: int = 0  # the image starts this far into the file (qemu-nbd's --offset)
    # Wait for a migration on this address before serving (docs/migration.md).
    incoming: ListenAddress | None = None
    force: bool = False  # serve even an image its QDB file says moved or is partial


@dataclass(frozen=True)
class ServeConfig:
    listen: tuple[ListenAddress, ...] = (DEFAULT_LISTEN,)
    exports: tuple[ExportConfig, ...] = ()
    control: str | None = None
    metrics: tuple[str, int] | None = None
    max_connections: int = 0
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    poll_max_us: int = POLL_MAX_US
    log_level: str = "info"
    log_format: str = "text"
    tls: TlsConfig = field(default_factory=TlsConfig)

    def validate(self) -> None:
        if not self.exports:
            raise ConfigError("no export: give an IMAGE or [[export]] tables")
        names = [e.name for e in self.exports]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigError(f"export names must be unique: {sorted(duplicates)!r}")
        try:
            self.tls.validate()
        except TlsConfigError as exc:
            raise ConfigError(f"tls: {exc}") from None
        if self.tls.mode == TLS_OFF and any(e.tls_required for e in self.exports):
            raise ConfigError("export tls-required needs tls.mode = \"optional\" or "
                              "\"require\"")



def check_socket_directories(config: ServeConfig) -> None:
    """Before serving (not part of validate(): a file may be checked on another
    machine): the directories of the Unix sockets to create must exist and be
    writable, or the error would come after the images and bitmaps were opened."""
    if config.control is not None:
        _check_socket_directory(config.control, "control")
    for address in config.listen:
        if address.path is not None:
            _check_socket_directory(address.path, "listen")


def _check_socket_directory(path: str, key: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"{key}: {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path}: directory {directory} is not writable")


# -- parsing helpers ------------------------------------------------------------------------

def parse_listen(text: str, key: str = "listen") -> ListenAddress:
    """"HOST:PORT", "[IPV6]:PORT", or "unix:PATH"."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{key}: expected \"HOST:PORT\", \"[IPV6]:PORT\" or \"unix:PATH\"")
    if text.startswith("unix:"):
        if len(text) == 5:
            raise ConfigError(f"{key}: empty Unix socket path")
        return ListenAddress(path=text[5:])
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: {text!r} has no port (use HOST:PORT)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{key}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"{key}: port {number} is out of range")
    return ListenAddress(host=host, port=number)


BITMAP_OPTIONS = ("granularity",)


def parse_bitmap_spec(text: str) -> tuple[str, str | None]:
    """"NAME[,granularity=BYTES]" -> (name, granularity text or None).

    A name may contain commas, so only a last ",WORD=VALUE" is read as an option, and
    then WORD must be a known one: a typo ("a,gran=4K") is an error rather than a
    bitmap named "a,gran=4K". The command line and the file read it the same way.
    """
    name, sep, option = text.rpartition(",")
    key, eq, value = option.partition("=")
    if not sep or not eq or not key.replace("-", "").isalnum():
        return text, None
    if key not in BITMAP_OPTIONS:
        raise ValueError(f"unknown bitmap option {key!r} in {text!r} (known: "
                         f"{', '.join(BITMAP_OPTIONS)}); a name with a comma and an '=' "
                         "after it needs the table form { name = ... }")
    return name, value


def parse_bitmap(value, key: str) -> BitmapRequest:
    """A bitmap from the command line or the file: a string (see parse_bitmap_spec)
    or a table { name = ..., granularity = ... }."""
    try:
        if isinstance(value, str):
            name, granularity = parse_bitmap_spec(value)
        elif isinstance(value, dict):
            _check_keys(value, {"name", "granularity"}, key)
            name = value.get("name")
            granularity = value.get("granularity")
        else:
            raise ConfigError(f"{key}: expected a name or {{ name = ..., granularity = ... }}")
        if isinstance(granularity, str):
            granularity = parse_size(granularity)
        check_bitmap_name(name)
        if granularity is not None:
            granularity_bits(granularity)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return BitmapRequest(name, granularity)


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            hint = f"{where}.{key}" if where else key
            raise ConfigError(f"{hint}: unknown key (known: {', '.join(sorted(allowed))})")


def _get(table: dict, key: str, kind, where: str, default=None):
    value = table.get(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{where}{key}: expected {name}, got {type(value).__name__}")
    return value


# -- the file -------------------------------------------------------------------------------

SERVER_KEYS = {"listen", "control", "metrics", "max-connections", "handshake-timeout",
               "poll-max-us", "log-level", "log-format", "tls", "export"}
EXPORT_KEYS = {"name", "image", "description", "read-only", "max-connections",
               "tls-required", "qdb", "bitmaps", "create", "scratch-dir", "on-cbw-error",
               "discard", "detect-zeroes", "offset", "incoming", "force", "cache"}
TLS_KEYS = {"mode", "cert", "key", "ca", "verify-client", "allow-subjects"}


def load_config(path: str) -> ServeConfig:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict) -> ServeConfig:
    _check_keys(data, SERVER_KEYS, "")
    listen = _get(data, "listen", list, "", None)
    if listen is None:
        listen_addresses = ServeConfig().listen
    else:
        if not listen:
            raise ConfigError("listen: needs at least one address")
        listen_addresses = tuple(parse_listen(item, f"listen[{i}]")
                                 for i, item in enumerate(listen))
    metrics = _get(data, "metrics", str, "")
    metrics_address = None
    if metrics is not None:
        address = parse_listen(metrics, "metrics")
        if address.path is not None:
            raise ConfigError("metrics: must be HOST:PORT")
        metrics_address = (address.host, address.port)
    max_connections = _get(data, "max-connections", int, "", 0)
    if max_connections < 0:
        raise ConfigError("max-connections: must be 0 (unlimited) or more")
    timeout = _get(data, "handshake-timeout", float, "", HANDSHAKE_TIMEOUT)
    if timeout <= 0:
        raise ConfigError("handshake-timeout: must be positive")
    poll_max_us = _get(data, "poll-max-us", int, "", POLL_MAX_US)
    if not 0 <= poll_max_us <= 10_000:
        raise ConfigError("poll-max-us: must be between 0 (off) and 10000")
    log_level = _get(data, "log-level", str, "", "info")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log-level: one of {', '.join(LOG_LEVELS)}")
    log_format = _get(data, "log-format", str, "", "text")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"log-format: one of {', '.join(LOG_FORMATS)}")
    exports = tuple(parse_export(table, i) for i, table in
                    enumerate(_get(data, "export", list, "", [])))
    config = ServeConfig(
        listen=listen_addresses, exports=exports, control=_get(data, "control", str, ""),
        metrics=metrics_address, max_connections=max_connections, handshake_timeout=timeout,
        poll_max_us=poll_max_us,
        log_level=log_level, log_format=log_format,
        tls=parse_tls(_get(data, "tls", dict, "", {})),
    )
    config.validate()
    return config


def make_export(*, name: str, image: str, description: str = "", read_only: bool = False,
                max_connections: int = 0, tls_required: bool = False, qdb: str | None = None,
                bitmaps: tuple[BitmapRequest, ...] = (), create: int | None = None,
                scratch_dir: str | None = None, on_cbw_error: str | None = None,
                discard: str | None = None, detect_zeroes: str | None = None,
                offset: int = 0, incoming: str | None = None, force: bool = False,
                cache: str | None = None, where: str = "") -> ExportConfig:
    """The one place an export's settings are checked (the file and the command line
    both come here); ``where`` prefixes the key in messages."""
    if not image:
        raise ConfigError(f"{where}image: required")
    if len(name.encode()) > 4096 or "\0" in name:
        raise ConfigError(f"{where}name: at most 4096 bytes, no NUL")
    if len(description.encode()) > 4096:
        raise ConfigError(f"{where}description: at most 4096 bytes")
    if max_connections < 0:
        raise ConfigError(f"{where}max-connections: must be 0 (unlimited) or more")
    if read_only and bitmaps:
        raise ConfigError(f"{where}bitmaps: a read-only export records no writes")
    if create is not None and (create <= 0 or create % 512):
        raise ConfigError(f"{where}create: the size must be a positive multiple of 512 "
                          f"bytes, not {create}")
    if on_cbw_error is None:
        on_cbw_error = CBW_ERROR_POLICIES[0]
    if on_cbw_error not in CBW_ERROR_POLICIES:
        raise ConfigError(f"{where}on-cbw-error: one of {', '.join(CBW_ERROR_POLICIES)}")
    if scratch_dir is not None and not scratch_dir:
        raise ConfigError(f"{where}scratch-dir: empty path")
    discard = discard or DISCARD_MODES[0]
    if discard not in DISCARD_MODES:
        raise ConfigError(f"{where}discard: one of {', '.join(DISCARD_MODES)}")
    detect_zeroes = detect_zeroes or DETECT_ZEROES_MODES[0]
    if detect_zeroes not in DETECT_ZEROES_MODES:
        raise ConfigError(f"{where}detect-zeroes: one of {', '.join(DETECT_ZEROES_MODES)}")
    if offset < 0 or offset % 512:
        raise ConfigError(f"{where}offset: a multiple of 512 bytes, not {offset}")
    if offset and create is not None:
        raise ConfigError(f"{where}offset: not with create (the image starts the file)")
    if detect_zeroes == "unmap" and discard != "unmap":
        raise ConfigError(f"{where}detect-zeroes: unmap needs discard = unmap (as in QEMU)")
    cache = cache or CACHE_MODES[0]
    if cache not in CACHE_MODES:
        raise ConfigError(f"{where}cache: one of {', '.join(CACHE_MODES)}")
    address = None
    if incoming is not None:
        address = parse_listen(incoming, f"{where}incoming")
        if read_only or offset or create is not None:
            raise ConfigError(f"{where}incoming: not with read-only, offset or create (the "
                              "migration brings the image and its size)")
    return ExportConfig(name=name, image=image, description=description,
                        read_only=read_only, max_connections=max_connections,
                        tls_required=tls_required, qdb=qdb, bitmaps=bitmaps, create=create,
                        scratch_dir=scratch_dir, on_cbw_error=on_cbw_error,
                        discard=discard, detect_zeroes=detect_zeroes, offset=offset,
                        incoming=address, force=force, cache=cache)


def parse_export(table, index: int) -> ExportConfig:
    where = f"export[{index}]."
    if not isinstance(table, dict):
        raise ConfigError(f"export[{index}]: expected a table ([[export]])")
    _check_keys(table, EXPORT_KEYS, f"export[{index}]")
    create = _get(table, "create", (str, int), where)
    if create is not None:
        try:
            create = parse_size(str(create))
        except ValueError as exc:
            raise ConfigError(f"{where}create: {exc}") from None
    bitmaps = tuple(parse_bitmap(value, f"{where}bitmaps[{i}]") for i, value in
                    enumerate(_get(table, "bitmaps", list, where, [])))
    return make_export(
        name=_get(table, "name", str, where, ""), image=_get(table, "image", str, where),
        description=_get(table, "description", str, where, ""),
        read_only=_get(table, "read-only", bool, where, False),
        max_connections=_get(table, "max-connections", int, where, 0),
        tls_required=_get(table, "tls-required", bool, where, False),
        qdb=_get(table, "qdb", str, where), bitmaps=bitmaps, create=create,
        scratch_dir=_get(table, "scratch-dir", str, where),
        on_cbw_error=_get(table, "on-cbw-error", str, where),
        discard=_get(table, "discard", str, where),
        detect_zeroes=_get(table, "detect-zeroes", str, where),
        offset=_size_key(table, "offset", where),
        incoming=_get(table, "incoming", str, where),
        force=_get(table, "force", bool, where, False),
        cache=_get(table, "cache", str, where), where=where,
    )


def _size_key(table: dict, key: str, where: str) -> int:
    value = _get(table, key, (str, int), where, 0)
    try:
        return parse_size(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}{key}: {exc}") from None


def parse_tls(table: dict) -> TlsConfig:
    _check_keys(table, TLS_KEYS, "tls")
    mode = _get(table, "mode", str, "tls.", TLS_OFF)
    if mode not in TLS_MODES:
        raise ConfigError(f"tls.mode: one of {', '.join(TLS_MODES)}")
    subjects = _get(table, "allow-subjects", list, "tls.", [])
    if not all(isinstance(s, str) for s in subjects):
        raise ConfigError("tls.allow-subjects: expected a list of strings")
    return TlsConfig(mode=mode, cert=_get(table, "cert", str, "tls."),
                     key=_get(table, "key", str, "tls."), ca=_get(table, "ca", str, "tls."),
                     verify_client=_get(table, "verify-client", bool, "tls.", False),
                     allow_subjects=tuple(subjects))


def with_overrides(config: ServeConfig, **changes) -> ServeConfig:
    """Command-line options override the file: only the ones given are applied."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
