"""Input checks and the iteration driver shared by the solvers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ..operators import AbstractLinearOperator

# Iterations per jitted call when a progress bar is shown.
PROGRESS_CHUNK = 10


def check_operator(operator: Any, solver: str) -> None:
    if not isinstance(operator, AbstractLinearOperator):
        raise ValueError(
            f"{solver} needs a linear operator (e.g. a TiltProjector), "
            f"got {type(operator).__name__}"
        )


def check_data(tilt_series: Any, operator: AbstractLinearOperator) -> None:
    expected = tuple(operator.out_structure().shape)
    if tuple(np.shape(tilt_series)) != expected:
        raise ValueError(
            f"tilt series has shape {tuple(np.shape(tilt_series))} but the operator produces "
            f"{expected}; pass the data the operator was built for"
        )


def check_start(x0: Any, operator: AbstractLinearOperator) -> None:
    shape = tuple(operator.in_structure().shape)
    if x0 is not None and tuple(np.shape(x0)) != shape:
        raise ValueError(f"x0 has shape {tuple(np.shape(x0))} but the operator takes {shape}")


def check_num_iters(num_iters: Any) -> int:
    if isinstance(num_iters, bool) or not isinstance(num_iters, (int, np.integer)):
        raise ValueError(f"num_iters must be a Python int >= 1, got {num_iters!r}")
    if num_iters < 1:
        raise ValueError(f"num_iters must be at least 1, got {num_iters}")
    return int(num_iters)


def check_scalar(value: Any, name: str, *, low: float, low_open: bool = False,
                 high: float | None = None) -> None:
    """Range-check a concrete scalar (traced values pass through unchecked)."""
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
    if isinstance(value, jax.core.Tracer):
        return
    v = float(value)
    bad = not np.isfinite(v) or v < low or (low_open and v == low)
    if bad or (high is not None and v >= high):
        lo = f"{'>' if low_open else '>='} {low}"
        hi = f" and < {high}" if high is not None else ""
        raise ValueError(f"{name} must be a finite number {lo}{hi}, got {v}")


def start(x0: Any, operator: AbstractLinearOperator, dtype) -> jax.Array:
    """The starting volume: zeros by default."""
    if x0 is None:
        return jnp.zeros(operator.in_structure().shape, dtype)
    return jnp.asarray(x0, dtype)


def safe_norm_of(b: jax.Array) -> jax.Array:
    """||b||, or 1 when b = 0 so that relative residuals stay finite."""
    n = jnp.linalg.norm(b)
    return jnp.where(n > 0, n, jnp.ones_like(n))


def iterate(chunk: Callable, state: Any, num_iters: int, progress: bool, desc: str):
    """Run `chunk(state, n) -> (state, per-iteration outputs)` for `num_iters` iterations.

    Without progress this is one jitted call; with progress the same iterations run in calls of
    `PROGRESS_CHUNK`, blocking after each so the bar shows finished work. Both paths scan the
    same step function (the tests check that the results are bitwise identical).
    """
    if not progress:
        return chunk(state, num_iters)
    outputs = []
    with tqdm(total=num_iters, desc=desc, unit="it") as bar:
        done = 0
        while done < num_iters:
            n = min(PROGRESS_CHUNK, num_iters - done)
            state, out = chunk(state, n)
            jax.block_until_ready(out)
            outputs.append(out)
            bar.update(n)
            done += n
    return state, jax.tree.map(lambda *parts: jnp.concatenate(parts), *outputs)
