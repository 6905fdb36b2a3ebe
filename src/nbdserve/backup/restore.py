"""Reading a chain back: restore, instant restore (serve), verify and merge.

Every reader goes through a RestoreMap (the newest point wins where points overlap)
and a ChunkReader (each chunk checked against its checksum before use).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from array import array
from collections.abc import Callable, Iterator

from nbdserve.backup.chain import (
    Chain,
    ChainError,
    ChunkReader,
    Point,
    PointWriter,
    RestoreMap,
)
from nbdserve.backup.copy import parse_uri
from nbdserve.client import NbdClient
from nbdserve.image import ImageError, RawImage


def pieces_of(restore: RestoreMap) -> Iterator[tuple[int, int, str, object]]:
    """(start, end, "data" | "zero" | "hole", piece) over the whole image."""
    for start, end, piece in restore.covering(0, restore.size):
        if piece is None:
            yield start, end, "hole", None
        else:
            yield start, end, piece.chunk.kind, piece


# -- restore ----------------------------------------------------------------------------------

def restore(dest: str, target: str, until: int | None = None, *, force: bool = False,
            progress: Callable[[int, str], Callable[[int], None]] | None = None) -> int:
    """Write restore point ``until`` to a file, a block device or an NBD URI; returns
    the bytes of data written. Holes stay holes: only data is written to a new file,
    and zeros are written (or punched) only where an existing target needs them."""
    chain = Chain.open(dest)
    points = chain.upto(until)
    restore_map = RestoreMap(points)
    reader = ChunkReader()
    total = sum(end - start for start, end, kind, _ in pieces_of(restore_map)
                if kind == "data")
    advance = progress(total, "restore") if progress else (lambda n: None)
    try:
        if "://" in target:
            return asyncio.run(_restore_to_nbd(restore_map, reader, target, advance))
        return _restore_to_path(restore_map, reader, target, force, advance)
    finally:
        reader.close()


def _restore_to_path(restore_map: RestoreMap, reader: ChunkReader, target: str,
                     force: bool, advance) -> int:
    size = restore_map.size
    fresh = False
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is None or stat.S_ISREG(st.st_mode):
        if st is not None and st.st_size and not force:
            raise ChainError(f"{target} exists and is not empty; --force replaces it")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        fresh = True
    try:
        image = RawImage(target)
    except ImageError as exc:
        raise ChainError(str(exc)) from None
    try:
        if image.size < size:
            raise ChainError(f"{target} has {image.size} bytes; the backup needs {size}")
        written = 0
        for start, end, kind, piece in pieces_of(restore_map):
            if kind == "data":
                image.pwrite(start, reader.read(piece, start, end))
                written += end - start
                advance(end - start)
            elif not fresh and not image.punch_hole(start, end - start) and \
                    not image.zero_range(start, end - start):
                # zeros and holes over whatever the device held
                image.write_zeroes_slowly(start, end - start)
        image.flush()
        return written
    finally:
        image.close()


async def _restore_to_nbd(restore_map: RestoreMap, reader: ChunkReader, uri: str,
                          advance) -> int:
    address = parse_uri(uri)
    client = await NbdClient.connect(**address.connect_kwargs())
    try:
        if client.size < restore_map.size:
            raise ChainError(f"{uri} has {client.size} bytes; the backup needs "
                             f"{restore_map.size}")
        written = 0
        pending: list[asyncio.Future] = []
        for start, end, kind, piece in pieces_of(restore_map):
            if kind == "data":
                data = reader.read(piece, start, end)
                pending.append(asyncio.ensure_future(client.write(start, data)))
                written += end - start
                advance(end - start)
            else:
                pending.append(asyncio.ensure_future(client.write_zeroes(start, end - start)))
            if len(pending) >= 16:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        await client.flush()
        return written
    finally:
        await client.disconnect()


# -- instant restore: a restore point as a read-only image ------------------------------------

class ChainImage:
    """What nbdserve's Export needs of an image (RawImage's read verbs), read straight
    from a chain: `nbdserve backup serve` exports it read-only."""

    read_only = True
    is_block_device = False

    def __init__(self, dest: str, until: int | None = None) -> None:
        chain = Chain.open(dest)
        self.points = chain.upto(until)
        self.map = RestoreMap(self.points)
        self.size = self.map.size
        self.path = f"{dest} (restore point {self.points[-1].index})"
        self.reader = ChunkReader()
        self.lock = threading.Lock()  # the reader's cache is shared by worker threads

    def read_pieces(self, offset: int, length: int, sparse: bool,
                    nowait: bool = False) -> list[tuple[int, int, bytes | None]] | None:
        if nowait:
            return None  # decompression is work for a worker thread
        pieces: list[tuple[int, int, bytes | None]] = []
        with self.lock:
            for start, end, piece in self.map.covering(offset, length):
                if piece is None or piece.chunk.kind == "zero":
                    data = None if sparse else bytes(end - start)
                else:
                    try:
                        data = self.reader.read(piece, start, end)
                    except ChainError as exc:
                        raise OSError(5, str(exc)) from None
                pieces.append((start, end - start, data))
        if not sparse:
            return [(offset, length, b"".join(p[2] for p in pieces))]
        return pieces

    def allocation_words(self, offset: int, length: int, limit: int, data: int,
                         hole: int, typecode: str = "I") -> array:
        words = array(typecode)
        for start, end, piece in self.map.covering(offset, length):
            flags = data if piece is not None and piece.chunk.kind == "data" else hole
            if len(words) and words[-1] == flags:
                words[-2] += end - start
            elif len(words) // 2 >= limit:
                break
            else:
                words.extend((end - start, flags))
        return words

    def allocation(self, offset: int, length: int, limit: int):
        words = self.allocation_words(offset, length, limit, 1, 0)
        return zip(words[0::2], map(bool, words[1::2]), strict=True)

    def is_cached(self, offset: int, length: int) -> bool:
        return False  # never sendfile: the data is not in one file

    def readahead(self, offset: int, length: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.reader.close()


# -- verify -------------------------------------------------------------------------------------

def verify(dest: str) -> tuple[int, list[str]]:
    """Check every chunk of every point; returns (chunks checked, problems)."""
    chain = Chain.open(dest)
    problems: list[str] = []
    checked = 0
    reader = ChunkReader(cache_chunks=0)
    try:
        for point in chain.points:
            try:
                length = os.path.getsize(point.data_path)
            except OSError as exc:
                problems.append(f"{point.data}: {exc.strerror}")
                continue
            if length != point.stored_bytes:
                problems.append(f"{point.data}: {length} bytes, the point stored "
                                f"{point.stored_bytes}")
            for chunk in point.chunks:
                if chunk.kind != "data":
                    continue
                checked += 1
                try:
                    reader.chunk(point, chunk)
                except ChainError as exc:
                    problems.append(str(exc))
    finally:
        reader.close()
    return checked, problems


# -- merge ---------------------------------------------------------------------------------------

def merge(dest: str, until: int) -> Point:
    """Fold the points up to ``until`` into one full backup with its index (the chain
    after it continues unchanged), then delete what was folded.

    The new point's JSON replaces the old one in one rename, and keeps its id, so the
    next incremental's link still holds; a crash before the rename leaves the chain as
    it was, a crash after it leaves older points that are no longer part of the chain
    (the next merge deletes them)."""
    chain = Chain.open(dest)
    points = chain.upto(until)
    last = points[-1]
    restore_map = RestoreMap(points)
    reader = ChunkReader()
    merged = Point(index=last.index, kind="full", parent=None, parent_id=None,
                   size=last.size, export=last.export, bitmap=last.bitmap,
                   generation=last.generation, source=last.source, created=last.created,
                   compression=last.compression, id=last.id)
    writer = PointWriter(chain, merged)
    try:
        for start, end, kind, piece in pieces_of(restore_map):
            if kind == "data":
                data = reader.read(piece, start, end)
                writer.add_data(start, end - start, *writer.encode(data))
    except BaseException:
        writer.abandon()
        raise
    finally:
        reader.close()
    writer.finish()
    gone = [p for p in chain.points if p.index < until] + [last]
    for point in gone:
        if point.index != until:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(point.path)
        if point.data != merged.data:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(point.data_path)
    return merged
