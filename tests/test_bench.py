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


def test_the_best_peer_is_one_peer_chosen_by_its_median():
    """Not the best of the peers' draws in each round: against two close peers that
    would compare one draw of ours with the luckier of two."""
    bench = load_bench()
    values = {"nbdserve": [100, 100, 100, 100],
              "qemu-nbd": [90, 130, 90, 130],  # median 110
              "qemu-nbd-10": [130, 90, 130, 90],  # median 110, the luckier draw each round
              "nbdkit": [105, 105, 105, 105]}  # median 105
    result = bench.summarise("w", "x/s", True, values, {})
    assert result["best_peer"] in ("qemu-nbd", "qemu-nbd-10")
    assert result["ratios"]["best peer"]["median"] == result["ratios"][
        result["best_peer"]]["median"]
    assert round(result["ratios"]["best peer"]["median"], 3) == round(
        (100 / 90 + 100 / 130) / 2, 3)  # not 100/130, the per-round best
    lower = bench.summarise("m", "ms", False, {"nbdserve": [50, 50, 50],
                                               "qemu-nbd": [40, 60, 45],  # median 45
                                               "nbdkit": [55, 44, 70]}, {})
    assert lower["best_peer"] == "qemu-nbd"
    assert lower["ratios"]["best peer"]["median"] == 45 / 50


class _IdleServer:
    """A stand-in for bench.Server that uses no CPU."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cpu_seconds(self, user_only: bool = False) -> float:
        return 0.0


def test_the_clients_cpu_is_reported_per_unit_beside_the_servers():
    """What the client process spends (it shares the cores with the server) is
    measured from its own accounting, per unit of work."""
    bench = load_bench()
    burn = ("import time\n"
            "while time.process_time() < 0.3:\n"
            "    pass\n")

    def client(server) -> float:
        bench.run([sys.executable, "-c", burn])
        return 3.0  # three units of work per run

    workload = bench.Workload("burn", "x/s", True, client, lambda value: value, "unit")
    result = bench.measure(workload, [_IdleServer("nbdserve")], rounds=2)
    ours = result["servers"]["nbdserve"]
    assert ours["cpu_per_unit_us"] == 0.0
    # At least 0.3 s of CPU over 3 units (plus the interpreter's start-up).
    assert 0.1e6 <= ours["client_cpu_per_unit_us"] < 1e6
