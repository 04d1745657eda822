"""Voxel-wise training targets built from particle lists.

Both builders paint label k (the 1-based class id of `ParticleList`) into an int16 map of zeros
(background). Where two particles' shapes overlap, a voxel takes the label of the particle whose
centre is nearest (ties: the particle listed first), so the result does not depend on the order
of painting and every particle keeps the voxels around its own centre.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..io import ParticleList
from ..simulate import Template, rotate_volume


def _check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (z, y, x) with positive sizes, got {shape}")
    return shape


def _paint(
    labels: np.ndarray,
    nearest: np.ndarray,
    label: int,
    origin: np.ndarray,
    mask: np.ndarray,
    centre: np.ndarray,
) -> None:
    """Give `label` to the voxels of `mask` (a box whose first voxel sits at `origin`) that are
    nearer to `centre` than to any particle painted before; the box is clipped to the volume."""
    start = np.maximum(origin, 0)
    stop = np.minimum(origin + mask.shape, labels.shape)
    if np.any(stop <= start):
        return
    target = tuple(slice(a, b) for a, b in zip(start, stop))
    inner = mask[tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, origin))]
    grid = np.ogrid[target]
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre))
    closer = inner & (dist2 < nearest[target])
    labels[target][closer] = label
    nearest[target][closer] = dist2[closer]


def sphere_targets(
    shape: Sequence[int], particles: ParticleList, radii: float | Sequence[float]
) -> np.ndarray:
    """A label map with a ball around every particle.

    A voxel (index i, centre at i) belongs to a particle's ball when its distance to the
    particle's position (sub-voxel, (z, y, x) voxels) is at most the class's radius. Overlaps:
    nearest centre wins (see the module docstring). Particles partly outside the volume are
    clipped.

    Args:
        shape: (z, y, x) size of the map in voxels.
        particles: positions and 1-based class ids.
        radii: radius in voxels, one per class of `particles.class_names` (or one for all), >= 0.

    Returns:
        int16 (z, y, x) map: 0 background, k inside a ball of class id k.
    """
    shape = _check_shape(shape)
    n_classes = len(particles.class_names)
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim == 0:
        radii = np.full(n_classes, radii)
    if radii.shape != (n_classes,) or not np.all(np.isfinite(radii) & (radii >= 0)):
        raise ValueError(
            f"radii must be finite voxel counts >= 0, one per class of {particles.class_names} "
            f"or one for all, got {radii.tolist()}"
        )
    labels = np.zeros(shape, np.int16)
    nearest = np.full(shape, np.inf)
    for class_id, centre in zip(particles.class_ids, particles.positions):
        r = radii[class_id - 1]
        lo = np.ceil(centre - r).astype(int)
        hi = np.floor(centre + r).astype(int) + 1
        grid = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        _paint(labels, nearest, int(class_id), lo, inside, centre)
    return labels


def _as_mask(template, class_name: str) -> np.ndarray:
    mask = template.mask if isinstance(template, Template) else np.asarray(template)
    if mask.dtype != bool or mask.ndim != 3 or len(set(mask.shape)) != 1 or mask.shape[0] % 2 == 0:
        raise ValueError(
            f"the shape of class {class_name} must be a Template or a boolean cube of odd edge "
            f"centred on the particle, got {mask.dtype} array of shape {mask.shape}"
        )
    return mask


def shape_targets(
    shape: Sequence[int],
    particles: ParticleList,
    templates: Mapping[str, Template | np.ndarray] | Sequence[Template | np.ndarray],
) -> np.ndarray:
    """A label map with every particle's shape mask, turned to its orientation.

    Same placement as the simulator (`cryojax_mw.simulate`): a class's mask (a `Template`'s
    `mask`, or a boolean cube of odd edge m centred on the particle) is turned by the particle's
    RELION ZYZ angles with `rotate_volume` (trilinear, kept where > 0.5) and its central voxel
    (m - 1) / 2 is put on the particle's position rounded to the nearest voxel. Overlaps: nearest
    centre wins (see the module docstring). Masks are clipped to the volume.

    Args:
        shape: (z, y, x) size of the map in voxels.
        particles: positions, orientations and 1-based class ids.
        templates: one shape per class, as a mapping from class name or a sequence in the order
            of `particles.class_names`; masks must be at the particles' voxel size.

    Returns:
        int16 (z, y, x) map: 0 background, k under a particle of class id k.
    """
    shape = _check_shape(shape)
    names = particles.class_names
    if isinstance(templates, Mapping):
        missing = [n for n in names if n not in templates]
        if missing:
            raise ValueError(f"no template for classes {missing}; give one per class of {names}")
        masks = [_as_mask(templates[n], n) for n in names]
    else:
        if len(templates) != len(names):
            raise ValueError(
                f"give one template per class ({len(names)}: {names}), got {len(templates)}"
            )
        masks = [_as_mask(t, n) for t, n in zip(templates, names)]
    labels = np.zeros(shape, np.int16)
    nearest = np.full(shape, np.inf)
    for class_id, position, angles in zip(
        particles.class_ids, particles.positions, particles.angles_deg
    ):
        mask = masks[class_id - 1]
        turned = rotate_volume(mask.astype(np.float32), angles) > 0.5
        centre = np.rint(position).astype(int)
        _paint(labels, nearest, int(class_id), centre - (mask.shape[0] - 1) // 2, turned, centre)
    return labels
