"""Denoisers checked by adjointness, ROF optimality certificates, closed forms and SciPy.

The ROF tests rest on weak duality. For a dual field p with |p_i| <= 1 and
L(x, p) = 0.5 ||x - y||^2 + lam <x, div p>, every x in the constraint set C satisfies
F(x) = 0.5 ||x - y||^2 + lam TV(x) >= L(x, p) >= D(p) = min_{x in C} L(x, p), and F is 1-strongly
convex, so 0.5 ||x - x*||^2 <= F(x) - F* <= F(x) - D(p). Each solver's distance to the exact
minimiser is thus certified from NumPy evaluations of F and D that share no code with the package.
"""

from __future__ import annotations

import itertools
import math

import equinox as eqx
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import nnx

from cryojax_mw.denoisers import (
    AbstractDenoiser,
    FlaxDenoiser,
    GaussianDenoiser,
    TVDenoiser,
    divergence,
    gaussian_denoise,
    gradient,
    moreau_yosida_tv_grad,
    tv_denoise_chambolle,
    tv_denoise_fgp,
    tv_norm,
    tv_prox,
)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------- NumPy reference, no shared code


def _np_grad(x: np.ndarray) -> np.ndarray:
    parts = []
    for axis in range(x.ndim):
        last = np.zeros_like(np.take(x, [0], axis=axis))
        parts.append(np.concatenate([np.diff(x, axis=axis), last], axis=axis))
    return np.stack(parts)


def _np_div(p: np.ndarray) -> np.ndarray:
    """-grad^T written out: (div p)_i = sum_d p_d[i] - p_d[i-1], with p_d[-1] = p_d[n-1] = 0."""
    out = np.zeros(p.shape[1:])
    for axis in range(p.shape[0]):
        q = np.moveaxis(p[axis], axis, 0).copy()
        q[-1] = 0.0
        d = q.copy()
        d[1:] -= q[:-1]
        out += np.moveaxis(d, 0, axis)
    return out


def _rof(x, y, lam) -> float:
    g = _np_grad(np.asarray(x))
    return 0.5 * np.sum((x - y) ** 2) + lam * np.sum(np.sqrt(np.sum(g * g, axis=0)))


def _dual(p, y, lam, nonnegative=False) -> float:
    """D(p) = min over C of L(x, p); needs |p_i| <= 1 to be a lower bound on F*."""
    p = np.asarray(p)
    assert np.sqrt(np.sum(p * p, axis=0)).max() <= 1.0 + 1e-12
    dp = _np_div(p)
    x = y - lam * dp
    if nonnegative:
        x = np.maximum(x, 0.0)
    return 0.5 * np.sum((x - y) ** 2) + lam * np.sum(x * dp)


def _chambolle_pock(y, lam, num_iters, nonnegative=False):
    """Accelerated primal-dual (Chambolle & Pock 2011, Alg. 2, gamma = 1) on the ROF problem.

    Returns (x, p) with p = -q / lam in the package's sign convention (x = y - lam div p).
    """
    tau = sigma = 1.0 / math.sqrt(4 * y.ndim)
    x, x_bar, q = y.copy(), y.copy(), np.zeros((y.ndim,) + y.shape)
    for _ in range(num_iters):
        q = q + sigma * _np_grad(x_bar)
        q = q / np.maximum(1.0, np.sqrt(np.sum(q * q, axis=0)) / lam)
        x_new = (x + tau * _np_div(q) + tau * y) / (1.0 + tau)
        if nonnegative:
            x_new = np.maximum(x_new, 0.0)
        theta = 1.0 / math.sqrt(1.0 + 2.0 * tau)
        tau, sigma = theta * tau, sigma / theta
        x_bar, x = x_new + theta * (x_new - x), x_new
    return x, -q / lam


def _normal(seed, shape, dtype=jnp.float32) -> jax.Array:
    # NumPy draws: jax.random.normal compiles for seconds on 2 CPU cores per shape and dtype.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _step_image(seed=0, shape=(12, 14)) -> np.ndarray:
    """Noise on a step edge along the last axis: an array with a non-trivial ROF solution."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=shape) + np.where(np.arange(shape[-1]) > shape[-1] // 2, 2.0, 0.0)


# ------------------------------------------------------------------------ finite differences


@pytest.mark.parametrize("shape", [(9, 11), (5, 6, 7)])
def test_divergence_is_the_exact_negative_adjoint_of_gradient(x64, shape):
    for dtype, tol in ((jnp.float64, 1e-12), (jnp.float32, 1e-5)):
        x = _normal(0, shape, dtype)
        p = _normal(1, (len(shape),) + shape, dtype)
        lhs = jnp.vdot(gradient(x), p)
        rhs = -jnp.vdot(x, divergence(p))
        scale = jnp.linalg.norm(gradient(x)) * jnp.linalg.norm(p)
        assert abs(float(lhs - rhs)) <= tol * float(scale)


def test_gradient_divergence_and_tv_norm_match_numpy_forward_differences(x64):
    rng = np.random.default_rng(1)
    for shape in ((9, 11), (5, 6, 7)):
        x = rng.normal(size=shape)
        p = rng.normal(size=(len(shape),) + shape)
        np.testing.assert_allclose(gradient(jnp.asarray(x)), _np_grad(x), rtol=0, atol=1e-14)
        np.testing.assert_allclose(divergence(jnp.asarray(p)), _np_div(p), rtol=0, atol=1e-14)
        assert abs(float(tv_norm(jnp.asarray(x))) - _rof(x, x, 1.0)) < 1e-12 * x.size


@pytest.mark.parametrize("shape", [(16, 18), (8, 9, 10)])
def test_gradient_norm_squared_is_below_and_near_4_ndim(x64, shape):
    """The solvers' steps 1 / (4 ndim) rest on ||grad||^2 <= 4 ndim; the bound is nearly tight."""

    def normal_op(x):
        return -divergence(gradient(x))

    def power_step(_, x):
        x = normal_op(x)
        return x / jnp.linalg.norm(x)

    x = _normal(2, shape, jnp.float64)
    x = jax.jit(lambda x: jax.lax.fori_loop(0, 300, power_step, x))(x)
    top = float(jnp.vdot(x, normal_op(x)))
    assert 0.9 * 4 * len(shape) < top <= 4 * len(shape)


# ------------------------------------------------------------------------ ROF optimality


def test_chambolle_fgp_and_primal_dual_reach_the_same_rof_minimiser(x64):
    y, lam = _step_image(), 0.5
    ks = (10, 40, 160, 640)
    fgp = [tuple(map(np.asarray, tv_denoise_fgp(jnp.asarray(y), lam, k))) for k in ks]
    cham = [tuple(map(np.asarray, tv_denoise_chambolle(jnp.asarray(y), lam, k))) for k in ks]
    x_ref, p_ref = _chambolle_pock(y, lam, 3000)
    x_fgp, p_fgp = map(np.asarray, tv_denoise_fgp(jnp.asarray(y), lam, 3000))
    x_cham, p_cham = map(np.asarray, tv_denoise_chambolle(jnp.asarray(y), lam, 3000))

    # Duality gaps, each from the solver's own dual: FGP's falls as O(1/k^2) (4x the iterations,
    # over 10x smaller; reached 26x-90x), Chambolle's falls more slowly and stays above FGP's.
    gap_fgp = [_rof(x, y, lam) - _dual(p, y, lam) for x, p in fgp]
    gap_cham = [_rof(x, y, lam) - _dual(p, y, lam) for x, p in cham]
    assert all(b < a / 10 for a, b in itertools.pairwise(gap_fgp))
    assert all(b < a for a, b in itertools.pairwise(gap_cham))
    assert all(f < c for f, c in zip(gap_fgp, gap_cham))

    # Certified distances to the exact minimiser from the best lower bound on F*; FGP's gap after
    # 3000 iterations reached 1e-10, the primal-dual reference's 1.5e-5 (it converges as O(1/k)).
    lower = max(_dual(p, y, lam) for p in (p_ref, p_fgp, p_cham))
    radius = {
        name: math.sqrt(2 * (_rof(x, y, lam) - lower))
        for name, x in (("ref", x_ref), ("fgp", x_fgp), ("cham", x_cham))
    }
    assert radius["fgp"] < 1e-4 and radius["cham"] < 2e-2 and radius["ref"] < 1e-2
    assert np.linalg.norm(x_fgp - x_ref) <= radius["fgp"] + radius["ref"]
    assert np.linalg.norm(x_cham - x_ref) <= radius["cham"] + radius["ref"]
    assert np.linalg.norm(x_fgp - x_cham) <= radius["fgp"] + radius["cham"]


def test_fgp_3d_certified_near_the_minimiser_and_float32_only_adds_round_off():
    y = _step_image(3, (6, 7, 8))
    x32, p32 = tv_denoise_fgp(jnp.asarray(y, jnp.float32), 0.4, 1000)
    assert x32.dtype == p32.dtype == jnp.float32
    with jax.enable_x64(True):
        x64_, p64 = map(np.asarray, tv_denoise_fgp(jnp.asarray(y), 0.4, 1000))
    # 3D converges more slowly than 2D: the certified radius reached 2.4e-3.
    assert math.sqrt(2 * (_rof(x64_, y, 0.4) - _dual(p64, y, 0.4))) < 5e-3
    # Same iterations in float32: reached 4e-8 relative (float32 eps is 6e-8).
    diff = np.linalg.norm(np.asarray(x32, np.float64) - x64_)
    assert diff < 1e-6 * np.linalg.norm(y)


@pytest.mark.parametrize("solver", [tv_denoise_fgp, tv_denoise_chambolle])
def test_lam_zero_returns_y_and_small_lam_stays_within_lam_times_norm_of_div(x64, solver):
    y = jnp.asarray(_step_image())
    x0, _ = solver(y, 0.0, 7)
    np.testing.assert_array_equal(x0, y)
    # x = y - lam div p with |p_i| <= 1, so ||x - y|| <= lam ||div|| ||p|| <= lam sqrt(8 * N).
    lam = 1e-3
    x, p = solver(y, lam, 7)
    assert float(jnp.linalg.norm(x - y)) <= lam * math.sqrt(8 * y.size)
    assert float(jnp.max(jnp.sqrt(jnp.sum(p * p, axis=0)))) <= 1.0 + 1e-12


@pytest.mark.parametrize("lam", [20.0, 1e4])
def test_large_lam_returns_the_constant_mean(x64, lam):
    y = _step_image()
    x, p = map(np.asarray, tv_denoise_fgp(jnp.asarray(y), lam, 1000))
    mean = np.full_like(y, y.mean())
    # Reached 9.4e-6: the dual converges like a Laplacian least-squares problem.
    assert np.abs(x - mean).max() < 1e-4
    assert abs(x.mean() - y.mean()) < 1e-12  # sum(div p) = 0 for every p
    if lam == 20.0:
        # Certificate that the constant is the minimiser (F(mean) has no TV term).
        assert math.sqrt(2 * (_rof(mean, y, lam) - _dual(p, y, lam))) < 1e-3


def test_unconstrained_solvers_keep_the_mean_exactly(x64):
    y = jnp.asarray(_step_image(4))
    for solver in (tv_denoise_fgp, tv_denoise_chambolle):
        x, _ = solver(y, 0.7, 13)
        assert abs(float(jnp.mean(x) - jnp.mean(y))) < 1e-14


def test_chambolle_warm_start_continues_the_iteration_exactly(x64):
    y = jnp.asarray(_step_image())
    x20, p20 = tv_denoise_chambolle(y, 0.5, 20)
    _, p10 = tv_denoise_chambolle(y, 0.5, 10)
    x_warm, p_warm = tv_denoise_chambolle(y, 0.5, 10, dual=p10)
    np.testing.assert_allclose(x_warm, x20, rtol=0, atol=1e-13)
    np.testing.assert_allclose(p_warm, p20, rtol=0, atol=1e-13)


def test_fgp_warm_start_from_a_similar_input_needs_half_the_iterations(x64):
    """The MWR sampler denoises a slightly perturbed volume at each step."""
    rng = np.random.default_rng(5)
    y, lam = _step_image(), 0.5
    y_next = jnp.asarray(y + 0.05 * rng.normal(size=y.shape))
    _, dual = tv_denoise_fgp(jnp.asarray(y), lam, 200)
    for k in (5, 10, 20):
        x_warm, _ = tv_denoise_fgp(y_next, lam, k, dual=dual)
        x_cold, _ = tv_denoise_fgp(y_next, lam, 2 * k)
        # Objective above the optimum reached 0.18 vs 0.47, 0.059 vs 0.097, 0.012 vs 0.019.
        assert _rof(np.asarray(x_warm), y_next, lam) < _rof(np.asarray(x_cold), y_next, lam)


def test_nonnegative_fgp_is_optimal_among_nonnegative_images(x64):
    y, lam = _step_image() - 1.5, 0.5
    x, p = map(np.asarray, tv_denoise_fgp(jnp.asarray(y), lam, 1000, nonnegative=True))
    assert x.min() >= 0.0
    x_unc, _ = tv_denoise_fgp(jnp.asarray(y), lam, 1000)
    clipped = np.maximum(np.asarray(x_unc), 0.0)
    # Clipping the unconstrained minimiser is feasible but not optimal: 0.055 worse here.
    assert _rof(x, y, lam) < _rof(clipped, y, lam) - 0.01
    x_ref, p_ref = _chambolle_pock(y, lam, 3000, nonnegative=True)
    lower = max(_dual(p, y, lam, nonnegative=True) for p in (p, p_ref))
    radius = math.sqrt(2 * (_rof(x, y, lam) - lower))
    radius_ref = math.sqrt(2 * (_rof(x_ref, y, lam) - lower))
    assert radius < 2e-3  # reached 5.2e-4
    assert np.linalg.norm(x - x_ref) <= radius + radius_ref


# ------------------------------------------------------------------ Moreau-Yosida gradient


def test_moreau_yosida_gradient_matches_central_differences_of_the_envelope(x64):
    x, lam, iters = _step_image(6), 0.2, 5000
    v = np.random.default_rng(7).normal(size=x.shape)
    v /= np.linalg.norm(v)
    h = 1e-4

    def envelope(z):
        """M(z) from the prox, with an upper bound on its error (the prox's duality gap / lam)."""
        u, p = map(np.asarray, tv_prox(jnp.asarray(z), lam, iters))
        gap = max(_rof(u, z, lam) - _dual(p, z, lam), 0.0)  # reached 5e-12
        return _rof(u, z, lam) / lam, gap / lam, math.sqrt(2 * gap) / lam

    m_plus, err_plus, _ = envelope(x + h * v)
    m_minus, err_minus, _ = envelope(x - h * v)
    _, _, grad_err = envelope(x)
    fd = (m_plus - m_minus) / (2 * h)
    exact = float(np.vdot(np.asarray(moreau_yosida_tv_grad(jnp.asarray(x), lam, iters)), v))
    # Central differences of a convex function with (1/lam)-Lipschitz gradient are within
    # h ||v||^2 / (4 lam); inexact envelope values add (err+ + err-) / (2h); the computed gradient
    # is within ||u - prox|| / lam <= sqrt(2 gap) / lam of the exact one.
    bound = h / (4 * lam) + (err_plus + err_minus) / (2 * h) + grad_err
    assert bound < 1e-3 and abs(exact) > 0.1
    assert abs(fd - exact) <= bound


def test_moreau_yosida_gradient_is_x_minus_prox_over_lam(x64):
    x, lam = jnp.asarray(_step_image(8)), 0.3
    u, _ = tv_prox(x, lam, 50)
    np.testing.assert_allclose(moreau_yosida_tv_grad(x, lam, 50), (x - u) / lam, atol=1e-12)


# ------------------------------------------------------------------------------ Gaussian


def _kernel_l1_gap(n: int, sigma: float) -> tuple[float, float]:
    """L1 distance between SciPy's truncated wrapped kernel and the periodic Fourier kernel on n
    points, and the Fourier kernel's L1 norm."""
    radius = int(4.0 * sigma + 0.5)  # scipy's truncate=4.0
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    wrapped = np.zeros(n)
    np.add.at(wrapped, np.arange(-radius, radius + 1) % n, taps / taps.sum())
    fourier = np.real(np.fft.ifft(np.exp(-2 * np.pi**2 * sigma**2 * np.fft.fftfreq(n) ** 2)))
    return float(np.abs(wrapped - fourier).sum()), float(np.abs(fourier).sum())


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_matches_scipy_wrap_within_the_kernel_difference_bound(x64, sigma):
    x = np.random.default_rng(9).normal(size=(40, 46))
    ours = np.asarray(gaussian_denoise(jnp.asarray(x), sigma))
    ref = scipy.ndimage.gaussian_filter(x, sigma, mode="wrap")
    # Both are periodic, so every voxel counts (no boundary band to leave out). For separable
    # kernels ||a0 a1 - b0 b1||_1 <= ||a0 - b0||_1 ||a1||_1 + ||b0||_1 ||a1 - b1||_1 (b0 from
    # SciPy, of unit mass), times max|x|: truncation at 4 sigma plus sampled-vs-continuous
    # aliasing. The bound is 0.052 at sigma = 1 (aliasing dominates; the difference reached
    # 0.0047) and 2.5e-4 at sigma = 2 (reached 2.4e-5); sigma off by 10% differs by 0.13 / 0.065.
    d0, _ = _kernel_l1_gap(x.shape[0], sigma)
    d1, n1 = _kernel_l1_gap(x.shape[1], sigma)
    bound = (d0 * n1 + d1) * np.abs(x).max()
    assert bound < (0.06 if sigma == 1.0 else 1e-3)
    assert np.abs(ours - ref).max() <= bound


def test_gaussian_keeps_the_mean_dtype_and_returns_x_at_sigma_zero():
    x = _normal(10, (6, 7, 9)) + 3.0
    out = gaussian_denoise(x, 1.5)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    assert abs(float(jnp.mean(out) - jnp.mean(x))) < 1e-5
    assert float(jnp.std(out)) < 0.5 * float(jnp.std(x))
    np.testing.assert_array_equal(gaussian_denoise(x, 0.0), x)


# ------------------------------------------------------------------------- learned models


def test_flax_denoiser_convolves_the_spatial_axes_like_scipy_correlate():
    rng = np.random.default_rng(11)
    for shape in ((9, 10), (5, 6, 7)):
        conv = nnx.Conv(1, 1, (3,) * len(shape), padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
        kernel = rng.normal(size=(3,) * len(shape)).astype(np.float32)
        conv.kernel[...] = jnp.asarray(kernel)[..., None, None]
        x = rng.normal(size=shape).astype(np.float32)
        denoiser = FlaxDenoiser(conv)
        out, state = denoiser(jnp.asarray(x), denoiser.init_state(jnp.asarray(x)))
        assert state is None and out.shape == shape and out.dtype == jnp.float32
        # An asymmetric kernel: any swap of spatial axes or of batch/channel axes would differ.
        expected = scipy.ndimage.correlate(x.astype(np.float64), kernel, mode="constant")
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_flax_denoiser_wraps_plain_callables_and_refuses_wrong_output_shapes():
    x = jnp.arange(20.0).reshape(4, 5)
    out, _ = FlaxDenoiser(lambda b: 2.0 * b)(x, None)
    np.testing.assert_array_equal(out, 2.0 * x)
    with pytest.raises(ValueError, match="one input and one output channel"):
        FlaxDenoiser(lambda b: jnp.concatenate([b, b], axis=-1))(x, None)


def test_new_flax_weights_do_not_recompile(trace_counter):
    conv = nnx.Conv(1, 1, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    step = eqx.filter_jit(lambda d, x: d(x, None)[0])
    x = jnp.ones((6, 7))
    first = step(FlaxDenoiser(conv), x)
    conv.kernel[...] = 2.0 * conv.kernel[...]
    with trace_counter as traces:
        second = step(FlaxDenoiser(conv), x)
    assert traces.count == 0
    assert not np.allclose(first, second)


# -------------------------------------------------------------- calling convention, jit, vmap


def _denoisers():
    conv = nnx.Conv(1, 1, (3, 3, 3), padding="SAME", rngs=nnx.Rngs(1))
    return [
        TVDenoiser(0.3, 5),
        TVDenoiser(0.3, 5, "chambolle"),
        TVDenoiser(0.3, 5, nonnegative=True),
        GaussianDenoiser(1.0),
        FlaxDenoiser(conv),
    ]


def test_vmap_over_4_chains_inside_scan_equals_a_loop_of_calls():
    """The sampler pattern: state carried through lax.scan, chains vmapped."""
    xs = _normal(12, (4, 5, 6, 7))
    for denoiser in _denoisers():
        assert isinstance(denoiser, AbstractDenoiser)

        @eqx.filter_jit
        def run(denoiser, xs):
            states = jax.vmap(denoiser.init_state)(xs)

            def step(carry, _):
                x, s = jax.vmap(denoiser)(*carry)
                return (x + 0.1, s), None

            return jax.lax.scan(step, (xs, states), None, length=2)[0]

        batched, batched_state = run(denoiser, xs)
        for i in range(4):
            x, s = xs[i], denoiser.init_state(xs[i])
            for _ in range(2):
                x, s = denoiser(x, s)
                x = x + 0.1
            np.testing.assert_allclose(batched[i], x, rtol=1e-5, atol=1e-5)
            if s is not None:
                np.testing.assert_allclose(batched_state[i], s, rtol=1e-5, atol=1e-5)


def test_new_lam_or_sigma_does_not_recompile(trace_counter):
    y = _normal(13, (6, 7, 8))
    step = eqx.filter_jit(lambda d, x, s: d(x, s))
    state = TVDenoiser(0.1, 4).init_state(y)
    step(TVDenoiser(0.1, 4), y, state)
    step(GaussianDenoiser(1.0), y, None)
    tv_denoise_fgp(y, 0.1, 4)
    tv_denoise_chambolle(y, 0.1, 4)
    gaussian_denoise(y, 1.0)
    with trace_counter as traces:
        step(TVDenoiser(0.25, 4), y, state)
        step(GaussianDenoiser(2.0), y, None)
        tv_denoise_fgp(y, 0.2, 4)
        tv_denoise_chambolle(y, jnp.float32(0.3), 4)
        gaussian_denoise(y, 1.7)
    assert traces.count == 0
    with trace_counter as traces:  # the counter sees a real recompilation (new static num_iters)
        tv_denoise_fgp(y, 0.2, 3)
    assert traces.count >= 1


@pytest.mark.parametrize("enable_x64", [False, True])
def test_dtypes_float32_default_and_float64_kept(enable_x64):
    with jax.enable_x64(enable_x64):
        dtype = jnp.float64 if enable_x64 else jnp.float32
        y = jnp.asarray(_step_image(), dtype)
        outputs = [
            gradient(y),
            divergence(gradient(y)),
            tv_norm(y),
            gaussian_denoise(y, 1.0),
            *tv_denoise_fgp(y, 0.5, 3),
            *tv_denoise_chambolle(y, 0.5, 3),
            moreau_yosida_tv_grad(y, 0.5, 3),
            TVDenoiser(0.5, 3)(y, None)[0],
        ]
        assert all(o.dtype == dtype for o in outputs)
    assert tv_denoise_fgp(jnp.ones((4, 5), jnp.int32), 0.5, 3)[0].dtype == jnp.float32


# ------------------------------------------------------------------------------ bad input

_IMG = np.zeros((4, 5), np.float32)

_BAD_CALLS = {
    "lam < 0 (fgp)": lambda: tv_denoise_fgp(_IMG, -0.1, 5),
    "lam < 0 (chambolle)": lambda: tv_denoise_chambolle(_IMG, -1.0, 5),
    "lam nan": lambda: tv_denoise_fgp(_IMG, float("nan"), 5),
    "lam not scalar": lambda: tv_denoise_fgp(_IMG, np.ones(2), 5),
    "num_iters 0": lambda: tv_denoise_fgp(_IMG, 0.1, 0),
    "num_iters float": lambda: tv_denoise_chambolle(_IMG, 0.1, 2.5),
    "sigma < 0": lambda: gaussian_denoise(_IMG, -1.0),
    "1D fgp": lambda: tv_denoise_fgp(np.zeros(5), 0.1, 5),
    "4D chambolle": lambda: tv_denoise_chambolle(np.zeros((2, 3, 4, 5)), 0.1, 5),
    "1D gaussian": lambda: gaussian_denoise(np.zeros(5), 1.0),
    "4D gaussian": lambda: gaussian_denoise(np.zeros((2, 3, 4, 5)), 1.0),
    "1D gradient": lambda: gradient(np.zeros(5)),
    "4D tv_norm": lambda: tv_norm(np.zeros((2, 3, 4, 5))),
    "divergence shape": lambda: divergence(np.zeros((3, 4, 5))),
    "dual shape": lambda: tv_denoise_fgp(_IMG, 0.1, 5, dual=np.zeros((3, 4, 5))),
    "MY lam 0": lambda: moreau_yosida_tv_grad(_IMG, 0.0, 5),
    "TVDenoiser lam": lambda: TVDenoiser(-1.0, 5),
    "TVDenoiser iters": lambda: TVDenoiser(0.1, 0),
    "TVDenoiser method": lambda: TVDenoiser(0.1, 5, "admm"),
    "TVDenoiser chambolle nonneg": lambda: TVDenoiser(0.1, 5, "chambolle", nonnegative=True),
    "TVDenoiser 1D call": lambda: TVDenoiser(0.1, 5)(np.zeros(5), None),
    "GaussianDenoiser sigma": lambda: GaussianDenoiser(-0.5),
    "FlaxDenoiser model": lambda: FlaxDenoiser(3),
    "FlaxDenoiser 4D call": lambda: FlaxDenoiser(lambda b: b)(np.zeros((2, 3, 4, 5)), None),
}


@pytest.mark.parametrize("name", list(_BAD_CALLS))
def test_bad_input_raises_a_one_line_value_error(name):
    with pytest.raises(ValueError) as info:
        _BAD_CALLS[name]()
    assert "\n" not in str(info.value)


def test_smoothed_tv_tends_to_tv_and_has_the_gradient_of_finite_differences():
    from cryojax_mw.denoisers import smoothed_tv_norm, tv_norm

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 7)))
        n = x.size
        for eps in (1e-1, 1e-4):
            # sqrt(a^2 + eps^2) - a lies in (0, eps] for every voxel.
            excess = float(smoothed_tv_norm(x, eps)) - float(tv_norm(x))
            assert 0 < excess <= n * eps
        direction = jnp.asarray(np.random.default_rng(4).normal(size=x.shape))
        g = jax.grad(smoothed_tv_norm)(x, 0.1)
        h = 1e-6
        fd = (
            smoothed_tv_norm(x + h * direction, 0.1) - smoothed_tv_norm(x - h * direction, 0.1)
        ) / (2 * h)
        assert float(jnp.sum(g * direction)) == pytest.approx(float(fd), rel=1e-7)
    with pytest.raises(ValueError):
        smoothed_tv_norm(x, 0.0)
