"""Test phantoms: the modified Shepp-Logan phantom (2D and 3D) and random Gaussian blobs.

Axis conventions follow the package: 2D images are (z, x), volumes are (z, y, x) with y the tilt
axis. The Shepp-Logan head lies in the (z, x) plane (the plane each tilt images), its top at
z = 0, and in 3D it extends along y, so the central y-slice of a volume with an odd y size is
the 2D phantom.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Modified Shepp-Logan (Toft 1996): the original geometry with contrasts raised so that the values
# lie in [0, 1]. Columns: intensity, semi-axis along x, semi-axis along the picture's vertical,
# centre x, centre vertical (positive = up), in-plane rotation in degrees.
_SHEPP_LOGAN_2D = np.array(
    [
        [1.0, 0.6900, 0.9200, 0.00, 0.0000, 0.0],
        [-0.8, 0.6624, 0.8740, 0.00, -0.0184, 0.0],
        [-0.2, 0.1100, 0.3100, 0.22, 0.0000, -18.0],
        [-0.2, 0.1600, 0.4100, -0.22, 0.0000, 18.0],
        [0.1, 0.2100, 0.2500, 0.00, 0.3500, 0.0],
        [0.1, 0.0460, 0.0460, 0.00, 0.1000, 0.0],
        [0.1, 0.0460, 0.0460, 0.00, -0.1000, 0.0],
        [0.1, 0.0460, 0.0230, -0.08, -0.6050, 0.0],
        [0.1, 0.0230, 0.0230, 0.00, -0.6060, 0.0],
        [0.1, 0.0230, 0.0460, 0.06, -0.6050, 0.0],
    ]
)

# Third semi-axes (depth along the tilt axis) of the common 3D extension, as in Schabel's
# `phantom3d` and ODL. As in ODL, every ellipsoid is centred in the mid-plane and rotated in-plane
# only, so the mid-plane section is exactly the 2D phantom.
_SHEPP_LOGAN_DEPTH = np.array(
    [0.810, 0.780, 0.220, 0.280, 0.410, 0.050, 0.050, 0.020, 0.020, 0.020]
)


def _unit_coords(n: int) -> np.ndarray:
    """Pixel centres of an axis of n pixels mapped onto [-1, 1] (the phantom's extent)."""
    return (2.0 * np.arange(n) + 1.0) / n - 1.0


def shepp_logan(shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """The modified Shepp-Logan phantom, values in [0, 1].

    Args:
        shape: (z, x) for a 2D image or (z, y, x) for a volume; any positive sizes. Each axis of
            the array spans the phantom's [-1, 1] extent, so non-square shapes stretch the head.
            The head's top is at z = 0 and its left-right axis is x; in 3D it has depth along y
            (the tilt axis).
        dtype: floating dtype of the result.

    Returns:
        An array of `shape`: the sum of the ellipses' (ellipsoids') intensities at each pixel
        centre, clipped to [0, 1] against rounding where ellipses cancel exactly.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (z, x) or (z, y, x) with positive sizes, got {shape}")
    # The picture's vertical axis points up, array rows (z) go down.
    v = -_unit_coords(shape[0])
    h = _unit_coords(shape[-1])
    depth = _unit_coords(shape[1]) if len(shape) == 3 else np.zeros(1)
    V, D, H = np.meshgrid(v, depth, h, indexing="ij")
    image = np.zeros(V.shape)
    for (value, a, b, x0, y0, phi), c in zip(_SHEPP_LOGAN_2D, _SHEPP_LOGAN_DEPTH):
        cos, sin = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        dx, dy = H - x0, V - y0
        # Coordinates in the ellipse's own frame (rotated by phi counter-clockwise).
        u, w = dx * cos + dy * sin, -dx * sin + dy * cos
        inside = (u / a) ** 2 + (w / b) ** 2 + (D / c) ** 2 <= 1.0
        image += value * inside
    image = np.clip(image, 0.0, 1.0)
    image = image[:, 0, :] if len(shape) == 2 else image
    return jnp.asarray(image, dtype=dtype)


def random_blobs(
    key: jax.Array,
    shape: Sequence[int],
    n_blobs: int,
    *,
    sigma_range: tuple[float, float] | None = None,
    amplitude_range: tuple[float, float] = (0.5, 1.0),
    dtype=jnp.float32,
) -> jax.Array:
    """A sum of isotropic Gaussian blobs at random positions, widths and heights.

    Args:
        key: PRNG key (`jax.random.key`).
        shape: array shape, any number of axes ((z, x) images, (z, y, x) volumes).
        n_blobs: number of blobs (at least 1).
        sigma_range: (min, max) standard deviation in pixels, drawn uniformly per blob; by default
            3 % to 8 % of the shortest side, at least 1 pixel.
        amplitude_range: (min, max) peak height of each blob, drawn uniformly; must be positive.
        dtype: floating dtype of the result.

    Returns:
        A smooth, positive array of `shape`. Blob centres are drawn uniformly at least three
        standard deviations away from every edge (where the axis is long enough), so each blob
        keeps more than 99 % of its mass inside the array.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must have positive sizes, got {shape}")
    if int(n_blobs) < 1:
        raise ValueError(f"n_blobs must be at least 1, got {n_blobs}")
    if sigma_range is None:
        sigma_range = (max(1.0, 0.03 * min(shape)), max(1.0, 0.08 * min(shape)))
    s_lo, s_hi = (float(s) for s in sigma_range)
    if not 0.0 < s_lo <= s_hi:
        raise ValueError(f"sigma_range must satisfy 0 < min <= max, got {sigma_range}")
    a_lo, a_hi = (float(a) for a in amplitude_range)
    if not 0.0 < a_lo <= a_hi:
        raise ValueError(f"amplitude_range must satisfy 0 < min <= max, got {amplitude_range}")
    return _random_blobs(key, shape, int(n_blobs), s_lo, s_hi, a_lo, a_hi, jnp.dtype(dtype))


def _random_blobs(key, shape, n_blobs, s_lo, s_hi, a_lo, a_hi, dtype):
    k_sigma, k_amp, k_pos = jax.random.split(key, 3)
    sigma = jax.random.uniform(k_sigma, (n_blobs,), dtype, s_lo, s_hi)
    amp = jax.random.uniform(k_amp, (n_blobs,), dtype, a_lo, a_hi)
    pos_keys = jax.random.split(k_pos, len(shape))
    # A Gaussian is separable: each blob is the outer product of one profile per axis.
    profiles = []
    for k_axis, n in zip(pos_keys, shape):
        margin = jnp.minimum(3.0 * sigma, (n - 1) / 2.0)
        centre = jax.random.uniform(k_axis, (n_blobs,), dtype, margin, (n - 1) - margin)
        grid = jnp.arange(n, dtype=dtype)
        profiles.append(jnp.exp(-0.5 * ((grid[None, :] - centre[:, None]) / sigma[:, None]) ** 2))
    letters = "abcdefghijklmnopqrstuvwxyz"[: len(shape)]
    spec = ",".join(f"B{c}" for c in letters) + "->" + letters
    return jnp.einsum(spec, amp[:, None] * profiles[0], *profiles[1:])
