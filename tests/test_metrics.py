"""PSNR, SSIM, CCC and FSC checked against closed forms and independent NumPy computations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.metrics import FSCResult, ccc, fsc, psnr, ssim


def _rng(seed):
    return np.random.default_rng(seed)


# Helpers: full-spectrum NumPy references


def _random_hermitian_half_region(rng, shape, real_weights=False):
    """A random region in rfftn layout whose full-spectrum version is Hermitian: m(-k) = m(k)."""
    full = rng.uniform(0.0, 1.0, shape) if real_weights else rng.random(shape) < 0.4
    mirrored = full[tuple(np.meshgrid(*[(-np.arange(n)) % n for n in shape], indexing="ij"))]
    full = 0.5 * (full + mirrored) if real_weights else full | mirrored
    return full[..., : shape[-1] // 2 + 1]


def _full_from_half(half, shape):
    """The full-spectrum mask a half-spectrum one stands for: columns beyond n_x // 2 hold m(-k)."""
    k = np.indices(shape)
    minus_k = [(-g) % n for g, n in zip(k, shape)]
    beyond = k[-1] > shape[-1] // 2
    return half[tuple(np.where(beyond, mg, g) for g, mg in zip(k, minus_k))]


def _full_ccc(x, y, full_region):
    fx, fy = np.fft.fftn(x), np.fft.fftn(y)
    num = np.sum(full_region * fx * np.conj(fy))
    den = np.sqrt(np.sum(full_region * np.abs(fx) ** 2) * np.sum(full_region * np.abs(fy) ** 2))
    return num / den


def _full_shells(shape, n_shells=None):
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(f**2 for f in freqs))
    if n_shells is None:
        width, n_shells = 1.0 / min(shape), min(shape) // 2 + 1
    else:
        width = 0.5 / (n_shells - 1)
    return np.floor(radius / width + 0.5).astype(int), n_shells


def _full_fsc(x, y, full_region=None, n_shells=None):
    shells, n_shells = _full_shells(x.shape, n_shells)
    fx, fy = np.fft.fftn(x), np.fft.fftn(y)
    w = np.ones(x.shape) if full_region is None else full_region
    curve, counts = [], []
    for i in range(n_shells):
        s = (shells == i) & (w != 0)
        num = np.sum(w[s] * fx[s] * np.conj(fy[s])).real
        den = np.sqrt(np.sum(w[s] * np.abs(fx[s]) ** 2) * np.sum(w[s] * np.abs(fy[s]) ** 2))
        curve.append(num / den)
        counts.append(int(s.sum()))
    return np.array(curve), np.array(counts)


def _band_mixture(rng, shape, gain):
    """x (white noise) and y = F^-1[g F(x) + sqrt(1 - g^2) F(z)] with z independent white noise,
    g = gain(|k|) on the normalised radius: the expected FSC of x and y in a shell is g there."""
    x = rng.standard_normal(shape)
    z = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    g = gain(np.sqrt(sum(f**2 for f in freqs)))
    y = np.fft.ifftn(g * np.fft.fftn(x) + np.sqrt(1 - g**2) * np.fft.fftn(z)).real
    return x, y


# PSNR


def test_psnr_matches_its_closed_form_for_a_known_mse():
    reference = np.linspace(-1.0, 3.0, 64).reshape(8, 8)  # range 4
    signs = np.where(_rng(0).random((8, 8)) < 0.5, -1.0, 1.0)
    estimate = reference + 0.2 * signs  # MSE = 0.04 exactly
    expected = 10 * math.log10(4.0**2 / 0.04)
    assert float(psnr(estimate, reference)) == pytest.approx(expected, rel=1e-6)
    expected_range_1 = 10 * math.log10(1.0 / 0.04)
    got = float(psnr(estimate, reference, data_range=1.0))
    assert got == pytest.approx(expected_range_1, rel=1e-6)


def test_psnr_keeps_float64_and_is_infinite_for_equal_maps():
    with jax.enable_x64(True):
        x = jnp.asarray(_rng(1).standard_normal((6, 7)))
        value = psnr(x + 1e-3, x)
        assert value.dtype == jnp.float64
        expected = 10 * math.log10(float(jnp.ptp(x)) ** 2 / 1e-6)
        assert float(value) == pytest.approx(expected, rel=1e-11)
        assert float(psnr(x, x)) == math.inf


def test_metrics_reject_arrays_of_different_shapes():
    for metric in (psnr, ssim, ccc, fsc):
        with pytest.raises(ValueError, match="same shape"):
            metric(np.zeros((12, 12)), np.zeros((12, 13)))


# SSIM


def _ssim_by_loops(x, y, data_range, sigma=1.5):
    """Direct definition: the Gaussian-weighted statistics of every fully inside window."""
    radius = int(3.5 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    window = g
    for _ in range(x.ndim - 1):
        window = np.multiply.outer(window, g)
    window /= window.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size = 2 * radius + 1
    values = []
    for corner in np.ndindex(*[n - size + 1 for n in x.shape]):
        sl = tuple(slice(c, c + size) for c in corner)
        px, py = x[sl], y[sl]
        mx, my = np.sum(window * px), np.sum(window * py)
        vx = np.sum(window * (px - mx) ** 2)
        vy = np.sum(window * (py - my) ** 2)
        cxy = np.sum(window * (px - mx) * (py - my))
        numerator = (2 * mx * my + c1) * (2 * cxy + c2)
        values.append(numerator / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return np.mean(values)


@pytest.mark.parametrize("shape", [(14, 13), (12, 13, 11)])
def test_ssim_of_a_map_with_itself_is_one(shape):
    x = 5.0 + _rng(2).standard_normal(shape).astype(np.float32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(14, 13), (12, 13, 11)])
def test_ssim_agrees_with_an_explicit_window_loop_in_float64(shape):
    rng = _rng(3)
    y = 10.0 + rng.standard_normal(shape)
    x = y + 0.5 * rng.standard_normal(shape)
    expected = _ssim_by_loops(x, y, np.ptp(y))
    with jax.enable_x64(True):
        got = ssim(jnp.asarray(x), jnp.asarray(y))
        assert got.dtype == jnp.float64
        assert float(got) == pytest.approx(expected, rel=1e-10)
        got_range = float(ssim(jnp.asarray(x), jnp.asarray(y), data_range=2.0, sigma=1.0))
    assert got_range == pytest.approx(_ssim_by_loops(x, y, 2.0, sigma=1.0), rel=1e-10)
    got32 = float(ssim(x.astype(np.float32), y.astype(np.float32)))
    assert got32 == pytest.approx(expected, rel=1e-4)


def test_ssim_matches_scikit_image_gaussian_ssim():
    metrics = pytest.importorskip("skimage.metrics")
    rng = _rng(4)
    y = rng.standard_normal((24, 21))
    x = y + 0.3 * rng.standard_normal((24, 21))
    expected = metrics.structural_similarity(
        x, y, data_range=np.ptp(y), gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert float(ssim(x, y)) == pytest.approx(expected, rel=1e-5)


def test_ssim_decreases_as_noise_grows():
    rng = _rng(5)
    clean = np.cumsum(np.cumsum(rng.standard_normal((32, 32)), 0), 1)  # smooth-ish image
    clean /= np.ptp(clean)
    noise = rng.standard_normal(clean.shape)
    scores = [float(ssim(clean + s * noise, clean)) for s in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)]
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert all(a > b for a, b in zip(scores, scores[1:])), scores
    assert scores[-1] < 0.3


def test_ssim_under_jit_equals_eager():
    rng = _rng(6)
    y = rng.standard_normal((16, 16)).astype(np.float32)
    x = y + 0.5 * rng.standard_normal((16, 16)).astype(np.float32)
    jitted = jax.jit(ssim, static_argnames="sigma")
    assert float(jitted(x, y, sigma=1.5)) == pytest.approx(float(ssim(x, y)), rel=1e-6)
    assert float(jax.jit(ssim)(x, y, jnp.float32(3.0))) == pytest.approx(
        float(ssim(x, y, data_range=3.0)), rel=1e-6
    )


def test_ssim_rejects_arrays_smaller_than_the_window_and_bad_sigma():
    with pytest.raises(ValueError, match="at least 11 voxels"):
        ssim(np.zeros((10, 20)), np.zeros((10, 20)))
    with pytest.raises(ValueError, match="2D or 3D"):
        ssim(np.zeros(30), np.zeros(30))
    with pytest.raises(ValueError, match="positive"):
        ssim(np.zeros((12, 12)), np.zeros((12, 12)), sigma=0.0)
    with pytest.raises(ValueError, match="static"):
        jax.jit(ssim)(np.zeros((12, 12)), np.zeros((12, 12)), 1.0, 1.5)


# CCC


@pytest.mark.parametrize("shape", [(8, 9), (6, 7, 8), (5, 6, 7)])
def test_ccc_is_one_with_itself_and_minus_one_with_its_negative(shape):
    x = _rng(7).standard_normal(shape).astype(np.float32)
    assert float(ccc(x, x)) == pytest.approx(1.0, abs=1e-6)
    assert float(ccc(x, -x)) == pytest.approx(-1.0, abs=1e-6)
    assert float(ccc(x, 3.0 * x)) == pytest.approx(1.0, abs=1e-6)


def test_ccc_over_the_whole_spectrum_is_the_real_space_cosine_by_parseval():
    rng = _rng(8)
    x, y = rng.standard_normal((2, 6, 7, 9))
    expected = np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))
    with jax.enable_x64(True):
        assert float(ccc(x, y)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("shape", [(10, 8), (9, 7), (6, 7, 8), (5, 6, 7)])
@pytest.mark.parametrize("real_weights", [False, True])
def test_ccc_with_a_half_spectrum_region_equals_the_full_spectrum_computation(shape, real_weights):
    rng = _rng(9)
    x, y = rng.standard_normal((2,) + shape)
    y = y + 0.7 * x
    half = _random_hermitian_half_region(rng, shape, real_weights)
    full = _full_from_half(half, shape)
    expected = _full_ccc(x, y, full)
    assert abs(expected.imag) < 1e-12  # the full region is Hermitian, so the sum is real
    with jax.enable_x64(True):
        got = ccc(jnp.asarray(x), jnp.asarray(y), region=jnp.asarray(half))
        assert got.dtype == jnp.float64
        assert float(got) == pytest.approx(expected.real, rel=1e-12)
    got32 = ccc(x.astype(np.float32), y.astype(np.float32), region=half)
    assert float(got32) == pytest.approx(expected.real, rel=2e-5)


def test_ccc_region_broadcasts_along_the_tilt_axis_and_is_jittable():
    rng = _rng(10)
    x, y = rng.standard_normal((2, 6, 5, 8)).astype(np.float32)
    band = rng.random((6, 1, 5)) < 0.5
    expected = ccc(x, y, region=np.broadcast_to(band, (6, 5, 5)))
    assert float(jax.jit(ccc)(x, y, band)) == pytest.approx(float(expected), rel=1e-6)


def test_ccc_rejects_a_full_spectrum_or_shifted_shape_region():
    x = np.zeros((6, 8))
    with pytest.raises(ValueError, match=r"n_x // 2 \+ 1"):
        ccc(x, x, region=np.ones((6, 8), dtype=bool))


# FSC


@pytest.mark.parametrize("shape", [(32, 32), (20, 24, 28), (15, 16, 17)])
def test_fsc_of_identical_maps_is_one_in_every_shell(shape):
    x = _rng(11).standard_normal(shape).astype(np.float32)
    result = fsc(x, x)
    assert isinstance(result, FSCResult)
    assert result.fsc.shape == (min(shape) // 2 + 1,)
    np.testing.assert_allclose(np.asarray(result.fsc), 1.0, atol=1e-5)
    assert math.isnan(float(result.resolution_0143))  # never crosses: resolution beyond Nyquist


@pytest.mark.parametrize("shape", [(64, 64), (24, 24, 24), (20, 26, 31)])
def test_fsc_of_independent_noise_maps_is_within_four_sigma_of_zero(shape):
    rng = _rng(12)
    a, b = rng.standard_normal((2,) + shape).astype(np.float32)
    result = fsc(a, b)
    n = np.asarray(result.n_coefficients)
    curve = np.asarray(result.fsc)
    assert np.all(n[1:] >= 8)
    assert np.all(np.abs(curve[1:]) <= 4 / np.sqrt(n[1:])), curve
    # Not trivially zero: the spread matches 1 / sqrt(n) within a factor 2.
    spread = np.sqrt(np.mean(curve[1:] ** 2 * n[1:]))
    assert 0.5 < spread < 2.0


@pytest.mark.parametrize("shape", [(9, 10, 7), (12, 11), (8, 8, 8)])
@pytest.mark.parametrize("n_shells", [None, 4])
def test_fsc_with_and_without_region_equals_a_full_spectrum_shell_loop(shape, n_shells):
    rng = _rng(13)
    x, y = rng.standard_normal((2,) + shape)
    y = y + x
    half = _random_hermitian_half_region(rng, shape)
    full = _full_from_half(half, shape)
    with jax.enable_x64(True):
        for region_half, region_full in [(None, None), (half, full)]:
            result = fsc(jnp.asarray(x), jnp.asarray(y), region=region_half, n_shells=n_shells)
            curve, counts = _full_fsc(x, y, region_full, n_shells)
            np.testing.assert_array_equal(np.asarray(result.n_coefficients), counts)
            np.testing.assert_allclose(np.asarray(result.fsc), curve, rtol=1e-12, atol=1e-14)


def test_fsc_counts_every_full_spectrum_coefficient_up_to_nyquist_once():
    shape = (20, 26, 31)
    result = fsc(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
    shells, n_shells = _full_shells(shape)
    assert int(np.sum(result.n_coefficients)) == int(np.sum(shells < n_shells))
    assert int(result.n_coefficients[0]) == 1


@pytest.mark.parametrize("shape", [(64, 80), (32, 32, 32)])
def test_fsc_follows_the_expected_curve_of_a_smoothly_low_passed_copy(shape):
    cutoff = 0.2  # cycles per voxel, where the gain (and so the expected FSC) is 1/2
    gain = lambda f: 1.0 / (1.0 + (f / cutoff) ** 8)  # noqa: E731
    x, y = _band_mixture(_rng(14), shape, gain)
    result = fsc(x.astype(np.float32), y.astype(np.float32))
    curve, n = np.asarray(result.fsc), np.asarray(result.n_coefficients)
    expected = gain(np.asarray(result.frequency))
    assert np.all(np.abs(curve[1:] - expected[1:]) <= 4 / np.sqrt(n[1:]))


def test_resolution_is_read_off_by_linear_interpolation_between_shells():
    # Steep gain with the cutoff half way between shells 9 and 10: the interpolated 0.5 crossing
    # lands on the cutoff, while the shell after it (no interpolation) would be half a shell off.
    shape = (48, 48, 48)
    cutoff = 9.5 / 48
    x, y = _band_mixture(_rng(20), shape, lambda f: 1.0 / (1.0 + (f / cutoff) ** 24))
    result = fsc(x.astype(np.float32), y.astype(np.float32))
    assert abs(1.0 / float(result.resolution_05) - cutoff) <= 0.25 / 48


def test_crossing_interpolates_linearly_and_flags_curves_that_never_or_always_fall_below():
    from cryojax_mw.metrics import _crossing

    frequency = jnp.array([0.0, 0.1, 0.2, 0.3, 0.4])
    curve = jnp.array([1.0, 0.9, 0.6, 0.3, 0.1])
    assert float(_crossing(frequency, curve, 0.5)) == pytest.approx(0.2 + 0.1 / 3, rel=1e-6)
    expected_0143 = 0.3 + 0.1 * (0.3 - 0.143) / (0.3 - 0.1)
    assert float(_crossing(frequency, curve, 0.143)) == pytest.approx(expected_0143, rel=1e-6)
    assert math.isnan(float(_crossing(frequency, curve, 0.05)))
    assert float(_crossing(frequency, -curve, 0.5)) == 0.0
    # An empty shell (nan) before the drop is stepped over.
    gap = jnp.array([1.0, 0.9, jnp.nan, 0.3, 0.1])
    assert float(_crossing(frequency, gap, 0.5)) == pytest.approx(0.1 + 0.2 * 0.4 / 0.6, rel=1e-6)
    # No non-empty shell before the first one below (a region without the zero frequency).
    assert float(_crossing(frequency, jnp.array([jnp.nan, 0.3, 0.2, 0.1, 0.0]), 0.5)) == 0.0


def _hard_cutoff_fsc(shape, cutoff_in_shells):
    """FSC of x and a copy that keeps x below the cutoff and is independent noise above it: the
    expected curve steps from 1 to 0 there, the shell holding the cutoff reads about 1/2."""
    shell = 1.0 / min(shape)
    cutoff = cutoff_in_shells * shell
    x, y = _band_mixture(_rng(14), shape, lambda f: (f < cutoff).astype(float))
    return fsc(x.astype(np.float32), y.astype(np.float32)), cutoff, shell


@pytest.mark.parametrize(
    ("shape", "cutoff_in_shells"),
    [((64, 64), 12), ((64, 64), 15.5), ((48, 64), 12), ((24, 24, 24), 6), ((20, 24, 28), 7.5)],
)
def test_fsc_crosses_one_half_within_one_shell_of_the_low_pass_cutoff(shape, cutoff_in_shells):
    # Past the cutoff the FSC is noise of standard deviation 1 / sqrt(n) <= 0.12 here.
    result, cutoff, shell = _hard_cutoff_fsc(shape, cutoff_in_shells)
    assert abs(1.0 / float(result.resolution_05) - cutoff) <= shell


@pytest.mark.parametrize(("shape", "cutoff_in_shells"), [((32, 32, 32), 10), ((24, 28, 32), 9.5)])
def test_fsc_crosses_0143_within_one_shell_of_the_cutoff_when_shells_hold_many_coefficients(
    shape, cutoff_in_shells
):
    # 3D shells this far out hold over 1000 coefficients: noise of 0.03, far below 0.143.
    result, cutoff, shell = _hard_cutoff_fsc(shape, cutoff_in_shells)
    assert abs(1.0 / float(result.resolution_0143) - cutoff) <= shell
    assert float(result.resolution_0143) <= float(result.resolution_05)


def test_resolution_in_angstrom_scales_with_the_voxel_size():
    gain = lambda f: 1.0 / (1.0 + (f / 0.15) ** 8)  # noqa: E731
    x, y = _band_mixture(_rng(15), (64, 64), gain)
    per_voxel = fsc(x, y)
    in_angstrom = fsc(x, y, voxel_size=2.5)
    np.testing.assert_allclose(in_angstrom.frequency, per_voxel.frequency / 2.5, rtol=1e-6)
    np.testing.assert_allclose(in_angstrom.fsc, per_voxel.fsc, rtol=1e-6)
    for name in ("resolution_05", "resolution_0143"):
        in_voxels = float(getattr(per_voxel, name))
        assert math.isfinite(in_voxels)
        assert float(getattr(in_angstrom, name)) == pytest.approx(2.5 * in_voxels, rel=1e-6)
    assert float(in_angstrom.frequency[-1]) == pytest.approx(1 / (2 * 2.5))  # Nyquist


def test_constrained_fsc_ignores_what_lies_outside_the_region():
    # y equals x inside a low-frequency band and is independent noise outside it.
    rng = _rng(16)
    shape = (32, 32, 32)
    x, z = rng.standard_normal((2,) + shape)
    freqs = np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), np.fft.rfftfreq(32), indexing="ij")
    inside = np.abs(freqs[0]) < 0.3  # a slab in kz, like the measured part of a wedge
    y = np.fft.irfftn(np.where(inside, np.fft.rfftn(x), np.fft.rfftn(z)), s=shape, axes=(0, 1, 2))
    constrained = fsc(x.astype(np.float32), y.astype(np.float32), region=inside)
    plain = fsc(x.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(np.asarray(constrained.fsc), 1.0, atol=1e-5)
    # Unconstrained, a shell correlates by the fraction of its coefficients inside the slab.
    n_inside = np.asarray(constrained.n_coefficients)
    n_all = np.asarray(plain.n_coefficients)
    assert np.all(n_inside[13:] < 0.75 * n_all[13:])  # the region matters out there
    deviation = np.abs(np.asarray(plain.fsc) - n_inside / n_all)
    np.testing.assert_array_less(deviation[1:], 4 / np.sqrt(n_all[1:]))


def test_fsc_resolution_is_infinite_when_the_maps_disagree_from_the_start():
    x = _rng(17).standard_normal((16, 16)).astype(np.float32)
    result = fsc(x, -x)
    assert float(result.resolution_05) == math.inf
    assert float(result.resolution_0143) == math.inf


def test_fsc_shells_can_be_set_explicitly_and_run_to_nyquist():
    x = _rng(18).standard_normal((30, 30)).astype(np.float32)
    result = fsc(x, x, n_shells=5)
    np.testing.assert_allclose(np.asarray(result.frequency), [0.0, 0.125, 0.25, 0.375, 0.5])


def test_fsc_under_jit_equals_eager_with_a_traced_voxel_size():
    rng = _rng(19)
    x, y = rng.standard_normal((2, 24, 24, 24)).astype(np.float32)
    y = y + x
    eager = fsc(x, y, voxel_size=3.0)
    jitted = jax.jit(fsc, static_argnames="n_shells")(x, y, jnp.float32(3.0))
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_shells": 1}, "at least 2"),
        ({"n_shells": 2.5}, "at least 2"),
        ({"region": np.ones((8, 8), dtype=bool)}, "half spectrum"),
    ],
)
def test_fsc_rejects_bad_arguments(kwargs, message):
    x = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match=message):
        fsc(x, x, **kwargs)


def test_fsc_rejects_1d_input():
    with pytest.raises(ValueError, match="2D or 3D"):
        fsc(np.zeros(16), np.zeros(16))
