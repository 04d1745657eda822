"""Sampling with honest uncertainty: MWR Metropolis-Hastings, the Langevin family and the chain
runner that returns MMSE estimates, per-voxel error bars and convergence diagnostics.

Samplers follow blackjax's shape (`init`, `build_kernel`, `as_top_level_api` returning a
`SamplingAlgorithm`); `mala` and `hmc` are blackjax's own.
"""

from blackjax import hmc, mala

from . import _langevin, _mwr
from ._langevin import LangevinInfo, LangevinState, myula, pnp_ula, ula
from ._mwr import (
    FIDELITIES,
    BaselineResult,
    MWRInfo,
    MWRState,
    data_fidelity,
    maggioni_restore,
    mwr_proposal,
)
from ._posteriors import GaussianFourierPosterior, gaussian_loglikelihood, power_law_spectrum
from ._runner import ChainSummary, run_chains

mwr = _mwr.as_top_level_api
mwr_kernel = _mwr.build_kernel
mwr_init = _mwr.init
langevin_kernel = _langevin.build_kernel

__all__ = [
    "FIDELITIES",
    "BaselineResult",
    "ChainSummary",
    "GaussianFourierPosterior",
    "LangevinInfo",
    "LangevinState",
    "MWRInfo",
    "MWRState",
    "data_fidelity",
    "gaussian_loglikelihood",
    "hmc",
    "langevin_kernel",
    "maggioni_restore",
    "mala",
    "mwr",
    "mwr_init",
    "mwr_kernel",
    "mwr_proposal",
    "myula",
    "pnp_ula",
    "power_law_spectrum",
    "run_chains",
    "ula",
]
