"""The contrast transfer function (CTF) of the microscope: its values, the filtering operator and
phase flipping.

Layout: CTFs live on the half spectrum of `jnp.fft.rfft2` over the last two axes of images of shape
(y, x), that is shape (..., y, x // 2 + 1) in unshifted (numpy) order. Spatial frequencies are in
1/Angstrom: `fftfreq(n_y) / pixel_size` along y and `rfftfreq(n_x) / pixel_size` along x.

Convention: chi(k) = pi lambda dz k^2 - (pi / 2) Cs lambda^3 k^4 + phase_shift and
CTF(k) = sqrt(1 - A^2) sin(chi) + A cos(chi), times the envelope exp(-B k^2 / 4), with dz > 0 for
underfocus. So CTF(0) = A > 0: positive density keeps positive contrast at low frequency, the
contrast of micrographs after the usual inversion. The CTF is isotropic (no astigmatism) and one
defocus holds for a whole image: the defocus gradient across the field of view of a tilted
specimen is not modelled.
"""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._base import AbstractSelfAdjointOperator, as_float
from ._fourier import _half_shape, _symmetrize_half_spectrum

# CODATA 2018 exact / recommended values in SI units.
_PLANCK = 6.62607015e-34
_ELECTRON_MASS = 9.1093837015e-31
_ELECTRON_CHARGE = 1.602176634e-19
_LIGHT_SPEED = 299792458.0
# lambda [A] = _WAVELENGTH_SCALE / sqrt(V (1 + _RELATIVISTIC * V)) with V in volts.
_WAVELENGTH_SCALE = 1e10 * _PLANCK / math.sqrt(2.0 * _ELECTRON_MASS * _ELECTRON_CHARGE)
_RELATIVISTIC = _ELECTRON_CHARGE / (2.0 * _ELECTRON_MASS * _LIGHT_SPEED**2)


def _concrete(x) -> np.ndarray | None:
    """`x` as a NumPy array, or None when it is traced (under jit, vmap or grad)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check(value, name: str, ok, requirement: str) -> None:
    """Raise a one-line ValueError when a concrete `value` fails `ok`; traced values pass."""
    v = _concrete(value)
    if v is None:
        return
    if np.iscomplexobj(v):
        raise ValueError(f"{name} must be real and {requirement}, got a complex value")
    bad = ~(np.isfinite(v) & ok(v))
    if np.any(bad):
        raise ValueError(f"{name} must be {requirement}, got {v[bad].ravel()[0]}")


def _check_image_shape(image_shape, what: str, form: str) -> tuple[int, ...]:
    """`image_shape` as a tuple of positive ints whose length `form` allows ((y, x) exactly, or
    (..., y, x) with any leading axes)."""
    try:
        shape = tuple(int(s) for s in image_shape)
    except TypeError:
        raise ValueError(
            f"{what}: image_shape must be a tuple of ints, got {image_shape!r}"
        ) from None
    ndim_ok = len(shape) == 2 if form == "(y, x)" else len(shape) >= 2
    if not ndim_ok or min(shape) < 1:
        raise ValueError(f"{what}: image_shape must be {form} with positive sizes, got {shape}")
    return shape


def electron_wavelength(voltage_kv) -> jax.Array:
    """Relativistic wavelength of electrons accelerated through `voltage_kv` kilovolts.

    lambda = h / sqrt(2 m e V (1 + e V / (2 m c^2))), e.g. 0.019687 A at 300 kV.

    Args:
        voltage_kv: acceleration voltage in kV, > 0; a scalar or an array.

    Returns:
        Wavelength in Angstrom, of the shape of `voltage_kv` and its floating dtype.
    """
    _check(voltage_kv, "electron_wavelength: voltage_kv", lambda v: v > 0, "a finite number > 0 kV")
    volts = as_float(voltage_kv) * 1e3
    return _WAVELENGTH_SCALE / jnp.sqrt(volts * (1.0 + _RELATIVISTIC * volts))


@functools.partial(jax.jit, static_argnums=0)
def _ctf_values(image_shape, pixel_size, defocus_a, wavelength, cs_a, amplitude, phase_rad, b):
    """CTF on the rfft2 half spectrum; every physical parameter an array (no recompilation when
    values change), lengths in Angstrom, phase in radians."""
    dtype = defocus_a.dtype
    fy = jnp.asarray(np.fft.fftfreq(image_shape[0]), dtype)[:, None]
    fx = jnp.asarray(np.fft.rfftfreq(image_shape[1]), dtype)[None, :]
    k2 = (fy * fy + fx * fx) / (pixel_size * pixel_size)
    dz = defocus_a[..., None, None]
    chi = jnp.pi * wavelength * dz * k2 - 0.5 * jnp.pi * cs_a * wavelength**3 * k2 * k2 + phase_rad
    ctf = jnp.sqrt(1.0 - amplitude * amplitude) * jnp.sin(chi) + amplitude * jnp.cos(chi)
    return ctf * jnp.exp(-0.25 * b * k2)


def ctf_2d(
    image_shape: tuple[int, int],
    pixel_size,
    defocus_um,
    *,
    voltage_kv=300.0,
    cs_mm=2.7,
    amplitude_contrast=0.07,
    phase_shift_deg=0.0,
    b_factor=0.0,
) -> jax.Array:
    """Isotropic CTF of one image or of each image of a tilt series, on the rfft2 half spectrum.

    With lambda the electron wavelength, dz the defocus, Cs the spherical aberration, A the
    amplitude contrast, B the B-factor and k the spatial frequency in 1/A:
    chi(k) = pi lambda dz k^2 - (pi / 2) Cs lambda^3 k^4 + phase_shift and
    CTF(k) = (sqrt(1 - A^2) sin(chi) + A cos(chi)) exp(-B k^2 / 4).
    CTF(0) = A > 0 (without phase shift): positive density keeps positive contrast at low
    frequency, as in micrographs after the usual contrast inversion. One defocus per image: the
    defocus gradient across a tilted field of view is not modelled, nor is astigmatism.

    Works under jit, vmap and grad (e.g. in the defocus); values are checked only where they are
    concrete, traced values are the caller's responsibility.

    Args:
        image_shape: real-space image shape (y, x).
        pixel_size: pixel size in Angstrom, > 0.
        defocus_um: defocus in micrometres, positive = underfocus; a scalar, or an array of shape
            (n_tilts,) (any shape) for one CTF per image. Its floating dtype sets the output dtype.
        voltage_kv: acceleration voltage in kV, > 0.
        cs_mm: spherical aberration in mm, >= 0.
        amplitude_contrast: fraction A of amplitude contrast, in [0, 1).
        phase_shift_deg: additional phase shift in degrees (phase plate).
        b_factor: envelope B-factor in A^2, >= 0 (0 = no envelope).

    Returns:
        Real CTF of shape `defocus_um.shape + (y, x // 2 + 1)`, in the dtype of `defocus_um`.
    """
    image_shape = _check_image_shape(image_shape, "ctf_2d", "(y, x)")
    _check(pixel_size, "ctf_2d: pixel_size", lambda v: v > 0, "a finite number > 0 Angstrom")
    _check(defocus_um, "ctf_2d: defocus_um", lambda v: True, "finite micrometres")
    _check(voltage_kv, "ctf_2d: voltage_kv", lambda v: v > 0, "a finite number > 0 kV")
    _check(cs_mm, "ctf_2d: cs_mm", lambda v: v >= 0, "a finite number >= 0 mm")
    _check(
        amplitude_contrast,
        "ctf_2d: amplitude_contrast",
        lambda v: (v >= 0) & (v < 1),
        "in [0, 1)",
    )
    _check(phase_shift_deg, "ctf_2d: phase_shift_deg", lambda v: True, "finite degrees")
    _check(b_factor, "ctf_2d: b_factor", lambda v: v >= 0, "a finite number >= 0 A^2")
    defocus = as_float(defocus_um)
    dtype = defocus.dtype

    def arr(v):
        return jnp.asarray(v, dtype)

    return _ctf_values(
        image_shape,
        arr(pixel_size),
        defocus * 1e4,
        electron_wavelength(arr(voltage_kv)),
        arr(cs_mm) * 1e7,
        arr(amplitude_contrast),
        jnp.deg2rad(arr(phase_shift_deg)),
        arr(b_factor),
    )


def _as_half_spectrum(ctf, image_shape: tuple[int, ...], what: str) -> jax.Array:
    """Check that `ctf` is real with shape (..., y, x // 2 + 1) of `image_shape`'s last two axes;
    return it as a floating array."""
    ctf = jnp.asarray(ctf)
    if jnp.iscomplexobj(ctf):
        raise ValueError(f"{what}: ctf must be real (a complex filter is not self-adjoint)")
    half = _half_shape(image_shape[-2:])
    if ctf.ndim < 2 or tuple(ctf.shape[-2:]) != half:
        raise ValueError(
            f"{what}: ctf has shape {tuple(ctf.shape)}, expected (..., {half[0]}, {half[1]}), the "
            f"rfft2 half spectrum of images of shape {image_shape[-2:]}"
        )
    return as_float(ctf)


def _symmetrize(ctf: jax.Array, n_x: int) -> jax.Array:
    """Symmetrise each image's half spectrum on its self-conjugate columns (see
    `FourierMaskOperator`); leading (tilt) axes are not frequency axes, so they are mapped over."""
    flat = ctf.reshape((-1,) + ctf.shape[-2:])
    sym = jax.vmap(functools.partial(_symmetrize_half_spectrum, n_last=n_x))(flat)
    return sym.reshape(ctf.shape)


def _filter(images: jax.Array, weights: jax.Array, image_shape: tuple[int, int]) -> jax.Array:
    spec = jnp.fft.rfft2(images)
    out = jnp.fft.irfft2(weights.astype(images.dtype) * spec, s=image_shape)
    return out.astype(images.dtype)


class CTFOperator(AbstractSelfAdjointOperator):
    """x -> irfft2(ctf * rfft2(x)) over the last two axes: the CTF as a real Fourier multiplier.

    The CTF is real and even in k, so the operator is self-adjoint. As in `FourierMaskOperator`,
    the ctf is replaced on the self-conjugate columns of each half spectrum (kx = 0 and, for even
    x, Nyquist) by (c(k) + c(-k)) / 2, the multiplier that acts on real images there: the
    spectrum handed to `irfft2` is then Hermitian for any real ctf, so the result does not depend
    on how an FFT backend treats non-Hermitian input. CTFs from `ctf_2d` are already even and stay
    unchanged.

    Args:
        ctf: real CTF of shape (..., y, x // 2 + 1), e.g. from `ctf_2d`; leading axes (one CTF per
            tilt) broadcast against the leading axes of `image_shape`.
        image_shape: real-space shape (..., y, x) of the arrays acted on, e.g. (y, x) for one
            image or (n_tilts, y, x) for a tilt series.
        dtype: dtype reported by `in_structure`/`out_structure`; default the ctf's dtype.

    The operator acts on arrays of shape `broadcast(ctf.shape[:-2], image_shape[:-2]) + (y, x)`:
    a per-tilt ctf (n, y, x // 2 + 1) with image_shape (y, x) or (n, y, x) acts on (n, y, x).
    """

    ctf: jax.Array
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(self, ctf, image_shape, dtype=None):
        image_shape = _check_image_shape(image_shape, "CTFOperator", "(..., y, x)")
        ctf = _as_half_spectrum(ctf, image_shape, "CTFOperator")
        try:
            lead = np.broadcast_shapes(tuple(ctf.shape[:-2]), image_shape[:-2])
        except ValueError:
            raise ValueError(
                f"CTFOperator: ctf leading axes {tuple(ctf.shape[:-2])} do not broadcast against "
                f"image_shape leading axes {image_shape[:-2]}; give one ctf per image or one in all"
            ) from None
        self.ctf = _symmetrize(ctf, image_shape[-1])
        self.shape = tuple(lead) + image_shape[-2:]
        self.dtype = ctf.dtype if dtype is None else dtype

    def mv(self, x):
        x = as_float(x)
        if tuple(x.shape) != self.shape:
            raise ValueError(
                f"CTFOperator: input has shape {tuple(x.shape)}, expected {self.shape}"
            )
        return _filter(x, self.ctf, self.shape[-2:])


def phase_flip(images, ctf) -> jax.Array:
    """Phase flipping, the usual CTF correction before weighted backprojection.

    Multiplies each image's spectrum by sign(ctf), taking sign(0) = +1, so the contrast of every
    frequency band is restored to the sign it has at low frequency; amplitudes are left alone.

    Args:
        images: real images of shape (..., y, x), e.g. a tilt series (n_tilts, y, x).
        ctf: real CTF of shape (..., y, x // 2 + 1) whose leading axes broadcast to those of
            `images` (one CTF per image, or one for all).

    Returns:
        Phase-flipped real images of the shape and floating dtype of `images`.
    """
    images = as_float(images)
    if images.ndim < 2:
        raise ValueError(f"phase_flip: images must have shape (..., y, x), got {images.shape}")
    shape = tuple(images.shape)
    ctf = _as_half_spectrum(ctf, shape, "phase_flip")
    lead = tuple(ctf.shape[:-2])
    if len(lead) > len(shape) - 2 or any(
        c not in (1, s) for c, s in zip(lead[::-1], shape[-3::-1])
    ):
        raise ValueError(
            f"phase_flip: ctf leading axes {lead} do not broadcast to the images' leading axes "
            f"{shape[:-2]}; give one ctf per image or one in all"
        )
    sign = jnp.where(ctf >= 0, 1.0, -1.0).astype(ctf.dtype)
    return _filter(images, _symmetrize(sign, shape[-1]), shape[-2:])
