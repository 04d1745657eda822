"""Noise models of the tilt series: additive Gaussian noise at a given SNR, and electron counting
(Poisson) noise on line integrals of attenuation.

All functions take a typed PRNG key (`jax.random.key`) first and work under `jit` and `vmap` with
noise levels passed as arrays. Bad values are rejected with a `ValueError` when they are concrete;
under `jit` the same checks run at execution time through `equinox.error_if`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import as_float


def _check_key(key) -> None:
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise ValueError("key must be a typed PRNG key; create it with jax.random.key(seed)")


def _concrete(x):
    """The value of `x` as a NumPy array, or None while it is traced."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _check_values(x: jax.Array, ok, message: str) -> jax.Array:
    """Raise `ValueError(message)` if `ok(x)` fails on a concrete `x`; if traced, check at run
    time (`equinox.error_if`)."""
    value = _concrete(x)
    if value is not None:
        if not bool(np.all(ok(value))):
            raise ValueError(message)
        return x
    return eqx.error_if(x, ~jnp.all(ok(x)), message)


def add_gaussian_noise(key: jax.Array, clean: jax.Array, sigma) -> jax.Array:
    """Additive white Gaussian noise: clean + sigma * N(0, 1), independent per pixel.

    Args:
        key: typed PRNG key.
        clean: noiseless data, e.g. a tilt series (n_tilts, y, x) or a sinogram (n_tilts, x).
        sigma: noise standard deviation in the units of `clean`, >= 0; a scalar or an array that
            broadcasts to `clean` without changing its shape (e.g. (n_tilts, 1, 1) for one
            level per tilt).

    Returns:
        Noisy data of the shape and floating dtype of `clean`.
    """
    _check_key(key)
    clean = as_float(clean)
    sigma = jnp.asarray(sigma, clean.dtype)
    try:
        shape = jnp.broadcast_shapes(sigma.shape, clean.shape)
    except ValueError:
        shape = None
    if shape != clean.shape:
        raise ValueError(
            f"sigma of shape {sigma.shape} must broadcast to the data's shape {clean.shape}, "
            "e.g. a scalar or (n_tilts, 1, 1)"
        )
    sigma = _check_values(sigma, lambda s: s >= 0, "sigma must be >= 0 and not NaN")
    return clean + sigma * jax.random.normal(key, clean.shape, clean.dtype)


def gaussian_sigma_for_snr(clean: jax.Array, snr, *, axis=None) -> jax.Array:
    """Noise level for a target signal-to-noise ratio, SNR = var(clean) / sigma^2.

    This is the SNR used in cryo-ET (typical values 0.01 - 0.1): the variance of the clean signal
    over the noise variance.

    Args:
        clean: noiseless data.
        snr: target SNR, > 0 (scalar or broadcastable against the reduced variance).
        axis: axes over which the signal variance is taken; None uses the whole array, (1, 2) on a
            tilt series gives one sigma per tilt with shape (n_tilts, 1, 1).

    Returns:
        sigma = sqrt(var(clean) / snr), with the reduced axes kept as size 1 when `axis` is given.
    """
    clean = as_float(clean)
    snr = _check_values(jnp.asarray(snr, clean.dtype), lambda s: s > 0, "snr must be > 0")
    var = jnp.var(clean, axis=axis, keepdims=axis is not None)
    return jnp.sqrt(var / snr)


def add_poisson_noise(key: jax.Array, tilt_series: jax.Array, electrons_per_pixel) -> jax.Array:
    """Electron-counting noise on line integrals of attenuation (Beer-Lambert model).

    Model: `tilt_series` holds the clean line integrals p (dimensionless, e.g. the output of
    `TiltProjector` scaled by an attenuation coefficient per voxel). A pixel of tilt i receives
    N_i electrons on average and counts C ~ Poisson(N_i exp(-p)). The measured line integral is
    -log(max(C, 0.5) / N_i); the floor at half an electron keeps pixels that count nothing finite.
    For high dose it is unbiased to first order with variance about exp(p) / N_i.

    Args:
        key: typed PRNG key.
        tilt_series: clean line integrals, shape (n_tilts, y, x) or (n_tilts, x).
        electrons_per_pixel: mean electron dose per pixel, > 0; a scalar, or one value per tilt
            (shape (n_tilts,)) for dose-weighted schemes.

    Returns:
        Noisy line integrals of the shape and floating dtype of `tilt_series`.
    """
    _check_key(key)
    p = as_float(tilt_series)
    if p.ndim < 1:
        raise ValueError("tilt_series must have a tilt axis first, e.g. (n_tilts, y, x)")
    dose = jnp.asarray(electrons_per_pixel, p.dtype)
    if dose.ndim == 1:
        if dose.shape[0] != p.shape[0]:
            raise ValueError(
                f"electrons_per_pixel has {dose.shape[0]} values but the tilt series has "
                f"{p.shape[0]} tilts; give one per tilt or a scalar"
            )
        dose = dose.reshape((-1,) + (1,) * (p.ndim - 1))
    elif dose.ndim != 0:
        raise ValueError(
            f"electrons_per_pixel must be a scalar or one value per tilt, got shape {dose.shape}"
        )
    dose = _check_values(dose, lambda d: d > 0, "electrons_per_pixel must be > 0")
    counts = jax.random.poisson(key, dose * jnp.exp(-p), p.shape).astype(p.dtype)
    return -jnp.log(jnp.maximum(counts, 0.5) / dose)


def estimate_noise_sigma(data) -> float:
    """Robust estimate of white-noise standard deviation from the data alone.

    The second difference along the last axis, x[i-1] - 2 x[i] + x[i+1], has variance 6 sigma^2
    for white noise and is small on smooth signal; its median absolute deviation (times 1.4826 for
    a Gaussian) gives sigma * sqrt(6). Meant for noisy tilt series and tomograms (SNR < 1), where
    the signal's own second differences are small beside the noise's.

    Args:
        data: array with at least 3 samples along its last axis.

    Returns:
        sigma as a Python float.
    """
    x = np.asarray(data, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 3:
        raise ValueError(f"need at least 3 samples along the last axis, got shape {x.shape}")
    second = x[..., :-2] - 2 * x[..., 1:-1] + x[..., 2:]
    mad = np.median(np.abs(second - np.median(second)))
    return float(1.4826 * mad / np.sqrt(6.0))
