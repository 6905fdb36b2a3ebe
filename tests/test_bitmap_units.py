"""The bitmap vocabulary, the QDB format and the journal, without a server."""

from __future__ import annotations

import struct
import zlib

import pytest
from bitarray import bitarray

from nbdserve.bitmaps.bitmap import Bitmap
from nbdserve.bitmaps.journal import (
    INITIAL_SIZE,
    Journal,
    JournalError,
    encode_group_record,
    encode_header,
    encode_record,
    read_journal,
)
from nbdserve.bitmaps.policy import BitmapError, DirtyBitmap, granularity_bits
from nbdserve.bitmaps.qdb import (
    HEADER_CHECKSUM_OFFSET,
    ImageIdentity,
    QdbContents,
    QdbError,
    StoredBitmap,
    decode_qdb,
    encode_qdb,
)

MiB = 1 << 20


# -- Bitmap: the bits and their verbs -----------------------------------------------------

def granule_states(b: Bitmap) -> list[bool]:
    """Each granule's state, read back through the public verbs only."""
    return [b.is_set(i * b.granularity, 1) for i in range(len(b))]


def test_setting_sets_every_overlapped_granule():
    b = Bitmap(16 * MiB, 16)
    b.set(100, 10)
    b.set(131000, 1000)  # spans granules 1 and 2
    assert granule_states(b)[:4] == [True, True, True, False]
    assert b.bits.tobytes()[0] == 0x07  # LSB-first, as QEMU stores it
    assert b.count_bytes() == 3 * 65536


def test_zero_length_sets_nothing():
    b = Bitmap(MiB, 12)
    b.set(4096, 0)
    assert b.count_bytes() == 0


def test_last_partial_granule():
    size = 64 * MiB + 4096  # the last 64 KiB granule covers only 4 KiB
    b = Bitmap(size, 16)
    b.set(size - 1, 1)
    assert len(b) == 1025 and b.is_set(size - 1, 1)
    assert b.count_bytes() == 4096
    assert b.extents(size - 8192, 8192, 10) == [(4096, False), (4096, True)]
    assert list(b.set_ranges()) == [(64 * MiB, 4096)]


def test_extents_follow_granules_and_are_cut_to_the_request():
    b = Bitmap(MiB, 16)
    b.set(65536, 1)
    b.set(196608, 70000)  # granules 3 and 4
    assert b.extents(0, MiB, 100) == [(65536, 0), (65536, 1), (65536, 0), (131072, 1),
                                      (MiB - 327680, 0)]
    assert b.extents(70000, 100000, 100) == [(61072, 1), (38928, 0)]
    assert b.extents(0, MiB, 2) == [(65536, 0), (65536, 1)]  # the limit
    assert b.extents(65537, 10, 1) == [(10, 1)]
    assert b.extents(0, 100, 5) == [(100, 0)]
    assert b.runs(0, 3 * 65536, 10) == ([65536, 65536, 65536], False)
    assert b.runs(65536, 65536, 10) == ([65536], True)


def test_extents_agree_with_a_naive_reference():
    import random
    rng = random.Random(5)
    size = 8 * MiB + 4096
    b = Bitmap(size, 12)
    for _ in range(300):
        b.set(rng.randrange(0, 8 * MiB), rng.randrange(1, 20000))
    states = granule_states(b)
    for _ in range(200):
        offset = rng.randrange(0, size - 1)
        length = rng.randrange(1, size - offset + 1)
        limit = rng.choice([1, 2, 7, 1 << 17])
        expected = []  # granule by granule, cut to the request, equal neighbours merged
        for granule in range(offset // 4096, (offset + length - 1) // 4096 + 1):
            piece = min(offset + length, (granule + 1) * 4096) - max(offset, granule * 4096)
            state = states[granule]
            if expected and expected[-1][1] == state:
                expected[-1][0] += piece
            elif len(expected) == limit:
                break
            else:
                expected.append([piece, state])
        assert b.extents(offset, length, limit) == [tuple(e) for e in expected]


def test_merge_and_intersect_need_the_same_shape():
    a, b = Bitmap(MiB, 16), Bitmap(MiB, 16)
    b.set(0, 1)
    a.merge(b)
    assert a.is_set(0, 1)
    a.intersect(Bitmap(MiB, 16))
    assert a.count_bytes() == 0
    with pytest.raises(ValueError):
        a.merge(Bitmap(MiB, 12))


def test_set_granules_refuses_granules_outside_the_bitmap():
    b = Bitmap(MiB, 16)  # 16 granules
    b.set_granules(15, 16)
    with pytest.raises(ValueError):
        b.set_granules(15, 17)
    with pytest.raises(ValueError):
        b.set_granules(3, 3)


# -- DirtyBitmap: the policy above the bits -------------------------------------------------

@pytest.mark.parametrize("bad", [0, 256, 511, 3000, 1 << 32, -4096])
def test_granularity_must_be_a_power_of_two_in_range(bad):
    with pytest.raises(BitmapError):
        granularity_bits(bad)


@pytest.mark.parametrize("name", ["", "x" * 1024, "a\0b"])
def test_bad_names(name):
    with pytest.raises(BitmapError):
        DirtyBitmap.create(name, MiB)


def test_clear_resets_the_bits_and_changes_the_generation():
    a = DirtyBitmap.create("a", MiB, 65536)
    a.bitmap.set(0, 1)
    a.make_inconsistent("test")
    generation = a.generation
    a.clear()
    assert a.bitmap.count_bytes() == 0 and a.generation != generation
    assert not a.inconsistent and a.info()["count"] == 0


# -- QDB format ---------------------------------------------------------------------------

def sample_contents() -> QdbContents:
    a = Bitmap(64 * MiB, 16)
    a.set(0, 3 * MiB)
    big = Bitmap(64 * MiB, 9)  # 131072 bits = 4 clusters
    big.set_granules(0, 4096 * 8)  # the first 4 KiB cluster is all ones
    big.set(40 * MiB + 1, 1)
    return QdbContents(
        identity=ImageIdentity(64 * MiB, 123, 456, 789), in_use=True, save_counter=9,
        bitmaps=[StoredBitmap(name, b.granularity_bits, generation, b is a, False,
                              b.bits)
                 for name, generation, b in (("a", 11, a), ("ünïcode name", 12, big))])


def test_round_trip_keeps_everything():
    original = sample_contents()
    raw = encode_qdb(original)
    assert raw[:4] == b"QDB\0"
    assert raw[4:12] == b"\x00\x00\x00\x01\x00\x00\x00\x0c"  # version 1, cluster_bits 12
    decoded = decode_qdb(raw)
    assert decoded.identity == original.identity
    assert (decoded.in_use, decoded.save_counter) == (True, 9)
    for got, want in zip(decoded.bitmaps, original.bitmaps, strict=True):
        assert (got.name, got.granularity_bits, got.generation, got.recording) == \
            (want.name, want.granularity_bits, want.generation, want.recording)
        assert got.bits == want.bits and got.problem == ""


def test_all_ones_and_zero_clusters_take_no_data_space():
    raw = encode_qdb(sample_contents())
    # header + directory + 2 tables + 1 data cluster for "a" + 1 for the marked bit
    assert len(raw) == 6 * 4096


def fix_header_checksum(raw: bytearray) -> bytearray:
    raw[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = bytes(4)
    crc = zlib.crc32(bytes(raw[:112])) & 0xFFFFFFFF
    raw[HEADER_CHECKSUM_OFFSET : HEADER_CHECKSUM_OFFSET + 4] = crc.to_bytes(4, "big")
    return raw


def directory_offset(raw) -> int:
    return struct.unpack_from(">Q", raw, 88)[0]


def first_table_offset(raw) -> int:
    return struct.unpack_from(">Q", raw, directory_offset(raw))[0]


def corrupt(mutate, *, fix_checksum=True) -> bytes:
    raw = bytearray(encode_qdb(sample_contents()))
    mutate(raw)
    return bytes(fix_header_checksum(raw) if fix_checksum else raw)


@pytest.mark.parametrize("mutate, fix, message", [
    (lambda r: r.__setitem__(slice(0, 4), b"QCOW"), True, "bad magic"),
    (lambda r: r.__setitem__(slice(4, 8), b"\0\0\0\x02"), True, "unsupported version 2"),
    (lambda r: r.__setitem__(40, r[40] ^ 1), False, "header checksum mismatch"),
    (lambda r: r.__setitem__(slice(16, 24), (1 << 5).to_bytes(8, "big")), True,
     "unknown incompatible feature bits 0x20"),
    (lambda r: r.__setitem__(slice(8, 12), (30).to_bytes(4, "big")), True, "cluster_bits 30"),
    (lambda r: r.__setitem__(slice(32, 40), (8).to_bytes(8, "big")), True,
     "reserved header flag bits"),
    (lambda r: r.__setitem__(directory_offset(r) + 50, 0x41), True,
     "directory checksum mismatch"),
    (lambda r: r.__setitem__(slice(88, 96), (0).to_bytes(8, "big")), True,
     "the bitmap directory overlaps the header"),
    (lambda r: r.__setitem__(slice(88, 96), (1 << 30).to_bytes(8, "big")), True,
     "past the end of the file"),
    (lambda r: r.__setitem__(slice(88, 96), (100).to_bytes(8, "big")), True,
     "not cluster-aligned"),
])
def test_file_level_corruption_is_rejected_precisely(mutate, fix, message):
    with pytest.raises(QdbError, match=message):
        decode_qdb(corrupt(mutate, fix_checksum=fix))


def test_truncated_files_are_rejected():
    raw = encode_qdb(sample_contents())
    for size in (0, 50, 111, 4096 + 100, len(raw) - 1):
        with pytest.raises(QdbError):
            decode_qdb(raw[:size])
    # Cut at a cluster boundary, only the bitmap whose data is gone is unusable.
    decoded = decode_qdb(raw[: len(raw) - 4096])
    assert decoded.bitmaps[0].bits is not None
    assert "past the end of the file" in decoded.bitmaps[1].problem


def rewrite_directory(raw: bytearray, mutate_entry) -> None:
    """Change the first directory entry and fix the directory checksum."""
    start = directory_offset(raw)
    size = struct.unpack_from(">Q", raw, 96)[0]
    mutate_entry(raw, start)
    crc = zlib.crc32(bytes(raw[start : start + size])) & 0xFFFFFFFF
    raw[84:88] = crc.to_bytes(4, "big")


@pytest.mark.parametrize("mutate_entry, message", [
    (lambda r, d: r.__setitem__(slice(d + 12, d + 16), (1 << 7).to_bytes(4, "big")),
     "reserved flag bits"),
    (lambda r, d: r.__setitem__(d + 16, 2), "unknown bitmap type"),
    (lambda r, d: r.__setitem__(d + 17, 8), "granularity_bits 8"),
])
def test_directory_entry_damage_makes_the_bitmap_unusable(mutate_entry, message):
    def mutate(raw):
        rewrite_directory(raw, mutate_entry)
    first, second = decode_qdb(corrupt(mutate)).bitmaps
    assert first.bits is None and message in first.problem
    assert second.bits is not None


def test_duplicate_names_are_file_level_damage():
    contents = sample_contents()
    contents.bitmaps[1].name = "a"
    with pytest.raises(QdbError, match="appears twice"):
        decode_qdb(encode_qdb(contents))


def test_table_past_the_end_makes_only_that_bitmap_unusable():
    def mutate(raw):
        rewrite_directory(raw, lambda r, d: r.__setitem__(
            slice(d, d + 8), (1 << 40).to_bytes(8, "big")))
    decoded = decode_qdb(corrupt(mutate))
    first, second = decoded.bitmaps
    assert first.bits is None and "past the end of the file" in first.problem
    assert second.bits is not None  # the other bitmap is untouched


def test_overlapping_clusters_are_detected():
    def mutate(raw):
        table = first_table_offset(raw)
        # point the first data cluster of "a" at its own table
        raw[table : table + 8] = table.to_bytes(8, "big")
    (first, _) = decode_qdb(corrupt(mutate)).bitmaps
    assert "overlaps the table" in first.problem


def test_reserved_table_bits_and_data_checksum():
    def reserved(raw):
        table = first_table_offset(raw)
        raw[table + 7] |= 0x02
    assert "reserved bits" in decode_qdb(corrupt(reserved)).bitmaps[0].problem

    def flip_data(raw):
        table = first_table_offset(raw)
        data = int.from_bytes(raw[table : table + 8], "big")
        raw[data + 10] ^= 0x10
    assert "data checksum mismatch" in decode_qdb(corrupt(flip_data)).bitmaps[0].problem


def test_bits_past_the_image_end_are_rejected():
    bits = bitarray(10, endian="little")
    bits.setall(0)
    contents = QdbContents(ImageIdentity(10 * 65536), bitmaps=[
        StoredBitmap("t", 16, 1, True, False, bits)])
    raw = bytearray(encode_qdb(contents))
    table = first_table_offset(raw)
    table_entry = int.from_bytes(raw[table : table + 8], "big")
    assert table_entry == 0  # all clean: no data cluster; give it one with a tail bit
    data_offset = len(raw)
    raw += bytes(4096)
    raw[data_offset + 1] = 0x80  # bit 15: past the 10 granules
    raw[table : table + 8] = data_offset.to_bytes(8, "big")
    assert "past the end of the image" in decode_qdb(bytes(raw)).bitmaps[0].problem


# -- journal --------------------------------------------------------------------------------

def test_journal_round_trip_and_torn_tail(tmp_path):
    path = tmp_path / "j"
    records = encode_record(7, 10, 2) + encode_record(8, 0, 1)
    path.write_bytes(encode_header(3) + records + encode_record(9, 1, 1)[:20])
    counter, found, _watch = read_journal(str(path))
    assert counter == 3
    assert [(r.generation, r.first_granule, r.granules) for r in found] == [(7, 10, 2),
                                                                           (8, 0, 1)]


def test_mapped_journal_grows_and_reads_back_every_record(tmp_path):
    path = tmp_path / "j"
    journal = Journal(str(path))
    journal.reset(5)
    count = 3 * INITIAL_SIZE // 32  # well past the first allocation
    for index in range(count):
        journal.append(encode_record(index + 1, index * 2, 1))
    journal.sync()
    assert path.stat().st_size >= (count + 2) * 32  # allocated ahead, zero-filled
    counter, found, _watch = read_journal(str(path))  # read while still open and mapped
    journal.close()
    assert counter == 5
    assert [(r.generation, r.first_granule) for r in found] == \
        [(index + 1, index * 2) for index in range(count)]


def test_version_1_journals_are_still_read(tmp_path):
    path = tmp_path / "j"
    header = bytearray(encode_header(3)[:32])  # version 1: no watch slot
    header[4:8] = (1).to_bytes(4, "big")
    header[24:28] = zlib.crc32(bytes(header[:24])).to_bytes(4, "big")
    body = struct.pack(">QQQ", 7, 10, 2)
    record = body + struct.pack(">II", zlib.crc32(body), 0)
    path.write_bytes(bytes(header) + record)
    counter, found, _watch = read_journal(str(path))
    assert counter == 3
    assert [(r.generation, r.first_granule, r.granules) for r in found] == [(7, 10, 2)]


def test_group_records_carry_their_granularity(tmp_path):
    path = tmp_path / "j"
    path.write_bytes(encode_header(3) + encode_group_record(16, 5, 2) + encode_record(9, 1, 1))
    found = read_journal(str(path))[1]
    assert [(r.generation, r.first_granule, r.granules, r.granularity_bits)
            for r in found] == [(0, 5, 2, 16), (9, 1, 1, 0)]


def test_torn_record_before_the_zeroed_tail_is_ignored(tmp_path):
    path = tmp_path / "j"
    torn = bytearray(encode_record(9, 1, 1))
    torn[24:] = bytes(8)  # killed before the checksum was stored
    path.write_bytes(encode_header(3) + encode_record(7, 10, 2) + bytes(torn) + bytes(4096))
    assert [(r.generation, r.first_granule) for r in read_journal(str(path))[1]] == \
        [(7, 10)]


def test_journal_with_a_damaged_middle_record_is_unusable(tmp_path):
    path = tmp_path / "j"
    bad = bytearray(encode_record(7, 10, 2))
    bad[3] ^= 1
    path.write_bytes(encode_header(3) + bytes(bad) + encode_record(8, 0, 1))
    with pytest.raises(JournalError, match="record 0"):
        read_journal(str(path))


def test_missing_or_garbage_journal(tmp_path):
    with pytest.raises(JournalError, match="missing"):
        read_journal(str(tmp_path / "none"))
    (tmp_path / "g").write_bytes(b"garbage" * 10)
    with pytest.raises(JournalError):
        read_journal(str(tmp_path / "g"))


def test_a_complete_check_finds_leaked_clusters_and_dirty_slack():
    """What reading does not need, a complete check (qdb check) still looks at."""
    raw = encode_qdb(sample_contents())
    assert decode_qdb(raw, complete=True).findings == []  # what we write is clean
    leaked = raw + b"\x01" * 4096
    assert decode_qdb(leaked).findings == []  # a server loads it...
    (finding,) = decode_qdb(leaked, complete=True).findings  # ...a check reports it
    assert "1 clusters are not referenced by anything (cluster 6)" in finding
    slack = bytearray(raw)
    slack[200] = 1  # after the 128-byte header, outside its checksum
    (finding,) = decode_qdb(bytes(slack), complete=True).findings
    assert finding.startswith("non-zero bytes after the header (offset 128 to 256)")
    slack = bytearray(raw)
    slack[1000] = 1  # after the header's copy at 256
    (finding,) = decode_qdb(bytes(slack), complete=True).findings
    assert finding.startswith("non-zero bytes after the header's copy (offset 384 to 4096)")
    slack = bytearray(raw)
    slack[256 + 60] ^= 1  # the copy disagrees with the header
    assert decode_qdb(bytes(slack), complete=True).findings == [
        "the header's copy differs from the header"]


def test_resample_coarser_and_finer_agree_with_byte_ranges():
    """A granule of the result is set exactly where some byte of a set granule of the
    source lies (the coarse path ORs pairs of bits; the fine one spreads them)."""
    import random

    from nbdserve.bitmaps.bitmap import Bitmap
    rng = random.Random(5)
    size = (1 << 24) + 3 * 4096  # a partial last granule at every coarser shift
    bitmap = Bitmap(size, 12)
    for _ in range(300):
        bitmap.set(rng.randrange(0, size), rng.randrange(1, 100_000))
    dirty_bytes = [(o, o + n) for o, n in bitmap.set_ranges()]
    for shift in (9, 12, 13, 16, 20, 30):
        resampled = bitmap.resample(shift)
        assert len(resampled) == ((size - 1) >> shift) + 1
        for granule in range(len(resampled)):
            start, end = granule << shift, min((granule + 1) << shift, size)
            touched = any(a < end and start < b for a, b in dirty_bytes)
            assert resampled[granule] == touched, (shift, granule)
