"""The result every reconstruction solver returns."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Reconstruction(NamedTuple):
    """A reconstructed volume with its convergence record.

    Attributes:
        volume: the reconstruction, shape `operator.in_structure().shape`, in the tilt series'
            floating dtype.
        residuals: `residuals[k] = ||A x_k - b|| / ||b||` after iteration k + 1 (shape
            `(num_iters,)`); WBP, a single pass, gives one value. When `b = 0` the plain norm
            `||A x_k||` is reported.
        objective: per iteration, the objective the solver minimises, for solvers whose objective
            is more than the residual (`tv_map`: `0.5 ||A x - b||^2 + lam TV(x)`); `None`
            otherwise.
    """

    volume: jax.Array
    residuals: jax.Array
    objective: jax.Array | None = None
