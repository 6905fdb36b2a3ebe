"""BitmapStore: operations, transactions, persistence and recovery, in-process."""

from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path

import pytest

from nbdserve.bitmaps.policy import BitmapError
from nbdserve.bitmaps.qdb import read_qdb
from nbdserve.bitmaps.store import BitmapStore, StoreLocked
from nbdserve.config import BitmapRequest
from nbdserve.image import RawImage

MiB = 1 << 20


@pytest.fixture
def raw(image):
    img = RawImage(str(image))
    yield img
    img.close()


def open_store(raw, *requests, **kwargs) -> BitmapStore:
    return BitmapStore.open(raw.path + ".qdb", raw.size, raw.identity,
                            requests=[BitmapRequest(*r) for r in requests], **kwargs)


def killed_after(work) -> None:
    """Run work in a child process that is then killed with SIGKILL: what it leaves is
    exactly what a crash leaves (no save, the journal as written; the kernel closes
    its files and drops its lock)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            work()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL, "the work before the kill failed"


def info(store, name):
    return next(b for b in store.query() if b["name"] == name)


def test_requests_create_and_enable(raw):
    store = open_store(raw, ("b0",), ("b1", 4096))
    assert [(b["name"], b["granularity"], b["recording"]) for b in store.query()] == \
        [("b0", 65536, True), ("b1", 4096, True)]
    store.execute("bitmap-disable", {"name": "b1"})
    store.close()
    store = open_store(raw, ("b1",))
    assert info(store, "b1")["recording"]  # --bitmap enables an existing bitmap
    store.close()


def test_marks_survive_a_clean_restart(raw):
    store = open_store(raw, ("b0",))
    store.mark_dirty(5 * MiB, 100)
    store.close()
    contents = read_qdb(raw.path + ".qdb")
    assert not contents.in_use
    assert not os.path.exists(raw.path + ".qdb.journal")
    store = open_store(raw)
    assert store.dirty_runs("qemu:dirty-bitmap:b0", 5 * MiB, 65536, 10) == ([65536], True)
    assert not info(store, "b0")["inconsistent"]
    store.close()


def test_crash_recovers_from_the_journal(raw):
    def work():
        store = open_store(raw, ("b0",), ("fine", 512))
        store.mark_dirty(0, 1)
        store.mark_dirty(63 * MiB, MiB)
    killed_after(work)
    assert read_qdb(raw.path + ".qdb").in_use
    store = open_store(raw)
    assert not info(store, "b0")["inconsistent"]
    assert info(store, "b0")["count"] == 65536 + MiB
    assert info(store, "fine")["count"] == 512 + MiB
    store.close()


def test_crash_without_journal_is_inconsistent(raw, caplog):
    killed_after(lambda: open_store(raw, ("b0",)).mark_dirty(0, 1))
    os.unlink(raw.path + ".qdb.journal")
    store = open_store(raw)
    assert info(store, "b0")["inconsistent"]
    assert "left in use without a usable journal" in caplog.text
    assert store.contexts() == []  # never exported
    with pytest.raises(BitmapError, match="inconsistent"):
        store.execute("bitmap-enable", {"name": "b0"})
    store.execute("bitmap-clear", {"name": "b0"})  # allowed: starts afresh
    assert not info(store, "b0")["inconsistent"]
    store.close()


def test_image_changed_while_down_makes_bitmaps_inconsistent(raw, image, caplog):
    store = open_store(raw, ("b0",))
    store.close()
    with open(image, "r+b") as f:
        f.write(b"changed behind our back")
    store = open_store(raw)
    assert info(store, "b0")["inconsistent"]
    assert "changed while no server was running (mtime, ctime)" in caplog.text
    store.close()
    # The verdict is persisted until an operator clears or removes the bitmap.
    store = open_store(raw)
    assert info(store, "b0")["inconsistent"]
    store.execute("bitmap-remove", {"name": "b0"})
    store.close()


def test_lock_refuses_a_second_holder(raw):
    store = open_store(raw, ("b0",))
    with pytest.raises(StoreLocked, match="in use by another process"):
        open_store(raw)
    store.close()
    open_store(raw).close()


def test_operation_errors_are_qemu_like(raw):
    store = open_store(raw, ("b0",))
    cases = [
        ("bitmap-add", {"name": "b0"}, "Bitmap already exists: b0"),
        ("bitmap-add", {"name": "x", "granularity": 1000}, "power of 2"),
        ("bitmap-add", {"name": ""}, "cannot be empty"),
        ("bitmap-remove", {"name": "zz"}, "Dirty bitmap 'zz' not found"),
        ("bitmap-merge", {"target": "b0", "bitmaps": ["zz"]}, "'zz' not found"),
        ("bitmap-frobnicate", {"name": "b0"}, "unknown action"),
    ]
    for action, arguments, message in cases:
        with pytest.raises(BitmapError, match=message):
            store.execute(action, arguments)
    store.close()


def test_merge_and_checkpoint(raw):
    store = open_store(raw, ("a",), ("c", 4096))
    store.execute("bitmap-add", {"name": "b", "disabled": True})
    store.mark_dirty(0, 1)
    assert info(store, "b")["count"] == 0  # disabled bitmaps do not record
    with pytest.raises(BitmapError, match="granularit"):
        store.execute("bitmap-merge", {"target": "b", "bitmaps": ["c"]})
    store.execute("bitmap-merge", {"target": "b", "bitmaps": ["a"]})
    assert info(store, "b")["count"] == 65536
    store.execute("bitmap-checkpoint", {"old": "a", "new": "a2"})
    store.mark_dirty(MiB, 1)
    assert info(store, "a")["count"] == 65536  # frozen
    assert info(store, "a2")["count"] == 65536 and not info(store, "a")["recording"]
    store.close()


def test_transaction_is_all_or_nothing(raw):
    store = open_store(raw, ("a",))
    store.mark_dirty(0, 1)
    with pytest.raises(BitmapError, match="'missing' not found"):
        store.transaction([("bitmap-add", {"name": "new"}), ("bitmap-clear", {"name": "a"}),
                           ("bitmap-disable", {"name": "missing"})])
    assert [b["name"] for b in store.query()] == ["a"]
    assert info(store, "a")["count"] == 65536
    # Later actions see the state earlier ones leave.
    store.transaction([("bitmap-add", {"name": "n"}), ("bitmap-disable", {"name": "n"}),
                       ("bitmap-merge", {"target": "n", "bitmaps": ["a"]})])
    assert info(store, "n")["count"] == 65536 and not info(store, "n")["recording"]
    store.close()


def test_busy_bitmaps_refuse_changes_but_can_be_read(raw):
    store = open_store(raw, ("a",), ("b",))
    held = store.hold(["qemu:dirty-bitmap:a", "base:allocation"])
    assert held == ["a"] and info(store, "a")["busy"]
    for action in ("bitmap-remove", "bitmap-clear", "bitmap-disable"):
        with pytest.raises(BitmapError, match="in use by another operation"):
            store.execute(action, {"name": "a"})
    store.execute("bitmap-merge", {"target": "b", "bitmaps": ["a"]})  # reading is fine
    store.release(held)
    store.execute("bitmap-remove", {"name": "a"})
    store.close()


def test_read_only_store_changes_nothing(raw):
    open_store(raw, ("a",)).close()
    before = Path(raw.path + ".qdb").read_bytes()
    store = open_store(raw, read_only=True)
    with pytest.raises(BitmapError, match="read-only"):
        store.execute("bitmap-clear", {"name": "a"})
    store.close()
    assert Path(raw.path + ".qdb").read_bytes() == before


def test_unreadable_qdb_is_kept_aside_and_requested_bitmaps_start_inconsistent(raw, caplog):
    with open(raw.path + ".qdb", "wb") as f:
        f.write(b"QDB\0" + b"\xff" * 4092)
    store = open_store(raw, ("b0",))
    assert info(store, "b0")["inconsistent"]
    assert any(name.startswith("disk.img.qdb.corrupt-")
               for name in os.listdir(os.path.dirname(raw.path)))
    assert "is unusable" in caplog.text
    store.close()


@pytest.mark.parametrize("damage", ["header", "header and directory checksum", "copy only"])
def test_bitmaps_of_a_damaged_header_come_back_inconsistent(raw, caplog, damage):
    """Issue 11: header damage must not make bitmaps that no --bitmap names vanish."""
    store = open_store(raw, ("named",), ("other", 4096))
    store.execute("bitmap-disable", {"name": "other"})
    store.close()
    path = Path(raw.path + ".qdb")
    data = bytearray(path.read_bytes())
    if damage in ("header", "header and directory checksum"):
        data[40:48] = b"\xee" * 8  # the image size: the header's checksum fails
    if damage == "header and directory checksum":
        data[88:104] = bytes(16)  # where the directory is: only the copy still says
    if damage == "copy only":
        data[256 + 40] ^= 0xFF  # a server ignores the copy
    path.write_bytes(bytes(data))
    store = open_store(raw, ("named",))
    found = {b["name"]: b for b in store.query()}
    if damage == "copy only":
        assert not found["other"]["inconsistent"] and not found["named"]["inconsistent"]
    else:
        assert set(found) == {"named", "other"}
        assert all(b["inconsistent"] for b in found.values())
        assert found["other"]["granularity"] == 4096 and not found["other"]["recording"]
        assert "'named', 'other' are inconsistent" in caplog.text
    store.close()


def test_an_mtime_put_back_after_an_offline_write_is_still_seen(raw, image, caplog):
    """Issue 11: touch -r / cp -p / rsync -t restore an mtime, never a ctime."""
    store = open_store(raw, ("b0",))
    store.close()
    before = os.stat(image)
    time.sleep(0.01)
    with open(image, "r+b") as f:
        f.write(b"changed behind our back")
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(image).st_mtime_ns == before.st_mtime_ns
    store = open_store(raw)
    assert info(store, "b0")["inconsistent"]
    assert "while no server was running (ctime)" in caplog.text
    store.close()


@pytest.mark.parametrize("failing", ["pwrite", "fsync"])
def test_a_full_disk_during_a_save_keeps_the_previous_file(raw, monkeypatch, failing):
    import errno

    store = open_store(raw, ("b0",))
    store.mark_dirty(0, 1)
    store.close()
    before = Path(raw.path + ".qdb").read_bytes()
    real = getattr(os, failing)

    def no_space(fd, *args):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".disk.img.qdb"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *args)

    def work():  # in a child, killed at the end
        store = open_store(raw)
        monkeypatch.setattr(os, failing, no_space)
        with pytest.raises(OSError, match="No space"):
            store.transaction([("bitmap-add", {"name": "new"}),
                               ("bitmap-clear", {"name": "b0"}),
                               ("bitmap-disable", {"name": "b0"})])
        monkeypatch.undo()
        # Not persisted, so not done: the bitmaps are exactly as before.
        assert [(b["name"], b["count"], b["recording"]) for b in store.query()] == \
            [("b0", 65536, True)]
        store.mark_dirty(MiB, 1)  # and still recording, through the journal
        assert info(store, "b0")["count"] == 2 * 65536
        # The file on disk is the last good save (in use), and no temporary file is left.
        assert read_qdb(raw.path + ".qdb").bitmaps[0].name == "b0"
        assert not [n for n in os.listdir(os.path.dirname(raw.path)) if ".tmp" in n]
    killed_after(work)
    store = open_store(raw)
    assert info(store, "b0")["count"] == 2 * 65536 and not info(store, "b0")["inconsistent"]
    store.close()
    assert before  # the pre-crash file existed


@pytest.mark.parametrize("buffers", [1, 2])
@pytest.mark.parametrize("action", ["bitmap-clear", "bitmap-add"])
def test_a_write_racing_with_a_reset_is_recorded_in_the_new_epoch(raw, action, buffers):
    """A clear, or a new bitmap (as a checkpoint adds), that lands between a write's marking and
    its data must not leave the write unrecorded."""
    from nbdserve.config import ExportConfig
    from nbdserve.export import Export

    store = open_store(raw, ("b0",))
    store.mark_dirty(0, 64 * 1024)  # granule 0 is dirty: the write's mark is a no-op
    export = Export(ExportConfig("", raw.path), raw, store)

    reset = []

    def reset_then(write):
        def reset_then_write(offset, data):
            if not reset:  # once, whichever verb comes first
                reset.append(action)
                if action == "bitmap-clear":
                    store.execute("bitmap-clear", {"name": "b0"})
                else:
                    store.execute("bitmap-add", {"name": "b1"})
            write(offset, data)
        return reset_then_write

    # One buffer is written with pwrite, several with pwritev (Export.write).
    raw.pwrite, raw.pwritev = reset_then(raw.pwrite), reset_then(raw.pwritev)
    export.write(4096, 4096, (bytes(4096),) if buffers == 1 else (bytes(1024), bytes(3072)))
    assert reset == [action]
    name = "b0" if action == "bitmap-clear" else "b1"  # the new bitmap records it
    assert store.dirty_runs(f"qemu:dirty-bitmap:{name}", 0, 65536, 10) == ([65536], True)
    store.close()


def test_group_records_replay_onto_the_recording_bitmaps_of_their_granularity(raw):
    def work():
        store = open_store(raw, ("b0",), ("fine", 4096), ("frozen",))
        store.execute("bitmap-disable", {"name": "frozen"})
        store.mark_dirty(3 * MiB, 100)  # one group record per granularity
    killed_after(work)
    store = open_store(raw)
    dirty = {b["name"]: b["count"] for b in store.query()}
    assert dirty == {"b0": 65536, "fine": 4096, "frozen": 0}
    assert not any(b["inconsistent"] for b in store.query())
    store.close()


def test_one_recording_bitmap_costs_its_bits_once(raw):
    """Issue 11: a group of one recording bitmap is its own summary (no second copy of
    the bits); groups of several keep a coarse one, and marking stays exact either way."""
    store = open_store(raw, ("solo", 4096), ("pair1", None), ("pair2", None))
    try:
        groups = {shift: (members, summary, summary_shift) for summary, summary_shift, shift,
                  members, _coarse in store.recorder.groups}
        (solo,), summary, _ = groups[12]
        assert summary is solo is store.bitmaps["solo"].bitmap.bits
        pair, pair_summary, pair_shift = groups[16]
        assert len(pair) == 2 and all(pair_summary is not bits for bits in pair)
        # The pair's summary is coarse: 64 granules to a bit, 1/64 of a member.
        assert pair_shift == 16 + 6
        assert len(pair_summary) * 64 >= len(pair[0]) > (len(pair_summary) - 1) * 64
        store.mark_dirty(5 * MiB, 4096)
        store.mark_dirty(5 * MiB, 4096)  # already dirty: the summary says so
        assert info(store, "solo")["count"] == 4096
        assert info(store, "pair1")["count"] == info(store, "pair2")["count"] == 65536
        store.execute("bitmap-clear", {"name": "solo"})
        store.mark_dirty(5 * MiB, 4096)
        assert info(store, "solo")["count"] == 4096  # recorded again after the clear
    finally:
        store.close()


def test_a_coarse_summary_never_claims_a_granule_some_member_lacks():
    """The summary of several bitmaps (tracking.py) is set only where every member is
    dirty over its whole group of 64 granules: over-claiming would skip a record."""
    import random

    from nbdserve.bitmaps.bitmap import Bitmap

    rng = random.Random(11)
    size = (64 * 37 + 5) * 4096  # a partial last group
    members = [Bitmap(size, 12) for _ in range(3)]

    def expected(summary):
        n = len(members[0])
        return [all(all(m.is_set(g * 4096, 4096) for g in range(k * 64, min(n, k * 64 + 64)))
                    for m in members) for k in range(len(summary))]

    for _ in range(200):
        first = rng.randrange(len(members[0]))
        stop = min(len(members[0]), first + rng.choice([1, 7, 64, 200]))
        for member in rng.sample(members, rng.choice([1, 2, 3])):
            member.set_granules(first, stop)
    summary = Bitmap.summary_of(members, 6)
    assert [summary.is_set(k << 18, 1) for k in range(len(summary))] == expected(summary)
    assert any(expected(summary))  # the random fill made some groups whole
    for _ in range(100):  # now kept up to date as the tracker does
        first = rng.randrange(len(members[0]))
        stop = min(len(members[0]), first + rng.choice([1, 64, 300]))
        for member in members:
            member.set_granules(first, stop)
        summary.update_summary(members, first, stop)
    assert [summary.is_set(k << 18, 1) for k in range(len(summary))] == expected(summary)


@pytest.mark.parametrize("bitmaps", [
    {"solo": 4096, "a": None, "b": None, "c": None},  # a group of one and one of three
    {"a": None},  # one group, its own summary (mark_dirty's first look: Recorder.only)
    {"a": None, "b": None, "c": None},  # one group with a coarse summary (the same)
], ids=["two-groups", "one-bitmap", "one-group-of-three"])
def test_marking_is_exact_for_every_shape_of_write_and_group(raw, bitmaps):
    """The marking path's first look (is everything dirty already?) reads the summary
    bits directly: single granules, ranges across granules and across a coarse
    summary's groups, in a group of one and a group of three, with clears between,
    must leave each bitmap with exactly the granules written since its last clear."""
    import random

    rng = random.Random(7)
    shifts = {name: 12 if granularity == 4096 else 16 for name, granularity in bitmaps.items()}
    store = open_store(raw, *bitmaps.items())
    assert (store.recorder.only is not None) == (len(set(shifts.values())) == 1)
    expected = {name: set() for name in shifts}
    try:
        for step in range(4000):
            if step % 500 == 499:
                name = rng.choice(sorted(shifts))
                store.execute("bitmap-clear", {"name": name})
                expected[name].clear()
            length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 8 * MiB)])
            # Mostly where writes went before (the look finds them dirty), some new.
            offset = rng.randrange(0, 8 * MiB if rng.random() < 0.8 else raw.size)
            length = min(length, raw.size - offset)
            store.mark_dirty(offset, length)
            for name, shift in shifts.items():
                expected[name].update(range(offset >> shift,
                                            ((offset + length - 1) >> shift) + 1))
        for name, shift in shifts.items():
            lengths, dirty = store.dirty_runs(f"qemu:dirty-bitmap:{name}", 0, raw.size,
                                              1 << 20)
            granules, position = set(), 0
            for run in lengths:
                if dirty:
                    granules.update(range(position >> shift, (position + run) >> shift))
                position += run
                dirty = not dirty
            assert granules == expected[name], name
    finally:
        store.close()
