"""cryojax_mw: a JAX engine for cryo-electron tomography inverse problems that says how sure it is.

Conventions: volumes are (z, y, x) with z the beam at 0 deg and y the tilt axis; tilt series are
(n_tilts, y, x); 2D images are (z, x) and sinograms (n_tilts, x); angles are in degrees; voxel
sizes in Angstrom travel with the data. Sub-packages: `operators`, `reconstruct`, `simulate`,
`metrics`, `io`, `plot`, `cli`.
"""

from . import io, metrics, operators, reconstruct, simulate
from .io import read_mrc, read_tilt_angles, write_mrc, write_tilt_angles
from .metrics import FSCResult, ccc, fsc, psnr, ssim
from .operators import (
    AbstractLinearOperator,
    ComposedOperator,
    FourierMaskOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
    TiltBackprojector,
    TiltGeometry,
    TiltProjector,
    add_gaussian_noise,
    add_poisson_noise,
    gaussian_sigma_for_snr,
    missing_pyramid_mask,
    missing_wedge_mask,
    operator_norm,
    periodic_plus_smooth,
    project_observed,
)
from .reconstruct import Reconstruction, cgls, sirt, tv_map, tv_weight, wbp
from .simulate import random_blobs, shepp_logan

__version__ = "0.1.0"

__all__ = [
    "AbstractLinearOperator",
    "ComposedOperator",
    "FSCResult",
    "FourierMaskOperator",
    "IdentityOperator",
    "Reconstruction",
    "ScaledOperator",
    "SumOperator",
    "TiltBackprojector",
    "TiltGeometry",
    "TiltProjector",
    "add_gaussian_noise",
    "add_poisson_noise",
    "ccc",
    "cgls",
    "fsc",
    "gaussian_sigma_for_snr",
    "io",
    "metrics",
    "missing_pyramid_mask",
    "missing_wedge_mask",
    "operator_norm",
    "operators",
    "periodic_plus_smooth",
    "project_observed",
    "psnr",
    "random_blobs",
    "read_mrc",
    "read_tilt_angles",
    "reconstruct",
    "shepp_logan",
    "simulate",
    "sirt",
    "ssim",
    "tv_map",
    "tv_weight",
    "wbp",
    "write_mrc",
    "write_tilt_angles",
]
