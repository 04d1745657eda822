"""Rotations in RELION's ZYZ Euler convention, uniform random orientations, and volume rotation.

Convention (RELION's `Euler_angles2matrix`): angles (rot, tilt, psi) in degrees give
A = Rz(psi) Ry(tilt) Rz(rot) with the coordinate-frame rotations Rz(a) = [[c, s, 0], [-s, c, 0],
[0, 0, 1]] and Ry(b) = [[c, 0, -s], [0, 1, 0], [s, 0, c]], acting on (x, y, z) vectors with
x = array axis 2, y = axis 1, z = axis 0. A particle in orientation A is the template turned by A:
particle(r) = template(Aᵀ r), r = (x, y, z) measured from the particle centre; projecting the
reference with A gives the particle's image, as in RELION.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def euler_zyz_to_matrix(angles_deg) -> np.ndarray:
    """RELION's rotation matrix A for Euler angles (rot, tilt, psi).

    Args:
        angles_deg: array (..., 3) of (rot, tilt, psi) in degrees.

    Returns:
        float64 array (..., 3, 3) acting on (x, y, z) column vectors.
    """
    angles = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    if angles.shape[-1:] != (3,):
        raise ValueError(f"Euler angles need a last axis of 3 (rot, tilt, psi), got {angles.shape}")
    ca, cb, cg = np.cos(angles[..., 0]), np.cos(angles[..., 1]), np.cos(angles[..., 2])
    sa, sb, sg = np.sin(angles[..., 0]), np.sin(angles[..., 1]), np.sin(angles[..., 2])
    rows = [
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def matrix_to_euler_zyz(matrix) -> np.ndarray:
    """Euler angles (rot, tilt, psi) in degrees of RELION rotation matrices; the inverse of
    `euler_zyz_to_matrix` with tilt in [0, 180] and rot, psi in (-180, 180] (at tilt 0 or 180
    only rot + psi or rot - psi is defined: psi is set to 0)."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices need shape (..., 3, 3), got {a.shape}")
    tilt = np.arccos(np.clip(a[..., 2, 2], -1.0, 1.0))
    gimbal = np.abs(np.sin(tilt)) < 1e-9
    # At tilt 0 the matrix is Rz(rot + psi), at tilt 180 it is -Rz(rot - psi) in its x-y block.
    flip = np.where(a[..., 2, 2] < 0, -1.0, 1.0)
    rot = np.where(
        gimbal,
        np.arctan2(flip * a[..., 0, 1], flip * a[..., 0, 0]),
        np.arctan2(a[..., 2, 1], a[..., 2, 0]),
    )
    psi = np.where(gimbal, 0.0, np.arctan2(a[..., 1, 2], -a[..., 0, 2]))
    return np.rad2deg(np.stack([rot, tilt, psi], axis=-1))


def random_euler_zyz(rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` orientations drawn uniformly on SO(3) (Haar measure), as RELION Euler angles in degrees.

    rot and psi are uniform on [-180, 180) and cos(tilt) is uniform on [-1, 1], which is the Haar
    measure in ZYZ angles (its density is proportional to sin(tilt)).
    """
    rot = rng.uniform(-180.0, 180.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(-180.0, 180.0, n)
    return np.stack([rot, tilt, psi], axis=-1)


@functools.partial(jax.jit, static_argnames=("out_size",))
def rotate_with_matrix(volume: jax.Array, matrix: jax.Array, out_size: int) -> jax.Array:
    """`rotate_volume` for JAX code: a cubic volume turned by the rotation matrix `matrix` (as
    from `euler_zyz_to_matrix`), particle(r) = volume(Aᵀ r), trilinear, zero outside, into an
    (out_size,)*3 box centred on the same point; jitted, traceable and differentiable."""
    centre_in = (jnp.asarray(volume.shape, matrix.dtype) - 1) / 2
    offsets = jnp.arange(out_size, dtype=matrix.dtype) - (out_size - 1) / 2
    z, y, x = jnp.meshgrid(offsets, offsets, offsets, indexing="ij")
    r_xyz = jnp.stack([x, y, z], axis=-1)
    # particle(r) = template(Aᵀ r): row vector r times A is (Aᵀ r)ᵀ.
    s_xyz = r_xyz @ matrix
    coords = [
        s_xyz[..., 2] + centre_in[0],
        s_xyz[..., 1] + centre_in[1],
        s_xyz[..., 0] + centre_in[2],
    ]
    return jax.scipy.ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)


def rotate_volume(volume, angles_deg, out_size: int | None = None) -> np.ndarray:
    """Turn a cubic template into orientation (rot, tilt, psi) with trilinear interpolation.

    Args:
        volume: (n, n, n) array, rotated about its centre (n - 1) / 2.
        angles_deg: (rot, tilt, psi) in degrees (RELION convention, see the module docstring).
        out_size: edge of the cubic output box, centred on the same point (default n). Content
            farther than (out_size - 1) / 2 voxels from the centre is cut off.

    Returns:
        float32 array (out_size,)*3 with particle(r) = template(Aᵀ r); zero outside the template.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"rotate_volume needs a 3D volume, got shape {volume.shape}")
    size = volume.shape[0] if out_size is None else int(out_size)
    matrix = jnp.asarray(euler_zyz_to_matrix(angles_deg), jnp.float32)
    return np.asarray(rotate_with_matrix(jnp.asarray(volume), matrix, size))
