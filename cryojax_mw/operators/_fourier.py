"""Fourier-domain operators: missing-wedge and missing-pyramid masks, the masking operator, the
data-consistency projection, and the periodic-plus-smooth decomposition.

Layout: masks live on the half spectrum of `jnp.fft.rfftn` over every axis of the array, that is
shape (..., n_x // 2 + 1) in unshifted (numpy) order. Frequencies are physical per axis
(`np.fft.fftfreq(n)` on the full axes, `np.fft.rfftfreq(n_x)` on the last), in cycles per voxel,
so non-cubic shapes get the right angles.

Geometry (same as `TiltProjector`): volumes are (z, y, x), z is the beam at 0 deg, y the tilt axis;
2D images are (z, x). A voxel at (z, x) projects at tilt theta onto t = x cos(theta) + z sin(theta),
so by the central-slice theorem the projection at theta measures the plane of Fourier space that
contains the ky axis and the direction (kz, kx) = (sin(theta), cos(theta)).
"""

from __future__ import annotations

import functools
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import AbstractSelfAdjointOperator, as_float


def _half_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:-1]) + (shape[-1] // 2 + 1,)


def half_spectrum_weights(shape) -> np.ndarray:
    """How many full-spectrum coefficients each rfftn coefficient of `shape` stands for, along
    the last axis (1 for the zero and, for even sizes, the Nyquist column; 2 elsewhere): with
    them, sum |x|^2 = sum w |rfftn(x)|^2 / x.size (Parseval on the half spectrum)."""
    n = int(shape[-1])
    w = np.full(n // 2 + 1, 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _check_volume_shape(shape, ndims: tuple[int, ...], what: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{what}: shape must be a tuple of ints, got {shape!r}") from None
    if len(shape) not in ndims or min(shape) < 1:
        names = " or ".join({2: "(z, x)", 3: "(z, y, x)"}[d] for d in ndims)
        raise ValueError(f"{what}: shape must be {names} with positive sizes, got {shape}")
    return shape


def _check_tilt_range(tilt_min_deg, tilt_max_deg, what: str) -> tuple[float, float]:
    lo, hi = float(tilt_min_deg), float(tilt_max_deg)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{what}: tilt range must be finite degrees, got ({lo}, {hi})")
    if lo > hi:
        raise ValueError(f"{what}: tilt range is empty, min {lo} > max {hi} degrees; swap them")
    if lo <= -90.0 or hi >= 90.0:
        raise ValueError(
            f"{what}: tilt range ({lo}, {hi}) must lie strictly between -90 and 90 degrees"
        )
    return lo, hi


def _check_soft_edge(soft_edge_deg) -> float:
    soft = float(soft_edge_deg)
    if not (math.isfinite(soft) and soft >= 0.0):
        raise ValueError(f"soft_edge_deg must be a finite number >= 0 degrees, got {soft}")
    return soft


def _alias_frequencies(shape: tuple[int, ...]):
    """Every sign choice of the Nyquist frequencies on the half-spectrum grid.

    The Nyquist coefficient of an even axis stands for both +1/2 and -1/2 cycles per voxel; the
    masks are evaluated at each representative and the minimum kept, which also makes them
    point-symmetric (m(k) = m(-k)) on the self-conjugate planes of the half spectrum.
    """
    base = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    options = []
    for f, n in zip(base, shape):
        if n % 2 == 0:
            # Index n // 2 is the Nyquist entry of both fftfreq and rfftfreq.
            flipped = f.copy()
            flipped[n // 2] *= -1.0
            options.append((f, flipped))
        else:
            options.append((f,))
    for choice in itertools.product(*options):
        yield np.meshgrid(*choice, indexing="ij", sparse=True)


def _wedge(k_beam, k_perp, lo, hi, soft):
    """Observed weight of frequencies for one tilt series (tilt axis orthogonal to both inputs).

    `k_beam` is the beam component (kz) and `k_perp` the in-plane component orthogonal to the tilt
    axis; the projection at theta measures the direction (k_beam, k_perp) = (sin, cos)(theta).
    A frequency's direction is a line (k and -k are measured together), so its angle is taken
    modulo 180 degrees; the signed angular distance into [lo, hi] decides the weight.
    """
    phi = np.degrees(np.arctan2(k_beam, k_perp))
    width = hi - lo
    u = np.mod(phi - lo, 180.0)
    inside = np.minimum(u, width - u)
    outside = -np.minimum(u - width, 180.0 - u)
    s = np.where(u <= width, inside, outside)
    if soft > 0.0:
        # Raised cosine across [boundary - soft/2, boundary + soft/2]; 1/2 on the boundary.
        w = 0.5 * (1.0 + np.sin(np.pi * np.clip(s / soft, -0.5, 0.5)))
    else:
        # Tolerance so grid frequencies lying exactly on a boundary tilt count as observed.
        w = (s >= -1e-9).astype(np.float64)
    # Every projection contains the tilt axis (and DC): k_beam = k_perp = 0 is always observed.
    return np.where((k_beam == 0) & (k_perp == 0), 1.0, w)


def _wedge_mask(shape, beam_axis, perp_axis, lo, hi, soft) -> np.ndarray:
    """`_wedge` on the half spectrum of `shape`, Nyquist aliases combined by their minimum."""
    mask = None
    for k in _alias_frequencies(shape):
        m = _wedge(k[beam_axis], k[perp_axis], lo, hi, soft)
        mask = m if mask is None else np.minimum(mask, m)
    return np.broadcast_to(mask, _half_shape(shape))


def missing_wedge_mask(
    shape: tuple[int, ...],
    tilt_min_deg: float,
    tilt_max_deg: float,
    *,
    soft_edge_deg: float = 0.0,
    dtype=jnp.float32,
) -> jax.Array:
    """Fourier coverage of a single-axis tilt series (tilt axis y) on the rfftn half spectrum.

    The projection at tilt theta measures the central plane containing ky and the direction
    (kz, kx) = (sin(theta), cos(theta)), the convention of `TiltProjector`. A frequency is
    observed when the angle of its (kz, kx) direction, taken modulo 180 degrees, lies in
    [tilt_min_deg, tilt_max_deg]; the ky axis (kz = kx = 0), DC included, is always observed.
    Nyquist coefficients of even axes count as observed only where all their aliases (+-1/2) are,
    so the mask is point-symmetric on the self-conjugate planes and `FourierMaskOperator` keeps it.
    The mask is built with NumPy from concrete angles: build it once, outside `jit`.

    Args:
        shape: real-space shape, (z, y, x) for volumes or (z, x) for 2D images.
        tilt_min_deg: lowest tilt angle in degrees, > -90.
        tilt_max_deg: highest tilt angle in degrees, < 90 and >= tilt_min_deg (asymmetric ranges
            are fine).
        soft_edge_deg: width in degrees of a raised-cosine edge centred on each boundary angle
            (weight 1/2 on the boundary, 1 at soft_edge_deg / 2 inside, 0 at soft_edge_deg / 2
            outside); 0 gives a binary mask.
        dtype: floating dtype of the result.

    Returns:
        Mask of shape `shape[:-1] + (shape[-1] // 2 + 1,)`, 1 = observed, 0 = missing.
    """
    shape = _check_volume_shape(shape, (2, 3), "missing_wedge_mask")
    lo, hi = _check_tilt_range(tilt_min_deg, tilt_max_deg, "missing_wedge_mask")
    soft = _check_soft_edge(soft_edge_deg)
    return jnp.asarray(_wedge_mask(shape, 0, -1, lo, hi, soft), dtype=dtype)


def missing_pyramid_mask(
    shape: tuple[int, ...],
    tilt_range_y_deg: tuple[float, float],
    tilt_range_x_deg: tuple[float, float],
    *,
    soft_edge_deg: float = 0.0,
    dtype=jnp.float32,
) -> jax.Array:
    """Fourier coverage of a dual-axis tilt series: the union of two wedges (3D volumes only).

    The first series tilts about y exactly as in `missing_wedge_mask`. The second tilts about x:
    its projection at theta maps a voxel at (z, y) to t = y cos(theta) + z sin(theta), so it
    measures the plane containing kx and the direction (kz, ky) = (sin(theta), cos(theta)).
    The observed weight is the maximum of the two wedges' weights.

    Args:
        shape: real-space volume shape (z, y, x).
        tilt_range_y_deg: (min, max) tilt angles in degrees of the series about y.
        tilt_range_x_deg: (min, max) tilt angles in degrees of the series about x.
        soft_edge_deg: raised-cosine edge width in degrees, as in `missing_wedge_mask`.
        dtype: floating dtype of the result.

    Returns:
        Mask of shape (z, y, x // 2 + 1), 1 = observed, 0 = missing.
    """
    shape = _check_volume_shape(shape, (3,), "missing_pyramid_mask")
    ranges = []
    named = (("tilt_range_y_deg", tilt_range_y_deg), ("tilt_range_x_deg", tilt_range_x_deg))
    for name, r in named:
        if np.shape(r) != (2,):
            raise ValueError(f"missing_pyramid_mask: {name} must be a (min, max) pair, got {r!r}")
        ranges.append(_check_tilt_range(r[0], r[1], f"missing_pyramid_mask {name}"))
    soft = _check_soft_edge(soft_edge_deg)
    about_y = _wedge_mask(shape, 0, 2, *ranges[0], soft)
    about_x = _wedge_mask(shape, 0, 1, *ranges[1], soft)
    return jnp.asarray(np.maximum(about_y, about_x), dtype=dtype)


def _negate_frequency(a: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """Index map k -> -k (mod n) along `axes`."""
    return jnp.roll(jnp.flip(a, axis=axes), 1, axis=axes)


@functools.partial(jax.jit, static_argnums=1)
def _symmetrize_half_spectrum(mask: jax.Array, n_last: int) -> jax.Array:
    """Replace the mask on the self-conjugate planes (kx = 0 and, for even n_x, Nyquist) by
    (m(k) + m(-k)) / 2, the part that `irfftn` of a Hermitian spectrum actually applies there."""
    lead = tuple(range(mask.ndim - 1))
    cols = [0] + ([n_last // 2] if n_last % 2 == 0 and n_last > 1 else [])
    for c in cols:
        plane = mask[..., c]
        mask = mask.at[..., c].set(0.5 * (plane + _negate_frequency(plane, lead)))
    return mask


def _as_real_mask(mask, what) -> jax.Array:
    mask = jnp.asarray(mask)
    if jnp.iscomplexobj(mask):
        raise ValueError(f"{what}: mask must be real (a complex mask is not self-adjoint)")
    return mask if jnp.issubdtype(mask.dtype, jnp.floating) else mask.astype(jnp.float32)


class FourierMaskOperator(AbstractSelfAdjointOperator):
    """x -> irfftn(mask * rfftn(x)): a real Fourier multiplier, exactly self-adjoint.

    Args:
        mask: real weights on the rfftn half spectrum of `shape`, shape
            `shape[:-1] + (shape[-1] // 2 + 1,)` (e.g. from `missing_wedge_mask`).
        shape: real-space shape of the arrays the operator acts on (any number of axes; the
            transform runs over all of them).
        dtype: default dtype reported by `in_structure`/`out_structure`.

    On the self-conjugate planes of the half spectrum (kx = 0 and, for even n_x, the Nyquist
    column) a coefficient and its mirror k -> -k are stored together; a mask that differs there
    cannot be applied to a real array as given. The constructor therefore replaces the mask on
    those planes by (m(k) + m(-k)) / 2, the multiplier `irfftn` would apply to the Hermitian part
    anyway, which makes the operator exactly self-adjoint for any real mask. Masks that are
    already point-symmetric (all masks built by this module) are kept unchanged, so a binary mask
    gives an orthogonal projection.
    """

    mask: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(self, mask, shape, dtype=jnp.float32):
        try:
            shape = tuple(int(s) for s in shape)
        except TypeError:
            raise ValueError(
                f"FourierMaskOperator: shape must be a tuple of ints, got {shape!r}"
            ) from None
        if len(shape) == 0 or min(shape) < 1:
            raise ValueError(f"FourierMaskOperator: shape must have positive sizes, got {shape}")
        mask = _as_real_mask(mask, "FourierMaskOperator")
        if mask.shape != _half_shape(shape):
            raise ValueError(
                f"FourierMaskOperator: mask has shape {tuple(mask.shape)}, expected the rfftn "
                f"half spectrum {_half_shape(shape)} of shape {shape}"
            )
        self.mask = _symmetrize_half_spectrum(mask, shape[-1])
        self.shape = shape
        self.dtype = dtype

    def mv(self, x):
        x = as_float(x)
        if tuple(x.shape) != self.shape:
            raise ValueError(
                f"FourierMaskOperator: input has shape {tuple(x.shape)}, expected {self.shape}"
            )
        spec = jnp.fft.rfftn(x)
        return jnp.fft.irfftn(self.mask.astype(x.dtype) * spec, s=self.shape).astype(x.dtype)


@jax.jit
def project_observed(x: jax.Array, y: jax.Array, mask: jax.Array) -> jax.Array:
    """Data consistency: the Fourier coefficients of `y` where observed, of `x` elsewhere.

    Computes x + irfftn(mask * rfftn(y - x)) over the last `mask.ndim` axes, so leading batch axes
    of `x` and `y` are allowed. With a soft mask each coefficient is the blend
    mask * y_hat + (1 - mask) * x_hat. The mask is symmetrised on the self-conjugate planes as in
    `FourierMaskOperator`.

    Args:
        x: current estimate, shape (..., *shape).
        y: array carrying the measured coefficients, same shape as `x`.
        mask: real weights on the rfftn half spectrum of `shape`, 1 = take y, 0 = keep x.

    Returns:
        Array of the shape and dtype of `x`.
    """
    x, y = as_float(x), as_float(y)
    if x.shape != y.shape:
        raise ValueError(f"project_observed: x has shape {x.shape} but y has shape {y.shape}")
    mask = _as_real_mask(mask, "project_observed")
    nd = mask.ndim
    if nd == 0 or x.ndim < nd or _half_shape(x.shape[x.ndim - nd:]) != mask.shape:
        raise ValueError(
            f"project_observed: mask shape {tuple(mask.shape)} is not the rfftn half spectrum of "
            f"the last {nd} axes of x, shape {x.shape}"
        )
    shape = x.shape[x.ndim - nd:]
    axes = tuple(range(-nd, 0))
    mask = _symmetrize_half_spectrum(mask, shape[-1]).astype(x.dtype)
    delta = jnp.fft.irfftn(mask * jnp.fft.rfftn(y - x, axes=axes), s=shape, axes=axes)
    return x + delta.astype(x.dtype)


@jax.jit
def periodic_plus_smooth(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Periodic-plus-smooth decomposition (Moisan 2011) of an n-D array (2D images, 3D volumes).

    x = periodic + smooth, where `smooth` solves the periodic discrete Poisson problem
    Laplacian(smooth) = v with v the boundary-jump image: along each axis, v gets
    x[last] - x[first] on the first slice and x[first] - x[last] on the last slice. `smooth` has
    zero mean; `periodic` has nearly matching opposite borders, so its FFT is free of the cross
    artifacts that the wrap-around jumps of `x` cause.

    Args:
        x: real array with at least one axis.

    Returns:
        (periodic, smooth), both of the shape and floating dtype of `x`.
    """
    x = as_float(x)
    if x.ndim == 0:
        raise ValueError("periodic_plus_smooth: input must have at least one axis")
    v = jnp.zeros_like(x)
    for a in range(x.ndim):
        first = jax.lax.index_in_dim(x, 0, a)
        last = jax.lax.index_in_dim(x, -1, a)
        jump = last - first
        idx0 = (slice(None),) * a + (slice(0, 1),)
        idx1 = (slice(None),) * a + (slice(x.shape[a] - 1, x.shape[a]),)
        v = v.at[idx0].add(jump).at[idx1].add(-jump)
    # Eigenvalues of the periodic discrete Laplacian on the half-spectrum grid.
    denom = jnp.zeros(_half_shape(x.shape), x.dtype)
    for a, n in enumerate(x.shape):
        m = n // 2 + 1 if a == x.ndim - 1 else n
        k = np.arange(m)
        lam = (2.0 * np.cos(2.0 * np.pi * k / n) - 2.0).astype(np.dtype(x.dtype))
        denom = denom + jnp.asarray(lam).reshape((m,) + (1,) * (x.ndim - 1 - a))
    dc = (0,) * x.ndim
    denom = denom.at[dc].set(1.0)
    spec = jnp.fft.rfftn(v) / denom
    spec = spec.at[dc].set(0.0)
    smooth = jnp.fft.irfftn(spec, s=x.shape).astype(x.dtype)
    return x - smooth, smooth
