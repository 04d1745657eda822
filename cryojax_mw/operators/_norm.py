"""Operator-norm estimate by power iteration on A^T A."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._base import AbstractLinearOperator


def operator_norm(key: jax.Array, operator: AbstractLinearOperator, num_iters: int = 50) -> jax.Array:
    """Estimate the spectral norm ||A||_2 (largest singular value) by power iteration on A^T A.

    Args:
        key: PRNG key for the random start vector.
        operator: the linear operator A.
        num_iters: power iterations; the estimate increases towards ||A|| from below.

    Returns:
        A scalar in the operator's dtype. Step sizes such as 1 / ||A||^2 for gradient methods come
        from it; multiply by a small safety factor (e.g. 1.01) when an upper bound is needed.
    """
    struct = operator.in_structure()
    x = jax.random.normal(key, struct.shape, struct.dtype)
    x = x / jnp.linalg.norm(x)

    def step(x, _):
        y = operator.T.mv(operator.mv(x))
        return y / jnp.linalg.norm(y), None

    x, _ = lax.scan(step, x, None, length=num_iters)
    return jnp.linalg.norm(operator.mv(x))
