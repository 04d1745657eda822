"""Streaming per-voxel statistics a chain runner carries through its `lax.scan`.

Nothing here stores samples: a kept draw updates

- `Welford` states: count, mean and M2 (sum of squared deviations) of every voxel, one state per
  chain (leading chain axis) so that the pooled state is a merge away (Chan, Golub & LeVeque 1979);
- `SplitHalves`: per chain, one Welford state for the first and one for the second half of the kept
  draws, from which the classic split-R-hat of every voxel follows (Gelman et al., BDA3, sec. 11.4);
- `P2Sketch`: the P^2 quantile estimator (Jain & Chlamtac 1985) for every voxel and every requested
  quantile level, 5 marker heights and 3 marker positions per voxel and level, whatever the number of
  draws.

All states are NamedTuples of arrays (pytrees), so they are scan carries; their floating arrays keep
the dtype they were created with (float32 by default, float64 when asked). Counts are int32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _shape_tuple(shape) -> tuple[int, ...]:
    return (int(shape),) if np.ndim(shape) == 0 else tuple(int(s) for s in shape)


def _check_dtype(dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype (float32 or float64), got {dtype}")
    return dtype


def _expand_to(a: jax.Array, ndim: int) -> jax.Array:
    """`a` with trailing singleton axes, so that a per-chain count broadcasts over voxels."""
    return a.reshape(a.shape + (1,) * (ndim - a.ndim))


def _check_draw_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(got) != tuple(want):
        raise ValueError(
            f"{name} must have shape {tuple(want)} to match the state, got {tuple(got)}"
        )


# --------------------------------------------------------------------------------------------------
# Welford mean / variance


class Welford(NamedTuple):
    """Running count, mean and M2 (sum of squared deviations from the mean).

    Attributes:
        count: int32 number of draws seen, shape `batch` (`()` for one state, `(C,)` for per-chain
            states).
        mean: running mean, shape `batch + shape`.
        m2: sum of squared deviations from the running mean, shape `batch + shape`.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def welford_init(shape, dtype=jnp.float32, *, num_chains: int | None = None) -> Welford:
    """An empty Welford state.

    Args:
        shape: shape of one draw (e.g. a volume's `(z, y, x)`).
        dtype: floating dtype of the mean and M2.
        num_chains: when given, one state per chain: `count` has shape `(num_chains,)` and `mean`,
            `m2` have shape `(num_chains, *shape)`.

    Returns:
        A `Welford` state with count 0 and zero mean and M2.
    """
    shape = _shape_tuple(shape)
    dtype = _check_dtype(dtype)
    batch = () if num_chains is None else (int(num_chains),)
    if num_chains is not None and batch[0] < 1:
        raise ValueError(f"num_chains must be >= 1, got {num_chains}")
    zeros = jnp.zeros(batch + shape, dtype)
    return Welford(jnp.zeros(batch, jnp.int32), zeros, zeros)


def welford_update(state: Welford, x: jax.Array) -> Welford:
    """Add one draw per state (Welford 1962).

    In float32 the relative error of a single state grows like sqrt(n) times the unit roundoff
    (measured: about 1e-5 after 1e5 updates of one state); per-chain states pooled with
    `welford_pool` (100 chains x 1000 draws) or `welford_update_batch` stay within 1e-6.

    Args:
        state: a single state or per-chain states.
        x: the draw(s), shape `state.mean.shape` (for per-chain states: one draw per chain,
            leading chain axis).

    Returns:
        The updated state, in the state's dtype.
    """
    _check_draw_shape("x", jnp.shape(x), state.mean.shape)
    x = jnp.asarray(x, state.mean.dtype)
    count = state.count + 1
    n = _expand_to(count, x.ndim).astype(x.dtype)
    delta = x - state.mean
    mean = state.mean + delta / n
    return Welford(count, mean, state.m2 + delta * (x - mean))


def welford_update_batch(state: Welford, xs: jax.Array) -> Welford:
    """Add a batch of draws at once: two-pass mean and M2 of the batch, then a merge.

    More accurate in float32 than one `welford_update` per draw, since the batch's own sums are
    formed by a reduction rather than by as many small increments.

    Args:
        state: a single state or per-chain states.
        xs: shape `(m, *state.mean.shape)`: m draws for every state.

    Returns:
        The updated state (count increased by m).
    """
    if jnp.ndim(xs) != state.mean.ndim + 1:
        raise ValueError(
            f"xs must have shape (m, *{state.mean.shape}) (a leading batch axis), "
            f"got {jnp.shape(xs)}"
        )
    _check_draw_shape("xs[0]", jnp.shape(xs)[1:], state.mean.shape)
    xs = jnp.asarray(xs, state.mean.dtype)
    m = xs.shape[0]
    mean = jnp.mean(xs, axis=0)
    m2 = jnp.sum(jnp.square(xs - mean), axis=0)
    batch = Welford(jnp.full(state.count.shape, m, jnp.int32), mean, m2)
    return welford_merge(state, batch)


def welford_merge(a: Welford, b: Welford) -> Welford:
    """Combine two states as if one had seen both streams (Chan, Golub & LeVeque parallel merge).

    Args:
        a, b: states of the same shapes and dtype (single or per-chain, elementwise).

    Returns:
        The merged state: count `a.count + b.count`, exact mean and M2 of the union (empty states
        merge to an empty state).
    """
    count = a.count + b.count
    ndim = a.mean.ndim
    na = _expand_to(a.count, ndim).astype(a.mean.dtype)
    nb = _expand_to(b.count, ndim).astype(a.mean.dtype)
    n = jnp.maximum(na + nb, 1)
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb / n)
    m2 = a.m2 + b.m2 + jnp.square(delta) * (na * nb / n)
    return Welford(count, mean, m2)


def welford_pool(state: Welford) -> Welford:
    """Merge per-chain states (leading chain axis) into one pooled state.

    Args:
        state: per-chain states, `count` of shape `(C,)`.

    Returns:
        A single state over all chains' draws (the multi-way form of `welford_merge`:
        M2 = sum_c M2_c + sum_c n_c (mean_c - mean)^2).
    """
    if state.count.ndim != 1:
        raise ValueError(
            f"welford_pool needs per-chain states (count of shape (C,)), got count shape "
            f"{state.count.shape}; build them with welford_init(..., num_chains=C)"
        )
    ndim = state.mean.ndim
    nc = _expand_to(state.count, ndim).astype(state.mean.dtype)
    total = jnp.sum(state.count)
    n = jnp.maximum(jnp.sum(nc, axis=0), 1)
    mean = jnp.sum(nc * state.mean, axis=0) / n
    m2 = jnp.sum(state.m2, axis=0) + jnp.sum(nc * jnp.square(state.mean - mean), axis=0)
    return Welford(total, mean, m2)


def welford_finalize(state: Welford) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased variance (ddof = 1) of the draws seen.

    Args:
        state: a single state or per-chain states.

    Returns:
        `(mean, var)`, each of shape `state.mean.shape` and the state's dtype. The mean is NaN where
        no draw was seen, the variance where fewer than two were.
    """
    n = _expand_to(state.count, state.mean.ndim)
    nan = jnp.asarray(jnp.nan, state.mean.dtype)
    mean = jnp.where(n > 0, state.mean, nan)
    var = jnp.where(n > 1, state.m2 / jnp.maximum(n - 1, 1).astype(state.m2.dtype), nan)
    return mean, var


# --------------------------------------------------------------------------------------------------
# Split-chain R-hat from streamed halves


class SplitHalves(NamedTuple):
    """Per-chain Welford states of the first and of the second half of each chain's kept draws.

    Attributes:
        first: per-chain states (`count` of shape `(C,)`) of kept draws `k < n_kept // 2`.
        second: per-chain states of kept draws `k >= n_kept - n_kept // 2`.
    """

    first: Welford
    second: Welford


def split_halves_init(shape, num_chains: int, dtype=jnp.float32) -> SplitHalves:
    """Empty split-half states for `num_chains` chains.

    Args:
        shape: shape of one draw of one chain.
        num_chains: number of chains C (R-hat needs C >= 1: the 2C half-chains are compared).
        dtype: floating dtype of the statistics.

    Returns:
        A `SplitHalves` with two empty per-chain Welford states.
    """
    state = welford_init(shape, dtype, num_chains=num_chains)
    return SplitHalves(state, state)


def split_halves_update(state: SplitHalves, x: jax.Array, k, n_kept) -> SplitHalves:
    """Feed kept draw number `k` (0-based) of `n_kept` of every chain.

    As in ArviZ and Stan's `posterior`, the first `n_kept // 2` draws form the first half-chain and
    the last `n_kept // 2` the second; when `n_kept` is odd the middle draw belongs to neither.

    Args:
        state: the split-half states.
        x: the chains' current draws, shape `(C, *shape)`.
        k: index of this kept draw, an int or int array (the same for all chains).
        n_kept: number of draws each chain will keep after burn-in and thinning, an int or int
            array known before the run.

    Returns:
        The updated states (only the half that `k` belongs to changes).
    """
    k = jnp.asarray(k)
    n_kept = jnp.asarray(n_kept)
    half = n_kept // 2
    branch = jnp.where(k < half, 0, jnp.where(k >= n_kept - half, 1, 2))
    return lax.switch(
        branch,
        [
            lambda s: SplitHalves(welford_update(s.first, x), s.second),
            lambda s: SplitHalves(s.first, welford_update(s.second, x)),
            lambda s: s,
        ],
        state,
    )


def split_rhat_from_halves(halves: SplitHalves) -> jax.Array:
    """Classic split-R-hat of every voxel from the streamed half-chains (BDA3, eq. 11.4).

    With m = 2C half-chains of n draws each, half-chain means mu_j and variances s_j^2 (ddof = 1):
    W = mean_j s_j^2, B / n = var_j(mu_j) (ddof = 1), var+ = (n - 1) / n W + B / n and
    R-hat = sqrt(var+ / W). Valid once all `n_kept` draws have been fed (all half-chains then hold
    n = n_kept // 2 draws).

    Args:
        halves: the split-half states after the run.

    Returns:
        R-hat per voxel, shape of one draw, in the states' dtype; NaN where the within-chain
        variance is zero (a voxel that never moved).
    """
    if halves.first.count.ndim != 1:
        raise ValueError("split_rhat_from_halves needs per-chain states; use split_halves_init")
    means = jnp.concatenate([halves.first.mean, halves.second.mean], axis=0)
    m2 = jnp.concatenate([halves.first.m2, halves.second.m2], axis=0)
    n = halves.first.count[0].astype(means.dtype)
    within = jnp.mean(m2, axis=0) / (n - 1)
    between_over_n = jnp.var(means, axis=0, ddof=1)
    var_plus = (n - 1) / n * within + between_over_n
    return jnp.sqrt(var_plus / within)


# --------------------------------------------------------------------------------------------------
# P^2 quantile sketch


class P2Sketch(NamedTuple):
    """P^2 quantile estimators for every voxel and every quantile level.

    Attributes:
        levels: quantile levels p in (0, 1), shape `(L,)`, in the sketch's dtype.
        heights: the five marker heights, each of shape `(L, *shape)`; marker 2 estimates the
            p-quantile, 0 and 4 are the running minimum and maximum. Before the fifth draw they
            are a sorted buffer of the draws seen, padded with +inf.
        positions: the 1-based positions of the middle markers 1, 2, 3 among the sorted draws,
            each of shape `(L, *shape)` (markers 0 and 4 sit at 1 and `count`), as whole numbers
            in the heights' dtype (exact in float32 up to 2^24 draws).
        count: int32 number of draws seen per voxel (the same for all voxels).

    Markers are kept as separate arrays, positions in the heights' dtype: XLA then updates them
    in a few fused loops without recomputing the shared work (stacked into one array, or with
    integer positions, the update took 1.5 times as long).

    Memory: 8 numbers per voxel and level (about 1 GB for two levels of a 256^3 float32 volume).
    """

    levels: jax.Array
    heights: tuple[jax.Array, ...]
    positions: tuple[jax.Array, ...]
    count: jax.Array


def p2_max_draws(dtype) -> int:
    """Draws a sketch of this dtype can take: its positions are exact integers up to 2^(mantissa
    bits + 1) (float32: 2^24, about 16.8 million)."""
    return 2 ** (jnp.finfo(dtype).nmant + 1)


def p2_init(shape, levels: Sequence[float] = (0.05, 0.95), dtype=jnp.float32) -> P2Sketch:
    """An empty P^2 sketch.

    P^2 needs five observations to place its markers. The sketch starts empty and keeps the first
    five draws of every voxel, sorted, in the marker heights; the fifth draw completes the standard
    P^2 initial state (heights = the five sorted draws, positions 1..5). So `p2_update` takes draws
    one at a time or in groups of any size from the very first step, and no separate warm-up is
    needed inside a scan.

    Args:
        shape: shape of one draw (e.g. a volume's `(z, y, x)`).
        levels: quantile levels, each strictly between 0 and 1 (default: the 5% and 95% levels of
            a 90% central credible interval).
        dtype: floating dtype of the heights (float32 sketches take up to 2^24 draws).

    Returns:
        A `P2Sketch` with count 0.
    """
    shape = _shape_tuple(shape)
    dtype = _check_dtype(dtype)
    levels_np = np.atleast_1d(np.asarray(levels, dtype=np.float64))
    if levels_np.ndim != 1 or levels_np.size == 0:
        raise ValueError(
            f"levels must be a non-empty 1-D sequence of quantile levels, got {levels}"
        )
    if not np.all((levels_np > 0) & (levels_np < 1)):
        raise ValueError(f"quantile levels must lie strictly between 0 and 1, got {levels}")
    full = (levels_np.size, *shape)
    heights = tuple(jnp.full(full, jnp.inf, dtype) for _ in range(5))
    positions = tuple(jnp.full(full, i, dtype) for i in (2, 3, 4))
    return P2Sketch(jnp.asarray(levels_np, dtype), heights, positions, jnp.zeros((), jnp.int32))


def _p2_fill(heights: tuple[jax.Array, ...], x: jax.Array) -> tuple[jax.Array, ...]:
    """One of the first five draws: x joins the sorted buffer (its last slot, still +inf, drops
    out). Sorted insertion elementwise: the k-th smallest of {h_0..h_3, x} is
    max(h_{k-1}, min(h_k, x))."""
    h = heights
    return (
        jnp.minimum(h[0], x),
        *(jnp.maximum(h[k - 1], jnp.minimum(h[k], x)) for k in (1, 2, 3)),
        jnp.maximum(h[3], x),
    )


def _p2_adjust(qm, qi, qp, nm, ni, np_, desired):
    """Move the middle marker i by one position towards its desired position if it lags by >= 1
    and the neighbour leaves room; its height follows the piecewise-parabolic (P^2) formula, or the
    linear one when the parabola would leave the neighbours' bracket."""
    d = desired - ni
    up = (d >= 1) & (np_ - ni > 1)
    down = (d <= -1) & (nm - ni < -1)
    s = jnp.where(up, 1, jnp.where(down, -1, 0)).astype(qi.dtype)
    # The paper's order of operations: with tied heights the parabola can land exactly on a
    # neighbour, and the strict bracket test below must see the same rounding.
    parabolic = qi + s / (np_ - nm) * (
        (ni - nm + s) * (qp - qi) / (np_ - ni) + (np_ - ni - s) * (qi - qm) / (ni - nm)
    )
    q_next = jnp.where(s > 0, qp, qm)
    n_next = jnp.where(s > 0, np_, nm)
    linear = qi + s * (q_next - qi) / (n_next - ni)
    moved = jnp.where((qm < parabolic) & (parabolic < qp), parabolic, linear)
    return jnp.where(s != 0, moved, qi), ni + s


def _p2_step(levels: jax.Array, heights, positions, count, x):
    """One P^2 update (Jain & Chlamtac 1985): find the cell, move, adjust; vectorised over levels and
    voxels; `count` is the number of draws including x. Returns (heights, positions)."""
    dtype = heights[0].dtype
    q = list(heights)
    # The cell of x: markers above it move one position up (strict < as in the paper).
    q[0] = jnp.minimum(q[0], x)
    q[4] = jnp.maximum(q[4], x)
    n = [positions[i] + (x < q[i + 1]).astype(dtype) for i in range(3)]
    # Desired positions after `count` draws, 1 + (count - 1) * (p/2, p, (1+p)/2) for the
    # middle markers (the ends are pinned at 1 and count).
    p = levels.reshape((-1,) + (1,) * (q[0].ndim - 1))
    c = (count - 1).astype(dtype)
    desired = [1 + c * p / 2, 1 + c * p, 1 + c * (1 + p) / 2]
    pos = [jnp.ones_like(n[0]), *n, jnp.broadcast_to(count.astype(dtype), n[0].shape)]
    # Adjust the middle markers in order; each sees its neighbours' updated values.
    for i in (1, 2, 3):
        q[i], pos[i] = _p2_adjust(
            q[i - 1], q[i], q[i + 1], pos[i - 1], pos[i], pos[i + 1], desired[i - 1]
        )
    return tuple(q), tuple(pos[1:4])


def p2_update(state: P2Sketch, draws: jax.Array) -> P2Sketch:
    """Feed draws one after the other into every voxel's sketches (a `lax.scan` over the draws).

    Args:
        state: the sketch.
        draws: shape `(m, *shape)`: m draws of every voxel, e.g. the C chains' current samples.
            Feeding a stream in groups of any sizes gives the same sketch as feeding it one draw at
            a time.

    Returns:
        The updated sketch (count increased by m).
    """
    shape = state.heights[0].shape[1:]
    if jnp.ndim(draws) != len(shape) + 1:
        raise ValueError(
            f"draws must have shape (m, *{shape}) (a leading axis of draws), got {jnp.shape(draws)}"
        )
    _check_draw_shape("draws[0]", jnp.shape(draws)[1:], shape)
    draws = jnp.asarray(draws, state.heights[0].dtype)

    def one(carry, x):
        heights, positions, count = carry
        count = count + 1
        heights, positions = lax.cond(
            count <= 5,
            lambda h, pos: (_p2_fill(h, x), pos),
            lambda h, pos: _p2_step(state.levels, h, pos, count, x),
            heights,
            positions,
        )
        return (heights, positions, count), None

    carry = (state.heights, state.positions, state.count)
    if draws.shape[0] == 1:  # the runner's case: no loop around one draw
        (heights, positions, count), _ = one(carry, draws[0])
    else:
        (heights, positions, count), _ = lax.scan(one, carry, draws)
    return P2Sketch(state.levels, heights, positions, count)


def p2_quantile(state: P2Sketch) -> jax.Array:
    """The current quantile estimates.

    Args:
        state: the sketch.

    Returns:
        Shape `(L, *shape)`, one estimate per level (in `state.levels` order) and voxel, in the
        sketch's dtype. After more than five draws, the P^2 estimate (the middle marker's height);
        with one to five draws, the exact sample quantile of the draws seen (linear interpolation,
        numpy's default); NaN before any draw.
    """
    count = state.count
    buffer = jnp.stack(state.heights, axis=1)
    p = state.levels.reshape((-1, 1) + (1,) * (buffer.ndim - 2))
    # Sample quantile of the sorted buffer's first `seen` entries (used only while count <= 5;
    # `seen` is clipped so that the indices stay inside the 5-slot buffer in every case).
    seen = jnp.clip(count, 1, 5)
    h = p * (seen - 1).astype(buffer.dtype)
    lo = jnp.floor(h)
    index_shape = (buffer.shape[0], 1, *buffer.shape[2:])
    lo_i = jnp.broadcast_to(lo.astype(jnp.int32), index_shape)
    hi_i = jnp.minimum(lo_i + 1, seen - 1)
    q_lo = jnp.take_along_axis(buffer, lo_i, axis=1)
    q_hi = jnp.take_along_axis(buffer, hi_i, axis=1)
    exact = (q_lo + (h - lo) * (q_hi - q_lo))[:, 0]
    nan = jnp.asarray(jnp.nan, buffer.dtype)
    return jnp.where(count == 0, nan, jnp.where(count <= 5, exact, buffer[:, 2]))
