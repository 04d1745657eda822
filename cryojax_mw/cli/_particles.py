"""Sub-commands that find particles: train the segmenter, segment a tomogram, cluster a
segmentation into a particle list, and score a particle list against the truth."""

from __future__ import annotations

import functools

import json
import time
from pathlib import Path

import click
import numpy as np

from .. import io, localize, plot
from ..simulate import EXTRA_LABELS
from ._commands import UsageError, _write_json, cli

SEGMENTATION_JSON = "segmentation.json"
SEGMENTATION_LABELS = "labels.mrc"
SEGMENTATION_SCORES = "max_probability.mrc"
CLUSTERINGS = ("mean-shift", "components")


def _split_names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(n.strip() for n in value.split(",") if n.strip())


def _segmentation_input(path: Path, class_names: tuple[str, ...] | None):
    """(labels, scores or None, class names of labels 1..K, voxel size) from a `segment` output
    folder, or from a label-map MRC with --class-names (or a simulator dataset's parameters.json
    beside it)."""
    scores = None
    if path.is_dir():
        meta_path = path / SEGMENTATION_JSON
        if not meta_path.exists():
            raise UsageError(f"{path} holds no {SEGMENTATION_JSON}: give a `segment` output folder")
        meta = json.loads(meta_path.read_text())
        labels, voxel = io.read_mrc(path / SEGMENTATION_LABELS)
        if (path / SEGMENTATION_SCORES).exists():
            scores, _ = io.read_mrc(path / SEGMENTATION_SCORES)
        names = tuple(meta["class_names"])
        # Other names for the model's labels rename them; another count would misname them.
        if class_names is not None and len(class_names) != len(names):
            raise UsageError(
                f"--class-names gives {len(class_names)} names but the model that made {path} "
                f"has {len(names)} classes ({', '.join(names)}); give {len(names)} or none"
            )
        names = class_names or names
    else:
        labels, voxel = io.read_mrc(path)
        names = class_names
        params = path.parent / "parameters.json"
        if names is None and params.exists():
            names = tuple(json.loads(params.read_text())["label_names"][1:])
        if names is None:
            raise UsageError(
                f"name the classes of {path.name}'s labels 1, 2, ...: --class-names a,b,c"
            )
    if labels.ndim != 3:
        raise UsageError(f"the label map must be 3D (z, y, x), got shape {labels.shape}")
    if not np.all(labels == np.round(labels)) or labels.min() < 0:
        raise UsageError("the label map must hold non-negative integer labels (0 = background)")
    labels = labels.astype(np.int32)
    if labels.max() > len(names):
        raise UsageError(
            f"the label map has label {labels.max()} but only {len(names)} class names were given"
        )
    return labels, scores, names, voxel


def _per_class_option(values: tuple[str, ...], classes, option: str, kind: type, default):
    """A repeatable option given as V (all classes) or NAME=V (one per class) -> one value or a
    dict from class name to value, as the clustering functions take them."""
    if not values:
        return default
    word = "N" if kind is int else "R"

    def parse(text: str, given: str):
        try:
            return kind(text)
        except ValueError:
            raise UsageError(f"{option} takes {word} or NAME={word}, got {given!r}") from None

    if len(values) == 1 and "=" not in values[0]:
        return parse(values[0], values[0])
    per_class = {}
    for v in values:
        name, sep, number = v.partition("=")
        if not sep:
            raise UsageError(f"{option} takes {word} or NAME={word}, got {v!r}")
        if name not in classes:
            raise UsageError(f"{option} names {name!r}, not one of {', '.join(classes)}")
        per_class[name] = parse(number, v)
    return per_class


@cli.command("localize")
@click.option(
    "--segmentation", "seg_path", type=click.Path(exists=True, path_type=Path), required=True,
    help="A `segment` output folder, or a label-map MRC (0 = background, k = class k).",
)  # fmt: skip
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="Particle list to write: .star (RELION) or .csv.",
)  # fmt: skip
@click.option(
    "--method", type=click.Choice(CLUSTERINGS), default="mean-shift", show_default=True,
    help="mean-shift over all foreground voxels (as DeepFinder), or connected components per "
    "class.",
)  # fmt: skip
@click.option(
    "--bandwidth", multiple=True, metavar="R | NAME=R",
    help="Mean-shift kernel radius in voxels, about the particles' radius [default: 5]. One R "
    "clusters all classes together (as DeepFinder); particles much larger than R split into "
    "several clusters. Repeat NAME=R for every picked class to cluster each class on its own "
    "with its radius.",
)  # fmt: skip
@click.option(
    "--min-size", multiple=True, metavar="N | NAME=N",
    help="Drop clusters smaller than N voxels (repeat NAME=N for per-class sizes).",
)  # fmt: skip
@click.option(
    "--class-names", help="Comma-separated names of labels 1, 2, ... (a label-map MRC needs them "
    "unless a simulator parameters.json sits beside it; for a `segment` folder, as many as the "
    "model's classes).",
)  # fmt: skip
@click.option(
    "--classes", help="Comma-separated classes to pick [default: all but the simulator's "
    "membrane, gold and decoy labels]."
)
def localize_cmd(seg_path, out_path, method, bandwidth, min_size, class_names, classes):
    """Turn a segmentation into a particle list: one particle per cluster of voxels.

    Each cluster's class is its most frequent label, its position the mean of its voxels
    (sub-voxel), its score the mean probability when the segmentation has one (else its size).

    \b
    Example:
      cryojax-mw localize --segmentation seg --out particles.star --bandwidth 6 --min-size 20
      cryojax-mw localize --segmentation seg --out particles.star \\
          --bandwidth 4cr2=7 --bandwidth 1s3x=3 --classes 4cr2,1s3x
    """
    if out_path.suffix.lower() not in (".star", ".csv"):
        raise UsageError(f"--out must end in .star or .csv, got {out_path.name}")
    io.check_output_not_input(out_path, seg_path)
    labels, scores, names, voxel = _segmentation_input(seg_path, _split_names(class_names))
    if not voxel:
        raise UsageError(f"{seg_path} carries no voxel size: the particle list needs one")
    # Membranes, gold and decoys are labelled so the network tells them apart, not picked.
    keep = _split_names(classes) or tuple(n for n in names if n not in EXTRA_LABELS)
    unknown = set(keep) - set(names)
    if unknown:
        raise UsageError(f"--classes names {sorted(unknown)}, not among {', '.join(names)}")
    common = {
        "class_names": names, "voxel_size": voxel, "scores": scores, "classes": keep,
        "min_cluster_size": _per_class_option(min_size, keep, "--min-size", int, 1),
        "tomo_name": _tomo_name(seg_path),
    }  # fmt: skip
    radius = _per_class_option(bandwidth, keep, "--bandwidth", float, 5.0)
    if method == "mean-shift":
        found = localize.cluster_mean_shift(labels, bandwidth=radius, **common)
    else:
        found = localize.cluster_connected_components(labels, **common)
    write = io.write_particles_star if out_path.suffix.lower() == ".star" else io.write_particles_csv
    write(out_path, found.particles)
    counts = np.bincount(found.particles.class_ids, minlength=len(found.particles.class_names) + 1)
    per_class = ", ".join(f"{n} {c}" for n, c in zip(found.particles.class_names, counts[1:]))
    click.echo(f"{len(found.particles)} particles ({per_class}) -> {out_path}")


def _tomo_name(path: Path) -> str:
    stem = path.name.split(".")[0] or "tomogram"
    cleaned = "".join(c if c.isalnum() or c in "_.+-" else "_" for c in stem)
    return cleaned if cleaned[0].isalnum() else f"t{cleaned}"


def _read_list(path: Path, voxel_size: float | None, class_names) -> io.ParticleList:
    if path.suffix.lower() == ".xml":
        if voxel_size is None:
            raise UsageError(f"{path.name} is a DeepFinder XML list without a voxel size: give "
                             "--voxel-size")  # fmt: skip
        return io.read_particles_xml(path, voxel_size=voxel_size, class_names=class_names)
    return io.read_particles(path)


@cli.command("evaluate")
@click.option(
    "--predicted", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="Particle list found (.star, .csv, or DeepFinder .xml).",
)  # fmt: skip
@click.option(
    "--truth", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
    help="True particle list (.star, .csv, or DeepFinder .xml).",
)  # fmt: skip
@click.option(
    "--distance", type=float, required=True,
    help="A prediction within this many voxels of a true particle finds it (one to one).",
)  # fmt: skip
@click.option(
    "--matching", type=click.Choice(localize.MATCHINGS), default="hungarian",
    show_default=True, help="hungarian: most pairs in reach; greedy: closest pairs first.",
)  # fmt: skip
@click.option(
    "--out", "out_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Write the scores and confusion matrix to this JSON file.",
)  # fmt: skip
@click.option("--voxel-size", type=float, help="Angstrom per voxel, for XML lists (they lack it).")
@click.option("--class-names", help="Comma-separated class names of XML lists' labels 1, 2, ...")
def evaluate_cmd(predicted, truth, distance, matching, out_path, voxel_size, class_names):
    """Score a particle list against the truth: per-class precision, recall and F1, overall
    localization F1 (classes ignored) and a confusion matrix.

    \b
    Example:
      cryojax-mw evaluate --predicted particles.star --truth data/tomo_000_particles.star \\
          --distance 5 --out scores.json
    """
    if distance <= 0:
        raise UsageError(f"--distance must be > 0 voxels, got {distance}")
    if out_path is not None:
        io.check_output_not_input(out_path, predicted, truth)
    names = _split_names(class_names)
    pred = _read_list(predicted, voxel_size, names)
    true = _read_list(truth, voxel_size, names)
    result = localize.evaluate_detections(pred, true, max_distance=distance, matching=matching)
    click.echo(result.table("text"))
    if out_path is not None:
        _write_json(out_path, {"predicted": str(predicted), "truth": str(truth),
                               **result.to_json()})  # fmt: skip
        click.echo(f"-> {out_path}")


@cli.command("train-segmenter")
@click.option(
    "--dataset", "datasets", type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True, required=True,
    help="A `simulate-dataset` folder (repeat to train on several); all label values are "
    "learned, membranes, gold and decoys included.",
)  # fmt: skip
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Model folder: checkpoint, history.json, history.png. A run that stopped resumes here.",
)  # fmt: skip
@click.option("--steps", type=int, default=1000, show_default=True, help="Adam steps.")
@click.option("--batch-size", type=int, default=24, show_default=True, help="Patches per step.")
@click.option(
    "--micro-batch-size", type=int, default=None,
    help="Patches per forward/backward pass (memory); must divide --batch-size. Default: its "
    "largest divisor up to 5, the fastest measured.",
)  # fmt: skip
@click.option(
    "--concurrent-micro-batches", type=int, default=1, show_default=True,
    help="Micro-batches computed side by side in one call (helps where convolutions leave cores "
    "idle, e.g. without the compiled CPU kernels); memory grows with it.",
)  # fmt: skip
@click.option(
    "--patch-size", type=int, default=48, show_default=True,
    help="Edge of the training patches in voxels, a multiple of 4.",
)  # fmt: skip
@click.option("--learning-rate", type=float, default=1e-4, show_default=True, help="Adam step.")
@click.option(
    "--lr-schedule", type=click.Choice(["constant", "cosine", "constant-then-decay"]),
    default="constant", show_default=True,
    help="cosine: the step falls from --learning-rate to 0 at --steps; constant-then-decay: "
    "constant for 80% of the steps, then a straight line to 0. A resumed run must keep the same "
    "--steps unless constant.",
)  # fmt: skip
@click.option(
    "--loss", type=click.Choice(["ce", "dice", "dice+ce", "tversky"]), default="ce",
    show_default=True, help="Cross-entropy (as published), Dice, both, or Tversky.",
)  # fmt: skip
@click.option(
    "--widths", default="32,48,64", show_default=True,
    help="Channels per level, comma-separated (the published network: 32,48,64).",
)  # fmt: skip
@click.option(
    "--val-fraction", type=float, default=0.25, show_default=True,
    help="Share of the tomograms kept for validation (one tomogram: a slab across y).",
)  # fmt: skip
@click.option(
    "--validate-every", type=int, default=100, show_default=True, help="Steps between validations."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same model.")
def train_segmenter_cmd(datasets, out_dir, steps, batch_size, micro_batch_size,
                        concurrent_micro_batches, patch_size, learning_rate, lr_schedule, loss,
                        widths, val_fraction, validate_every, seed):  # fmt: skip
    """Train the DeepFinder 3D U-Net to label every voxel of a tomogram.

    Batches hold patches centred near particles, classes drawn in turn (rare classes are seen as
    often as common ones), each patch z-scored and, half the time, turned by 180 deg about the
    tilt axis. Checkpoints go to --out; running the same command again resumes where it stopped
    and ends with the same weights as an uninterrupted run.

    \b
    Example:
      cryojax-mw simulate-dataset --out data --n-tomograms 4 --shape 64 256 256 --snr 0.1
      cryojax-mw train-segmenter --dataset data --out model --steps 2000
      cryojax-mw segment --model model --tomogram data/tomo_000_tomogram.mrc --out seg
    """
    import jax

    from .. import nn

    try:
        width_list = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise UsageError(f"--widths takes comma-separated integers, got {widths!r}") from None
    if not 0 < val_fraction < 1:
        raise UsageError(f"--val-fraction must lie in (0, 1), got {val_fraction}")
    loaded = [nn.load_dataset(d) for d in datasets]
    names = loaded[0].label_names
    for d, data in zip(datasets, loaded, strict=True):
        if data.label_names != names:
            raise UsageError(f"{d} labels {data.label_names}, not {names} as {datasets[0]}")
    tomograms = [t for data in loaded for t in data.tomograms]
    train, val = nn.split_train_val(jax.random.key(seed), tomograms, val_fraction)
    config = nn.TrainConfig(
        patch_size=patch_size, batch_size=batch_size, micro_batch_size=micro_batch_size,
        concurrent_micro_batches=concurrent_micro_batches, steps=steps,
        learning_rate=learning_rate, learning_rate_schedule=lr_schedule, loss=loss,
        widths=width_list, validate_every=validate_every,
        validation_size=24,
        max_shift=min(13, (patch_size - 1) // 2), seed=seed,
    )  # fmt: skip
    start = time.perf_counter()
    segmenter = nn.train_segmenter(config, train, val, out_dir, label_names=names)
    click.echo(
        f"trained {segmenter.step} steps on {len(train)} tomogram(s), validated on {len(val)} "
        f"({time.perf_counter() - start:.0f} s); {len(names)} classes -> {out_dir}/"
    )


@cli.command("segment")
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True, help="A `train-segmenter` output folder.",
)  # fmt: skip
@click.option(
    "--tomogram", "tomogram_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True, help="Tomogram MRC (z, y, x) at the model's voxel size.",
)  # fmt: skip
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Folder for labels.mrc, max_probability.mrc, segmentation.json and segmentation.png.",
)  # fmt: skip
@click.option(
    "--patch-size", type=int, help="Window edge in voxels, a multiple of 4 [default: training's]."
)
@click.option(
    "--crop", type=int,
    help="Voxels dropped on each side of every window (border artefacts) [default: patch // 8].",
)  # fmt: skip
@click.option("--batch-size", type=int, default=4, show_default=True, help="Windows per call.")
@click.option(
    "--voxel-size", type=float, help="Angstrom per voxel if the MRC header has none."
)
@click.option(
    "--average-rotations", is_flag=True,
    help="Average the predictions over the four 180 deg rotations that keep a symmetric missing "
    "wedge in place (4x the time; a steadier map).",
)  # fmt: skip
@click.option(
    "--foreground-threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Label a voxel particle when the particle classes together reach this probability, "
    "then its likeliest particle class (0.5: whenever particle is likelier than background) "
    "[default: each voxel's most probable class].",
)  # fmt: skip
def segment_cmd(model_dir, tomogram_path, out_dir, patch_size, crop, batch_size, voxel_size,
                average_rotations, foreground_threshold):  # fmt: skip
    """Label every voxel of a tomogram with a trained segmenter (sliding windows whose centres
    are kept), then `localize` turns the labels into particles.

    \b
    Example:
      cryojax-mw segment --model model --tomogram tomo.mrc --out seg
      cryojax-mw localize --segmentation seg --out particles.star
    """
    from .. import nn

    out_dir.mkdir(parents=True, exist_ok=True)
    io.check_output_not_input(out_dir / SEGMENTATION_LABELS, tomogram_path)
    segmenter = nn.load_segmenter(model_dir)
    tomogram, header_voxel = io.read_mrc(tomogram_path)
    voxel = voxel_size or header_voxel
    if tomogram.ndim != 3:
        raise UsageError(f"the tomogram must be 3D (z, y, x), got shape {tomogram.shape}")
    if not np.all(np.isfinite(tomogram)):
        raise UsageError(f"{tomogram_path.name} holds NaN or Inf values")
    if not voxel:
        raise UsageError(f"{tomogram_path.name} has no voxel size: give --voxel-size")
    if abs(voxel / segmenter.voxel_size - 1) > 0.01:
        raise UsageError(
            f"the model was trained at {segmenter.voxel_size:g} Å per voxel but the tomogram "
            f"has {voxel:g}; resample the tomogram first"
        )
    result = localize.segment_tomogram(
        functools.partial(segmenter.predict_proba, average_rotations=average_rotations),
        tomogram, patch_size=patch_size or segmenter.patch_size, n_classes=segmenter.n_classes,
        crop=crop, batch_size=batch_size, probabilities=None,
        foreground_threshold=foreground_threshold,
    )  # fmt: skip
    labels = result.label_map
    io.write_mrc(out_dir / SEGMENTATION_LABELS, labels,
                 voxel, dtype=np.int8 if labels.max() < 128 else np.int16)  # fmt: skip
    io.write_mrc(out_dir / SEGMENTATION_SCORES, result.max_probability, voxel)
    _write_json(out_dir / SEGMENTATION_JSON, {
        "class_names": list(segmenter.class_names[1:]), "voxel_size_angstrom": voxel,
        "model": str(model_dir), "training_steps": segmenter.step, "tomogram": str(tomogram_path),
        "patch_size": result.patch_size, "crop": result.crop,
        "average_rotations": average_rotations, "foreground_threshold": foreground_threshold,
    })  # fmt: skip
    plot.save_figure(
        plot.ortho_slices({"tomogram": tomogram, "labels": labels},
                          title=f"{tomogram_path.name} segmented", categorical=("labels",)),
        out_dir / "segmentation.png",
    )  # fmt: skip
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=segmenter.n_classes)
    share = ", ".join(
        f"{n} {c / labels.size:.2%}" for n, c in zip(segmenter.class_names[1:], counts[1:])
    )
    click.echo(f"{result.n_tiles} windows; voxels per class: {share} -> {out_dir}/")
