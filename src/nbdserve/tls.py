"""TLS configuration: X.509 certificates, client authentication, allowed subjects.

TLS-PSK is not offered: Python 3.11's ssl module has no server-side PSK callback
(docs/tls.md says what to do instead). The mode and credentials are kept apart from
the context so that a PSK variant can be added when the runtime supports it.
"""

from __future__ import annotations

import fnmatch
import re
import ssl
from dataclasses import dataclass, field

TLS_OFF = "off"
TLS_OPTIONAL = "optional"
TLS_REQUIRE = "require"
TLS_MODES = (TLS_OFF, TLS_OPTIONAL, TLS_REQUIRE)


class TlsConfigError(Exception):
    """The TLS settings cannot work; the message is for the operator."""


@dataclass(frozen=True)
class TlsConfig:
    mode: str = TLS_OFF
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    verify_client: bool = False
    allow_subjects: tuple[str, ...] = field(default_factory=tuple)

    def validate(self) -> None:
        if self.mode not in TLS_MODES:
            raise TlsConfigError(f"--tls must be one of {', '.join(TLS_MODES)}")
        if self.mode == TLS_OFF:
            if self.cert or self.key or self.verify_client or self.allow_subjects:
                raise TlsConfigError("TLS options given, but --tls is off")
            return
        if not self.cert or not self.key:
            raise TlsConfigError("--tls needs --tls-cert and --tls-key")
        if (self.verify_client or self.allow_subjects) and not self.ca:
            raise TlsConfigError("client verification needs --tls-ca")

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # Each file on its own first, so the message names the one that is wrong.
        for option, path in (("--tls-cert", self.cert), ("--tls-ca", self.ca)):
            if path:
                try:
                    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
                        cafile=path)
                except (OSError, ssl.SSLError) as exc:
                    raise TlsConfigError(f"{option} {path}: not a readable PEM certificate "
                                         f"({_reason(exc)})") from None
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.ca:
                context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"--tls-key {self.key}: not a readable PEM private key for "
                                 f"the certificate {self.cert} ({_reason(exc)})") from None
        if self.verify_client or self.allow_subjects:
            context.verify_mode = ssl.CERT_REQUIRED
        return context


    def client_context(self, check_hostname: bool = True) -> ssl.SSLContext:
        """For this server as a client of another nbdserve (a migration's channel and
        forwarded requests): its own certificate to present, and the CA (else the
        system's) to check the peer's."""
        context = ssl.create_default_context(cafile=self.ca)
        context.check_hostname = check_hostname
        if self.cert and self.key:
            context.load_cert_chain(self.cert, self.key)
        return context


def subject_string(peercert: dict | None) -> str:
    """The certificate subject as an RFC 4514 string, most specific first
    ("CN=client,O=Example,C=GB"), the form QEMU's tls-authz lists use."""
    if not peercert:
        return ""
    parts = []
    for rdn in reversed(peercert.get("subject", ())):
        parts.append("+".join(f"{_SHORT_NAMES.get(key, key)}={value}" for key, value in rdn))
    return ",".join(parts)


def subject_allowed(subject: str, patterns: tuple[str, ...]) -> bool:
    """No patterns: anyone with a valid certificate (when one is required)."""
    return not patterns or any(fnmatch.fnmatchcase(subject, p) for p in patterns)


_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "emailAddress": "emailAddress",
    "domainComponent": "DC",
}


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.strerror:
        return exc.strerror
    text = getattr(exc, "reason", None) or str(exc)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text)  # OpenSSL's source line is noise
