"""Posteriors to sample: a Gaussian one known in closed form (for checking samplers exactly) and
the tomography likelihood.

The exact case: a stationary Gaussian prior x ~ N(0, C), C = F^-1 diag(P) F with power spectrum P,
and data y = F^-1 m F (x + n), n ~ N(0, sigma^2 I), through a binary Fourier mask m (a missing
wedge). With the orthonormal FFT the posterior is diagonal in Fourier space: coefficient k has
variance v_k = 1 / (1 / P_k + m_k / sigma^2) and mean v_k m_k y_k / sigma^2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..operators import AbstractLinearOperator, half_spectrum_weights


def _frequency_radius(shape: tuple[int, ...]) -> np.ndarray:
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*freqs, indexing="ij")
    return np.sqrt(sum(g**2 for g in grids))


def power_law_spectrum(shape, amplitude: float = 1.0, correlation_length: float = 3.0, order=2.0):
    """A smooth stationary prior's power spectrum on the rfftn grid:
    P(k) = a / (1 + (2 pi l |k|)^2)^order (|k| in cycles per voxel, l in voxels); per-voxel prior
    variance is the mean of P over the full spectrum."""
    k = _frequency_radius(tuple(shape))
    return amplitude / (1.0 + (2 * np.pi * correlation_length * k) ** 2) ** order


@dataclasses.dataclass(frozen=True)
class GaussianFourierPosterior:
    """The exact Gaussian posterior of a Fourier-mask problem (see the module docstring).

    Attributes:
        y: data, (z, y, x) or (z, x), with its unobserved coefficients empty.
        mask: binary observed region in rfftn layout.
        noise_sigma: noise standard deviation per voxel.
        prior_power: P on the rfftn grid, > 0.
    """

    y: jax.Array
    mask: jax.Array
    noise_sigma: float
    prior_power: jax.Array

    def __post_init__(self):
        mask = np.asarray(self.mask)
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("the exact posterior needs a binary mask (0 = missing, 1 = observed)")
        if not np.all(np.asarray(self.prior_power) > 0):
            raise ValueError("prior_power must be > 0 everywhere")
        if not self.noise_sigma > 0:
            raise ValueError(f"noise_sigma must be > 0, got {self.noise_sigma}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.y))

    def _fft(self, x):
        return jnp.fft.rfftn(x, norm="ortho")

    def _ifft(self, x_hat):
        return jnp.fft.irfftn(x_hat, s=self.shape, norm="ortho")

    def loglikelihood(self, x: jax.Array) -> jax.Array:
        """-||F^-1 m F x - y||^2 / (2 sigma^2)."""
        residual = self._ifft(jnp.asarray(self.mask, x.dtype) * self._fft(x)) - self.y
        return -0.5 * jnp.sum(residual**2) / self.noise_sigma**2

    def logprior(self, x: jax.Array) -> jax.Array:
        """-||C^-1/2 x||^2 / 2."""
        whitened = self._ifft(self._fft(x) / jnp.sqrt(jnp.asarray(self.prior_power, x.dtype)))
        return -0.5 * jnp.sum(whitened**2)

    def logdensity(self, x: jax.Array) -> jax.Array:
        return self.loglikelihood(x) + self.logprior(x)

    def _posterior_variance_half(self) -> np.ndarray:
        p = np.asarray(self.prior_power, np.float64)
        m = np.asarray(self.mask, np.float64)
        return 1.0 / (1.0 / p + m / self.noise_sigma**2)

    def mean(self) -> np.ndarray:
        """The exact posterior mean (the MMSE estimate)."""
        v = self._posterior_variance_half()
        axes = tuple(range(len(self.shape)))
        y_hat = np.fft.rfftn(np.asarray(self.y, np.float64), norm="ortho")
        return np.fft.irfftn(v * np.asarray(self.mask) * y_hat / self.noise_sigma**2,
                             s=self.shape, axes=axes, norm="ortho")  # fmt: skip

    def std(self) -> float:
        """The exact posterior standard deviation, the same at every voxel (stationary)."""
        v = self._posterior_variance_half()
        return float(np.sqrt(np.sum(v * half_spectrum_weights(self.shape)) / np.prod(self.shape)))

    @staticmethod
    def simulate(key, shape, mask, noise_sigma, prior_power, dtype=jnp.float32):
        """Draw a truth from the prior and its data: (truth, GaussianFourierPosterior)."""
        key_x, key_n = jax.random.split(key)
        white = jax.random.normal(key_x, tuple(shape), dtype)
        truth = jnp.fft.irfftn(
            jnp.sqrt(jnp.asarray(prior_power, dtype)) * jnp.fft.rfftn(white, norm="ortho"),
            s=tuple(shape), norm="ortho",
        )  # fmt: skip
        noisy = truth + noise_sigma * jax.random.normal(key_n, tuple(shape), dtype)
        y = jnp.fft.irfftn(
            jnp.asarray(mask, dtype) * jnp.fft.rfftn(noisy, norm="ortho"), s=tuple(shape),
            norm="ortho",
        )  # fmt: skip
        return truth, GaussianFourierPosterior(y, mask, noise_sigma, prior_power)


def gaussian_loglikelihood(operator: AbstractLinearOperator, data: jax.Array, noise_sigma):
    """x -> -||A x - b||^2 / (2 sigma^2) for a linear operator A (e.g. a `TiltProjector`) and
    data b (a tilt series) with white Gaussian noise of standard deviation `noise_sigma`."""
    data = jnp.asarray(data)
    inv_var = 1.0 / jnp.asarray(noise_sigma, data.dtype) ** 2

    def loglikelihood(x):
        return -0.5 * inv_var * jnp.sum((operator.mv(x) - data) ** 2)

    return loglikelihood
