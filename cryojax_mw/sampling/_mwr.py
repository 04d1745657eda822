"""Missing-wedge restoration by Metropolis-Hastings (MWR, Moebel's thesis section 2.5), and the
all-accept iterative baseline it improves on (Maggioni et al. 2013).

MWR proposes z = Denoise(P_W(x + eps)), eps ~ N(0, sigma_eps^2 I), where P_W puts back the observed
Fourier coefficients of the data y, and accepts with probability
min(1, exp((D(x, y) - D(z, y)) / beta)). D compares the data with the sample seen through the same
mask, D_W(x) = F^-1 (m F x). The chain's states are restorations; their mean is the MMSE estimate
and their spread the uncertainty.

Blackjax's shape: `init(position, ...)`, `build_kernel(...)` and `as_top_level_api(...)` (exported
as `mwr`) returning a blackjax `SamplingAlgorithm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from blackjax.base import SamplingAlgorithm

from ..operators import FourierMaskOperator, half_spectrum_weights, project_observed

FIDELITIES = ("l2", "l1", "correlation", "mutual_information")


class MWRState(NamedTuple):
    """position: the current restoration; fidelity: D(position, y); denoiser_state: what the
    denoiser carries between calls (e.g. a TV dual field for warm starts)."""

    position: jax.Array
    fidelity: jax.Array
    denoiser_state: Any


class MWRInfo(NamedTuple):
    acceptance_rate: jax.Array
    is_accepted: jax.Array
    proposal_fidelity: jax.Array


def _mutual_information(a: jax.Array, b: jax.Array, edges_a, edges_b) -> jax.Array:
    """Mutual information of two images from a joint histogram with fixed bin edges."""
    n_bins = edges_a.shape[0] - 1
    ia = jnp.clip(jnp.searchsorted(edges_a, a.ravel(), side="right") - 1, 0, n_bins - 1)
    ib = jnp.clip(jnp.searchsorted(edges_b, b.ravel(), side="right") - 1, 0, n_bins - 1)
    joint = jnp.zeros((n_bins, n_bins), a.dtype).at[ia, ib].add(1.0) / a.size
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    ratio = jnp.where(joint > 0, joint / jnp.maximum(pa * pb, 1e-30), 1.0)
    return jnp.sum(joint * jnp.log(ratio))


def data_fidelity(name: str, y: jax.Array, mask: jax.Array, *, bins: int = 32) -> Callable:
    """D(x, y) for MWR, lower is better, comparing y with x seen through the mask.

    Args:
        name: "l2" (sum of squares, thesis eq. 2.26), "l1" (eq. 2.25), "correlation"
            (1 - Pearson correlation, eq. 2.27) or "mutual_information" (minus the mutual
            information of `bins`-bin histograms over y's range, eq. 2.28).
        y: the data (a tomogram whose missing wedge is empty).
        mask: the observed region (rfftn layout, as `missing_wedge_mask`).

    Returns:
        x -> D(x, y), a scalar.
    """
    if name not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {', '.join(FIDELITIES)}, got {name!r}")
    y = jnp.asarray(y)
    seen = FourierMaskOperator(mask, y.shape, y.dtype)
    if name == "l2":
        # ||P_W x - y||^2 by Parseval on the half spectrum: one rfftn per call instead of an
        # rfftn and an irfftn. Each stored coefficient stands for w = 1 or 2 of the full
        # spectrum; the symmetrised mask keeps m X - Y Hermitian, so the sum is exact.
        y_hat = jnp.fft.rfftn(y)
        m = seen.mask.astype(y.dtype)
        w = jnp.asarray(half_spectrum_weights(y.shape) / y.size, y.dtype)

        def l2(x):
            r = m * jnp.fft.rfftn(x) - y_hat
            return jnp.sum(w * (r.real**2 + r.imag**2))

        return l2
    if name == "l1":
        return lambda x: jnp.sum(jnp.abs(seen.mv(x) - y))
    if name == "correlation":
        yc = (y - y.mean()) / jnp.linalg.norm(y - y.mean())

        def one_minus_cc(x):
            xc = seen.mv(x)
            xc = xc - xc.mean()
            return 1.0 - jnp.sum(xc * yc) / jnp.maximum(jnp.linalg.norm(xc), 1e-30)

        return one_minus_cc
    lo, hi = float(jnp.min(y)), float(jnp.max(y))
    edges = jnp.linspace(lo, hi + 1e-6 * (hi - lo + 1.0), bins + 1, dtype=y.dtype)
    return lambda x: -_mutual_information(seen.mv(x), y, edges, edges)


def _validate(y, mask, sigma_eps, beta) -> None:
    y = np.asarray(y)
    if y.ndim not in (2, 3):
        raise ValueError(f"y must be a 2D or 3D volume, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("y holds NaN or Inf values; clean the data first")
    expected = y.shape[:-1] + (y.shape[-1] // 2 + 1,)
    m = np.asarray(mask)
    if m.shape != expected:
        raise ValueError(
            f"mask shape {m.shape} does not match the volume {y.shape}: an rfftn half spectrum "
            f"of shape {expected} is needed (see missing_wedge_mask)"
        )
    if not np.any(m > 0):
        raise ValueError("the mask observes nothing: every Fourier coefficient is missing")
    if not float(beta) > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not float(sigma_eps) >= 0:
        raise ValueError(f"sigma_eps must be >= 0, got {sigma_eps}")


def mwr_proposal(
    y: jax.Array, mask: jax.Array, denoiser, sigma_eps, *, positivity: bool = False
) -> Callable:
    """The MWR proposal (key, x, denoiser_state) -> (z, denoiser_state):
    z = Denoise(P_W(x + eps)), then z = max(z, 0) with `positivity`.

    `denoiser` follows the package's convention `denoiser(x, state) -> (x, state)` (see
    `cryojax_mw.denoisers`); a plain function x -> x is wrapped.
    """
    y = jnp.asarray(y)
    mask = jnp.asarray(mask)
    sigma = jnp.asarray(sigma_eps, y.dtype)
    denoise = _as_stateful(denoiser)

    def propose(key, x, state):
        perturbed = x + sigma * jax.random.normal(key, x.shape, x.dtype)
        z, state = denoise(project_observed(perturbed, y, mask), state)
        if positivity:
            z = jnp.maximum(z, 0)
        return z, state

    return propose


def _as_stateful(denoiser) -> Callable:
    if hasattr(denoiser, "init_state"):
        return denoiser
    return lambda x, state: (denoiser(x), state)


def init(position, fidelity_fn: Callable, denoiser_state=None) -> MWRState:
    position = jnp.asarray(position)
    return MWRState(position, fidelity_fn(position), denoiser_state)


def build_kernel(proposal_fn: Callable, fidelity_fn: Callable) -> Callable:
    """The Metropolis-Hastings step with any proposal (key, x, denoiser_state) -> (z, state)
    and energy D: accept z with probability min(1, exp((D(x) - D(z)) / beta)).

    With a symmetric proposal and D = -beta log pi this is exact random-walk Metropolis for pi;
    MWR's proposal is only approximately symmetric (thesis section 2.5)."""

    def kernel(rng_key, state: MWRState, beta) -> tuple[MWRState, MWRInfo]:
        key_proposal, key_accept = jax.random.split(rng_key)
        z, denoiser_state = proposal_fn(key_proposal, state.position, state.denoiser_state)
        d_z = fidelity_fn(z)
        log_ratio = (state.fidelity - d_z) / beta
        acceptance = jnp.minimum(1.0, jnp.exp(jnp.minimum(log_ratio, 0.0)))
        accept = jnp.log(jax.random.uniform(key_accept, (), state.fidelity.dtype)) < log_ratio
        new = MWRState(
            jnp.where(accept, z, state.position),
            jnp.where(accept, d_z, state.fidelity),
            # The denoiser's warm start follows the proposal whether or not it is kept: the next
            # proposal starts from a nearby point either way.
            denoiser_state,
        )
        return new, MWRInfo(acceptance, accept, d_z)

    return kernel


def as_top_level_api(
    y: jax.Array,
    mask: jax.Array,
    denoiser,
    sigma_eps,
    beta,
    *,
    fidelity: str = "l2",
    positivity: bool = False,
    denoiser_warmup: int = 5,
) -> SamplingAlgorithm:
    """MWR: Metropolis-Hastings missing-wedge restoration (thesis section 2.5).

    Args:
        y: the corrupted volume (its missing-wedge coefficients are empty), (z, y, x) or (z, x).
        mask: observed region in rfftn layout (`missing_wedge_mask(y.shape, -60, 60)`).
        denoiser: `TVDenoiser`, `GaussianDenoiser`, `FlaxDenoiser` or any function x -> x.
        sigma_eps: standard deviation of the perturbation eps.
        beta: temperature > 0; larger accepts more (beta -> inf is the all-accept baseline).
        fidelity: "l2", "l1", "correlation" or "mutual_information" (see `data_fidelity`).
        positivity: clip proposals at 0.
        denoiser_warmup: denoiser calls made by `init` on the data-consistent start, so that a
            stateful denoiser (TV's dual field) is warm at the first proposal.

    Returns:
        A `SamplingAlgorithm` whose `init(position)` starts a chain (e.g. at y) and whose
        `step(key, state)` makes one MH move; info has acceptance_rate and is_accepted.
    """
    _validate(y, mask, sigma_eps, beta)
    fidelity_fn = data_fidelity(fidelity, y, mask)
    proposal = mwr_proposal(y, mask, denoiser, sigma_eps, positivity=positivity)
    kernel = build_kernel(proposal, fidelity_fn)
    stateful = _as_stateful(denoiser)
    beta = jnp.asarray(beta, jnp.asarray(y).dtype)

    def init_fn(position, rng_key=None):
        del rng_key
        position = jnp.asarray(position)
        state = None
        if hasattr(stateful, "init_state"):
            # Warm the denoiser up on data-consistent input: a cold TV dual smooths the first
            # proposal less than the later ones, and that proposal, closer to the data, would be
            # accepted and then never left.
            state = stateful.init_state(position)
            target = project_observed(position, jnp.asarray(y), jnp.asarray(mask))
            for _ in range(denoiser_warmup):
                _, state = stateful(target, state)
        return init(position, fidelity_fn, state)

    def step_fn(rng_key, state):
        return kernel(rng_key, state, beta)

    return SamplingAlgorithm(init_fn, step_fn)


class BaselineResult(NamedTuple):
    """estimate: the weighted average of the iterates; running_psnr: PSNR (dB) of the running
    estimate after each iteration against `truth` (empty without a truth)."""

    estimate: jax.Array
    running_psnr: jax.Array


def maggioni_restore(
    rng_key,
    y: jax.Array,
    mask: jax.Array,
    denoiser,
    num_iters: int,
    *,
    sigma_start,
    sigma_end,
    truth: jax.Array | None = None,
) -> BaselineResult:
    """The all-accept iterative baseline (Maggioni et al. 2013): x_t = Denoise(P_W(x_{t-1} + eps_t))
    with sigma_t decreasing geometrically from `sigma_start` to `sigma_end`, every iterate kept,
    and the estimate the average of the iterates weighted by 1 / sigma_t.

    Returns:
        `BaselineResult`; with `truth`, the PSNR of the running estimate at each iteration.
    """
    _validate(y, mask, sigma_start, 1.0)
    if num_iters < 1:
        raise ValueError(f"num_iters must be >= 1, got {num_iters}")
    y = jnp.asarray(y)
    sigmas = jnp.geomspace(sigma_start, sigma_end, num_iters).astype(y.dtype)
    denoise = _as_stateful(denoiser)
    state0 = denoise.init_state(y) if hasattr(denoise, "init_state") else None
    # The same PSNR as `cryojax_mw.metrics.psnr`: peak = the truth's range.
    peak = None if truth is None else jnp.max(truth) - jnp.min(truth)

    def step(carry, inputs):
        x, state, total, weight = carry
        key, sigma = inputs
        perturbed = x + sigma * jax.random.normal(key, x.shape, x.dtype)
        x, state = denoise(project_observed(perturbed, y, mask), state)
        total, weight = total + x / sigma, weight + 1 / sigma
        if truth is None:
            score = jnp.zeros((), y.dtype)
        else:
            mse = jnp.mean((total / weight - truth) ** 2)
            score = 10 * jnp.log10(peak**2 / mse)
        return (x, state, total, weight), score

    keys = jax.random.split(rng_key, num_iters)
    init_carry = (y, state0, jnp.zeros_like(y), jnp.zeros((), y.dtype))
    (_, _, total, weight), scores = jax.lax.scan(step, init_carry, (keys, sigmas))
    return BaselineResult(total / weight, scores if truth is not None else scores[:0])
