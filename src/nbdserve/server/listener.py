"""Listening sockets: TCP (IPv4 and IPv6) and Unix, created or inherited."""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from nbdserve.config import ListenAddress
from nbdserve.values import DEFAULT_HOST, DEFAULT_PORT


class ListenError(Exception):
    """A listening socket could not be set up; the message is for the operator."""


def bind_tcp(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    except OSError:
        sock.close()
        raise
    return _listen(sock, address, f"{host}:{port}")


def _listen(sock: socket.socket, address, where: str) -> socket.socket:
    """Bind and listen, non-blocking; the socket is closed if that fails."""
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {where}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def bind_unix(path: str) -> socket.socket:
    """Listen on a Unix socket, replacing a stale one but never one in use."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left behind by a crashed run
        except OSError as exc:
            raise ListenError(f"cannot check existing socket {path}: {exc.strerror}") from None
        else:
            raise ListenError(f"{path} is in use by a running server")
        finally:
            probe.close()
    return _listen(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path, path)


def bind(address: ListenAddress) -> socket.socket:
    if address.path is not None:
        return bind_unix(address.path)
    return bind_tcp(address.host or DEFAULT_HOST,
                    address.port if address.port is not None else DEFAULT_PORT)


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"
