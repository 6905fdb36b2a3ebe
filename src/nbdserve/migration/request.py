"""migrate-start's arguments, checked once (the control socket's edge)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from nbdserve.config import ConfigError, ListenAddress, parse_listen
from nbdserve.migration.source import DEFAULT_MAX_DOWNTIME_MS, MigrationError
from nbdserve.tls import TLS_OFF, TlsConfig


@dataclass(frozen=True)
class MigrationRequest:
    address: ListenAddress
    export: str | None
    max_downtime_ms: int
    bandwidth: int
    ssl_context: ssl.SSLContext | None  # the channel's
    forward_tls: ssl.SSLContext | None  # forwarded NBD requests'
    tls_hostname: str | None = None  # the name the target's certificate must carry

    @classmethod
    def from_arguments(cls, arguments: dict, tls: TlsConfig) -> MigrationRequest:
        """{"uri": "HOST:PORT" or "unix:PATH", "export", "max-downtime" (ms),
        "bandwidth" (bytes/s), "plain", "tls-hostname"}. Over TCP the channel uses
        TLS when this server has certificates; plain TCP only with "plain"."""
        known = {"uri", "export", "max-downtime", "bandwidth", "plain", "tls-hostname"}
        unknown = set(arguments) - known
        if unknown:
            raise MigrationError(f"unknown arguments: {', '.join(sorted(unknown))}")
        uri = arguments.get("uri")
        try:
            address = parse_listen(uri, "uri")
        except ConfigError as exc:
            raise MigrationError(str(exc)) from None
        if address.path is None and not address.port:
            raise MigrationError("uri: the target's port is needed")
        export = arguments.get("export")
        if export is not None and not isinstance(export, str):
            raise MigrationError("\"export\" must be an export name")
        max_downtime = arguments.get("max-downtime", DEFAULT_MAX_DOWNTIME_MS)
        bandwidth = arguments.get("bandwidth", 0)
        for key, value in (("max-downtime", max_downtime), ("bandwidth", bandwidth)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MigrationError(f"\"{key}\" must be a whole number, 0 or more")
        if max_downtime < 1:
            raise MigrationError("\"max-downtime\" must be at least 1 ms")
        plain = arguments.get("plain", False)
        hostname = arguments.get("tls-hostname")
        if not isinstance(plain, bool) or hostname is not None and not isinstance(hostname, str):
            raise MigrationError("\"plain\" is true or false; \"tls-hostname\" a name")
        secure = tls.mode != TLS_OFF and not plain
        if address.path is None and not secure and not plain:
            raise MigrationError("this server has no TLS certificates: to migrate over "
                                 "plain TCP, say so (--plain)")
        context = forward = None
        if secure:
            try:
                context = tls.client_context(check_hostname=address.path is None)
                forward = tls.client_context(check_hostname=address.path is None)
            except (OSError, ssl.SSLError) as exc:
                raise MigrationError(f"TLS: {exc}") from None
        return cls(address, export, max_downtime, bandwidth, context, forward, hostname)

