"""The benchmark's own set-up, kept working: it is not run by the suite otherwise, and a
helper that calls a removed API would only fail in the next benchmark run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from conftest import NBDSERVE, run
from nbdserve.bitmaps.qdb import read_qdb

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_run", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_16_tib_dirty_bitmap_image_is_one_the_server_accepts(tmp_path):
    bench = load_bench()
    image = bench.prepare_dirty_bitmap_image(tmp_path)
    assert image.stat().st_size == bench.BIG_IMAGE_SIZE
    qdb = str(image) + ".qdb"
    assert "OK, 1 bitmaps" in run(*NBDSERVE, "qdb", "check", qdb).stdout
    (stored,) = read_qdb(qdb).bitmaps
    assert (stored.name, stored.granularity_bits) == ("backup", 16)
    assert stored.bits.count() == 1_000_000
