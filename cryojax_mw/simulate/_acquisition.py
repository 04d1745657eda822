"""The microscope's side of simulation: acquisition order, radiation damage, CTF and noise at a
target SNR, with the two half-dose tilt series that Noise2Noise-style methods train on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..operators import TiltGeometry, TiltProjector, ctf_2d

NOISE_MODELS = ("gaussian", "poisson")
TILT_ORDERS = ("dose-symmetric", "ascending")

# Largest relative contrast of a projection in the Poisson model: counts ~ N exp(-kappa * s)
# stay in the weak-contrast regime, where the noise is nearly signal-independent.
_POISSON_CONTRAST = 0.2


def acquisition_order(angles_deg, order: str) -> np.ndarray:
    """Indices of the tilts in the order they are recorded.

    "dose-symmetric" starts at the tilt nearest 0 deg and alternates sides outwards (positive
    side first, as in Hagen et al. 2017 with groups of one); "ascending" walks from the lowest
    angle to the highest.
    """
    angles = np.asarray(angles_deg, dtype=np.float64)
    if order == "ascending":
        return np.argsort(angles, kind="stable")
    if order == "dose-symmetric":
        # Sort by |angle|, positive before negative at equal distance.
        return np.lexsort((-np.sign(angles), np.abs(angles)))
    raise ValueError(f"tilt order must be one of {', '.join(TILT_ORDERS)}, got {order!r}")


def exposure_attenuation(
    image_shape: tuple[int, int], pixel_size: float, accumulated_dose
) -> np.ndarray:
    """Signal left at each spatial frequency after an accumulated electron dose (radiation
    damage, Grant & Grigorieff 2015): exp(-D / (2 Ne(k))), Ne(k) = 0.245 k^-1.665 + 2.81 e/Å²,
    k in 1/Å.

    Args:
        image_shape: (y, x) of the projections.
        pixel_size: Angstrom per pixel.
        accumulated_dose: (n_tilts,) dose each image has seen before it is recorded, e/Å².

    Returns:
        (n_tilts, y, x // 2 + 1) factors in (0, 1], rfft2 layout.
    """
    ky = np.fft.fftfreq(image_shape[0], d=pixel_size)
    kx = np.fft.rfftfreq(image_shape[1], d=pixel_size)
    k = np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    with np.errstate(divide="ignore"):
        critical = 0.245 * k**-1.665 + 2.81  # infinite at k = 0: the mean is never damaged
    dose = np.asarray(accumulated_dose, dtype=np.float64)[:, None, None]
    return np.exp(-dose / (2 * critical))


@dataclasses.dataclass(frozen=True)
class TiltSeriesSimulation:
    """A simulated acquisition. Arrays are (n_tilts, y, x) in order of increasing angle.

    Attributes:
        angles_deg: tilt angles, increasing.
        order: acquisition order (indices into `angles_deg`).
        clean: noise-free projections (after radiation damage and CTF): the signal.
        noisy: the recorded tilt series, (even + odd) / 2.
        even, odd: the two half-dose tilt series with independent noise.
        noise_sigma: standard deviation of the noise in `noisy` (Gaussian model) or its
            low-contrast approximation (Poisson model).
        electrons_per_pixel: mean dose per pixel and tilt of `noisy` (Poisson model), else None.
        measured_snr: var(clean) / var(noisy - clean).
        ctf: the CTF per tilt (rfft2 layout) or None.
    """

    angles_deg: tuple[float, ...]
    order: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    even: np.ndarray
    odd: np.ndarray
    noise_sigma: float
    electrons_per_pixel: float | None
    measured_snr: float
    ctf: np.ndarray | None


def simulate_tilt_series(
    key: jax.Array,
    volume,
    voxel_size: float,
    geometry: TiltGeometry,
    *,
    snr: float,
    noise: str = "gaussian",
    order: str = "dose-symmetric",
    total_dose: float = 100.0,
    ctf: dict | None = None,
) -> TiltSeriesSimulation:
    """Record a tilt series of a density volume.

    Steps: project with `TiltProjector`; attenuate high frequencies by the dose each image has
    seen (`total_dose` spread evenly over the tilts in acquisition order; 0 switches damage off);
    apply the CTF if `ctf` is given; add noise so that var(clean) / var(noise) = `snr` over the
    whole series. Each half series gets half the dose (twice the Gaussian variance, or Poisson
    counts at half the dose) and the full series is their average (Gaussian) or the sum of their
    counts (Poisson), as when a movie's frames are split in two.

    Args:
        key: typed PRNG key.
        volume: (z, y, x) density.
        voxel_size: Angstrom per voxel (also the pixel size of the projections).
        geometry: the tilt angles.
        snr: target signal-to-noise ratio, > 0.
        noise: "gaussian" or "poisson" (electron counts, N exp(-kappa s) with kappa set so the
            strongest contrast is 20% and N chosen to reach `snr`).
        order: "dose-symmetric" or "ascending" acquisition.
        total_dose: electrons per Å² over the whole series, >= 0, for radiation damage.
        ctf: keyword arguments of `ctf_2d` other than image shape and pixel size (e.g.
            {"defocus_um": 3.0, "voltage_kv": 300.0}), or None for no CTF.

    Returns:
        A `TiltSeriesSimulation`.
    """
    if noise not in NOISE_MODELS:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODELS)}, got {noise!r}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0, got {snr}")
    if not total_dose >= 0:
        raise ValueError(f"total_dose must be >= 0 e/Å², got {total_dose}")
    volume = jnp.asarray(volume, jnp.float32)
    projector = TiltProjector(geometry, volume.shape)
    signal = projector.mv(volume)
    image_shape = signal.shape[1:]
    n_tilts = geometry.n_tilts
    sequence = acquisition_order(geometry.angles_deg, order)

    spectrum_filter = None
    if total_dose > 0:
        before = np.empty(n_tilts)
        before[sequence] = np.arange(n_tilts) * total_dose / n_tilts
        spectrum_filter = exposure_attenuation(image_shape, voxel_size, before)
    ctf_values = None
    if ctf is not None:
        ctf_values = np.asarray(ctf_2d(image_shape, voxel_size, **ctf), dtype=np.float64)
        spectrum_filter = ctf_values if spectrum_filter is None else spectrum_filter * ctf_values
    if spectrum_filter is not None:
        spectrum = jnp.fft.rfft2(signal) * jnp.asarray(spectrum_filter, jnp.float32)
        signal = jnp.fft.irfft2(spectrum, s=image_shape).astype(jnp.float32)

    key_even, key_odd = jax.random.split(key)
    signal_var = float(jnp.var(signal))
    if not signal_var > 0:
        raise ValueError("the volume projects to a constant tilt series; it holds no structure")
    if noise == "gaussian":
        sigma = float(np.sqrt(signal_var / snr))
        half_sigma = np.float32(np.sqrt(2.0) * sigma)
        even = signal + half_sigma * jax.random.normal(key_even, signal.shape, jnp.float32)
        odd = signal + half_sigma * jax.random.normal(key_odd, signal.shape, jnp.float32)
        noisy = 0.5 * (even + odd)
        electrons = None
    else:
        kappa = _POISSON_CONTRAST / float(jnp.max(jnp.abs(signal)))
        # Noise variance of -log(C / N) / kappa is about 1 / (N kappa^2) at low contrast.
        electrons = snr / (kappa**2 * signal_var)
        sigma = float(np.sqrt(signal_var / snr))
        rate = 0.5 * electrons * jnp.exp(-kappa * signal)
        counts_even = jax.random.poisson(key_even, rate, signal.shape).astype(jnp.float32)
        counts_odd = jax.random.poisson(key_odd, rate, signal.shape).astype(jnp.float32)

        def measured(counts, dose):
            # Half an electron floors empty pixels so the logarithm stays finite.
            return -jnp.log(jnp.maximum(counts, 0.5) / dose) / kappa

        even = measured(counts_even, 0.5 * electrons)
        odd = measured(counts_odd, 0.5 * electrons)
        noisy = measured(counts_even + counts_odd, electrons)
    measured_snr = signal_var / float(jnp.var(noisy - signal))
    return TiltSeriesSimulation(
        angles_deg=geometry.angles_deg,
        order=sequence,
        clean=np.asarray(signal),
        noisy=np.asarray(noisy),
        even=np.asarray(even),
        odd=np.asarray(odd),
        noise_sigma=sigma,
        electrons_per_pixel=electrons,
        measured_snr=measured_snr,
        ctf=ctf_values,
    )
