"""TV-regularised MAP reconstruction by the Chambolle-Pock primal-dual algorithm."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ..operators import AbstractLinearOperator, operator_norm
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

# Power iterations for ||A|| and the factor that turns the estimate (a lower bound) into a safe
# upper bound for the step-size condition sigma * tau * ||K||^2 < 1.
_NORM_ITERS = 50
_NORM_SAFETY = 1.05


def _gradient(x: jax.Array) -> jax.Array:
    """Forward differences along every axis, zero at the far edge: shape (x.ndim, *x.shape)."""
    parts = []
    for axis in range(x.ndim):
        d = jnp.diff(x, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, 1)
        parts.append(jnp.pad(d, pad))
    return jnp.stack(parts)


def _gradient_adjoint(q: jax.Array) -> jax.Array:
    """Exact adjoint of `_gradient` (minus the divergence)."""
    out = jnp.zeros(q.shape[1:], q.dtype)
    for axis in range(q.ndim - 1):
        # The gradient's last entry along `axis` is always 0, so that entry of q never contributes.
        y = lax.slice_in_dim(q[axis], 0, q.shape[axis + 1] - 1, axis=axis)
        before, after = [(0, 0)] * y.ndim, [(0, 0)] * y.ndim
        before[axis], after[axis] = (1, 0), (0, 1)
        out = out + jnp.pad(y, before) - jnp.pad(y, after)
    return out


def _isotropic_tv(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.sqrt(jnp.sum(_gradient(x) ** 2, axis=0)))


@eqx.filter_jit
def _tv_init(operator, b, x0):
    norm_a = _NORM_SAFETY * operator_norm(jax.random.key(0), operator, _NORM_ITERS).astype(b.dtype)
    # ||grad||^2 <= 4 * ndim for forward differences. Scaling the gradient block by
    # ||A|| / ||grad|| balances the two dual blocks; the composite then has ||K||^2 <= 2 ||A||^2.
    scale = norm_a / jnp.sqrt(jnp.asarray(4.0 * x0.ndim, b.dtype))
    step = 1.0 / (jnp.sqrt(jnp.asarray(2.0, b.dtype)) * norm_a)
    ax0 = operator.mv(x0)
    dual_data = jnp.zeros_like(b)
    dual_grad = jnp.zeros((x0.ndim,) + x0.shape, b.dtype)
    return (x0, ax0, x0, ax0, dual_data, dual_grad), (scale, step)


@eqx.filter_jit
def _tv_chunk(operator, b, lam, consts, state, num_iters, nonnegative):
    scale, step = consts
    tau = sigma = step
    b_norm = safe_norm_of(b)
    radius = lam / scale  # dual ball radius of the scaled TV term

    def iteration(state, _):
        x, ax, x_bar, ax_bar, p, q = state
        # Dual step: prox of sigma F* for F(y) = 0.5 ||y - b||^2 and for (lam / scale) ||.||_{2,1}.
        p = (p + sigma * (ax_bar - b)) / (1.0 + sigma)
        q = q + sigma * scale * _gradient(x_bar)
        q_norm = jnp.sqrt(jnp.sum(q * q, axis=0))
        shrink = jnp.where(q_norm > radius, radius / jnp.where(q_norm > 0, q_norm, 1.0), 1.0)
        q = q * shrink
        # Primal step; then extrapolate, reusing A x (A is linear) to save a projection.
        x_new = x - tau * (operator.T.mv(p) + scale * _gradient_adjoint(q))
        if nonnegative:
            x_new = jnp.maximum(x_new, 0.0)
        ax_new = operator.mv(x_new)
        r = ax_new - b
        objective = 0.5 * jnp.sum(r * r) + lam * _isotropic_tv(x_new)
        state = (x_new, ax_new, 2.0 * x_new - x, 2.0 * ax_new - ax, p, q)
        return state, (jnp.linalg.norm(r) / b_norm, objective)

    return lax.scan(iteration, state, None, length=num_iters)


def tv_map(
    tilt_series: jax.Array,
    operator: AbstractLinearOperator,
    lam: float | jax.Array,
    num_iters: int,
    *,
    nonnegative: bool = False,
    x0: jax.Array | None = None,
    progress: bool = False,
) -> Reconstruction:
    """TV-regularised MAP reconstruction: argmin_x 0.5 ||A x - b||^2 + lam TV(x) [+ x >= 0].

    TV is the isotropic total variation `sum_i sqrt(sum_d (D_d x)_i^2)` with forward differences
    D_d along every volume axis (zero across the far edge). Solved by the Chambolle-Pock
    primal-dual algorithm on K = [A; s grad] with s = ||A|| / ||grad||, equal steps
    tau = sigma = 1 / (sqrt(2) ||A||), ||A|| from `operator_norm` (50 power iterations, times 1.05)
    and ||grad||^2 <= 4 * ndim; the iteration costs one A and one A^T.

    Args:
        tilt_series: the data b, shape `operator.out_structure().shape`; its floating dtype sets
            the working dtype.
        operator: the forward operator A (any linear operator).
        lam: regularisation weight (>= 0), in units of the data term; passed as an array, new
            values do not recompile.
        num_iters: number of iterations (>= 1).
        nonnegative: constrain x >= 0.
        x0: starting volume; zeros by default.
        progress: show a progress bar (iterations run in jitted chunks; same result).

    Returns:
        `Reconstruction(volume, residuals, objective)`: `residuals[k] = ||A x_k - b|| / ||b||` and
        `objective[k] = 0.5 ||A x_k - b||^2 + lam TV(x_k)` after iteration k + 1.
    """
    check_operator(operator, "tv_map")
    check_data(tilt_series, operator)
    num_iters = check_num_iters(num_iters)
    check_scalar(lam, "lam", low=0.0)
    check_start(x0, operator)
    b = as_float(tilt_series)
    lam = jnp.asarray(lam, b.dtype)
    x0 = start(x0, operator, b.dtype)
    state, consts = _tv_init(operator, b, x0)

    def chunk(state, n):
        return _tv_chunk(operator, b, lam, consts, state, n, bool(nonnegative))

    (x, *_), (residuals, objective) = iterate(chunk, state, num_iters, progress, "TV-MAP")
    return Reconstruction(x, residuals, objective)


def tv_weight(relative: float, tilt_series, thickness: int) -> float:
    """The TV weight `lam` for `tv_map` from one relative to the noise scale of the data.

    A^T applied to white noise of standard deviation s gives voxel values of size about
    s * sqrt(n_tilts * thickness); at the low SNR of cryo-ET std(b) stands in for s, so a relative
    weight of about 0.1 suits data of any units and size (larger is smoother).

    Args:
        relative: weight relative to std(b) * sqrt(n_tilts * thickness) (>= 0).
        tilt_series: the data b, (n_tilts, ...).
        thickness: the volume's size along z (the beam), in voxels.
    """
    if relative < 0:
        raise ValueError(f"the relative TV weight must be >= 0, got {relative}")
    data = jnp.asarray(tilt_series)
    return float(relative * jnp.std(data) * jnp.sqrt(data.shape[0] * thickness))
