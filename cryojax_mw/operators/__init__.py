"""Linear operators of the microscope: tilt projector, Fourier masks, algebra, norm estimate."""

from ._base import (
    AbstractLinearOperator,
    ComposedOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from ._norm import operator_norm
from ._tilt import TiltBackprojector, TiltGeometry, TiltProjector

__all__ = [
    "AbstractLinearOperator",
    "ComposedOperator",
    "IdentityOperator",
    "ScaledOperator",
    "SumOperator",
    "TiltBackprojector",
    "TiltGeometry",
    "TiltProjector",
    "operator_norm",
]
