"""Tilt angles in IMOD `.tlt` text files: one angle in degrees per line, in acquisition order."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._mrc import atomic_write


def read_tilt_angles(path: str | os.PathLike) -> np.ndarray:
    """Read tilt angles from an IMOD `.tlt` (or `.rawtlt`) file.

    Args:
        path: the file: one angle in degrees per line; blank lines are ignored.

    Returns:
        float64 array of shape (n_tilts,), in degrees, in the order of the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line that is not one number (the message gives its line number), a file
            without any angle, or a NaN / Inf angle.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tilt angle file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable tilt angle text file: {err}") from err
    angles = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        try:
            angle = float(entry)
        except ValueError:
            raise ValueError(
                f"{path}, line {line_number}: {entry!r} is not a number; a .tlt file holds one "
                "tilt angle in degrees per line"
            ) from None
        if not np.isfinite(angle):
            raise ValueError(
                f"{path}, line {line_number}: tilt angle {entry!r} is not finite; give a number "
                "of degrees"
            )
        angles.append(angle)
    if not angles:
        raise ValueError(f"{path} holds no tilt angles; expected one angle in degrees per line")
    return np.asarray(angles, dtype=np.float64)


def write_tilt_angles(path: str | os.PathLike, angles) -> Path:
    """Write tilt angles to an IMOD `.tlt` file, atomically (see `atomic_write`).

    Each angle is written with the fewest digits that read back to the same value in its own
    dtype, so `read_tilt_angles` returns float64 input exactly.

    Args:
        path: destination file; missing parent folders are created.
        angles: 1D sequence of finite tilt angles in degrees.

    Returns:
        The destination path.

    Raises:
        ValueError: angles not 1D, empty, non-numeric, complex or not finite.
    """
    arr = np.asarray(angles)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"tilt angles must be a non-empty 1D sequence, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"tilt angles must be real numbers of degrees, got dtype {arr.dtype}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"tilt angles must be finite, got {arr.tolist()}")
    text = "".join(f"{np.format_float_positional(a, unique=True, trim='0')}\n" for a in arr)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="ascii")

    return atomic_write(path, write)
