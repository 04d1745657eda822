"""Running many chains at once: one jitted `lax.scan` over steps of all chains (a `vmap` on
accelerators, one chain after the other on CPUs), carrying streaming statistics instead of
samples.

What comes back (`ChainSummary`): the MMSE estimate (mean), the per-voxel standard deviation, a
credible interval per voxel (streaming P^2 quantiles), the acceptance rate, split R-hat per voxel
(from half-chain Welford statistics), rank-normalised split R-hat and bulk/tail ESS on a random
subset of tracked voxels whose draws are kept, scalar traces, and for Metropolis-Hastings samplers
the most visited state (the "MAP" of the thesis). Step i uses the key fold_in(rng_key, i), so a run
cut into segments, checkpointed and resumed gives the same numbers as one uninterrupted run.

Chains are independent, so with several devices they are split among them (`shard_map`), each
device running its share; on a CPU that needs JAX started with several CPU devices
(`jax.config.update("jax_num_cpu_devices", n)` before any computation), which importing
cryojax_mw does (see `cryojax_mw._devices`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from ..io import atomic_write
from . import _diagnostics as diag
from . import _stats as stats


@dataclasses.dataclass(frozen=True)
class ChainSummary:
    """What `run_chains` returns (NumPy arrays).

    Attributes:
        mean: the MMSE estimate, pooled over chains and kept draws.
        std: per-voxel posterior standard deviation (pooled, ddof=1).
        ci_low, ci_high: per-voxel credible interval at `level`: streaming P^2 quantiles of each
            chain, averaged over chains (chains that agree have the same quantiles).
        level: the interval's probability (0.9 = from the 5% to the 95% quantile).
        acceptance_rate: mean acceptance per chain, shape (chains,).
        rhat: per-voxel split R-hat (classic, from half-chain means and variances).
        diagnostics: `voxel_rhat_max` / `_median` (split R-hat over all voxels); `rhat_max` /
            `_median` (rank-normalised split R-hat), `ess_bulk_min` / `_median` and
            `ess_tail_min` / `_median` over the tracked voxels; `map_run_length` for MH samplers.
        traces: name -> (num_steps, chains) scalar traces (acceptance, data fidelity, PSNR...).
        map_estimate: the most visited state (longest run without a move) over all chains, for
            samplers that report `is_accepted`; None otherwise.
        num_kept: kept draws per chain.
        num_chains: number of chains.
    """

    mean: np.ndarray
    std: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    level: float
    acceptance_rate: np.ndarray
    rhat: np.ndarray
    diagnostics: dict
    traces: dict
    map_estimate: np.ndarray | None
    num_kept: int
    num_chains: int


class _Carry(NamedTuple):
    states: Any  # the algorithm's states, leading chain axis
    moments: Any  # per-chain Welford over the kept draws (pooled at the end)
    halves: Any  # Welford per chain and half
    quantiles: Any  # per-chain P^2 sketches of the interval's two ends
    tracked: jax.Array  # (chains, num_kept, k) draws of the tracked voxels
    accepted: jax.Array  # (chains,) sum of acceptance rates
    run_length: jax.Array  # (chains,) steps since the last move
    best_length: jax.Array  # (chains,) longest run seen
    best_state: jax.Array  # (chains, ...) the position of that run


def _check(num_steps, burn_in, thin, level, initial_positions) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= burn_in < num_steps:
        raise ValueError(f"burn_in must be in [0, num_steps), got {burn_in} for {num_steps} steps")
    if thin < 1:
        raise ValueError(f"thin must be >= 1, got {thin}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if (num_steps - burn_in + thin - 1) // thin < 4:
        raise ValueError("fewer than 4 kept draws per chain: raise num_steps or lower burn_in/thin")
    if not np.all(np.isfinite(np.asarray(initial_positions))):
        raise ValueError("initial_positions hold NaN or Inf values")
    if np.ndim(initial_positions) < 2:
        raise ValueError("initial_positions need a leading chain axis: shape (chains, ...)")


def _info_acceptance(info) -> jax.Array:
    return jnp.asarray(getattr(info, "acceptance_rate", 1.0), jnp.float32)


def _info_moved(info) -> jax.Array | None:
    return getattr(info, "is_accepted", None)


def run_chains(
    rng_key: jax.Array,
    algorithm,
    initial_positions,
    num_steps: int,
    burn_in: int,
    thin: int = 1,
    *,
    level: float = 0.9,
    truth=None,
    trace_fns: Mapping[str, Callable] | None = None,
    num_tracked: int = 64,
    segment_steps: int | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    devices: Sequence[jax.Device] | None = None,
    vectorize_chains: bool | None = None,
) -> ChainSummary:
    """Run `len(initial_positions)` chains of `algorithm` and summarise them without storing
    samples.

    Args:
        rng_key: typed PRNG key.
        algorithm: a blackjax `SamplingAlgorithm` (this package's `mwr`, `ula`, `myula`,
            `pnp_ula`, or blackjax's own `mala`, `hmc`, ...) whose states have `.position`.
        initial_positions: (chains, ...) starting points.
        num_steps: steps per chain, burn-in included.
        burn_in: steps discarded at the start (< num_steps).
        thin: keep every `thin`-th draw after burn-in.
        level: credible-interval probability (0.9 -> 5% and 95% quantiles).
        truth: optional ground truth: a "psnr" trace of each chain's current state is recorded.
        trace_fns: name -> (position -> scalar) extra traces; states with a `.fidelity` (MWR)
            are traced as "fidelity" automatically.
        num_tracked: voxels whose draws are kept for rank-normalised R-hat and ESS.
        segment_steps: steps per jitted segment (progress bar and checkpoint granularity);
            default about a tenth of the run.
        checkpoint: a file (.npz) saved after each segment; a later call with the same arguments
            resumes from it and returns what an uninterrupted run would.
        progress: show a progress bar with the acceptance rate of the last segment and the
            largest rank-normalised R-hat of the tracked voxels over the draws kept so far.
        devices: devices to split the chains among (default: all devices of JAX's default
            backend). As many are used as divide the number of chains; results do not depend on
            how many (up to float rounding).
        vectorize_chains: run a device's chains as one `vmap` (True) or one after the other
            (False). Default: vmap on accelerators and for small chains, one after the other on
            CPUs for chains of 2^16 voxels or more, whose working sets then stay in cache.

    Returns:
        A `ChainSummary`.
    """
    _check(num_steps, burn_in, thin, level, initial_positions)
    positions = jnp.asarray(initial_positions)
    n_chains = positions.shape[0]
    voxel_shape = positions.shape[1:]
    dtype = positions.dtype
    num_kept = (num_steps - burn_in + thin - 1) // thin
    if num_kept > stats.p2_max_draws(dtype):
        raise ValueError(
            f"{num_kept} kept draws per chain is more than the quantile sketches count exactly in "
            f"{dtype} ({stats.p2_max_draws(dtype)}); raise thin"
        )
    n_voxels = math.prod(voxel_shape)
    tracked_index = np.random.default_rng(0).choice(
        n_voxels, size=min(num_tracked, n_voxels), replace=False
    )
    tracked_index = jnp.asarray(np.sort(tracked_index))

    trace_fns = dict(trace_fns or {})
    if truth is not None:
        if np.shape(truth) != voxel_shape:
            raise ValueError(
                f"truth has shape {np.shape(truth)} but each chain's position has {voxel_shape}"
            )
        truth_arr = jnp.asarray(truth, dtype)
        peak = jnp.max(truth_arr) - jnp.min(truth_arr)
        trace_fns["psnr"] = lambda x: 10 * jnp.log10(peak**2 / jnp.mean((x - truth_arr) ** 2))

    tail = (1 - level) / 2

    def init_chain(position) -> _Carry:
        moments = stats.welford_init(voxel_shape, dtype)
        return _Carry(
            states=algorithm.init(position),
            moments=moments,
            halves=stats.SplitHalves(moments, moments),
            quantiles=stats.p2_init(voxel_shape, (tail, 1 - tail), dtype),
            tracked=jnp.zeros((num_kept, tracked_index.size), dtype),
            accepted=jnp.zeros((), jnp.float32),
            run_length=jnp.zeros((), jnp.int32),
            best_length=jnp.full((), -1, jnp.int32),
            best_state=position,
        )

    # Every carried array has the chain axis first: one chain's carry is a slice.
    carry = jax.vmap(init_chain)(positions)
    has_fidelity = hasattr(carry.states, "fidelity")
    mesh = _chain_mesh(n_chains, devices)
    n_local = n_chains // (mesh.size if mesh is not None else 1)
    if vectorize_chains is None:
        platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        vectorize_chains = platform != "cpu" or n_voxels < _MAP_CHAINS_FROM_VOXELS

    def chain_step(key, c: _Carry, i):
        state, info = algorithm.step(key, c.states)
        x = state.position
        kept = (i >= burn_in) & ((i - burn_in) % thin == 0)
        j = (i - burn_in) // thin

        def update(c: _Carry) -> _Carry:
            return c._replace(
                moments=stats.welford_update(c.moments, x),
                halves=stats.split_halves_update(c.halves, x, j, num_kept),
                quantiles=stats.p2_update(c.quantiles, x[None]),
                tracked=c.tracked.at[j].set(x.reshape(-1)[tracked_index]),
            )

        c = jax.lax.cond(kept, update, lambda c: c, c._replace(states=state))
        c = c._replace(accepted=c.accepted + _info_acceptance(info))
        moved = _info_moved(info)
        if moved is not None:
            # A run is the number of steps a state is kept; the longest over the kept steps is
            # the most visited state.
            run = jnp.where(moved, 0, c.run_length + 1)
            better = kept & (run > c.best_length)
            c = c._replace(
                run_length=run,
                best_length=jnp.where(better, run, c.best_length),
                best_state=jnp.where(better, x, c.best_state),
            )
        traces = {"acceptance": _info_acceptance(info)}
        if has_fidelity:
            traces["fidelity"] = state.fidelity
        for name, fn in trace_fns.items():
            traces[name] = fn(x)
        return c, traces

    def one_step(carry: _Carry, i):
        keys = jax.random.split(jax.random.fold_in(rng_key, i), n_chains)
        if mesh is not None:
            # Every device draws all chains' keys and takes its own: the same keys as unsplit.
            first = jax.lax.axis_index(_CHAINS) * n_local
            keys = jax.lax.dynamic_slice_in_dim(keys, first, n_local)
        if vectorize_chains:
            return jax.vmap(chain_step, in_axes=(0, 0, None))(keys, carry, i)
        return jax.lax.map(lambda kc: chain_step(kc[0], kc[1], i), (keys, carry))

    def scan_segment(carry, steps):
        return jax.lax.scan(one_step, carry, steps)

    if mesh is None:
        run_segment = jax.jit(scan_segment)
    else:
        specs = P(_CHAINS)  # every carried array: chains first
        run_segment = jax.jit(
            jax.shard_map(
                scan_segment,
                mesh=mesh,
                in_specs=(specs, P()),
                out_specs=(specs, P(None, _CHAINS)),
                # The algorithm's own loops (a denoiser's scan) start from constants that the
                # per-device type check would call replicated; chains are independent anyway.
                check_vma=False,
            )
        )

    segment = segment_steps or max(1, math.ceil(num_steps / 10))
    fingerprint = _fingerprint(rng_key, carry, num_steps, burn_in, thin, level, segment)
    start, trace_chunks = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        carry, start, trace_chunks = _load_checkpoint(Path(checkpoint), carry, fingerprint)
    if mesh is not None:
        is_spec = lambda x: isinstance(x, P)
        shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=is_spec)
        carry = jax.device_put(carry, shardings)

    bar = tqdm(total=num_steps, initial=start, desc="sampling", unit="step", disable=not progress)
    while start < num_steps:
        stop = min(start + segment, num_steps)
        carry, traces = run_segment(carry, jnp.arange(start, stop))
        trace_chunks.append(jax.tree.map(np.asarray, traces))
        start = stop
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), carry, start, trace_chunks, fingerprint)
        if progress:
            bar.update(stop - bar.n)
            kept_so_far = min(max(0, (stop - burn_in + thin - 1) // thin), num_kept)
            bar.set_postfix(
                accept=f"{float(np.mean(traces['acceptance'])):.2f}",
                rhat=_running_rhat(carry.tracked, kept_so_far),
            )
    bar.close()
    return _summarise(carry, trace_chunks, num_steps, num_kept, level, n_chains)


_CHAINS = "chains"
# On a CPU, chains this large run one after the other: 8 vmapped 64^3 MWR chains took 17 times
# one chain's time (their working sets leave the cache), one after the other 9 times; small
# chains (the tests' 24^2) are faster vmapped, a loop over them costing more than they do.
_MAP_CHAINS_FROM_VOXELS = 1 << 16


def _chain_mesh(n_chains: int, devices) -> jax.sharding.Mesh | None:
    """A one-axis mesh over as many of `devices` as divide the chain count (None for one)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty: give at least one device, or None for all")
    used = max(d for d in range(1, len(devices) + 1) if n_chains % d == 0)
    if used == 1:
        return None
    return jax.sharding.Mesh(np.array(devices[:used]), (_CHAINS,))


def _running_rhat(tracked, kept: int) -> str:
    """The largest rank-normalised split R-hat of the tracked voxels over the first `kept` draws
    (for the progress bar; '-' until there are 2 chains and 4 draws)."""
    if tracked.shape[0] < 2 or kept < 4:
        return "-"
    rhat = np.asarray(diag.rank_normalized_split_rhat(np.asarray(tracked[:, :kept])))
    return f"{np.nanmax(rhat):.3f}" if np.any(np.isfinite(rhat)) else "-"


def _summarise(carry, trace_chunks, num_steps, num_kept, level, n_chains) -> ChainSummary:
    # Gathered to the host first: reductions over chains split across CPU devices would be
    # all-reduces, which deadlocked when the devices outnumbered the free threads.
    carry = jax.tree.map(np.asarray, carry)
    mean, var = stats.welford_finalize(stats.welford_pool(carry.moments))
    traces = {
        name: np.concatenate([chunk[name] for chunk in trace_chunks], axis=0)
        for name in trace_chunks[0]
    }
    rhat = np.asarray(stats.split_rhat_from_halves(carry.halves))
    diagnostics = diag.convergence_summary(np.asarray(carry.tracked), voxel_rhat=rhat)
    map_estimate = None
    if np.any(np.asarray(carry.best_length) >= 0):
        best = int(np.argmax(np.asarray(carry.best_length)))
        map_estimate = np.asarray(carry.best_state[best])
        diagnostics["map_run_length"] = int(np.asarray(carry.best_length)[best]) + 1
    low, high = np.asarray(jax.vmap(stats.p2_quantile)(carry.quantiles)).mean(axis=0)
    return ChainSummary(
        mean=np.asarray(mean),
        std=np.sqrt(np.asarray(var)),
        ci_low=low,
        ci_high=high,
        level=level,
        acceptance_rate=np.asarray(carry.accepted) / num_steps,
        rhat=rhat,
        diagnostics=diagnostics,
        traces=traces,
        map_estimate=map_estimate,
        num_kept=num_kept,
        num_chains=n_chains,
    )


def _fingerprint(rng_key, carry, *settings) -> str:
    leaves = jax.tree.leaves(carry)
    description = {
        "key": np.asarray(jax.random.key_data(rng_key)).tolist(),
        "leaves": [(tuple(np.shape(x)), str(jnp.asarray(x).dtype)) for x in leaves],
        "settings": [repr(s) for s in settings],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _save_checkpoint(path: Path, carry, step: int, trace_chunks, fingerprint: str) -> None:
    arrays = {f"carry_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(carry))}
    traces = {
        name: np.concatenate([c[name] for c in trace_chunks], axis=0) for name in trace_chunks[0]
    }
    arrays.update({f"trace_{name}": value for name, value in traces.items()})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, step=step, fingerprint=fingerprint, **arrays)

    atomic_write(path, write)


def _load_checkpoint(path: Path, carry, fingerprint: str):
    try:
        with np.load(path, allow_pickle=False) as data:
            saved = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise ValueError(
            f"checkpoint {path} is not readable ({err}); delete it to start over"
        ) from err
    if str(saved.get("fingerprint")) != fingerprint:
        raise ValueError(
            f"checkpoint {path} belongs to a different run (other key, chains, shapes or "
            "settings); delete it or choose another path"
        )
    leaves, treedef = jax.tree.flatten(carry)
    restored = [
        jnp.asarray(saved[f"carry_{i}"], dtype=jnp.asarray(x).dtype) for i, x in enumerate(leaves)
    ]
    traces = {k[len("trace_") :]: v for k, v in saved.items() if k.startswith("trace_")}
    return jax.tree.unflatten(treedef, restored), int(saved["step"]), [traces]
