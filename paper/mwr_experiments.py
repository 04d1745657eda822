"""Moebel's thesis section 2.6 on dataset A, reproduced: missing-wedge restoration (MWR) by
Metropolis-Hastings against the all-accept baseline (Maggioni et al. 2013), TV-MAP and MYULA.

Dataset A: the 20S proteasome (4cr2, 10 Å voxels) zero-padded into a 64^3 box and scaled to
[0, 1]; white Gaussian noise of standard deviation sigma_n in {0, 0.2, 0.4} is added, then the
Fourier coefficients of a ±60° missing wedge (tilt axis y, beam z) are set to zero.

Every method gets the same TV denoiser (ROF weight `tv_lam`, 10 warm-started FGP iterations per
call) and the MWR chains start from the data TV-denoised with 50 FGP iterations (a chain started at
y sits at the global minimum of the L2 data misfit). The settings per noise level were picked on
small pilot grids scored against the truth (oracle), with the same effort for the baseline's noise
schedule; beta gives an acceptance near 0.8-0.9, the thesis' regime, and the sensitivity curves
show the rest of the range, the all-accept limit included.

The running MMSE estimate is not what `run_chains` traces (it traces each current state's PSNR),
so `mwr_traces` replays one chain of the `run_chains` run in a small `lax.scan` (step i uses the
key `run_chains` gives that chain) and records the PSNR of two running means at every step: over
all states so far (as the baseline's running estimate averages every iterate, there weighted by
1 / sigma_t), and over the states after the burn-in (the estimator `run_chains` returns). The replay is checked
against the chain's own PSNR trace.

Run `python paper/mwr_experiments.py` (5-8 minutes on 2 shared CPU cores; `make paper` runs it
too).
Writes paper/figures/mwr_*.png, paper/figures/mwr_table.md and paper/results/mwr.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from cryojax_mw import io, metrics, plot, reconstruct, sampling, simulate
from cryojax_mw.denoisers import AbstractDenoiser, TVDenoiser
from cryojax_mw.operators import FourierMaskOperator, missing_wedge_mask

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"
RESULTS = HERE / "results"

SIZE = 64
TILT_RANGE_DEG = (-60.0, 60.0)
DENOISER_ITERS = 10  # FGP iterations per proposal
START_ITERS = 50  # FGP iterations of the chains' start: counted as 5 MWR iterations
NUM_STEPS, BURN_IN, NUM_CHAINS = 400, 100, 2
BASELINE_ITERS = 400
TV_MAP_ITERS = 500
MYULA_STEPS, MYULA_BURN_IN, MYULA_PROX_ITERS = 300, 100, 10
REACH_FRACTION = 0.6  # MWR must reach the baseline's final PSNR within this share of its iterations
SENSITIVITY_SIGMA_N = 0.2
SENSITIVITY_BETAS = (2.0, 3.0, 5.0, 10.0, 30.0, 100.0, 1e4)
SENSITIVITY_SIGMA_EPS = (0.01, 0.02, 0.05, 0.1, 0.2)
SENSITIVITY_STEPS, SENSITIVITY_BURN_IN, SENSITIVITY_SEEDS = 300, 100, 2


@dataclasses.dataclass(frozen=True)
class Setting:
    """Parameters for one noise level (see the module docstring for how they were chosen).

    Attributes:
        tv_lam: ROF weight of the shared TV denoiser, and TV-MAP's weight.
        sigma_eps: MWR's perturbation standard deviation.
        beta: MWR's temperature (same units as the L2 misfit, a sum over voxels).
        baseline_sigma: the baseline's perturbation, decreasing geometrically (start, end).
        myula_sigma: noise standard deviation in MYULA's likelihood (the true sigma_n, or a small
            value where there is no noise).
    """

    tv_lam: float
    sigma_eps: float
    beta: float
    baseline_sigma: tuple[float, float]
    myula_sigma: float


SETTINGS = {
    0.0: Setting(0.01, 0.01, 0.01, (0.02, 0.002), 0.05),
    0.2: Setting(0.1, 0.05, 10.0, (0.2, 0.02), 0.2),
    0.4: Setting(0.3, 0.1, 3.0, (0.4, 0.04), 0.4),
}


class WarmStartedTV(AbstractDenoiser):
    """A `TVDenoiser` whose first call continues from a given dual field.

    `TVDenoiser.init_state` is a zero dual, so a chain's first proposal gets only `num_iters` FGP
    iterations: less smoothing than the warm-started proposals after it, hence a lower L2 misfit.
    The chain accepts it and then rejects the smoother proposals that follow whenever beta is
    below the gap (at sigma_n 0.2, sigma_eps 0.05, beta 10 the chains stayed there, acceptance
    0.003). Continuing from the dual that denoised the data into the chains' start removes it.

    Args:
        tv: the denoiser called at every step.
        dual: its dual field to start from, shape (ndim, *volume shape).
    """

    tv: TVDenoiser
    dual: jax.Array

    def init_state(self, x: jax.Array) -> jax.Array:
        return self.dual

    def __call__(self, x: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.tv(x, state)


def dataset_a(size: int = SIZE, voxel_size: float = 10.0) -> np.ndarray:
    """The proteasome density (4cr2) centred in a `size`^3 box of `voxel_size` Å, scaled to [0, 1].

    Args:
        size: box edge in voxels (at least the template's width: 37 at 10 Å, 19 at 20 Å).
        voxel_size: Angstrom per voxel; the shipped map is Fourier-resampled to it.

    Returns:
        float32 (size, size, size) volume.
    """
    density = simulate.load_template("4cr2", voxel_size=voxel_size).density
    m = density.shape[0]
    if m > size:
        raise ValueError(f"the template is {m} voxels wide: take size >= {m}")
    volume = np.zeros((size,) * 3, np.float32)
    o = (size - m) // 2
    volume[o : o + m, o : o + m, o : o + m] = density
    return (volume - volume.min()) / (volume.max() - volume.min())


def corrupt(key: jax.Array, truth, mask, sigma_n: float) -> jax.Array:
    """Dataset A's corruption: white Gaussian noise, then the missing wedge emptied.

    Args:
        key: typed PRNG key of the noise.
        truth: (z, y, x) volume.
        mask: observed region in rfftn layout (1 observed, 0 missing), see `missing_wedge_mask`.
        sigma_n: noise standard deviation, in the units of `truth`.

    Returns:
        The corrupted volume y, the dtype of `truth`.
    """
    truth = jnp.asarray(truth)
    noisy = truth + sigma_n * jax.random.normal(key, truth.shape, truth.dtype)
    return FourierMaskOperator(mask, truth.shape, truth.dtype).mv(noisy)


def tv_start(y: jax.Array, lam: float) -> tuple[jax.Array, jax.Array]:
    """The chains' start, y TV-denoised with `START_ITERS` FGP iterations of ROF weight `lam`.

    Returns:
        (start, dual): the denoised volume and the FGP dual field that produced it.
    """
    tv = TVDenoiser(lam, START_ITERS)
    return tv(y, tv.init_state(y))


def _psnr(x: jax.Array, truth: jax.Array) -> jax.Array:
    # The convention of `cryojax_mw.metrics.psnr`: peak = the truth's range.
    peak = jnp.max(truth) - jnp.min(truth)
    return 10 * jnp.log10(peak**2 / jnp.mean((x - truth) ** 2))


@functools.partial(jax.jit, static_argnames=("num_steps", "burn_in", "num_chains", "chain"))
def mwr_traces(
    key: jax.Array,
    y: jax.Array,
    mask: jax.Array,
    truth: jax.Array,
    start: jax.Array,
    denoiser: AbstractDenoiser,
    sigma_eps: jax.Array,
    beta: jax.Array,
    *,
    num_steps: int,
    burn_in: int,
    num_chains: int = 1,
    chain: int = 0,
) -> tuple[jax.Array, dict]:
    """One MWR chain (L2 misfit) with the PSNR of its running MMSE estimates at every step.

    Step i uses `jax.random.split(jax.random.fold_in(key, i), num_chains)[chain]`, the key that
    `run_chains(key, ...)` gives chain `chain`, so from the same start this replays that chain.
    sigma_eps, beta, the data and the denoiser's weights are traced: one compilation serves
    every setting of the same shape.

    Args:
        key: typed PRNG key.
        y: the corrupted volume; mask: its observed region (rfftn layout); truth: the reference.
        start: the chain's first state.
        denoiser: a denoiser with `init_state` (e.g. `WarmStartedTV`).
        sigma_eps, beta: MWR's perturbation and temperature (arrays).
        num_steps, burn_in: steps in all and steps left out of the post-burn-in mean.
        num_chains, chain: which chain of a `run_chains` run to replay.

    Returns:
        (mean of the states after the burn-in, traces) where traces maps "acceptance" (the
        acceptance probability), "psnr" (current state), "psnr_running_all" (mean
        of states 1..i) and "psnr_running_burn_in" (mean of states burn_in+1..i, NaN before) to
        arrays of length num_steps.
    """
    fidelity = sampling.data_fidelity("l2", y, mask)
    proposal = sampling.mwr_proposal(y, mask, denoiser, sigma_eps)
    kernel = sampling.mwr_kernel(proposal, fidelity)
    state = sampling.mwr_init(start, fidelity, denoiser.init_state(start))

    def step(carry, i):
        state, total, total_kept = carry
        step_key = jax.random.split(jax.random.fold_in(key, i), num_chains)[chain]
        state, info = kernel(step_key, state, beta)
        x = state.position
        kept = i >= burn_in
        total = total + x
        total_kept = total_kept + jnp.where(kept, x, 0)
        n_kept = jnp.maximum(i - burn_in + 1, 1).astype(x.dtype)
        trace = {
            "acceptance": info.acceptance_rate,
            "psnr": _psnr(x, truth),
            "psnr_running_all": _psnr(total / (i + 1).astype(x.dtype), truth),
            "psnr_running_burn_in": jnp.where(kept, _psnr(total_kept / n_kept, truth), jnp.nan),
        }
        return (state, total, total_kept), trace

    zeros = jnp.zeros_like(start)
    (_, _, total_kept), traces = jax.lax.scan(step, (state, zeros, zeros), jnp.arange(num_steps))
    return total_kept / (num_steps - burn_in), traces


def first_reach(trace: np.ndarray, target: float) -> int | None:
    """The first iteration (1-based) at which `trace` reaches `target`, None if it never does."""
    hits = np.nonzero(np.asarray(trace) >= target)[0]
    return int(hits[0]) + 1 if hits.size else None


def uncertainty(summary: sampling.ChainSummary, truth: np.ndarray, n_bins: int = 10) -> dict:
    """How well a chain run's per-voxel uncertainty tracks its actual error.

    Args:
        summary: a `run_chains` result (its mean, std and credible interval are used).
        truth: the reference volume.
        n_bins: how many bins of interval width.

    Returns:
        coverage: fraction of voxels whose true value lies in the credible interval, over all
        voxels, over the particle (truth above a tenth of its range) and over the background;
        mean_width, mean_std: averages over voxels; corr_std_error: Pearson correlation of the
        std map with the absolute error; bins: for `n_bins` equally populated bins of interval
        width, each bin's mean width, mean absolute error and coverage.
    """
    truth = np.asarray(truth)
    error = np.abs(summary.mean - truth).ravel()
    width = (summary.ci_high - summary.ci_low).ravel()
    inside = ((truth >= summary.ci_low) & (truth <= summary.ci_high)).ravel()
    particle = (truth > truth.min() + 0.1 * (truth.max() - truth.min())).ravel()
    bins = np.array_split(np.argsort(width, kind="stable"), n_bins)
    return {
        "level": summary.level,
        "coverage": float(inside.mean()),
        "coverage_particle": float(inside[particle].mean()),
        "coverage_background": float(inside[~particle].mean()),
        "mean_width": float(width.mean()),
        "mean_std": float(summary.std.mean()),
        "corr_std_error": float(np.corrcoef(summary.std.ravel(), error)[0, 1]),
        "bins": {
            "width": [float(width[b].mean()) for b in bins],
            "abs_error": [float(error[b].mean()) for b in bins],
            "coverage": [float(inside[b].mean()) for b in bins],
        },
    }


def _scores(volume, truth, wedge) -> dict:
    return {
        "psnr": float(metrics.psnr(volume, truth)),
        "ccc_missing_wedge": float(metrics.ccc(volume, truth, wedge)),
    }


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def run_level(key: jax.Array, sigma_n: float, truth: np.ndarray, mask: jax.Array) -> dict:
    """Every method on dataset A at one noise level.

    Args:
        key: typed PRNG key (noise, chains, baseline and MYULA get their own splits).
        sigma_n: the noise level, a key of `SETTINGS`.
        truth: dataset A's volume; mask: the observed region (rfftn layout).

    Returns:
        A dict with "volumes" (name -> NumPy volume, for the figures), "scores" (name -> PSNR
        and CCC over the missing wedge), "checks", "uncertainty", "traces", "diagnostics" and
        "seconds" (wall-clock per method, compilation included).
    """
    s = SETTINGS[sigma_n]
    k_noise, k_chains, k_baseline, k_myula = jax.random.split(key, 4)
    truth_j = jnp.asarray(truth)
    wedge = ~(np.asarray(mask) > 0.5)
    y = corrupt(k_noise, truth_j, mask, sigma_n)
    start, dual = tv_start(y, s.tv_lam)
    # The second chain starts over-smoothed, so the chains' agreement (R-hat) means something.
    start_smooth, _ = tv_start(y, 2 * s.tv_lam)
    tv = TVDenoiser(s.tv_lam, DENOISER_ITERS)
    denoiser = WarmStartedTV(tv, dual)
    dtype = y.dtype
    seconds = {}

    mwr = sampling.mwr(y, mask, denoiser, s.sigma_eps, s.beta)
    summary, seconds["mwr"] = _timed(
        lambda: sampling.run_chains(
            k_chains, mwr, jnp.stack([start, start_smooth]), NUM_STEPS, BURN_IN, truth=truth_j
        )
    )
    (replay_mean, replay), seconds["mwr_replay"] = _timed(
        lambda: mwr_traces(
            k_chains, y, mask, truth_j, start, denoiser, jnp.asarray(s.sigma_eps, dtype),
            jnp.asarray(s.beta, dtype), num_steps=NUM_STEPS, burn_in=BURN_IN,
            num_chains=NUM_CHAINS, chain=0,
        )
    )  # fmt: skip
    replay = {k: np.asarray(v) for k, v in replay.items()}
    baseline, seconds["baseline"] = _timed(
        lambda: sampling.maggioni_restore(
            k_baseline, y, mask, tv, BASELINE_ITERS, sigma_start=s.baseline_sigma[0],
            sigma_end=s.baseline_sigma[1], truth=truth_j,
        )
    )  # fmt: skip
    tv_map, seconds["tv_map"] = _timed(
        lambda: (
            reconstruct.tv_map(
                y,
                FourierMaskOperator(mask, y.shape, dtype),
                s.tv_lam,
                TV_MAP_ITERS,
                nonnegative=True,
            ).volume
        )
    )
    # MYULA's TV weight makes its MAP the TV-MAP above: -log posterior = ||W x - y||^2 / (2
    # sigma^2) + theta TV(x) with theta = tv_lam / sigma^2. Moreau-Yosida smoothing 1 / L of the
    # likelihood, and the step 0.9 / (L + 1 / smoothing) (Durmus, Moulines & Pereyra 2018).
    sig = s.myula_sigma
    myula = sampling.myula(
        sampling.gaussian_loglikelihood(FourierMaskOperator(mask, y.shape, dtype), y, sig),
        s.tv_lam / sig**2, sig**2, 0.9 / (2 / sig**2), prox_iters=MYULA_PROX_ITERS,
    )  # fmt: skip
    myula_summary, seconds["myula"] = _timed(
        lambda: sampling.run_chains(
            k_myula, myula, start[None], MYULA_STEPS, MYULA_BURN_IN, truth=truth_j
        )
    )

    volumes = {
        "input y": np.asarray(y),
        "TV denoise (chain start)": np.asarray(start),
        "MWR MMSE": summary.mean,
        "MWR MAP": summary.map_estimate,
        "baseline": np.asarray(baseline.estimate),
        "TV-MAP": np.asarray(tv_map),
        "MYULA mean": myula_summary.mean,
    }
    scores = {name: _scores(v, truth, wedge) for name, v in volumes.items()}
    volumes["ground truth"] = truth

    target = float(baseline.running_psnr[-1])
    offset = START_ITERS // DENOISER_ITERS
    reach = {}
    for name in ("psnr_running_burn_in", "psnr_running_all"):
        first = first_reach(replay[name], target)
        reach[name] = None if first is None else first + offset
    checks = {
        "mmse_psnr_minus_map_psnr": scores["MWR MMSE"]["psnr"] - scores["MWR MAP"]["psnr"],
        "mmse_at_least_as_good_as_map": scores["MWR MMSE"]["psnr"] >= scores["MWR MAP"]["psnr"],
        "baseline_final_psnr": target,
        "baseline_iterations": BASELINE_ITERS,
        "mwr_iterations_to_baseline_final": reach,
        "mwr_fraction_of_baseline_iterations": {
            k: None if v is None else v / BASELINE_ITERS for k, v in reach.items()
        },
        "mwr_within_fraction": {
            k: v is not None and v <= REACH_FRACTION * BASELINE_ITERS for k, v in reach.items()
        },
        # The replay must follow chain 0 of the run_chains run step by step.
        "replay_max_psnr_gap_db": float(
            np.max(np.abs(replay["psnr"] - summary.traces["psnr"][:, 0]))
        ),
        "replay_mean_psnr": float(metrics.psnr(replay_mean, truth)),
    }
    return {
        "setting": dataclasses.asdict(s),
        "volumes": volumes,
        "std": {"MWR": summary.std, "MYULA": myula_summary.std},
        "width": {
            "MWR": summary.ci_high - summary.ci_low,
            "MYULA": myula_summary.ci_high - myula_summary.ci_low,
        },
        "scores": scores,
        "checks": checks,
        "uncertainty": {
            "MWR": uncertainty(summary, truth),
            "MYULA": uncertainty(myula_summary, truth),
        },
        "diagnostics": {
            "mwr_acceptance_per_chain": summary.acceptance_rate.tolist(),
            "mwr": summary.diagnostics,
            "myula": myula_summary.diagnostics,
        },
        "traces": {
            "mwr_acceptance": summary.traces["acceptance"].T.tolist(),
            "mwr_psnr_current": summary.traces["psnr"].T.tolist(),
            "mwr_replay_psnr_running_all": replay["psnr_running_all"].tolist(),
            "mwr_replay_psnr_running_burn_in": replay["psnr_running_burn_in"].tolist(),
            "baseline_psnr_running": np.asarray(baseline.running_psnr).tolist(),
            "myula_psnr_current": myula_summary.traces["psnr"][:, 0].tolist(),
        },
        "seconds": seconds,
        "_y": y,
        "_start": start,
        "_denoiser": denoiser,
    }


def sensitivity(key: jax.Array, level: dict, truth: np.ndarray, mask: jax.Array) -> dict:
    """Final MMSE PSNR and acceptance of single MWR chains against beta (sigma_eps fixed) and
    against sigma_eps (beta fixed), `SENSITIVITY_SEEDS` chains per point, on the data of `level`
    (the run at `SENSITIVITY_SIGMA_N`).

    Args:
        key: typed PRNG key; seed k uses `fold_in(key, k)` at every setting.
        level: what `run_level` returned at `SENSITIVITY_SIGMA_N` (its data, start, denoiser).
        truth: dataset A's volume; mask: the observed region (rfftn layout).

    Returns:
        "vs_beta" and "vs_sigma_eps": one entry per setting with lists over seeds of
        "mmse_psnr" and "acceptance", and the first seed's "psnr_running_all" trace.
    """
    s = SETTINGS[SENSITIVITY_SIGMA_N]
    y, start, denoiser = level["_y"], level["_start"], level["_denoiser"]
    truth_j = jnp.asarray(truth)

    def run(sigma_eps: float, beta: float) -> dict:
        entry = {"sigma_eps": sigma_eps, "beta": beta, "mmse_psnr": [], "acceptance": []}
        for seed in range(SENSITIVITY_SEEDS):
            mean, tr = mwr_traces(
                jax.random.fold_in(key, seed), y, mask, truth_j, start, denoiser,
                jnp.asarray(sigma_eps, y.dtype), jnp.asarray(beta, y.dtype),
                num_steps=SENSITIVITY_STEPS, burn_in=SENSITIVITY_BURN_IN,
            )  # fmt: skip
            entry["mmse_psnr"].append(float(metrics.psnr(mean, truth)))
            entry["acceptance"].append(float(np.mean(tr["acceptance"])))
            if seed == 0:
                entry["psnr_running_all"] = np.asarray(tr["psnr_running_all"]).tolist()
        return entry

    return {
        "sigma_n": SENSITIVITY_SIGMA_N,
        "steps": SENSITIVITY_STEPS,
        "burn_in": SENSITIVITY_BURN_IN,
        "seeds": SENSITIVITY_SEEDS,
        "vs_beta": [run(s.sigma_eps, b) for b in SENSITIVITY_BETAS],
        "vs_sigma_eps": [run(e, s.beta) for e in SENSITIVITY_SIGMA_EPS],
    }


def _label(sigma_n: float) -> str:
    return f"σ_n = {sigma_n:g}"


def _moving_average(x: np.ndarray, window: int = 20) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(x, kernel, mode="valid")


def figure_slices(sigma_n: float, level: dict) -> plt.Figure:
    """Ortho-slices of the input, every estimate (with its PSNR) and the truth at one level."""
    order = ("input y", "MWR MMSE", "MWR MAP", "baseline", "TV-MAP", "MYULA mean", "ground truth")
    scores = level["scores"]
    volumes = {
        (f"{n} ({scores[n]['psnr']:.1f} dB)" if n in scores else n): level["volumes"][n]
        for n in order
    }
    fig = plot.ortho_slices(volumes, title=f"Dataset A, {_label(sigma_n)}, ±60° wedge")
    # Room for the title above the column headings.
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def figure_psnr(levels: dict) -> plt.Figure:
    """PSNR of MWR's current state and running means, and of the baseline, per iteration."""
    fig, axes = plt.subplots(1, len(levels), figsize=(4.6 * len(levels), 3.8), squeeze=False)
    for ax, (sigma_n, level) in zip(axes[0], levels.items()):
        tr = level["traces"]
        offset = START_ITERS // DENOISER_ITERS
        it = np.arange(1, NUM_STEPS + 1) + offset
        ax.plot(it, tr["mwr_psnr_current"][0], color="0.75", lw=0.8, label="MWR current state")
        ax.plot(it, tr["mwr_replay_psnr_running_all"], label="MWR running mean (all states)")
        ax.plot(it, tr["mwr_replay_psnr_running_burn_in"], label="MWR running mean (after burn-in)")
        base = np.asarray(tr["baseline_psnr_running"])
        ax.plot(np.arange(1, base.size + 1), base, label="baseline running estimate")
        ax.axhline(base[-1], color="k", lw=0.7, ls="--")
        ax.axvline(REACH_FRACTION * BASELINE_ITERS, color="k", lw=0.7, ls=":")
        lo = min(np.nanmin(tr["mwr_psnr_current"][0]), np.percentile(base, 5))
        ax.set_ylim(lo - 0.5, max(base[-1], np.nanmax(tr["mwr_replay_psnr_running_all"])) + 1)
        ax.set_title(_label(sigma_n))
        ax.set_xlabel("iteration (MWR: + 5 for its TV start)")
        ax.set_ylabel("PSNR (dB)")
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "PSNR against iteration; dashed: the baseline's final PSNR; dotted: 60% of its run"
    )
    fig.tight_layout()
    return fig


def figure_acceptance(levels: dict) -> plt.Figure:
    """MWR's acceptance probability per iteration (20-step moving mean), every chain."""
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for i, (sigma_n, level) in enumerate(levels.items()):
        for c, chain in enumerate(level["traces"]["mwr_acceptance"]):
            smooth = _moving_average(np.asarray(chain))
            ax.plot(np.arange(smooth.size) + 20, smooth, lw=1.0, color=f"C{i}",
                    ls="-" if c == 0 else "--", label=f"{_label(sigma_n)}, chain {c}")  # fmt: skip
    ax.axvline(BURN_IN, color="k", lw=0.7, ls=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel("acceptance probability (20-step mean)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("MWR acceptance; dotted: end of burn-in")
    fig.tight_layout()
    return fig


def figure_uncertainty(levels: dict, truth: np.ndarray) -> plt.Figure:
    """Error, std and interval-width maps at `SENSITIVITY_SIGMA_N`; binned error and coverage
    against interval width at every level."""
    fig = plt.figure(figsize=(13.5, 7.2))
    grid = fig.add_gridspec(2, 4)
    level = levels[SENSITIVITY_SIGMA_N]
    mid = truth.shape[1] // 2
    maps = {
        "|MMSE - truth|": np.abs(level["volumes"]["MWR MMSE"] - truth),
        "MWR std": level["std"]["MWR"],
        "MWR 90% interval width": level["width"]["MWR"],
        "MYULA std": level["std"]["MYULA"],
    }
    for c, (name, vol) in enumerate(maps.items()):
        ax = fig.add_subplot(grid[0, c])
        im = ax.imshow(vol[:, mid, :], cmap="magma", origin="lower")
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"{name}\n(z-x, {_label(SENSITIVITY_SIGMA_N)})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax_err = fig.add_subplot(grid[1, :2])
    ax_cov = fig.add_subplot(grid[1, 2:])
    for sigma_n, lvl in levels.items():
        for method, ls in (("MWR", "-o"), ("MYULA", "--s")):
            bins = lvl["uncertainty"][method]["bins"]
            label = f"{method}, {_label(sigma_n)}"
            ax_err.plot(bins["width"], bins["abs_error"], ls, ms=3, label=label)
            ax_cov.plot(bins["width"], bins["coverage"], ls, ms=3, label=label)
    widths = np.array([w for lvl in levels.values() for m in ("MWR", "MYULA")
                       for w in lvl["uncertainty"][m]["bins"]["width"]])  # fmt: skip
    ref = np.geomspace(max(widths.min(), 1e-5), widths.max(), 50)
    # A calibrated Gaussian: 90% width = 3.29 sd and mean |error| = 0.798 sd.
    ax_err.plot(ref, 0.798 / 3.29 * ref, "k:", lw=0.8, label="calibrated Gaussian")
    ax_cov.axhline(0.9, color="k", lw=0.8, ls=":", label="nominal 0.9")
    for ax, ylabel in ((ax_err, "mean |error| in bin"), (ax_cov, "coverage of the 90% interval")):
        ax.set_xscale("log")
        ax.set_xlabel("90% interval width (bins of equal voxel count)")
        ax.set_ylabel(ylabel)
    ax_err.set_yscale("log")
    ax_cov.set_ylim(-0.02, 1.02)
    ax_cov.legend(fontsize=7, ncol=2)
    fig.suptitle("Per-voxel uncertainty against the actual error")
    fig.tight_layout()
    return fig


def figure_sensitivity(sens: dict) -> plt.Figure:
    """Final MMSE PSNR and acceptance against beta and sigma_eps; running PSNR per beta."""
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 3.9))
    for ax, key, name in ((axes[0], "vs_beta", "beta"), (axes[1], "vs_sigma_eps", "sigma_eps")):
        runs = sens[key]
        x = np.array([r[name] for r in runs])
        psnr = np.array([r["mmse_psnr"] for r in runs])  # (settings, seeds)
        acceptance = np.array([r["acceptance"] for r in runs])
        twin = ax.twinx()
        ax.plot(x, psnr.mean(1), "-", color="C0")
        twin.plot(x, acceptance.mean(1), "--", color="C3")
        for seed in range(psnr.shape[1]):
            ax.plot(x, psnr[:, seed], "o", ms=4, color="C0", alpha=0.6)
            twin.plot(x, acceptance[:, seed], "s", ms=4, color="C3", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (the other fixed)")
        ax.set_ylabel("final MMSE PSNR (dB)", color="C0")
        twin.set_ylabel("acceptance", color="C3")
        twin.set_ylim(-0.02, 1.02)
    for r in sens["vs_beta"]:
        axes[2].plot(
            np.arange(1, sens["steps"] + 1), r["psnr_running_all"], label=f"β = {r['beta']:g}"
        )
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("PSNR of the running mean, all states (dB)")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"MWR sensitivity, {_label(sens['sigma_n'])}: chains of {sens['steps']} steps "
        f"({sens['burn_in']} burn-in); markers: {sens['seeds']} seeds, lines: their mean"
    )
    fig.tight_layout()
    return fig


METHODS = (
    "input y", "TV denoise (chain start)", "MWR MMSE", "MWR MAP", "baseline", "TV-MAP",
    "MYULA mean",
)  # fmt: skip


def _reach_cell(level: dict, name: str) -> str:
    n = level["checks"]["mwr_iterations_to_baseline_final"][name]
    return "never" if n is None else f"{n} ({100 * n / BASELINE_ITERS:.0f}%)"


def _sensitivity_row(entry: dict, name: str) -> str:
    acceptance = " / ".join(f"{a:.2f}" for a in entry["acceptance"])
    psnr = " / ".join(f"{p:.2f}" for p in entry["mmse_psnr"])
    return f"| {entry[name]:g} | {acceptance} | {psnr} |"


def table(levels: dict, sens: dict) -> str:
    """The Markdown of paper/figures/mwr_table.md."""
    lines = [
        (
            f"Dataset A: 4cr2 proteasome in {SIZE}^3, ±60° missing wedge. PSNR (dB) / CCC over "
            f"the missing wedge. MWR: {NUM_CHAINS} chains x {NUM_STEPS} steps ({BURN_IN} "
            f"burn-in); baseline: {BASELINE_ITERS} iterations; TV-MAP: {TV_MAP_ITERS} "
            f"Chambolle-Pock iterations; MYULA: 1 chain x {MYULA_STEPS} steps ({MYULA_BURN_IN} "
            "burn-in)."
        ),
        "",
        "| σ_n | " + " | ".join(METHODS) + " |",
        "|---" * (len(METHODS) + 1) + "|",
    ]
    for sigma_n, level in levels.items():
        cells = [
            f"{level['scores'][m]['psnr']:.2f} / {level['scores'][m]['ccc_missing_wedge']:.3f}"
            for m in METHODS
        ]
        lines.append(f"| {sigma_n:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        (
            "Checks. MWR iterations count its 50-iteration TV start as 5; running mean after the "
            f"burn-in, or over all states. Target: at most {100 * REACH_FRACTION:.0f}% of the "
            "baseline's iterations."
        ),
        "",
        (
            "| σ_n | MMSE − MAP (dB) | baseline final (dB) | MWR to reach it (after burn-in) "
            "| MWR to reach it (all states) | MWR acceptance (per chain) "
            "| max split R-hat (voxels) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for sigma_n, level in levels.items():
        c = level["checks"]
        acceptance = ", ".join(f"{a:.2f}" for a in level["diagnostics"]["mwr_acceptance_per_chain"])
        lines.append(
            f"| {sigma_n:g} | {c['mmse_psnr_minus_map_psnr']:+.2f} | {c['baseline_final_psnr']:.2f} "
            f"| {_reach_cell(level, 'psnr_running_burn_in')} "
            f"| {_reach_cell(level, 'psnr_running_all')} | {acceptance} "
            f"| {level['diagnostics']['mwr']['voxel_rhat_max']:.3f} |"
        )
    lines += [
        "",
        (
            "Uncertainty: coverage of the 90% credible intervals (nominal 0.90) over all voxels, "
            "over the particle (truth above 0.1) and over the background."
        ),
        "",
        (
            "| σ_n | method | coverage, all voxels | particle | background | mean width "
            "| mean std | corr(std, abs. error) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for sigma_n, level in levels.items():
        for method, u in level["uncertainty"].items():
            lines.append(
                f"| {sigma_n:g} | {method} | {u['coverage']:.3f} | {u['coverage_particle']:.3f} "
                f"| {u['coverage_background']:.3f} | {u['mean_width']:.4f} "
                f"| {u['mean_std']:.4f} | {u['corr_std_error']:.2f} |"
            )
    s = SETTINGS[sens["sigma_n"]]
    lines += [
        "",
        (
            f"Sensitivity at σ_n = {sens['sigma_n']:g} (single chains of {sens['steps']} steps, "
            f"{sens['burn_in']} burn-in; one value per seed): against beta at sigma_eps = "
            f"{s.sigma_eps:g}, against sigma_eps at beta = {s.beta:g}."
        ),
        "",
        "| beta | acceptance | MMSE PSNR (dB) |",
        "|---|---|---|",
    ]
    lines += [_sensitivity_row(r, "beta") for r in sens["vs_beta"]]
    lines += ["", "| sigma_eps | acceptance | MMSE PSNR (dB) |", "|---|---|---|"]
    lines += [_sensitivity_row(r, "sigma_eps") for r in sens["vs_sigma_eps"]]
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _json_safe(obj):
    """NaN (a trace before the burn-in, an undefined diagnostic) becomes null; JSON has no NaN."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _write_text(path: Path, text: str) -> None:
    io.atomic_write(path, lambda tmp: tmp.write_text(text))


def main(seed: int = 0) -> dict:
    """Run every experiment, write the figures, the table and the JSON; return the JSON's dict."""
    t0 = time.perf_counter()
    truth = dataset_a()
    mask = missing_wedge_mask(truth.shape, *TILT_RANGE_DEG)
    key = jax.random.key(seed)
    levels = {}
    for i, sigma_n in enumerate(SETTINGS):
        levels[sigma_n] = run_level(jax.random.fold_in(key, i), sigma_n, truth, mask)
        scores = levels[sigma_n]["scores"]
        print(
            f"sigma_n {sigma_n:g}: "
            + ", ".join(f"{m} {scores[m]['psnr']:.2f} dB" for m in METHODS)
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    sens = sensitivity(
        jax.random.fold_in(key, len(SETTINGS)), levels[SENSITIVITY_SIGMA_N], truth, mask
    )
    print(f"sensitivity done ({time.perf_counter() - t0:.0f} s)", flush=True)

    for sigma_n, level in levels.items():
        name = f"mwr_slices_sigma{round(100 * sigma_n):02d}.png"
        plot.save_figure(figure_slices(sigma_n, level), FIGURES / name)
    plot.save_figure(figure_psnr(levels), FIGURES / "mwr_psnr_vs_iteration.png")
    plot.save_figure(figure_acceptance(levels), FIGURES / "mwr_acceptance.png")
    plot.save_figure(figure_uncertainty(levels, truth), FIGURES / "mwr_uncertainty.png")
    plot.save_figure(figure_sensitivity(sens), FIGURES / "mwr_sensitivity.png")
    _write_text(FIGURES / "mwr_table.md", table(levels, sens))

    kept = ("setting", "scores", "checks", "uncertainty", "diagnostics", "traces", "seconds")
    result = {
        "dataset": {
            "template": "4cr2",
            "voxel_size_angstrom": 10.0,
            "shape": list(truth.shape),
            "tilt_range_deg": list(TILT_RANGE_DEG),
            "seed": seed,
        },
        "run": {
            "num_steps": NUM_STEPS,
            "burn_in": BURN_IN,
            "num_chains": NUM_CHAINS,
            "denoiser_iters": DENOISER_ITERS,
            "start_iters": START_ITERS,
            "baseline_iters": BASELINE_ITERS,
            "tv_map_iters": TV_MAP_ITERS,
            "myula_steps": MYULA_STEPS,
            "myula_burn_in": MYULA_BURN_IN,
            "reach_fraction": REACH_FRACTION,
        },
        "levels": {f"{sn:g}": {k: level[k] for k in kept} for sn, level in levels.items()},
        "sensitivity": sens,
        "total_seconds": time.perf_counter() - t0,
        "machine": _machine(),
    }
    _write_text(
        RESULTS / "mwr.json", json.dumps(_json_safe(result), indent=1, allow_nan=False) + "\n"
    )
    print(f"MWR figures, table and results written ({result['total_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
