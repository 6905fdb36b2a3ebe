"""A raw image file (or block device): the bottom of the I/O chain.

Only byte-moving primitives live here: reads and read planning (which parts of a
range are data and which holes), writes, including from a pipe (splice) and to a
socket (sendfile), hole punching and zeroing. Policy (validation, bitmaps,
durability) sits in ``nbdserve.export``, and the file descriptor never leaves this
class. Every method is a plain blocking call: the caller decides whether it runs on the
event loop (page-cache hits) or in a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import operator
import os
import stat
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

# fallocate(2) modes (linux/falloc.h); os.posix_fallocate cannot punch or zero.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SECTOR = 512
SPLICE_F_MOVE = 1
SEEK_DATA, SEEK_HOLE = os.SEEK_DATA, os.SEEK_HOLE
FEW_BOUNDS = 9  # walks that found this few runs (plus one) are answered by a plain loop
_ZERO_CHUNK = bytes(1 << 20)

# File systems whose files live in memory: every read is a page-cache hit.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})
# Buffers that reads served from the page cache keep for later reads of the same
# length (pread_nowait): this many at most, each of READ_REUSE_MIN to READ_REUSE_MAX
# bytes (so 8 MiB per image at most).
READ_BUFFERS = 8
READ_REUSE_MIN = 64 << 10
READ_REUSE_MAX = 1 << 20


def _pooled_only_refcount() -> int:
    """What sys.getrefcount says, in RawImage._read_buffer's loop, of a buffer that
    only its pool refers to. Asked of this interpreter rather than assumed: how many
    references a loop variable and the call hold is CPython's detail, and a count one
    too high here would hand out buffers still in use."""
    pool = [bytearray(1)]
    for buffer in pool:
        return sys.getrefcount(buffer)
    raise AssertionError("unreachable")  # pragma: no cover


_POOLED_ONLY = _pooled_only_refcount()

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_fallocate.restype = ctypes.c_int


def filesystem_type(device: int) -> str:
    """The type of the mounted file system with this device number (stat's st_dev),
    from /proc/self/mountinfo; "" when it cannot be told."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo") as mounts:
            for line in mounts:
                fields, _, rest = line.partition(" - ")
                if fields.split()[2:3] == [wanted] and rest:
                    return rest.split()[0]
    except OSError:
        pass
    return ""


class ImageError(Exception):
    """An image that cannot be served, with a message meant for the operator."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def create_sparse(path: str, size: int) -> None:
    """Create a sparse raw image; refuse to touch an existing file."""
    if size % SECTOR:
        raise ImageError(f"size {size} is not a multiple of {SECTOR} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class ImageIdentity:
    """What identifies an image's content between runs (the bitmaps' guard). The
    inode change time is the one field user space cannot set back: ``touch -r``,
    ``cp -p`` or ``rsync -t`` restore an mtime, never a ctime. 0 means unknown (a
    QDB file written before it was recorded)."""

    size: int
    mtime_ns: int = 0
    inode: int = 0
    device: int = 0
    ctime_ns: int = 0


def path_identity(path: str) -> ImageIdentity:
    """The identity of the file at path, as stat(2) gives it (not opened: offline
    tools that must not hold the image)."""
    st = os.stat(path)
    return ImageIdentity(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)


class RawImage:
    """An open raw image. Thread-safe: positional I/O only, no shared file offset."""

    def __init__(self, path: str, *, read_only: bool = False, offset: int = 0) -> None:
        """``offset``: the image starts this far into the file (qemu-nbd's --offset);
        every position below is the image's, and the file's is offset further."""
        self.path = path
        self.read_only = read_only
        self.base = offset
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            hint = ""
            if not read_only and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                hint = "; to serve it read-only, add -r (--read-only)"
            raise ImageError(f"cannot open image {path}: {exc.strerror}{hint}") from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ImageError(f"{path} is neither a regular file nor a block device")
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            self.size = os.lseek(self.fd, 0, os.SEEK_END) - offset
            if offset and (offset % SECTOR or self.size <= 0):
                raise ImageError(f"{path}: offset {offset} must be a multiple of {SECTOR} "
                                 f"bytes inside the file ({self.size + offset} bytes)")
            if self.size % SECTOR:
                # QEMU's client rounds the size up to 512 and then fails on the tail; we
                # refuse rather than hide the last bytes (see docs/protocol.md).
                raise ImageError(
                    f"{path}: size {self.size} is not a multiple of {SECTOR} bytes; "
                    f"resize it (truncate -s or qemu-img resize) before serving it"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.can_punch = not self.is_block_device
        self.can_zero_range = True
        # The last run SEEK_HOLE found to be data, as file positions [start, end).
        # SEEK_HOLE walks the file up to the next hole, so in a file that is all data
        # it costs time in proportion to the rest of the file (19 us on average in a 1
        # GiB ext4 file of 134 extents, 14 ms from the start on tmpfs), and a READ
        # that looks for holes would pay that every time. Runs are only ever
        # remembered as data, which is always a safe answer: if a hole is punched
        # there behind our back, it reads as the zeros it is. Our own punching and
        # zeroing forget the run, so the map stays exact; a walk that raced one (in
        # another thread) does not keep what it found, as that may predate the hole.
        self._data_run = (0, 0)
        self._holes_made = 0  # bumped by our punching and zeroing
        # Reads ask the page cache first (RWF_NOWAIT) and leave misses to worker
        # threads. Some file systems refuse the flag (tmpfs, overlayfs): on one that
        # keeps its files in memory every read is a hit; on the others nothing cheap
        # tells a hit from a miss, so every read goes to a worker thread.
        self.filesystem = "" if self.is_block_device else filesystem_type(st.st_dev)
        self.cache_unknown = not self._nowait_supported()
        self.in_memory = self.cache_unknown and self.filesystem in MEMORY_FILESYSTEMS
        self._read_buffers: list[bytearray] = []  # see _read_buffer

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def identity(self) -> ImageIdentity:
        st = os.fstat(self.fd)
        return ImageIdentity(self.size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns)

    # -- reads ------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset + self.base)
        if len(data) < length:
            # A short read inside the export means the file shrank under us.
            data += bytes(length - len(data))
        return data

    def _nowait_supported(self) -> bool:
        try:
            os.preadv(self.fd, [bytearray(1)], self.base, os.RWF_NOWAIT)
        except OSError as exc:
            return exc.errno != errno.EOPNOTSUPP
        return True

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """Read only if every byte is in the page cache (RWF_NOWAIT), else None."""
        if self.cache_unknown:
            return self.pread(offset, length) if self.in_memory else None
        buffer = self._read_buffer(length) if READ_REUSE_MIN <= length <= READ_REUSE_MAX \
            else bytearray(length)
        try:
            done = os.preadv(self.fd, [buffer], offset + self.base, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EAGAIN):
                return None
            raise
        if done < length:
            return None
        return buffer

    def _read_buffer(self, length: int) -> bytearray:
        """A buffer of length bytes for pread_nowait to fill: one an earlier read
        filled, once nothing else refers to it (its reply sent, no view of it left:
        its reference count says so), else a new one. Python zeroes a new bytearray
        before the read overwrites it, which cost a 1 MiB READ 28 us of zeroing, and
        about 40 us of CPU in all, here. Only ever called from the event loop's thread
        (reads that may block go to pread, in worker threads), so nothing takes a
        buffer between the test and the read."""
        pool = self._read_buffers
        for buffer in pool:
            if len(buffer) == length and sys.getrefcount(buffer) == _POOLED_ONLY:
                return buffer
        buffer = bytearray(length)
        if len(pool) >= READ_BUFFERS:
            del pool[0]  # the oldest
        pool.append(buffer)
        return buffer

    def is_cached(self, offset: int, length: int) -> bool:
        """A cheap guess that [offset, offset+length) is in the page cache: its first
        and last bytes are (checked with RWF_NOWAIT, which never blocks)."""
        if self.cache_unknown:
            return self.in_memory
        probe = bytearray(1)
        try:
            for position in (offset, offset + length - 1):
                if os.preadv(self.fd, [probe], position + self.base, os.RWF_NOWAIT) != 1:
                    return False
        except OSError:
            return False
        return True

    def read_pieces(self, offset: int, length: int, sparse: bool,
                    nowait: bool = False) -> list[tuple[int, int, bytes | bytearray | None]] | None:
        """Read planning for a READ: (offset, length, data or None for a hole) pieces
        covering the range; holes are looked for only when ``sparse``.

        With ``nowait``, return None as soon as any data is not in the page cache.
        """
        read = self.pread_nowait if nowait else self.pread
        if not sparse:
            data = read(offset, length)
            return None if data is None else [(offset, length, data)]
        pieces: list[tuple[int, int, bytes | bytearray | None]] = []
        position = offset
        for run, is_data in self.allocation(offset, length, 1 << 16):
            data = None
            if is_data:
                data = read(position, run)
                if data is None:
                    return None
            pieces.append((position, run, data))
            position += run
        if position < offset + length:  # the extent limit was reached: the rest as data
            data = read(position, offset + length - position)
            if data is None:
                return None
            pieces.append((position, offset + length - position, data))
        return pieces

    def send_to(self, sockfd: int, offset: int, count: int) -> int:
        """sendfile(2) up to count bytes from offset to a socket; how many were sent
        (0 when the socket is full)."""
        try:
            return os.sendfile(sockfd, self.fd, offset + self.base, count)
        except BlockingIOError:
            return 0

    def readahead(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset + self.base, length, os.POSIX_FADV_WILLNEED)

    def allocation(self, offset: int, length: int, limit: int) -> Iterator[tuple[int, bool]]:
        """(length, is_data) runs covering [offset, offset+length), at most limit."""
        words = self.allocation_words(offset, length, limit, 1, 0)
        return zip(words[0::2], map(bool, words[1::2]), strict=True)

    def allocation_words(self, offset: int, length: int, limit: int, data: int,
                         hole: int, typecode: str = "I") -> array:
        """The runs covering [offset, offset+length) as [length, flags, length, flags,
        ...] (at most limit runs; flags are data or hole), ready to become BLOCK_STATUS
        descriptors: 32-bit words ("I"), as a compact request's length is, or 64-bit
        ones ("Q") for BLOCK_STATUS_EXT.

        SEEK_DATA/SEEK_HOLE tell where data is; where the file system cannot say, the
        whole range is reported as data (always a safe answer). A map is mostly these
        calls, so the loop does little else: it notes where each hole and each data
        run ends (two calls per pair), and the lengths and flags are made from those
        positions afterwards, by C code (docs/performance.md: the map).
        """
        lseek, fd = os.lseek, self.fd
        position = offset + self.base  # the file's positions from here on
        end = position + length
        known_from, known_to = self._data_run
        holes_made = self._holes_made
        # Where each run ends, after where the first begins. The runs are a hole and
        # a data run, in turn; a hole is empty where data starts at once.
        bounds = [position]
        append = bounds.append
        last = limit + 1  # a pair more than limit runs can need (the first hole empty)
        if known_from >= known_to:
            known_from = -1  # none: no position is its start
        if known_from <= position < known_to:
            data_start = known_from = position  # (so that the loop takes it at once)
        else:
            try:
                data_start = lseek(fd, position, SEEK_DATA)
            except OSError as exc:
                data_start = _no_data_found(exc, position, end)
        while True:
            if data_start >= end:
                append(end)
                break
            append(data_start)
            if data_start == known_from:
                data_end = known_to
            else:
                try:
                    data_end = lseek(fd, data_start, SEEK_HOLE)
                except OSError:
                    data_end = end
                if data_end > end:
                    self._data_run = data_start, data_end
                    if self._holes_made != holes_made:  # (checked after the store)
                        self._data_run = (0, 0)
            if not data_start < data_end < end:  # (the usual case, in one test)
                # At the end; or, if SEEK_HOLE found no hole after data_start, the
                # file changed between the two calls: say data (safe), and stop.
                append(end)
                break
            append(data_end)
            if len(bounds) > last:
                break
            try:
                data_start = lseek(fd, data_end, SEEK_DATA)
            except OSError as exc:
                data_start = _no_data_found(exc, data_end, end)
        if len(bounds) == 2:  # a hole to the end (or an empty range)
            return array(typecode, (end - position, hole) if end > position else ())
        if len(bounds) == 3 and bounds[1] == position:  # one data run: most READs
            return array(typecode, (bounds[2] - position, data))
        if len(bounds) <= FEW_BOUNDS:
            return _words_from_bounds(bounds, data, hole, limit, typecode)
        # Many runs (a map): lengths and flags made by C code, each in one pass.
        lengths = list(map(operator.sub, bounds[1:], bounds[:-1]))
        first_is_data = not lengths[0]
        if first_is_data:
            del lengths[0]
        if 0 in lengths:  # data found where a hole had just been: runs to join
            return _words_from_bounds(bounds, data, hole, limit, typecode)
        del lengths[limit:]
        count = len(lengths)
        words = array(typecode, (0,)) * (2 * count)
        words[0::2] = array(typecode, lengths)
        pair = (data, hole) if first_is_data else (hole, data)
        words[1::2] = (array(typecode, pair) * ((count + 1) // 2))[:count]
        return words

    # -- writes -----------------------------------------------------------------------

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        written = os.pwrite(self.fd, data, offset + self.base)
        if written == len(data):
            return
        view = memoryview(data)[written:]  # rare: finish what the kernel did not take
        offset += written
        while view:
            written = os.pwrite(self.fd, view, offset + self.base)
            view = view[written:]
            offset += written

    def pwritev(self, offset: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write the buffers back to back from offset, in one system call."""
        if len(buffers) == 1:
            self.pwrite(offset, buffers[0])
            return
        total = sum(map(len, buffers))
        written = os.pwritev(self.fd, buffers, offset + self.base)
        if written < total:  # rare: finish what the kernel did not take
            rest = memoryview(b"".join(buffers))[written:]
            self.pwrite(offset + written, rest)

    def write_from_pipe(self, pipe_fd: int, offset: int, count: int) -> tuple[int, OSError | None]:
        """Move count bytes waiting in a pipe into the image at offset with splice(2)
        (one copy, none through user space). Returns how many bytes moved and the
        error that stopped it early, if any; what did not move is still in the pipe."""
        moved = 0
        while moved < count:
            try:
                written = os.splice(pipe_fd, self.fd, count - moved,
                                    offset_dst=offset + moved + self.base,
                                    flags=SPLICE_F_MOVE)
            except OSError as exc:
                return moved, exc
            if written == 0:  # cannot happen for a regular file or device; be safe
                return moved, OSError(errno.EIO, "short write to the image")
            moved += written
        return moved, None

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (it then reads as zeros). False if the fs cannot."""
        if not self.can_punch or length == 0:
            return False
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset + self.base,
                      length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                self.can_punch = False
                return False
            raise
        finally:
            self._forget_data_run()
        return True

    def zero_range(self, offset: int, length: int) -> bool:
        """Zero a range quickly, keeping it allocated. False if the fs cannot."""
        if not self.can_zero_range or length == 0:
            return length == 0
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset + self.base,
                      length)  # (unwritten extents: SEEK_HOLE may call them holes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self.can_zero_range = False
                return False
            raise
        finally:
            self._forget_data_run()
        return True

    def _forget_data_run(self) -> None:
        """After punching or zeroing (which may have made holes): the counter first,
        then the run, so a walk racing this either sees the counter move or stored
        its run before the run is forgotten here."""
        self._holes_made += 1
        self._data_run = (0, 0)

    def write_zeroes_slowly(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            step = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(offset, memoryview(_ZERO_CHUNK)[:step])
            offset += step

    def flush(self) -> None:
        os.fdatasync(self.fd)


def _no_data_found(exc: OSError, position: int, end: int) -> int:
    """Where data starts, after SEEK_DATA from position failed: ENXIO says there is
    none before the end of the file (a hole to the end); anything else means the file
    system cannot tell, and position starts data (the safe answer)."""
    return end if exc.errno == errno.ENXIO else position


def _words_from_bounds(bounds: list[int], data: int, hole: int, limit: int,
                       typecode: str) -> array:
    """RawImage.allocation_words' answer from the positions its walk noted: runs
    between them, a hole and a data run in turn, the empty ones left out and the
    runs on both sides of an empty one joined; at most limit runs."""
    words = array(typecode)
    extend = words.extend
    flag, other = hole, data
    start = bounds[0]
    last = None  # the flag of the run last added
    for bound in bounds[1:]:
        if bound > start:
            if flag == last:
                words[-2] += bound - start
            else:
                extend((bound - start, flag))
                last = flag
            start = bound
        flag, other = other, flag
    del words[2 * limit:]
    return words


DIRECT_ALIGNMENT = 4096  # O_DIRECT's offset, length and memory alignment: enough for
# 512-byte and 4 KiB devices and the file systems on them
DIRECT_SCRATCH_MAX = 1 << 20  # aligned buffers a thread keeps for its next read or write


class DirectImage(RawImage):
    """``--cache=none`` (qemu-nbd's): the image opened with O_DIRECT, so its data is
    not also kept in the host's page cache, where a guest's own cache would hold it a
    second time.

    O_DIRECT wants the file offset, the length and the memory of every read and write
    aligned. Reads and writes therefore go through aligned buffers (anonymous mmap),
    each thread keeping one of up to DIRECT_SCRATCH_MAX bytes for its next read or
    write (_scratch); a write that does not cover whole blocks reads them, merges and
    writes them back, under a lock, so two such writes to one block cannot lose each
    other's bytes. The image's size must be a multiple of the alignment (the last
    block is written whole). Nothing is served from the page cache: no sendfile(2), no
    RWF_NOWAIT reads (READs go to worker threads), and a spliced WRITE payload is read
    from its pipe. Holes, punching and zeroing work as for RawImage (fallocate needs
    no alignment).
    """

    def __init__(self, path: str, *, read_only: bool = False, offset: int = 0) -> None:
        super().__init__(path, read_only=read_only, offset=offset)
        try:
            if offset % DIRECT_ALIGNMENT or self.size % DIRECT_ALIGNMENT:
                raise ImageError(f"{path}: --cache=none needs the image's offset and size to "
                                 f"be multiples of {DIRECT_ALIGNMENT} bytes (size {self.size}"
                                 f", offset {offset})")
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_DIRECT
            try:
                direct = os.open(path, flags)
            except OSError as exc:
                raise ImageError(f"{path}: cannot open it with O_DIRECT for --cache=none "
                                 f"({exc.strerror}); this file system may not support it") \
                    from None
        except BaseException:
            self.close()
            raise
        os.close(self.fd)
        self.fd = direct
        self._merging = threading.Lock()
        self._threads = threading.local()  # each thread's aligned buffer (_scratch)

    @staticmethod
    def _span(offset: int, length: int) -> tuple[int, int]:
        start = offset - offset % DIRECT_ALIGNMENT
        end = -(-(offset + length) // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
        return start, end

    @contextlib.contextmanager
    def _scratch(self, size: int) -> Iterator[mmap.mmap]:
        """An aligned buffer of at least size bytes for one read or write by this
        thread. Up to DIRECT_SCRATCH_MAX the thread keeps it for its next one: a new
        anonymous mapping costs a map, a page fault per page and an unmap, which was
        a third of a 1 MiB read from this host's disk. Larger ones are unmapped after.
        Nothing may keep the buffer (or a view of it) past the block: what is read is
        copied out."""
        if size > DIRECT_SCRATCH_MAX:
            with mmap.mmap(-1, size) as buffer:
                yield buffer
            return
        buffer = getattr(self._threads, "buffer", None)
        if buffer is None or len(buffer) < size:
            if buffer is not None:
                buffer.close()
            # 64 KiB at least, so that small reads and writes settle on one buffer.
            buffer = self._threads.buffer = mmap.mmap(-1, max(size, 64 << 10))
        yield buffer

    def _read_aligned(self, start: int, end: int, buffer: mmap.mmap) -> None:
        """[start, end) of the file (aligned) into the front of buffer."""
        size = end - start
        view = memoryview(buffer)
        try:
            done = 0
            while done < size:
                got = os.preadv(self.fd, [view[done:size]], start + done + self.base)
                if got <= 0:
                    # Past the end of a file that shrank: the rest reads as zeros (the
                    # buffer may hold an earlier read's bytes there).
                    view[done:size] = bytes(size - done)
                    break
                done += got
        finally:
            view.release()

    def pread(self, offset: int, length: int) -> bytes:
        if not length:
            return b""
        start, end = self._span(offset, length)
        with self._scratch(end - start) as buffer:
            self._read_aligned(start, end, buffer)
            return buffer[offset - start:offset - start + length]

    def pread_nowait(self, offset: int, length: int) -> None:
        return None  # there is no cache to hit: a worker thread reads it

    def is_cached(self, offset: int, length: int) -> bool:
        return False

    def readahead(self, offset: int, length: int) -> None:
        pass  # the page cache is what this mode keeps out of

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Every write holds the lock: an aligned one racing a merge of the same block
        could otherwise be overwritten by the merge's stale copy."""
        length = len(data)
        if not length:
            return  # (a spliced WRITE whose payload was all still on the socket)
        start, end = self._span(offset, length)
        with self._merging, self._scratch(end - start) as buffer:
            if start != offset or end != offset + length:
                self._read_aligned(start, end, buffer)  # read, merge, write back
            buffer[offset - start:offset - start + length] = data
            self._write_aligned(start, end, buffer)

    def _write_aligned(self, start: int, end: int, buffer: mmap.mmap) -> None:
        """The front of buffer to [start, end) of the file (aligned)."""
        size = end - start
        view = memoryview(buffer)
        try:
            done = 0
            while done < size:
                done += os.pwritev(self.fd, [view[done:size]], start + done + self.base)
        finally:
            view.release()

    def pwritev(self, offset: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        self.pwrite(offset, buffers[0] if len(buffers) == 1 else b"".join(buffers))

    def write_from_pipe(self, pipe_fd: int, offset: int, count: int) -> tuple[int, OSError | None]:
        return write_through_memory(pipe_fd, offset, count, self.pwrite)


def write_through_memory(pipe_fd: int, offset: int, count: int,
                         pwrite) -> tuple[int, OSError | None]:
    """write_from_pipe for images that cannot splice (O_DIRECT, a migration's target):
    the count bytes waiting in the pipe are read, then written with pwrite(offset,
    data). Returns what RawImage.write_from_pipe does."""
    chunks, got = [], 0
    while got < count:
        chunk = os.read(pipe_fd, count - got)
        if not chunk:
            return got, OSError(errno.EIO, "short read from the pipe")
        chunks.append(chunk)
        got += len(chunk)
    try:
        pwrite(offset, b"".join(chunks))
    except OSError as exc:
        return got, exc
    return got, None


def open_image(path: str, *, read_only: bool = False, offset: int = 0,
               cache: str = "writeback") -> RawImage:
    """The image as the export's cache mode wants it opened."""
    kind = DirectImage if cache == "none" else RawImage
    return kind(path, read_only=read_only, offset=offset)
