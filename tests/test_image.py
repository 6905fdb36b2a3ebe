"""RawImage's allocation walk against a file whose layout is known."""

from __future__ import annotations

import os

import pytest

from nbdserve.image import RawImage

KiB = 1024
BLOCK = 64 * KiB  # far above any file system's block size


@pytest.fixture
def layout(tmp_path):
    """1 MiB: hole, data [64K, 192K), hole, data [512K, 576K), hole to the end."""
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(16 * BLOCK)
        for start, blocks in ((1, 2), (8, 1)):
            f.seek(start * BLOCK)
            f.write(os.urandom(blocks * BLOCK))
    image = RawImage(str(path), read_only=True)
    probe = list(image.allocation(0, 16 * BLOCK, 100))
    if probe == [(16 * BLOCK, True)]:
        pytest.skip(f"{tmp_path} reports no holes (SEEK_HOLE unsupported)")
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
