"""Fixtures that start real servers (nbdserve, qemu-nbd, nbdkit) on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from nbdserve.config import ExportConfig
from nbdserve.export import Export, ExportCatalog
from nbdserve.image import RawImage, filesystem_type
from nbdserve.server.lifecycle import Server
from nbdserve.server.listener import bind_unix

NBDSERVE = [sys.executable, "-m", "nbdserve"]
REQUIRED_TOOLS = ["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy", "nbdsh", "nbdkit",
                  "fio"]


def pytest_configure(config):
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        # Never skip silently: the suite exists to drive these clients.
        raise pytest.UsageError(f"missing client tools {missing}: run scripts/setup.sh")


class ServerProcess:
    """A server started as a child process; stderr is collected for assertions."""

    def __init__(self, argv: list[str], ready: str, env: dict | None = None) -> None:
        self.argv = argv
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self._pattern = re.compile(ready)
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self._pattern.search(line):
                self._ready.set()

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise RuntimeError(f"{self.argv[:3]} exited {self.proc.returncode}:\n"
                                   + "\n".join(self.lines))
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready:\n" + "\n".join(self.lines))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if regex.search(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(2)


class NbdServe(ServerProcess):
    """nbdserve serving one image; `uri` and `port`/`socket` say where."""

    def __init__(self, image: Path, *args: str, unix: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        self.image = image
        self.unix = unix
        argv = [*NBDSERVE, "serve", str(image), *args]
        argv += ["-k", str(unix)] if unix else ["-b", host, "-p", "0"]
        super().__init__(argv, ready=r"ready \(pid")
        try:
            self.wait_ready()
            self.port = None
            self.host = host
            if not unix:
                line = self.wait_for_log(r"serving export .* on ")
                self.port = int(line.rsplit(":", 1)[1])
        except BaseException:
            self.proc.kill()  # never leave a server behind a failed start
            self.proc.wait()
            raise

    def uri(self, export: str = "") -> str:
        if self.unix:
            return f"nbd+unix:///{export}?socket={self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"

    @property
    def qemu_uri(self) -> str:
        """What qemu-img and qemu-io take (they do not know nbd+unix with a path first)."""
        if self.unix:
            return f"nbd+unix:///?socket={self.unix}"
        return f"nbd://{self.host}:{self.port}"

    def client_args(self) -> dict:
        return {"unix": str(self.unix)} if self.unix else {"host": self.host, "port": self.port}


class BlockingFlushExport(Export):
    """An export whose FLUSH waits for the test, to hold a request in flight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.entered = threading.Event()

    def flush(self):
        self.entered.set()
        self.release.wait(10)
        super().flush()

    async def flush_entered(self) -> None:
        assert await asyncio.get_running_loop().run_in_executor(None, self.entered.wait, 5)


@pytest.fixture
async def blocking_flush_server(image: Path, tmp_path: Path):
    """In-process: a Server on a Unix socket whose export's FLUSH blocks until
    `export.release` is set. Yields (server, export, socket path)."""
    export = BlockingFlushExport(ExportConfig("", str(image)), RawImage(str(image)))
    path = str(tmp_path / "inprocess.sock")
    server = Server(ExportCatalog([export]), [bind_unix(path)])
    await server.start()
    yield server, export, path
    export.release.set()
    if not server.connections.stopping:
        await asyncio.wait_for(server.shutdown(), 30)


async def wait_until(condition, timeout: float = 10, what: str = "condition") -> None:
    """Poll an (async or plain) condition until it holds: for states the test can
    only observe, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def tmpfs_dir():
    """A directory on tmpfs (/dev/shm), removed afterwards; skips where there is none."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm.stat().st_dev) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    directory = Path(tempfile.mkdtemp(dir=shm, prefix="nbdserve-test-"))
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 64 MiB sparse raw image."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    return path


def tracebacks(log: str) -> list[str]:
    """The tracebacks and ERROR lines a server logged."""
    return [line for line in log.splitlines() if "Traceback" in line or ": ERROR: " in line]


@pytest.fixture
def start_server(tmp_path: Path, request):
    """Start nbdserve with the given arguments; every server is stopped at the end.

    A test fails if one of its servers logged a traceback or an ERROR line, unless it
    is marked `server_errors_expected` (tests of failures that must be logged)."""
    servers: list[NbdServe] = []

    def start(image: Path, *args: str, unix: bool = True, host: str = "127.0.0.1") -> NbdServe:
        sock = tmp_path / f"nbd{len(servers)}.sock" if unix else None
        server = NbdServe(image, *args, unix=sock, host=host)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.stop(signal.SIGKILL)
    if request.node.get_closest_marker("server_errors_expected") is None:
        for server in servers:
            logged = tracebacks(server.log)
            assert not logged, f"the server logged errors: {logged[:5]}\n{server.log}"


@pytest.fixture
def server(image: Path, start_server) -> NbdServe:
    return start_server(image)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def flagged_ranges(nbd, context: str, flag: int = 1) -> list[tuple[int, int]]:
    """Walk BLOCK_STATUS over the whole export with our client: (offset, length) of
    every run of extents with ``flag`` set (NBD_STATE_DIRTY for bitmaps), merged."""
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < nbd.size:
        for length, flags in (await nbd.block_status(offset, nbd.size - offset))[context]:
            if flags & flag:
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((offset, length))
            offset += length
    return ranges


def run(*argv: str, check: bool = True, timeout: float = 120,
        **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{argv} exited {result.returncode}\nstdout: {result.stdout}\n"
                             f"stderr: {result.stderr}")
    return result


NBDSH = ["/usr/bin/python3", "-m", "nbd"]  # nbdsh: Debian installs libnbd's bindings
# for its own python3 only, and the nbdsh script runs whichever python3 is first on PATH.


def nbdsh(uri: str, script: str, contexts: tuple[str, ...] = ()) -> str:
    """Run a script in nbdsh with `h` connected to uri (after adding meta contexts)."""
    prologue = "".join(f"h.add_meta_context({name!r})\n" for name in contexts)
    prologue += f"h.connect_uri({uri!r})\n"
    return run(*NBDSH, "-c", prologue + textwrap.dedent(script)).stdout


@pytest.fixture
def peer_server(tmp_path: Path):
    """Start qemu-nbd or nbdkit on a copy of an image, on a Unix socket."""
    procs: list[subprocess.Popen] = []

    def start(kind: str, image: Path) -> str:
        sock = tmp_path / f"{kind}.sock"
        if kind == "qemu-nbd":
            argv = ["qemu-nbd", "-f", "raw", "-k", str(sock), "-e", "4", "-t", str(image)]
        else:
            argv = ["nbdkit", "-f", "-U", str(sock), "file", str(image)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{kind} did not start")
            time.sleep(0.05)
        return str(sock)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)
