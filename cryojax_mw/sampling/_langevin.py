"""Langevin samplers in blackjax's shape: ULA, MYULA (Moreau-Yosida TV prior) and PnP-ULA.

Each sampler has `init(position)`, `build_kernel() -> kernel(rng_key, state, ...)` and an
`as_top_level_api(...)` returning a blackjax `SamplingAlgorithm`, so `jax.vmap`, blackjax's runners
and this package's `run_chains` all take them. MALA and HMC are blackjax's own
(`cryojax_mw.sampling.mala` and `.hmc` are `blackjax.mala` and `blackjax.hmc`).

All three are unadjusted: they sample a discretisation of the Langevin diffusion whose bias grows
with the step size (Durmus & Moulines 2017; Durmus, Moulines & Pereyra 2018; Laumont et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from blackjax.base import SamplingAlgorithm

from ..denoisers import moreau_yosida_tv_grad


class LangevinState(NamedTuple):
    """The chain's position (any array or pytree of arrays)."""

    position: jax.Array


class LangevinInfo(NamedTuple):
    """Unadjusted moves are always taken: acceptance 1, kept for a runner's common bookkeeping
    (no `is_accepted`, so runners know there is no most-visited state)."""

    acceptance_rate: jax.Array


def init(position) -> LangevinState:
    return LangevinState(jnp.asarray(position))


def _check_step(step_size) -> None:
    try:
        value = float(step_size)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return  # traced: the caller's responsibility
    if not value > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")


def build_kernel(drift_fn: Callable) -> Callable:
    """The Euler-Maruyama step x' = x + step * drift(x) + sqrt(2 step) * xi, xi ~ N(0, I).

    Args:
        drift_fn: x -> gradient of the log-density (exact or approximate) at x.
    """

    def kernel(rng_key, state: LangevinState, step_size) -> tuple[LangevinState, LangevinInfo]:
        x = state.position
        step = jnp.asarray(step_size, x.dtype)
        noise = jax.random.normal(rng_key, x.shape, x.dtype)
        x_new = x + step * drift_fn(x) + jnp.sqrt(2 * step) * noise
        return LangevinState(x_new), LangevinInfo(jnp.ones((), x.dtype))

    return kernel


def _algorithm(drift_fn: Callable, step_size) -> SamplingAlgorithm:
    _check_step(step_size)
    kernel = build_kernel(drift_fn)

    def step(rng_key, state):
        return kernel(rng_key, state, step_size)

    return SamplingAlgorithm(init, step)


def ula(logdensity_fn: Callable, step_size) -> SamplingAlgorithm:
    """Unadjusted Langevin algorithm on a differentiable log-density.

    Args:
        logdensity_fn: x -> log pi(x) up to a constant (jax.grad is taken).
        step_size: the time step delta > 0; stability needs delta < 2 / L for an L-smooth
            log-density, and the bias shrinks with delta.
    """
    grad = jax.grad(logdensity_fn)
    return _algorithm(grad, step_size)


def myula(
    loglikelihood_fn: Callable, tv_weight, smoothing, step_size, *, prox_iters: int = 20
) -> SamplingAlgorithm:
    """MYULA: ULA on the likelihood times a TV prior exp(-tv_weight * TV(x)) made smooth by its
    Moreau-Yosida envelope of parameter `smoothing` (Durmus, Moulines & Pereyra 2018).

    The prior's gradient is -(x - prox_{smoothing * tv_weight * TV}(x)) / smoothing, the proximal
    map computed by `prox_iters` FGP iterations. Take step_size <= smoothing / 2 or so.
    """
    grad_lik = jax.grad(loglikelihood_fn)
    lam = jnp.asarray(tv_weight) * jnp.asarray(smoothing)

    def drift(x):
        # moreau_yosida_tv_grad returns (x - prox_{lam TV}(x)) / lam: rescale to the smoothing.
        return grad_lik(x) - moreau_yosida_tv_grad(x, lam, prox_iters) * lam / smoothing

    return _algorithm(drift, step_size)


def pnp_ula(
    loglikelihood_fn: Callable, denoiser: Callable, denoiser_sigma, step_size, *, alpha=1.0
) -> SamplingAlgorithm:
    """PnP-ULA: the prior's score is taken from a denoiser by Tweedie's formula,
    grad log p(x) ~ (D(x) - x) / sigma^2 (Laumont et al. 2022), scaled by `alpha`.

    Args:
        loglikelihood_fn: x -> log p(y | x).
        denoiser: x -> denoised x for Gaussian noise of standard deviation `denoiser_sigma`
            (any function: a TV or Gaussian denoiser, a learned Flax model).
        denoiser_sigma: the noise level the denoiser removes (epsilon in the paper).
        step_size: time step; take it below sigma^2 / (alpha * 3) or so.
    """
    grad_lik = jax.grad(loglikelihood_fn)
    sigma2 = jnp.asarray(denoiser_sigma) ** 2

    def drift(x):
        return grad_lik(x) + alpha * (denoiser(x) - x) / sigma2

    return _algorithm(drift, step_size)
