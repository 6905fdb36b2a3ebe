"""Copying extents of an NBD export into a backup point.

Reads are pipelined (up to DEPTH chunks in flight) and spread over several connections
when the server offers multi-conn; checksums and compression run in worker threads
(hashlib and zstd release the GIL), and chunks are stored in image order.
"""

from __future__ import annotations

import asyncio
import collections
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nbdserve.backup.chain import CHUNK, PointWriter
from nbdserve.client import NbdClient
from nbdserve.protocol import constants as c

DEPTH = 8  # chunks (of up to 4 MiB) read ahead
CONNECTIONS = 4  # when the server offers multi-conn
_ZEROS = bytes(CHUNK)


class SourceError(Exception):
    """The export cannot be reached or read; the message is for the operator."""


@dataclass(frozen=True)
class Address:
    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 10809
    export: str = ""

    def connect_kwargs(self) -> dict:
        if self.unix is not None:
            return {"unix": self.unix, "export": self.export}
        return {"host": self.host, "port": self.port, "export": self.export}

    def with_export(self, export: str) -> Address:
        return Address(self.unix, self.host, self.port, export)


def parse_uri(uri: str) -> Address:
    """nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH (the NBD URI spec)."""
    parts = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise SourceError(f"{uri}: no host")
        return Address(None, parts.hostname, parts.port or 10809, export)
    if parts.scheme == "nbd+unix":
        socket = urllib.parse.parse_qs(parts.query).get("socket")
        if not socket:
            raise SourceError(f"{uri}: nbd+unix needs ?socket=PATH")
        return Address(socket[0], export=export)
    if parts.scheme in ("nbds", "nbds+unix"):
        raise SourceError(f"{uri}: TLS is not supported by nbdserve backup yet")
    raise SourceError(f"{uri}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                      "nbd+unix:///EXPORT?socket=PATH)")


class Source:
    """One export, read over one or several connections."""

    def __init__(self, address: Address, contexts: list[str]) -> None:
        self.address = address
        self.contexts = contexts
        self.clients: list[NbdClient] = []
        self._next = 0

    async def open(self, connections: int = CONNECTIONS) -> None:
        try:
            first = await NbdClient.connect(**self.address.connect_kwargs(),
                                            meta_contexts=self.contexts)
        except OSError as exc:
            raise SourceError(f"cannot connect to export {self.address.export!r}: "
                              f"{exc}") from None
        except Exception as exc:  # an option refused: no such export, no such context
            raise SourceError(f"export {self.address.export!r}: {exc}") from None
        self.clients.append(first)
        missing = set(self.contexts) - set(first.contexts.values())
        if missing:
            raise SourceError(f"export {self.address.export!r} does not offer "
                              f"{', '.join(sorted(missing))}")
        if first.flags & c.NBD_FLAG_CAN_MULTI_CONN:
            for _ in range(connections - 1):
                self.clients.append(await NbdClient.connect(**self.address.connect_kwargs()))

    @property
    def size(self) -> int:
        return self.clients[0].size

    def client(self) -> NbdClient:
        self._next = (self._next + 1) % len(self.clients)
        return self.clients[self._next]

    async def ranges(self, context: str, wanted: Callable[[int], bool]) -> list[tuple[int, int]]:
        """(offset, length) of the runs whose flags pass ``wanted``, merged."""
        try:
            extents = await self.clients[0].walk_extents(context)
        except ConnectionError as exc:
            raise SourceError(str(exc)) from None
        out: list[tuple[int, int]] = []
        for offset, length, flags in extents:
            if not wanted(flags):
                continue
            if out and out[-1][0] + out[-1][1] == offset:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((offset, length))
        return out

    async def close(self) -> None:
        for client in self.clients:
            try:
                await client.disconnect()
            except (OSError, ConnectionError):
                pass


def chunked(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(offset + start, min(CHUNK, length - start))
            for offset, length in ranges for start in range(0, length, CHUNK)]


async def copy_into(source: Source, writer: PointWriter, ranges: list[tuple[int, int]], *,
                    progress: Callable[[int], None] = lambda n: None,
                    release: bool = False) -> int:
    """Copy the ranges into the point (zeros as zero chunks); returns bytes read. With
    ``release``, each range is trimmed on the source once stored (a snapshot export
    then frees its scratch space: QEMU's fleecing discard)."""
    loop = asyncio.get_running_loop()
    pieces = chunked(ranges)
    # Chunks encode in a pool (hashlib and zstd release the GIL) and are written, in
    # order, by one thread of their own: the loop keeps reading meanwhile.
    with ThreadPoolExecutor(max_workers=4, thread_name_prefix="nbdserve-backup") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbdserve-store") as store:
        async def fetch(offset: int, length: int):
            data = await source.client().read(offset, length)
            if _ZEROS.startswith(data):
                return None
            return await loop.run_in_executor(pool, writer.encode, data)

        queue: collections.deque = collections.deque()
        remaining = iter(pieces)

        def read_ahead() -> None:
            while len(queue) < DEPTH:
                piece = next(remaining, None)
                if piece is None:
                    return
                queue.append((piece, loop.create_task(fetch(*piece))))

        stores: collections.deque = collections.deque()
        trims: list[asyncio.Task] = []
        done = 0
        try:
            read_ahead()
            while queue:
                (offset, length), task = queue.popleft()
                encoded = await task
                read_ahead()
                if encoded is None:
                    stores.append(loop.run_in_executor(store, writer.add_zero, offset,
                                                       length))
                else:
                    stores.append(loop.run_in_executor(store, writer.add_data, offset,
                                                       length, *encoded))
                while len(stores) > DEPTH:  # the disk sets the pace
                    await stores.popleft()
                done += length
                progress(length)
                if release:
                    trims.append(loop.create_task(source.client().trim(offset, length)))
            while stores:
                await stores.popleft()
            await asyncio.gather(*trims, return_exceptions=True)
        finally:
            for _, task in queue:
                task.cancel()
            for future in stores:
                future.cancel()
    return done
