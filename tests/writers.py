"""A writer that never stops, and the image it leaves after any number of writes.

The writer overwrites blocks of a live export at queue depth 1, each write stamped with
its generation, so ``Replay`` knows the image after the first n writes exactly: a copy
taken at one instant must equal one of them.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from pathlib import Path

from conftest import NBDSERVE
from nbdserve.client import NbdClient

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
BLOCKS = 128  # an 8 MiB image
SIZE = BLOCK * BLOCKS


def stamp(generation: int, block: int) -> bytes:
    return struct.pack("<II", generation, block) * (BLOCK // 8)


class Replay:
    """The writes of a run, in order: what the image holds after the first n."""

    def __init__(self, initial_generation: int = 0) -> None:
        self.blocks: list[int] = []  # block index of write number p
        self.initial = initial_generation

    def image_after(self, count: int) -> bytes:
        generations = [self.initial] * BLOCKS
        for block in self.blocks[:count]:
            generations[block] += 1
        return b"".join(stamp(g, i) for i, g in enumerate(generations))

    def matching(self, data: bytes, low: int, high: int) -> int | None:
        """The n in [low, high] whose image equals data, if any. (The generations are
        replayed once, incrementally; only a candidate is checked byte for byte.)"""
        seen = [struct.unpack_from("<I", data, i * BLOCK)[0] for i in range(BLOCKS)]
        generations = [self.initial] * BLOCKS
        for count in range(high + 1):
            if count >= low and generations == seen and self.image_after(count) == data:
                return count
            if count < len(self.blocks):
                generations[self.blocks[count]] += 1
        return None


class Writer:
    """Overwrites blocks of the live export at queue depth 1, in a given order."""

    def __init__(self, client: NbdClient, order: list[int], replay: Replay) -> None:
        self.client, self.order, self.replay = client, order, replay
        self.acknowledged = 0  # writes the server answered
        self.issued = 0  # writes sent (at most one more than acknowledged)
        self.stop = False
        self.generations = [replay.initial] * BLOCKS
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        while not self.stop:
            block = self.order[self.issued % len(self.order)]
            self.generations[block] += 1
            self.replay.blocks.append(block)
            self.issued += 1
            await self.client.write(block * BLOCK, stamp(self.generations[block], block))
            self.acknowledged += 1
            await asyncio.sleep(0)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def wait_for(self, writes: int) -> None:
        while self.acknowledged < writes:
            await asyncio.sleep(0.005)

    async def finish(self) -> None:
        self.stop = True
        await self.task




async def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = await asyncio.create_subprocess_exec(
        *NBDSERVE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    result = subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())
    if check and proc.returncode:
        raise AssertionError(f"nbdserve {args} exited {proc.returncode}: {result.stderr}")
    return result


async def tool(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {err.decode()}"


async def taken_between(writer: Writer, *args: str) -> tuple[int, int, str]:
    """Run a snapshot command while the writer writes: (acknowledged before, issued
    after, what the command printed)."""
    before = writer.acknowledged
    result = await cli(*args)
    return before, writer.issued, result.stdout.strip()


def initial_image(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(Replay().image_after(0))
