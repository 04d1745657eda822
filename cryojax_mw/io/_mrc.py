"""MRC maps in and out, atomic file writes, and the guard that keeps outputs off inputs.

Arrays are float32 (z, y, x) volumes, (n_tilts, y, x) tilt series or (y, x) images; the voxel size
travels beside them in Angstrom (`None` when a file carries none). Reading goes through mrcfile,
which also opens gzip and bzip2 compressed files.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np

# MRC modes holding complex numbers (mode 3: complex int16, mode 4: complex float32).
_COMPLEX_MODES = (3, 4)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write a file so that readers see either the old file or the complete new one, never a part.

    `write` fills a temporary file in the destination's folder; only when it returns is the
    temporary file flushed to disk and renamed over `path` (`os.replace`, atomic on POSIX and
    Windows). If `write` raises, the temporary file is removed and an existing file at `path` is
    left untouched. Missing parent folders are created.

    Args:
        path: destination file.
        write: called with the temporary file's path; it must write the whole content there
            (overwriting the empty file that already exists at that path).

    Returns:
        The destination path.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write to {path}: it is a folder; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    # Same folder as the destination, so that os.replace is a rename on one file system.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file private (0o600); give it the mode a plain open() would have.
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path


def _file_mode(path: Path) -> int:
    """Permission bits for `path`: those of the file it replaces, else the umask default."""
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_output_not_input(output_path: str | os.PathLike, *input_paths: str | os.PathLike) -> None:
    """Refuse an output path that is one of the inputs, so that inputs are never overwritten.

    Paths are compared after resolving symbolic links and `..`; when both files exist,
    `os.path.samefile` also catches hard links and differently spelled mounts.

    Args:
        output_path: the file about to be written.
        *input_paths: the files that were read.

    Raises:
        ValueError: if `output_path` is the same file as any input.
    """
    out = Path(output_path).resolve()
    for input_path in input_paths:
        inp = Path(input_path).resolve()
        same = out == inp
        if not same and out.exists() and inp.exists():
            same = os.path.samefile(out, inp)
        if same:
            raise ValueError(
                f"output {output_path} is the same file as input {input_path}; "
                "choose a different output path"
            )


def read_mrc(
    path: str | os.PathLike, *, check_finite: bool = True
) -> tuple[np.ndarray, float | None]:
    """Read an MRC map (optionally gzip or bzip2 compressed) as float32 with its voxel size.

    Files that break the MRC2014 rules in ways real programs do (old map ID, trailing bytes) are
    read in mrcfile's permissive mode with a warning; files mrcfile cannot make sense of even then
    are refused. Crystallographic axis orders (header fields mapc, mapr, maps other than 1, 2, 3)
    are undone, so the returned volume is always indexed (z, y, x).

    Args:
        path: the file.
        check_finite: refuse data holding NaN or Inf.

    Returns:
        `(data, voxel_size)`. `data` is float32, (z, y, x) for volumes and image stacks such as
        tilt series, (y, x) for single images. `voxel_size` is the x voxel size in Angstrom as a
        Python float, or `None` when the header carries none (a cell size of 0, as some programs
        write). Anisotropic voxel sizes give a warning (the x one is returned); for images and
        image stacks only x and y are compared.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable MRC file, holds complex or 4D data, or (with
            `check_finite`) holds NaN or Inf values.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"MRC file not found: {path}")
    try:
        mrc = _open_mrc(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable MRC file: {err}") from err
    with mrc:
        header = mrc.header
        mode = int(header.mode)
        if mode in _COMPLEX_MODES:
            raise ValueError(
                f"{path} is not a readable MRC file: it holds complex data (mode {mode}); "
                "read_mrc reads real-valued maps only"
            )
        if mrc.data is None or mrc.data.size == 0:
            raise ValueError(f"{path} is not a readable MRC file: it holds no data")
        if mrc.data.ndim == 4:
            raise ValueError(
                f"{path} is a volume stack (4D, shape {mrc.data.shape}); read_mrc reads one "
                "volume, image or image stack"
            )
        data = np.array(mrc.data, dtype=np.float32)
        axis_labels = (int(header.maps), int(header.mapr), int(header.mapc))
        cell = np.array([header.cella.x, header.cella.y, header.cella.z], dtype=np.float64)
        sampling = np.array([header.mx, header.my, header.mz], dtype=np.float64)
        planar = data.ndim == 2 or mrc.is_image_stack()

    if data.ndim == 3 and sorted(axis_labels) == [1, 2, 3] and axis_labels != (3, 2, 1):
        # Stored axes are (sections, rows, columns) = (maps, mapr, mapc); 1, 2, 3 name x, y, z.
        data = np.ascontiguousarray(data.transpose([axis_labels.index(a) for a in (3, 2, 1)]))

    if check_finite:
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        if n_bad:
            raise ValueError(
                f"{path} holds {n_bad} non-finite values (NaN or Inf) out of {data.size}; "
                "fix the file or pass check_finite=False"
            )
    return data, _voxel_size(path, cell, sampling, planar)


def _open_mrc(path: Path) -> mrcfile.mrcfile.MrcFile:
    """Open strictly; fall back to permissive mode only if that still yields a data block."""
    try:
        return mrcfile.open(path, mode="r")
    except ValueError as strict_error:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mrc = mrcfile.open(path, mode="r", permissive=True)
        if mrc.data is None or mrc.data.size == 0 or min(mrc.data.shape) == 0:
            mrc.close()
            raise strict_error from None
        problems = "; ".join(dict.fromkeys(str(w.message) for w in caught)) or str(strict_error)
        warnings.warn(
            f"{path} breaks the MRC format and was read in permissive mode: {problems}",
            RuntimeWarning,
            stacklevel=3,
        )
        return mrc


def _voxel_size(
    path: Path, cell: np.ndarray, sampling: np.ndarray, planar: bool
) -> float | None:
    """x voxel size (Angstrom) from the header's cell lengths and sampling, or None if absent."""
    with np.errstate(divide="ignore", invalid="ignore"):
        sizes = np.where(sampling > 0, cell / sampling, 0.0)
    if planar:
        # Images and image stacks: z is the stack axis and its cell length is often meaningless.
        sizes = sizes[:2]
    if not np.all(np.isfinite(sizes)) or np.any(sizes < 0):
        warnings.warn(
            f"{path} has an invalid voxel size {sizes.tolist()} in its header; "
            "treating it as absent",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if np.all(sizes == 0):
        return None
    if not np.allclose(sizes, sizes[0], rtol=1e-4, atol=0.0):
        warnings.warn(
            f"{path} has anisotropic voxel sizes ({', '.join(f'{s:.6g}' for s in sizes)}) "
            f"Angstrom along ({', '.join('xyz'[: sizes.size])}); "
            f"using the x one, {sizes[0]:g}",
            RuntimeWarning,
            stacklevel=3,
        )
    if sizes[0] == 0:
        return None
    # The header stores float32: return the shortest decimal that float32 rounds to (11.4, not
    # 11.399999618530273), which is the value the writing program was given.
    return float(str(np.float32(sizes[0])))


# Integer modes MRC2014 defines, for label maps; everything else is written as float32.
_INTEGER_MODES = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.uint16))


def write_mrc(
    path: str | os.PathLike, array, voxel_size: float | None, *, dtype=np.float32
) -> Path:
    """Write a 2D or 3D array as an MRC file (float32 by default), atomically.

    The file is written next to `path` under a temporary name and renamed over it only once
    complete, so a failed write leaves no partial file and an existing file untouched. Missing
    parent folders are created. A name ending in `.gz` or `.bz2` is written compressed.

    Args:
        path: destination file.
        array: real-valued, finite (z, y, x) volume, (n_tilts, y, x) tilt series or (y, x) image;
            any numeric dtype (NumPy or JAX), converted to float32.
        voxel_size: voxel size in Angstrom (positive), or `None` to write a header without one
            (cell size 0).
        dtype: float32, or int8 / int16 / uint16 for label maps (the values must be integers
            that fit that type).

    Returns:
        The destination path.

    Raises:
        ValueError: bad array (not 2D/3D, empty, complex, non-numeric, non-finite or out of
            float32 range) or bad voxel size.
    """
    data = _as_float32_map(array)
    dtype = np.dtype(dtype)
    if dtype in _INTEGER_MODES:
        info = np.iinfo(dtype)
        if np.any(data != np.round(data)) or data.min() < info.min or data.max() > info.max:
            raise ValueError(
                f"an {dtype} MRC file holds integers in [{info.min}, {info.max}]; these data "
                f"range over [{data.min():g}, {data.max():g}] or are not integers"
            )
        data = data.astype(dtype)
    elif dtype != np.float32:
        raise ValueError(f"MRC files are written as float32, int8, int16 or uint16, not {dtype}")
    if voxel_size is not None:
        voxel_size = float(voxel_size)
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(
                f"voxel_size must be a positive number of Angstrom or None, got {voxel_size}"
            )
    name = Path(path).name.lower()
    compression = "gzip" if name.endswith(".gz") else "bzip2" if name.endswith(".bz2") else None

    def write(tmp: Path) -> None:
        with mrcfile.new(tmp, data=data, compression=compression, overwrite=True) as mrc:
            mrc.voxel_size = 0.0 if voxel_size is None else voxel_size
            # mrcfile's default label carries the time; a fixed one keeps equal data byte-identical.
            mrc.header.label[0] = "written by cryojax_mw"

    return atomic_write(path, write)


def _as_float32_map(array) -> np.ndarray:
    """Validate a 2D/3D real array and convert it to contiguous float32."""
    try:
        arr = np.asarray(array)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot turn the data into an array: {err}") from err
    if np.iscomplexobj(arr):
        raise ValueError("MRC data must be real-valued; write the real part or the modulus")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"MRC data must be numeric, got dtype {arr.dtype}")
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"MRC data must be a 2D (y, x) image or a 3D (z, y, x) array, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"MRC data is empty (shape {arr.shape})")
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        data = np.ascontiguousarray(arr, dtype=np.float32)
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise ValueError(
            f"MRC data holds {n_bad} values that are NaN, Inf or beyond the float32 range; "
            "replace them before writing"
        )
    return data
