"""The QDB file: an image's dirty bitmaps in one clustered, big-endian side file.

The layout is specified in docs/qdb-format.md; this module is its one implementation.
``read_qdb`` validates everything it reads and says precisely what is wrong;
``write_qdb`` replaces the file atomically (temporary file, fsync, rename, directory
fsync), so a crash or a full disk during a save leaves the previous file intact.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from bitarray import bitarray
from construct import Bytes, Int8ub, Int16ub, Int32ub, Int64ub, StreamError, Struct, this

from nbdserve.bitmaps.bitmap import granule_count
from nbdserve.bitmaps.files import replace_atomically_by
from nbdserve.image import ImageIdentity
from nbdserve.values import DEFAULT_GRANULARITY, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS
from nbdserve.values import MAX_BITMAP_NAME_BYTES as MAX_NAME_BYTES

MAGIC = b"QDB\0"
VERSION = 1
DEFAULT_CLUSTER_BITS = 12  # 4 KiB: small files for small bitmaps, few entries for big ones
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# Compatible features (a reader may ignore them).
QDB_COMPAT_IDENTITY_EXTENSION = 1 << 0  # header bytes 112-127: the image's ctime
QDB_COMPAT_HEADER_COPY = 1 << 1  # a copy of the header at HEADER_COPY_OFFSET
KNOWN_COMPATIBLE_FEATURES = QDB_COMPAT_IDENTITY_EXTENSION | QDB_COMPAT_HEADER_COPY

# Header flags.
QDB_FLAG_IN_USE = 1 << 0  # a server is recording; changes since the save are in the journal
QDB_FLAG_MOVED = 1 << 1  # the image was migrated away: this copy is stale (migration/)
QDB_FLAG_INCOMING = 1 << 2  # a migration into this image did not complete: it is partial
KNOWN_HEADER_FLAGS = QDB_FLAG_IN_USE | QDB_FLAG_MOVED | QDB_FLAG_INCOMING
MIGRATION_FLAGS = {"moved": QDB_FLAG_MOVED, "incoming": QDB_FLAG_INCOMING}
KNOWN_INCOMPATIBLE_FEATURES = 0  # a reader refuses a file with any bit it does not know

# Directory entry flags.
BME_FLAG_RECORDING = 1 << 0
BME_FLAG_INCONSISTENT = 1 << 1
KNOWN_ENTRY_FLAGS = BME_FLAG_RECORDING | BME_FLAG_INCONSISTENT
BME_TYPE_DIRTY_TRACKING = 1

# Bitmap table entries (as qcow2): offset in bits 9-55; with offset 0, bit 0 = all ones.
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_RESERVED_MASK = 0xFF000000000001FE
TABLE_ALL_ONES = 1

QdbHeader = Struct(
    "magic" / Bytes(4),
    "version" / Int32ub,
    "cluster_bits" / Int32ub,
    "header_length" / Int32ub,
    "incompatible_features" / Int64ub,
    "compatible_features" / Int64ub,
    "flags" / Int64ub,
    "image_size" / Int64ub,
    "image_mtime_ns" / Int64ub,
    "image_inode" / Int64ub,
    "image_device" / Int64ub,
    "save_counter" / Int64ub,
    "nb_bitmaps" / Int32ub,
    "directory_checksum" / Int32ub,
    "directory_offset" / Int64ub,
    "directory_size" / Int64ub,
    "header_checksum" / Int32ub,
    "reserved" / Int32ub,
)
HEADER_SIZE = QdbHeader.sizeof()  # 112: what every reader of version 1 needs
HEADER_CHECKSUM_OFFSET = 104
# The identity extension (compatible feature 0): bytes 112-127 of a 128-byte header.
IdentityExtension = Struct(
    "image_ctime_ns" / Int64ub,
    "checksum" / Int32ub,  # CRC-32 of image_ctime_ns
    "reserved" / Int32ub,
)
EXTENDED_HEADER_SIZE = HEADER_SIZE + IdentityExtension.sizeof()  # 128
# Compatible feature 1: the whole header again here, inside cluster 0 (which is at
# least 512 bytes), so a damaged header still names the bitmaps (salvage_bitmaps).
HEADER_COPY_OFFSET = 256

DirectoryEntry = Struct(
    "table_offset" / Int64ub,
    "table_entries" / Int32ub,
    "flags" / Int32ub,
    "type" / Int8ub,
    "granularity_bits" / Int8ub,
    "name_size" / Int16ub,
    "extra_data_size" / Int32ub,
    "generation" / Int64ub,
    "data_checksum" / Int32ub,
    "reserved" / Int32ub,
    "name" / Bytes(this.name_size),
    "padding" / Bytes(lambda ctx: (-(40 + ctx.name_size)) % 8),
)
ENTRY_FIXED_SIZE = 40


class QdbError(Exception):
    """The file as a whole cannot be used; the message says exactly why."""


@dataclass(slots=True)
class StoredBitmap:
    """One bitmap as found in (or to be written to) the file."""

    name: str
    granularity_bits: int
    generation: int
    recording: bool
    inconsistent: bool
    bits: bitarray | None  # None when the data could not be loaded
    problem: str = ""  # why the bitmap is unusable, when it is (without its name)


@dataclass(slots=True)
class QdbContents:
    identity: ImageIdentity
    in_use: bool = False
    save_counter: int = 0
    cluster_bits: int = DEFAULT_CLUSTER_BITS
    migration: str = ""  # "moved" or "incoming" (MIGRATION_FLAGS), else ""
    bitmaps: list[StoredBitmap] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)  # decode_qdb(complete=True)


def _crc(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def bitmap_bytes(bits: bitarray) -> bytes:
    """The bitmap's serialised bytes: LSB-first, zero tail bits."""
    if bits.endian != "little":
        raise ValueError("bitmaps are stored LSB-first")
    return bits.tobytes()  # bitarray pads the last byte with zero bits


# -- writing ------------------------------------------------------------------------------

def encode_qdb(contents: QdbContents) -> bytes:
    """The whole file as bytes (for tests and small files; saves stream, write_qdb)."""
    out = bytearray()

    def put(offset: int, chunk: bytes) -> None:
        if len(out) < offset + len(chunk):
            out.extend(bytes(offset + len(chunk) - len(out)))
        out[offset : offset + len(chunk)] = chunk

    size = encode_qdb_into(contents, put)
    out.extend(bytes(size - len(out)))
    return bytes(out)


def write_qdb(path: str, contents: QdbContents) -> None:
    """Replace the file at path atomically and durably, writing it cluster by cluster:
    a save holds no second copy of the bits (issue 11)."""
    def fill(fd: int) -> None:
        size = encode_qdb_into(contents, lambda offset, chunk: _pwrite_all(fd, chunk, offset))
        os.ftruncate(fd, size)  # what was not written is zero
    replace_atomically_by(path, fill)


def _pwrite_all(fd: int, chunk: bytes, offset: int) -> None:
    view = memoryview(chunk)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


class _Pieces:
    """One bitmap's bits cut into clusters of the file: each cluster is all zeros,
    all ones (both encoded in the table alone) or data. Nothing is copied whole."""

    def __init__(self, bits: bitarray | None, cluster: int) -> None:
        self.bits = bits
        self.cluster = cluster
        self.size = (len(bits) + 7) // 8 if bits is not None else 0  # serialised bytes
        self.count = (self.size + cluster - 1) // cluster
        self.kinds = bytearray(self.count)  # 0 zeros, 1 ones, 2 data
        crc = 0
        for index in range(self.count):
            kind, piece = self._classify(index)
            self.kinds[index] = kind
            crc = zlib.crc32(piece, crc)
        self.checksum = crc & 0xFFFFFFFF

    def _classify(self, index: int) -> tuple[int, bytes]:
        bits, cluster = self.bits, self.cluster
        low = index * cluster * 8
        high = min(low + cluster * 8, len(bits))
        piece_size = min(cluster, self.size - index * cluster)
        ones = bits.count(1, low, high)
        if ones == 0:
            return 0, _filled(0, piece_size)
        if ones == high - low == cluster * 8:
            return 1, _filled(0xFF, piece_size)
        return 2, self.piece(index)

    def piece(self, index: int) -> bytes:
        low = index * self.cluster * 8
        return self.bits[low : low + self.cluster * 8].tobytes()  # zero tail bits


_FILLED: dict[tuple[int, int], bytes] = {}


def _filled(value: int, size: int) -> bytes:
    key = (value, size)
    if key not in _FILLED:
        _FILLED[key] = bytes([value]) * size
    return _FILLED[key]


def encode_qdb_into(contents: QdbContents, put: Callable[[int, bytes], None]) -> int:
    """Lay the file out and hand it to put(offset, bytes) in increasing offsets;
    returns the file's size (bytes not put are zero)."""
    cluster_bits = contents.cluster_bits
    cluster = 1 << cluster_bits

    def clusters_for(size: int) -> int:
        return max(1, (size + cluster - 1) // cluster)

    pieces = [_Pieces(b.bits, cluster) for b in contents.bitmaps]
    names = [b.name.encode() for b in contents.bitmaps]
    directory_size = sum(ENTRY_FIXED_SIZE + len(n) + (-(ENTRY_FIXED_SIZE + len(n))) % 8
                         for n in names)
    next_cluster = 1 + (clusters_for(directory_size) if contents.bitmaps else 0)
    directory_offset = cluster if contents.bitmaps else 0
    # Each bitmap: its table, then its data clusters (all-zero and all-one clusters are
    # encoded in the table and take no space).
    tables: list[tuple[int, bytes, list[tuple[int, int]]]] = []
    for bitmap_pieces in pieces:
        table_offset = next_cluster * cluster
        next_cluster += clusters_for(bitmap_pieces.count * 8)
        entries = bytearray()
        placed = []  # (offset in the file, piece index)
        for index, kind in enumerate(bitmap_pieces.kinds):
            if kind == 0:
                entries += bytes(8)
            elif kind == 1:
                entries += TABLE_ALL_ONES.to_bytes(8, "big")
            else:
                entries += (next_cluster * cluster).to_bytes(8, "big")
                placed.append((next_cluster * cluster, index))
                next_cluster += 1
        tables.append((table_offset, bytes(entries), placed))
    directory = bytearray()
    for bitmap, bitmap_pieces, name, (table_offset, _, _) in zip(
            contents.bitmaps, pieces, names, tables, strict=True):
        flags = (BME_FLAG_RECORDING if bitmap.recording else 0) | (
            BME_FLAG_INCONSISTENT if bitmap.inconsistent or bitmap.bits is None else 0)
        directory += DirectoryEntry.build(dict(
            table_offset=table_offset, table_entries=bitmap_pieces.count,
            flags=flags, type=BME_TYPE_DIRTY_TRACKING,
            granularity_bits=bitmap.granularity_bits, name_size=len(name),
            extra_data_size=0, generation=bitmap.generation,
            data_checksum=bitmap_pieces.checksum,
            reserved=0, name=name, padding=bytes((-(ENTRY_FIXED_SIZE + len(name))) % 8),
        ))
    identity = contents.identity
    header = bytearray(QdbHeader.build(dict(
        magic=MAGIC, version=VERSION, cluster_bits=cluster_bits,
        header_length=EXTENDED_HEADER_SIZE, incompatible_features=0,
        compatible_features=QDB_COMPAT_IDENTITY_EXTENSION | QDB_COMPAT_HEADER_COPY,
        flags=(QDB_FLAG_IN_USE if contents.in_use else 0)
        | MIGRATION_FLAGS.get(contents.migration, 0),
        image_size=identity.size, image_mtime_ns=identity.mtime_ns,
        image_inode=identity.inode, image_device=identity.device,
        save_counter=contents.save_counter, nb_bitmaps=len(contents.bitmaps),
        directory_checksum=_crc(bytes(directory)), directory_offset=directory_offset,
        directory_size=len(directory), header_checksum=0, reserved=0,
    )))
    header[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = _crc(bytes(header)).to_bytes(
        4, "big")
    ctime = identity.ctime_ns.to_bytes(8, "big")
    header += IdentityExtension.build(dict(image_ctime_ns=identity.ctime_ns,
                                           checksum=_crc(ctime), reserved=0))
    put(0, bytes(header))
    put(HEADER_COPY_OFFSET, bytes(header))
    if directory:
        put(directory_offset, bytes(directory))
    for bitmap_pieces, (table_offset, table, placed) in zip(pieces, tables, strict=True):
        put(table_offset, table)
        for offset, index in placed:
            put(offset, bitmap_pieces.piece(index))
    return next_cluster * cluster


# -- reading ------------------------------------------------------------------------------

def migration_state(path: str) -> str:
    """What a migration left in the header of the QDB file at path: "moved" (this
    image went elsewhere and is stale), "incoming" (a migration into it did not
    complete) or "". Reads the header only; a missing or damaged file says ""."""
    try:
        with open(path, "rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError:
        return ""
    if len(data) < HEADER_SIZE:
        return ""
    header = QdbHeader.parse(data)
    raw = bytearray(data)
    raw[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = bytes(4)
    if header.magic != MAGIC or _crc(bytes(raw)) != header.header_checksum:
        return ""
    return next((state for state, flag in MIGRATION_FLAGS.items() if header.flags & flag), "")


def read_qdb(path: str, *, complete: bool = False) -> QdbContents:
    with open(path, "rb") as f:
        return decode_qdb(FileView(f.fileno()), complete=complete)


class FileView:
    """An open file read on demand with pread: what decode_qdb needs of bytes (len
    and slices), so reading a file never holds it whole (issue 11: a check of an
    8 TiB image's 4 KiB bitmap peaked at three times its bits)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, where: slice) -> bytes:
        start, stop, _ = where.indices(self.size)
        chunks = []
        while start < stop:
            chunk = os.pread(self.fd, stop - start, start)
            if not chunk:
                break  # the file shrank: what a reader sees is what is there
            chunks.append(chunk)
            start += len(chunk)
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def decode_qdb(data: bytes, *, complete: bool = False) -> QdbContents:
    """Parse and validate; file-level damage raises QdbError, damage confined to one
    bitmap marks that bitmap unusable (``bits`` None, ``problem`` set).

    With ``complete`` (what `qdb check` asks for), also look at what a reader does not
    need: clusters nothing refers to, and non-zero bytes in the unused ends of the
    header's, the directory's and the tables' clusters. Those are listed in
    ``findings``; they do not make a bitmap unusable, so a server loads such a file."""
    if len(data) < HEADER_SIZE:
        raise QdbError(f"file is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header")
    header = QdbHeader.parse(data[:HEADER_SIZE])
    if header.magic != MAGIC:
        raise QdbError(f"bad magic {header.magic!r} (expected {MAGIC!r}): not a QDB file")
    if header.version != VERSION:
        raise QdbError(f"unsupported version {header.version} (this reader knows {VERSION})")
    if header.header_length < HEADER_SIZE:
        raise QdbError(f"header length {header.header_length} is below {HEADER_SIZE}")
    raw_header = bytearray(data[:HEADER_SIZE])
    raw_header[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = bytes(4)
    if _crc(bytes(raw_header)) != header.header_checksum:
        raise QdbError("header checksum mismatch: the header is corrupted")
    if not MIN_CLUSTER_BITS <= header.cluster_bits <= MAX_CLUSTER_BITS:
        raise QdbError(f"cluster_bits {header.cluster_bits} outside "
                       f"{MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    unknown = header.incompatible_features & ~KNOWN_INCOMPATIBLE_FEATURES
    if unknown:
        raise QdbError(f"unknown incompatible feature bits 0x{unknown:x}")
    if header.flags & ~KNOWN_HEADER_FLAGS:
        raise QdbError(f"reserved header flag bits set: 0x{header.flags & ~KNOWN_HEADER_FLAGS:x}")
    if header.reserved:
        raise QdbError("reserved header field is not zero")
    cluster = 1 << header.cluster_bits
    if len(data) % cluster:
        raise QdbError(f"file size {len(data)} is not a multiple of the cluster size {cluster} "
                       "(truncated?)")
    used: dict[int, str] = {0: "the header"}
    regions: list[tuple[int, int, str]] = [(0, HEADER_SIZE, "the header")]

    def claim(offset: int, size: int, what: str, owner: str = "") -> None:
        """Record the clusters [offset, offset+size) as used by `what` (of `owner`, a
        bitmap); overlap is damage. Messages name the owner once, first."""
        prefix = f"{owner}: " if owner else ""
        if offset % cluster:
            raise QdbError(f"{prefix}{what} at offset {offset} is not cluster-aligned")
        if offset + size > len(data):
            raise QdbError(f"{prefix}{what} at offset {offset} (+{size}) lies past the end "
                           f"of the file ({len(data)} bytes)")
        label = f"{what} of {owner}" if owner else what
        if not what.startswith("data cluster"):  # data clusters' slack is checked on read
            regions.append((offset, size, label))
        for index in range(offset // cluster, (offset + max(size, 1) + cluster - 1) // cluster):
            if index in used:
                raise QdbError(f"{prefix}{what} overlaps {used[index]} in cluster {index}")
            used[index] = label

    header_end = HEADER_SIZE
    ctime_ns = 0
    early: list[str] = []  # findings about the header (decode_qdb(complete=True))
    if header.compatible_features & QDB_COMPAT_IDENTITY_EXTENSION and \
            header.header_length >= EXTENDED_HEADER_SIZE and len(data) >= EXTENDED_HEADER_SIZE:
        extension = IdentityExtension.parse(data[HEADER_SIZE:EXTENDED_HEADER_SIZE])
        if extension.checksum != _crc(data[HEADER_SIZE:HEADER_SIZE + 8]) or \
                extension.reserved:
            raise QdbError("the header's identity extension is corrupted")
        ctime_ns = extension.image_ctime_ns
        header_end = EXTENDED_HEADER_SIZE
    if header.compatible_features & QDB_COMPAT_HEADER_COPY:
        if cluster < HEADER_COPY_OFFSET + header_end:
            raise QdbError("a header copy is announced, but cluster 0 has no room for it")
        regions[0] = (HEADER_COPY_OFFSET, header_end, "the header's copy")
        if any(data[header_end:HEADER_COPY_OFFSET]):
            early.append(f"non-zero bytes after the header (offset {header_end} to "
                         f"{HEADER_COPY_OFFSET})")
        if data[HEADER_COPY_OFFSET:HEADER_COPY_OFFSET + header_end] != data[:header_end]:
            early.append("the header's copy differs from the header")
    else:
        regions[0] = (0, header_end, "the header")
    contents = QdbContents(
        identity=ImageIdentity(header.image_size, header.image_mtime_ns, header.image_inode,
                               header.image_device, ctime_ns),
        in_use=bool(header.flags & QDB_FLAG_IN_USE),
        save_counter=header.save_counter,
        migration=next((state for state, flag in MIGRATION_FLAGS.items()
                        if header.flags & flag), ""),
        cluster_bits=header.cluster_bits,
    )
    if header.nb_bitmaps == 0:
        if header.directory_offset or header.directory_size:
            raise QdbError("no bitmaps, but a directory is recorded")
        if complete:
            contents.findings = early + _slack_findings(data, cluster, used, regions, contents)
        return contents
    claim(header.directory_offset, header.directory_size, "the bitmap directory")
    directory = data[header.directory_offset :
                     header.directory_offset + header.directory_size]
    if _crc(directory) != header.directory_checksum:
        raise QdbError("directory checksum mismatch: the bitmap directory is corrupted")
    position = 0
    names: set[str] = set()
    for index in range(header.nb_bitmaps):
        try:
            entry = DirectoryEntry.parse(directory[position:])
        except StreamError:
            raise QdbError(f"directory entry {index} runs past the directory") from None
        position += ENTRY_FIXED_SIZE + entry.name_size + len(entry.padding)
        contents.bitmaps.append(_decode_entry(data, entry, index, names, claim, cluster,
                                              header.image_size))
    if position != len(directory):
        raise QdbError(f"directory has {len(directory) - position} bytes after its "
                       f"{header.nb_bitmaps} entries")
    if complete:
        contents.findings = early + _slack_findings(data, cluster, used, regions, contents)
    return contents


def _slack_findings(data, cluster: int, used: dict[int, str],
                    regions: list[tuple[int, int, str]], contents: QdbContents) -> list[str]:
    """What a complete check finds beyond what reading needs (see decode_qdb)."""
    findings = []
    for offset, size, what in regions:
        end = -(-(offset + size) // cluster) * cluster
        if any(data[offset + size : end]):
            findings.append(f"non-zero bytes after {what} (offset {offset + size} to {end})")
    if any(b.bits is None for b in contents.bitmaps):
        return findings  # a damaged bitmap's clusters were not all claimed: no leak report
    unused = [index for index in range(len(data) // cluster) if index not in used]
    if unused:
        shown = ", ".join(str(index) for index in unused[:8])
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        findings.append(f"{len(unused)} clusters are not referenced by anything "
                        f"(cluster {shown}{more})")
    return findings


def _decode_entry(data, entry, index, names, claim, cluster, image_size) -> StoredBitmap:
    where = f"bitmap entry {index}"
    if not 1 <= entry.name_size <= MAX_NAME_BYTES:
        raise QdbError(f"{where}: name size {entry.name_size} outside 1..{MAX_NAME_BYTES}")
    try:
        name = entry.name.decode("utf-8")
    except UnicodeDecodeError:
        raise QdbError(f"{where}: name is not valid UTF-8") from None
    where = f"bitmap '{name}'"
    if name in names:
        raise QdbError(f"{where}: the name appears twice")
    names.add(name)
    if any(entry.padding):
        raise QdbError(f"{where}: non-zero padding after the name")
    bitmap = StoredBitmap(name, entry.granularity_bits, entry.generation,
                          bool(entry.flags & BME_FLAG_RECORDING),
                          bool(entry.flags & BME_FLAG_INCONSISTENT), None)
    try:
        bitmap.bits = _decode_bits(data, entry, where, claim, cluster, image_size)
    except QdbError as error:
        # Damage confined to this bitmap: the others stay usable. The problem is
        # stored without the "bitmap 'NAME': " prefix: whoever reports it names the
        # bitmap once.
        bitmap.problem = str(error).removeprefix(f"{where}: ")
    return bitmap


def _decode_bits(data, entry, where, claim, cluster, image_size) -> bitarray:
    if entry.flags & ~KNOWN_ENTRY_FLAGS:
        raise QdbError(f"{where}: reserved flag bits 0x{entry.flags & ~KNOWN_ENTRY_FLAGS:x}")
    if entry.type != BME_TYPE_DIRTY_TRACKING:
        raise QdbError(f"{where}: unknown bitmap type {entry.type}")
    if not MIN_GRANULARITY_BITS <= entry.granularity_bits <= MAX_GRANULARITY_BITS:
        raise QdbError(f"{where}: granularity_bits {entry.granularity_bits} outside "
                       f"{MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS}")
    if entry.extra_data_size or entry.reserved:
        raise QdbError(f"{where}: extra data or reserved fields are not zero")
    granules = granule_count(image_size, entry.granularity_bits)
    size = (granules + 7) // 8
    if entry.table_entries != (size + cluster - 1) // cluster:
        raise QdbError(f"{where}: table has {entry.table_entries} entries; "
                       f"{(size + cluster - 1) // cluster} expected for the image size")
    claim(entry.table_offset, entry.table_entries * 8, "the table", where)
    table = data[entry.table_offset : entry.table_offset + entry.table_entries * 8]
    # Cluster by cluster into the bits: no whole-bitmap buffer beside them.
    bits = bitarray(granules, endian="little")
    bits.setall(0)
    crc = 0
    for i in range(entry.table_entries):
        value = int.from_bytes(table[i * 8 : i * 8 + 8], "big")
        if value & TABLE_RESERVED_MASK:
            raise QdbError(f"{where}: table entry {i} has reserved bits set")
        offset = value & TABLE_OFFSET_MASK
        piece_size = min(cluster, size - i * cluster)
        low = i * cluster * 8
        high = min(low + piece_size * 8, granules)
        if offset:
            if value & TABLE_ALL_ONES:
                raise QdbError(f"{where}: table entry {i} has both an offset and all-ones")
            claim(offset, cluster, f"data cluster {i}", where)
            piece = data[offset : offset + cluster]
            if any(piece[piece_size:]):
                raise QdbError(f"{where}: non-zero bytes after the end of the bitmap")
            piece = piece[:piece_size]
            crc = zlib.crc32(piece, crc)
            chunk = bitarray(endian="little")
            chunk.frombytes(piece)
            if chunk.count(1, high - low):
                raise QdbError(f"{where}: bits set past the end of the image")
            bits[low:high] = chunk[: high - low]
        elif value & TABLE_ALL_ONES:
            crc = zlib.crc32(_filled(0xFF, piece_size), crc)
            if high - low < piece_size * 8:
                raise QdbError(f"{where}: bits set past the end of the image")
            bits[low:high] = 1
        else:
            crc = zlib.crc32(_filled(0, piece_size), crc)
    if crc & 0xFFFFFFFF != entry.data_checksum:
        raise QdbError(f"{where}: data checksum mismatch")
    return bits


# -- salvage ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SalvagedBitmap:
    """What a damaged file still says about one of its bitmaps: enough to bring it
    back inconsistent (all-dirty) rather than let it vanish."""

    name: str
    granularity_bits: int
    generation: int
    recording: bool


def salvage_bitmaps(data: bytes) -> list[SalvagedBitmap]:
    """The bitmaps a file that ``decode_qdb`` refused still names: from the header,
    else its copy (a header whose checksum holds is tried first), reading the
    directory leniently. Never raises; an empty list when nothing can be read."""
    headers = []
    for start in (0, HEADER_COPY_OFFSET):
        if len(data) < start + HEADER_SIZE:
            continue
        header = QdbHeader.parse(data[start : start + HEADER_SIZE])
        raw = bytearray(data[start : start + HEADER_SIZE])
        raw[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = bytes(4)
        intact = header.magic == MAGIC and _crc(bytes(raw)) == header.header_checksum
        headers.append((not intact, start, header))
    for _damaged, _start, header in sorted(headers, key=lambda h: (h[0], h[1])):
        found = _salvage_directory(data, header)
        if found:
            return found
    return []


def _salvage_directory(data: bytes, header) -> list[SalvagedBitmap]:
    offset, size = header.directory_offset, header.directory_size
    if not (offset > 0 and 0 < size <= len(data) - offset):
        return []
    directory = data[offset : offset + size]
    found: list[SalvagedBitmap] = []
    names: set[str] = set()
    position = 0
    for _ in range(min(header.nb_bitmaps, size // ENTRY_FIXED_SIZE)):
        try:
            entry = DirectoryEntry.parse(directory[position:])
        except StreamError:
            break
        position += ENTRY_FIXED_SIZE + entry.name_size + len(entry.padding)
        if not 1 <= entry.name_size <= MAX_NAME_BYTES:
            break  # lengths are garbage from here on
        try:
            name = entry.name.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if name in names or not name.isprintable():
            continue
        names.add(name)
        bits = entry.granularity_bits
        if not MIN_GRANULARITY_BITS <= bits <= MAX_GRANULARITY_BITS:
            bits = DEFAULT_GRANULARITY.bit_length() - 1  # all-dirty: any size is safe
        found.append(SalvagedBitmap(name, bits, entry.generation,
                                    bool(entry.flags & BME_FLAG_RECORDING)))
    return found
