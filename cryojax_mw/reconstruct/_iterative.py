"""Iterative least-squares reconstruction: SIRT and CGLS on any linear operator."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ..operators import AbstractLinearOperator
from ..operators._base import as_float
from ._common import (
    check_data,
    check_num_iters,
    check_operator,
    check_scalar,
    check_start,
    iterate,
    safe_norm_of,
    start,
)
from ._result import Reconstruction


def _guarded_inverse(s: jax.Array) -> jax.Array:
    """1 / s where s is clearly positive, else 0 (rays missing the volume, voxels no ray sees)."""
    tol = jnp.finfo(s.dtype).eps * jnp.max(jnp.abs(s))
    ok = s > tol
    return jnp.where(ok, 1.0 / jnp.where(ok, s, 1.0), 0.0)


@eqx.filter_jit
def _sirt_init(operator, b, x0):
    row_sums = operator.mv(jnp.ones_like(x0))
    col_sums = operator.T.mv(jnp.ones_like(b))
    weights = (_guarded_inverse(row_sums), _guarded_inverse(col_sums))
    return (x0, b - operator.mv(x0)), weights


@eqx.filter_jit
def _sirt_chunk(operator, b, weights, relaxation, state, num_iters, nonnegative):
    inv_row, inv_col = weights
    b_norm = safe_norm_of(b)

    def step(state, _):
        x, r = state
        x = x + relaxation * inv_col * operator.T.mv(inv_row * r)
        if nonnegative:
            x = jnp.maximum(x, 0.0)
        r = b - operator.mv(x)
        return (x, r), jnp.linalg.norm(r) / b_norm

    return lax.scan(step, state, None, length=num_iters)


def sirt(
    tilt_series: jax.Array,
    operator: AbstractLinearOperator,
    num_iters: int,
    *,
    x0: jax.Array | None = None,
    nonnegative: bool = False,
    relaxation: float | jax.Array = 1.0,
    progress: bool = False,
) -> Reconstruction:
    """Simultaneous iterative reconstruction technique (SIRT), as ASTRA defines it.

    Iterates `x <- x + relaxation * C A^T R (b - A x)` with `R = 1 / A(1)` (inverse row sums:
    ray lengths through the volume) and `C = 1 / A^T(1)` (inverse column sums), both computed once
    and set to 0 where a sum vanishes. For an operator with nonnegative entries and
    0 < relaxation < 2 this is a descent method on the weighted least-squares objective
    `||A x - b||_R^2` and converges to its minimiser nearest to x0 in the C^-1 norm.

    Args:
        tilt_series: the data b, shape `operator.out_structure().shape` ((n_tilts, y, x) or
            (n_tilts, x) for a `TiltProjector`); its floating dtype sets the working dtype.
        operator: the forward operator A (a `TiltProjector` or any nonnegative linear operator).
        num_iters: number of iterations (>= 1).
        x0: starting volume; zeros by default.
        nonnegative: clip x to >= 0 after each update (projected SIRT).
        relaxation: step factor in (0, 2); passed as an array, new values do not recompile.
        progress: show a progress bar (iterations run in jitted chunks; same result).

    Returns:
        `Reconstruction(volume, residuals)` with `residuals[k] = ||A x_k - b|| / ||b||`.
    """
    check_operator(operator, "sirt")
    check_data(tilt_series, operator)
    num_iters = check_num_iters(num_iters)
    check_scalar(relaxation, "relaxation", low=0.0, low_open=True, high=2.0)
    check_start(x0, operator)
    b = as_float(tilt_series)
    relaxation = jnp.asarray(relaxation, b.dtype)
    x0 = start(x0, operator, b.dtype)
    state, weights = _sirt_init(operator, b, x0)

    def chunk(state, n):
        return _sirt_chunk(operator, b, weights, relaxation, state, n, bool(nonnegative))

    (x, _), residuals = iterate(chunk, state, num_iters, progress, "SIRT")
    return Reconstruction(x, residuals)


@eqx.filter_jit
def _cgls_init(operator, b, x0):
    r = b - operator.mv(x0)
    s = operator.T.mv(r)
    return x0, r, s, jnp.sum(s * s)


@eqx.filter_jit
def _cgls_chunk(operator, b, state, num_iters):
    b_norm = safe_norm_of(b)

    def step(state, _):
        x, r, p, gamma = state
        q = operator.mv(p)
        qq = jnp.sum(q * q)
        # Exact convergence makes p (and q) vanish: stop moving instead of dividing 0 by 0.
        alpha = jnp.where(qq > 0, gamma / jnp.where(qq > 0, qq, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * q
        s = operator.T.mv(r)
        gamma_new = jnp.sum(s * s)
        beta = jnp.where(gamma > 0, gamma_new / jnp.where(gamma > 0, gamma, 1.0), 0.0)
        p = s + beta * p
        return (x, r, p, gamma_new), jnp.linalg.norm(r) / b_norm

    return lax.scan(step, state, None, length=num_iters)


def cgls(
    tilt_series: jax.Array,
    operator: AbstractLinearOperator,
    num_iters: int,
    *,
    x0: jax.Array | None = None,
    progress: bool = False,
) -> Reconstruction:
    """Conjugate gradients on the normal equations A^T A x = A^T b (CGLS).

    Minimises `||A x - b||` over `x0 + span{A^T ...}`, one forward and one adjoint application per
    iteration; from x0 = 0 it converges to the minimum-norm least-squares solution. Stopping
    early regularises (the iteration count plays the role of the regularisation parameter).

    Args:
        tilt_series: the data b, shape `operator.out_structure().shape`; its floating dtype sets
            the working dtype.
        operator: the forward operator A (any linear operator).
        num_iters: number of iterations (>= 1).
        x0: starting volume; zeros by default.
        progress: show a progress bar (iterations run in jitted chunks; same result).

    Returns:
        `Reconstruction(volume, residuals)` with `residuals[k] = ||A x_k - b|| / ||b||`
        (from the recursively updated residual vector).
    """
    check_operator(operator, "cgls")
    check_data(tilt_series, operator)
    num_iters = check_num_iters(num_iters)
    check_start(x0, operator)
    b = as_float(tilt_series)
    x0 = start(x0, operator, b.dtype)
    state = _cgls_init(operator, b, x0)

    def chunk(state, n):
        return _cgls_chunk(operator, b, state, n)

    (x, *_), residuals = iterate(chunk, state, num_iters, progress, "CGLS")
    return Reconstruction(x, residuals)
