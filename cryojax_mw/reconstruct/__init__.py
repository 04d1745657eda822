"""Reconstruction from a tilt series: weighted backprojection, SIRT, CGLS and TV-regularised MAP.

Every solver takes the data first and the forward operator second and returns a `Reconstruction`
(volume, relative residual per iteration, and the objective where the solver has one).
"""

from ._iterative import cgls, sirt
from ._result import Reconstruction
from ._tv import tv_map, tv_weight
from ._wbp import FILTERS, angular_weights, wbp

__all__ = [
    "FILTERS",
    "Reconstruction",
    "angular_weights",
    "cgls",
    "sirt",
    "tv_map",
    "tv_weight",
    "wbp",
]
