"""Learned denoisers: a wrapper giving Flax models the samplers' calling convention."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from flax import nnx

from ._tv import AbstractDenoiser, as_image


class FlaxDenoiser(AbstractDenoiser):
    """Wrap a `flax.nnx` Module (or any callable) that maps (1, *spatial, 1) to (1, *spatial, 1).

    Flax convolutions take channels-last batches (NHWC in 2D, NDHWC in 3D); the wrapper adds the
    batch and channel axes to a 2D (z, x) or 3D (z, y, x) array, calls the model and removes
    them, so `denoiser(x, state)` works like the other denoisers (vmap it over chains). An nnx
    Module is split into its graph (static) and its state (pytree leaves), so the wrapper is a
    pure pytree: it goes through `jax.jit`/`equinox.filter_jit` and new weights do not recompile.
    The model runs in whatever mode it was given (call `model.eval()` first for dropout or
    batch-norm models); in-call state updates are not kept.

    Args:
        model: an `nnx.Module` or a callable on arrays of shape (1, *spatial, 1).
    """

    model: Any
    graphdef: Any = eqx.field(static=True)

    def __init__(self, model: Callable[[jax.Array], jax.Array]):
        if not callable(model):
            raise ValueError(f"model must be a flax.nnx Module or a callable, got {type(model)}")
        if isinstance(model, nnx.Module):
            self.graphdef, self.model = nnx.split(model)
        else:
            self.graphdef, self.model = None, model

    def init_state(self, x: jax.Array) -> None:
        """No state: returns None."""

    def __call__(self, x: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        """Apply the model to `x`; returns `(denoised, state)` in x's dtype, state unchanged."""
        x = as_image(x)
        model = self.model if self.graphdef is None else nnx.merge(self.graphdef, self.model)
        out = model(x[None, ..., None])
        if out.shape != (1, *x.shape, 1):
            raise ValueError(
                f"the model must map (1, *spatial, 1) to the same shape, got {(1, *x.shape, 1)} "
                f"-> {out.shape}; use a model with one input and one output channel"
            )
        return out[0, ..., 0].astype(x.dtype), state
