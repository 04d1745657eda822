"""Image-quality metrics: PSNR, SSIM, the constrained correlation coefficient and (constrained) FSC.

All functions take JAX or NumPy arrays, 2D (z, x) images or 3D (z, y, x) volumes, compute in
jax.numpy in the inputs' floating dtype (float32 by default, float64 kept), and can be jitted.

Fourier regions use the rfftn half-spectrum layout that the project's Fourier masks use: shape
(..., n_x // 2 + 1), unshifted NumPy FFT order (zero frequency at index 0 on every axis). A real
map's spectrum is Hermitian, so the half spectrum holds every coefficient once except columns
1 .. ceil(n_x / 2) - 1 of the last axis, each of which also stands for its mirror -k; sums over
the half spectrum weight those columns by 2 so that they equal sums over the full spectrum.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Wang et al. 2004 stability constants, and the Gaussian window's reach in standard deviations
# (3.5 sigma gives the paper's 11-tap window for sigma = 1.5).
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_TRUNCATE = 3.5


def _float_pair(estimate, reference) -> tuple[jax.Array, jax.Array]:
    """Both arrays in one floating dtype (at least float32), after checking their shapes agree."""
    x = jnp.asarray(estimate)
    y = jnp.asarray(reference)
    if x.shape != y.shape:
        raise ValueError(
            f"estimate has shape {x.shape} but reference has shape {y.shape}; pass arrays of the "
            "same shape"
        )
    if jnp.iscomplexobj(x) or jnp.iscomplexobj(y):
        raise ValueError("metrics compare real-valued maps; pass real arrays")
    dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
    return x.astype(dtype), y.astype(dtype)


def _default_range(reference: jax.Array, data_range: jax.Array | None) -> jax.Array:
    if data_range is None:
        return jnp.max(reference) - jnp.min(reference)
    return data_range


def psnr(estimate, reference, data_range=None) -> jax.Array:
    """Peak signal-to-noise ratio in decibels, 10 log10(data_range^2 / MSE).

    Args:
        estimate: the map to score.
        reference: the ground truth, same shape.
        data_range: the peak-to-peak range L of the signal; default max(reference) - min(reference).

    Returns:
        Scalar PSNR in dB (inf when the maps are equal).
    """
    x, y = _float_pair(estimate, reference)
    return _psnr(x, y, None if data_range is None else jnp.asarray(data_range, x.dtype))


@jax.jit
def _psnr(x: jax.Array, y: jax.Array, data_range) -> jax.Array:
    peak = _default_range(y, data_range)
    mse = jnp.mean((x - y) ** 2)
    return 10.0 * jnp.log10(peak**2 / mse)


def ssim(estimate, reference, data_range=None, sigma: float = 1.5) -> jax.Array:
    """Mean structural similarity with a Gaussian window (Wang et al. 2004), 2D or 3D.

    Local means, variances and covariance are Gaussian-weighted averages (separable filter,
    standard deviation `sigma` voxels, truncated at 3.5 sigma: 11 taps for sigma = 1.5), with
    population (not sample) variances and K1 = 0.01, K2 = 0.03. The SSIM map is computed where
    the window lies fully inside the array (no padding) and averaged; this equals scikit-image's
    `structural_similarity(..., gaussian_weights=True, use_sample_covariance=False)`.

    Args:
        estimate: the map to score, 2D or 3D.
        reference: the ground truth, same shape.
        data_range: the dynamic range L in C1 = (K1 L)^2, C2 = (K2 L)^2; default
            max(reference) - min(reference).
        sigma: window standard deviation in voxels. It sets the window size, so it must be a
            concrete number (static under jit).

    Returns:
        Scalar mean SSIM, at most 1, equal to 1 for identical maps.
    """
    x, y = _float_pair(estimate, reference)
    if x.ndim not in (2, 3):
        raise ValueError(f"ssim takes 2D or 3D arrays, got shape {x.shape}")
    try:
        sigma = float(sigma)
    except jax.errors.ConcretizationTypeError:
        raise ValueError(
            "ssim's sigma sets the window size and must be a concrete number; mark it static "
            "under jit (static_argnames='sigma')"
        ) from None
    if not sigma > 0:
        raise ValueError(f"ssim's sigma must be positive, got {sigma}")
    radius = int(_SSIM_TRUNCATE * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    window = jnp.asarray(taps / taps.sum(), dtype=x.dtype)
    if min(x.shape) < window.size:
        raise ValueError(
            f"ssim with sigma={sigma} needs at least {window.size} voxels along every axis, got "
            f"shape {x.shape}; pass a larger array or a smaller sigma"
        )

    return _ssim(x, y, None if data_range is None else jnp.asarray(data_range, x.dtype), window)


@jax.jit
def _ssim(x: jax.Array, y: jax.Array, data_range, window: jax.Array) -> jax.Array:
    peak = _default_range(y, data_range)
    c1 = (_SSIM_K1 * peak) ** 2
    c2 = (_SSIM_K2 * peak) ** 2
    # Variances are shift invariant: subtracting a common offset first keeps E[x^2] - E[x]^2 from
    # cancelling catastrophically in float32 for maps far from zero.
    offset = jnp.mean(y)
    xc = x - offset
    yc = y - offset
    moments = jnp.stack([xc, yc, xc * xc, yc * yc, xc * yc])
    for axis in range(1, moments.ndim):
        moments = _filter_valid(moments, window, axis)
    mx, my, mxx, myy, mxy = moments
    var_x = mxx - mx * mx
    var_y = myy - my * my
    cov_xy = mxy - mx * my
    mean_x = mx + offset
    mean_y = my + offset
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    return jnp.mean(ssim_map)


def _filter_valid(a: jax.Array, window: jax.Array, axis: int) -> jax.Array:
    """Correlate `a` with a 1D window along `axis`, keeping only fully covered positions."""
    n_out = a.shape[axis] - window.size + 1
    out = window[0] * jax.lax.slice_in_dim(a, 0, n_out, axis=axis)
    for j in range(1, window.size):
        out = out + window[j] * jax.lax.slice_in_dim(a, j, j + n_out, axis=axis)
    return out


def _half_spectrum_weights(shape: tuple[int, ...], dtype) -> jax.Array:
    """Multiplicity of each rfftn last-axis column in the full spectrum (1 or 2)."""
    n_x = shape[-1]
    weights = np.ones(n_x // 2 + 1)
    weights[1 : math.ceil(n_x / 2)] = 2.0
    return jnp.asarray(weights, dtype=dtype)


def _region_weights(region, full_shape: tuple[int, ...], dtype) -> jax.Array:
    """A region in rfftn layout as real weights, after checking it fits the half spectrum."""
    half_shape = tuple(full_shape[:-1]) + (full_shape[-1] // 2 + 1,)
    region = jnp.asarray(region)
    try:
        fits = np.broadcast_shapes(region.shape, half_shape) == half_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"region has shape {region.shape} but the rfftn half spectrum of a {full_shape} map "
            f"has shape {half_shape} (last axis n_x // 2 + 1); build the region in that layout"
        )
    return region.astype(dtype)


def ccc(estimate, reference, region=None) -> jax.Array:
    """Constrained correlation coefficient over a Fourier region W (Moebel's thesis, eq. 2.24).

    CCC = Re sum_W F(x)[k] F(y)[k]* / sqrt(sum_W |F(x)[k]|^2 sum_W |F(y)[k]|^2), with the sums
    over the coefficients k of the full spectrum inside W. The zero frequency counts when W
    holds it; a boolean region without it gives the Pearson correlation of the band-passed maps.

    Args:
        estimate: the map to score, any number of dimensions.
        reference: the ground truth, same shape.
        region: boolean mask, or non-negative real weights w(k) multiplying each term, in rfftn
            half-spectrum layout (see the module docstring), broadcastable to
            `shape[:-1] + (shape[-1] // 2 + 1,)`. It stands for the Hermitian-symmetric full
            region. None: the whole spectrum.

    Returns:
        Scalar in [-1, 1] (nan when either map has no energy in W).
    """
    x, y = _float_pair(estimate, reference)
    if region is not None:
        region = _region_weights(region, x.shape, x.dtype)
    return _ccc(x, y, region)


@jax.jit
def _ccc(x: jax.Array, y: jax.Array, region: jax.Array | None) -> jax.Array:
    fx = jnp.fft.rfftn(x)
    fy = jnp.fft.rfftn(y)
    weights = _half_spectrum_weights(x.shape, x.dtype)
    if region is not None:
        weights = weights * region
    cross = jnp.sum(weights * (fx.real * fy.real + fx.imag * fy.imag))
    energy_x = jnp.sum(weights * (fx.real**2 + fx.imag**2))
    energy_y = jnp.sum(weights * (fy.real**2 + fy.imag**2))
    return cross / jnp.sqrt(energy_x * energy_y)


class FSCResult(NamedTuple):
    """Fourier shell correlation curve and the resolutions read off it.

    Attributes:
        frequency: shell centres, cycles per Angstrom (cycles per voxel when no voxel size was
            given), from 0 to Nyquist.
        fsc: correlation in each shell (nan for a shell without coefficients).
        n_coefficients: full-spectrum Fourier coefficients in each shell (inside the region when
            one was given); the FSC of pure noise has a standard deviation of about
            1 / sqrt(n_coefficients).
        resolution_0143: resolution at the first crossing of the FSC below 0.143, in Angstrom (in
            voxels without a voxel size), linearly interpolated between shells; nan when the FSC
            never drops below the threshold up to Nyquist (the resolution is then at least
            2 voxel sizes), inf when it is already below the threshold in the first shell after
            the zero frequency.
        resolution_05: the same for the 0.5 threshold.
    """

    frequency: jax.Array
    fsc: jax.Array
    n_coefficients: jax.Array
    resolution_0143: jax.Array
    resolution_05: jax.Array


def fsc(a, b, voxel_size=None, region=None, n_shells: int | None = None) -> FSCResult:
    """Fourier shell correlation of two maps, constrained to a Fourier region if one is given.

    Shell i collects the coefficients whose normalised radius |k| = sqrt(sum_d (k_d / n_d)^2)
    (cycles per voxel) rounds to i h; the default width h = 1 / min(shape) is one Fourier pixel
    along the shortest axis, so non-cubic maps get full, evenly spaced shells. Shells run from 0
    to Nyquist (0.5 cycles per voxel); corners beyond it are left out.

    Args:
        a: first map, 2D or 3D (e.g. a half-map, or an estimate).
        b: second map, same shape (the other half-map, or the ground truth).
        voxel_size: voxel size in Angstrom (a positive number or scalar array), or None to report
            frequencies per voxel and resolutions in voxels.
        region: boolean mask or non-negative real weights in rfftn half-spectrum layout, as in
            `ccc`: only coefficients inside it count (the constrained FSC). None: all.
        n_shells: number of shells, at least 2, evenly covering 0 .. Nyquist (width
            0.5 / (n_shells - 1)) instead of the default one-pixel shells. Static under jit.

    Returns:
        An `FSCResult` (see its attributes).
    """
    x, y = _float_pair(a, b)
    if x.ndim not in (2, 3):
        raise ValueError(f"fsc takes 2D or 3D maps, got shape {x.shape}")
    if n_shells is None:
        width = 1.0 / min(x.shape)
        n_shells = min(x.shape) // 2 + 1
    else:
        if int(n_shells) != n_shells or n_shells < 2:
            raise ValueError(f"n_shells must be an integer of at least 2, got {n_shells}")
        n_shells = int(n_shells)
        width = 0.5 / (n_shells - 1)

    if region is not None:
        region = _region_weights(region, x.shape, x.dtype)
    scale = jnp.asarray(1.0 if voxel_size is None else voxel_size, dtype=x.dtype)
    return _fsc(x, y, scale, region, n_shells=n_shells, width=width)


@functools.partial(jax.jit, static_argnames=("n_shells", "width"))
def _fsc(
    x: jax.Array,
    y: jax.Array,
    scale: jax.Array,
    region: jax.Array | None,
    n_shells: int,
    width: float,
) -> FSCResult:
    # `width` is fixed by the shape and n_shells, so being static costs no recompilations.
    fx = jnp.fft.rfftn(x)
    fy = jnp.fft.rfftn(y)
    shells = _shell_index(x.shape, width, x.dtype).ravel()
    multiplicity = jnp.broadcast_to(_half_spectrum_weights(x.shape, x.dtype), fx.shape)
    weights = multiplicity
    inside = jnp.ones(fx.shape, dtype=bool)
    if region is not None:
        weights = weights * region
        inside = jnp.broadcast_to(region != 0, fx.shape)

    def per_shell(values):
        # Shell indices >= n_shells (beyond Nyquist) are dropped by segment_sum.
        return jax.ops.segment_sum(values.ravel(), shells, num_segments=n_shells)

    cross = per_shell(weights * (fx.real * fy.real + fx.imag * fy.imag))
    energy_x = per_shell(weights * (fx.real**2 + fx.imag**2))
    energy_y = per_shell(weights * (fy.real**2 + fy.imag**2))
    n_coefficients = per_shell(jnp.where(inside, multiplicity, 0).astype(jnp.int32))
    curve = jnp.where(n_coefficients > 0, cross / jnp.sqrt(energy_x * energy_y), jnp.nan)

    cycles_per_voxel = jnp.arange(n_shells, dtype=x.dtype) * width
    return FSCResult(
        frequency=cycles_per_voxel / scale,
        fsc=curve,
        n_coefficients=n_coefficients,
        resolution_0143=scale / _crossing(cycles_per_voxel, curve, 0.143),
        resolution_05=scale / _crossing(cycles_per_voxel, curve, 0.5),
    )


def _shell_index(shape: tuple[int, ...], width: float, dtype) -> jax.Array:
    """Shell of every rfftn coefficient: its normalised radius in units of `width`, rounded."""
    axes = [jnp.fft.fftfreq(n, dtype=dtype) for n in shape[:-1]]
    axes.append(jnp.fft.rfftfreq(shape[-1], dtype=dtype))
    grids = jnp.meshgrid(*axes, indexing="ij", sparse=True)
    radius = jnp.sqrt(sum(g**2 for g in grids))
    return jnp.floor(radius / width + 0.5).astype(jnp.int32)


def _crossing(frequency: jax.Array, curve: jax.Array, threshold: float) -> jax.Array:
    """Frequency where `curve` first drops below `threshold` after the zero shell, interpolated
    linearly from the last non-empty shell before the drop.

    Returns 0 when the curve is below the threshold from the start (resolution inf) and nan
    when it never drops below it.
    """
    index = jnp.arange(curve.size)
    below = (curve < threshold) & (index >= 1)
    i = jnp.argmax(below)
    # Empty shells (nan) are stepped over; j = -1 when no non-empty shell precedes i.
    j = jnp.max(jnp.where(jnp.isfinite(curve) & (index < i), index, -1))
    j_safe = jnp.maximum(j, 0)
    prev_value = curve[j_safe]
    above_before = (j >= 0) & (prev_value >= threshold)
    fraction = jnp.where(above_before, (prev_value - threshold) / (prev_value - curve[i]), 0.0)
    crossing = frequency[j_safe] + fraction * (frequency[i] - frequency[j_safe])
    return jnp.where(jnp.any(below), crossing, jnp.nan)
