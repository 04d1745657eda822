"""cryojax_mw: a JAX engine for cryo-electron tomography inverse problems that says how sure it is.

Conventions: volumes are (z, y, x) with z the beam at 0 deg and y the tilt axis; tilt series are
(n_tilts, y, x); 2D images are (z, x) and sinograms (n_tilts, x); angles are in degrees; voxel
sizes in Angstrom travel with the data. Sub-packages: `operators`, `reconstruct`, `denoisers`,
`sampling`, `simulate`, `localize`, `metrics`, `io`, `plot`, `cli`, and `nn` (Flax models; imported
on demand, `from cryojax_mw import nn`, since Flax takes a while to load).
"""

from ._devices import use_all_cpu_cores

use_all_cpu_cores()  # before blackjax's import starts JAX's backends

from . import denoisers, io, localize, metrics, operators, reconstruct, sampling, simulate  # noqa: E402
from .denoisers import GaussianDenoiser, TVDenoiser
from .io import (
    ParticleList,
    read_mrc,
    read_particles,
    read_tilt_angles,
    write_mrc,
    write_particles_csv,
    write_particles_star,
    write_tilt_angles,
)
from .metrics import FSCResult, ccc, fsc, psnr, ssim
from .operators import (
    AbstractLinearOperator,
    ComposedOperator,
    CTFOperator,
    FourierMaskOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
    TiltBackprojector,
    TiltGeometry,
    TiltProjector,
    add_gaussian_noise,
    add_poisson_noise,
    ctf_2d,
    electron_wavelength,
    gaussian_sigma_for_snr,
    missing_pyramid_mask,
    missing_wedge_mask,
    operator_norm,
    periodic_plus_smooth,
    phase_flip,
    project_observed,
)
from .reconstruct import Reconstruction, cgls, sirt, tv_map, tv_weight, wbp
from .sampling import ChainSummary, maggioni_restore, mwr, myula, pnp_ula, run_chains, ula
from .simulate import (
    SimulationConfig,
    load_template,
    random_blobs,
    shepp_logan,
    simulate_tomogram,
    write_dataset,
)

__version__ = "0.1.0"

__all__ = [
    "AbstractLinearOperator",
    "CTFOperator",
    "ChainSummary",
    "ComposedOperator",
    "FSCResult",
    "FourierMaskOperator",
    "GaussianDenoiser",
    "IdentityOperator",
    "ParticleList",
    "Reconstruction",
    "ScaledOperator",
    "SimulationConfig",
    "SumOperator",
    "TVDenoiser",
    "TiltBackprojector",
    "TiltGeometry",
    "TiltProjector",
    "add_gaussian_noise",
    "add_poisson_noise",
    "ccc",
    "cgls",
    "ctf_2d",
    "denoisers",
    "electron_wavelength",
    "fsc",
    "gaussian_sigma_for_snr",
    "io",
    "load_template",
    "localize",
    "maggioni_restore",
    "metrics",
    "missing_pyramid_mask",
    "missing_wedge_mask",
    "mwr",
    "myula",
    "operator_norm",
    "operators",
    "periodic_plus_smooth",
    "phase_flip",
    "pnp_ula",
    "project_observed",
    "psnr",
    "random_blobs",
    "read_mrc",
    "read_particles",
    "read_tilt_angles",
    "reconstruct",
    "run_chains",
    "sampling",
    "shepp_logan",
    "simulate",
    "simulate_tomogram",
    "sirt",
    "ssim",
    "tv_map",
    "tv_weight",
    "ula",
    "wbp",
    "write_dataset",
    "write_mrc",
    "write_particles_csv",
    "write_particles_star",
    "write_tilt_angles",
]
