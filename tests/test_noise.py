"""Noise models: Gaussian noise at a given SNR and electron-counting (Poisson) noise."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.operators._noise import (
    add_gaussian_noise,
    add_poisson_noise,
    gaussian_sigma_for_snr,
)


def _clean_tilt_series(shape, seed=0):
    """A smooth, non-constant signal whose variance differs per tilt."""
    rng = np.random.default_rng(seed)
    n, ny, nx = shape
    y, x = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    amp = rng.uniform(0.5, 2.0, n)[:, None, None]
    return jnp.asarray(amp * np.sin(2 * np.pi * (2 * x + y))[None] + 3.0 * y[None], jnp.float32)


def test_gaussian_noise_has_the_requested_per_tilt_mean_and_variance():
    shape = (4, 100, 125)
    n = shape[1] * shape[2]
    sigma = np.array([0.5, 1.0, 2.0, 3.0], np.float32)[:, None, None]
    clean = _clean_tilt_series(shape)
    noise = np.asarray(add_gaussian_noise(jax.random.key(0), clean, jnp.asarray(sigma)) - clean)
    z = noise / sigma
    mean = z.reshape(4, -1).mean(axis=1)
    var = z.reshape(4, -1).var(axis=1, ddof=1)
    assert np.all(np.abs(mean) < 5.0 / np.sqrt(n))
    assert np.all(np.abs(var - 1.0) < 5.0 * np.sqrt(2.0 / (n - 1)))
    # Independent pixels: neighbouring noise values are uncorrelated.
    corr = np.mean(z[:, :, 1:] * z[:, :, :-1])
    assert abs(corr) < 5.0 / np.sqrt(z[:, :, 1:].size)


def test_gaussian_noise_keeps_dtype_and_scalar_sigma_works_in_float64():
    with jax.enable_x64(True):
        clean = jnp.zeros((3, 50, 40), jnp.float64)
        out = add_gaussian_noise(jax.random.key(1), clean, 0.25)
        assert out.dtype == jnp.float64
        sd = float(jnp.std(out))
        assert abs(sd / 0.25 - 1.0) < 5.0 / np.sqrt(2 * out.size)
    assert add_gaussian_noise(jax.random.key(1), jnp.zeros((3, 5)), 1.0).dtype == jnp.float32


def test_sigma_for_snr_gives_the_requested_snr_on_a_sample():
    shape = (6, 64, 80)
    clean = _clean_tilt_series(shape, seed=1)
    snr = 0.05
    sigma = gaussian_sigma_for_snr(clean, snr)
    assert sigma.shape == ()
    np.testing.assert_allclose(float(jnp.var(clean) / sigma**2), snr, rtol=1e-5)
    noisy = add_gaussian_noise(jax.random.key(2), clean, sigma)
    measured = float(jnp.var(clean) / jnp.var(noisy - clean))
    assert abs(measured / snr - 1.0) < 5.0 * np.sqrt(2.0 / clean.size)


def test_sigma_for_snr_per_tilt_gives_each_tilt_the_requested_snr():
    shape = (5, 60, 70)
    clean = _clean_tilt_series(shape, seed=2)
    snr = jnp.float32(0.02)
    sigma = gaussian_sigma_for_snr(clean, snr, axis=(1, 2))
    assert sigma.shape == (5, 1, 1)
    per_tilt_var = np.asarray(jnp.var(clean, axis=(1, 2)))
    assert np.ptp(per_tilt_var) > 0.1  # the tilts really differ
    np.testing.assert_allclose(per_tilt_var / np.asarray(sigma[:, 0, 0]) ** 2, 0.02, rtol=1e-5)
    noisy = add_gaussian_noise(jax.random.key(3), clean, sigma)
    measured = per_tilt_var / np.asarray(jnp.var(noisy - clean, axis=(1, 2)))
    n = shape[1] * shape[2]
    assert np.all(np.abs(measured / 0.02 - 1.0) < 5.0 * np.sqrt(2.0 / n))


def test_poisson_estimate_is_unbiased_to_second_order_with_delta_method_variance():
    """-log(C / N) with C ~ Poisson(N exp(-p)): mean p + exp(p) / (2 N) (second-order delta
    method; the correction is a few standard errors here, so it is not neglected) and variance
    exp(p) / N. Tolerances are 5 standard errors of the sample mean / variance."""
    with jax.enable_x64(True):
        n_tilts, ny, nx = 4, 100, 250
        p = np.array([0.2, 0.8, 1.5, 2.5])
        dose = np.array([1e4, 2e4, 5e3, 1e4])
        clean = jnp.asarray(np.broadcast_to(p[:, None, None], (n_tilts, ny, nx)))
        est = np.asarray(add_poisson_noise(jax.random.key(4), clean, jnp.asarray(dose)))
        n = ny * nx
        var_expected = np.exp(p) / dose
        mean_expected = p + np.exp(p) / (2 * dose)
        mean = est.reshape(n_tilts, -1).mean(axis=1)
        var = est.reshape(n_tilts, -1).var(axis=1, ddof=1)
        assert np.all(np.abs(mean - mean_expected) < 5.0 * np.sqrt(var_expected / n))
        assert np.all(np.abs(var / var_expected - 1.0) < 5.0 * np.sqrt(2.0 / (n - 1)))


def test_poisson_noise_scalar_dose_and_zero_counts_stay_finite():
    clean = jnp.full((3, 8, 8), 12.0, jnp.float32)  # exp(-12) * 10 electrons: all but surely zero
    est = np.asarray(add_poisson_noise(jax.random.key(5), clean, 10.0))
    assert est.dtype == np.float32 and np.all(np.isfinite(est))
    zero = np.isclose(est, np.log(20.0))  # a count of 0 is floored at half an electron
    assert zero.mean() > 0.99
    sino = add_poisson_noise(jax.random.key(5), jnp.ones((3, 16)), jnp.array([50.0, 60.0, 70.0]))
    assert sino.shape == (3, 16)


@pytest.mark.parametrize(
    "draw",
    [
        lambda k: add_gaussian_noise(k, jnp.zeros((3, 8, 8)), 1.0),
        lambda k: add_poisson_noise(k, jnp.ones((3, 8, 8)), 100.0),
    ],
)
def test_same_key_gives_the_same_noise_and_different_keys_differ(draw):
    a = draw(jax.random.key(7))
    b = draw(jax.random.key(7))
    c = draw(jax.random.key(8))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.mean(a != c)) > 0.5


def test_noise_levels_are_traced_arrays_under_jit_without_retracing():
    clean = jnp.zeros((3, 8, 8))

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def both(key, sigma, dose):
        k1, k2 = jax.random.split(key)
        return add_gaussian_noise(k1, clean, sigma), add_poisson_noise(k2, clean + 1.0, dose)

    g1, _ = both(jax.random.key(9), jnp.float32(1.0), jnp.float32(100.0))
    g2, _ = both(jax.random.key(9), jnp.float32(2.0), jnp.float32(200.0))
    np.testing.assert_allclose(g2, 2.0 * g1, rtol=1e-6)
    # The run-time check surfaces as the backend's error type (which varies), with our message.
    with pytest.raises((RuntimeError, ValueError), match="sigma must be >= 0"):
        jax.block_until_ready(both(jax.random.key(9), jnp.float32(-1.0), jnp.float32(100.0)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: add_gaussian_noise(jax.random.key(0), jnp.zeros((3, 4)), -0.1), "sigma must be"),
        (lambda: add_gaussian_noise(jax.random.key(0), jnp.zeros((3, 4)), float("nan")), "NaN"),
        (
            lambda: add_gaussian_noise(
                jax.random.key(0), jnp.zeros((3, 4, 5)), jnp.ones((4, 1, 1))
            ),
            "must broadcast",
        ),
        (
            lambda: add_gaussian_noise(jax.random.key(0), jnp.zeros((3, 4)), jnp.ones((2, 3, 4))),
            "must broadcast",
        ),
        (lambda: add_gaussian_noise(jax.random.PRNGKey(0), jnp.zeros((3, 4)), 1.0), "typed PRNG"),
        (lambda: gaussian_sigma_for_snr(jnp.ones((3, 4)), 0.0), "snr must be > 0"),
        (lambda: gaussian_sigma_for_snr(jnp.ones((3, 4)), -0.05), "snr must be > 0"),
        (lambda: add_poisson_noise(jax.random.key(0), jnp.ones((3, 4)), -5.0), "must be > 0"),
        (lambda: add_poisson_noise(jax.random.key(0), jnp.ones((3, 4)), 0.0), "must be > 0"),
        (
            lambda: add_poisson_noise(jax.random.key(0), jnp.ones((3, 4, 5)), jnp.ones(4)),
            "has 4 values but the tilt series has 3 tilts",
        ),
        (
            lambda: add_poisson_noise(jax.random.key(0), jnp.ones((3, 4, 5)), jnp.ones((3, 4))),
            "scalar or one value per tilt",
        ),
        (lambda: add_poisson_noise(jax.random.key(0), jnp.float32(1.0), 10.0), "tilt axis"),
        (lambda: add_poisson_noise(jax.random.PRNGKey(0), jnp.ones((3, 4)), 10.0), "typed PRNG"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("sigma", [0.1, 2.0])
def test_noise_estimate_recovers_the_sigma_of_white_noise_on_a_smooth_signal(sigma):
    from cryojax_mw.operators import estimate_noise_sigma

    rng = np.random.default_rng(0)
    z, x = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 256), indexing="ij")
    smooth = np.sin(3 * x) * np.cos(2 * z)
    estimate = estimate_noise_sigma(smooth + sigma * rng.normal(size=smooth.shape))
    assert estimate == pytest.approx(sigma, rel=0.05)
    with pytest.raises(ValueError, match="at least 3 samples"):
        estimate_noise_sigma(np.zeros((4, 2)))
