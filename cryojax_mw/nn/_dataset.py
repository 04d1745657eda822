"""Labelled tomograms for training: reading a simulator dataset folder, splitting train / val.

Classes learned from a simulator dataset: every label value of its label maps, named by
`label_names` of its `parameters.json`: 0 background, 1..n the macromolecule classes, then
membrane, gold and decoy. The non-protein bodies are learned as classes of their own, so that the
network has an answer for them other than "background" or a macromolecule (the thesis found that
more classes make the classes of interest better separated, ch. 4.3.1).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from ..io import ParticleList, read_mrc, read_particles
from ..simulate import dataset_file_names


@dataclasses.dataclass(frozen=True)
class LabelledTomogram:
    """A tomogram with its voxel labels and particle list (one training or validation item).

    Attributes:
        tomogram: (z, y, x) float array.
        labels: (z, y, x) integer label map (0 = background), same shape.
        particles: the particles (positions in voxels of this tomogram); class id k = label k.
        name: a name for messages.
    """

    tomogram: np.ndarray
    labels: np.ndarray
    particles: ParticleList
    name: str = "tomogram"

    def __post_init__(self):
        tomogram = np.asarray(self.tomogram)
        labels = np.asarray(self.labels)
        if tomogram.ndim != 3 or tomogram.shape != labels.shape:
            raise ValueError(
                f"{self.name}: tomogram and labels must be 3D arrays of one shape, got "
                f"{tomogram.shape} and {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{self.name}: labels must be integers, got {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise ValueError(f"{self.name}: labels must be >= 0 (0 = background)")
        if not isinstance(self.particles, ParticleList):
            raise TypeError(f"{self.name}: particles must be a ParticleList")
        object.__setattr__(self, "tomogram", tomogram)
        object.__setattr__(self, "labels", labels)


def as_labelled(items) -> list[LabelledTomogram]:
    """Accept `LabelledTomogram`s or (tomogram, labels, ParticleList) tuples."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, LabelledTomogram):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 3:
            out.append(LabelledTomogram(*item, name=f"tomogram_{i}"))
        else:
            raise ValueError(
                f"item {i} must be a LabelledTomogram or a (tomogram, labels, ParticleList) tuple"
            )
    return out


@dataclasses.dataclass(frozen=True)
class SegmentationDataset:
    """Labelled tomograms and the names of their label values (0 = background).

    Attributes:
        tomograms: the `LabelledTomogram`s.
        label_names: name of each label value; `label_names[0]` is the background.
    """

    tomograms: tuple[LabelledTomogram, ...]
    label_names: tuple[str, ...]

    @property
    def voxel_size(self) -> float:
        """Angstrom per voxel (from the particle lists)."""
        return self.tomograms[0].particles.voxel_size


def load_dataset(dataset_dir: str | Path, names=None) -> SegmentationDataset:
    """Read a dataset folder written by `cryojax_mw.simulate.write_dataset`.

    Args:
        dataset_dir: the folder (with `parameters.json`).
        names: tomogram names to read (e.g. ["tomo_000"]); default all of the dataset's.

    Returns:
        A `SegmentationDataset`: tomograms (float32), label maps (int16), particle lists, and
        the label names of `parameters.json`.
    """
    folder = Path(dataset_dir)
    params_path = folder / "parameters.json"
    if not params_path.is_file():
        raise ValueError(
            f"{folder} has no parameters.json; give a folder written by write_dataset "
            "(cryojax-mw simulate)"
        )
    try:
        params = json.loads(params_path.read_text())
        label_names = tuple(params["label_names"])
        available = sorted(params["tomograms"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{params_path} is not a dataset description ({err})") from None
    names = available if names is None else list(names)
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ValueError(f"tomograms {unknown} are not in {folder}; it holds {available}")
    items = []
    for name in names:
        files = dataset_file_names(name)
        paths = {r: folder / files[r] for r in ("tomogram", "labels", "particles_star")}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise ValueError(f"dataset files missing: {missing}")
        tomogram, _ = read_mrc(paths["tomogram"])
        labels, _ = read_mrc(paths["labels"])
        particles = read_particles(paths["particles_star"])
        items.append(LabelledTomogram(
            np.asarray(tomogram, np.float32), np.asarray(labels, np.int16), particles, name
        ))  # fmt: skip
    return SegmentationDataset(tuple(items), label_names)


def _subset(particles: ParticleList, keep: np.ndarray, offset: np.ndarray) -> ParticleList:
    return ParticleList(
        class_names=particles.class_names,
        class_ids=particles.class_ids[keep],
        positions=particles.positions[keep] - offset,
        angles_deg=particles.angles_deg[keep],
        voxel_size=particles.voxel_size,
        tomo_name=particles.tomo_name,
    )


def split_train_val(
    key: jax.Array, tomograms, val_fraction: float = 0.25
) -> tuple[list[LabelledTomogram], list[LabelledTomogram]]:
    """Split labelled tomograms into a training and a validation set.

    With two or more tomograms, whole tomograms go to validation: round(val_fraction * n), at
    least one and at most n - 1, drawn at random with `key`. A single tomogram is cut across the
    tilt axis y: the first (1 - val_fraction) of its y range trains, the rest validates (both
    parts keep the full z and x extent, hence the same missing wedge); particles go with the part
    that holds their centre, positions re-based.

    Args:
        key: typed PRNG key (unused for a single tomogram).
        tomograms: `LabelledTomogram`s or (tomogram, labels, ParticleList) tuples.
        val_fraction: in (0, 1).

    Returns:
        (train, val) lists of `LabelledTomogram`.
    """
    items = as_labelled(tomograms)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if not items:
        raise ValueError("give at least one tomogram to split")
    if len(items) >= 2:
        n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
        order = np.asarray(jax.random.permutation(key, len(items)))
        val = set(order[:n_val].tolist())
        return (
            [t for i, t in enumerate(items) if i not in val],
            [t for i, t in enumerate(items) if i in val],
        )
    (item,) = items
    ny = item.tomogram.shape[1]
    cut = round(ny * (1 - val_fraction))
    if not 0 < cut < ny:
        raise ValueError(f"{item.name} is too thin along y ({ny}) to split at {val_fraction}")
    in_train = item.particles.positions[:, 1] < cut - 0.5
    parts = []
    for name, sl, keep, start in (("train", slice(0, cut), in_train, 0),
                                  ("val", slice(cut, ny), ~in_train, cut)):  # fmt: skip
        offset = np.array([0.0, start, 0.0])
        parts.append([LabelledTomogram(
            item.tomogram[:, sl], item.labels[:, sl], _subset(item.particles, keep, offset),
            f"{item.name}_{name}",
        )])  # fmt: skip
    return parts[0], parts[1]
