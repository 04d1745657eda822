"""Gaussian low-pass denoising in Fourier space."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tv import AbstractDenoiser, as_image, check_nonnegative_scalar


def _squared_frequencies(shape: tuple[int, ...]) -> np.ndarray:
    """|f|^2 on the rfftn half spectrum of an array of `shape`, f in cycles per voxel."""
    axes = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij", sparse=True)
    return sum(g * g for g in grids)


@jax.jit
def _gaussian(x: jax.Array, sigma: jax.Array) -> jax.Array:
    f2 = jnp.asarray(_squared_frequencies(x.shape), x.dtype)
    # The Fourier transform of a unit-mass Gaussian of width sigma (voxels): exp(-2 pi^2 s^2 f^2).
    transfer = jnp.exp(-2.0 * np.pi**2 * sigma * sigma * f2)
    smooth = jnp.fft.irfftn(jnp.fft.rfftn(x) * transfer, s=x.shape).astype(x.dtype)
    # Return x bit for bit at sigma = 0 rather than x plus FFT round-off.
    return jnp.where(sigma > 0, smooth, x)


def gaussian_denoise(x: jax.Array, sigma_voxels: float | jax.Array) -> jax.Array:
    """Gaussian low-pass filter: multiply the rfftn half spectrum by exp(-2 pi^2 sigma^2 |f|^2).

    The filter is a circular convolution (periodic boundary: what leaves one face re-enters at
    the opposite one) with a Gaussian of standard deviation `sigma_voxels` along every axis. Its
    transfer function is 1 at f = 0, so the mean is kept exactly.

    Args:
        x: a 2D (z, x) image or a 3D (z, y, x) volume; its floating dtype is kept.
        sigma_voxels: standard deviation of the Gaussian in voxels (>= 0); 0 returns x. An
            array or float (new values do not recompile).

    Returns:
        The filtered array, x's shape and dtype.
    """
    x = as_image(x)
    check_nonnegative_scalar(sigma_voxels, "sigma_voxels")
    return _gaussian(x, jnp.asarray(sigma_voxels, x.dtype))


class GaussianDenoiser(AbstractDenoiser):
    """Stateless Gaussian low-pass denoiser (`gaussian_denoise`, periodic boundary).

    Args:
        sigma: standard deviation in voxels (>= 0); stored as an array.
    """

    sigma: jax.Array

    def __init__(self, sigma: float | jax.Array):
        check_nonnegative_scalar(sigma, "sigma")
        self.sigma = jnp.asarray(sigma)

    def init_state(self, x: jax.Array) -> None:
        """No state: returns None."""

    def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """Filter `x`; returns `(filtered, state)` with the state unchanged."""
        return gaussian_denoise(x, self.sigma), state
