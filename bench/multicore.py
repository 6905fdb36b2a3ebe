"""Prototype: one read-only export served by several worker processes that share one
listening socket (each accepts connections and serves them on its own event loop).

    .venv/bin/python bench/multicore.py [--seconds 5] [--rounds 3]

No bitmaps, snapshots or migration: those need shared state (docs/performance.md,
"Beyond one core"). What this measures is the rest of the design: how much a busy
export with several connections gains from a second process, and what each request
costs in CPU, against one process, with the same clients (4 connections each).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the peers' harness: fio, timed, CPU of a process tree)


def worker(listener, image: str) -> None:
    """A child: serve the export on the inherited socket until SIGTERM."""
    import uvloop

    from nbdserve.config import ExportConfig
    from nbdserve.export import Export, ExportCatalog
    from nbdserve.image import RawImage
    from nbdserve.server.lifecycle import Server

    async def serve() -> None:
        export = Export(ExportConfig("", image, read_only=True), RawImage(image, read_only=True))
        server = Server(ExportCatalog([export]), [listener])
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.shutdown()

    uvloop.run(serve())


class Workers:
    """N worker processes on one Unix socket (forked, so they share the listener)."""

    def __init__(self, count: int, image: str, path: str) -> None:
        from nbdserve.server.listener import bind_unix
        self.listener = bind_unix(path)
        self.pids = []
        for _ in range(count):
            pid = os.fork()
            if pid == 0:
                try:
                    worker(self.listener, image)
                finally:
                    os._exit(0)
            self.pids.append(pid)
        self.uri = f"nbd+unix:///?socket={path}"
        deadline = time.monotonic() + 20
        while True:
            try:
                bench.run(["nbdinfo", "--size", self.uri])
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:13]) / bench.CLK_TCK
        return total

    def stop(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGTERM)
        for pid in self.pids:
            os.waitpid(pid, 0)
        self.listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = HERE / "work"
    image = workdir / "random-1g.raw"
    if not image.exists():
        bench.prepare_images(workdir)
    sockets = Path(tempfile.mkdtemp(prefix="nbdmulticore-"))
    counts = (1, 2)
    pools = {n: Workers(n, str(image), str(sockets / f"w{n}.sock")) for n in counts}
    workloads = {
        "4k randread qd16, 4 connections": (
            lambda uri: bench.fio(uri, "randread", "4k", 16, args.seconds,
                                  extra=["--numjobs=4", "--group_reporting"]),
            lambda iops: iops * (args.seconds + bench.RAMP), "IOPS"),
        "nbdcopy 1 GiB to null:, 4 connections": (
            lambda uri: bench.GiB / bench.timed(["nbdcopy", "--connections=4", uri,
                                                 "null:"]) / 1e9,
            lambda rate: bench.GiB // (256 << 10), "GB/s"),
    }
    try:
        for pool in pools.values():  # warm up: the first run of a process is slower
            bench.fio(pool.uri, "randread", "4k", 16, 1, extra=["--numjobs=4"])
        for name, (measure, units, unit) in workloads.items():
            values = {n: [] for n in counts}
            cpu = {n: [] for n in counts}
            for index in range(args.rounds):
                for n in (counts if index % 2 == 0 else counts[::-1]):
                    before = pools[n].cpu_seconds()
                    value = measure(pools[n].uri)
                    values[n].append(value)
                    cpu[n].append((pools[n].cpu_seconds() - before) / units(value) * 1e6)
            ratio = statistics.median(b / a for a, b in zip(values[1], values[2],
                                                             strict=True))
            print(f"{name}: " + ", ".join(
                f"{n} process{'es' if n > 1 else ''} {statistics.median(values[n]):.4g} {unit}"
                f" ({statistics.median(cpu[n]):.3g} us CPU per request)" for n in counts)
                + f"; 2 vs 1: {ratio:.2f}x")
    finally:
        for pool in pools.values():
            pool.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
