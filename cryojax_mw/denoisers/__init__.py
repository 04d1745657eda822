"""Denoisers for samplers and reconstruction: TV (Chambolle / FGP), Gaussian, learned Flax models.

Functions work on 2D (z, x) images and 3D (z, y, x) volumes (vmap over batches), keep float32 and
float64, and take weights as arrays so new values do not recompile. Samplers use the shared
calling convention of `AbstractDenoiser`: `state = d.init_state(x)`, then `x, state = d(x, state)`.
"""

from ._gaussian import GaussianDenoiser, gaussian_denoise
from ._learned import FlaxDenoiser
from ._tv import (
    AbstractDenoiser,
    TVDenoiser,
    divergence,
    gradient,
    moreau_yosida_tv_grad,
    smoothed_tv_norm,
    tv_denoise_chambolle,
    tv_denoise_fgp,
    tv_norm,
    tv_prox,
)

__all__ = [
    "AbstractDenoiser",
    "FlaxDenoiser",
    "GaussianDenoiser",
    "TVDenoiser",
    "divergence",
    "gaussian_denoise",
    "gradient",
    "moreau_yosida_tv_grad",
    "smoothed_tv_norm",
    "tv_denoise_chambolle",
    "tv_denoise_fgp",
    "tv_norm",
    "tv_prox",
]
