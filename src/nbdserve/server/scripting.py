"""Running the server from a script (qemu-nbd's --fork and --pid-file, nbdkit's --run,
-U - and --exit-with-parent, qemu-nbd's one-shot mode).

What happens once the server accepts connections (``Ready.arrived``): the pid file is
written, a forking parent hears the addresses and exits, and a ``--run`` command starts
with the addresses in its environment; the server then stops when it exits, and exits
with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import stat
import tempfile
import urllib.parse
from dataclasses import dataclass

log = logging.getLogger("nbdserve.server")

PR_SET_PDEATHSIG = 1


def exit_with_parent() -> None:
    """SIGTERM when the parent process dies (prctl PR_SET_PDEATHSIG): a graceful stop."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:  # the parent died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def private_socket() -> tuple[str, str]:
    """`-U -`: a socket in a new private directory; (socket path, directory)."""
    directory = tempfile.mkdtemp(prefix="nbdserve-")
    return os.path.join(directory, "nbd.sock"), directory


def remove_private_directory(directory: str | None) -> None:
    if directory:
        shutil.rmtree(directory, ignore_errors=True)


def uri_of(listen: str, export: str) -> str:
    """The NBD URI of a listener as Server.describe names it ("unix:PATH", "HOST:PORT")."""
    name = urllib.parse.quote(export)
    if listen.startswith("unix:"):
        return f"nbd+unix:///{name}?socket={urllib.parse.quote(listen[5:], safe='/')}"
    return f"nbd://{listen}/{name}"


def environment(listen: list[str], export: str) -> dict[str, str]:
    """What a --run command gets, as nbdkit sets it."""
    env = {"uri": uri_of(listen[0], export), "exportname": export}
    env["nbd"] = env["uri"]
    for entry in listen:
        if entry.startswith("unix:"):
            env.setdefault("unixsocket", entry[5:])
        else:
            host, _, port = entry.rpartition(":")
            env.setdefault("port", port)
            env.setdefault("host", host.strip("[]"))
    return env


@dataclass
class Ready:
    """What to do once the server accepts connections."""

    export: str = ""  # the export a --run command and a forking parent are told about
    pid_file: str | None = None
    notify_fd: int = -1  # --fork: the parent waits on the other end of this pipe
    run: str | None = None  # --run COMMAND
    process: asyncio.subprocess.Process | None = None

    async def arrived(self, listen: list[str], stop) -> None:
        if self.pid_file:
            write_pid_file(self.pid_file)
        if self.notify_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.notify_fd, "".join(uri_of(entry, self.export) + "\n"
                                                 for entry in listen).encode())
            os.close(self.notify_fd)
            self.notify_fd = -1
            # Started in the background: keep logging to stderr only if it is a file
            # (2>>LOG). A terminal or a pipe is let go, or a script's $(nbdserve serve
            # --fork ...) would wait for the server to exit.
            if not stat.S_ISREG(os.fstat(2).st_mode):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
        if self.run is not None:
            self.process = await asyncio.create_subprocess_shell(
                self.run, env={**os.environ, **environment(listen, self.export)})
            asyncio.get_running_loop().create_task(self._wait_for_command(stop))

    async def _wait_for_command(self, stop) -> None:
        status = await self.process.wait()
        log.info("--run command exited with status %d; stopping", status)
        stop(status if status >= 0 else 128 - status)

    def finish(self) -> None:
        """At exit: the command hears SIGTERM if it still runs; the pid file goes."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
        if self.pid_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pid_file)


def write_pid_file(path: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(temporary, path)  # a reader never sees an empty or partial file


def fork() -> int:
    """--fork, after the listeners are bound and the exports open. In the child: a new
    session, stdin from /dev/null, and the write end of the readiness pipe returned
    (Ready.notify_fd). The parent never returns: it prints what the child writes there
    (its URIs) and exits 0, or exits 1 if the child died first (its stderr said why)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)  # the parent prints the URIs
        os.close(devnull)
        return write_fd
    os.close(write_fd)
    chunks = []
    while data := os.read(read_fd, 4096):
        chunks.append(data)
    if not chunks:
        os.waitpid(pid, 0)
        os._exit(1)
    os.write(1, b"".join(chunks))
    # os._exit: nothing of the parent's clean-up may run, the sockets are the child's.
    os._exit(0)
