"""Sliding-window segmentation of a whole tomogram with a patch-wise classifier.

The tomogram is cut into overlapping cubic patches of `patch_size` voxels; each patch is classified
voxel-wise and only its centre (the patch minus `crop` voxels on every side) is kept, so the border
artefacts of a convolutional network (its zero padding) never reach the map. Neighbouring centres
tile the volume without gaps; where the last tile of an axis overlaps the one before it, the later
tile's values are kept (for a network whose receptive field fits in `crop` both are identical).
The tomogram's own border is covered by padding it with its reflection (`crop` voxels on each side)
and cropping the result back, as DeepFinder does with zeros.

Memory (200 x 512 x 512 voxels, 13 classes, the size of a binned cellular tomogram): the
probabilities take 2.7 GB in float32 or 1.4 GB in float16, the label map 0.1 GB (int16), the
maximum probability 0.2 GB, the padded input 0.2 GB; on the device one batch of B patches of p^3
voxels holds B * p^3 * (1 + C) floats (64^3, B = 8, C = 13: 0.1 GB) plus the padded input. All of
it fits a 24 GB machine in float32; `probabilities="float16"` halves the largest array and
`probabilities=None` keeps only the label map and the maximum probability (0.3 GB in all).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

_PROBABILITY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """Voxel-wise classification of a tomogram.

    Attributes:
        label_map: int16 (z, y, x), the class of each voxel (0 = background, as the
            classifier's channel 0): the most probable one, or as `foreground_threshold` says
            (`label_voxels`).
        max_probability: float32 (z, y, x), the probability of that class.
        probabilities: (z, y, x, C) class probabilities in float32 or float16, or None when only
            the label map was asked for.
        patch_size: edge of the cubic patches, in voxels.
        crop: voxels discarded on each side of every patch prediction.
        n_tiles: number of patches classified.
    """

    label_map: np.ndarray
    max_probability: np.ndarray
    probabilities: np.ndarray | None
    patch_size: int
    crop: int
    n_tiles: int


def real_volume(tomogram) -> np.ndarray:
    """The tomogram as a NumPy array, after checking that it is a real (z, y, x) volume."""
    volume = np.asarray(tomogram)
    if volume.ndim != 3 or not (
        np.issubdtype(volume.dtype, np.floating) or np.issubdtype(volume.dtype, np.integer)
    ):
        raise ValueError(
            f"tomogram must be a real (z, y, x) array, got shape {volume.shape} dtype "
            f"{volume.dtype}"
        )
    return volume


def _tile_starts(padded_length: int, patch_size: int, core: int) -> list[int]:
    """Patch starts along one axis whose centres (core voxels) tile the padded axis's interior."""
    starts = list(range(0, padded_length - patch_size, core))
    starts.append(padded_length - patch_size)
    return starts


@functools.partial(jax.jit, static_argnames=("patch_size",))
def _extract(volume: jax.Array, starts: jax.Array, patch_size: int) -> jax.Array:
    return jax.vmap(lambda s: jax.lax.dynamic_slice(volume, s, (patch_size,) * 3))(starts)


def _check_foreground_threshold(foreground_threshold, n_classes: int):
    if foreground_threshold is None:
        return None
    t = float(foreground_threshold)
    if not 0 < t < 1:
        raise ValueError(f"foreground_threshold must lie in (0, 1), got {foreground_threshold}")
    if n_classes < 2:
        raise ValueError("foreground_threshold needs a background and at least one other class")
    return t


def label_voxels(probabilities, foreground_threshold: float | None = None):
    """The label of each voxel and the probability of that label, from class probabilities.

    Args:
        probabilities: (..., C) class probabilities, background (channel 0) first.
        foreground_threshold: None: the most probable class, background included. A number in
            (0, 1): a voxel is a particle when its total particle probability (1 minus the
            background's) reaches it, and then takes its most probable particle class. With many
            similar classes the particle probability of a voxel is shared among them, so the
            plain argmax calls background a voxel that is most likely some particle (localization
            ignores the class); 0.5 labels a voxel particle whenever particle is the likelier.

    Returns:
        (labels int16 (...), probability float32 (...) of each voxel's label).
    """
    probabilities = jnp.asarray(probabilities)
    foreground_threshold = _check_foreground_threshold(
        foreground_threshold, probabilities.shape[-1]
    )
    if foreground_threshold is None:
        labels = jnp.argmax(probabilities, axis=-1)
    else:
        foreground = 1 - probabilities[..., 0] >= foreground_threshold
        labels = jnp.where(foreground, 1 + jnp.argmax(probabilities[..., 1:], axis=-1), 0)
    best = jnp.take_along_axis(probabilities, labels[..., None], axis=-1)[..., 0]
    return labels.astype(jnp.int16), best.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("crop", "dtype", "foreground_threshold"))
def _keep_centres(probabilities: jax.Array, crop: int, dtype, foreground_threshold):
    p = probabilities.shape[1]
    core = probabilities[:, crop : p - crop, crop : p - crop, crop : p - crop, :]
    labels, best = label_voxels(core, foreground_threshold)
    return labels, best, (None if dtype is None else core.astype(dtype))


def segment_tomogram(
    predict_proba: Callable[[jax.Array], jax.Array],
    tomogram,
    *,
    patch_size: int,
    n_classes: int,
    crop: int | None = None,
    batch_size: int = 4,
    probabilities: str | None = "float32",
    foreground_threshold: float | None = None,
    progress: bool = True,
) -> Segmentation:
    """Classify every voxel of a tomogram with a patch classifier, patch by patch.

    Args:
        predict_proba: maps raw patches (B, p, p, p) to class probabilities (B, p, p, p, C),
            C = `n_classes` including the background channel 0; normalising the patch (z-score)
            is its job. It is always called with the same shape (the last batch is filled up by
            repeating a patch), so a jitted function compiles once.
        tomogram: (z, y, x) real array, any size (a size below `patch_size - 2 * crop` along an
            axis is padded up with a warning).
        patch_size: edge p of the cubic patches in voxels, a multiple of 4 (two 2x poolings of a
            DeepFinder U-Net give back the input size).
        n_classes: C, the number of channels `predict_proba` returns.
        crop: voxels discarded on each side of every prediction, >= 0 and < p / 2; should cover the
            network's border artefacts (about its receptive field radius). Default p // 8.
        batch_size: patches per call of `predict_proba`.
        probabilities: "float32" or "float16" to keep the (z, y, x, C) probabilities in that
            dtype, or None to keep only the label map and the maximum probability (see the module
            docstring for the memory each takes).
        foreground_threshold: how voxels are labelled (`label_voxels`): None, the most probable
            class; a number in (0, 1), particle when the particle classes together reach it.
        progress: show a progress bar over the batches.

    Returns:
        A `Segmentation` of the tomogram's shape.

    Raises:
        ValueError: a tomogram that is not 3D and real, a patch size that is not a positive
            multiple of 4, a crop outside [0, p / 2), a batch size < 1, an unknown probability
            dtype, or a classifier whose output has the wrong shape.
    """
    volume = real_volume(tomogram)
    if volume.dtype != np.float64:
        volume = volume.astype(np.float32)
    p = int(patch_size)
    if p != patch_size or p < 4 or p % 4:
        raise ValueError(f"patch_size must be a positive multiple of 4, got {patch_size}")
    c = p // 8 if crop is None else int(crop)
    if (crop is not None and c != crop) or not 0 <= 2 * c < p:
        raise ValueError(
            f"crop must be a whole number of voxels in [0, patch_size / 2) = [0, {p / 2:g}), "
            f"got {crop}"
        )
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if probabilities is not None and probabilities not in _PROBABILITY_DTYPES:
        raise ValueError(
            f"probabilities must be 'float32', 'float16' or None, got {probabilities!r}"
        )
    out_dtype = None if probabilities is None else _PROBABILITY_DTYPES[probabilities]
    foreground_threshold = _check_foreground_threshold(foreground_threshold, int(n_classes))
    n_classes, batch_size = int(n_classes), int(batch_size)

    core = p - 2 * c
    extra = [max(0, p - (n + 2 * c)) for n in volume.shape]
    if any(extra):
        warnings.warn(
            f"tomogram {volume.shape} is smaller than a patch ({p} voxels with {c} cropped on "
            f"each side) along some axis; it is padded by reflection up to the patch size",
            stacklevel=2,
        )
    padded = np.pad(volume, [(c, c + e) for e in extra], mode="reflect")
    axes = [_tile_starts(n, p, core) for n in padded.shape]
    tiles = np.array(list(itertools.product(*axes)), dtype=np.int32).reshape(-1, 3)
    n_tiles = len(tiles)
    n_batches = -(-n_tiles // batch_size)
    # Fill the last batch with copies of the last tile: one shape, one compilation.
    filler = np.repeat(tiles[-1:], n_batches * batch_size - n_tiles, axis=0)
    batches = np.concatenate([tiles, filler]).reshape(n_batches, batch_size, 3)

    shape = volume.shape
    label_map = np.zeros(shape, dtype=np.int16)
    max_probability = np.zeros(shape, dtype=np.float32)
    probs = None if out_dtype is None else np.zeros((*shape, n_classes), dtype=out_dtype)
    device_volume = jnp.asarray(padded)
    expected = (batch_size, p, p, p, n_classes)
    for b, starts in enumerate(
        tqdm(batches, desc="segmenting", unit="batch", disable=not progress)
    ):
        prediction = predict_proba(_extract(device_volume, jnp.asarray(starts), p))
        if tuple(prediction.shape) != expected:
            raise ValueError(
                f"predict_proba returned shape {tuple(prediction.shape)} for patches "
                f"{(batch_size, p, p, p)}; it must return {expected} (n_classes = {n_classes})"
            )
        labels, best, kept = jax.device_get(
            _keep_centres(prediction, c, out_dtype, foreground_threshold)
        )
        for i, start in enumerate(starts[: min(batch_size, n_tiles - b * batch_size)]):
            # Core voxel j of a tile starting at s (padded coordinates) is voxel s + j of the
            # tomogram: the padding in front is exactly `crop` voxels.
            stop = np.minimum(start + core, shape)
            region = tuple(slice(s, e) for s, e in zip(start, stop))
            inner = tuple(slice(0, e - s) for s, e in zip(start, stop))
            label_map[region] = labels[i][inner]
            max_probability[region] = best[i][inner]
            if probs is not None:
                probs[region] = kept[i][inner]
    return Segmentation(label_map, max_probability, probs, p, c, n_tiles)
