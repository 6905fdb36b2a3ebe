"""User-space instructions per request on the request path, counted with callgrind.

    .venv/bin/python bench/instructions.py                  # all scenarios, no bitmaps
    .venv/bin/python bench/instructions.py --bitmaps 4      # WRITE with 4 recording bitmaps

IOPS on a shared 2-core host move by 20 % between runs, which hides a change of a few
percent in the server's own work. Instruction counts do not: the same code and inputs
give the same count within a fraction of a percent. Each figure here is the difference
between two runs of the same in-process scenario (a server on a Unix socket, and a raw
client thread sending N pipelined 4 KiB requests four times over), with N and 2N
requests, divided by the extra requests: start-up and imports cancel out. `read-qd1`
sends one request at a time (the request loop waits for every header); the handshake
figure is per connection (connect, GO, DISC). The client's
own per-request work (packing a header, draining replies) is included and is the same
for every server version, so compare figures, do not read them as the server's alone.
Needs valgrind (Debian package `valgrind`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading

ROUNDS = 4  # the scenario sends its N requests this many times


def handshake(path: str) -> tuple[socket.socket, object]:
    """Connect and negotiate by hand: GO on the default export, no structured replies."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    stream = sock.makefile("rb")
    stream.read(18)
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _magic, _option, reply_type, length = struct.unpack(">QIII", stream.read(20))
        stream.read(length)
        if reply_type == 1:  # NBD_REP_ACK
            return sock, stream


def client(path: str, kind: str, count: int) -> None:
    """count connections (handshake, DISC), or one connection with count pipelined
    4 KiB requests."""
    if kind == "handshake":  # count connections, each GO then DISC
        for _ in range(count):
            sock, stream = handshake(path)
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # DISC
            stream.read(1)  # EOF: the server hung up
            sock.close()
        return
    sock, stream = handshake(path)
    rng = random.Random(1)
    if kind == "read-qd1":  # one request at a time: the loop waits for every header
        for cookie in range(count):
            sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie,
                                     rng.randrange(0, 16383) * 4096, 4096))
            stream.read(16 + 4096)
        sock.close()
        return
    command = 0 if kind == "read" else 1
    payload = os.urandom(4096)
    parts = []
    for cookie in range(count):
        parts.append(struct.pack(">IHHQQI", 0x25609513, 0, command, cookie,
                                 rng.randrange(0, 16383) * 4096, 4096))
        if command == 1:
            parts.append(payload)
    reply_size = 16 + (4096 if command == 0 else 0)

    def drain() -> None:
        left = count * reply_size
        while left:
            left -= len(sock.recv(min(left, 1 << 20)))

    reader = threading.Thread(target=drain)
    reader.start()
    sock.sendall(b"".join(parts))
    reader.join()
    sock.close()


def scenario(kind: str, count: int, bitmaps: int) -> None:
    """What runs under callgrind: one server, ROUNDS batches of count requests."""
    import uvloop

    from nbdserve.bitmaps.store import BitmapStore
    from nbdserve.config import BitmapRequest, ExportConfig
    from nbdserve.export import Export, ExportCatalog
    from nbdserve.image import RawImage
    from nbdserve.server.lifecycle import Server
    from nbdserve.server.listener import bind_unix

    work = tempfile.mkdtemp(prefix="nbdserve-instructions-")
    image = os.path.join(work, "image")
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20) * 64)  # 64 MiB of data, in the page cache
    raw = RawImage(image)
    tracker = None
    if bitmaps:
        tracker = BitmapStore.open(image + ".qdb", raw.size, raw.identity,
                                   requests=[BitmapRequest(f"b{i}") for i in range(bitmaps)])
    export = Export(ExportConfig("", image), raw, tracker)

    async def serve() -> None:
        path = os.path.join(work, "sock")
        server = Server(ExportCatalog([export]), [bind_unix(path)], poll_max_us=0)
        await server.start()
        loop = asyncio.get_running_loop()
        for _ in range(ROUNDS):
            await loop.run_in_executor(None, client, path, kind, count)
        await server.shutdown()

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve())
    shutil.rmtree(work, ignore_errors=True)


def instructions(kind: str, count: int, bitmaps: int) -> int:
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
         __file__, "--scenario", kind, str(count), str(bitmaps)],
        capture_output=True, text=True, check=True)
    return int(re.search(r"Collected : (\d+)", result.stderr).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="N (default 3000)")
    parser.add_argument("--bitmaps", type=int, default=0, help="recording bitmaps")
    parser.add_argument("--kind", dest="kinds", action="append",
                        choices=["read", "read-qd1", "write", "handshake"],
                        help="what to measure (repeatable; default all)")
    parser.add_argument("--scenario", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario:
        kind, count, bitmaps = args.scenario
        scenario(kind, int(count), int(bitmaps))
        return 0
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (apt-get install valgrind)",
              file=sys.stderr)
        return 1
    kinds = args.kinds or (["write"] if args.bitmaps
                           else ["read", "read-qd1", "write", "handshake"])
    for kind in kinds:
        small = instructions(kind, args.requests, args.bitmaps)
        large = instructions(kind, 2 * args.requests, args.bitmaps)
        per_request = (large - small) / (ROUNDS * args.requests)
        what = "connection" if kind == "handshake" else "request"
        print(f"{kind:9} {args.bitmaps} bitmaps: {per_request:,.0f} instructions per {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
