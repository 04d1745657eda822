"""Linear operators as equinox Modules: the algebra every physics operator plugs into.

An operator maps arrays of `in_structure()` to arrays of `out_structure()`. Subclasses implement
`mv`, `transpose`, `in_structure` and `out_structure`; composition (`@`), sums, differences, negation
and scalar multiples come from this base class and are operators themselves, so the dot-product
adjoint test applies to every expression built from them.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp


def as_float(x) -> jax.Array:
    """`x` as a JAX array of a floating dtype (integers and booleans become float32)."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


class AbstractLinearOperator(eqx.Module):
    """A linear map between arrays with static shapes.

    `op.mv(x)` (or `op(x)`) applies the operator, `op.T` (or `op.transpose()`) is its exact adjoint
    with respect to the real inner product `sum(a * b)`.
    """

    @abc.abstractmethod
    def mv(self, x: jax.Array) -> jax.Array:
        """Apply the operator to `x` (shape `in_structure().shape`)."""

    @abc.abstractmethod
    def transpose(self) -> AbstractLinearOperator:
        """The adjoint operator."""

    @abc.abstractmethod
    def in_structure(self) -> jax.ShapeDtypeStruct:
        """Shape and default dtype of the inputs."""

    @abc.abstractmethod
    def out_structure(self) -> jax.ShapeDtypeStruct:
        """Shape and default dtype of the outputs."""

    @property
    def T(self) -> AbstractLinearOperator:
        return self.transpose()

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.mv(x)

    def __matmul__(self, other: AbstractLinearOperator) -> AbstractLinearOperator:
        if not isinstance(other, AbstractLinearOperator):
            return NotImplemented
        return ComposedOperator(self, other)

    def __add__(self, other: AbstractLinearOperator) -> AbstractLinearOperator:
        if not isinstance(other, AbstractLinearOperator):
            return NotImplemented
        return SumOperator(self, other)

    def __sub__(self, other: AbstractLinearOperator) -> AbstractLinearOperator:
        if not isinstance(other, AbstractLinearOperator):
            return NotImplemented
        return SumOperator(self, ScaledOperator(other, -1.0))

    def __neg__(self) -> AbstractLinearOperator:
        return ScaledOperator(self, -1.0)

    def __mul__(self, scalar) -> AbstractLinearOperator:
        if isinstance(scalar, AbstractLinearOperator):
            return NotImplemented
        return ScaledOperator(self, scalar)

    __rmul__ = __mul__


def _check_same(a: jax.ShapeDtypeStruct, b: jax.ShapeDtypeStruct, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes {a.shape} and {b.shape} do not match")


class ComposedOperator(AbstractLinearOperator):
    """`outer @ inner`: x -> outer(inner(x))."""

    outer: AbstractLinearOperator
    inner: AbstractLinearOperator

    def __check_init__(self):
        _check_same(
            self.outer.in_structure(), self.inner.out_structure(), "cannot compose operators"
        )

    def mv(self, x):
        return self.outer.mv(self.inner.mv(x))

    def transpose(self):
        return ComposedOperator(self.inner.T, self.outer.T)

    def in_structure(self):
        return self.inner.in_structure()

    def out_structure(self):
        return self.outer.out_structure()


class SumOperator(AbstractLinearOperator):
    """`first + second`: x -> first(x) + second(x)."""

    first: AbstractLinearOperator
    second: AbstractLinearOperator

    def __check_init__(self):
        _check_same(self.first.in_structure(), self.second.in_structure(), "cannot add operators")
        _check_same(self.first.out_structure(), self.second.out_structure(), "cannot add operators")

    def mv(self, x):
        return self.first.mv(x) + self.second.mv(x)

    def transpose(self):
        return SumOperator(self.first.T, self.second.T)

    def in_structure(self):
        return self.first.in_structure()

    def out_structure(self):
        return self.first.out_structure()


class ScaledOperator(AbstractLinearOperator):
    """`scalar * operator` for a real scalar (a Python number or a 0-d array)."""

    operator: AbstractLinearOperator
    scalar: jax.Array | float

    def mv(self, x):
        return jnp.asarray(self.scalar, x.dtype) * self.operator.mv(x)

    def transpose(self):
        return ScaledOperator(self.operator.T, self.scalar)

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


class AbstractSelfAdjointOperator(AbstractLinearOperator):
    """An operator on arrays of `shape` that is its own adjoint (subclasses define `mv`)."""

    shape: eqx.AbstractVar[tuple[int, ...]]
    dtype: eqx.AbstractVar[jnp.dtype]

    def transpose(self):
        return self

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.shape, self.dtype)

    def out_structure(self):
        return self.in_structure()


class IdentityOperator(AbstractSelfAdjointOperator):
    """x -> x on arrays of a given shape."""

    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True, default=jnp.float32)

    def mv(self, x):
        return x
