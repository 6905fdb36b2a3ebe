"""A backup chain on disk: a full backup and its incrementals (docs/backup.md).

    DEST/chain.json        {"format": "nbdserve-backup-chain", "version": 1, "id", "size"}
    DEST/NNNNNN-ID.data    a point's chunks, back to back (compressed or not)
    DEST/NNNNNN.json       the point's description (naming its data file), written
                           last: a point exists once its JSON does

A point lists its extents, each cut in chunks of at most CHUNK bytes: ``data`` chunks
stored in the data file with a SHA-256 checksum of their uncompressed bytes, ``zero``
chunks (nothing stored; they read as zeros). Whatever no point of the chain covers up
to a restore point is a hole of the image. Each point has a random id and names its
parent by index and id, so a parent from another chain is refused.
"""

from __future__ import annotations

import bisect
import contextlib
import datetime
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field

import zstandard

FORMAT_CHAIN = "nbdserve-backup-chain"
FORMAT_POINT = "nbdserve-backup-point"
VERSION = 1
CHUNK = 4 << 20  # the unit of checksums, compression and reads when serving
COMPRESSIONS = ("zstd", "none")
ZSTD_LEVEL = 1  # measured: most of level 3's ratio at twice the speed (docs/backup.md)


class ChainError(Exception):
    """A chain that cannot be used as it is; the message says why and where."""


def checksum(data: bytes | bytearray | memoryview) -> str:
    """SHA-256: measured faster than BLAKE2b here (SHA extensions: 1.2 GB/s against
    0.5), and it releases the GIL on large buffers."""
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class Chunk:
    """[offset, offset+length) of the image: data stored at [stored, stored+stored_length)
    of the point's data file, or zeros (kind "zero", nothing stored)."""

    offset: int
    length: int
    kind: str  # "data" or "zero"
    stored: int = 0
    stored_length: int = 0
    checksum: str = ""

    def to_json(self) -> list:
        return [self.offset, self.length, self.kind, self.stored, self.stored_length,
                self.checksum]

    @classmethod
    def from_json(cls, item, where: str) -> Chunk:
        try:
            offset, length, kind, stored, stored_length, digest = item
            if kind not in ("data", "zero") or min(offset, length, stored,
                                                     stored_length) < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ChainError(f"{where}: malformed extent {item!r}") from None
        return cls(offset, length, kind, stored, stored_length, digest)


@dataclass
class Point:
    index: int
    kind: str  # "full" or "incremental"
    parent: int | None
    parent_id: str | None
    size: int
    export: str
    bitmap: str | None  # the bitmap that records what changes after this point
    generation: str | None  # that bitmap's generation when the point was taken
    source: str  # "control" (nbdserve made the snapshot) or "uri" (the caller did)
    created: str
    compression: str
    chunks: list[Chunk] = field(default_factory=list)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    data: str = ""  # the data file's name, beside the JSON file
    path: str = ""  # the JSON file

    @property
    def data_path(self) -> str:
        return os.path.join(os.path.dirname(self.path), self.data)

    @property
    def logical_bytes(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def stored_bytes(self) -> int:
        return sum(c.stored_length for c in self.chunks)

    def to_json(self) -> dict:
        return {"format": FORMAT_POINT, "version": VERSION, "id": self.id,
                "index": self.index, "kind": self.kind, "parent": self.parent,
                "parent_id": self.parent_id, "data": self.data, "size": self.size,
                "export": self.export, "bitmap": self.bitmap,
                "generation": self.generation, "source": self.source,
                "created": self.created, "compression": self.compression,
                "extents": [c.to_json() for c in self.chunks]}

    @classmethod
    def load(cls, path: str) -> Point:
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise ChainError(f"{path}: unreadable: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_POINT:
            raise ChainError(f"{path}: not a backup point")
        if data.get("version") != VERSION:
            raise ChainError(f"{path}: format version {data.get('version')} is not "
                             f"supported (this nbdserve reads version {VERSION})")
        try:
            point = cls(index=int(data["index"]), kind=data["kind"], parent=data["parent"],
                        parent_id=data["parent_id"], size=int(data["size"]),
                        export=data["export"], bitmap=data["bitmap"],
                        generation=data["generation"], source=data["source"],
                        created=data["created"], compression=data["compression"],
                        chunks=[Chunk.from_json(item, path) for item in data["extents"]],
                        id=str(data["id"]), data=str(data["data"]), path=path)
        except (KeyError, TypeError, ValueError):
            raise ChainError(f"{path}: malformed backup point") from None
        if point.kind not in ("full", "incremental") or \
                point.compression not in COMPRESSIONS or os.sep in point.data or \
                not point.data.endswith(".data"):
            raise ChainError(f"{path}: malformed backup point")
        return point


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Chain:
    """The points of DEST, checked link by link when opened."""

    def __init__(self, directory: str, chain_id: str, size: int, points: list[Point]) -> None:
        self.directory = directory
        self.id = chain_id
        self.size = size
        self.points = points

    @classmethod
    def open(cls, directory: str, *, create_size: int | None = None) -> Chain:
        """Open DEST; with create_size, start an empty chain if there is none (or if
        the image's size changed: a new full backup starts a new chain then)."""
        path = os.path.join(directory, "chain.json")
        if not os.path.exists(path):
            if create_size is None:
                raise ChainError(f"{directory}: no backup chain here (no chain.json)")
            os.makedirs(directory, exist_ok=True)
            chain = cls(directory, secrets.token_hex(6), create_size, [])
            chain._write_header()
            return chain
        try:
            with open(path) as f:
                header = json.load(f)
            if header.get("format") != FORMAT_CHAIN or header.get("version") != VERSION:
                raise ChainError(f"{path}: not a version {VERSION} backup chain")
            chain = cls(directory, str(header["id"]), int(header["size"]), [])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ChainError(f"{path}: unreadable: {exc}") from None
        names = sorted(n for n in os.listdir(directory)
                       if n.endswith(".json") and n[:-5].isdigit())
        chain.points = [Point.load(os.path.join(directory, n)) for n in names]
        chain.check_links()
        return chain

    def _write_header(self) -> None:
        write_atomically(os.path.join(self.directory, "chain.json"), json.dumps(
            {"format": FORMAT_CHAIN, "version": VERSION, "id": self.id,
             "size": self.size}).encode())

    def check_links(self) -> None:
        """Every incremental's parent is the point before it, with the JSON it names.
        A full backup starts a new chain in the same directory (older points stay
        restorable until merged away)."""
        previous = None
        for point in self.points:
            where = os.path.basename(point.path)
            if point.kind == "incremental":
                if previous is None:
                    raise ChainError(f"{where}: the chain does not start with a full "
                                     "backup (its parent is missing)")
                if point.parent != previous.index or point.parent_id != previous.id:
                    raise ChainError(f"{where}: its parent does not match "
                                     f"{os.path.basename(previous.path)} (replaced or "
                                     "edited); the chain after it cannot be trusted")
                if point.size != previous.size:
                    raise ChainError(f"{where}: image size {point.size} differs from its "
                                     f"parent's {previous.size}")
            previous = point

    @property
    def tip(self) -> Point | None:
        return self.points[-1] if self.points else None

    def upto(self, until: int | None) -> list[Point]:
        """The points restore point ``until`` (an index; default the newest) is made
        of: the last full backup at or before it, and the incrementals after that."""
        if not self.points:
            raise ChainError(f"{self.directory}: the chain has no backup yet")
        if until is None:
            until = self.points[-1].index
        chosen = [p for p in self.points if p.index <= until]
        if not chosen or chosen[-1].index != until:
            known = ", ".join(str(p.index) for p in self.points)
            raise ChainError(f"no restore point {until} (the chain has {known})")
        start = max(i for i, p in enumerate(chosen) if p.kind == "full")
        return chosen[start:]

    def remove_leftovers(self) -> list[str]:
        """Delete what interrupted runs left: partial data files, temporary JSON, and
        data files no point refers to. Only a run does this (one writer at a time)."""
        used = {p.data for p in self.points}
        removed = []
        for name in os.listdir(self.directory):
            if name.endswith((".partial", ".tmp")) or \
                    (name.endswith(".data") and name not in used):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
                    removed.append(name)
        return removed

    def point_path(self, index: int) -> str:
        return os.path.join(self.directory, f"{index:06d}.json")


def write_atomically(path: str, data: bytes) -> None:
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class PointWriter:
    """Writes one point: chunks appended to NNNNNN.data.partial, then the data file and
    the JSON put in place, in that order."""

    def __init__(self, chain: Chain, point: Point) -> None:
        self.chain = chain
        self.point = point
        point.path = chain.point_path(point.index)
        point.data = f"{point.index:06d}-{secrets.token_hex(4)}.data"
        self.partial = point.data_path + ".partial"
        self.file = open(self.partial, "wb", buffering=0)  # noqa: SIM115 (finish/abandon)
        self.position = 0
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) \
            if point.compression == "zstd" else None

    def encode(self, data: bytes) -> tuple[bytes, str]:
        """(what to store, checksum): run in worker threads (hashing and zstd release
        the GIL), so chunks encode in parallel while the copy goes on."""
        digest = checksum(data)
        if self.compressor is not None:
            return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data), digest
        return data, digest

    def add_data(self, offset: int, length: int, stored: bytes, digest: str) -> None:
        view = memoryview(stored)
        while view:
            view = view[self.file.write(view):]
        self.point.chunks.append(Chunk(offset, length, "data", self.position, len(stored),
                                       digest))
        self.position += len(stored)

    def add_zero(self, offset: int, length: int) -> None:
        chunks = self.point.chunks
        if chunks and chunks[-1].kind == "zero" and \
                chunks[-1].offset + chunks[-1].length == offset:
            chunks[-1].length += length
        else:
            chunks.append(Chunk(offset, length, "zero"))

    def finish(self) -> Point:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.point.data_path)
        raw = json.dumps(self.point.to_json(), separators=(",", ":")).encode()
        write_atomically(self.point.path, raw)
        with contextlib.suppress(OSError):  # the directory entry, for a crash after this
            fd = os.open(self.chain.directory, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        self.chain.points = [p for p in self.chain.points if p.index != self.point.index]
        self.chain.points.append(self.point)
        self.chain.points.sort(key=lambda p: p.index)
        return self.point

    def abandon(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)


# -- reading a restore point ------------------------------------------------------------

@dataclass(slots=True)
class Piece:
    """[start, end) of the image at a restore point, from one chunk of one point."""

    start: int
    end: int
    point: Point
    chunk: Chunk


class RestoreMap:
    """What a restore point holds, byte range by byte range: the newest point's chunk
    wins wherever points overlap. Ranges covered by no chunk are holes."""

    def __init__(self, points: list[Point]) -> None:
        self.points = points
        self.size = points[-1].size if points else 0
        self.pieces: list[Piece] = []  # disjoint, sorted by start
        starts: list[int] = []
        for point in reversed(points):  # newest first: only what is still uncovered
            added: list[Piece] = []
            for chunk in point.chunks:
                for start, end in _uncovered(starts, self.pieces, chunk.offset,
                                             chunk.offset + chunk.length):
                    added.append(Piece(start, end, point, chunk))
            if added:
                self.pieces = sorted(self.pieces + added, key=lambda p: p.start)
                starts = [p.start for p in self.pieces]
        self.starts = starts

    def covering(self, offset: int, length: int) -> list[tuple[int, int, Piece | None]]:
        """(start, end, piece or None for a hole) covering [offset, offset+length)."""
        end = offset + length
        out: list[tuple[int, int, Piece | None]] = []
        index = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        position = offset
        pieces = self.pieces
        while position < end:
            if index < len(pieces) and pieces[index].end <= position:
                index += 1
                continue
            if index >= len(pieces) or pieces[index].start >= end:
                out.append((position, end, None))
                break
            piece = pieces[index]
            if piece.start > position:
                out.append((position, piece.start, None))
                position = piece.start
                continue
            stop = min(piece.end, end)
            out.append((position, stop, piece))
            position = stop
            index += 1
        return out


def _uncovered(starts: list[int], pieces: list[Piece], start: int,
               end: int) -> list[tuple[int, int]]:
    """Parts of [start, end) that no piece covers."""
    out = []
    index = max(bisect.bisect_right(starts, start) - 1, 0)
    position = start
    while position < end:
        while index < len(pieces) and pieces[index].end <= position:
            index += 1
        if index >= len(pieces) or pieces[index].start >= end:
            out.append((position, end))
            break
        piece = pieces[index]
        if piece.start > position:
            out.append((position, piece.start))
        position = max(position, piece.end)
        index += 1
    return out


class ChunkReader:
    """Reads chunks of points, checking each against its checksum, with a small cache
    of decompressed chunks (reads of one chunk come in several requests)."""

    def __init__(self, cache_chunks: int = 8) -> None:
        self.files: dict[str, int] = {}
        self.cache: dict[tuple[str, int], bytes] = {}
        self.cache_chunks = cache_chunks
        self.decompressor = zstandard.ZstdDecompressor()

    def chunk(self, point: Point, chunk: Chunk) -> bytes:
        key = (point.data_path, chunk.stored)
        data = self.cache.get(key)
        if data is not None:
            return data
        fd = self.files.get(point.data_path)
        if fd is None:
            try:
                fd = os.open(point.data_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise ChainError(f"{point.data_path}: {exc.strerror}") from None
            self.files[point.data_path] = fd
        stored = os.pread(fd, chunk.stored_length, chunk.stored)
        where = (f"{os.path.basename(point.data_path)}: extent at image offset "
                 f"{chunk.offset} (length {chunk.length})")
        if len(stored) != chunk.stored_length:
            raise ChainError(f"{where}: the data file is truncated")
        if point.compression == "zstd":
            try:
                data = self.decompressor.decompress(stored, max_output_size=chunk.length)
            except zstandard.ZstdError as exc:
                raise ChainError(f"{where}: damaged ({exc})") from None
        else:
            data = stored
        if len(data) != chunk.length or checksum(data) != chunk.checksum:
            raise ChainError(f"{where}: checksum mismatch (damaged)")
        if self.cache_chunks:
            if len(self.cache) >= self.cache_chunks:
                self.cache.pop(next(iter(self.cache)))  # the oldest
            self.cache[key] = data
        return data

    def read(self, piece: Piece, start: int, end: int) -> bytes:
        data = self.chunk(piece.point, piece.chunk)
        base = piece.chunk.offset
        return data[start - base:end - base]

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        self.cache.clear()
