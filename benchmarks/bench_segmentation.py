"""Particle-finding benchmark: U-Net segmentation + mean-shift against template matching.

Three parts (`--parts`, default all three):

- accuracy: a small simulated dataset (SNR 0.1, tilts -60..60 by 2 deg, 8 particle classes small
  to large). A reduced DeepFinder U-Net is trained on the training tomograms (patches turned by
  the four wedge-preserving 180 deg rotations). The calibration tomograms (other seeds, the
  first of them the training run's validation set) and the held-out tomograms (other seeds
  again) are segmented in four U-Net variants (`UNET_VARIANTS`): probabilities averaged over the
  same four rotations or one orientation, times voxels labelled by their most probable class or as
  particle when the particle classes together reach 0.5 (`localize.label_voxels`). The label maps
  are clustered by mean-shift (each class on its own, bandwidth = the equivalent-sphere radius of
  its template; clusters merged when a centre lies within half a larger cluster's class radius, so
  one particle with mixed labels is one detection) and scored with `evaluate_detections` (match
  distance = the median of those radii). Template matching (masked NCC over a coarse rotation
  grid, templates at the dataset's voxel size, missing wedge of the tilt range, each class's map
  standardised before the classes compete for voxels) runs on the same tomograms. Every threshold
  (U-Net: smallest cluster per class; template matching: score per class) is chosen on the
  calibration tomograms, counts pooled, to maximise that class's F1 there (the per-class table); a
  second set, chosen there for the best overall localization F1, gives the overall localization
  score. The primary U-Net is the variant with the best localization F1 on the calibration
  tomograms cross-validated (each fold's thresholds fitted on the others). The held-out tomograms
  are never used to choose anything.
- speed: the published network (widths (32, 48, 64), 13 classes) on one 128^3 block (median of
  3 calls after a warm-up), and training steps at batch 25 x 56^3 with the default micro-batching
  (median of 3 steps after the first), each in a child process whose peak memory is its own.
- whole: one 200 x 512 x 512 simulated tomogram segmented with the published network (sliding
  windows, label map only) and clustered by mean-shift (a radius per class, as in accuracy), in a
  child process: wall time and peak memory.

    python benchmarks/bench_segmentation.py                    # all parts, results/segmentation.json
    python benchmarks/bench_segmentation.py --parts accuracy   # results/segmentation_partial.json
    python benchmarks/bench_segmentation.py --quick            # tiny sizes, results/segmentation_quick.json
    python benchmarks/bench_segmentation.py --workdir runs/seg # keep (and reuse) the training run
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (
    machine_info,
    markdown_table,
    run_script_with_peak_rss,
    time_call,
    update_markdown_block,
    write_json_atomic,
)

PARTS = ("accuracy", "speed", "whole")

# Accuracy part. Eight classes from the smallest shipped SHREC'21 templates up to the proteasome;
# sizes chosen so that the part runs in about an hour on 2 shared CPU cores. Dice + cross-entropy
# was chosen over cross-entropy alone by validation Dice (1000-step runs: 2cg9 0.46 vs 0.36, 1bxn
# 0.33 vs 0.18, the other classes equal).
# 5000 steps, constant rate then a linear drop over the last 1000: a cosine schedule did worse at
# 3000 steps (validation Dice of the eight particle classes: mean 0.20 against 0.29 at constant
# rate, four small classes at 0), since the small classes appear late, after the rate has dropped;
# at 3000 constant-rate steps the validation loss was still falling (0.963 at step 2000, 0.941 at
# 3000). At step 5000 the final drop gave validation loss 0.836 and mean particle Dice 0.42 where
# the constant rate gave 0.849 and 0.40 (constant to step 7000: loss 0.83-0.88, Dice 0.36-0.44).
# Twenty training tomograms (200 particles per class), where ten gave training loss 0.66 against
# validation 0.72 at step 5000: more particles at no cost per step. Eleven calibration tomograms
# (the first three the training run's validation set): thresholds set on one moved held-out F1 by
# 0.03-0.05, and with three the calibration F1 still ran 0.03 above the held-out one.
ACCURACY = {
    "full": {
        "classes": ("3qm1", "1s3x", "3gl1", "3h84", "2cg9", "3d2f", "1bxn", "4cr2"),
        "shape": (64, 128, 128), "n_particles": 80, "n_train": 20, "n_calibration": 11,
        "n_validation": 3, "n_folds": 3, "n_test": 8,
        "train": {"widths": (16, 24, 32), "patch_size": 32, "batch_size": 8, "max_shift": 10,
                  "steps": 7500, "learning_rate": 1e-3,
                  "learning_rate_schedule": "constant-then-decay", "loss": "dice+ce",
                  "augment_turn": True, "validate_every": 250, "validation_size": 16},
        "inference_patch": 64, "tm_angular_step_deg": 45.0, "tm_top_k": 50,
    },
    "quick": {
        "classes": ("1s3x", "1bxn"),
        "shape": (32, 64, 64), "n_particles": 12, "n_train": 1, "n_calibration": 2,
        "n_validation": 1, "n_folds": 2, "n_test": 2,
        "train": {"widths": (8, 8, 8), "patch_size": 16, "batch_size": 2, "max_shift": 4,
                  "steps": 3, "learning_rate": 1e-3, "validate_every": 3, "validation_size": 2},
        "inference_patch": 32, "tm_angular_step_deg": 90.0, "tm_top_k": 10,
    },
}  # fmt: skip
# The U-Net variants scored: name -> (probabilities averaged over the four wedge-preserving
# rotations, foreground threshold of `localize.label_voxels`: None labels each voxel with its most
# probable class). The one with the best cross-validated localization F1 on the calibration
# tomograms is the primary method. A one-off two-fold run on the 7500-step model's eleven
# calibration tomograms (cluster sizes thresholded) put averaged foreground labels (0.856 at 0.5,
# 0.858 at 0.4) ahead of one orientation (0.838, 0.832) and of argmax labels (0.842 either way),
# though in-sample F1 ranked one orientation first; thresholding a cluster's mean class probability instead did worse
# (0.78-0.81), probability times size no better (0.83-0.85).
UNET_VARIANTS = {
    "unet_averaged_foreground": (True, 0.5),
    "unet_averaged_argmax": (True, None),
    "unet_one_orientation_foreground": (False, 0.5),
    "unet_one_orientation_argmax": (False, None),
}
# Seeds of the simulated tomograms: training ones (calibration ones follow them), held-out ones.
# The held-out seeds start at 300: seeds 100-102 (held out until the 5000-step run) and 200-207
# (until the 7500-step run with three calibration tomograms) have been seen.
TRAIN_SEED, TEST_SEED = 0, 300
SNR, TILT_MIN, TILT_MAX, TILT_STEP = 0.1, -60.0, 60.0, 2.0

# Speed part: the published network; the reference implementation's figures are quoted.
SPEED = {
    "full": {"block": 128, "train_patch": 56, "train_batch": 25, "timed_steps": 3,
             "train_shape": (64, 128, 128)},
    "quick": {"block": 32, "train_patch": 16, "train_batch": 5, "timed_steps": 2,
              "train_shape": (48, 64, 64)},
}  # fmt: skip
PUBLISHED_N_CLASSES = 13
REFERENCE = {"inference_128_s": 10.0, "train_step_s": 43.0, "speedup_target": 3.0,
             "source": "Keras/TensorFlow DeepFinder on a comparable CPU machine, as quoted in the "
                       "issue (not measured here)"}  # fmt: skip

# Whole-tomogram part: the simulator benchmark's SHREC-sized tomogram.
WHOLE = {
    "full": {"shape": (200, 512, 512), "n_particles": 1500, "n_vesicles": 3, "n_gold": 5,
             "n_decoys": 50, "patch_size": 128, "batch_size": 1},
    "quick": {"shape": (64, 128, 128), "n_particles": 60, "n_vesicles": 1, "n_gold": 2,
              "n_decoys": 10, "patch_size": 32, "batch_size": 2},
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# accuracy


def equivalent_radius(n_voxels: int) -> float:
    """Radius in voxels of the ball with `n_voxels` voxels."""
    return (3.0 * n_voxels / (4.0 * math.pi)) ** (1.0 / 3.0)


def subset(particles, keep):
    """The particles where the boolean `keep` is True, as a new ParticleList."""
    from cryojax_mw.io import ParticleList

    return ParticleList(
        class_names=particles.class_names, class_ids=particles.class_ids[keep],
        positions=particles.positions[keep], angles_deg=particles.angles_deg[keep],
        voxel_size=particles.voxel_size, tomo_name=particles.tomo_name,
    )  # fmt: skip


def apply_thresholds(detections, values, thresholds: dict):
    """Keep the detections whose `values` reach their class's threshold (a class missing from
    `thresholds` keeps everything)."""
    import numpy as np

    names = detections.particles.class_names
    limit = np.array([thresholds.get(n, -np.inf) for n in names])
    keep = values >= limit[detections.particles.class_ids - 1]
    return subset(detections.particles, keep)


def pooled_f1(evaluations, k: int | None = None) -> float:
    """F1 from the counts summed over several tomograms' evaluations: class k's (0-based) or,
    for None, the localization's (classes ignored); 0 where nothing was predicted or true."""
    if k is None:
        tp, fp, fn = (sum(e.localization[a] for e in evaluations) for a in ("tp", "fp", "fn"))
    else:
        tp, fp, fn = (sum(int(getattr(e, a)[k]) for e in evaluations) for a in ("tp", "fp", "fn"))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def candidate_thresholds(values, at_most: int = 200):
    """The distinct `values`, or `at_most` of their quantiles where there are more: continuous
    scores would otherwise make each calibration sweep as long as the detection list."""
    import numpy as np

    candidates = np.unique(values)
    if candidates.size > at_most:
        candidates = np.unique(np.quantile(values, np.linspace(0, 1, at_most)))
    return candidates


def calibrate_thresholds(found, values, truths, max_distance: float) -> dict:
    """Per class, the threshold on `values` that maximises the class's F1 pooled over the
    calibration tomograms (`found`, `values`, `truths`: one entry per tomogram).

    Each class is scored alone (its detections only) against the whole truth; candidates are
    `candidate_thresholds` of the class's own values (keeping everything from that value up).
    Ties go to the lower threshold.
    """
    import numpy as np

    from cryojax_mw import localize

    out = {}
    names = found[0].particles.class_names
    for k, name in enumerate(names, start=1):
        mine = [f.particles.class_ids == k for f in found]
        candidates = candidate_thresholds(np.concatenate([v[m] for v, m in zip(values, mine)]))
        best = (0.0, math.inf)  # no detection of this class: keep none (F1 0 there)
        for t in candidates:
            evaluations = [
                localize.evaluate_detections(subset(f.particles, m & (v >= t)), truth,
                                             max_distance=max_distance)
                for f, v, m, truth in zip(found, values, mine, truths)
            ]  # fmt: skip
            f1 = pooled_f1(evaluations, k - 1)
            if f1 > best[0] or best[1] == math.inf:
                best = (f1, float(t))
        out[name] = {"threshold": best[1], "calibration_f1": best[0]}
    return out


def calibrate_localization_thresholds(found, values, truths, max_distance: float, start: dict):
    """Per-class thresholds on `values` that maximise the overall localization F1 (class
    ignored) pooled over the calibration tomograms: from `start`, each class's threshold in turn
    is set to its best value (candidates: `candidate_thresholds` of the class's values, or
    keeping none) with the others fixed; two sweeps. Returns (thresholds, that F1)."""
    import numpy as np

    from cryojax_mw import localize

    thresholds, best_f1 = dict(start), -1.0
    names = found[0].particles.class_names
    for _ in range(2):
        for k, name in enumerate(names, start=1):
            own = np.concatenate([v[f.particles.class_ids == k] for f, v in zip(found, values)])
            best = (-1.0, thresholds[name])
            for t in np.append(candidate_thresholds(own), np.inf):
                trial = {**thresholds, name: float(t)}
                f1 = pooled_f1([
                    localize.evaluate_detections(apply_thresholds(f, v, trial), truth,
                                                 max_distance=max_distance)
                    for f, v, truth in zip(found, values, truths)
                ])  # fmt: skip
                if f1 > best[0]:
                    best = (f1, float(t))
            thresholds[name], best_f1 = best[1], best[0]
    return thresholds, best_f1


def fit_thresholds(found, values, truths, max_distance: float):
    """Both threshold sets on `values` from the tomograms given: (per class for that class's
    F1, per class for the overall localization F1 starting from the first, that F1)."""
    per_class = calibrate_thresholds(found, values, truths, max_distance)
    start = {n: v["threshold"] for n, v in per_class.items()}
    return per_class, *calibrate_localization_thresholds(found, values, truths, max_distance, start)


def cross_validated_f1(found, values, truths, max_distance: float, n_folds: int) -> float:
    """Localization F1 of the threshold rule on tomograms it was not fitted on: the tomograms
    cut into `n_folds` contiguous folds, the localization thresholds of each fold fitted on the
    others, the counts pooled over the folds. In-sample F1 favours the labellings whose
    thresholds fit noise (it ran 0.02-0.06 above held-out F1, ordering the variants wrongly)."""
    import numpy as np

    from cryojax_mw import localize

    evaluations = []
    for fold in np.array_split(np.arange(len(found)), n_folds):
        rest = [i for i in range(len(found)) if i not in fold]
        thresholds = fit_thresholds([found[i] for i in rest], [values[i] for i in rest],
                                    [truths[i] for i in rest], max_distance)[1]  # fmt: skip
        evaluations += [localize.evaluate_detections(
            apply_thresholds(found[i], values[i], thresholds), truths[i], max_distance=max_distance
        ) for i in fold]  # fmt: skip
    return pooled_f1(evaluations)


def scores_from_counts(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def pooled_scores(evaluations, classes) -> dict:
    """Per-class and overall scores from the counts summed over several tomograms."""
    per_class = {}
    for k, name in enumerate(classes):
        per_class[name] = scores_from_counts(*(int(sum(getattr(e, a)[k] for e in evaluations))
                                               for a in ("tp", "fp", "fn")))  # fmt: skip
    overall = {}
    for kind in ("localization", "classification"):
        overall[kind] = scores_from_counts(*(int(sum(getattr(e, kind)[a] for e in evaluations))
                                             for a in ("tp", "fp", "fn")))  # fmt: skip
    confusion = evaluations[0].to_json()["confusion"]
    confusion["counts"] = sum(e.confusion for e in evaluations).tolist()
    return {"per_class": per_class, **overall, "confusion": confusion}


def simulate_accuracy_sets(case: str):
    """The accuracy part's simulation settings and tomograms: {role: [Simulation]} for the
    training, calibration and held-out (test) seeds."""
    import jax

    from cryojax_mw import simulate

    spec = ACCURACY[case]
    sim_config = simulate.SimulationConfig(
        shape=spec["shape"], classes=spec["classes"], n_particles=spec["n_particles"],
        occupancy=None, snr=SNR, tilt_min=TILT_MIN, tilt_max=TILT_MAX, tilt_step=TILT_STEP,
    )  # fmt: skip
    calibration_start = TRAIN_SEED + spec["n_train"]
    seeds = {"train": [TRAIN_SEED + i for i in range(spec["n_train"])],
             "calibration": [calibration_start + i for i in range(spec["n_calibration"])],
             "test": [TEST_SEED + i for i in range(spec["n_test"])]}  # fmt: skip
    sims = {role: [simulate.simulate_tomogram(jax.random.key(s), sim_config, name=f"{role}_{s}")
                   for s in role_seeds]
            for role, role_seeds in seeds.items()}  # fmt: skip
    return sim_config, seeds, sims


def train_accuracy_model(case: str, sim_config, sims, folder: Path):
    """The accuracy part's U-Net trained in `folder` (validation: the first calibration
    tomograms). A finished run of the same settings already there is loaded instead of trained
    again (the same seed gives the same weights); its training time is in its history."""
    from cryojax_mw import nn

    def labelled(sim):
        return nn.LabelledTomogram(sim.tomogram, sim.labels, sim.particles, sim.particles.tomo_name)

    config = nn.TrainConfig(**ACCURACY[case]["train"], checkpoint_every=500, seed=0)
    validation = sims["calibration"][: ACCURACY[case]["n_validation"]]
    segmenter = nn.train_segmenter(
        config, [labelled(s) for s in sims["train"]], [labelled(s) for s in validation],
        folder, label_names=sim_config.label_names, progress=False, resume=True,
    )  # fmt: skip
    return config, segmenter, json.loads((Path(folder) / "history.json").read_text())


def unet_detections(
    segmenter, sim, *, average_rotations: bool, foreground_thresholds, patch_size: int, radii,
    classes,
) -> list:
    """The U-Net's `Detections` on one simulated tomogram for each foreground threshold of
    `localize.label_voxels` (None: argmax labels): the probabilities are computed once and
    labelled each way, then clustered by mean-shift, each class with its radius (`radii`)."""
    import jax

    from cryojax_mw import localize

    predict = functools.partial(segmenter.predict_proba, average_rotations=average_rotations)
    seg = localize.segment_tomogram(predict, sim.tomogram, patch_size=patch_size,
                                    n_classes=segmenter.n_classes, progress=False)  # fmt: skip
    out = []
    for threshold in foreground_thresholds:
        labels, best = jax.device_get(localize.label_voxels(seg.probabilities, threshold))
        out.append(localize.cluster_mean_shift(
            labels, bandwidth=radii, class_names=segmenter.class_names[1:],
            voxel_size=sim.particles.voxel_size, scores=best, classes=classes,
            tomo_name=sim.particles.tomo_name,
        ))  # fmt: skip
    return out


def run_accuracy(case: str, workdir: Path) -> dict:
    """Simulate, train (or reuse the run in `workdir`), segment, cluster, match templates,
    calibrate and score."""
    import numpy as np

    from cryojax_mw import localize

    spec = ACCURACY[case]
    classes = spec["classes"]
    tic = time.perf_counter()
    sim_config, seeds, sims = simulate_accuracy_sets(case)
    timings = {"simulate_s": time.perf_counter() - tic}
    log(f"simulated {sum(map(len, sims.values()))} tomograms in {timings['simulate_s']:.0f} s")
    voxel_size = sim_config.voxel_size
    templates = {t.name: t for t in sim_config.load_templates()}
    radii = {n: equivalent_radius(templates[n].n_mask_voxels) for n in classes}
    radius = float(np.median(list(radii.values())))

    tic = time.perf_counter()
    train_config, segmenter, history = train_accuracy_model(case, sim_config, sims, workdir)
    timings["train_call_s"] = time.perf_counter() - tic
    step_s = history["seconds"][1:] or history["seconds"]
    log(f"{train_config.steps} training steps: {sum(history['seconds']):.0f} s of steps, "
        f"{timings['train_call_s']:.0f} s in this call")  # fmt: skip

    def unet_variants(sims_, average_rotations: bool) -> dict:
        """{variant: [Detections per tomogram]} of the UNET_VARIANTS of this inference."""
        variants = {v: t for v, (a, t) in UNET_VARIANTS.items() if a == average_rotations}
        per_tomogram = [
            unet_detections(segmenter, sim, average_rotations=average_rotations,
                            foreground_thresholds=list(variants.values()),
                            patch_size=spec["inference_patch"], radii=radii, classes=classes)
            for sim in sims_
        ]  # fmt: skip
        return {v: [found[i] for found in per_tomogram] for i, v in enumerate(variants)}

    grid = localize.rotation_grid(spec["tm_angular_step_deg"])

    def tm_detections(sims_) -> dict:
        out = []
        for sim in sims_:
            matches = {
                n: localize.match_template(
                    sim.tomogram, templates[n].density, templates[n].mask, angles_deg=grid,
                    wedge=(TILT_MIN, TILT_MAX), progress=False,
                )
                for n in classes
            }  # fmt: skip
            # Raw NCC of small templates outscores large ones on noise; z-scores of each map
            # compete.
            out.append(localize.pick_peaks(
                {n: m.standardized() for n, m in matches.items()}, voxel_size=voxel_size,
                min_distance=radii, top_k=spec["tm_top_k"], class_names=classes,
                tomo_name=sim.particles.tomo_name,
            ))  # fmt: skip
        return {"template_matching": out}

    # Every method's detections on every calibration and held-out tomogram (the thresholds come
    # after, from the calibration ones only), and the value its thresholds apply to.
    detectors = [functools.partial(unet_variants, average_rotations=True),
                 functools.partial(unet_variants, average_rotations=False), tm_detections]
    found = {"calibration": {}, "test": {}}
    for detect in detectors:
        for role in found:
            tic = time.perf_counter()
            for method, detections in detect(sims[role]).items():
                found[role][method] = detections
                timings[f"{method}_{role}_s"] = time.perf_counter() - tic
    methods = list(found["calibration"])
    value_of = {m: (lambda f: f.scores) if m == "template_matching" else (lambda f: f.sizes)
                for m in methods}  # fmt: skip

    truths = [s.particles for s in sims["calibration"]]
    thresholds, calibration_f1, calibration_cv_f1 = {}, {}, {}
    tic = time.perf_counter()
    for m in methods:
        dets = found["calibration"][m]
        values = [value_of[m](f) for f in dets]
        per_class, loc, calibration_f1[m] = fit_thresholds(dets, values, truths, radius)
        thresholds[m] = (per_class, loc)
        if m in UNET_VARIANTS:
            calibration_cv_f1[m] = cross_validated_f1(dets, values, truths, radius, spec["n_folds"])
    timings["calibrate_thresholds_s"] = time.perf_counter() - tic
    # The primary U-Net: the variant with the best cross-validated localization F1 on the
    # calibration tomograms; the held-out tomograms choose nothing.
    primary = max(calibration_cv_f1, key=calibration_cv_f1.get)
    log(f"calibrated on {len(truths)} tomograms ({timings['calibrate_thresholds_s']:.0f} s); "
        "localization F1 there: " + ", ".join(f"{m} {calibration_f1[m]:.3f}" for m in methods)
        + "; cross-validated: " + ", ".join(f"{m} {f:.3f}" for m, f in calibration_cv_f1.items())
        + f"; primary U-Net: {primary}")  # fmt: skip

    # Two operating points, each chosen on the calibration tomograms for the score it reports:
    # per-class F1 (the per-class table) and overall localization F1.
    evaluations = {m: [] for m in methods}
    localization_evaluations = {m: [] for m in methods}
    per_tomogram = []
    for i, sim in enumerate(sims["test"]):
        row = {"tomogram": sim.particles.tomo_name, "n_true": len(sim.particles)}
        for m in methods:
            f = found["test"][m][i]
            per_class, loc = thresholds[m]
            pred = apply_thresholds(
                f, value_of[m](f), {n: v["threshold"] for n, v in per_class.items()}
            )
            ev = localize.evaluate_detections(pred, sim.particles, max_distance=radius)
            evaluations[m].append(ev)
            loc_pred = apply_thresholds(f, value_of[m](f), loc)
            loc_ev = localize.evaluate_detections(loc_pred, sim.particles, max_distance=radius)
            localization_evaluations[m].append(loc_ev)
            row[m] = {"n_predicted": len(pred), "localization_f1": ev.localization["f1"],
                      "classification_f1": ev.classification["f1"],
                      "mean_distance_voxels": ev.mean_distance,
                      "localization_point_f1": loc_ev.localization["f1"]}  # fmt: skip
        per_tomogram.append(row)
        log(f"scored {row['tomogram']}: loc. F1 " + ", ".join(
            f"{m} {row[m]['localization_point_f1']:.3f}" for m in methods))  # fmt: skip

    results = {m: pooled_scores(evs, classes) for m, evs in evaluations.items()}
    for m, evs in localization_evaluations.items():
        results[m]["localization_operating_point"] = pooled_scores(evs, classes)["localization"]
        results[m]["calibration_localization_f1"] = calibration_f1[m]
        if m in calibration_cv_f1:
            results[m]["calibration_cv_localization_f1"] = calibration_cv_f1[m]
    unet_f1 = [results[primary]["per_class"][n]["f1"] for n in classes]
    tm_f1 = [results["template_matching"]["per_class"][n]["f1"] for n in classes]
    ahead = [n for n, u, t in zip(classes, unet_f1, tm_f1)
             if (0.0 if math.isnan(u) else u) > (0.0 if math.isnan(t) else t)]  # fmt: skip
    loc_f1 = results[primary]["localization_operating_point"]["f1"]
    return {
        "case": case,
        "simulation": {**sim_config.to_json(), "seeds": seeds,
                       "particles_per_tomogram": [len(s.particles) for s in sims["test"]],
                       "measured_snr": [s.acquisition.measured_snr
                                        for role in sims.values() for s in role]},  # fmt: skip
        "training": {"config": train_config.to_json(), "steps": train_config.steps,
                     "steps_s": sum(history["seconds"]), "median_step_s": float(np.median(step_s)),
                     "final_train_loss": history["loss"][-1],
                     "validation_tomograms": [s.particles.tomo_name for s in
                                              sims["calibration"][: spec["n_validation"]]],
                     "validation": history["validation"]},  # fmt: skip
        "settings": {
            "class_radius_voxels": radii,
            "match_distance_voxels": radius, "inference_patch": spec["inference_patch"],
            "tm_rotations": len(grid), "tm_angular_step_deg": spec["tm_angular_step_deg"],
            "tm_wedge_deg": [TILT_MIN, TILT_MAX], "tm_top_k": spec["tm_top_k"],
            "calibration_tomograms": [t.tomo_name for t in truths], "n_folds": spec["n_folds"],
            "unet_variants": {m: {"average_rotations": a, "foreground_threshold": t}
                              for m, (a, t) in UNET_VARIANTS.items()},
            "unet_primary": primary,
            "per_class_thresholds": {m: thresholds[m][0] for m in methods},
            "localization_thresholds": {m: thresholds[m][1] for m in methods},
        },
        "timings_s": timings,
        "results": results,
        "per_tomogram": per_tomogram,
        "targets": {
            "unet_ahead_on_every_class": {"classes_ahead": ahead, "n_classes": len(classes),
                                          "pass": len(ahead) == len(classes)},
            "unet_localization_f1": {"measured": loc_f1, "target": 0.85,
                                     "pass": bool(loc_f1 >= 0.85)},
        },
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# speed and whole (children)


def published_segmenter(patch_size: int):
    """The published DeepFinder network (default widths, 13 classes), He-initialised weights."""
    from flax import nnx

    from cryojax_mw import nn, simulate

    model = nn.DeepFinderUNet(PUBLISHED_N_CLASSES, rngs=nnx.Rngs(0))
    names = ("background", *simulate.SHREC_CLASSES)
    return nn.Segmenter(model, class_names=names, voxel_size=10.0, patch_size=patch_size)


def child_inference(case: str) -> dict:
    import jax
    import numpy as np

    n = SPEED[case]["block"]
    seg = published_segmenter(n)
    block = np.random.default_rng(0).normal(size=(1, n, n, n)).astype(np.float32)
    timing = time_call(lambda: jax.block_until_ready(seg.predict_proba(block)), repeats=3)
    return {"block": n, "timing": timing}


def child_train(case: str) -> dict:
    import jax

    from cryojax_mw import nn, simulate

    spec = SPEED[case]
    # Twelve SHREC classes and no other bodies: background + 12 = the published 13 outputs.
    sim_config = simulate.SimulationConfig(
        shape=spec["train_shape"], classes=simulate.SHREC_CLASSES, occupancy=0.05, n_vesicles=0,
        n_gold=0, n_decoys=0,
    )  # fmt: skip
    sim = simulate.simulate_tomogram(jax.random.key(0), sim_config)
    item = nn.LabelledTomogram(sim.tomogram, sim.labels, sim.particles)
    names = ("background", *simulate.SHREC_CLASSES)
    config = nn.TrainConfig(
        # Micro-batches of five patches (5 divides the published batch of 25), the fastest split
        # measured (see cryojax_mw/nn/_train.py).
        patch_size=spec["train_patch"], batch_size=spec["train_batch"],
        micro_batch_size=5 if spec["train_batch"] % 5 == 0 else 4,
        max_shift=min(13, spec["train_patch"] // 2 - 1), steps=1 + spec["timed_steps"],
        validate_every=10**6, validation_size=5 if spec["train_batch"] % 5 == 0 else 4,
        checkpoint_every=10**6,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        nn.train_segmenter(config, [item], [item], folder, label_names=names, progress=False)
        history = json.loads((Path(folder) / "history.json").read_text())
    seconds = history["seconds"]
    return {"patch": spec["train_patch"], "batch": spec["train_batch"],
            "micro_batch_size": config.micro_batch_size,
            "micro_batches_per_call": config.micro_batches_per_call,
            "warmup_step_s": seconds[0], "steps_s": seconds[1:],
            "median_step_s": sorted(seconds[1:])[len(seconds[1:]) // 2]}  # fmt: skip


def child_whole(case: str) -> dict:
    import jax
    import numpy as np

    from cryojax_mw import localize, simulate

    spec = WHOLE[case]
    sim_config = simulate.SimulationConfig(
        shape=spec["shape"], n_particles=spec["n_particles"], occupancy=None,
        n_vesicles=spec["n_vesicles"], n_gold=spec["n_gold"], n_decoys=spec["n_decoys"],
        snr=SNR, tilt_min=TILT_MIN, tilt_max=TILT_MAX, tilt_step=TILT_STEP,
    )  # fmt: skip
    tic = time.perf_counter()
    sim = simulate.simulate_tomogram(jax.random.key(0), sim_config)
    simulate_s = time.perf_counter() - tic
    seg = published_segmenter(spec["patch_size"])
    tic = time.perf_counter()
    out = localize.segment_tomogram(
        seg.predict_proba, sim.tomogram, patch_size=spec["patch_size"],
        n_classes=seg.n_classes, batch_size=spec["batch_size"], probabilities=None,
        progress=False,
    )  # fmt: skip
    segment_s = time.perf_counter() - tic
    # Untrained weights give an arbitrary label map whose clustering time says nothing; the
    # clustering is timed on the simulator's label map of the particle classes, the map of a
    # perfect segmenter (same number of foreground voxels as a good network's).
    names = sim_config.label_names[1:]
    radii = {t.name: equivalent_radius(t.n_mask_voxels) for t in sim_config.load_templates()}
    truth_map = np.where(sim.labels <= len(sim_config.classes), sim.labels, 0)
    tic = time.perf_counter()
    found = localize.cluster_mean_shift(
        truth_map, bandwidth=radii, class_names=names,
        voxel_size=sim_config.voxel_size, classes=sim_config.classes,
    )  # fmt: skip
    cluster_s = time.perf_counter() - tic
    return {"shape": list(spec["shape"]), "patch_size": spec["patch_size"], "crop": out.crop,
            "n_tiles": out.n_tiles, "simulate_s": simulate_s, "segment_s": segment_s,
            "cluster_s": cluster_s, "segment_and_cluster_s": segment_s + cluster_s,
            "bandwidth_voxels": radii, "foreground_voxels": int((truth_map > 0).sum()),
            "n_true": len(sim.particles),
            "n_clusters": len(found.particles)}  # fmt: skip


CHILDREN = {"inference": child_inference, "train": child_train, "whole": child_whole}


def in_child(name: str, case: str) -> dict:
    stdout, peak = run_script_with_peak_rss(Path(__file__), ["--child", name, "--case", case])
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = peak / 1e9
    return result


# ----------------------------------------------------------------------------------------------
# report


def _f(x, fmt=".3f"):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _threshold(x, fmt):
    """A calibrated threshold; infinite (null in the JSON): the class keeps no detection."""
    return "none kept" if x is None or math.isinf(x) else format(x, fmt)


def _status(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def render(report: dict) -> str:
    """The Markdown block of a report (whatever parts it holds)."""
    m = report["machine"]
    lines = [f"Machine: {m['cpu_model']}, {m['cores']} cores usable, {m['memory_gb']} GB; "
             f"jax {m['versions'].get('jax')}; {m['date_utc']}; parts: "
             f"{', '.join(report['parts'])}."]  # fmt: skip
    targets = []
    acc = report.get("accuracy")
    if acc:
        sim, tr, st = acc["simulation"], acc["training"], acc["settings"]
        cfg, res, primary = tr["config"], acc["results"], st["unet_primary"]
        lines.append(
            f"\n**Accuracy** ({len(sim['classes'])} classes, {'x'.join(map(str, sim['shape']))} "
            f"voxels at {sim['voxel_size']} Å, {sim['n_particles']} particles per tomogram, SNR "
            f"{sim['snr']}, tilts {sim['tilt_min']:g}..{sim['tilt_max']:g} by {sim['tilt_step']:g}; "
            f"{len(sim['seeds']['train'])} training tomograms, calibration on "
            f"{len(st['calibration_tomograms'])} other tomograms (seeds "
            f"{sim['seeds']['calibration']}, the first {len(tr['validation_tomograms'])} "
            f"the training run's validation set), "
            f"{len(sim['seeds']['test'])} held-out tomograms (seeds {sim['seeds']['test']}), "
            f"scores pooled over them). U-Net: widths {tuple(cfg['widths'])}, patch "
            f"{cfg['patch_size']}^3, batch {cfg['batch_size']}, {tr['steps']} Adam steps "
            f"(lr {cfg['learning_rate']:g}, schedule {cfg['learning_rate_schedule']}, loss "
            f"{cfg['loss']}{', 180 deg turns about z and y' if cfg.get('augment_turn') else ''}) "
            f"taking {tr['steps_s']:.0f} s of training steps ({tr['median_step_s']:.2f} s/step, "
            f"validation not counted); inference windows {st['inference_patch']}^3. "
            f"Mean-shift on each class with its radius (the equivalent-sphere radius of its "
            f"template, table below); match distance {st['match_distance_voxels']:.2f} voxels "
            f"(the median radius). Template matching: "
            f"masked NCC, {st['tm_rotations']} rotations ({st['tm_angular_step_deg']:g} deg grid), "
            f"missing wedge {st['tm_wedge_deg'][0]:g}..{st['tm_wedge_deg'][1]:g} deg, templates "
            f"at {sim['voxel_size']} Å, peaks at least a class radius apart, at most "
            f"{st['tm_top_k']} per class. Thresholds (U-Net smallest cluster, TM score) chosen "
            f"per class for the best F1 on the calibration tomograms only; 'none kept': the "
            f"method found no particle of that class there, so it keeps none. The localization "
            f"rows use a second set of thresholds, chosen on the same calibration tomograms for "
            f"the best overall localization F1 (class ignored). The per-class columns are the "
            f"primary U-Net, `{primary}`: of the variants below, the one with the best "
            f"localization F1 on the calibration tomograms cross-validated "
            f"({acc['settings']['n_folds']} folds: thresholds fitted on the other folds)."
        )
        rows = []
        for name in sim["classes"]:
            u = res[primary]["per_class"][name]
            t = res["template_matching"]["per_class"][name]
            rows.append([name, f"{st['class_radius_voxels'][name]:.1f}",
                         u["tp"] + u["fn"], _f(u["precision"]), _f(u["recall"]), _f(u["f1"]),
                         _threshold(st["per_class_thresholds"][primary][name]["threshold"], ".0f"),
                         _f(t["precision"]), _f(t["recall"]), _f(t["f1"]),
                         _threshold(st["per_class_thresholds"]["template_matching"][name][
                             "threshold"], ".3f")])  # fmt: skip
        for kind in ("localization", "classification"):
            u, t = res[primary][kind], res["template_matching"][kind]
            rows.append([f"**all ({kind}, per-class thresholds)**", None, u["tp"] + u["fn"],
                         _f(u["precision"]), _f(u["recall"]), _f(u["f1"]), None,
                         _f(t["precision"]), _f(t["recall"]), _f(t["f1"]), None])  # fmt: skip
        lines.append("\n" + markdown_table(
            ["class", "radius (vox)", "true", "U-Net P", "U-Net R", "U-Net F1",
             "min cluster", "TM P", "TM R", "TM F1", "TM threshold"], rows))  # fmt: skip
        rows = []
        for m in [*st["unet_variants"], "template_matching"]:
            v = st["unet_variants"].get(m)
            how = ("template matching" if v is None else
                   ("4 rotations averaged" if v["average_rotations"] else "one orientation")
                   + (", argmax labels" if v["foreground_threshold"] is None else
                      f", particle when P(particle) >= {v['foreground_threshold']:g}"))
            u = res[m]["localization_operating_point"]
            rows.append([f"`{m}`{' (primary)' if m == primary else ''}", how,
                         _f(res[m]["calibration_localization_f1"]),
                         _f(res[m].get("calibration_cv_localization_f1", math.nan)),
                         _f(u["precision"]), _f(u["recall"]), _f(u["f1"])])  # fmt: skip
        lines.append("\nOverall localization (class ignored), thresholds chosen for it:\n\n"
                     + markdown_table(["method", "labels", "calibration F1",
                                       "calibration F1, cross-validated", "held-out P",
                                       "held-out R", "held-out F1"], rows))  # fmt: skip
        tg = acc["targets"]
        ahead = tg["unet_ahead_on_every_class"]
        targets.append(["U-Net F1 above template matching on every class",
                        f"{len(ahead['classes_ahead'])} of {ahead['n_classes']} classes",
                        "all", _status(ahead["pass"])])  # fmt: skip
        loc = tg["unet_localization_f1"]
        targets.append(["U-Net overall localization F1 (held-out, thresholds chosen for it)",
                        _f(loc["measured"]), "0.85",
                        _status(loc["pass"])])  # fmt: skip
    speed = report.get("speed")
    if speed:
        inf, trn = speed["inference"], speed["train"]
        inf_s, trn_s = inf["timing"]["median_ms"] / 1e3, trn["median_step_s"]
        ref = REFERENCE
        # The quoted figures are for a 128^3 block and a 25 x 56^3 batch; other sizes (--quick)
        # are not compared with them.
        same = {"inference": inf["block"] == 128,
                "training step": (trn["batch"], trn["patch"]) == (25, 56)}  # fmt: skip
        lines.append(
            f"\n**Speed**, published network (widths (32, 48, 64), {PUBLISHED_N_CLASSES} classes), "
            f"float32. Reference figures quoted, not measured: {ref['source']}."
        )
        rows = []
        for what, label, measured, refv, peak in (
            ("inference", f"inference, one {inf['block']}^3 block (median of 3 after warm-up)",
             inf_s, ref["inference_128_s"], inf["peak_rss_gb"]),
            ("training step", f"training step, batch {trn['batch']} x {trn['patch']}^3 "
             f"(micro-batches of {trn['micro_batch_size']}, {trn['micro_batches_per_call']} per "
             f"call; median of {len(trn['steps_s'])} after the first)",
             trn_s, ref["train_step_s"], trn["peak_rss_gb"]),
        ):  # fmt: skip
            rows.append([label, f"{measured:.2f}", f"{peak:.2f}",
                         refv if same[what] else None,
                         f"{refv / measured:.2f}x" if same[what] else None])  # fmt: skip
            if same[what]:
                goal = refv / ref["speedup_target"]
                targets.append([f"{what}: {ref['speedup_target']:g}x faster than the quoted "
                                "reference", f"{measured:.2f} s", f"{goal:.2f} s",
                                _status(measured <= goal)])  # fmt: skip
        lines.append("\n" + markdown_table(
            ["operation", "cryojax_mw (s)", "peak memory (GB)", "reference (s, quoted)",
             "speed-up"], rows))  # fmt: skip
    whole = report.get("whole")
    if whole:
        lines.append(
            f"\n**Whole tomogram** ({'x'.join(map(str, whole['shape']))}, simulated): published "
            f"network with He-initialised weights (the time does not depend on them), windows "
            f"{whole['patch_size']}^3 cropped by {whole['crop']}, label map only; mean-shift "
            f"(each class with its template's equivalent-sphere radius, "
            f"{min(whole['bandwidth_voxels'].values()):.1f}-"
            f"{max(whole['bandwidth_voxels'].values()):.1f} voxels) timed on the simulator's "
            f"label map of the particle "
            f"classes ({whole['foreground_voxels']} foreground voxels), the map a perfect "
            f"segmenter would give, since an untrained network's map is arbitrary."
        )
        lines.append("\n" + markdown_table(
            ["tiles", "segment (s)", "cluster (s)", "segment + cluster (s)", "clusters / true",
             "peak memory (GB)"],
            [[whole["n_tiles"], f"{whole['segment_s']:.0f}", f"{whole['cluster_s']:.0f}",
              f"{whole['segment_and_cluster_s']:.0f}", f"{whole['n_clusters']} / {whole['n_true']}",
              f"{whole['peak_rss_gb']:.2f}"]]))  # fmt: skip
    if targets:
        lines.append("\nTargets the project states (reported as measured, never tuned towards):\n")
        lines.append(markdown_table(["target", "measured", "target", "status"], targets))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, a minute or two")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--workdir", type=Path,
                   help="keep the accuracy part's training run in this folder: a finished run of "
                        "the same settings there is reused, an interrupted one resumed "
                        "[default: a temporary folder]")  # fmt: skip
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--case", choices=("full", "quick"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.case)))
        return 0
    case = "quick" if args.quick else "full"
    parts = [part for part in PARTS if part in args.parts]
    report = {"machine": {**machine_info(("jax", "flax", "numpy")),
                          "load_average_start": os.getloadavg()[0]},
              "case": case, "parts": parts}  # fmt: skip
    if "accuracy" in parts:
        if args.workdir:
            report["accuracy"] = run_accuracy(case, args.workdir)
        else:
            with tempfile.TemporaryDirectory() as folder:
                report["accuracy"] = run_accuracy(case, Path(folder))
    if "speed" in parts:
        log("speed: inference")
        report["speed"] = {"inference": in_child("inference", case)}
        log("speed: training steps")
        report["speed"]["train"] = in_child("train", case)
    if "whole" in parts:
        log("whole tomogram")
        report["whole"] = in_child("whole", case)
    report["machine"]["load_average_end"] = os.getloadavg()[0]
    complete = not args.quick and parts == list(PARTS)
    name = ("segmentation_quick.json" if args.quick
            else "segmentation.json" if complete else "segmentation_partial.json")  # fmt: skip
    write_json_atomic(HERE / "results" / name, report)
    text = render(report)
    print(text)
    if complete:
        update_markdown_block(HERE / "README.md", "segmentation", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
