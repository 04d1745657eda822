"""Macromolecule templates: density maps read from MRC files, resampled to a voxel size,
normalised, centred and given a shape mask.

The package ships 24 maps at 10 Å/voxel (the SHREC'21 cryo-ET benchmark classes plus ribosomes,
from the PolNet project, Apache-2.0; see `templates/README.md`). Any folder of MRC maps can be used
instead by passing `folder`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
from pathlib import Path

import numpy as np
import scipy.ndimage

from ..io import read_mrc

_SUFFIXES = (".mrc", ".mrc.gz", ".map", ".map.gz", ".mrc.bz2")


def default_template_folder() -> Path:
    """The folder of density maps that ships with the package."""
    return Path(str(importlib.resources.files("cryojax_mw.simulate") / "templates"))


def _stem(path: Path) -> str | None:
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _template_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ValueError(f"template folder {folder} does not exist or is not a folder")
    files = {}
    for path in sorted(folder.iterdir()):
        name = _stem(path)
        if name is not None:
            files.setdefault(name, path)
    return files


def available_templates(folder: str | Path | None = None) -> tuple[str, ...]:
    """Names of the density maps in `folder` (default: the maps shipped with the package); a name
    is the file name without its `.mrc` / `.mrc.gz` / `.map` suffix."""
    return tuple(_template_files(Path(folder) if folder else default_template_folder()))


@dataclasses.dataclass(frozen=True)
class Template:
    """A macromolecule ready to be placed in a tomogram.

    Attributes:
        name: class name (the map's file name without suffix).
        density: float32 (m, m, m), m odd, density >= 0 scaled so that its mean inside `mask` is 1;
            the mask's centre of mass sits at the central voxel (m - 1) / 2.
        mask: bool (m, m, m), the shape: density above `mask_level` times its maximum, with
            enclosed cavities filled.
        voxel_size: Angstrom per voxel.
        mask_level: the threshold used for `mask`, as a fraction of the maximum density.
    """

    name: str
    density: np.ndarray
    mask: np.ndarray
    voxel_size: float
    mask_level: float

    @property
    def n_mask_voxels(self) -> int:
        return int(self.mask.sum())


def _fourier_resample(volume: np.ndarray, size: int) -> np.ndarray:
    """Band-limited resampling of a cubic volume to `size`^3 by cropping or zero-padding its
    centred spectrum; values keep their scale (a constant stays the same constant). When
    shrinking, a raised-cosine taper over the outer fifth of the kept band (in radius) keeps the
    ringing of a hard cut-off out of the result."""
    n = volume.shape[0]
    spectrum = np.fft.fftshift(np.fft.fftn(volume))
    if size < n:
        k = np.fft.fftshift(np.fft.fftfreq(n)) * n / size  # in units of the new Nyquist * 2
        radius = 2 * np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
        ramp = np.clip((radius - 0.8) / 0.2, 0.0, 1.0)
        spectrum = spectrum * 0.5 * (1 + np.cos(np.pi * ramp))
    out = np.zeros((size,) * 3, dtype=complex)
    keep = min(n, size)
    src = slice(n // 2 - keep // 2, n // 2 - keep // 2 + keep)
    dst = slice(size // 2 - keep // 2, size // 2 - keep // 2 + keep)
    out[dst, dst, dst] = spectrum[src, src, src]
    return np.real(np.fft.ifftn(np.fft.ifftshift(out))) * (size / n) ** 3


def _as_cube(volume: np.ndarray) -> np.ndarray:
    """Zero-pad a box to a cube, centred."""
    n = max(volume.shape)
    pads = [((n - s) // 2, n - s - (n - s) // 2) for s in volume.shape]
    return np.pad(volume, pads)


@functools.lru_cache(maxsize=64)
def _load(path: Path, voxel_size: float, mask_level: float) -> Template:
    density, source_voxel = read_mrc(path)
    density = np.asarray(density, dtype=np.float64)
    name = _stem(path)
    if density.ndim != 3 or min(density.shape) < 4:
        raise ValueError(
            f"template {path} is not a 3D density map (shape {density.shape}); give a 3D MRC map"
        )
    if source_voxel is None:
        raise ValueError(
            f"template {path} has no voxel size in its header; set it (e.g. with mrcfile or "
            "IMOD's alterheader) so it can be scaled"
        )
    peak = density.max()
    if not peak > 0 or np.ptp(density) <= 1e-6 * abs(peak):
        raise ValueError(
            f"template {path} is not a density map: it has no positive density "
            f"(min {density.min():.3g}, max {peak:.3g})"
        )
    density = _as_cube(np.clip(density, 0.0, None))
    size = round(density.shape[0] * source_voxel / voxel_size)
    if size < 3:
        raise ValueError(
            f"template {name} would be {size} voxels wide at {voxel_size} Å/voxel; use a smaller "
            "voxel size"
        )
    if size != density.shape[0]:
        # Ringing from the band limit can dip below zero; density stays non-negative.
        density = np.clip(_fourier_resample(density, size), 0.0, None)

    mask = scipy.ndimage.binary_fill_holes(density > mask_level * density.max())
    # Centre the shape: shift its centre of mass to the middle voxel of an odd box big enough to
    # hold every orientation of everything that carries density.
    com = np.array(scipy.ndimage.center_of_mass(mask))
    support = np.argwhere(density > 1e-2 * density.max())
    radius = int(np.ceil(np.linalg.norm(support - com, axis=1).max())) + 1
    m = 2 * radius + 1
    pad = radius + 1
    density = np.pad(density, pad)
    mask = np.pad(mask, pad)
    start = np.round(com).astype(int) + pad - radius
    box = tuple(slice(s, s + m) for s in start)
    density, mask = density[box], mask[box]
    density = density / density[mask].mean()
    density = density.astype(np.float32)
    density.flags.writeable = False
    mask.flags.writeable = False
    return Template(name, density, mask, float(voxel_size), float(mask_level))


def load_template(
    name: str,
    voxel_size: float = 10.0,
    *,
    folder: str | Path | None = None,
    mask_level: float = 0.25,
) -> Template:
    """Read a density map and prepare it for placement.

    Args:
        name: the map's name in `folder`, e.g. "4v4r" (see `available_templates`).
        voxel_size: Angstrom per voxel of the tomogram; the map is Fourier-resampled from the voxel
            size in its header.
        folder: folder of MRC maps; default the maps shipped with the package.
        mask_level: shape threshold as a fraction of the map's maximum, in (0, 1).

    Returns:
        A `Template` (arrays are read-only and shared between calls).
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be > 0 Angstrom, got {voxel_size}")
    if not 0 < mask_level < 1:
        raise ValueError(f"mask_level must lie in (0, 1), got {mask_level}")
    folder = Path(folder) if folder else default_template_folder()
    files = _template_files(folder)
    if name not in files:
        raise ValueError(
            f"unknown class {name!r}; the templates in {folder} are: {', '.join(files)}"
        )
    return _load(files[name], float(voxel_size), float(mask_level))
