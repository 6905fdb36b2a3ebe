"""RawImage's allocation walk against a file whose layout is known."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve import image as image_module
from nbdserve.image import DirectImage, ImageError, RawImage, filesystem_type

KiB = 1024
BLOCK = 64 * KiB  # far above any file system's block size


def skip_without_holes(directory: Path) -> None:
    """Skip where the file system does not report holes: asked of the kernel directly,
    so that a walk that wrongly says data cannot pass for such a file system."""
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:  # data, a hole, data
        f.write(b"\1" * BLOCK)
        f.seek(2 * BLOCK)
        f.write(b"\1" * BLOCK)
    fd = os.open(probe, os.O_RDONLY)
    try:
        hole_at = os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)
        probe.unlink()
    if hole_at != BLOCK:
        pytest.skip(f"{directory} reports no holes (SEEK_HOLE unsupported)")


@pytest.fixture
def layout(tmp_path):
    """1 MiB: hole, data [64K, 192K), hole, data [512K, 576K), hole to the end."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * BLOCK)
        for start, blocks in ((1, 2), (8, 1)):
            f.seek(start * BLOCK)
            f.write(os.urandom(blocks * BLOCK))
    skip_without_holes(tmp_path)
    image = RawImage(str(path), read_only=True)
    yield image
    image.close()


def runs(image, offset, length, limit=100):
    return list(image.allocation(offset, length, limit))


def test_whole_file(layout):
    assert runs(layout, 0, 16 * BLOCK) == [
        (BLOCK, False), (2 * BLOCK, True), (5 * BLOCK, False), (BLOCK, True),
        (7 * BLOCK, False)]


def test_ranges_starting_and_ending_inside_runs(layout):
    assert runs(layout, BLOCK + 512, BLOCK) == [(BLOCK, True)]
    assert runs(layout, 2 * BLOCK, 2 * BLOCK) == [(BLOCK, True), (BLOCK, False)]
    assert runs(layout, 4 * BLOCK, 3 * BLOCK) == [(3 * BLOCK, False)]
    assert runs(layout, 10 * BLOCK, 6 * BLOCK) == [(6 * BLOCK, False)]  # the final hole


def test_limit_stops_early_without_covering_the_range(layout):
    assert runs(layout, 0, 16 * BLOCK, limit=1) == [(BLOCK, False)]
    assert runs(layout, 0, 16 * BLOCK, limit=2) == [(BLOCK, False), (2 * BLOCK, True)]


def test_words_carry_the_callers_flags(layout):
    words = layout.allocation_words(0, 4 * BLOCK, 100, data=7, hole=3)
    assert list(words) == [BLOCK, 3, 2 * BLOCK, 7, BLOCK, 3]


def expected_runs(blocks: list[bool], offset: int, length: int, limit: int):
    """The (length, is_data) runs of [offset, offset+length) in a file of BLOCK-sized
    blocks, data where blocks says, joined and cut to limit."""
    joined: list[list] = []
    for index, is_data in enumerate(blocks):
        start, end = max(index * BLOCK, offset), min((index + 1) * BLOCK, offset + length)
        if start >= end:
            continue
        if joined and joined[-1][1] == is_data:
            joined[-1][0] += end - start
        else:
            joined.append([end - start, is_data])
    return [tuple(run) for run in joined[:limit]]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blocks=st.lists(st.booleans(), min_size=1, max_size=24),
       queries=st.lists(st.tuples(st.integers(0, 24 * 128), st.integers(0, 24 * 128),
                                  st.integers(1, 30), st.sampled_from("IQ")),
                        min_size=1, max_size=8))
@pytest.mark.parametrize("few_bounds", [2, image_module.FEW_BOUNDS])
def test_any_layout_and_range_against_the_blocks_written(tmp_path, monkeypatch, few_bounds,
                                                         blocks, queries):
    """Every range (in 512-byte steps) and limit, both word sizes, asked in turn of
    one image, so that what one walk remembers is used by the next: the runs are
    exactly the blocks written and the holes left. With few_bounds 2, every answer of
    two runs or more is made the way a map's many runs are."""
    skip_without_holes(tmp_path)
    monkeypatch.setattr(image_module, "FEW_BOUNDS", few_bounds)
    path = tmp_path / f"any-{os.getpid()}-{len(os.listdir(tmp_path))}.img"
    with open(path, "wb") as f:
        f.truncate(len(blocks) * BLOCK)
        for index, is_data in enumerate(blocks):
            if is_data:
                f.seek(index * BLOCK)
                f.write(b"\1" * BLOCK)
    image = RawImage(str(path), read_only=True)
    try:
        size = len(blocks) * BLOCK
        for start, length, limit, typecode in queries:
            offset = min(start * 512, size)
            length = min(length * 512, size - offset)
            expected = expected_runs(blocks, offset, length, limit)
            words = image.allocation_words(offset, length, limit, 7, 3, typecode)
            assert words.typecode == typecode
            assert list(words) == [word for run, is_data in expected
                                   for word in (run, 7 if is_data else 3)], \
                (offset, length, limit)
    finally:
        image.close()
        path.unlink()


@pytest.mark.parametrize("blocks", [4, 16])  # few runs, and many (answered by C code)
def test_a_hole_filled_during_the_walk_joins_the_runs_around_it(tmp_path, monkeypatch,
                                                                 blocks):
    """SEEK_DATA from the start of a hole says data there: another thread wrote it
    between our two calls. The data runs on both sides become one."""
    skip_without_holes(tmp_path)
    path = tmp_path / "alternating.img"
    with open(path, "wb") as f:  # a hole, data, a hole, data, ...
        f.truncate(blocks * BLOCK)
        for index in range(1, blocks, 2):
            f.seek(index * BLOCK)
            f.write(b"\1" * BLOCK)
    image = RawImage(str(path), read_only=True)
    real = os.lseek

    def lseek(fd, position, whence):
        if position == 2 * BLOCK:  # the second hole, written as we walk
            return 2 * BLOCK if whence == os.SEEK_DATA else 4 * BLOCK
        return real(fd, position, whence)
    monkeypatch.setattr(os, "lseek", lseek)
    try:
        expected = [(BLOCK, False), (3 * BLOCK, True)] + \
            [(BLOCK, bool(index % 2)) for index in range(4, blocks)]
        assert runs(image, 0, blocks * BLOCK) == expected
    finally:
        image.close()


# -- reads that ask the page cache first (RWF_NOWAIT) ------------------------------------


def refuses_nowait(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError as exc:
        return exc.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    return False


def test_reads_of_a_memory_file_system_are_page_cache_hits(tmpfs_dir):
    path = tmpfs_dir / "disk.img"
    data = os.urandom(256 * KiB)
    path.write_bytes(data)
    image = RawImage(str(path), read_only=True)
    try:
        assert image.filesystem == "tmpfs"
        # Whether this kernel's tmpfs takes the flag or not, a read never waits.
        assert image.in_memory == refuses_nowait(path)
        assert image.is_cached(0, len(data))
        pieces = image.read_pieces(4 * KiB, 128 * KiB, False, nowait=True)
        assert pieces is not None
        assert bytes(pieces[0][2]) == data[4 * KiB:132 * KiB]
    finally:
        image.close()


def test_a_file_system_that_cannot_tell_sends_reads_to_threads(tmpfs_dir, monkeypatch):
    """overlayfs refuses RWF_NOWAIT too, but its files are on a disk below: no read
    is taken for a hit (None sends it to a worker thread), and the refusal is known
    at open rather than met by every read."""
    path = tmpfs_dir / "disk.img"
    path.write_bytes(os.urandom(64 * KiB))
    if not refuses_nowait(path):
        pytest.skip("this kernel's tmpfs takes RWF_NOWAIT: no file system here refuses it")
    monkeypatch.setattr(image_module, "filesystem_type", lambda device: "overlay")
    image = RawImage(str(path), read_only=True)
    try:
        assert image.cache_unknown and not image.in_memory
        assert image.read_pieces(0, 4 * KiB, False, nowait=True) is None
        assert not image.is_cached(0, 4 * KiB)
        assert image.read_pieces(0, 4 * KiB, False) == [(0, 4 * KiB, path.read_bytes()[:4 * KiB])]
    finally:
        image.close()


def test_a_read_buffer_is_reused_only_once_nothing_refers_to_it(tmp_path):
    """Reads of 64 KiB or more that ask the page cache fill a buffer an earlier read
    left, and never one whose data is still held: by its reader, by a view (as a
    transport keeps a reply it has not sent), or by a list of pieces."""
    path = tmp_path / "disk.img"
    path.write_bytes(b"")
    image = RawImage(str(path), read_only=True)
    try:
        first = image._read_buffer(256 * KiB)
        held = image._read_buffer(256 * KiB)
        assert held is not first  # first is still ours
        first_id = id(first)
        del first
        again = image._read_buffer(256 * KiB)
        assert id(again) == first_id  # nothing else held it: reused
        view = memoryview(again)[4:8]
        del again
        assert id(image._read_buffer(256 * KiB)) != first_id  # the view holds it
        view.release()
        del view
        pieces = [(0, 256 * KiB, image._read_buffer(256 * KiB))]
        assert id(pieces[0][2]) == first_id
        assert id(image._read_buffer(256 * KiB)) != first_id  # the pieces hold it
        assert image._read_buffer(128 * KiB) is not None  # another length: a new one
        for _ in range(3 * image_module.READ_BUFFERS):
            image._read_buffer(64 * KiB)
        assert len(image._read_buffers) <= image_module.READ_BUFFERS
    finally:
        image.close()


def test_reads_into_reused_buffers_keep_every_held_result_intact(tmp_path):
    path = tmp_path / "disk.img"
    data = os.urandom(4 << 20)
    path.write_bytes(data)
    if refuses_nowait(path):
        pytest.skip("this file system refuses RWF_NOWAIT: its reads do not use the pool")
    image = RawImage(str(path), read_only=True)
    try:
        kept = []
        for round_ in range(3):
            for index in range(4):
                offset = index << 20
                pieces = image.read_pieces(offset, 1 << 20, False, nowait=True)
                assert pieces is not None
                assert bytes(pieces[0][2]) == data[offset:offset + (1 << 20)]
                if round_ == 1:
                    kept.append((offset, pieces[0][2]))  # held across later reads
        # Later reads did not land in any buffer still held.
        for offset, held in kept:
            assert bytes(held) == data[offset:offset + (1 << 20)]
        small = image.read_pieces(0, 4 * KiB, False, nowait=True)[0][2]
        large = image.read_pieces(0, 2 << 20, False, nowait=True)[0][2]
        assert bytes(large) == data[:2 << 20] and len(small) == 4 * KiB
        # Neither size is kept: the pool holds 64 KiB to 1 MiB buffers only.
        assert all(image_module.READ_REUSE_MIN <= len(buffer) <= image_module.READ_REUSE_MAX
                   for buffer in image._read_buffers)
        del kept
        first = image.read_pieces(0, 1 << 20, False, nowait=True)[0][2]
        assert any(buffer is first for buffer in image._read_buffers)
    finally:
        image.close()


def direct_image(path: Path) -> DirectImage:
    try:
        return DirectImage(str(path))
    except ImageError as exc:
        pytest.skip(f"no O_DIRECT here: {exc}")


def test_cache_none_reuses_its_aligned_buffer_and_never_leaks_its_old_bytes(
        tmp_path, monkeypatch):
    """--cache=none reads and writes go through one aligned buffer per thread. Random
    reads and writes of every alignment and size, from the loop's thread and from
    workers, against a model: no stale bytes of an earlier read or write show, the
    merge of a partial block reads what is on disk, and a file that shrank under us
    reads as zeros past its end even where the buffer held data before."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    size = 8 << 20
    model = bytearray(os.urandom(size))
    path = tmp_path / "disk.img"
    path.write_bytes(model)
    image = direct_image(path)
    rng = random.Random(7)
    try:
        with ThreadPoolExecutor(4) as workers:
            for _ in range(300):
                length = rng.choice([1, 512, 4096, 5000, 65536, 70000, 1 << 20, 1_500_000])
                offset = rng.randrange(0, size - length)
                if rng.random() < 0.5:
                    data = os.urandom(length)
                    image.pwrite(offset, data)  # (writes run on the loop's thread)
                    model[offset:offset + length] = data
                else:
                    got = workers.submit(image.pread, offset, length).result() \
                        if rng.random() < 0.5 else image.pread(offset, length)
                    assert got == model[offset:offset + length]
            scratch = image._threads.buffer
            image.pread(0, 4096)
            assert image._threads.buffer is scratch  # kept, not mapped again
            assert len(scratch) <= image_module.DIRECT_SCRATCH_MAX
            # The file shrinks by a block behind our back: its old last block, read
            # into the same buffer just before, now reads as zeros. (ext4 zeroes what
            # it does not return; the end is shown by a read that returns nothing
            # and leaves the buffer as it was, which the kernel may also do.)
            assert image.pread(size - 8192, 8192) == model[-8192:]
            preadv = os.preadv

            def shrunk(fd, buffers, position, *flags):
                end = size - 4096  # the new end of the file
                if position >= end:
                    return 0
                (view,) = buffers
                return preadv(fd, [view[:end - position]], position, *flags)

            monkeypatch.setattr(os, "preadv", shrunk)
            assert image.pread(size - 8192, 8192) == model[-8192:-4096] + bytes(4096)
    finally:
        image.close()


def test_the_file_system_type_is_read_from_the_mount_table(tmp_path):
    assert filesystem_type(os.stat("/proc").st_dev) == "proc"
    assert filesystem_type(os.makedev(0, 0)) == ""


# -- the remembered data run ------------------------------------------------------------


@pytest.fixture
def writable(tmp_path):
    """1 MiB, all data but a hole at [512K, 576K)."""
    path = tmp_path / "data.img"
    with open(path, "wb") as f:
        f.write(os.urandom(8 * BLOCK))
        f.seek(9 * BLOCK)
        f.write(os.urandom(7 * BLOCK))
    skip_without_holes(tmp_path)
    image = RawImage(str(path))
    yield image
    image.close()


def count_hole_seeks(monkeypatch) -> list[int]:
    seeks: list[int] = []
    real = os.lseek

    def lseek(fd, position, whence):
        if whence == os.SEEK_HOLE:
            seeks.append(position)
        return real(fd, position, whence)
    monkeypatch.setattr(os, "lseek", lseek)
    return seeks


def test_reads_inside_one_data_run_look_for_its_end_once(writable, monkeypatch):
    seeks = count_hole_seeks(monkeypatch)
    for start in range(0, 7 * BLOCK, KiB * 4):
        assert runs(writable, start, BLOCK) == [(BLOCK, True)]
    assert len(seeks) == 1
    # Past the run, the file is asked again, and the hole is where it is.
    assert runs(writable, 7 * BLOCK, 3 * BLOCK) == [(BLOCK, True), (BLOCK, False),
                                                   (BLOCK, True)]


def test_punching_or_zeroing_inside_the_remembered_run_shows_at_once(writable):
    assert runs(writable, 0, BLOCK) == [(BLOCK, True)]  # remembers [0, 512K)
    assert writable.punch_hole(2 * BLOCK, BLOCK)
    assert runs(writable, BLOCK, 3 * BLOCK) == [(BLOCK, True), (BLOCK, False),
                                                (BLOCK, True)]
    assert runs(writable, 0, BLOCK) == [(BLOCK, True)]
    writable.zero_range(4 * BLOCK, BLOCK)  # ext4 and XFS: an unwritten extent
    assert runs(writable, 3 * BLOCK, 3 * BLOCK) in (
        [(3 * BLOCK, True)], [(BLOCK, True), (BLOCK, False), (BLOCK, True)])
    assert bytes(writable.pread(4 * BLOCK, BLOCK)) == bytes(BLOCK)


def test_a_hole_filled_behind_our_back_is_seen(writable):
    """Holes are never remembered: data written by another process shows."""
    assert runs(writable, 7 * BLOCK, 3 * BLOCK)[1] == (BLOCK, False)
    with open(writable.path, "r+b") as other:
        other.seek(8 * BLOCK)
        other.write(b"\1" * BLOCK)
    assert runs(writable, 7 * BLOCK, 3 * BLOCK) == [(3 * BLOCK, True)]


def test_a_walk_that_raced_a_punch_does_not_keep_its_run(writable, monkeypatch):
    """A walk whose SEEK_HOLE ran before a punch in another thread stores what it found
    after the punch forgot the run: it must not be kept, or the hole would read as
    data for every later walk."""
    real = os.lseek

    def lseek(fd, position, whence):
        result = real(fd, position, whence)
        if whence == os.SEEK_HOLE and position == 0:
            writable.punch_hole(2 * BLOCK, BLOCK)  # lands between the seek and the store
        return result
    monkeypatch.setattr(os, "lseek", lseek)
    assert runs(writable, 0, BLOCK) == [(BLOCK, True)]
    monkeypatch.setattr(os, "lseek", real)
    assert runs(writable, BLOCK, 3 * BLOCK) == [(BLOCK, True), (BLOCK, False),
                                                (BLOCK, True)]
