"""Sampler benchmark: speed of MWR and of ULA / MYULA, and convergence of four samplers on a
posterior known in closed form.

Three parts, all float32 on the CPU, in one run:

- `mwr`: MWR (`cryojax_mw.sampling.mwr`, L2 fidelity, `TVDenoiser(0.1, 10)` FGP proposal,
  sigma_eps 0.2, beta = 1.2e-3 x N x var(y)) on the thesis' dataset A: the 4cr2 proteasome
  (`load_template("4cr2")`, 10 A) padded into 64^3, normalised to [0, 1], noise sigma 0.2, +-60 deg
  missing wedge. Milliseconds per iteration for 1 chain and 8 chains: the bare kernel
  (`jit(vmap(alg.step))`, one call per iteration), the kernel in a jitted `lax.scan` of 20 steps
  (no statistics), the same scan with the chains run one after the other (`lax.map`), and
  `run_chains` with every step kept (all statistics updated): with its default devices (the
  package asks JAX for one CPU device per core, and `run_chains` splits the chains among them) and
  with the chains kept on one device. A profile times each piece of one iteration on its own: perturbation +
  data projection, the TV denoiser, the fidelity, and the runner's streaming statistics (Welford,
  split halves, P^2 sketches).
- `ula`: a 2D 128^2 tomography posterior (Shepp-Logan, 61 tilts from -60 to 60 deg, Gaussian
  noise) with a TV prior, sampled by MYULA (`sampling.myula`, TV prox by 20 FGP iterations) and by
  ULA on a smoothed TV, lambda sum sqrt(|grad x|^2 + eps^2): kernel, scan and `run_chains` times
  per iteration, one chain.
- `convergence`: the exact Gaussian Fourier-mask posterior (`GaussianFourierPosterior`, 32^2,
  +-60 deg mask, noise 1, `power_law_spectrum(shape, 1.0, 0.5, 1.0)`), 8 chains started at
  2 x N(0, I), sampled by ULA, MALA (blackjax), HMC (blackjax, 5 leapfrog steps) and MWR's
  acceptance rule with a Gaussian random-walk proposal (energy -log pi, beta 1, i.e. random-walk
  Metropolis). `run_chains` runs with the same key for a geometric grid of run lengths n (first
  10% discarded), so every point is a prefix of the same chains: relative error of the mean
  against the exact posterior mean vs iterations and vs seconds of sampling, per-voxel std error,
  90% interval coverage of the truth, R-hat and bulk ESS per second.

Kernel timings are medians after a warm-up call (compilation excluded), as in
`_common.time_call`. `run_chains` compiles on every call, so it is timed from the inside: a trace
function with a host callback (`StepClock`) notes when each step's draws are ready, and the
per-step time is the median over the run's segments (host round trips between segments included,
compilation and the final summary excluded). The thesis' 660 ms per MWR iteration (BM4D,
Matlab) and deepinv's ~120 ms per ULA iteration are the issue's figures, quoted beside the
measurements, not measured here.

Usage:
    python benchmarks/bench_samplers.py            # all parts: results/samplers.json, the PNG, README
    python benchmarks/bench_samplers.py --quick    # small sizes, ~1.5 min (compilation dominates)
    python benchmarks/bench_samplers.py --parts mwr ula   # results/samplers_partial.json

Only a complete full-size run rewrites results/samplers.json, the PNG and the README table.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (
    fmt_ms,
    machine_info,
    markdown_table,
    time_call,
    update_markdown_block,
    write_json_atomic,
)

PARTS = ("mwr", "ula", "convergence")

# Part sizes: full, --quick.
MWR_EDGE = {False: 64, True: 24}
ULA_EDGE = {False: 128, True: 32}
CONV_EDGE = {False: 32, True: 12}
CONV_MAX_STEPS = {False: 10000, True: 400}
CONV_GRID_POINTS = {False: 7, True: 2}

# MWR settings (the calibration measured on dataset A: acceptance about 0.7).
MWR_CHAINS = (1, 8)
MWR_NOISE = 0.2
MWR_TV_LAM = 0.1
MWR_TV_ITERS = 10
MWR_SIGMA_EPS = 0.2
MWR_BETA_PER_VOXEL_VAR = 1.2e-3  # beta = this x N x var(y)
MWR_SCAN_STEPS = 20
# run_chains: steps and segment length (the per-step time is a median over full segments).
MWR_RUNNER_STEPS = {1: (100, 20), 8: (40, 10)}

# ULA settings.
ULA_NOISE_FRACTION = 0.05  # noise sigma = this x max of the clean tilt series
ULA_TV_WEIGHT = 10.0  # prior exp(-lambda TV(x)), x in [0, 1]
ULA_TV_EPS = 0.01  # smoothed TV: sqrt(|grad x|^2 + eps^2)
ULA_SCAN_STEPS = 100
ULA_RUNNER_STEPS = (500, 100)

# Convergence settings: step sizes in units of the posterior's Lipschitz constant L (largest
# precision), chosen for the usual acceptance targets (MALA ~0.57, HMC ~0.6-0.65, RWM ~0.23).
CONV_CHAINS = 8
CONV_NOISE = 1.0
ULA_STEP_OVER_L = 0.2  # ULA's stiffest mode: std (1 - 0.2 / 2)^-1/2 - 1 = 5.4% too wide
MALA_STEP_OVER_L = 0.25
HMC_STEP_TIMES_SQRT_L = 0.6  # 5 steps: 3 rad of the stiffest mode's period, short of pi
HMC_LEAPFROG = 5
RWM_SCALE_TIMES_SQRT_L_D = 2.4  # the 2.38 / sqrt(d) rule, scaled to the narrowest mode

# Targets the issue states, and figures it quotes (not measured here).
MWR_ONE_CHAIN_TARGET_MS = 30.0
MWR_EIGHT_OVER_ONE_TARGET = 4.0
ULA_TARGET_MS = 6.0
THESIS_MWR_MS = 660.0
DEEPINV_ULA_MS = 120.0

SEED = 0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timed(fn, *args) -> dict:
    """`time_call` of `fn(*args)` (blocked until ready) after one call that compiles, so the
    number of repeats follows the real speed."""
    import jax

    def call():
        jax.block_until_ready(fn(*args))

    call()
    return time_call(call)


# ---------------------------------------------------------------------------------------------
# Part 1: MWR on dataset A
# ---------------------------------------------------------------------------------------------


def dataset_a(n: int):
    """The 4cr2 proteasome in an n^3 box (voxel size 10 A x 64 / n), normalised to [0, 1], with
    noise sigma 0.2 and the +-60 deg wedge removed: (truth, y, mask, TV-denoised start)."""
    import jax
    import jax.numpy as jnp

    from cryojax_mw.denoisers import TVDenoiser
    from cryojax_mw.operators import missing_wedge_mask
    from cryojax_mw.simulate import load_template

    density = np.asarray(load_template("4cr2", 10.0 * 64 / n).density)
    truth = np.zeros((n, n, n), np.float32)
    s = density.shape[0]
    o = (n - s) // 2
    truth[o : o + s, o : o + s, o : o + s] = density
    truth = (truth - truth.min()) / (truth.max() - truth.min())
    mask = missing_wedge_mask((n, n, n), -60, 60)
    noise = MWR_NOISE * jax.random.normal(jax.random.key(SEED), truth.shape, jnp.float32)
    y = jnp.fft.irfftn(mask * jnp.fft.rfftn(truth + noise), s=truth.shape)
    # D(y, y) = 0 is the L2 fidelity's global minimum: chains start from denoised data.
    tv = TVDenoiser(MWR_TV_LAM, 50)
    start, _ = tv(y, tv.init_state(y))
    return truth, y, mask, start


def _scan_fn(algorithm, n_steps: int, sequential: bool):
    """jit((key, states) -> (states, acceptance)): `n_steps` kernel steps of all chains in one
    `lax.scan` (keys as in `run_chains`), the chains vmapped or, with `sequential`, one after the
    other (`lax.map`)."""
    import jax
    import jax.numpy as jnp

    def run(key, states):
        n_chains = jax.tree.leaves(states)[0].shape[0]

        def body(s, i):
            keys = jax.random.split(jax.random.fold_in(key, i), n_chains)
            if sequential:
                s, info = jax.lax.map(lambda a: algorithm.step(*a), (keys, s))
            else:
                s, info = jax.vmap(algorithm.step)(keys, s)
            return s, info.acceptance_rate

        return jax.lax.scan(body, states, jnp.arange(n_steps))

    return jax.jit(run)


class StepClock:
    """A `run_chains` trace function that notes the host time at which each step's draws are ready.

    One host callback per step (all chains at once), so the times include the runner's whole loop
    (kernel, statistics, segment boundaries) but not its compilation or final summary. The callback
    itself costs tens of microseconds per step, counted against the runner.
    """

    def __init__(self):
        self.stamps: list[float] = []

    def _record(self, first_voxels):
        self.stamps.append(time.perf_counter())
        return np.zeros(np.shape(first_voxels), np.float32)

    def trace_fn(self, x):
        import jax
        import jax.numpy as jnp

        # The argument ties the callback to this step's draw; broadcast_all makes one call for
        # all chains instead of one per chain.
        return jax.pure_callback(
            self._record,
            jax.ShapeDtypeStruct((), jnp.float32),
            x.ravel()[0],
            vmap_method="broadcast_all",
        )

    def segment_ms_per_step(self, segment: int, steps: int) -> list[float]:
        """Per-step time of each full segment after the first (end of a segment to end of the
        next, so every host round trip between segments is included), in ms.

        With chains run one after the other, or split over devices, a step is stamped once per
        chain or device (d stamps per step, not in step order across devices); segments end on
        all devices before the next starts, so the segments' ends are every (d x segment)-th
        stamp in time order."""
        calls, rest = divmod(len(self.stamps), steps)
        if rest or not calls:
            raise RuntimeError(
                f"expected the same number of time stamps for each of {steps} steps, got "
                f"{len(self.stamps)}"
            )
        ends = np.sort(self.stamps)[calls * segment - 1 :: calls * segment]
        return list(1e3 * np.diff(ends) / segment)


def runner_per_step(key, algorithm, starts, steps: int, segment: int, devices=None) -> dict:
    """`run_chains` (every step kept, so every statistic is updated) timed by a `StepClock`: the
    median over segments of the time per step, compilation excluded."""
    import jax

    from cryojax_mw.sampling import run_chains

    clock = StepClock()
    t0 = time.perf_counter()
    summary = run_chains(
        key, algorithm, starts, steps, 0, segment_steps=segment,
        trace_fns={"clock": clock.trace_fn}, devices=devices,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    per_segment = clock.segment_ms_per_step(segment, steps)
    stamps = np.sort(clock.stamps)
    return {
        "per_iteration_ms": float(np.median(per_segment)),
        "segment_ms_per_step": per_segment,
        "mean_ms_per_step": 1e3 * (stamps[-1] - stamps[0]) / (steps - 1),
        # run_chains' rule: as many devices as divide the chain count.
        "devices_used": 1
        if devices is not None
        else max(d for d in range(1, len(jax.devices()) + 1) if len(starts) % d == 0),
        "steps": steps,
        "segment_steps": segment,
        "call_s": wall,
        "outside_the_loop_s": wall - (stamps[-1] - stamps[0]),
        "acceptance_rate": float(np.mean(summary.acceptance_rate)),
    }


def _timed_update(update, state, *args) -> dict:
    """`_timed` of `state = update(state, *args)` with the state's buffers donated, so the
    statistics are updated in place as in the runner's scan carry, not copied on every call."""
    import jax

    step = jax.jit(update, donate_argnums=0)
    holder = [jax.tree.map(lambda a: a.copy(), state)]

    def call():
        holder[0] = step(holder[0], *args)
        return holder[0]

    return _timed(call)


def mwr_profile(algorithm, y, mask, start, n_chains: int) -> dict:
    """Each piece of one MWR iteration and of the runner's bookkeeping, jitted and vmapped over
    `n_chains` chains on its own: median ms per call."""
    import jax
    import jax.numpy as jnp

    from cryojax_mw.denoisers import TVDenoiser
    from cryojax_mw.operators import project_observed
    from cryojax_mw.sampling import _stats as stats
    from cryojax_mw.sampling import data_fidelity

    xs = jnp.stack([start] * n_chains)
    keys = jax.random.split(jax.random.key(1), n_chains)
    shape = start.shape
    tv = TVDenoiser(MWR_TV_LAM, MWR_TV_ITERS)
    duals = jax.vmap(tv.init_state)(xs)
    fidelity = data_fidelity("l2", y, mask)

    perturb = jax.jit(
        jax.vmap(
            lambda k, x: project_observed(
                x + MWR_SIGMA_EPS * jax.random.normal(k, x.shape), y, mask
            )
        )
    )
    kernel_pieces = {
        "perturbation + data projection (rfftn/irfftn)": (perturb, keys, xs),
        f"TV denoiser (FGP, {MWR_TV_ITERS} iterations)": (jax.jit(jax.vmap(tv)), xs, duals),
        "L2 fidelity (rfftn/irfftn)": (jax.jit(jax.vmap(fidelity)), xs),
    }
    # The statistics as run_chains carries them: Welford moments per chain, split halves, one
    # P^2 sketch per chain (all chains updated by one draw each, past the first five draws, the
    # sketch's sorted fill-in, as in a long run).
    sketch = jax.jit(stats.p2_update)(stats.p2_init(xs.shape, (0.05, 0.95)), jnp.stack([xs] * 6))
    runner_pieces = {
        "runner: per-chain Welford": (
            stats.welford_update,
            stats.welford_init(shape, num_chains=n_chains),
            xs,
        ),
        "runner: split-half Welford": (
            lambda h, x: stats.split_halves_update(h, x, 0, 100),
            stats.split_halves_init(shape, n_chains),
            xs,
        ),
        "runner: P^2 sketches per chain (5% and 95%)": (stats.p2_update, sketch, xs[None]),
    }
    times = {name: _timed(*call)["median_ms"] for name, call in kernel_pieces.items()}
    times.update({name: _timed_update(*call)["median_ms"] for name, call in runner_pieces.items()})
    return times


def run_mwr(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from cryojax_mw import sampling
    from cryojax_mw.denoisers import TVDenoiser

    n = MWR_EDGE[quick]
    log(f"[mwr] dataset A at {n}^3")
    _, y, mask, start = dataset_a(n)
    beta = MWR_BETA_PER_VOXEL_VAR * y.size * float(jnp.var(y))
    alg = sampling.mwr(y, mask, TVDenoiser(MWR_TV_LAM, MWR_TV_ITERS), MWR_SIGMA_EPS, beta)
    key = jax.random.key(SEED)
    rows = []

    def add(method, chains, median_ms, best_ms, note=None, **extra):
        # best: the fastest call or segment, the figure least disturbed by other jobs.
        rows.append(
            {
                "method": method,
                "chains": chains,
                "per_iteration_ms": median_ms,
                "best_per_iteration_ms": best_ms,
                "per_chain_iteration_ms": median_ms / chains,
                "note": note,
                **extra,
            }
        )

    profiles = {}
    for chains in MWR_CHAINS:
        starts = jnp.stack([start] * chains)
        states = jax.vmap(alg.init)(starts)
        keys = jax.random.split(key, chains)
        step = jax.jit(jax.vmap(alg.step))
        log(f"[mwr] {chains} chain(s): kernel step")
        t = _timed(step, keys, states)
        add("kernel step: jit(vmap(step))", chains, t["median_ms"], t["min_ms"], timing=t)
        log(f"[mwr] {chains} chain(s): kernel scan of {MWR_SCAN_STEPS} steps")
        scan = _scan_fn(alg, MWR_SCAN_STEPS, sequential=False)
        t = _timed(scan, key, states)
        acc = float(jnp.mean(scan(key, states)[1]))
        add(
            f"kernel scan ({MWR_SCAN_STEPS} steps, vmap)",
            chains,
            t["median_ms"] / MWR_SCAN_STEPS,
            t["min_ms"] / MWR_SCAN_STEPS,
            timing=t,
            acceptance_rate=acc,
        )
        if chains > 1:
            log(f"[mwr] {chains} chains: kernel scan, chains one after the other")
            seq = _scan_fn(alg, MWR_SCAN_STEPS, sequential=True)
            t = _timed(seq, key, states)
            add(
                f"kernel scan ({MWR_SCAN_STEPS} steps, lax.map over chains)",
                chains,
                t["median_ms"] / MWR_SCAN_STEPS,
                t["min_ms"] / MWR_SCAN_STEPS,
                timing=t,
            )
        steps, segment = MWR_RUNNER_STEPS[chains]
        log(f"[mwr] {chains} chain(s): run_chains, {steps} steps")
        r = runner_per_step(key, alg, starts, steps, segment)
        add(
            "run_chains (all statistics)",
            chains,
            r["per_iteration_ms"],
            min(r["segment_ms_per_step"]),
            note=f"{steps} steps, median over segments of {segment}; chains split over "
            f"{r['devices_used']} device(s)",
            runner=r,
        )
        if chains > 1:
            log(f"[mwr] {chains} chains: run_chains on one device")
            r = runner_per_step(key, alg, starts, steps, segment, devices=jax.devices()[:1])
            add(
                "run_chains (all statistics), one device",
                chains,
                r["per_iteration_ms"],
                min(r["segment_ms_per_step"]),
                note=f"{steps} steps, median over segments of {segment}",
                runner=r,
            )
        log(f"[mwr] {chains} chain(s): profile")
        profiles[str(chains)] = mwr_profile(alg, y, mask, start, chains)

    # Ratios 8 chains / 1 chain per iteration, each method against the same method on one chain
    # (the lax.map variant and the one-device run_chains against their one-chain counterparts).
    one = {r["method"]: r["per_iteration_ms"] for r in rows if r["chains"] == 1}
    base = {
        f"kernel scan ({MWR_SCAN_STEPS} steps, lax.map over chains)":
            f"kernel scan ({MWR_SCAN_STEPS} steps, vmap)",
        "run_chains (all statistics), one device": "run_chains (all statistics)",
    }  # fmt: skip
    for r in rows:
        if r["chains"] > 1:
            ref = one.get(base.get(r["method"], r["method"]))
            r["ratio_to_one_chain"] = r["per_iteration_ms"] / ref if ref else None
    return {
        "shape": [n, n, n],
        "beta": beta,
        "settings": {
            "denoiser": f"TVDenoiser({MWR_TV_LAM}, {MWR_TV_ITERS}) FGP, warm-started",
            "sigma_eps": MWR_SIGMA_EPS,
            "fidelity": "l2",
            "noise_sigma": MWR_NOISE,
            "beta_rule": f"{MWR_BETA_PER_VOXEL_VAR} x N x var(y)",
        },
        "rows": rows,
        "profile_ms": profiles,
        "devices": [str(d) for d in jax.devices()],
    }


# ---------------------------------------------------------------------------------------------
# Part 2: ULA / MYULA on a 2D tomography posterior with a TV prior
# ---------------------------------------------------------------------------------------------


def smoothed_tv(x, eps):
    """sum_i sqrt(|grad x|_i^2 + eps^2): differentiable TV (forward differences, Neumann)."""
    import jax.numpy as jnp

    from cryojax_mw.denoisers import gradient

    return jnp.sum(jnp.sqrt(jnp.sum(gradient(x) ** 2, axis=0) + eps**2))


def run_ula(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from cryojax_mw import TiltGeometry, TiltProjector, operator_norm, sampling, shepp_logan
    from cryojax_mw.denoisers import moreau_yosida_tv_grad

    n = ULA_EDGE[quick]
    log(f"[ula] {n}^2, 61 tilts")
    truth = shepp_logan((n, n))
    op = TiltProjector(TiltGeometry.from_range(-60.0, 60.0, 2.0), (n, n))
    clean = op.mv(truth)
    sigma = ULA_NOISE_FRACTION * float(jnp.max(clean))
    data = clean + sigma * jax.random.normal(jax.random.key(SEED), clean.shape)
    loglik = sampling.gaussian_loglikelihood(op, data, sigma)
    lik_lipschitz = 1.01 * float(operator_norm(jax.random.key(1), op, 50)) ** 2 / sigma**2

    # MYULA (Durmus, Moulines & Pereyra 2018): smoothing 1 / L_lik, step below 1 / (L_lik + 1/smoothing).
    smoothing = 1.0 / lik_lipschitz
    myula_step = 0.9 / (lik_lipschitz + 1.0 / smoothing)
    # Smoothed TV: its gradient is Lipschitz with constant lambda ||grad||^2 / eps <= 8 lambda / eps.
    tv_lipschitz = ULA_TV_WEIGHT * 8.0 / ULA_TV_EPS
    ula_step = 0.9 / (lik_lipschitz + tv_lipschitz)

    def logdensity(x):
        return loglik(x) - ULA_TV_WEIGHT * smoothed_tv(x, ULA_TV_EPS)

    algorithms = {
        "MYULA (TV prox, 20 FGP iterations)": (
            sampling.myula(loglik, ULA_TV_WEIGHT, smoothing, myula_step),
            myula_step,
        ),
        f"ULA, smoothed TV (eps {ULA_TV_EPS})": (sampling.ula(logdensity, ula_step), ula_step),
    }
    key = jax.random.key(SEED)
    # Per-iteration cost does not depend on where the chain is: start at zero.
    start = jnp.zeros((n, n), jnp.float32)
    rows = []
    for name, (alg, step_size) in algorithms.items():
        state = alg.init(start)
        step = jax.jit(alg.step)
        log(f"[ula] {name}: kernel step, scan, run_chains")
        t_step = _timed(step, key, state)
        states = jax.vmap(alg.init)(start[None])
        scan = _scan_fn(alg, ULA_SCAN_STEPS, sequential=False)
        t_scan = _timed(scan, key, states)
        r = runner_per_step(key, alg, start[None], *ULA_RUNNER_STEPS)
        rows.append(
            {
                "sampler": name,
                "step_size": step_size,
                "kernel_step_ms": t_step["median_ms"],
                "kernel_scan_per_iteration_ms": t_scan["median_ms"] / ULA_SCAN_STEPS,
                "run_chains_per_iteration_ms": r["per_iteration_ms"],
                "run_chains_best_per_iteration_ms": min(r["segment_ms_per_step"]),
                "timings": {"kernel_step": t_step, "kernel_scan": t_scan, "run_chains": r},
            }
        )

    grad_lik = jax.jit(jax.grad(loglik))
    my_grad = jax.jit(lambda x: moreau_yosida_tv_grad(x, ULA_TV_WEIGHT * smoothing, 20))
    tv_grad = jax.jit(jax.grad(lambda x: smoothed_tv(x, ULA_TV_EPS)))
    profile = {
        "likelihood gradient (forward + adjoint projection)": _timed(grad_lik, start)["median_ms"],
        "Moreau-Yosida TV gradient (20 FGP iterations)": _timed(my_grad, start)["median_ms"],
        "smoothed-TV gradient": _timed(tv_grad, start)["median_ms"],
    }
    return {
        "shape": [n, n],
        "n_tilts": 61,
        "settings": {
            "noise_sigma": sigma,
            "tv_weight": ULA_TV_WEIGHT,
            "tv_eps": ULA_TV_EPS,
            "myula_smoothing": smoothing,
            "likelihood_lipschitz": lik_lipschitz,
            "start": "zeros",
        },
        "rows": rows,
        "profile_ms": profile,
    }


# ---------------------------------------------------------------------------------------------
# Part 3: convergence on the exact Gaussian posterior
# ---------------------------------------------------------------------------------------------


def _rwm(logdensity, scale):
    """MWR's acceptance rule with a symmetric Gaussian proposal, energy -log pi and beta 1:
    random-walk Metropolis for pi."""
    import jax
    from blackjax.base import SamplingAlgorithm

    from cryojax_mw import sampling

    def energy(x):
        return -logdensity(x)

    def propose(key, x, state):
        return x + scale * jax.random.normal(key, x.shape, x.dtype), state

    kernel = sampling.mwr_kernel(propose, energy)
    return SamplingAlgorithm(
        lambda x: sampling.mwr_init(x, energy), lambda key, state: kernel(key, state, 1.0)
    )


def convergence_grid(max_steps: int, points: int) -> list[int]:
    """Run lengths from max_steps / 200 (at least 40) to max_steps, geometric, multiples of 10."""
    low = max(40, max_steps // 200)
    grid = np.unique(np.round(np.geomspace(low, max_steps, points) / 10).astype(int) * 10)
    return [int(g) for g in grid]


def run_convergence(quick: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from cryojax_mw import sampling
    from cryojax_mw.operators import missing_wedge_mask
    from cryojax_mw.sampling import GaussianFourierPosterior, power_law_spectrum, run_chains

    n = CONV_EDGE[quick]
    shape = (n, n)
    mask = np.asarray(missing_wedge_mask(shape, -60, 60))
    power = power_law_spectrum(shape, 1.0, 0.5, 1.0)
    truth, post = GaussianFourierPosterior.simulate(
        jax.random.key(SEED), shape, mask, CONV_NOISE, power
    )
    truth = np.asarray(truth)
    exact_mean, exact_std = post.mean(), post.std()
    precision = 1.0 / np.asarray(power) + mask / CONV_NOISE**2
    lipschitz = float(precision.max())
    d = n * n
    rwm_scale = RWM_SCALE_TIMES_SQRT_L_D / math.sqrt(lipschitz * d)
    samplers = {
        "ULA": (
            sampling.ula(post.logdensity, ULA_STEP_OVER_L / lipschitz),
            f"step {ULA_STEP_OVER_L}/L",
        ),
        "MALA (blackjax)": (
            sampling.mala(post.logdensity, MALA_STEP_OVER_L / lipschitz),
            f"step {MALA_STEP_OVER_L}/L",
        ),
        "HMC (blackjax)": (
            sampling.hmc(
                post.logdensity,
                HMC_STEP_TIMES_SQRT_L / math.sqrt(lipschitz),
                jnp.ones(d),
                HMC_LEAPFROG,
            ),
            f"step {HMC_STEP_TIMES_SQRT_L}/sqrt(L), {HMC_LEAPFROG} leapfrog steps",
        ),
        "MWR rule, Gaussian random walk": (
            _rwm(post.logdensity, rwm_scale),
            f"proposal std {rwm_scale:.3g}, beta 1",
        ),
    }
    starts = 2.0 * jax.random.normal(jax.random.key(1), (CONV_CHAINS, *shape))
    grid = convergence_grid(CONV_MAX_STEPS[quick], CONV_GRID_POINTS[quick])
    key = jax.random.key(2)
    results = {}
    for name, (alg, setting) in samplers.items():
        points = []
        for steps in grid:
            log(f"[convergence] {name}: {steps} steps")
            clock = StepClock()
            segment = max(1, math.ceil(steps / 10))
            s = run_chains(
                key,
                alg,
                starts,
                steps,
                steps // 10,
                segment_steps=segment,
                trace_fns={"clock": clock.trace_fn},
            )
            std_ratio = s.std / exact_std
            points.append(
                {
                    "steps": steps,
                    "burn_in": steps // 10,
                    "mean_rel_error": float(
                        np.linalg.norm(s.mean - exact_mean) / np.linalg.norm(exact_mean)
                    ),
                    "std_rel_error_of_mean_std": float(abs(np.mean(s.std) / exact_std - 1)),
                    "std_rel_error_rms_per_voxel": float(np.sqrt(np.mean((std_ratio - 1) ** 2))),
                    "coverage_90": float(np.mean((s.ci_low <= truth) & (truth <= s.ci_high))),
                    "acceptance_rate": float(np.mean(s.acceptance_rate)),
                    "diagnostics": s.diagnostics,
                }
            )
        # The longest run times one iteration of all chains (median over its segments); every
        # point's sampling time is its number of iterations times that.
        per_step_ms = float(np.median(clock.segment_ms_per_step(segment, grid[-1])))
        for p in points:
            p["seconds"] = 1e-3 * per_step_ms * p["steps"]
        final = points[-1]
        seconds = final["seconds"]
        results[name] = {
            "setting": setting,
            "per_iteration_ms": per_step_ms,
            "points": points,
            "final": {
                **{
                    k: final[k]
                    for k in (
                        "steps",
                        "mean_rel_error",
                        "std_rel_error_of_mean_std",
                        "std_rel_error_rms_per_voxel",
                        "coverage_90",
                        "acceptance_rate",
                    )
                },
                "seconds": seconds,
                "rhat_max": final["diagnostics"].get("rhat_max"),
                "ess_bulk_median": final["diagnostics"]["ess_bulk_median"],
                "ess_bulk_min": final["diagnostics"]["ess_bulk_min"],
                "ess_bulk_median_per_s": final["diagnostics"]["ess_bulk_median"] / seconds,
                "ess_bulk_min_per_s": final["diagnostics"]["ess_bulk_min"] / seconds,
            },
        }
    return {
        "shape": list(shape),
        "chains": CONV_CHAINS,
        "lipschitz": lipschitz,
        "smallest_precision": float(precision.min()),
        "exact_posterior_std": exact_std,
        "grid": grid,
        "samplers": results,
    }


def convergence_figure(conv: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryojax_mw.plot import save_figure

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, r in conv["samplers"].items():
        steps = [p["steps"] for p in r["points"]]
        secs = [p["seconds"] for p in r["points"]]
        err = [p["mean_rel_error"] for p in r["points"]]
        a.loglog(steps, err, "o-", label=name)
        b.loglog(secs, err, "o-", label=name)
    a.set_xlabel("iterations (first 10% discarded)")
    b.set_xlabel("seconds (compilation excluded)")
    a.set_ylabel("||mean - exact mean|| / ||exact mean||")
    n = "x".join(map(str, conv["shape"]))
    fig.suptitle(
        f"Running-mean error on the exact Gaussian posterior ({n}, {conv['chains']} chains)"
    )
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Targets and tables
# ---------------------------------------------------------------------------------------------


def _row(rows, method, chains):
    return next((r for r in rows if r["method"] == method and r["chains"] == chains), None)


def evaluate_targets(result: dict) -> list[dict]:
    quick = result["quick"]
    targets = []

    def add(name, value, threshold, passed, unit):
        ok = None if (quick or value is None) else bool(passed)
        status = (
            "quick sizes" if quick else ("not run" if ok is None else ("pass" if ok else "FAIL"))
        )
        targets.append(
            {
                "target": name,
                "value": value,
                "threshold": threshold,
                "unit": unit,
                "pass": ok,
                "status": status,
            }
        )

    mwr = result.get("mwr")
    if mwr:
        for method in ("run_chains (all statistics)", "kernel step: jit(vmap(step))"):
            r = _row(mwr["rows"], method, 1)
            v = r["per_iteration_ms"] if r else None
            add(
                f"MWR 64^3, 1 chain, {method}",
                v,
                MWR_ONE_CHAIN_TARGET_MS,
                v is not None and v <= MWR_ONE_CHAIN_TARGET_MS,
                "ms/iteration",
            )
        for method in (
            "run_chains (all statistics)",
            "kernel step: jit(vmap(step))",
            f"kernel scan ({MWR_SCAN_STEPS} steps, lax.map over chains)",
            "run_chains (all statistics), one device",
        ):
            r = _row(mwr["rows"], method, 8)
            v = r.get("ratio_to_one_chain") if r else None
            add(
                f"MWR 64^3, 8 chains / 1 chain per iteration, {method}",
                v,
                MWR_EIGHT_OVER_ONE_TARGET,
                v is not None and v <= MWR_EIGHT_OVER_ONE_TARGET,
                "x",
            )
    ula = result.get("ula")
    if ula:
        for r in ula["rows"]:
            v = r["run_chains_per_iteration_ms"]
            add(
                f"128^2, 61 tilts, {r['sampler']}, run_chains",
                v,
                ULA_TARGET_MS,
                v <= ULA_TARGET_MS,
                "ms/iteration",
            )
    return targets


def markdown(result: dict) -> str:
    m = result["machine"]
    v = m["versions"]
    load = result["load_average"]
    lines = [
        (
            f"Machine: {m['cpu_model']}, {m['cores']} cores usable, {m['memory_gb']} GB; jax "
            f"{v.get('jax')}, blackjax {v.get('blackjax')}; {m['date_utc']}; package at commit "
            f"{(result.get('git_commit') or 'unknown')[:7]}; load average "
            f"{load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end (other jobs "
            "share the cores). float32. Kernel times are medians after a warm-up call; "
            "`run_chains` is timed from the inside (a host callback per step, median over "
            "segments, compilation excluded). 'best' is the fastest call or segment, the figure "
            "least disturbed by other jobs."
        ),
        "",
    ]
    if result.get("git_dirty"):
        lines += [
            f"Uncommitted changes in the package during the run: {', '.join(result['git_dirty'])}.",
            "",
        ]
    mwr = result.get("mwr")
    if mwr:
        shape = "x".join(map(str, mwr["shape"]))
        lines += [
            (
                f"**MWR** on dataset A ({shape}, 4cr2, TV proposal `TVDenoiser({MWR_TV_LAM}, "
                f"{MWR_TV_ITERS})`, beta {mwr['beta']:.3g}). The thesis' figure (BM4D, Matlab, a "
                f"laptop) is {THESIS_MWR_MS:.0f} ms per iteration, quoted, not measured here."
            ),
            "",
        ]
        rows = []
        for r in mwr["rows"]:
            ratio = r.get("ratio_to_one_chain")
            acc = r.get("acceptance_rate", r.get("runner", {}).get("acceptance_rate"))
            rows.append(
                [
                    r["method"],
                    r["chains"],
                    fmt_ms(r["per_iteration_ms"]),
                    fmt_ms(r["best_per_iteration_ms"]),
                    fmt_ms(r["per_chain_iteration_ms"]),
                    None if ratio is None else f"{ratio:.3g}",
                    f"{THESIS_MWR_MS / r['per_chain_iteration_ms']:.3g}x",
                    None if acc is None else f"{acc:.2f}",
                    r.get("note"),
                ]
            )
        lines += [
            markdown_table(
                [
                    "method",
                    "chains",
                    "ms / iteration",
                    "best",
                    "ms / chain-iteration",
                    "8 chains / 1 chain",
                    "vs thesis 660 ms",
                    "acceptance",
                    "note",
                ],
                rows,
            ),
            "",
        ]
        prof = mwr["profile_ms"]
        names = list(next(iter(prof.values())))
        rows = [[name] + [fmt_ms(prof[c][name]) for c in prof] for name in names]
        # The runner's own cost as measured: run_chains minus the bare kernel scan.
        scan = f"kernel scan ({MWR_SCAN_STEPS} steps, vmap)"
        overhead = []
        for c in prof:
            runner, kernel = (
                _row(mwr["rows"], m, int(c)) for m in ("run_chains (all statistics)", scan)
            )
            if runner and kernel:
                overhead.append(runner["per_iteration_ms"] - kernel["per_iteration_ms"])
        rows.append(
            ["run_chains minus the kernel scan (measured above)"] + [fmt_ms(o) for o in overhead]
        )
        lines += [
            (
                "Where an iteration goes (each piece jitted and vmapped on its own, ms per call; "
                "the runner's statistics with donated state, updated in place as in its scan):"
            ),
            "",
            markdown_table(["piece"] + [f"{c} chain(s)" for c in prof], rows),
            "",
        ]
    ula = result.get("ula")
    if ula:
        shape = "x".join(map(str, ula["shape"]))
        lines += [
            (
                f"**ULA / MYULA**, {shape} image, {ula['n_tilts']} tilts, TV prior (weight "
                f"{ULA_TV_WEIGHT}), one chain. deepinv's figure for ULA with a TV prior on this "
                f"problem is about {DEEPINV_ULA_MS:.0f} ms per iteration (the issue's, quoted; "
                "deepinv is not installed here)."
            ),
            "",
        ]
        rows = [
            [
                r["sampler"],
                fmt_ms(r["kernel_step_ms"]),
                fmt_ms(r["kernel_scan_per_iteration_ms"]),
                fmt_ms(r["run_chains_per_iteration_ms"]),
                fmt_ms(r["run_chains_best_per_iteration_ms"]),
                f"{DEEPINV_ULA_MS / r['run_chains_per_iteration_ms']:.3g}x",
            ]
            for r in ula["rows"]
        ]
        lines += [
            markdown_table(
                [
                    "sampler",
                    "kernel step (ms)",
                    f"kernel scan of {ULA_SCAN_STEPS} (ms / iteration)",
                    "run_chains (ms / iteration)",
                    "run_chains, best segment",
                    "vs deepinv 120 ms (quoted)",
                ],
                rows,
            ),
            "",
        ]
        rows = [[k, fmt_ms(v)] for k, v in ula["profile_ms"].items()]
        lines += [markdown_table(["piece", "ms per call"], rows), ""]
    conv = result.get("convergence")
    if conv:
        shape = "x".join(map(str, conv["shape"]))
        lines += [
            (
                f"**Convergence** on the exact Gaussian posterior ({shape}, +-60 deg mask, noise "
                f"1, {conv['chains']} chains from 2 x N(0, I), condition number "
                f"{conv['lipschitz'] / conv['smallest_precision']:.3g}), after "
                f"{conv['grid'][-1]} iterations (first 10% discarded). ESS: bulk ESS over 64 "
                "tracked voxels, per second of sampling (compilation excluded)."
            ),
            "",
        ]
        rows = []
        for name, r in conv["samplers"].items():
            f = r["final"]
            rows.append(
                [
                    name,
                    r["setting"],
                    f"{f['acceptance_rate']:.2f}",
                    f"{r['per_iteration_ms']:.3g}",
                    f"{f['mean_rel_error']:.3g}",
                    f"{f['std_rel_error_rms_per_voxel']:.3g}",
                    f"{f['coverage_90']:.2f}",
                    None if f["rhat_max"] is None else f"{f['rhat_max']:.3g}",
                    f"{f['ess_bulk_median']:.3g}",
                    f"{f['ess_bulk_median_per_s']:.3g}",
                    f"{f['ess_bulk_min_per_s']:.3g}",
                ]
            )
        lines += [
            markdown_table(
                [
                    "sampler",
                    "setting",
                    "acceptance",
                    "ms / iteration (8 chains)",
                    "mean rel. error",
                    "std rel. error (rms per voxel)",
                    "90% coverage of truth",
                    "max R-hat",
                    "bulk ESS (median)",
                    "ESS/s (median)",
                    "ESS/s (min)",
                ],
                rows,
            ),
            "",
        ]
        lines += ["![running-mean error](results/samplers_convergence.png)", ""]
    tg = []
    for t in result["targets"]:
        val = None if t["value"] is None else f"{t['value']:.3g} {t['unit']}"
        tg.append([t["target"], val, f"{t['threshold']:g} {t['unit']}", t["status"]])
    lines += [
        "Targets the issue states:",
        "",
        markdown_table(["target", "measured", "target", "status"], tg),
    ]
    return "\n".join(lines)


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=HERE.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            check=False,
        )
    except OSError:
        return ""
    return out.stdout


def _git_dirty_package_files() -> list[str]:
    """Files of the package with uncommitted changes (the benchmark measures the working tree)."""
    status = _git("status", "--porcelain", "--", "cryojax_mw")
    return [line[3:] for line in status.splitlines() if line.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (seconds)")
    p.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)"
    )
    args = p.parse_args(argv)
    dirty = _git_dirty_package_files()
    if dirty:
        log(f"warning: the package has uncommitted changes: {', '.join(dirty)}")
    result = {
        "benchmark": "samplers",
        "git_commit": _git("rev-parse", "HEAD").strip() or None,
        "quick": args.quick,
        "load_average": {"start": list(os.getloadavg())},
        "git_dirty": dirty,
    }
    started = time.perf_counter()
    runners = {"mwr": run_mwr, "ula": run_ula, "convergence": run_convergence}
    result["part_s"] = {}
    for part in args.parts:
        t0 = time.perf_counter()
        result[part] = runners[part](args.quick)
        result["part_s"][part] = time.perf_counter() - t0
        log(f"[{part}] done in {result['part_s'][part]:.0f} s")
    result["load_average"]["end"] = list(os.getloadavg())
    result["total_s"] = time.perf_counter() - started
    result["machine"] = machine_info(("jax", "jaxlib", "blackjax", "numpy"))
    result["targets"] = evaluate_targets(result)

    complete = not args.quick and set(args.parts) == set(PARTS)
    stem = "samplers" if complete else ("samplers_quick" if args.quick else "samplers_partial")
    out = HERE / "results" / f"{stem}.json"
    write_json_atomic(out, result)
    log(f"wrote {out} ({result['total_s']:.0f} s)")
    if "convergence" in result:
        png = (
            HERE
            / "results"
            / ("samplers_convergence.png" if complete else f"{stem}_convergence.png")
        )
        convergence_figure(result["convergence"], png)
        log(f"wrote {png}")
    table = markdown(result)
    if complete:
        update_markdown_block(HERE / "README.md", "samplers", table)
        log(f"updated {HERE / 'README.md'}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
