"""Reconstruction solvers checked against closed forms and independent dense solvers."""

from __future__ import annotations

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.operators import TiltGeometry, TiltProjector
from cryojax_mw.reconstruct import (
    Reconstruction,
    angular_weights,
    cgls,
    sirt,
    tv_map,
    tv_weight,
    wbp,
)
from cryojax_mw.simulate import random_blobs, shepp_logan


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _disc(n: int) -> np.ndarray:
    """Pixels every projection of the full range sees: the disc inscribed in the image."""
    z, x = np.mgrid[:n, :n] - (n - 1) / 2
    return z**2 + x**2 <= (n / 2 - 2) ** 2


def _rel_err(x, ref, mask):
    x, ref = np.asarray(x), np.asarray(ref)
    return np.linalg.norm((x - ref)[mask]) / np.linalg.norm(ref[mask])


def _dense(op: TiltProjector) -> np.ndarray:
    """The operator's matrix, column j = A e_j (independent of any solver)."""
    n_in = int(np.prod(op.volume_shape))
    basis = jnp.eye(n_in, dtype=jnp.float64).reshape((n_in,) + op.volume_shape)
    return np.asarray(jax.vmap(op.mv)(basis)).reshape(n_in, -1).T


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    fz = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.fftfreq(image.shape[1])[None, :]
    kernel = np.exp(-2 * np.pi**2 * sigma**2 * (fz**2 + fx**2))
    return np.real(np.fft.ifft2(np.fft.fft2(image) * kernel))


# ----------------------------------------------------------------------------------------- WBP


@pytest.fixture(scope="module")
def full_range_128():
    n = 128
    op = TiltProjector(TiltGeometry.from_range(-89.5, 89.5, 1.0), (n, n))
    return n, op


def test_wbp_full_range_reconstructs_shepp_logan_values_and_mean(full_range_128):
    n, op = full_range_128
    phantom = shepp_logan((n, n))
    result = wbp(op.mv(phantom), op, "ramp")
    assert isinstance(result, Reconstruction) and result.residuals.shape == (1,)
    disc = _disc(n)
    # Reached 0.198; the error sits on the one-pixel-sharp skull ring (scikit-image's iradon
    # scores 0.219 on the same phantom and angles). A missing or doubled weight gives ~1.
    assert _rel_err(result.volume, phantom, disc) < 0.21
    mean_ratio = np.asarray(result.volume)[disc].mean() / np.asarray(phantom)[disc].mean()
    assert abs(mean_ratio - 1.0) < 0.02  # reached 0.9998


def test_wbp_full_range_reconstructs_band_limited_phantom_within_six_percent(full_range_128):
    n, op = full_range_128
    # Blurring by one pixel removes the edges no discrete inversion formula can keep sharp.
    smooth = jnp.asarray(_gaussian_blur(np.asarray(shepp_logan((n, n))), 1.0), jnp.float32)
    result = wbp(op.mv(smooth), op, "ramp")
    assert _rel_err(result.volume, smooth, _disc(n)) < 0.06  # reached 0.049


def test_wbp_padding_prevents_wraparound_bias(full_range_128):
    n, op = full_range_128
    phantom = shepp_logan((n, n))
    data = op.mv(phantom)
    disc = _disc(n)
    mean = np.asarray(phantom)[disc].mean()
    padded = np.asarray(wbp(data, op, pad=True).volume)[disc].mean() / mean
    circular = np.asarray(wbp(data, op, pad=False).volume)[disc].mean() / mean
    assert abs(padded - 1.0) < 0.02
    # Circular convolution folds the ramp's negative tails back onto the object.
    assert abs(circular - 1.0) > 0.05


def test_wbp_filters_order_by_high_frequency_energy(full_range_128):
    n, op = full_range_128
    data = op.mv(shepp_logan((n, n)))
    f = np.fft.fftfreq(n)
    high = np.hypot(f[:, None], f[None, :]) > 0.25  # above half the Nyquist frequency
    energy = {}
    for name in ("ramp", "shepp-logan", "hann"):
        spectrum = np.abs(np.fft.fft2(np.asarray(wbp(data, op, name).volume))) ** 2
        energy[name] = spectrum[high].sum()
    assert energy["hann"] < 0.5 * energy["shepp-logan"] < 0.5 * energy["ramp"]


def test_wbp_uneven_full_range_reconstructs_as_well_as_even_spacing():
    n = 64
    phantom = shepp_logan((n, n))
    even = TiltProjector(TiltGeometry.from_range(-89.5, 89.5, 1.0), (n, n))
    # Four times denser sampling on one side: equal weights would over-count it (error 0.43).
    angles = np.concatenate([np.arange(-89.75, 0.0, 0.5), np.arange(1.0, 90.0, 2.0)])
    uneven = TiltProjector(TiltGeometry(np.random.default_rng(0).permutation(angles)), (n, n))
    disc = _disc(n)
    err_even = _rel_err(wbp(even.mv(phantom), even).volume, phantom, disc)
    err_uneven = _rel_err(wbp(uneven.mv(phantom), uneven).volume, phantom, disc)
    assert abs(err_uneven - err_even) < 0.01


def test_wbp_3d_equals_2d_slice_by_slice():
    nz, ny, nx = 20, 3, 24
    geom = TiltGeometry.from_range(-60, 60, 4)
    volume = random_blobs(jax.random.key(3), (nz, ny, nx), 6)
    op3 = TiltProjector(geom, (nz, ny, nx))
    op2 = TiltProjector(geom, (nz, nx))
    data = op3.mv(volume)
    rec3 = wbp(data, op3, "shepp-logan").volume
    for j in range(ny):
        rec2 = wbp(data[:, j, :], op2, "shepp-logan").volume
        np.testing.assert_allclose(rec3[:, j, :], rec2, rtol=1e-5, atol=1e-6)


def test_angular_weights_evenly_spaced_limited_range_are_the_step():
    w = angular_weights(np.arange(-60.0, 60.1, 3.0))
    np.testing.assert_allclose(w, 3.0, rtol=1e-12)


def test_angular_weights_uneven_asymmetric_sum_to_covered_range_in_any_order():
    angles = np.array([-47.0, -40.0, -31.5, -20.0, -2.0, 0.0, 5.0, 21.0, 40.0, 66.0])
    w = angular_weights(angles)
    first_gap, last_gap = angles[1] - angles[0], angles[-1] - angles[-2]
    covered = angles.max() - angles.min() + (first_gap + last_gap) / 2
    assert w.sum() == pytest.approx(covered, rel=1e-12)
    # Each inner projection owns half of each neighbouring gap.
    np.testing.assert_allclose(w[1:-1], (angles[2:] - angles[:-2]) / 2, rtol=1e-12)
    perm = np.random.default_rng(1).permutation(len(angles))
    np.testing.assert_allclose(angular_weights(angles[perm]), w[perm], rtol=1e-12)


def test_angular_weights_full_half_turn_wraps_modulo_180():
    rng = np.random.default_rng(2)
    # Jittered full coverage: the gap across +-90 is no wider than the others.
    angles = np.clip(np.arange(-88.0, 90.0, 4.0) + rng.uniform(-1, 1, 45), -89.9, 89.9)
    w = angular_weights(angles)
    assert w.sum() == pytest.approx(180.0, rel=1e-12)
    s = np.sort(angles)
    first = w[np.argmin(angles)]
    assert first == pytest.approx((s[1] - (s[-1] - 180.0)) / 2, rel=1e-12)


# ------------------------------------------------------------------------------------ CGLS


def test_cgls_matches_dense_least_squares_solution(x64):
    n = 12
    op = TiltProjector(TiltGeometry(np.linspace(-84, 84, 15)), (n, n))
    m = _dense(op)
    b = np.random.default_rng(0).normal(size=m.shape[0])  # inconsistent data
    x_ls = np.linalg.lstsq(m, b, rcond=None)[0]
    result = cgls(jnp.asarray(b.reshape(15, n)), op, 400)
    x = np.asarray(result.volume).ravel()
    assert np.linalg.norm(x - x_ls) / np.linalg.norm(x_ls) < 1e-6
    r_ls = np.linalg.norm(m @ x_ls - b) / np.linalg.norm(b)
    assert float(result.residuals[-1]) == pytest.approx(r_ls, rel=1e-8)


def test_cgls_from_zero_finds_minimum_norm_solution_of_underdetermined_system(x64):
    n = 12
    op = TiltProjector(TiltGeometry(np.linspace(-60, 60, 8)), (n, n))  # 96 rays, 144 unknowns
    m = _dense(op)
    b = np.random.default_rng(1).normal(size=m.shape[0])
    x_min_norm = np.linalg.lstsq(m, b, rcond=None)[0]
    data = jnp.asarray(b.reshape(8, n))
    x = np.asarray(cgls(data, op, 300).volume).ravel()
    assert np.linalg.norm(x - x_min_norm) / np.linalg.norm(x_min_norm) < 1e-6
    # From another start CGLS keeps that start's null-space part: x0 + M^+ (b - M x0).
    start = np.random.default_rng(2).normal(size=n * n)
    expected = start + np.linalg.pinv(m) @ (b - m @ start)
    x_other = np.asarray(cgls(data, op, 300, x0=jnp.asarray(start.reshape(n, n))).volume).ravel()
    assert np.linalg.norm(x_other - expected) / np.linalg.norm(expected) < 1e-6
    assert np.linalg.norm(expected - x_min_norm) > 0.1 * np.linalg.norm(x_min_norm)


# ------------------------------------------------------------------------------------ SIRT


def test_sirt_iterates_equal_the_dense_sirt_formula(x64):
    n, k = 12, 15
    op = TiltProjector(TiltGeometry(np.linspace(-84, 84, k)), (n, n))
    m = _dense(op)
    b = np.random.default_rng(3).normal(size=m.shape[0])
    inv_row, inv_col = 1.0 / m.sum(axis=1), 1.0 / m.sum(axis=0)
    x = np.zeros(n * n)
    for _ in range(3):
        x = x + 0.7 * inv_col * (m.T @ (inv_row * (b - m @ x)))
    result = sirt(jnp.asarray(b.reshape(k, n)), op, 3, relaxation=0.7)
    np.testing.assert_allclose(np.asarray(result.volume).ravel(), x, rtol=1e-10, atol=1e-12)


def test_sirt_approaches_weighted_least_squares_minimum(x64):
    n, k = 12, 15
    op = TiltProjector(TiltGeometry(np.linspace(-84, 84, k)), (n, n))
    m = _dense(op)
    truth = np.asarray(random_blobs(jax.random.key(0), (n, n), 3, dtype=jnp.float64)).ravel()
    b = m @ truth + 0.1 * np.random.default_rng(4).normal(size=m.shape[0])
    sqrt_r = np.sqrt(1.0 / m.sum(axis=1))
    x_wls = np.linalg.lstsq(sqrt_r[:, None] * m, sqrt_r * b, rcond=None)[0]

    def weighted(x):
        return np.sum((sqrt_r * (m @ np.asarray(x).ravel() - b)) ** 2)

    data, x = jnp.asarray(b.reshape(k, n)), None
    gaps = [weighted(np.zeros(n * n)) - weighted(x_wls)]
    for _ in range(4):  # warm starts continue the same iteration
        x = sirt(data, op, 100, x0=x, relaxation=1.9).volume
        gaps.append(weighted(x) - weighted(x_wls))
    assert all(0 < g1 < g0 for g0, g1 in zip(gaps, gaps[1:]))
    assert gaps[-1] < 1e-3 * gaps[0]  # reached 3.7e-4 (gradient descent: O(1/k) in the gap)


def test_sirt_residual_decreases_monotonically_and_fits_consistent_data(x64):
    n, k = 12, 15
    op = TiltProjector(TiltGeometry(np.linspace(-84, 84, k)), (n, n))
    data = op.mv(random_blobs(jax.random.key(0), (n, n), 3, dtype=jnp.float64))
    for nonnegative in (False, True):
        result = sirt(data, op, 300, nonnegative=nonnegative)
        res = np.asarray(result.residuals)
        assert res.shape == (300,)
        assert np.all(np.diff(res) <= 0)
        assert res[-1] < 1e-2
        if nonnegative:
            assert float(result.volume.min()) >= 0.0
        else:  # the constraint is active: without it the iterate dips below zero
            assert float(result.volume.min()) < 0.0


# ---------------------------------------------------------------------------------- TV-MAP


def _tv_admm(m, b, lam, shape, iters=3000, rho=1.0):
    """Independent solver of 0.5||Mx-b||^2 + lam TV(x): ADMM with a dense x-update."""
    n_pix = int(np.prod(shape))
    diffs = []
    for axis, size in enumerate(shape):
        d1 = np.eye(size, k=1) - np.eye(size)
        d1[-1] = 0.0  # no difference across the far edge
        eyes = [np.eye(s) for s in shape]
        eyes[axis] = d1
        op = eyes[0]
        for e in eyes[1:]:
            op = np.kron(op, e)
        diffs.append(op)
    d = np.vstack(diffs)
    solve = np.linalg.inv(m.T @ m + rho * d.T @ d)
    z = np.zeros(d.shape[0])
    u = np.zeros_like(z)
    for _ in range(iters):
        x = solve @ (m.T @ b + rho * d.T @ (z - u))
        v = (d @ x + u).reshape(len(shape), n_pix)
        norm = np.sqrt(np.sum(v**2, axis=0))
        z = (v * np.maximum(0.0, 1.0 - (lam / rho) / np.maximum(norm, 1e-300))).ravel()
        u = u + d @ x - z
    tv = np.sum(np.sqrt(np.sum((d @ x).reshape(len(shape), n_pix) ** 2, axis=0)))
    return x, 0.5 * np.sum((m @ x - b) ** 2) + lam * tv


@pytest.fixture(scope="module")
def tv_problem():
    with jax.enable_x64(True):
        n, k = 12, 15
        op = TiltProjector(TiltGeometry(np.linspace(-84, 84, k)), (n, n))
        m = _dense(op)
        truth = np.asarray(shepp_logan((n, n), dtype=jnp.float64)).ravel()
        b = m @ truth + 0.3 * np.random.default_rng(6).normal(size=m.shape[0])
    return op, m, b


def test_tv_map_objective_agrees_with_independent_admm_solver(x64, tv_problem):
    op, m, b = tv_problem
    lam = 0.5
    x_ref, f_ref = _tv_admm(m, b, lam, op.volume_shape)
    result = tv_map(jnp.asarray(b.reshape(op.tilt_series_shape)), op, lam, 3000)
    obj = np.asarray(result.objective)
    assert obj.shape == (3000,)
    assert obj[-1] < obj[0]
    # PDHG's objective is not monotone, so compare the final value with the reference minimum.
    assert abs(obj[-1] - f_ref) < 1e-6 * f_ref
    assert np.max(np.abs(np.asarray(result.volume).ravel() - x_ref)) < 1e-4


def test_tv_map_residual_approaches_least_squares_as_lam_goes_to_zero(x64, tv_problem):
    op, m, b = tv_problem
    r_ls = np.linalg.norm(m @ np.linalg.lstsq(m, b, rcond=None)[0] - b) / np.linalg.norm(b)
    data = jnp.asarray(b.reshape(op.tilt_series_shape))
    final = [float(tv_map(data, op, lam, 3000).residuals[-1]) for lam in (1.0, 0.1, 0.01, 0.0)]
    assert all(r1 < r0 for r0, r1 in zip(final, final[1:]))
    # With lam = 0 PDHG is a plain least-squares solver, slow on this system's condition
    # number (about 460): reached 1.9 % above the minimum.
    assert r_ls < final[-1] < 1.03 * r_ls


def test_tv_map_nonnegative_stays_feasible_and_new_lam_does_not_retrace(
    x64, tv_problem, trace_counter
):
    op, _, b = tv_problem
    data = jnp.asarray(b.reshape(op.tilt_series_shape))
    result = tv_map(data, op, 0.2, 300, nonnegative=True)
    assert float(result.volume.min()) >= 0.0
    assert result.objective[-1] < result.objective[0]
    with trace_counter as traces:
        tv_map(data, op, 0.3, 300, nonnegative=True)
    assert traces.count == 0


def test_relative_tv_weight_makes_tv_map_equivariant_to_the_data_scale(x64, tv_problem):
    """With tv_weight, scaling the data by c scales the reconstruction by c: units do not matter."""
    op, _, b = tv_problem
    data = jnp.asarray(b.reshape(op.tilt_series_shape))
    c = 37.0
    ref = tv_map(data, op, tv_weight(0.1, data, op.volume_shape[0]), 300).volume
    scaled = tv_map(c * data, op, tv_weight(0.1, c * data, op.volume_shape[0]), 300).volume
    np.testing.assert_allclose(
        scaled, c * ref, rtol=1e-8, atol=1e-8 * c * float(jnp.abs(ref).max())
    )
    with pytest.raises(ValueError, match=">= 0"):
        tv_weight(-0.1, data, op.volume_shape[0])


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 4)])
def test_tv_gradient_adjoint_dot_product(x64, shape):
    from cryojax_mw.reconstruct._tv import _gradient, _gradient_adjoint

    rng = np.random.default_rng(8)
    x, q = rng.normal(size=shape), rng.normal(size=(len(shape),) + shape)
    pair = jax.jit(lambda x, q: (jnp.vdot(_gradient(x), q), jnp.vdot(x, _gradient_adjoint(q))))
    lhs, rhs = pair(x, q)
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(lhs))


# ------------------------------------------------------------------------ shared behaviour


@pytest.fixture(scope="module")
def small_problem():
    with jax.enable_x64(True):
        n, k = 12, 15
        op = TiltProjector(TiltGeometry(np.linspace(-84, 84, k)), (n, n))
        data = op.mv(shepp_logan((n, n), dtype=jnp.float64))
    return op, data


_SOLVERS = {
    "sirt": lambda data, op, n, **kw: sirt(data, op, n, nonnegative=True, **kw),
    "cgls": lambda data, op, n, **kw: cgls(data, op, n, **kw),
    "tv_map": lambda data, op, n, **kw: tv_map(data, op, 0.05, n, **kw),
}


@pytest.mark.parametrize("name", sorted(_SOLVERS))
def test_progress_bar_gives_identical_iterations(x64, small_problem, name):
    op, data = small_problem
    plain = _SOLVERS[name](data, op, 25)
    chunked = _SOLVERS[name](data, op, 25, progress=True)  # chunks of 10, 10, 5
    for a, c in zip(plain, chunked):
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_jit_and_no_jit_agree(x64):
    # Tiny, because without jit the projector's inner loops run op by op. tv_map shares the
    # driver; its 50-step norm estimate makes it too slow to run here without jit.
    op = TiltProjector(TiltGeometry([-50.0, -10.0, 20.0, 45.0]), (6, 6))
    data = op.mv(shepp_logan((6, 6), dtype=jnp.float64))

    def run():
        return [wbp(data, op, "hann"), sirt(data, op, 2, nonnegative=True), cgls(data, op, 2)]

    jitted = run()
    with jax.disable_jit():
        eager = run()
    for rj, re in zip(jitted, eager):
        np.testing.assert_allclose(rj.volume, re.volume, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(rj.residuals, re.residuals, rtol=1e-10, atol=1e-12)


def test_3d_float32_data_keeps_dtype_and_lowers_residual():
    shape = (10, 3, 12)
    op = TiltProjector(TiltGeometry.from_range(-60, 60, 15), shape)
    data = op.mv(random_blobs(jax.random.key(7), shape, 3))
    for result in (wbp(data, op), sirt(data, op, 10), tv_map(data, op, 0.01, 10)):
        assert result.volume.shape == shape
        assert all(a.dtype == jnp.float32 for a in result if a is not None)
        assert float(result.residuals[-1]) < 0.5  # x = 0 has residual 1


_BAD_INPUTS = [
    ("wrong tilt series shape", lambda op, d: sirt(d[:, :-1], op, 5), "tilt series has shape"),
    ("zero iterations", lambda op, d: cgls(d, op, 0), "num_iters"),
    ("float iterations", lambda op, d: sirt(d, op, 5.0), "num_iters"),
    ("negative lam", lambda op, d: tv_map(d, op, -0.1, 5), "lam"),
    ("relaxation 2", lambda op, d: sirt(d, op, 5, relaxation=2.0), "relaxation"),
    ("x0 shape", lambda op, d: cgls(d, op, 5, x0=np.zeros((3, 3))), "x0 has shape"),
    ("unknown filter", lambda op, d: wbp(d, op, "cosine"), "unknown filter"),
    ("wbp on a non-projector", lambda op, d: wbp(d, op.T.T * 2.0, "ramp"), "TiltProjector"),
    (
        "wbp with one tilt",
        lambda op, d: wbp(d[:1], TiltProjector(TiltGeometry([0.0]), op.volume_shape)),
        "at least two tilt angles",
    ),
]


@pytest.mark.parametrize("case", _BAD_INPUTS, ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_raises_value_error_before_compiling(small_problem, case, trace_counter):
    op, data = small_problem
    _, call, message = case
    data = np.asarray(data, np.float32)
    with trace_counter as traces, pytest.raises(ValueError, match=message):
        call(op, data)
    assert traces.count == 0
