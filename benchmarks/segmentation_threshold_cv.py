"""How well do the segmentation benchmark's threshold rules carry to unseen tomograms?

Leave-one-tomogram-out over calibration-like tomograms only (seeds 20-25 by default; the held-out
seeds of `bench_segmentation.py` are never touched), with the U-Net trained by that benchmark
(`--workdir` of a finished run), probabilities averaged over the four wedge-preserving rotations.
For each voxel labelling (argmax, or particle when the particle classes together reach 0.3, 0.4,
0.5) and each threshold rule, the thresholds are fitted on all tomograms but one for the best
pooled localization F1 and scored on that one; the folds' counts are pooled.

Rules: `per_class`, the benchmark's (smallest cluster per class, set per class for F1, then for
localization F1); `relative`, one threshold on the cluster size over its template's mask volume.

    python benchmarks/bench_segmentation.py --workdir runs/seg        # trains the model first
    python benchmarks/segmentation_threshold_cv.py --workdir runs/seg # results/segmentation_threshold_cv.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_segmentation as bench  # noqa: E402
from _common import write_json_atomic  # noqa: E402

FOREGROUND_THRESHOLDS = (None, 0.3, 0.4, 0.5)


def main(argv=None) -> int:
    import jax
    import numpy as np

    from cryojax_mw import localize, nn, simulate

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True,
                   help="a finished training run of bench_segmentation.py's accuracy part")
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(20, 26)),
                   help="simulation seeds of the tomograms (not the benchmark's held-out ones)")
    args = p.parse_args(argv)
    held_out = set(range(bench.TEST_SEED, bench.TEST_SEED + bench.ACCURACY["full"]["n_test"]))
    if held_out & set(args.seeds):
        p.error(f"seeds {sorted(held_out & set(args.seeds))} are the benchmark's held-out ones")

    spec = bench.ACCURACY["full"]
    classes = spec["classes"]
    config = simulate.SimulationConfig(
        shape=spec["shape"], classes=classes, n_particles=spec["n_particles"], occupancy=None,
        snr=bench.SNR, tilt_min=bench.TILT_MIN, tilt_max=bench.TILT_MAX, tilt_step=bench.TILT_STEP,
    )  # fmt: skip
    templates = {t.name: t for t in config.load_templates()}
    radii = {n: bench.equivalent_radius(templates[n].n_mask_voxels) for n in classes}
    radius = float(np.median(list(radii.values())))
    mask_voxels = np.array([templates[n].n_mask_voxels for n in classes], dtype=np.float64)
    segmenter = nn.load_segmenter(args.workdir)
    sims = [simulate.simulate_tomogram(jax.random.key(s), config, name=f"cv_{s}")
            for s in args.seeds]  # fmt: skip
    truths = [s.particles for s in sims]
    tic = time.perf_counter()
    per_tomogram = [
        bench.unet_detections(segmenter, sim, average_rotations=True,
                              foreground_thresholds=FOREGROUND_THRESHOLDS,
                              patch_size=spec["inference_patch"], radii=radii, classes=classes)
        for sim in sims
    ]  # fmt: skip
    found = {t: [f[i] for f in per_tomogram] for i, t in enumerate(FOREGROUND_THRESHOLDS)}
    bench.log(f"segmented and clustered {len(sims)} tomograms in {time.perf_counter() - tic:.0f} s")

    def evaluate(f, values, thresholds, truth):
        kept = bench.apply_thresholds(f, values, thresholds)
        return localize.evaluate_detections(kept, truth, max_distance=radius)

    def fit_per_class(dets, values, truth):
        return bench.fit_thresholds(dets, values, truth, radius)[1]

    def fit_relative(dets, values, truth):
        candidates = np.unique(np.quantile(np.concatenate(values), np.linspace(0, 1, 300)))
        scores = [bench.pooled_f1([evaluate(f, v, dict.fromkeys(classes, r), t)
                                   for f, v, t in zip(dets, values, truth)])
                  for r in candidates]  # fmt: skip
        return dict.fromkeys(classes, float(candidates[int(np.argmax(scores))]))

    rules = {
        "per_class": (lambda f: f.sizes, fit_per_class),
        "relative": (lambda f: f.sizes / mask_voxels[f.particles.class_ids - 1], fit_relative),
    }
    results = {}
    for t in FOREGROUND_THRESHOLDS:
        for rule, (value_of, fit) in rules.items():
            values = [value_of(f) for f in found[t]]
            folds = []
            for k in range(len(sims)):
                rest = [i for i in range(len(sims)) if i != k]
                thresholds = fit([found[t][i] for i in rest], [values[i] for i in rest],
                                 [truths[i] for i in rest])  # fmt: skip
                folds.append(evaluate(found[t][k], values[k], thresholds, truths[k]))
            thresholds = fit(found[t], values, truths)
            in_sample = [evaluate(f, v, thresholds, tr)
                         for f, v, tr in zip(found[t], values, truths)]  # fmt: skip
            key = f"{'argmax' if t is None else f'foreground_{t:g}'}/{rule}"
            results[key] = {"cv_f1": bench.pooled_f1(folds),
                            "per_tomogram_f1": [e.localization["f1"] for e in folds],
                            "in_sample_f1": bench.pooled_f1(in_sample)}  # fmt: skip
            bench.log(f"{key}: left-out F1 {results[key]['cv_f1']:.3f}, in-sample "
                      f"{results[key]['in_sample_f1']:.3f}")  # fmt: skip
    write_json_atomic(HERE / "results" / "segmentation_threshold_cv.json",
                      {"seeds": args.seeds, "model": str(args.workdir), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
