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


def test_candidate_thresholds_are_the_distinct_values_or_quantiles_spanning_them():
    np.testing.assert_array_equal(bench.candidate_thresholds(np.array([3.0, 1.0, 3.0])), [1, 3])
    many = np.random.default_rng(0).normal(size=1000)
    out = bench.candidate_thresholds(many, at_most=50)
    assert out.size <= 50 and np.all(np.diff(out) > 0)
    assert out[0] == many.min() and out[-1] == many.max()  # keep-all and keep-the-top reachable


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
    out = bench.calibrate_thresholds([det], [values], [truth], max_distance=2.0)
    # a: threshold 7 keeps {9, 7, 8}: F1 = 2*2/(2*2+1) = 0.8; threshold 3 keeps 4 (F1 2/3),
    # threshold 8 keeps {9, 8} (F1 0.5), 9 keeps one hit (F1 2/3).
    assert out["a"] == {"threshold": 7.0, "calibration_f1": pytest.approx(0.8)}
    # b: threshold 4 keeps both (F1 2/3), 6 keeps the false positive only (F1 0).
    assert out["b"] == {"threshold": 4.0, "calibration_f1": pytest.approx(2 / 3)}
    kept = bench.apply_thresholds(det, values, {n: v["threshold"] for n, v in out.items()})
    np.testing.assert_array_equal(np.sort(kept.positions[:, 0]), [5, 20, 40, 80, 100])


def test_calibration_pools_the_counts_of_several_tomograms():
    # Class a only. Tomogram 1: a hit of value 5 and a false positive of value 9; tomogram 2:
    # three hits of values 1, 2, 3. Alone, tomogram 1 would pick 5 (F1 2/3 > 0 at 9) and
    # tomogram 2 would pick 1; pooled, threshold 1 keeps all (tp 4, fp 1: F1 8/9), higher ones
    # lose hits (2: F1 6/8, 3: 4/6 ...).
    truth1 = _particles([1], [[5, 5, 5]])
    truth2 = _particles([1, 1, 1], [[5, 5, 5], [20, 20, 20], [40, 40, 40]])
    det1 = Detections(_particles([1, 1], [[5, 5, 5], [60, 60, 60]]), np.ones(2, np.int64),
                      np.array([5.0, 9.0]))  # fmt: skip
    det2 = Detections(_particles([1, 1, 1], [[5, 5, 5], [20, 20, 20], [40, 40, 40]]),
                      np.ones(3, np.int64), np.array([1.0, 2.0, 3.0]))  # fmt: skip
    found, values = [det1, det2], [det1.scores, det2.scores]
    out = bench.calibrate_thresholds(found, values, [truth1, truth2], max_distance=2.0)
    assert out["a"] == {"threshold": 1.0, "calibration_f1": pytest.approx(8 / 9)}
    assert out["b"] == {"threshold": np.inf, "calibration_f1": 0.0}  # no detection of b
    # Localization: the same optimum for a; b keeps nothing either way.
    loc, f1 = bench.calibrate_localization_thresholds(
        found, values, [truth1, truth2], 2.0, {"a": 9.0, "b": np.inf}
    )
    assert loc["a"] == 1.0 and f1 == pytest.approx(8 / 9)


def test_cross_validation_scores_each_fold_with_the_other_folds_thresholds():
    # Tomogram A: a hit of value 5, a false positive of value 3; tomogram B: a hit of value 2.
    # Fitted on B, the threshold 2 keeps A's false positive; fitted on A, 5 drops B's hit:
    # pooled tp 1, fp 1, fn 1, F1 1/2, where one threshold for both (2) would score 4/5.
    truth_a, truth_b = _particles([1], [[5, 5, 5]]), _particles([1], [[20, 20, 20]])
    det_a = Detections(_particles([1, 1], [[5, 5, 5], [60, 60, 60]]), np.ones(2, np.int64),
                       np.array([5.0, 3.0]))  # fmt: skip
    det_b = Detections(_particles([1], [[20, 20, 20]]), np.ones(1, np.int64), np.array([2.0]))
    found, values = [det_a, det_b], [det_a.scores, det_b.scores]
    cv = bench.cross_validated_f1(found, values, [truth_a, truth_b], 2.0, n_folds=2)
    assert cv == pytest.approx(0.5)
    assert bench.fit_thresholds(found, values, [truth_a, truth_b], 2.0)[2] == pytest.approx(0.8)


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
    assert set(acc["results"]) == {*bench.UNET_VARIANTS, "template_matching"}
    primary = acc["settings"]["unet_primary"]
    cv = {m: acc["results"][m]["calibration_cv_localization_f1"] for m in bench.UNET_VARIANTS}
    assert cv[primary] == max(cv.values())  # chosen by cross-validated calibration F1
    for method in acc["results"]:
        loc = acc["results"][method]["localization_operating_point"]
        assert loc["tp"] + loc["fn"] == n_true
    assert report["speed"]["train"]["peak_rss_gb"] > 0
    assert report["whole"]["n_tiles"] > 0
    assert readme.read_text() == before  # only a complete full run rewrites the README


def test_threshold_cross_validation_refuses_the_held_out_seeds(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "segmentation_threshold_cv", _BENCH / "segmentation_threshold_cv.py"
    )
    cv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cv)
    with pytest.raises(SystemExit) as info:
        cv.main(["--workdir", str(tmp_path), "--seeds", "20", str(bench.TEST_SEED)])
    assert info.value.code == 2 and "held-out" in capsys.readouterr().err
