"""The particle-finding benchmark: its scoring helpers by hand, and its --quick run end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryojax_mw.io import ParticleList
from cryojax_mw.localize import Detections

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_BENCH))
_spec = importlib.util.spec_from_file_location("bench_segmentation", _BENCH / "bench_segmentation.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _particles(class_ids, positions):
    n = len(class_ids)
    return ParticleList(
        class_names=("a", "b"), class_ids=np.asarray(class_ids, np.int64),
        positions=np.asarray(positions, np.float64), angles_deg=np.zeros((n, 3)),
        voxel_size=10.0, tomo_name="t",
    )  # fmt: skip


def test_scores_from_counts_match_the_definitions():
    s = bench.scores_from_counts(3, 1, 2)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert np.isnan(bench.scores_from_counts(0, 0, 0)["f1"])


def test_equivalent_radius_is_the_radius_of_a_ball_of_that_volume():
    assert bench.equivalent_radius(round(4 / 3 * np.pi * 1000)) == pytest.approx(10.0, rel=1e-4)


def test_calibration_drops_exactly_the_false_positives_below_the_true_ones():
    truth = _particles([1, 1, 2], [[5, 5, 5], [20, 20, 20], [40, 40, 40]])
    # Class a: two hits with values 9 and 7, two far-away false positives with values 3 and 8;
    # class b: one hit (value 4) and one false positive above it (value 6).
    pred = _particles(
        [1, 1, 1, 1, 2, 2],
        [[5, 5, 6], [20, 21, 20], [60, 60, 60], [80, 80, 80], [40, 40, 41], [100, 5, 5]],
    )
    values = np.array([9.0, 7.0, 3.0, 8.0, 4.0, 6.0])
    det = Detections(pred, sizes=np.ones(6, np.int64), scores=values)
    out = bench.calibrate_thresholds(det, values, truth, max_distance=2.0)
    # a: threshold 7 keeps {9, 7, 8}: F1 = 2*2/(2*2+1) = 0.8; threshold 3 keeps 4 (F1 2/3),
    # threshold 8 keeps {9, 8} (F1 0.5), 9 keeps one hit (F1 2/3).
    assert out["a"] == {"threshold": 7.0, "calibration_f1": pytest.approx(0.8)}
    # b: threshold 4 keeps both (F1 2/3), 6 keeps the false positive only (F1 0).
    assert out["b"] == {"threshold": 4.0, "calibration_f1": pytest.approx(2 / 3)}
    kept = bench.apply_thresholds(det, values, {n: v["threshold"] for n, v in out.items()})
    np.testing.assert_array_equal(np.sort(kept.positions[:, 0]), [5, 20, 40, 80, 100])


@pytest.mark.slow
def test_quick_run_writes_every_part_to_its_own_json(tmp_path):
    readme = _BENCH / "README.md"
    before = readme.read_text()
    proc = subprocess.run([sys.executable, str(_BENCH / "bench_segmentation.py"), "--quick"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((_BENCH / "results" / "segmentation_quick.json").read_text())
    assert report["case"] == "quick" and report["parts"] == list(bench.PARTS)
    acc = report["accuracy"]
    n_true = sum(acc["simulation"]["particles_per_tomogram"])
    for method in ("unet", "template_matching"):
        loc = acc["results"][method]["localization"]
        assert loc["tp"] + loc["fn"] == n_true
    assert report["speed"]["train"]["peak_rss_gb"] > 0
    assert report["whole"]["n_tiles"] > 0
    assert readme.read_text() == before  # only a complete full run rewrites the README
