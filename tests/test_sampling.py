"""Samplers checked against a posterior known in closed form, the chain runner's bookkeeping
(checkpoints, determinism, diagnostics) and MWR's behaviour on a missing-wedge problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blackjax.base import SamplingAlgorithm

from cryojax_mw import sampling
from cryojax_mw.denoisers import GaussianDenoiser, TVDenoiser
from cryojax_mw.operators import missing_wedge_mask
from cryojax_mw.sampling import GaussianFourierPosterior, power_law_spectrum, run_chains

SHAPE = (24, 24)
NOISE = 1.0


def _problem(seed: int, shape=SHAPE):
    mask = np.asarray(missing_wedge_mask(shape, -60, 60))
    power = power_law_spectrum(shape, amplitude=1.0, correlation_length=0.5, order=1.0)
    truth, post = GaussianFourierPosterior.simulate(jax.random.key(seed), shape, mask, NOISE, power)
    return np.asarray(truth), post


def _lipschitz(post) -> float:
    return float(np.max(1 / np.asarray(post.prior_power) + np.asarray(post.mask) / NOISE**2))


def _start(post, n_chains, seed=1):
    # Overdispersed starts: R-hat must come down from them.
    return 2.0 * jax.random.normal(jax.random.key(seed), (n_chains, *post.shape))


def _check_against_closed_form(summary, post, truth, mean_tol, std_tol):
    exact_mean, exact_std = post.mean(), post.std()
    mean_error = np.linalg.norm(summary.mean - exact_mean) / np.linalg.norm(exact_mean)
    std_error = abs(np.mean(summary.std) / exact_std - 1)
    coverage = np.mean((summary.ci_low <= truth) & (truth <= summary.ci_high))
    assert mean_error < mean_tol, mean_error
    assert std_error < std_tol, std_error
    assert 0.85 <= coverage <= 0.95, coverage
    assert summary.diagnostics["voxel_rhat_max"] < 1.05
    assert summary.diagnostics["rhat_max"] < 1.05
    return mean_error, std_error, coverage


def test_ula_matches_the_exact_gaussian_posterior():
    truth, post = _problem(0)
    # ULA's stationary variance is 1 / (a (1 - step a / 2)) for a mode of precision a: with
    # step = 0.1 / L the stiffest mode's std is 2.5% too large, the others less.
    step = 0.1 / _lipschitz(post)
    alg = sampling.ula(post.logdensity, step)
    summary = run_chains(jax.random.key(2), alg, _start(post, 32), 8000, 1000)
    _check_against_closed_form(summary, post, truth, mean_tol=0.05, std_tol=0.05)
    assert summary.map_estimate is None  # unadjusted moves: no most-visited state


def test_mala_through_blackjax_matches_the_exact_gaussian_posterior():
    truth, post = _problem(3)
    alg = sampling.mala(post.logdensity, 0.35 / _lipschitz(post))
    summary = run_chains(jax.random.key(4), alg, _start(post, 32), 4000, 1000)
    _check_against_closed_form(summary, post, truth, mean_tol=0.05, std_tol=0.05)
    assert 0.3 < summary.acceptance_rate.mean() < 0.9  # near MALA's optimal 0.57


def test_mwr_acceptance_rule_is_exact_with_a_gaussian_proposal():
    """With D = -log pi, beta = 1 and a symmetric Gaussian proposal the MWR kernel is random-walk
    Metropolis: its draws follow the posterior."""
    truth, post = _problem(5, shape=(10, 10))

    def energy(x):
        return -post.logdensity(x)

    def propose(key, x, state):
        return x + 0.14 * jax.random.normal(key, x.shape, x.dtype), state

    kernel = sampling.mwr_kernel(propose, energy)
    alg = SamplingAlgorithm(
        lambda x: sampling.mwr_init(x, energy), lambda key, s: kernel(key, s, 1.0)
    )
    summary = run_chains(jax.random.key(6), alg, _start(post, 64), 20000, 4000, thin=4)
    _check_against_closed_form(summary, post, truth, mean_tol=0.05, std_tol=0.05)
    assert 0.1 < summary.acceptance_rate.mean() < 0.6
    assert summary.map_estimate is not None


# ------------------------------------------------------------------------------- the runner


def _small_mwr(beta=1e-2, fidelity="l2"):
    shape = (32, 32)
    truth = np.zeros(shape, np.float32)
    truth[12:20, 10:18] = 1.0
    truth[6:9, 20:26] = 0.5
    mask = missing_wedge_mask(shape, -60, 60)
    y = np.asarray(jnp.fft.irfftn(mask * jnp.fft.rfftn(jnp.asarray(truth)), s=shape))
    alg = sampling.mwr(y, mask, TVDenoiser(0.05, 10), 0.1, beta, fidelity=fidelity)
    return truth, y, mask, alg


def _denoised_starts(y, n_chains):
    # D(y, y) = 0 is the global minimum of the L2 fidelity: chains start from denoised data.
    tv = TVDenoiser(0.05, 50)
    start, _ = tv(jnp.asarray(y), tv.init_state(jnp.asarray(y)))
    return jnp.stack([start] * n_chains)


def test_same_key_same_summary_and_checkpoint_resume_gives_the_same_numbers(tmp_path, monkeypatch):
    from cryojax_mw.sampling import _runner

    truth, y, _, alg = _small_mwr()
    starts = _denoised_starts(y, 4)
    whole = run_chains(jax.random.key(0), alg, starts, 60, 20, truth=truth)
    again = run_chains(jax.random.key(0), alg, starts, 60, 20, truth=truth, segment_steps=7)
    np.testing.assert_array_equal(whole.mean, again.mean)
    np.testing.assert_array_equal(whole.traces["psnr"], again.traces["psnr"])

    # Interrupt after the first checkpoint, then resume from it in a new call.
    path = tmp_path / "chains.npz"
    real_save = _runner._save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(_runner, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_chains(jax.random.key(0), alg, starts, 60, 20, truth=truth, segment_steps=15,
                   checkpoint=path)  # fmt: skip
    monkeypatch.setattr(_runner, "_save_checkpoint", real_save)
    with np.load(path) as saved:
        assert int(saved["step"]) == 15
    resumed = run_chains(
        jax.random.key(0), alg, starts, 60, 20, truth=truth, segment_steps=15, checkpoint=path
    )
    np.testing.assert_array_equal(resumed.mean, whole.mean)
    np.testing.assert_array_equal(resumed.ci_high, whole.ci_high)
    np.testing.assert_array_equal(resumed.map_estimate, whole.map_estimate)
    np.testing.assert_array_equal(resumed.traces["fidelity"], whole.traces["fidelity"])
    with pytest.raises(ValueError, match="different run"):
        run_chains(jax.random.key(1), alg, starts, 60, 20, truth=truth, segment_steps=15,
                   checkpoint=path)  # fmt: skip


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (one per CPU core)")
def test_chains_split_over_devices_give_what_one_device_gives():
    truth, y, _, alg = _small_mwr()
    starts = _denoised_starts(y, 4)
    split = run_chains(jax.random.key(5), alg, starts, 40, 10, truth=truth, segment_steps=9,
                       progress=True)  # fmt: skip
    one = run_chains(jax.random.key(5), alg, starts, 40, 10, truth=truth, segment_steps=9,
                     devices=jax.devices()[:1])  # fmt: skip
    # Chains one after the other (the CPU default for large chains) give the same numbers too.
    looped = run_chains(jax.random.key(5), alg, starts, 40, 10, truth=truth, segment_steps=9,
                        vectorize_chains=False)  # fmt: skip
    np.testing.assert_allclose(looped.mean, one.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(looped.ci_high, one.ci_high, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(looped.acceptance_rate > 0, one.acceptance_rate > 0)
    # The same keys reach the same chains; vmaps of 2 and of 4 chains may round differently.
    for name in ("mean", "std", "ci_low", "ci_high", "rhat", "map_estimate", "acceptance_rate"):
        np.testing.assert_allclose(getattr(split, name), getattr(one, name), rtol=1e-5, atol=1e-6)
    for name in ("psnr", "fidelity"):
        np.testing.assert_allclose(split.traces[name], one.traces[name], rtol=1e-5, atol=1e-6)
    # exp((D(x) - D(z)) / beta): a rounding of 1e-7 in the sums D over the image is ~1e-4 of beta.
    np.testing.assert_allclose(split.traces["acceptance"], one.traces["acceptance"], atol=1e-3)
    assert split.diagnostics.keys() == one.diagnostics.keys()
    # Three chains do not divide over 2 devices: they run on one.
    odd = run_chains(jax.random.key(5), alg, starts[:3], 40, 10, segment_steps=9)
    assert odd.mean.shape == y.shape
    with pytest.raises(ValueError, match="devices is empty"):
        run_chains(jax.random.key(5), alg, starts, 40, 10, devices=[])


def test_mwr_restores_the_wedge_and_reports_its_uncertainty():
    truth, y, _, alg = _small_mwr()
    summary = run_chains(jax.random.key(3), alg, _denoised_starts(y, 4), 300, 100, truth=truth)

    def psnr(x):
        return 10 * np.log10(1 / np.mean((x - truth) ** 2))

    # Measured: 16.3 dB in, MMSE 24.3 dB, most visited state 22.4 dB (the thesis: MMSE >= MAP).
    assert psnr(summary.mean) > psnr(y) + 5
    assert psnr(summary.mean) > psnr(summary.map_estimate)
    assert 0.05 < summary.acceptance_rate.mean() < 0.95
    assert np.all(summary.std >= 0) and np.all(summary.ci_low <= summary.ci_high)
    assert summary.traces["fidelity"].shape == (300, 4)
    assert summary.map_estimate is not None and summary.map_estimate.shape == truth.shape


@pytest.mark.parametrize("fidelity", sampling.FIDELITIES)
def test_every_fidelity_is_lowest_at_the_data(fidelity):
    _, y, mask, _ = _small_mwr()
    d = sampling.data_fidelity(fidelity, y, mask)
    noisy = y + 0.3 * np.random.default_rng(0).normal(size=y.shape).astype(np.float32)
    assert float(d(jnp.asarray(y))) < float(d(jnp.asarray(noisy)))


@pytest.mark.parametrize("shape", [(12, 10, 9), (16, 14)])
@pytest.mark.parametrize("soft", [False, True])
def test_l2_fidelity_in_fourier_space_equals_the_real_space_sum(shape, soft):
    # Parseval on the half spectrum, odd and even last axes, hard and soft masks, and data
    # that still holds coefficients in the wedge.
    from cryojax_mw.operators import FourierMaskOperator

    mask = np.asarray(missing_wedge_mask(shape, -50, 40), np.float32)
    if soft:
        mask = 0.25 + 0.5 * mask
    x, y = (np.asarray(jax.random.normal(jax.random.key(k), shape)) for k in (0, 1))
    seen = FourierMaskOperator(mask, shape)
    direct = float(jnp.sum((seen.mv(x) - y) ** 2))
    np.testing.assert_allclose(float(sampling.data_fidelity("l2", y, mask)(x)), direct, rtol=2e-5)


def test_huge_beta_accepts_every_proposal():
    _, y, mask, _ = _small_mwr()
    alg = sampling.mwr(y, mask, GaussianDenoiser(0.7), 0.3, 1e12)
    summary = run_chains(jax.random.key(0), alg, _denoised_starts(y, 2), 20, 4)
    assert summary.acceptance_rate.min() == 1.0


def test_maggioni_baseline_improves_on_the_input():
    truth, y, mask, _ = _small_mwr()
    result = sampling.maggioni_restore(
        jax.random.key(0), y, mask, TVDenoiser(0.05, 20), 100, sigma_start=0.1, sigma_end=0.01,
        truth=truth,
    )  # fmt: skip
    psnr_input = 10 * np.log10(1 / np.mean((y - truth) ** 2))
    # Measured: 16.3 dB in, 27.5 dB out.
    assert float(result.running_psnr[-1]) > psnr_input + 5
    assert result.running_psnr.shape == (100,)
    np.testing.assert_allclose(
        10 * np.log10(1 / np.mean((np.asarray(result.estimate) - truth) ** 2)),
        result.running_psnr[-1], rtol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask": np.ones((32, 5))}, "does not match the volume"),
        ({"mask": np.zeros((32, 17))}, "observes nothing"),
        ({"y": np.full((32, 32), np.nan)}, "NaN or Inf"),
        ({"beta": 0.0}, "beta must be > 0"),
        ({"beta": -1.0}, "beta must be > 0"),
    ],
)
def test_mwr_bad_input_is_refused_before_compiling(change, message):
    _, y, mask, _ = _small_mwr()
    args = {"y": y, "mask": np.asarray(mask), "beta": 1e-2, **change}
    with pytest.raises(ValueError, match=message):
        sampling.mwr(args["y"], args["mask"], GaussianDenoiser(0.7), 0.3, args["beta"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 10, "burn_in": 10}, "burn_in must be in"),
        ({"num_steps": 10, "burn_in": 12}, "burn_in must be in"),
        ({"num_steps": 10, "burn_in": 8}, "fewer than 4 kept draws"),
        ({"num_steps": 10, "burn_in": 2, "thin": 0}, "thin must be >= 1"),
    ],
)
def test_run_chains_bad_settings(kwargs, message):
    _, y, _, alg = _small_mwr()
    with pytest.raises(ValueError, match=message):
        run_chains(jax.random.key(0), alg, jnp.stack([jnp.asarray(y)] * 2), **kwargs)


def test_run_chains_refuses_a_truth_of_another_shape_and_non_finite_starts():
    _, y, _, alg = _small_mwr()
    starts = jnp.stack([jnp.asarray(y)] * 2)
    with pytest.raises(ValueError, match="truth has shape"):
        run_chains(jax.random.key(0), alg, starts, 10, 2, truth=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        run_chains(jax.random.key(0), alg, starts.at[0, 0, 0].set(jnp.nan), 10, 2)


def test_pnp_ula_with_the_exact_gaussian_denoiser_samples_the_widened_prior_posterior():
    """Tweedie: the MMSE denoiser of a N(0, C) prior at noise eps gives the score of N(0, C + eps^2),
    so PnP-ULA with it samples the posterior whose prior power is P + eps^2."""
    truth, post = _problem(7)
    eps = 0.3
    power = jnp.asarray(post.prior_power, jnp.float32)

    def denoiser(x):
        shrink = power / (power + eps**2)
        return jnp.fft.irfftn(shrink * jnp.fft.rfftn(x, norm="ortho"), s=x.shape, norm="ortho")

    widened = GaussianFourierPosterior(
        post.y, post.mask, NOISE, np.asarray(post.prior_power) + eps**2
    )
    step = 0.1 / _lipschitz(widened)
    alg = sampling.pnp_ula(post.loglikelihood, denoiser, eps, step)
    summary = run_chains(jax.random.key(8), alg, _start(post, 32), 6000, 1000)
    _check_against_closed_form(summary, widened, truth, mean_tol=0.05, std_tol=0.05)


def test_myula_drift_is_the_likelihood_gradient_with_a_vanishing_prior_and_denoises_with_one():
    rng = np.random.default_rng(0)
    clean = np.zeros((24, 24), np.float32)
    clean[6:18, 8:16] = 1.0
    y = clean + 0.3 * rng.normal(size=clean.shape).astype(np.float32)

    def loglik(x):
        return -0.5 * jnp.sum((x - y) ** 2) / 0.3**2

    x0 = jnp.asarray(y)
    key = jax.random.key(0)
    plain = sampling.ula(loglik, 1e-3).step(key, sampling.LangevinState(x0))[0].position
    # The prior's drift is tv_weight times a TV subgradient (entries <= 2 ndim): negligible here.
    no_prior = sampling.myula(loglik, 1e-6, 0.05, 1e-3).step(key, sampling.LangevinState(x0))[0]
    np.testing.assert_allclose(no_prior.position, plain, atol=1e-5)

    alg = sampling.myula(loglik, 8.0, 0.02, 0.005)
    summary = run_chains(jax.random.key(1), alg, jnp.stack([x0] * 4), 1500, 500)
    mse = lambda a: float(np.mean((a - clean) ** 2))
    assert mse(summary.mean) < 0.5 * mse(y)  # the TV prior removes noise
