"""Weighted (filtered) backprojection on the tilt projector."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..operators import TiltProjector
from ..operators._base import as_float
from ._common import check_data, safe_norm_of
from ._result import Reconstruction

FILTERS = ("ramp", "shepp-logan", "hann")


def angular_weights(angles_deg: Sequence[float]) -> np.ndarray:
    """The angular coverage of each projection, in degrees, for weighting a backprojection.

    Each projection covers half the angular distance to each of its neighbours in sorted order.
    When the set spans a full half-turn (the gap across +-90 deg, taken modulo 180 deg, is no wider
    than the widest gap between neighbours) the first and last angles are neighbours through that
    wrap. Otherwise the range is limited (a missing wedge): each end projection covers its inner
    half-gap plus an equal half-gap on its outer side, so the weights sum to the covered range
    `max - min + (first gap + last gap) / 2`, e.g. `n * step` for an evenly spaced series.

    Args:
        angles_deg: tilt angles in degrees, any order, at least two, inside (-90, 90).

    Returns:
        A float64 array of weights in degrees, in the order of `angles_deg`.
    """
    a = np.asarray(angles_deg, dtype=np.float64).ravel()
    if a.size < 2:
        raise ValueError(f"angular weights need at least two tilt angles, got {a.size}")
    order = np.argsort(a, kind="stable")
    s = a[order]
    gaps = np.diff(s)
    wrap = s[0] + 180.0 - s[-1]
    # A wrap gap no wider than the widest inner gap (up to rounding) means no missing wedge.
    full_turn = wrap <= gaps.max() * (1.0 + 1e-9)
    before = np.concatenate([[wrap if full_turn else gaps[0]], gaps])
    after = np.concatenate([gaps, [wrap if full_turn else gaps[-1]]])
    w = np.empty_like(a)
    w[order] = 0.5 * (before + after)
    return w


def _padded_size(n_det: int, pad: bool) -> int:
    """FFT length: a power of two >= 2 n_det (linear, not circular, convolution) or n_det."""
    if not pad:
        return n_det
    return max(64, 1 << int(np.ceil(np.log2(2 * n_det))))


def _filter_response(n: int, name: str) -> np.ndarray:
    """Real frequency response (rfft half, length n // 2 + 1) of the ramp filter times a window.

    The ramp is the DFT of Kak & Slaney's band-limited spatial kernel (h[0] = 1/4, h[k] =
    -1/(pi k)^2 for odd k, 0 for even k, unit detector spacing), not |nu| sampled on the grid:
    sampling |nu| zeroes the DC bin and biases the reconstruction's mean.
    """
    k = np.arange(n)
    k = np.where(k <= n // 2, k, k - n)
    h = np.zeros(n)
    h[k == 0] = 0.25
    odd = k % 2 == 1
    h[odd] = -1.0 / (np.pi * k[odd]) ** 2
    response = np.real(np.fft.rfft(h))
    nu = np.fft.rfftfreq(n)  # cycles per detector pixel, 0 .. 0.5
    if name == "shepp-logan":
        response = response * np.sinc(nu)  # np.sinc(v) = sin(pi v) / (pi v)
    elif name == "hann":
        response = response * 0.5 * (1.0 + np.cos(2.0 * np.pi * nu))
    return response


@eqx.filter_jit
def _wbp(projector, b, weights, response, n_fft):
    n_det = b.shape[-1]
    spectrum = jnp.fft.rfft(b, n=n_fft, axis=-1)
    filtered = jnp.fft.irfft(spectrum * response, n=n_fft, axis=-1)[..., :n_det]
    filtered = filtered * weights.reshape((-1,) + (1,) * (b.ndim - 1))
    volume = projector.T.mv(filtered)
    residual = jnp.linalg.norm(projector.mv(volume) - b) / safe_norm_of(b)
    return volume, residual[None]


def wbp(
    tilt_series: jax.Array,
    projector: TiltProjector,
    filter: str = "ramp",
    *,
    pad: bool = True,
) -> Reconstruction:
    """Weighted (filtered) backprojection: filter each projection along x, weight, backproject.

    `x = A^T (w * (h (*) b))` where h is the ramp filter (optionally windowed) applied along the
    detector axis x, w the angular coverage of each projection in radians (`angular_weights`) and
    A^T the projector's exact adjoint. With unit voxel and detector spacing this is the discrete
    inverse Radon formula, so a noise-free full-range series reconstructs the volume's values;
    a limited range leaves the missing wedge empty.

    Args:
        tilt_series: the data b, shape `projector.out_structure().shape` ((n_tilts, y, x) or
            (n_tilts, x)); its floating dtype sets the working dtype.
        projector: the `TiltProjector` that produced the data (its angles set the weights).
        filter: "ramp" (sharpest), "shepp-logan" (ramp times sinc) or "hann" (ramp times a
            raised cosine, zero at Nyquist: smoothest, least noise).
        pad: zero-pad each projection to a power of two >= 2 x before filtering, so the
            convolution does not wrap around the detector edges.

    Returns:
        `Reconstruction(volume, residuals)` with the single value `||A x - b|| / ||b||`.
    """
    if not isinstance(projector, TiltProjector):
        raise ValueError(
            "wbp needs a TiltProjector (its tilt angles set the weights), "
            f"got {type(projector).__name__}"
        )
    if filter not in FILTERS:
        raise ValueError(f"unknown filter {filter!r}; choose one of {', '.join(FILTERS)}")
    check_data(tilt_series, projector)
    weights = np.deg2rad(angular_weights(projector.geometry.angles_deg))
    b = as_float(tilt_series)
    n_fft = _padded_size(b.shape[-1], bool(pad))
    response = jnp.asarray(_filter_response(n_fft, filter), b.dtype)
    volume, residuals = _wbp(projector, b, jnp.asarray(weights, b.dtype), response, n_fft)
    return Reconstruction(volume, residuals)
