"""Sub-commands that find particles: cluster a segmentation into a particle list, and score a
particle list against the truth."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from .. import io, localize
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
        names = class_names or tuple(meta["class_names"])
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


def _min_sizes(values: tuple[str, ...], classes) -> int | dict[str, int]:
    """--min-size N (all classes) or NAME=N (repeated) -> what the clustering functions take."""
    if not values:
        return 1
    if len(values) == 1 and "=" not in values[0]:
        return int(values[0])
    sizes = {}
    for v in values:
        name, sep, number = v.partition("=")
        if not sep or not number.strip().isdigit():
            raise UsageError(f"--min-size takes N or NAME=N, got {v!r}")
        if name not in classes:
            raise UsageError(f"--min-size names {name!r}, not one of {', '.join(classes)}")
        sizes[name] = int(number)
    return sizes


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
    "--bandwidth", type=float, default=5.0, show_default=True,
    help="Mean-shift kernel radius in voxels; about the particles' radius. Larger particles "
    "split into several clusters, smaller bandwidths merge neighbours less.",
)  # fmt: skip
@click.option(
    "--min-size", multiple=True, metavar="N | NAME=N",
    help="Drop clusters smaller than N voxels (repeat NAME=N for per-class sizes).",
)  # fmt: skip
@click.option(
    "--class-names", help="Comma-separated names of labels 1, 2, ... (a label-map MRC needs them "
    "unless a simulator parameters.json sits beside it).",
)  # fmt: skip
@click.option(
    "--classes", help="Comma-separated classes to keep (default: all), e.g. leave out membrane."
)
def localize_cmd(seg_path, out_path, method, bandwidth, min_size, class_names, classes):
    """Turn a segmentation into a particle list: one particle per cluster of voxels.

    Each cluster's class is its most frequent label, its position the mean of its voxels
    (sub-voxel), its score the mean probability when the segmentation has one (else its size).

    \b
    Example:
      cryojax-mw localize --segmentation seg --out particles.star --bandwidth 6 --min-size 20
    """
    if out_path.suffix.lower() not in (".star", ".csv"):
        raise UsageError(f"--out must end in .star or .csv, got {out_path.name}")
    io.check_output_not_input(out_path, seg_path)
    labels, scores, names, voxel = _segmentation_input(seg_path, _split_names(class_names))
    if not voxel:
        raise UsageError(f"{seg_path} carries no voxel size: the particle list needs one")
    keep = _split_names(classes)
    unknown = set(keep or ()) - set(names)
    if unknown:
        raise UsageError(f"--classes names {sorted(unknown)}, not among {', '.join(names)}")
    common = {
        "class_names": names, "voxel_size": voxel, "scores": scores, "classes": keep,
        "min_cluster_size": _min_sizes(min_size, keep or names), "tomo_name": _tomo_name(seg_path),
    }  # fmt: skip
    if method == "mean-shift":
        found = localize.cluster_mean_shift(labels, bandwidth=bandwidth, **common)
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
