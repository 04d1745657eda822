"""Training patches: class-balanced sampling around particles, normalisation and augmentation.

Sampling follows DeepFinder (thesis 4.2.2 and 4.3.4): a batch is drawn class by class, the class
uniformly among the classes present, then one of its examples uniformly, so rare classes are seen
as often as common ones. A class's examples are the positions of its particles (`ParticleList`
class id k = label k) when any particle of it is listed; classes without particle positions
(membranes, gold beads, decoys of the simulator) are centred on a uniformly drawn voxel of their
label. Each centre moves by a random integer shift of up to `max_shift` voxels per axis.

Border rule: patches are shifted inside the tomogram (never padded), so a particle near the
border sits off-centre in its patch and every voxel of a patch is real data with its true label.

Each patch is z-scored on its own (`zscore_patches`, the same function `Segmenter.predict_proba`
applies). Augmentation: the 180 degree rotation about the tilt axis y, (z, y, x) -> (-z, y, -x),
the only rotation that keeps the missing wedge where it was, applied to image and label alike;
optionally contrast, brightness and Gaussian noise on the z-scored image (before z-scoring, the
first two would cancel).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._dataset import as_labelled


def key_to_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a typed JAX key (the same key gives the same draws)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def zscore_patches(patches) -> jax.Array:
    """Subtract each patch's mean and divide by its standard deviation.

    Args:
        patches: (..., z, y, x) array; statistics over the last three axes. Integer input is
            converted to float32.

    Returns:
        Array of the same shape, float (the input's float dtype); a constant patch becomes 0.
    """
    x = jnp.asarray(patches)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.ndim < 3:
        raise ValueError(f"patches must be (..., z, y, x), got shape {x.shape}")
    axes = (-3, -2, -1)
    mean = jnp.mean(x, axis=axes, keepdims=True)
    std = jnp.std(x, axis=axes, keepdims=True)
    return (x - mean) / jnp.where(std > 0, std, 1)


def flip_tilt_axis(volume):
    """Rotate by 180 degrees about the tilt axis y: (z, y, x) -> (-z, y, -x), i.e. reverse axes
    z and x of a (..., z, y, x) array (NumPy or JAX). Applying it twice gives the input back."""
    if volume.ndim < 3:
        raise ValueError(f"volume must be (..., z, y, x), got shape {volume.shape}")
    if isinstance(volume, jax.Array):
        return jnp.flip(volume, axis=(-3, -1))
    return np.flip(volume, axis=(-3, -1))


def turn_beam_axis(volume):
    """Rotate by 180 degrees about the beam axis z: (z, y, x) -> (z, -y, -x), i.e. reverse axes
    y and x of a (..., z, y, x) array (NumPy or JAX). With `flip_tilt_axis` it generates the four
    rotations that keep a missing wedge symmetric about z in place (identity and 180 degrees
    about z, y and x): each sends the measured directions (kz, kx) to (+-kz, +-kx)."""
    if volume.ndim < 3:
        raise ValueError(f"volume must be (..., z, y, x), got shape {volume.shape}")
    if isinstance(volume, jax.Array):
        return jnp.flip(volume, axis=(-2, -1))
    return np.flip(volume, axis=(-2, -1))


class PatchBatch(NamedTuple):
    """A batch of training patches.

    Attributes:
        images: (B, p, p, p) float32 z-scored (and augmented) patches.
        labels: (B, p, p, p) int32 labels.
        classes: (B,) the class each patch was drawn for (0 = a random background patch).
        tomograms: (B,) index of the source tomogram.
        starts: (B, 3) first voxel (z, y, x) of each patch in its tomogram.
        flipped: (B,) whether the 180 degree rotation about y was applied.
        turned: (B,) whether the 180 degree rotation about z was applied (after the flip).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: np.ndarray
    tomograms: np.ndarray
    starts: np.ndarray
    flipped: np.ndarray
    turned: np.ndarray


class PatchSampler:
    """Draws class-balanced batches of patches (see the module docstring).

    Args:
        data: `LabelledTomogram`s or (tomogram, labels, ParticleList) tuples; every tomogram must
            be at least `patch_size` voxels along each axis.
        n_classes: number of label values including background; labels must lie in 0..n-1.
        patch_size: edge p of the cubic patches.
        max_shift: largest random shift of a patch centre from its example, per axis (voxels).
        background_fraction: fraction of each batch drawn uniformly anywhere (rounded to a count).
        flip_probability: probability of the 180 degree rotation about y for each patch.
        turn_probability: probability of the 180 degree rotation about z for each patch (with
            both at 0.5 the patches take the four wedge-preserving orientations equally often).
        contrast: each z-scored patch is multiplied by U[1 - contrast, 1 + contrast].
        brightness: ... then shifted by U[-brightness, brightness].
        noise: ... then given Gaussian noise of standard deviation U[0, noise].
    """

    def __init__(
        self,
        data,
        *,
        n_classes: int,
        patch_size: int,
        max_shift: int = 0,
        background_fraction: float = 0.0,
        flip_probability: float = 0.5,
        turn_probability: float = 0.0,
        contrast: float = 0.0,
        brightness: float = 0.0,
        noise: float = 0.0,
    ):
        self.data = as_labelled(data)
        if not self.data:
            raise ValueError("give at least one tomogram to sample patches from")
        self.patch_size = int(patch_size)
        self.max_shift = int(max_shift)
        self.n_classes = int(n_classes)
        if self.patch_size < 1 or self.max_shift < 0:
            raise ValueError(
                f"need patch_size >= 1 and max_shift >= 0, got {patch_size}, {max_shift}"
            )
        if not all(0 <= q <= 1 for q in (background_fraction, flip_probability, turn_probability)):
            raise ValueError(
                "background_fraction, flip_probability and turn_probability must lie in [0, 1]"
            )
        if not 0 <= contrast < 1 or brightness < 0 or noise < 0:
            raise ValueError("need 0 <= contrast < 1, brightness >= 0 and noise >= 0")
        self.background_fraction = float(background_fraction)
        self.flip_probability = float(flip_probability)
        self.turn_probability = float(turn_probability)
        self.contrast, self.brightness, self.noise = (
            float(contrast),
            float(brightness),
            float(noise),
        )
        for item in self.data:
            if min(item.tomogram.shape) < self.patch_size:
                raise ValueError(
                    f"{item.name} ({item.tomogram.shape}) is smaller than the patch size "
                    f"{self.patch_size}; choose a smaller patch_size"
                )
            if item.labels.max() >= self.n_classes:
                raise ValueError(
                    f"{item.name} has label {item.labels.max()} but there are only "
                    f"{self.n_classes} classes; give all label names"
                )
        self._examples = {c: ex for c in range(1, self.n_classes) if (ex := self._find(c))}
        self.classes = tuple(self._examples)
        if not self.classes and self.background_fraction < 1:
            raise ValueError(
                "no particle and no labelled voxel in the data; give labelled tomograms or set "
                "background_fraction = 1"
            )

    def _find(self, label: int):
        """(tomogram indices, centres (n, 3)) of the examples of a class, or None."""
        where_particles = [
            np.rint(item.particles.positions[item.particles.class_ids == label]).astype(np.int64)
            for item in self.data
        ]
        if sum(len(p) for p in where_particles) == 0:
            where_particles = [
                np.stack(np.nonzero(item.labels == label), axis=-1) for item in self.data
            ]
        counts = [len(p) for p in where_particles]
        if sum(counts) == 0:
            return None
        return np.repeat(np.arange(len(self.data)), counts), np.concatenate(where_particles)

    def class_counts(self) -> dict[int, int]:
        """Number of examples (particles or labelled voxels) of each sampled class."""
        return {c: len(ex[0]) for c, ex in self._examples.items()}

    def _window(self, shape, centre) -> np.ndarray:
        start = np.asarray(centre) - self.patch_size // 2
        return np.clip(start, 0, np.asarray(shape) - self.patch_size)

    def sample(self, key: jax.Array, batch_size: int) -> PatchBatch:
        """Draw a batch; the same key gives the same batch.

        Args:
            key: typed PRNG key.
            batch_size: number of patches B.

        Returns:
            A `PatchBatch`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rng = key_to_rng(key)
        p = self.patch_size
        n_background = round(self.background_fraction * batch_size)
        classes = np.zeros(batch_size, np.int64)
        if self.classes:
            drawn = rng.integers(len(self.classes), size=batch_size - n_background)
            classes[n_background:] = np.asarray(self.classes)[drawn]
        classes = rng.permutation(classes)
        volumes = np.array([item.tomogram.size for item in self.data], np.float64)
        tomograms = np.zeros(batch_size, np.int64)
        starts = np.zeros((batch_size, 3), np.int64)
        images = np.empty((batch_size, p, p, p), np.float32)
        labels = np.empty((batch_size, p, p, p), np.int32)
        for i, c in enumerate(classes):
            if c == 0:
                t = rng.choice(len(self.data), p=volumes / volumes.sum())
                shape = np.asarray(self.data[t].tomogram.shape)
                start = rng.integers(0, shape - p + 1)
            else:
                owners, centres = self._examples[c]
                j = rng.integers(len(owners))
                t = owners[j]
                shift = rng.integers(-self.max_shift, self.max_shift + 1, size=3)
                start = self._window(self.data[t].tomogram.shape, centres[j] + shift)
            window = tuple(slice(s, s + p) for s in start)
            images[i] = self.data[t].tomogram[window]
            labels[i] = self.data[t].labels[window]
            tomograms[i], starts[i] = t, start
        images = np.array(zscore_patches(images), np.float32)
        # Flips and intensity factors are drawn whatever the settings (the noise field, drawn
        # last, only when used): switching an augmentation on or off changes nothing else.
        flipped = rng.random(batch_size) < self.flip_probability
        images[flipped] = flip_tilt_axis(images[flipped])
        labels[flipped] = flip_tilt_axis(labels[flipped])
        gain = rng.uniform(1 - self.contrast, 1 + self.contrast, batch_size)
        offset = rng.uniform(-self.brightness, self.brightness, batch_size)
        sigma = rng.uniform(0, self.noise, batch_size)
        turned = rng.random(batch_size) < self.turn_probability
        images[turned] = turn_beam_axis(images[turned])
        labels[turned] = turn_beam_axis(labels[turned])
        if self.contrast or self.brightness or self.noise:
            noise = rng.standard_normal(images.shape, dtype=np.float32)
            images = (
                gain[:, None, None, None] * images
                + offset[:, None, None, None]
                + sigma[:, None, None, None] * noise
            ).astype(np.float32)
        return PatchBatch(images, labels, classes, tomograms, starts, flipped, turned)
