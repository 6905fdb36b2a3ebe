"""Benchmark nbdserve against qemu-nbd and nbdkit, side by side, in one run.

    .venv/bin/python bench/run.py            # quick mode (about 3 minutes)
    .venv/bin/python bench/run.py --full     # longer runs, more rounds
    .venv/bin/python bench/run.py --tcp      # loopback TCP instead of Unix sockets

Every server gets a private copy of the same images. Rounds are interleaved (A B C,
then C B A, ...), ratios are taken pair by pair within a round, and the median and
range of each figure are reported with each server's CPU time per unit of work and peak
RSS, and the client's CPU time per unit beside it. Results go to stdout as a table and
to bench/results/DATE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GiB = 1 << 30
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd lives there


# -- servers ------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    argv: list[str]
    uri: str
    address: str  # socket path or host:port, for readiness
    proc: subprocess.Popen | None = None
    cpu: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.argv}")
            time.sleep(0.05)

    def ready(self) -> bool:
        try:
            if self.address.startswith("/"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.address)
            else:
                host, port = self.address.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return False

    def cpu_seconds(self, user_only: bool = False) -> float:
        """User + system CPU of the server and its children (reaped ones included), or
        their user CPU alone."""
        total = 0.0
        pids = [self.proc.pid] + _children(self.proc.pid)
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                counted = (fields[11], fields[13]) if user_only else fields[11:15]
                total += sum(int(v) for v in counted) / CLK_TCK
            except (OSError, IndexError):
                pass
        return total

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


QEMU10 = ROOT / ".venv" / "qemu-10" / "usr" / "bin"  # scripts/setup.sh unpacks it there
# Every server measured by the main workloads (qemu-nbd 10 where setup unpacked it).
PEERS = ("nbdserve", "qemu-nbd", "qemu-nbd-10", "nbdkit") if (QEMU10 / "qemu-nbd").exists() \
    else ("nbdserve", "qemu-nbd", "nbdkit")


def make_servers(kind_images: dict[str, Path], workdir: Path, tcp: bool,
                 nbdserve_args: list[str] = (), names=("nbdserve", "qemu-nbd", "nbdkit"),
                 tag: str = "") -> list[Server]:
    servers = []
    for name in names:
        image = kind_images[name]
        if tcp:
            port = _free_port()
            address, listen = f"127.0.0.1:{port}", ["127.0.0.1", str(port)]
            uri = f"nbd://127.0.0.1:{port}/"
        else:
            path = str(workdir / f"{name}{tag}.sock")
            address, uri = path, f"nbd+unix:///?socket={path}"
        if name == "nbdserve":
            where = ["-b", listen[0], "-p", listen[1]] if tcp else ["-k", address]
            argv = [str(ROOT / ".venv/bin/nbdserve"), "serve", str(image), *where,
                    *nbdserve_args]
        elif name in ("qemu-nbd", "qemu-nbd-10"):
            where = ["-b", listen[0], "-p", listen[1]] if tcp else ["-k", address]
            binary = "qemu-nbd" if name == "qemu-nbd" else str(QEMU10 / "qemu-nbd")
            argv = [binary, "-f", "raw", "-t", "-e", "0", *where, str(image)]  # unlimited
        else:
            where = ["-i", listen[0], "-p", listen[1]] if tcp else ["-U", address]
            argv = ["nbdkit", "-f", *where, "file", str(image)]
        servers.append(Server(name, argv, uri, address))
    return servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- workloads ----------------------------------------------------------------------------

def run(argv: list[str], timeout: float = 600) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def fio(uri: str, rw: str, bs: str, depth: int, seconds: float, size: str = "1G",
        extra: list[str] = ()) -> float:
    """IOPS (bs 4k, or trims) or MB/s (other writes) from fio's nbd engine."""
    out = run(["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
               f"--bs={bs}", f"--iodepth={depth}", f"--size={size}", "--time_based",
               f"--runtime={seconds}", "--ramp_time=0.5", "--output-format=json", *extra])
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["trim"] if "trim" in rw else job["write"]
    return side["iops"] if bs == "4k" or "trim" in rw else side["bw_bytes"] / 1e6


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    run(argv)
    return time.perf_counter() - start


def handshakes(uri: str, seconds: float) -> float:
    script = (
        "import nbd, sys, time\n"
        "uri, seconds = sys.argv[1], float(sys.argv[2])\n"
        "n, end = 0, time.perf_counter() + seconds\n"
        "start = time.perf_counter()\n"
        "while time.perf_counter() < end:\n"
        "    h = nbd.NBD(); h.connect_uri(uri); h.shutdown(); del h; n += 1\n"
        "print(n / (time.perf_counter() - start))\n"
    )
    return float(run([SYSTEM_PYTHON, "-c", script, uri, str(seconds)]))


@dataclass
class Workload:
    name: str
    unit: str
    higher_is_better: bool
    measure: object  # callable(server) -> value
    work: object  # units of work per run (a number, or callable(value) -> number)...
    work_unit: str  # ...and what a unit is, for the server's CPU time per unit

    def units(self, value: float) -> float:
        return self.work(value) if callable(self.work) else self.work


RAMP = 0.5  # fio's ramp time: its requests cost CPU but are not in its rate


def workloads(args, images: dict[str, Path]) -> list[Workload]:
    secs = args.seconds
    source = images["source"]

    def requests(iops: float) -> float:  # fio's requests in a run, the ramp included
        return iops * (secs + RAMP)

    def megabytes(rate: float) -> float:  # fio's MB in a run, as requests of 1 MiB
        return rate * (secs + RAMP) / (MiB / 1e6)

    return [
        Workload("nbdcopy 1 GiB to null:", "GB/s", True,
                 lambda s: GiB / timed(["nbdcopy", s.uri, "null:"]) / 1e9, 1, "GiB"),
        Workload("nbdcopy 1 GiB from a file", "GB/s", True,
                 lambda s: GiB / timed(["nbdcopy", str(source), s.uri]) / 1e9, 1, "GiB"),
        Workload("fio 4k randread qd16", "IOPS", True,
                 lambda s: fio(s.uri, "randread", "4k", 16, secs), requests, "request"),
        Workload("fio 4k randread qd1", "IOPS", True,
                 lambda s: fio(s.uri, "randread", "4k", 1, secs), requests, "request"),
        Workload("fio 4k randwrite qd16", "IOPS", True,
                 lambda s: fio(s.uri, "randwrite", "4k", 16, secs), requests, "request"),
        Workload("fio 4k randwrite qd1", "IOPS", True,
                 lambda s: fio(s.uri, "randwrite", "4k", 1, secs), requests, "request"),
        Workload("fio 1M seq read qd4", "MB/s", True,
                 lambda s: fio(s.uri, "read", "1m", 4, secs), megabytes, "request"),
        Workload("fio 1M seq write qd4", "MB/s", True,
                 lambda s: fio(s.uri, "write", "1m", 4, secs), megabytes, "request"),
        Workload("handshakes", "conn/s", True, lambda s: handshakes(s.uri, secs),
                 lambda rate: rate * secs, "connection"),
    ]


# -- images -------------------------------------------------------------------------------

def memory_dir(wanted: str | None, workdir: Path) -> tuple[Path, bool]:
    """Where the 1 GiB images the workloads write go, and whether it is ours to
    remove. On a disk, a 4 KiB write's cost depends on the kernel's writeback of the
    page cache (whether the page is clean, under writeback, or the device is being
    flushed): nbdkit's random writes moved between 12k and 57k IOPS on one file. A
    tmpfs has no writeback, so the figures measure the servers."""
    if wanted is not None:
        return (Path(wanted) if wanted else workdir), False
    shm = Path("/dev/shm")
    need = (len(PEERS) + 4) * GiB  # the peers' copies, the tracking section's, slack
    if shm.is_dir() and filesystem_of(shm) == "tmpfs" \
            and shutil.disk_usage(shm).free > need \
            and meminfo_bytes("MemAvailable") > need + 4 * GiB:
        return Path(tempfile.mkdtemp(dir=shm, prefix="nbdbench-")), True
    print("no tmpfs with room: images written to go in the workdir, and write figures "
          "depend on the kernel's writeback", file=sys.stderr)
    return workdir, False


def filesystem_of(path: Path) -> str:
    from nbdserve.image import filesystem_type

    return filesystem_type(path.stat().st_dev)


def meminfo_bytes(name: str) -> int:
    """A /proc/meminfo figure (MemTotal, MemAvailable) in bytes; 0 if missing."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def prepare_images(workdir: Path, memdir: Path) -> dict[str, Path]:
    for stale in workdir.glob("*.qdb*"):
        stale.unlink()  # bitmaps left by an interrupted run would add tracking costs
    random_image = workdir / "random-1g.raw"
    if not random_image.exists() or random_image.stat().st_size != GiB:
        with open(random_image, "wb") as f:
            for _ in range(GiB // (64 * MiB)):
                f.write(os.urandom(64 * MiB))
    sparse = workdir / "sparse-64g.raw"
    if not sparse.exists():
        rng = random.Random(1)
        with open(sparse, "wb") as f:
            f.truncate(64 * GiB)
            for i in range(10000):  # about 10,000 allocated extents
                f.seek(i * (64 * GiB // 10000) + rng.randrange(0, 1 << 20) // 4096 * 4096)
                f.write(os.urandom(4096 * rng.randint(1, 8)))
    images = {"source": random_image}
    for name in PEERS:
        copy = memdir / f"{name}-1g.raw"
        shutil.copyfile(random_image, copy)
        images[name] = copy
        sparse_copy = workdir / f"{name}-sparse.raw"
        run(["cp", "--sparse=always", str(sparse), str(sparse_copy)])
        images[f"{name}-sparse"] = sparse_copy
    # Warm the page cache, as the figures assume.
    for path in images.values():
        if path.stat().st_size <= GiB:
            with open(path, "rb") as f:
                while f.read(16 * MiB):
                    pass
    return images


BIG_IMAGE_SIZE = (16 << 40) - 65536  # ext4's limit is one block short of 16 TiB


def prepare_dirty_bitmap_image(workdir: Path) -> Path:
    """A 16 TiB (less 64 KiB) sparse image with a 64 KiB bitmap of 1,000,000 dirty
    granules."""
    from nbdserve.bitmaps.bitmap import Bitmap
    from nbdserve.bitmaps.qdb import ImageIdentity, QdbContents, StoredBitmap, write_qdb
    image = workdir / "sparse-16t.raw"
    for stale in workdir.glob("sparse-16t.raw.qdb*"):
        stale.unlink()
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(BIG_IMAGE_SIZE)
    st = image.stat()
    bitmap = Bitmap(BIG_IMAGE_SIZE, 16)  # 64 KiB granules
    rng = random.Random(2)
    for granule in rng.sample(range(len(bitmap)), 1_000_000):
        bitmap.set_granules(granule, granule + 1)
    write_qdb(str(image) + ".qdb", QdbContents(
        identity=ImageIdentity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev),
        bitmaps=[StoredBitmap("backup", 16, 1, False, False, bitmap.bits)]))
    return image


# -- running ------------------------------------------------------------------------------

def interleaved(servers: list[Server], rounds: int):
    for index in range(rounds):
        yield index, servers if index % 2 == 0 else list(reversed(servers))


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children: the clients a workload
    runs (fio, nbdcopy, the handshake loop) and everything they waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(workload: Workload, servers: list[Server], rounds: int) -> dict:
    """Each server's figure in every round, with the server's CPU time per unit of
    work and the client's. The client shares this machine's cores with the server, so
    what the two spend together says how near the machine's limit a rate is; the
    client's figure includes its start-up (for the handshake loop, about 1 µs per
    connection)."""
    values: dict[str, list[float]] = {s.name: [] for s in servers}
    cpu: dict[str, list[float]] = {s.name: [] for s in servers}
    per_unit: dict[str, list[float]] = {s.name: [] for s in servers}
    client_per_unit: dict[str, list[float]] = {s.name: [] for s in servers}
    for _, order in interleaved(servers, rounds):
        for server in order:
            before, client_before = server.cpu_seconds(), children_cpu_seconds()
            value = workload.measure(server)
            used = server.cpu_seconds() - before
            client = children_cpu_seconds() - client_before
            units = workload.units(value) if value else 0.0
            values[server.name].append(value)
            cpu[server.name].append(used)
            per_unit[server.name].append(used / units if units else 0.0)
            client_per_unit[server.name].append(client / units if units else 0.0)
    result = summarise(workload.name, workload.unit, workload.higher_is_better, values, cpu)
    result["cpu_unit"] = workload.work_unit
    for name, runs in per_unit.items():
        result["servers"][name]["cpu_per_unit_us"] = statistics.median(runs) * 1e6
        result["servers"][name]["client_cpu_per_unit_us"] = \
            statistics.median(client_per_unit[name]) * 1e6
    return result


def summarise(name, unit, higher_is_better, values, cpu) -> dict:
    """Medians and ranges per server, and nbdserve's ratio to each peer, pair by pair
    within a round. The best peer is one peer per workload, the one with the best
    median: taking the best of the peers' draws in each round instead would pit one
    draw of ours against the luckiest of two or three, which favours the peers
    wherever they are close together (qemu-nbd 7.2 and 10, say)."""
    result = {"workload": name, "unit": unit, "higher_is_better": higher_is_better,
              "servers": {}, "ratios": {}}
    for server, runs in values.items():
        result["servers"][server] = {
            "median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "runs": runs, "cpu_seconds": statistics.median(cpu[server]) if cpu else None,
        }
    ours = values.get("nbdserve")
    peers = {peer: runs for peer, runs in values.items() if peer != "nbdserve"}
    if ours and len(peers) > 1:
        pick = max if higher_is_better else min
        leader = pick(peers, key=lambda peer: statistics.median(peers[peer]))
        peers["best peer"] = peers[leader]
        result["best_peer"] = leader
    for peer, runs in peers.items():
        if not ours:
            continue
        pairs = [(a / b if higher_is_better else b / a) for a, b in zip(ours, runs,
                                                                        strict=True) if b and a]
        if pairs:
            result["ratios"][peer] = {"median": statistics.median(pairs), "min": min(pairs),
                                      "max": max(pairs)}
    return result


def machine() -> dict:
    def version(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "kernel": platform.release(),
            "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(meminfo_bytes("MemTotal") / GiB, 1),
            "python": platform.python_version(),
            "qemu-nbd": version(["qemu-nbd", "--version"]),
            "nbdkit": version(["nbdkit", "--version"]),
            "libnbd": version(["nbdinfo", "--version"]), "fio": version(["fio", "--version"]),
            # Which nbdserve ran: the checkout's commit, and a PYTHONPATH that would put
            # other code first (an A/B of two commits runs one of them that way).
            "nbdserve": version(["git", "-C", str(ROOT), "describe", "--always", "--dirty"]),
            **({"pythonpath": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH")
               else {})}


def _per_server(result: dict, names: tuple[str, ...], key: str) -> str:
    """One figure of each server, "-" where a server has none."""
    servers = result["servers"]
    return " / ".join(f"{servers[n][key]:.4g}" if key in servers.get(n, {}) else "-"
                      for n in names)


def print_table(results: list[dict]) -> None:
    names = ("nbdserve", "qemu-nbd", "qemu-nbd-10", "nbdkit")
    header = f"{'workload':40} {'unit':7}" + "".join(f" {n:>11}" for n in names) + \
        f" {'vs best':>8} {'(range)':>11} {'best peer':>11}   CPU per unit (us), server" + \
        " | client: " + " / ".join(names)
    print(header)
    print("-" * len(header))
    for r in results:
        if "servers" not in r:  # a record, not a comparison
            print(f"{r['workload'][:40]:40} {r['unit']:7} {json.dumps(r['runs'])}")
            continue
        if "cpu_cost" in r:  # nbdserve alone at a fixed rate: CPU per request
            parts = [f"{label} {r['servers'][label]['median']:.3g}"
                     + (f" ({r['cpu_cost'][label] * 100:+.1f} %)" if r["cpu_cost"][label]
                        else "")
                     + (f" [user {r['user_cpu_us'][label]:.3g}]" if "user_cpu_us" in r
                        else "") for label in r["servers"]]
            print(f"{r['workload'][:40]:40} {r['unit']:7} " + ", ".join(parts))
            continue
        if "cost" in r:  # nbdserve alone, in variants (bitmaps, snapshots)
            parts = [f"{label} {r['servers'][label]['median']:.4g}"
                     + (f" ({-r['cost'][label] * 100:+.1f} %)" if r["cost"][label] else "")
                     + (f" [{r['servers'][label]['cpu_per_unit_us']:.3g} us CPU]"
                        if "cpu_per_unit_us" in r["servers"][label] else "")
                     for label in r["servers"]]
            print(f"{r['workload'][:40]:40} {r['unit']:7} " + ", ".join(parts))
            continue
        cells = "".join(f" {r['servers'][n]['median']:11.4g}" if n in r["servers"]
                        else f" {'-':>11}" for n in names)
        ratios = r["ratios"]
        best = ratios.get("best peer") or next(iter(ratios.values()), None)
        ratio = f" {best['median']:7.2f}x {best['min']:5.2f}-{best['max']:<5.2f}" if best \
            else f" {'-':>8} {'':11}"
        ratio += f" {r.get('best_peer', '-'):>11}"
        cpu = _per_server(r, names, "cpu_per_unit_us")
        if any("client_cpu_per_unit_us" in r["servers"].get(n, {}) for n in names):
            cpu += " | " + _per_server(r, names, "client_cpu_per_unit_us")
        unit = f" per {r['cpu_unit']}" if "cpu_unit" in r else ""
        print(f"{r['workload'][:40]:40} {r['unit']:7}{cells}{ratio}   {cpu}{unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="longer runs, 4 rounds")
    parser.add_argument("--tcp", action="store_true", help="loopback TCP, not Unix sockets")
    parser.add_argument("--only", help="run only workloads whose name contains this")
    parser.add_argument("--main", action="store_true",
                        help="only the workloads against the peers, no later sections")
    parser.add_argument("--workdir", default=str(HERE / "work"),
                        help="where the source and the sparse (map) images go: a disk, "
                             "as users map theirs (not tmpfs, whose SEEK_HOLE walks pages)")
    parser.add_argument("--memdir", default=None,
                        help="where the 1 GiB images that workloads write go (default: a "
                             "directory made on /dev/shm when it is a tmpfs with room, so "
                             "write figures do not depend on the kernel's writeback; an "
                             "empty string puts them in the workdir)")
    args = parser.parse_args()
    args.seconds = 5 if args.full else 2
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sockets = Path(tempfile.mkdtemp(prefix="nbdbench-"))
    memdir, made = memory_dir(args.memdir, workdir)
    args.memdir = memdir
    print(f"preparing images in {workdir} and {memdir} ...", file=sys.stderr)
    try:
        return run_all(args, workdir, memdir, sockets)
    finally:
        if made:
            shutil.rmtree(memdir, ignore_errors=True)


def run_all(args, workdir: Path, memdir: Path, sockets: Path) -> int:
    rounds = 4 if args.full else 2
    images = prepare_images(workdir, memdir)
    results = []
    servers = make_servers({n: images[n] for n in PEERS}, sockets, args.tcp, names=PEERS)
    sparse = make_servers({n: images[f"{n}-sparse"] for n in PEERS}, sockets, args.tcp,
                          names=PEERS, tag="-sparse")
    try:
        for server in servers + sparse:
            server.start()
        for workload in workloads(args, images):
            if args.only and args.only not in workload.name:
                continue
            print(f"running {workload.name} ...", file=sys.stderr)
            results.append(measure(workload, servers, rounds))
        if not args.only or "map" in args.only:
            print("running nbdinfo --map ...", file=sys.stderr)
            # Several maps per round, their median: one map takes about 50 ms and moves
            # by ±20 % from one to the next, and a single draw against the best of
            # three peers' draws is biased against whichever server is compared.
            maps = 7
            results.append(measure(Workload(
                "nbdinfo --map, 64 GiB sparse", "ms", False,
                lambda s: statistics.median(timed(["nbdinfo", "--map", s.uri])
                                            for _ in range(maps)) * 1000, maps, "map"),
                sparse, rounds))
        peak = {s.name: s.peak_rss_mib() for s in servers}
    finally:
        for server in servers + sparse:
            server.stop()
    # The sections after the main workloads: (--only key, what runs, how).
    sections = [
        ("TLS", "nbdcopy over TLS", lambda: tls_workloads(args, images, workdir, rounds)),
        ("tracking", "dirty-tracking cost",
         lambda: tracking_workloads(args, images, workdir, sockets, rounds)),
        ("bitmap", "bitmap maps, connections and memory",
         lambda: bitmap_workloads(args, images, workdir, sockets, rounds)),
        ("extended", "extended headers (QEMU 10 and 7.2 clients)",
         lambda: extended_header_workloads(args, images, workdir, sockets, rounds)),
        ("memory", "bitmap memory",
         lambda: [bitmap_memory(workdir, sockets, 8 if args.full else 2)]),
        ("backup", "backups", lambda: backup_workloads(args, images, workdir, sockets, rounds)),
        ("snapshot", "copy-before-write cost",
         lambda: snapshot_workloads(args, images, sockets, rounds)),
        ("migration", "live migration",
         lambda: migration_workloads(args, images, workdir, sockets, rounds)),
        ("options", "serving options (--cache, --discard, --detect-zeroes)",
         lambda: option_workloads(args, images, sockets, rounds)),
    ]
    for key, what, section in sections:
        if args.main or args.only and key not in args.only:
            continue
        print(f"running {what} ...", file=sys.stderr)
        try:
            results += section()
        except Exception as exc:  # report what was measured, and say what failed
            print(f"{what} failed: {exc!r}", file=sys.stderr)
    report = {"machine": machine(), "mode": "full" if args.full else "quick",
              "transport": "tcp" if args.tcp else "unix", "rounds": rounds,
              "written_images": f"{memdir} ({filesystem_of(memdir)})",
              "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "results": results, "peak_rss_mib": peak}
    print_table(results)
    print("peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peak.items()))
    out = HERE / "results" / time.strftime("%Y%m%d-%H%M%S.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"results: {out}")
    shutil.rmtree(sockets, ignore_errors=True)
    return 0


def tracking_workloads(args, images, workdir: Path, sockets: Path,
                       rounds: int) -> list[dict]:
    """nbdserve only: what recording writes in 1 and 4 bitmaps (and their crash
    journal) costs 4 KiB random writes, against none."""
    results = []
    # Three servers, each on its own copy of the image (with its own QDB file and
    # control socket), measured in interleaved rounds. On one shared image the state of
    # its page cache (pages still under writeback from the previous server's run) moved
    # each run by more than marking costs.
    variants = {"0 bitmaps": [], "1 bitmap": ["b0"], "4 bitmaps": ["b0", "b1", "b2", "b3"]}
    copies = {}
    for names in variants.values():
        copies[len(names)] = args.memdir / f"tracking-t{len(names)}.raw"
        shutil.copyfile(images["source"], copies[len(names)])
    os.sync()  # the copies' pages written back before any run

    def make_tracking_servers(more: list[str]) -> list:
        made = []
        for label, names in variants.items():
            tag = f"t{len(names)}"
            extra = [a for name in names for a in ("--bitmap", name)]
            if names:
                extra += ["--qdb", str(sockets / f"{tag}.qdb"), "--control",
                          str(sockets / f"{tag}.ctl")]
            (server,) = make_servers({"nbdserve": copies[len(names)]}, sockets, args.tcp,
                                     nbdserve_args=extra + more, names=("nbdserve",),
                                     tag=tag)
            made.append((label, names, server))
        return made
    # Runs of at least 10 s: the journal's records and the bitmaps' first marks are
    # front-loaded, and a short run weighs them more than a client ever would.
    seconds = max(10.0, args.seconds)
    phases = ("from clean bitmaps", "steady state")

    def measure_phases(more: list[str], rate: int) -> tuple[dict, dict, dict]:
        """IOPS, server CPU and server user CPU per request, by phase and variant; at
        fio's full speed, or at a fixed rate (requests per second) when rate is set.
        Every round starts its own servers: a process keeps its own offset through
        its life (where its memory and CPU fell), as large as marking costs, and only
        new processes average it out."""
        extra = [f"--rate_iops={rate}"] if rate else []
        values = {phase: {label: [] for label in variants} for phase in phases}
        cpu = {phase: {label: [] for label in variants} for phase in phases}
        user = {phase: {label: [] for label in variants} for phase in phases}
        for round_number in range(rounds):
            servers = make_tracking_servers(more)
            for _, _, server in servers:
                server.start()
            try:
                order = servers if round_number % 2 == 0 else servers[::-1]
                for label, names, server in order:
                    for name in names:  # a new server loads the last round's bits
                        run([str(ROOT / ".venv/bin/nbdserve"), "bitmap", "clear",
                             "--control", str(sockets / f"t{len(names)}.ctl"), name])
                    # From clean bitmaps (every first write to a granule is a
                    # clean-to-dirty transition and a journal record), then again with
                    # the same bitmaps dirty where the writes go (one bit test per write).
                    for phase in phases:
                        # On a disk, a run would otherwise meet pages still under
                        # writeback from the previous runs, which costs more than marking.
                        os.sync()
                        before = server.cpu_seconds(), server.cpu_seconds(user_only=True)
                        iops = fio(server.uri, "randwrite", "4k", 16, seconds, extra=extra)
                        requests = iops * (seconds + RAMP) / 1e6
                        values[phase][label].append(iops)
                        cpu[phase][label].append((server.cpu_seconds() - before[0])
                                                 / requests)
                        user[phase][label].append(
                            (server.cpu_seconds(user_only=True) - before[1]) / requests)
            finally:
                for _, _, server in servers:
                    server.stop()
        return values, cpu, user

    full_speed = measure_phases([], 0)  # as users run it
    # At full speed, a run's rate scatters by more than marking costs, and its CPU per
    # request moves with it (a server that falls behind answers more requests per
    # wake-up, with fewer system calls each). At one fixed rate every server sees the
    # same arrivals, so CPU per request compares what each does per write; busy-polling
    # is off there, as it would fill the idle time between requests and hide added
    # work (a server that works longer per request only spins less).
    rate = int(0.75 * min(min(runs) for runs in full_speed[0]["steady state"].values()))
    fixed = measure_phases(["--poll-max-us", "0"], rate)
    for phase in phases:
        values, cpu = full_speed[0][phase], full_speed[1][phase]
        result = summarise(f"4k randwrite qd16 {seconds:.0f} s, {phase}", "IOPS", True,
                           values, cpu)
        # Pair by pair within a round, like every other ratio here.
        result["cost"] = {label: 1 - statistics.median(
            v / base for v, base in zip(runs, values["0 bitmaps"], strict=True))
            for label, runs in values.items()}
        result["cpu_unit"] = "request"
        for label, runs in cpu.items():
            result["servers"][label]["cpu_per_unit_us"] = statistics.median(runs)
        results.append(result)
    for phase in phases:
        values, cpu, user = fixed[0][phase], fixed[1][phase], fixed[2][phase]
        result = summarise(f"4k randwrite qd16 at {rate} IOPS, no polling, {phase}",
                           "us CPU", False, cpu, None)
        result["rate_iops"] = {label: statistics.median(runs) for label, runs in values.items()}
        # What tracking adds to the CPU of a request, pair by pair within a round.
        result["cpu_cost"] = {label: statistics.median(
            c / base for c, base in zip(runs, cpu["0 bitmaps"], strict=True)) - 1
            for label, runs in cpu.items()}
        # Marking is user-space work (no system call once the granules are dirty),
        # and user CPU scatters less than the kernel's share: what it adds, in µs
        # per request, pair by pair.
        result["user_cpu_us"] = {label: statistics.median(runs) for label, runs in user.items()}
        result["user_cpu_added_us"] = {label: statistics.median(
            u - base for u, base in zip(runs, user["0 bitmaps"], strict=True))
            for label, runs in user.items()}
        results.append(result)
    return results


def bitmap_workloads(args, images, workdir: Path, sockets: Path, rounds: int) -> list[dict]:
    """nbdserve only: mapping a huge dirty bitmap, many connections, and the memory
    of bitmap cycles."""
    results = []
    print("running 16 TiB dirty-bitmap map ...", file=sys.stderr)
    image = prepare_dirty_bitmap_image(workdir)
    (server,) = make_servers({"nbdserve": image}, sockets, args.tcp, names=("nbdserve",),
                             nbdserve_args=["-r"], tag="16t")
    server.start()
    try:
        times = [timed(["nbdinfo", "--map=qemu:dirty-bitmap:backup", "--totals", server.uri])
                 * 1000 for _ in range(rounds)]
        rss = server.peak_rss_mib()
    finally:
        server.stop()
    results.append(many_connections(args, images, sockets))
    results.append(bitmap_cycle_memory(workdir, sockets, args.tcp,
                                       cycles=120 if args.full else 30))
    result = summarise("map 16 TiB, 1M dirty granules", "ms", False, {"nbdserve": times},
                       {"nbdserve": [0.0] * len(times)})
    result["peak_rss_mib"] = rss
    result["bitmap_bytes_mib"] = BIG_IMAGE_SIZE / 65536 / 8 / MiB
    results.append(result)
    return results




def qemu_img_bench(qemu_img: str, uri: str, write: bool, depth: int, count: int) -> float:
    """IOPS of `qemu-img bench`: 4 KiB requests one after the other through the image
    (it has no random mode), DEPTH in flight, from QEMU's own NBD client, which speaks
    extended headers when it is QEMU 10's and the server has them."""
    argv = [qemu_img, "bench", "-f", "raw", "-c", str(count), "-d", str(depth), "-s", "4k",
            "-S", "4096", "-t", "writeback", uri]
    if write:
        argv.insert(2, "-w")
    return count / timed(argv)


def extended_header_workloads(args, images, workdir: Path, sockets: Path,
                              rounds: int) -> list[dict]:
    """Issue 18: every server here against QEMU 10's client (extended headers where
    the server has them: nbdserve and qemu-nbd 10) and QEMU 7.2's (compact), so each
    workload is measured both ways; qemu-nbd 10 joins the peers."""
    if "qemu-nbd-10" not in PEERS:
        raise RuntimeError(f"QEMU 10 is not at {QEMU10}: run scripts/setup.sh")
    dense = make_servers(images, sockets, args.tcp, names=PEERS, tag="-eh")
    holey = make_servers({n: images[f"{n}-sparse"] for n in PEERS}, sockets, args.tcp,
                         names=PEERS, tag="-eh-sparse")
    count = 50000 if args.full else 20000
    results = []
    try:
        for server in dense + holey:
            server.start()
        for client, qemu in (("QEMU 10", QEMU10), ("QEMU 7.2", Path("/usr/bin"))):
            img = str(qemu / "qemu-img")
            for label, write, depth in (("4k read qd16", False, 16),
                                        ("4k write qd16", True, 16),
                                        ("4k read qd1", False, 1)):
                n = count if depth > 1 else count // 4
                results.append(measure(Workload(
                    f"qemu-img bench {label}, {client} client", "IOPS", True,
                    lambda s, img=img, w=write, d=depth, n=n: qemu_img_bench(img, s.uri, w,
                                                                            d, n),
                    1, "run"), dense, rounds))
            results.append(measure(Workload(
                f"qemu-img map 64 GiB, {client} client", "ms", False,
                lambda s, img=img: timed([img, "map", "-f", "raw", "--output=json",
                                          s.uri]) * 1000, 1, "run"), holey, rounds))
    finally:
        for server in dense + holey:
            server.stop()
    return results


def bitmap_memory(workdir: Path, sockets: Path, tib: int) -> dict:
    """Issue 11: what resident bitmaps cost, against their bits (size / granularity / 8),
    and the peaks of loading them and of `qdb check`. The bitmaps are 4 KiB ones over a
    sparse image, every other granule dirty, so every cluster of the file is data (the
    worst case for a file, not for memory: the bits are the same size whatever they
    hold)."""
    from bitarray import bitarray

    from nbdserve.bitmaps.qdb import QdbContents, StoredBitmap, write_qdb
    from nbdserve.image import path_identity

    image = workdir / f"sparse-{tib}t.raw"
    qdb = Path(str(image) + ".qdb")
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(tib << 40)
    granules = (tib << 40) // 4096
    bits_mib = granules / 8 / MiB
    nbdserve = str(ROOT / ".venv/bin/nbdserve")
    resident, loading, checking = {}, {}, {}
    try:
        for count in (0, 1, 2, 4):
            for stale in workdir.glob(f"{image.name}.qdb*"):
                stale.unlink()
            if count:
                pattern = bitarray("01", endian="little") * (granules // 2)
                write_qdb(str(qdb), QdbContents(path_identity(str(image)), bitmaps=[
                    StoredBitmap(f"b{i}", 12, i + 1, True, False, pattern)
                    for i in range(count)]))
                del pattern
            (server,) = make_servers({"nbdserve": image}, sockets, False,
                                     names=("nbdserve",), tag=f"mem{count}")
            server.start()
            try:
                # The listeners are bound before the bitmaps load: one request waits
                # for the export.
                run(["nbdinfo", "--size", server.uri])
                resident[count] = server.rss_mib()
                loading[count] = server.peak_rss_mib()
            finally:
                server.stop()
            if count:
                out = subprocess.run(["/usr/bin/time", "-f", "%M", nbdserve, "qdb", "check",
                                      str(qdb)], capture_output=True, text=True, check=True)
                checking[count] = int(out.stderr.strip().splitlines()[-1]) / 1024
    finally:
        for stale in workdir.glob(f"{image.name}*"):
            stale.unlink()
    per_bitmap = {n: round((resident[n] - resident[0]) / (n * bits_mib), 2)
                  for n in (1, 2, 4)}
    return {"workload": f"bitmap memory, {tib} TiB at 4 KiB ({bits_mib:.0f} MiB of bits each)",
            "unit": "MiB",
            "runs": {"nbdserve": [round(resident[n], 1) for n in (0, 1, 2, 4)]},
            "resident_mib_by_bitmaps": {n: round(v, 1) for n, v in resident.items()},
            "load_peak_mib_by_bitmaps": {n: round(v, 1) for n, v in loading.items()},
            "qdb_check_peak_mib_by_bitmaps": {n: round(v, 1) for n, v in checking.items()},
            "resident_cost_per_bitmap_x_bits": per_bitmap}


def bitmap_cycle_memory(workdir: Path, sockets: Path, tcp: bool, cycles: int = 30) -> dict:
    """A soak: RSS through backup cycles on a 256 GiB image with 4 KiB bitmaps (8 MiB
    each). Each cycle runs 1 s of fio random 4 KiB reads and writes, writes 4 MiB,
    checkpoints, merges into a new bitmap and removes two, as a backup tool with
    retention would. Memory must level off, not grow per cycle."""
    image = workdir / "sparse-256g.raw"
    for stale in workdir.glob("sparse-256g.raw.qdb*"):
        stale.unlink()
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(256 * GiB)
    control = str(sockets / "cycle.ctl")
    nbdserve = str(ROOT / ".venv/bin/nbdserve")
    (server,) = make_servers({"nbdserve": image}, sockets, tcp, names=("nbdserve",),
                             nbdserve_args=["--control", control, "--bitmap",
                                            "b0,granularity=4K"], tag="cycle")
    server.start()
    rss = []
    try:
        previous = "b0"
        for cycle in range(1, cycles + 1):
            fio(server.uri, "randrw", "4k", 16, 1, size="256G")
            run(["qemu-io", "-f", "raw", "-c", f"write -P {cycle % 250} {cycle * 37}M 4M",
                 server.uri])
            current = f"b{cycle}"
            for command in (["checkpoint", previous, current],
                            ["add", f"m{cycle}", "--granularity", "4K"],
                            ["merge", f"m{cycle}", previous], ["remove", previous],
                            ["remove", f"m{cycle}"]):
                run([nbdserve, "bitmap", *command, "--control", control])
            previous = current
            rss.append(server.rss_mib())
    finally:
        server.stop()
        for stale in workdir.glob("sparse-256g.raw*"):
            stale.unlink()
    return {"workload": f"RSS over {cycles} soak cycles, 256 GiB, 4 KiB bitmaps",
            "unit": "MiB",
            "runs": {"nbdserve": [round(value, 1) for value in rss]}}


def tls_workloads(args, images, workdir: Path, rounds: int) -> list[dict]:
    """nbdcopy over TLS (TCP, X.509), nbdserve against qemu-nbd with TLS."""
    import trustme
    pki = workdir / "pki"
    shutil.rmtree(pki, ignore_errors=True)
    server_dir, client_dir = pki / "server", pki / "client"
    server_dir.mkdir(parents=True)
    client_dir.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    for directory in (server_dir, client_dir):  # QEMU's and libnbd's layouts
        ca.cert_pem.write_to_path(str(directory / "ca-cert.pem"))
    cert.cert_chain_pems[0].write_to_path(str(server_dir / "server-cert.pem"))
    cert.private_key_pem.write_to_path(str(server_dir / "server-key.pem"))
    servers = []
    for name in ("nbdserve", "qemu-nbd"):
        port = _free_port()
        uri = f"nbds://127.0.0.1:{port}/?tls-certificates={client_dir}"
        if name == "nbdserve":
            argv = [str(ROOT / ".venv/bin/nbdserve"), "serve", str(images[name]), "-b",
                    "127.0.0.1", "-p", str(port), "--tls",
                    "require", "--tls-cert", str(server_dir / "server-cert.pem"),
                    "--tls-key", str(server_dir / "server-key.pem")]
        else:
            argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "0", "-b", "127.0.0.1", "-p",
                    str(port), "--object",
                    f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=off",
                    "--tls-creds", "tls0", str(images[name])]
        servers.append(Server(name, argv, uri, f"127.0.0.1:{port}"))
    try:
        for server in servers:
            server.start()
        results = [measure(Workload(
            "TLS nbdcopy 1 GiB to null:", "GB/s", True,
            lambda s: GiB / timed(["nbdcopy", s.uri, "null:"]) / 1e9, 1, "GiB"),
            servers, rounds)]
        results.append(tls_memory(servers, client_dir))
        return results
    finally:
        for server in servers:
            server.stop()


TLS_CLIENTS = (
    "import nbd, sys\n"
    "handles = []\n"
    "for i in range(int(sys.argv[2])):\n"
    "    h = nbd.NBD(); h.set_tls(nbd.TLS_REQUIRE); h.set_tls_certificates(sys.argv[3])\n"
    "    h.connect_uri(sys.argv[1]); h.pread(1 << 20, i << 20); handles.append(h)\n"
)


def tls_memory(servers: list[Server], client_dir: Path, clients: int = 64,
               rounds: int = 8) -> dict:
    """RSS of each server after rounds of 64 TLS clients that connect, read 1 MiB and
    leave: memory must come back, not grow round after round."""
    rss: dict[str, list[float]] = {}
    for server in servers:
        rss[server.name] = []
        for _ in range(rounds):
            run([SYSTEM_PYTHON, "-c", TLS_CLIENTS, server.uri.split("?")[0], str(clients),
                 str(client_dir)])
            time.sleep(0.2)
            rss[server.name].append(server.rss_mib())
    return {"workload": f"RSS after rounds of {clients} TLS clients", "unit": "MiB",
            "runs": rss}


GRANULE_WRITES = (
    "import nbd, random, sys, time\n"
    "uri, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])\n"
    "granule, depth = 65536, 16\n"
    "h = nbd.NBD(); h.connect_uri(uri)\n"
    "order = random.Random(seed).sample(range(h.get_size() // granule), count)\n"
    "buf = nbd.Buffer.from_bytearray(bytearray(b'\\xab' * 4096))\n"
    "inflight = 0\n"
    "def done(*_):\n"
    "    global inflight\n"
    "    inflight -= 1\n"
    "    return 1\n"
    "start = time.perf_counter()\n"
    "for g in order:\n"
    "    while inflight >= depth:\n"
    "        h.poll(-1)\n"
    "    h.aio_pwrite(buf, g * granule, completion=done)\n"
    "    inflight += 1\n"
    "while inflight:\n"
    "    h.poll(-1)\n"
    "print(count / (time.perf_counter() - start))\n"
)


def copy_rate(uri: str) -> float:
    """GB/s of nbdcopy from a 1 GiB export to null:."""
    return GiB / timed(["nbdcopy", uri, "null:"]) / 1e9


def granule_writes(uri: str, count: int, seed: int) -> float:
    """IOPS of 4 KiB writes at queue depth 16, each to a different 64 KiB granule in
    a random order (fio cannot: its block alignment turns off its no-repeat map)."""
    return float(run([SYSTEM_PYTHON, "-c", GRANULE_WRITES, uri, str(count), str(seed)]))


def snapshot_workloads(args, images, sockets: Path, rounds: int) -> list[dict]:
    """nbdserve only: what copy-before-write costs the live export, and reads of a
    snapshot against reads of the live export. Each round: 4 KiB writes to distinct
    64 KiB regions with no snapshot; `snapshot add`; random 4 KiB reads and a full
    copy of the snapshot and of the live export; the same writes (every one a first
    touch: its 4 KiB granule is copied first); the same writes again (second touch);
    the snapshot's reads again, now that it holds scattered preserved data."""
    nbdserve = str(ROOT / ".venv/bin/nbdserve")
    control = str(sockets / "snap.ctl")
    (server,) = make_servers({"nbdserve": images["nbdserve"]}, sockets, args.tcp,
                             nbdserve_args=["--control", control, "--scratch-dir",
                                            str(sockets)],
                             names=("nbdserve",), tag="snap")
    snapshot_uri = server.uri.replace(":///?", ":///snap?") if not args.tcp else \
        server.uri + "snap"
    count = 12000  # of the 16384 granules of 64 KiB in the 1 GiB image
    labels = ("no snapshot", "first touch", "second touch")
    writes = {label: [] for label in labels}
    write_cpu = {label: [] for label in labels}
    # Reads twice: of a fresh snapshot (all of it still read from the live image), and
    # after the writes (12,000 preserved granules of 4 KiB scattered through it).
    read_labels = ("live", "snapshot, fresh", "snapshot, preserved")
    reads = {label: [] for label in read_labels}
    read_cpu = {label: [] for label in read_labels}
    copies = {label: [] for label in read_labels}
    copy_cpu = {label: [] for label in read_labels}

    def measured(values, cpu, label, work, function, *args):
        os.sync()  # no writeback of the previous step's pages during this one
        before = server.cpu_seconds()
        values[label].append(function(*args))
        cpu[label].append((server.cpu_seconds() - before) / work)

    def read_both(label: str, live_too: bool) -> None:
        for which in (label, "live") if live_too else (label,):
            uri = server.uri if which == "live" else snapshot_uri
            measured(reads, read_cpu, which, 1, fio, uri, "randread", "4k", 16,
                     args.seconds)
            measured(copies, copy_cpu, which, 1, copy_rate, uri)

    server.start()
    try:
        for round_number in range(rounds):
            seed = round_number + 1
            measured(writes, write_cpu, "no snapshot", count, granule_writes, server.uri,
                     count, seed)
            run([nbdserve, "snapshot", "add", "snap", "--control", control])
            read_both("snapshot, fresh", live_too=True)
            for label in labels[1:]:
                measured(writes, write_cpu, label, count, granule_writes, server.uri,
                         count, seed)
            read_both("snapshot, preserved", live_too=False)
            run([nbdserve, "snapshot", "remove", "snap", "--control", control])
    finally:
        server.stop()
    results = []
    for name, unit, values, cpu, base in (
            ("4k writes to distinct granules", "IOPS", writes, write_cpu, "no snapshot"),
            ("4k randread qd16, snapshot", "IOPS", reads, read_cpu, "live"),
            ("nbdcopy 1 GiB to null:, snapshot", "GB/s", copies, copy_cpu, "live")):
        result = summarise(name, unit, True, values, cpu)
        # Pair by pair within a round, like every other ratio here.
        result["cost"] = {label: 1 - statistics.median(
            v / b for v, b in zip(runs, values[base], strict=True))
            for label, runs in values.items()}
        results.append(result)
    return results


OPTION_VARIANTS = {  # label: serve options (the first is the default)
    "default": [],
    "--cache=none": ["--cache=none"],
    "--discard=ignore": ["--discard=ignore"],
    "--detect-zeroes=unmap": ["--detect-zeroes=unmap"],
}


def option_workloads(args, images, sockets: Path, rounds: int) -> list[dict]:
    """nbdserve only, one server per variant on its own copy of the 1 GiB image: what
    each serving option costs or saves, on the workloads it touches, with the server's
    CPU per request. Each variant starts from a fresh copy of the random image (trims
    and punched zeros would otherwise leave holes for the next one), and pages are
    dropped from the cache before each run (os.sync and POSIX_FADV_DONTNEED on the
    image), so --cache=none and writeback start alike."""
    secs = args.seconds
    workloads = [
        ("4k randread qd16", "IOPS", lambda uri: fio(uri, "randread", "4k", 16, secs)),
        ("4k randwrite qd16", "IOPS", lambda uri: fio(uri, "randwrite", "4k", 16, secs)),
        ("nbdcopy 1 GiB to null:", "GB/s", copy_rate),
        ("64k trim qd16", "IOPS", lambda uri: fio(uri, "randtrim", "64k", 16, secs)),
        ("64k zero-filled writes qd16", "MB/s",
         lambda uri: fio(uri, "randwrite", "64k", 16, secs, extra=["--zero_buffers"])),
    ]
    values = {name: {label: [] for label in OPTION_VARIANTS} for name, _, _ in workloads}
    cpu = {name: {label: [] for label in OPTION_VARIANTS} for name, _, _ in workloads}
    for round_number in range(rounds):
        order = list(OPTION_VARIANTS) if round_number % 2 == 0 else \
            list(reversed(OPTION_VARIANTS))
        for label in order:
            image = images["nbdserve"]
            shutil.copyfile(images["source"], image)
            (server,) = make_servers({"nbdserve": image}, sockets, args.tcp,
                                     nbdserve_args=OPTION_VARIANTS[label],
                                     names=("nbdserve",), tag="-options")
            server.start()
            try:
                for name, _unit, measure in workloads:
                    drop_cache(image)
                    before = server.cpu_seconds()
                    values[name][label].append(measure(server.uri))
                    cpu[name][label].append(server.cpu_seconds() - before)
            finally:
                server.stop()
    results = []
    for name, unit, _ in workloads:
        result = summarise(name + ", serving options", unit, True, values[name], cpu[name])
        result["cost"] = {label: 1 - statistics.median(
            v / b for v, b in zip(runs, values[name]["default"], strict=True))
            for label, runs in values[name].items()}
        results.append(result)
    return results


def drop_cache(path: Path) -> None:
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def migration_workloads(args, images, workdir: Path, sockets: Path,
                        rounds: int) -> list[dict]:
    """nbdserve to nbdserve. Each round: (1) an idle 1 GiB image, half data, half
    holes, with 4 recording bitmaps, migrated against nbdcopy of the same image
    between two nbdserve servers (the time to move the disk); (2) the same while fio
    writes 4 KiB blocks at 20 MB/s on the source: the pause, the longest write
    latency fio saw, and what the bitmaps cost in bytes."""
    nbdserve = str(ROOT / ".venv/bin/nbdserve")
    source_image = workdir / "migration-source.raw"
    shutil.copyfile(images["source"], source_image)
    with open(source_image, "r+b") as f:  # the second half: holes
        f.truncate(GiB // 2)
        f.truncate(GiB)
    bitmaps = [arg for n in range(4) for arg in ("--bitmap", f"b{n}")]
    src_ctl = str(sockets / "mig-src.ctl")
    incoming = str(sockets / "mig-in.sock")

    def pair(target: Path, *, incoming_target: bool, in_memory: bool = False) -> list[Server]:
        target.unlink(missing_ok=True)
        Path(f"{target}.qdb").unlink(missing_ok=True)
        served = source_image
        if in_memory:  # a source on another disk than the target's, as on two machines
            served = Path("/dev/shm/nbdserve-bench-migration-source.raw")
            run(["cp", "--sparse=always", str(source_image), str(served)])
        src = Server("source", [nbdserve, "serve", str(served), "-k",
                                str(sockets / "mig-src.sock"), "--control", src_ctl,
                                "--force", *bitmaps],
                     f"nbd+unix:///?socket={sockets / 'mig-src.sock'}",
                     str(sockets / "mig-src.sock"))
        dst_args = ["--incoming", f"unix:{incoming}"] if incoming_target else \
            ["--create", str(GiB)]
        dst = Server("target", [nbdserve, "serve", str(target), "-k",
                                str(sockets / "mig-dst.sock"), *dst_args],
                     f"nbd+unix:///?socket={sockets / 'mig-dst.sock'}",
                     incoming if incoming_target else str(sockets / "mig-dst.sock"))
        for server in (src, dst):
            server.start()
        return [src, dst]

    def migrate_under_writer(servers: list[Server], incoming: str) -> dict:
        try:
            writer = subprocess.Popen(
                ["fio", "--name=writer", "--ioengine=nbd", f"--uri={servers[0].uri}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=1", "--rate=,20m",
                 # The allocated half: writes into holes would allocate blocks, and
                 # ext4's ordered mode would make every fdatasync of the target (the
                 # same file system here, another machine in use) wait for them.
                 "--size=512M", "--time_based", "--runtime=60", "--output-format=json"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(1)
            finished = subprocess.run(
                [nbdserve, "migrate", "start", f"unix:{incoming}", "--control", src_ctl,
                 "--max-downtime", "100", "--wait"], capture_output=True, text=True)
            time.sleep(1)
            writer.send_signal(signal.SIGINT)  # fio reports what it did so far
            out, _ = writer.communicate(timeout=30)
            job = json.loads(out[out.index("{"):])["jobs"][0]
            state = json.loads(run([nbdserve, "migrate", "status", "--json", "--control",
                                    src_ctl]))["outgoing"]
            state["fio-max-write-latency-ms"] = job["write"]["clat_ns"]["max"] / 1e6
            state["fio-errors"] = job["error"]
            state["migrate-exit"] = finished.returncode
            return state
        finally:
            for server in servers:
                server.stop()
            for leftover in Path("/dev/shm").glob("nbdserve-bench-migration-source.raw*"):
                leftover.unlink(missing_ok=True)

    target = workdir / "migration-target.raw"
    times = {"migrate": [], "nbdcopy": []}
    cpu = {"migrate": [], "nbdcopy": []}
    loaded: list[dict] = []
    for round_number in range(rounds):
        for kind in (("migrate", "nbdcopy") if round_number % 2 == 0 else
                     ("nbdcopy", "migrate")):
            servers = pair(target, incoming_target=kind == "migrate")
            try:
                os.sync()
                before = sum(s.cpu_seconds() for s in servers)
                if kind == "migrate":
                    times[kind].append(timed([nbdserve, "migrate", "start", f"unix:{incoming}",
                                              "--control", src_ctl, "--wait"]))
                else:
                    # --flush: durable at the end, as a migration's target is.
                    times[kind].append(timed(["nbdcopy", "--flush", servers[0].uri,
                                              servers[1].uri]))
                cpu[kind].append(sum(s.cpu_seconds() for s in servers) - before)
            finally:
                for server in servers:
                    server.stop()
        for place in ("disk", "memory"):
            state = migrate_under_writer(pair(target, incoming_target=True,
                                              in_memory=place == "memory"), incoming)
            state["source-image"] = place
            loaded.append(state)
    result = {"workload": "migrate an idle 1 GiB image (half holes) vs nbdcopy --flush",
              "unit": "record", "runs": {
                  "migrate-s": times["migrate"], "nbdcopy-s": times["nbdcopy"],
                  "migrate-cpu-s": cpu["migrate"], "nbdcopy-cpu-s": cpu["nbdcopy"],
                  "throughput-vs-nbdcopy": statistics.median(
                      b / a for a, b in zip(times["migrate"], times["nbdcopy"], strict=True))}}
    keys = ("source-image", "phase", "error", "pause-ms", "quiesce-ms",
            "fio-max-write-latency-ms", "passes", "data-bytes", "bitmap-bytes",
            "pause-data-bytes", "pause-bitmap-bytes", "pause-steps", "fio-errors")
    return [result, {"workload": "migration under a 20 MB/s 4k writer, 4 bitmaps",
                     "unit": "record", "runs": [{k: s[k] for k in keys} for s in loaded]}]


def backup_workloads(args, images, workdir: Path, sockets: Path, rounds: int) -> list[dict]:
    """nbdserve backup: a full backup of the 1 GiB image against nbdcopy of the same
    export to a file, in the same rounds; an incremental's bytes read against the
    bitmap's dirty bytes; restore; and what zstd costs on incompressible data."""
    nbdserve = str(ROOT / ".venv/bin/nbdserve")
    control = str(sockets / "backup.ctl")
    (server,) = make_servers({"nbdserve": images["nbdserve"]}, sockets, args.tcp,
                             nbdserve_args=["--control", control], names=("nbdserve",),
                             tag="backup")
    out = workdir / "backup-bench"
    labels = ("nbdcopy --flush to a file", "backup, no compression", "backup, zstd")
    fulls = {label: [] for label in labels}
    full_cpu = {label: [] for label in labels}
    restores = {"restore to a file": []}
    incremental = []

    def forget_chains() -> None:
        """A deleted chain leaves its bitmap on the server: remove every bitmap."""
        for bitmap in json.loads(run([nbdserve, "bitmap", "list", "--json", "--control",
                                      control])):
            run([nbdserve, "bitmap", "remove", bitmap["name"], "--control", control])

    server.start()
    try:
        for round_number in range(rounds):
            order = labels if round_number % 2 == 0 else labels[::-1]
            for label in order:
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                forget_chains()
                os.sync()
                before = server.cpu_seconds()
                if label.startswith("nbdcopy"):  # --flush: durable, as a backup point is
                    seconds = timed(["nbdcopy", "--flush", server.uri,
                                     str(out / "copy.img")])
                else:
                    compression = "none" if "no compression" in label else "zstd"
                    seconds = timed([nbdserve, "backup", "run", "--control", control,
                                     "--compression", compression, str(out / "chain")])
                fulls[label].append(GiB / seconds / 1e9)
                full_cpu[label].append(server.cpu_seconds() - before)
            # An incremental after 2,000 scattered 4 KiB writes, on a fresh chain.
            shutil.rmtree(out, ignore_errors=True)
            forget_chains()
            run([nbdserve, "backup", "run", "--control", control, str(out / "chain")])
            granule_writes(server.uri, 2000, round_number + 7)
            [bitmap] = json.loads(run([nbdserve, "bitmap", "list", "--json", "--control",
                                       control]))
            result = json.loads(run([nbdserve, "backup", "run", "--json", "--control",
                                     control, str(out / "chain")]))
            incremental.append({"dirty_bytes": bitmap["count"],
                                "bytes_read": result["bytes_read"],
                                "seconds": result["seconds"]})
            os.sync()
            restores["restore to a file"].append(GiB / timed(
                [nbdserve, "backup", "restore", "--force", str(out / "chain"),
                 str(out / "restored.img")]) / 1e9)
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
    full = summarise("full backup of 1 GiB (random data)", "GB/s", True, fulls, full_cpu)
    full["cost"] = {label: 1 - statistics.median(
        v / b for v, b in zip(runs, fulls["nbdcopy --flush to a file"], strict=True))
        for label, runs in fulls.items()}
    restore = summarise("backup restore of 1 GiB", "GB/s", True, restores, {})
    restore["cost"] = {"restore to a file": 0.0}
    return [full, restore, {"workload": "incremental after 2,000 4 KiB writes",
                            "unit": "bytes", "runs": incremental}]


def many_connections(args, images, sockets: Path, count: int = 64) -> dict:
    """Peak RSS of each server with 64 connections open, each having read 1 MiB."""
    script = (
        "import nbd, sys\n"
        "handles = []\n"
        "for i in range(int(sys.argv[2])):\n"
        "    h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pread(1 << 20, i << 20)\n"
        "    handles.append(h)\n"
        "sys.stdout.write('open\\n'); sys.stdout.flush(); sys.stdin.readline()\n"
    )
    rss = {}
    for server in make_servers({n: images[n] for n in ("nbdserve", "qemu-nbd", "nbdkit")},
                               sockets, args.tcp, tag="-conn"):
        server.start()
        try:
            client = subprocess.Popen([SYSTEM_PYTHON, "-c", script, server.uri, str(count)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            client.stdout.readline()
            rss[server.name] = [server.peak_rss_mib()]
            client.stdin.write("\n")
            client.stdin.close()
            client.wait(30)
        finally:
            server.stop()
    return summarise(f"peak RSS, {count} connections", "MiB", False, rss,
                     {name: [0.0] for name in rss})


if __name__ == "__main__":
    sys.exit(main())
