"""Phantoms checked against closed forms: ellipse areas, Gaussian integrals, orientation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.simulate import random_blobs, shepp_logan
from cryojax_mw.simulate._phantoms import _SHEPP_LOGAN_2D, _SHEPP_LOGAN_DEPTH


@pytest.mark.parametrize("shape", [(256, 256), (200, 320), (64, 65, 96)])
def test_shepp_logan_mean_equals_sum_of_ellipse_areas_times_intensities(shape):
    """The phantom is a sum of indicator functions, so its mean over the [-1, 1]^d box is
    sum_i value_i |E_i| / 2^d: stretching to a non-square shape keeps area fractions."""
    image = np.asarray(shepp_logan(shape), np.float64)
    value, a, b = _SHEPP_LOGAN_2D[:, 0], _SHEPP_LOGAN_2D[:, 1], _SHEPP_LOGAN_2D[:, 2]
    if len(shape) == 2:
        expected = np.sum(value * np.pi * a * b) / 4.0
    else:
        expected = np.sum(value * 4.0 / 3.0 * np.pi * a * b * _SHEPP_LOGAN_DEPTH) / 8.0
    assert image.mean() == pytest.approx(expected, rel=1e-2)


def test_shepp_logan_values_dtype_and_orientation():
    n = 200
    image = np.asarray(shepp_logan((n, n)))
    assert image.dtype == np.float32 and image.shape == (n, n)
    assert image.min() == 0.0 and image.max() == 1.0

    def at(v, h):  # phantom coordinates (v up, h right) -> pixel
        return image[int(round((1 - v) * n / 2 - 0.5)), int(round((h + 1) * n / 2 - 0.5))]

    # Skull 1, brain 1 - 0.8, the large left ventricle 1 - 0.8 - 0.2, the top ellipse at small z.
    assert at(0.0, -0.9) == 0.0 and at(0.0, -0.675) == pytest.approx(1.0)
    assert at(0.0, 0.5) == pytest.approx(0.2)
    assert at(0.0, -0.22) == pytest.approx(0.0, abs=1e-7)
    assert at(0.35, 0.0) == pytest.approx(0.3) and at(-0.35, 0.0) == pytest.approx(0.2)
    with jax.enable_x64(True):
        assert shepp_logan((8, 8), dtype=jnp.float64).dtype == jnp.float64


def test_shepp_logan_3d_mid_plane_is_the_2d_phantom():
    volume = shepp_logan((48, 31, 40))
    np.testing.assert_array_equal(volume[:, 15, :], shepp_logan((48, 40)))
    # The ellipsoids end inside the box along the tilt axis.
    assert float(volume[:, 0, :].max()) == 0.0 and float(volume[:, -1, :].max()) == 0.0


@pytest.mark.parametrize("shape", [(4,), (0, 5), (2, 3, 4, 5)])
def test_shepp_logan_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        shepp_logan(shape)


@pytest.mark.parametrize("shape", [(64, 80), (40, 36, 44)])
def test_random_blobs_total_mass_is_the_gaussian_integral(shape):
    n_blobs, amp, sigma = 5, 0.7, 3.0
    image = random_blobs(
        jax.random.key(0), shape, n_blobs, sigma_range=(sigma, sigma), amplitude_range=(amp, amp)
    )
    expected = n_blobs * amp * (2 * np.pi * sigma**2) ** (len(shape) / 2)
    # Centres stay three sigmas inside, so at most ~0.3 % per axis of each blob is cut off.
    assert float(jnp.sum(image)) == pytest.approx(expected, rel=1e-2)
    assert float(jnp.sum(image)) <= expected
    assert float(image.min()) >= 0.0 and float(image.max()) <= n_blobs * amp


def test_random_blobs_deterministic_per_key_and_inside_the_array():
    shape = (48, 56)
    a = random_blobs(jax.random.key(1), shape, 8)
    b = random_blobs(jax.random.key(1), shape, 8)
    c = random_blobs(jax.random.key(2), shape, 8)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 0.1
    assert a.dtype == jnp.float32 and a.shape == shape
    border = jnp.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    # Each blob is at most its amplitude (<= 1) times exp(-4.5) at three sigmas from its centre.
    assert float(border.max()) <= 8 * np.exp(-4.5)
    with jax.enable_x64(True):
        assert random_blobs(jax.random.key(1), (6, 7, 8), 2, dtype=jnp.float64).dtype == jnp.float64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_blobs": 0}, "n_blobs"),
        ({"n_blobs": 2, "sigma_range": (3.0, 1.0)}, "sigma_range"),
        ({"n_blobs": 2, "amplitude_range": (-1.0, 1.0)}, "amplitude_range"),
    ],
)
def test_random_blobs_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_blobs(jax.random.key(0), (16, 16), **kwargs)
