"""Building a crowded sample: bodies (templates, membranes, gold beads, decoys) stamped into a
volume without overlap, with a class-label map and an instance map.

Every body is a box of density and a boolean shape mask; two bodies overlap when their masks
share a voxel. Lengths of the public shape functions are in Angstrom.
"""

from __future__ import annotations

import numpy as np

from ._rotations import euler_zyz_to_matrix

# Bilayer: two head-group layers 38 Å apart, each a Gaussian of 6 Å standard deviation; the mask
# covers the leaflets out to 2 standard deviations.
_HEAD_OFFSET_A = 19.0
_HEAD_SIGMA_A = 6.0
_BILAYER_HALF_WIDTH_A = _HEAD_OFFSET_A + 2 * _HEAD_SIGMA_A


def bilayer_profile(distance_a: np.ndarray) -> np.ndarray:
    """Density across a lipid bilayer at signed distance (Angstrom) from its mid-plane: two
    Gaussian head-group peaks of height 1."""
    d = np.asarray(distance_a, dtype=np.float64)
    return np.exp(-0.5 * ((d - _HEAD_OFFSET_A) / _HEAD_SIGMA_A) ** 2) + np.exp(
        -0.5 * ((d + _HEAD_OFFSET_A) / _HEAD_SIGMA_A) ** 2
    )


def _bilayer_mask(distance_a: np.ndarray, voxel_size: float) -> np.ndarray:
    # At coarse voxels the mask keeps at least the voxels within half a voxel of the mid-plane.
    return np.abs(distance_a) <= max(_BILAYER_HALF_WIDTH_A, 0.5 * voxel_size)


def _centred_grid(radius: int) -> np.ndarray:
    """(x, y, z) offsets in voxels of a (2r+1)^3 box, shape (2r+1, 2r+1, 2r+1, 3)."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    z, y, x = np.meshgrid(offsets, offsets, offsets, indexing="ij")
    return np.stack([x, y, z], axis=-1)


def vesicle(radius_a: float, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """A spherical vesicle: a bilayer of mid-radius `radius_a`.

    Returns:
        (density, mask) in a cubic box of odd edge centred on the vesicle's centre.
    """
    r = int(np.ceil((radius_a + _BILAYER_HALF_WIDTH_A + 2 * _HEAD_SIGMA_A) / voxel_size))
    distance = np.linalg.norm(_centred_grid(r), axis=-1) * voxel_size - radius_a
    return bilayer_profile(distance).astype(np.float32), _bilayer_mask(distance, voxel_size)


def flat_membrane(
    shape: tuple[int, int, int], voxel_size: float, normal_xyz, point_zyx
) -> tuple[np.ndarray, np.ndarray]:
    """A flat bilayer across the whole volume: the plane through `point_zyx` (voxels) with unit
    normal `normal_xyz`. Returns (density, mask) of the volume's shape."""
    normal = np.asarray(normal_xyz, dtype=np.float64)
    normal = normal / np.linalg.norm(normal)
    axes = [np.arange(n, dtype=np.float32) - p for n, p in zip(shape, point_zyx)]
    distance = (
        axes[2][None, None, :] * normal[0]
        + axes[1][None, :, None] * normal[1]
        + axes[0][:, None, None] * normal[2]
    ) * np.float32(voxel_size)
    return bilayer_profile(distance).astype(np.float32), _bilayer_mask(distance, voxel_size)


def _soft_solid(level: np.ndarray, scale_voxels: float) -> np.ndarray:
    """Density 1 inside, 0 outside, with a one-voxel linear edge; `level` < 1 inside, scaled to
    voxels by `scale_voxels` near the surface."""
    return np.clip(0.5 - (level - 1.0) * scale_voxels, 0.0, 1.0).astype(np.float32)


def gold_bead(radius_a: float, voxel_size: float, contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """A gold fiducial: a uniform sphere of density `contrast` (proteins have 1)."""
    r = int(np.ceil(radius_a / voxel_size)) + 1
    level = np.linalg.norm(_centred_grid(r), axis=-1) * voxel_size / radius_a
    return contrast * _soft_solid(level, radius_a / voxel_size), level <= 1.0


def ellipsoid(semi_axes_a, angles_deg, voxel_size: float) -> tuple[np.ndarray, np.ndarray]:
    """A uniform ellipsoid of density 1 with semi-axes (a, b, c) Angstrom along its own x, y, z,
    turned by RELION Euler angles (rot, tilt, psi); a disc when one semi-axis is short."""
    axes = np.asarray(semi_axes_a, dtype=np.float64)
    r = int(np.ceil(axes.max() / voxel_size)) + 1
    body = _centred_grid(r) @ euler_zyz_to_matrix(angles_deg)  # body-frame (Aᵀ r)
    level = np.sqrt(np.sum((body * voxel_size / axes) ** 2, axis=-1))
    return _soft_solid(level, axes.min() / voxel_size), level <= 1.0


class Canvas:
    """A volume being filled: density, class labels (0 = background) and instance ids
    (0 = none), with non-overlapping masks."""

    def __init__(self, shape: tuple[int, int, int]):
        self.shape = tuple(int(n) for n in shape)
        self.density = np.zeros(self.shape, np.float32)
        self.labels = np.zeros(self.shape, np.int16)
        self.instances = np.zeros(self.shape, np.int32)
        self.n_instances = 0
        self.n_occupied = 0

    def try_stamp(
        self, density: np.ndarray, mask: np.ndarray, origin, label: int, bounds=None
    ) -> int:
        """Add a body whose box starts at voxel `origin` (z, y, x), if its mask fits inside the
        volume and touches no other body's mask.

        Args:
            density, mask: the body's box.
            origin: volume index of the box's first voxel (may be negative if only empty parts
                of the box fall outside).
            label: class label written under the mask.
            bounds: (lo, hi) index bounds of the mask inside the box, if already known.

        Returns:
            The new instance id (>= 1), or 0 if the body did not fit.
        """
        if bounds is None:
            bounds = mask_bounds(mask)
        lo, hi = bounds
        start = np.asarray(origin) + lo
        stop = np.asarray(origin) + hi
        if np.any(start < 0) or np.any(stop > self.shape):
            return 0
        region = tuple(slice(a, b) for a, b in zip(start, stop))
        inner = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        occupied = self.instances[region]
        if np.any(occupied[inner]):
            return 0
        self.n_instances += 1
        occupied[inner] = self.n_instances
        self.n_occupied += int(np.count_nonzero(inner))
        self.labels[region][inner] = label
        self._add_density(density, np.asarray(origin))
        return self.n_instances

    def _add_density(self, density: np.ndarray, origin: np.ndarray) -> None:
        """Add a box of density, clipped to the volume (faint tails may fall outside)."""
        start = np.maximum(origin, 0)
        stop = np.minimum(origin + density.shape, self.shape)
        target = tuple(slice(a, b) for a, b in zip(start, stop))
        source = tuple(slice(a - o, b - o) for a, b, o in zip(start, stop, origin))
        self.density[target] += density[source]

    @property
    def occupancy(self) -> float:
        """Fraction of voxels covered by a body's mask."""
        return self.n_occupied / self.instances.size


def mask_bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) index bounds of the True voxels of a mask (hi exclusive)."""
    where = np.argwhere(mask)
    if where.size == 0:
        raise ValueError("a body's shape mask is empty; raise the voxel size or the body's size")
    return where.min(axis=0), where.max(axis=0) + 1
