"""Linear operators of the microscope: tilt projector, Fourier masks, algebra, norm estimate."""

from ._base import (
    AbstractLinearOperator,
    ComposedOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)
from ._ctf import CTFOperator, ctf_2d, electron_wavelength, phase_flip
from ._fourier import (
    FourierMaskOperator,
    half_spectrum_weights,
    missing_pyramid_mask,
    missing_wedge_mask,
    periodic_plus_smooth,
    project_observed,
)
from ._noise import (
    add_gaussian_noise,
    add_poisson_noise,
    estimate_noise_sigma,
    gaussian_sigma_for_snr,
)
from ._norm import operator_norm
from ._tilt import TiltBackprojector, TiltGeometry, TiltProjector

__all__ = [
    "AbstractLinearOperator",
    "CTFOperator",
    "ComposedOperator",
    "FourierMaskOperator",
    "IdentityOperator",
    "ScaledOperator",
    "SumOperator",
    "TiltBackprojector",
    "TiltGeometry",
    "TiltProjector",
    "add_gaussian_noise",
    "add_poisson_noise",
    "ctf_2d",
    "electron_wavelength",
    "estimate_noise_sigma",
    "gaussian_sigma_for_snr",
    "half_spectrum_weights",
    "missing_pyramid_mask",
    "missing_wedge_mask",
    "operator_norm",
    "periodic_plus_smooth",
    "phase_flip",
    "project_observed",
]
