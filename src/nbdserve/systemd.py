"""systemd integration without libsystemd: readiness notification (sd_notify) and
socket activation (LISTEN_FDS), both small documented protocols (sd_notify(3),
sd_listen_fds(3))."""

from __future__ import annotations

import os
import socket

SD_LISTEN_FDS_START = 3


def enabled() -> bool:
    """Whether a service manager listens for notify() messages."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*states: str) -> bool:
    """Send "READY=1", "STATUS=...", "STOPPING=1", ... to the service manager, if any."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


SLOW_BYTES_PER_SECOND = 50 << 20  # a slow disk's pace, for reading or writing bitmaps


def ask_for_time(status: str, size: int) -> bool:
    """Before long work on size bytes (loading or saving bitmaps): STATUS=status, and
    EXTEND_TIMEOUT_USEC for it at a slow disk's pace plus 30 s, so the service manager
    does not kill a slow start or stop midway."""
    seconds = 30 + size / SLOW_BYTES_PER_SECOND
    return notify(f"STATUS={status}", f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


def listen_fds() -> list[socket.socket]:
    """The listening sockets passed by systemd (or systemd-socket-activate), if they are
    meant for this process; the variables are then removed so children do not inherit
    them."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)  # family and type are read from the descriptor
        sock.setblocking(False)
        sockets.append(sock)
    return sockets
