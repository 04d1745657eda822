"""Rank-normalised convergence diagnostics for a few tracked scalars whose draws are stored.

Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021), "Rank-normalization, folding, and
localization: an improved R-hat for assessing convergence of MCMC", Bayesian Analysis 16(2), computed
as ArviZ computes them (`rhat(method="rank")`, `ess(method="bulk" | "tail")`):

- split chains: each chain's first and last `n // 2` draws become two chains (the middle draw of an
  odd-length chain is dropped);
- rank normalisation: average ranks r over all draws of all chains, z = Phi^-1((r - 3/8) / (S + 1/4))
  with S the number of draws (Blom 1958);
- R-hat: the larger of the split-R-hat of the z-scores (bulk) and of the z-scores of the draws
  folded about their median, |x - median| (tail);
- ESS: autocovariances of every chain by FFT, combined over chains,
  rho_t = 1 - (W - mean_c acov_c(t)) / var+, summed in pairs rho_{2m} + rho_{2m+1} while the pairs
  stay positive (Geyer's initial positive sequence), the pairs made non-increasing (initial
  monotone sequence), tau = -1 + 2 sum pairs + the last positive even lag, ESS = chains x draws / tau
  with tau bounded below by 1 / log10(chains x draws);
- bulk ESS: ESS of the rank-normalised split chains; tail ESS: the smaller ESS of the split-chain
  indicators I(x <= q_0.05) and I(x <= q_0.95).

Draws are arrays of shape (chains, draws, k) for k tracked quantities; every function returns one
value per quantity, in the draws' floating dtype (integers and booleans become float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import ndtri

# ArviZ treats a quantity whose range is below float64's resolution as constant (its ESS is the
# number of draws); the same threshold is used here for every dtype.
_CONSTANT_RANGE = float(np.finfo(np.float64).resolution)


def _as_draws(draws, min_chains: int) -> jax.Array:
    draws = jnp.asarray(draws)
    if draws.ndim != 3:
        raise ValueError(
            f"draws must have shape (chains, draws, k); got shape {draws.shape} "
            "(add axes with x[:, :, None] for one quantity)"
        )
    chains, n, _ = draws.shape
    if chains < min_chains:
        raise ValueError(f"need at least {min_chains} chain(s), got {chains}")
    if n < 4:
        raise ValueError(f"need at least 4 draws per chain, got {n}")
    if not jnp.issubdtype(draws.dtype, jnp.floating):
        draws = draws.astype(jnp.float32)
    return draws


def _split_chains(x: jax.Array) -> jax.Array:
    """(chains, n) -> (2 chains, n // 2): first and last halves of every chain."""
    half = x.shape[1] // 2
    return jnp.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _z_scale(x: jax.Array) -> jax.Array:
    """Rank-normalised values: average ranks (ties share their mean rank) over all entries, mapped
    through the normal quantile function with Blom's offset 3/8."""
    flat = x.reshape(-1)
    ordered = jnp.sort(flat)
    below = jnp.searchsorted(ordered, flat, side="left")
    up_to = jnp.searchsorted(ordered, flat, side="right")
    rank = (below + up_to + 1).astype(x.dtype) / 2
    return ndtri((rank - 3 / 8) / (flat.size + 1 / 4)).reshape(x.shape)


def _rhat(x: jax.Array) -> jax.Array:
    """Classic R-hat of (chains, n) draws: sqrt((B / W + n - 1) / n)."""
    n = x.shape[1]
    between = n * jnp.var(jnp.mean(x, axis=1), ddof=1)
    within = jnp.mean(jnp.var(x, axis=1, ddof=1))
    return jnp.sqrt((between / within + n - 1) / n)


def _autocov(x: jax.Array) -> jax.Array:
    """Biased autocovariance (1/n sum over the overlap) of every chain at lags 0..n-1, by FFT with
    zero padding to 2n so that the circular correlation equals the linear one."""
    n = x.shape[1]
    centred = x - jnp.mean(x, axis=1, keepdims=True)
    spectrum = jnp.fft.rfft(centred, n=2 * n, axis=1)
    power = spectrum * jnp.conj(spectrum)
    return jnp.fft.irfft(power, n=2 * n, axis=1)[:, :n].astype(x.dtype) / n


def _ess(x: jax.Array) -> jax.Array:
    """Effective sample size of (chains, n) draws (ArviZ's `_ess`, vectorised Geyer sequences)."""
    chains, n = x.shape
    acov = _autocov(x)
    mean_var = jnp.mean(acov[:, 0]) * n / (n - 1)
    var_plus = mean_var * (n - 1) / n
    if chains > 1:
        var_plus = var_plus + jnp.var(jnp.mean(x, axis=1), ddof=1)
    rho = 1 - (mean_var - jnp.mean(acov, axis=0)) / var_plus
    rho = rho.at[0].set(1)

    # Pairs P_m = rho_2m + rho_2m+1 for m = 0..last; ArviZ's loop looks at pair m while
    # 2m - 1 < n - 3 and stops after the first pair that is not positive.
    last = max((n - 3) // 2, 0)
    pairs = rho[0 : 2 * last + 2 : 2] + rho[1 : 2 * last + 2 : 2]
    not_positive = pairs <= 0
    stop = jnp.where(jnp.any(not_positive), jnp.argmax(not_positive), last)
    # Initial monotone sequence: each kept pair no larger than the one before it.
    monotone = lax.cummin(pairs, axis=0)
    kept = jnp.sum(jnp.where(jnp.arange(last + 1) < stop, monotone, 0))
    # The even lag of the stopping pair counts once if positive (or if the pair was stored).
    rho_even = rho[2 * stop]
    extra = jnp.where((rho_even > 0) | (pairs[stop] >= 0), rho_even, 0)
    total = chains * n
    tau = jnp.maximum(-1 + 2 * kept + extra, 1 / np.log10(total))
    ess = jnp.where(jnp.any(jnp.isnan(rho)), jnp.nan, total / tau)
    return jnp.where(jnp.max(x) - jnp.min(x) < _CONSTANT_RANGE, total, ess).astype(x.dtype)


def _rank_rhat_one(x: jax.Array) -> jax.Array:
    split = _split_chains(x)
    bulk = _rhat(_z_scale(split))
    tail = _rhat(_z_scale(jnp.abs(split - jnp.median(split))))
    return jnp.maximum(bulk, tail)


def _ess_bulk_one(x: jax.Array) -> jax.Array:
    return _ess(_z_scale(_split_chains(x)))


def _ess_tail_one(x: jax.Array) -> jax.Array:
    quantiles = jnp.quantile(x, jnp.asarray([0.05, 0.95], x.dtype))
    low = _ess(_split_chains((x <= quantiles[0]).astype(x.dtype)))
    high = _ess(_split_chains((x <= quantiles[1]).astype(x.dtype)))
    return jnp.minimum(low, high)


_rank_rhat = jax.jit(jax.vmap(_rank_rhat_one, in_axes=2))
_ess_bulk = jax.jit(jax.vmap(_ess_bulk_one, in_axes=2))
_ess_tail = jax.jit(jax.vmap(_ess_tail_one, in_axes=2))


def rank_normalized_split_rhat(draws) -> jax.Array:
    """Rank-normalised split-R-hat (bulk and tail, the larger of the two) of every quantity.

    Args:
        draws: shape `(chains, draws, k)` with at least 2 chains and 4 draws per chain.

    Returns:
        Shape `(k,)`. Values near 1 mean the chains agree; above 1.01 means more sampling is
        needed (Vehtari et al. 2021). NaN for a quantity that never changed.
    """
    return _rank_rhat(_as_draws(draws, min_chains=2))


def ess_bulk(draws) -> jax.Array:
    """Bulk effective sample size (ESS of the rank-normalised split chains) of every quantity.

    Args:
        draws: shape `(chains, draws, k)` with at least 4 draws per chain.

    Returns:
        Shape `(k,)`, in draws: about chains x draws for independent draws, less for
        autocorrelated chains.
    """
    return _ess_bulk(_as_draws(draws, min_chains=1))


def ess_tail(draws) -> jax.Array:
    """Tail effective sample size: the smaller ESS of the 5% and 95% quantile indicators.

    Args:
        draws: shape `(chains, draws, k)` with at least 4 draws per chain.

    Returns:
        Shape `(k,)`, in draws; it says how well the ends of a 90% credible interval are known.
    """
    return _ess_tail(_as_draws(draws, min_chains=1))


def convergence_summary(draws=None, *, voxel_rhat=None) -> dict[str, float]:
    """A few numbers that say whether a run has converged, as Python floats (NaNs ignored).

    Args:
        draws: stored draws of the tracked quantities, shape `(chains, draws, k)`, or None.
        voxel_rhat: per-voxel split-R-hat from the streamed halves (`split_rhat_from_halves`), any
            shape, or None.

    Returns:
        With `draws`: `rhat_max`, `rhat_median` (rank-normalised split-R-hat), `ess_bulk_min`,
        `ess_bulk_median`, `ess_tail_min`, `ess_tail_median`. With `voxel_rhat`: `voxel_rhat_max`,
        `voxel_rhat_median`. R-hat needs at least 2 chains; with one chain the R-hat entries are
        left out.
    """
    if draws is None and voxel_rhat is None:
        raise ValueError("give draws (chains, draws, k), voxel_rhat, or both")
    summary: dict[str, float] = {}
    if draws is not None:
        draws = _as_draws(draws, min_chains=1)
        if draws.shape[0] > 1:
            rhat = np.asarray(rank_normalized_split_rhat(draws), np.float64)
            summary["rhat_max"] = float(np.nanmax(rhat))
            summary["rhat_median"] = float(np.nanmedian(rhat))
        bulk = np.asarray(ess_bulk(draws), np.float64)
        tail = np.asarray(ess_tail(draws), np.float64)
        summary["ess_bulk_min"] = float(np.nanmin(bulk))
        summary["ess_bulk_median"] = float(np.nanmedian(bulk))
        summary["ess_tail_min"] = float(np.nanmin(tail))
        summary["ess_tail_median"] = float(np.nanmedian(tail))
    if voxel_rhat is not None:
        values = np.asarray(voxel_rhat, np.float64)
        summary["voxel_rhat_max"] = float(np.nanmax(values))
        summary["voxel_rhat_median"] = float(np.nanmedian(values))
    return summary
