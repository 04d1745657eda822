"""Particle lists in and out: RELION-style STAR files and plain CSV tables.

A `ParticleList` holds the particles picked in (or simulated for) one tomogram: their class, their
position in voxels and their orientation as RELION ZYZ Euler angles in degrees.

Axis mapping, the same in both formats: array positions are (z, y, x), 0-based voxel indices (the
centre of voxel i is at i), and files name them by RELION's convention, X = array axis 2,
Y = axis 1, Z = axis 0. No 1-based shift is applied.

STAR files (written with the `starfile` package) hold four data blocks:
- `optics`: one row, `rlnOpticsGroup` = 1 and `rlnImagePixelSize` = voxel size in Angstrom;
- `particles`: `rlnTomoName`, `rlnCoordinateX/Y/Z` (voxels), `rlnAngleRot/Tilt/Psi` (degrees),
  `rlnClassNumber` (1-based), `rlnOpticsGroup`;
- `classes`: `rlnClassNumber` and `cryojaxmwClassName`, the class names, which have no RELION label;
- `tomogram`: a key-value block with `rlnTomoName`, so that a list without particles keeps it.
RELION ignores the last two. Floats are written as the shortest decimal that reads back to the
same float64 (starfile's default, `%.6f`, keeps only 6 decimals), so a round trip is exact.

CSV files start with three comment lines carrying what the rows cannot (the voxel size, the
tomogram name and classes without particles):
    # voxel_size_angstrom: 13.48
    # tomo_name: TS_01
    # class_names: ribosome,proteasome
then the header `tomo_name,class_id,class_name,x,y,z,x_angstrom,y_angstrom,z_angstrom,rot,tilt,psi`
and one row per particle, floats written with `repr` (exact round trip). Readers such as
`pandas.read_csv(path, comment="#")` skip the comment lines.

Names (tomogram and classes) must survive both formats unquoted: ASCII letters, digits and
`_ . + -`, starting with a letter or digit, not a STAR reserved word (`data_`, `loop_`, `save_`,
`global_`, `stop_`) and not `nan`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ._mrc import atomic_write

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_STAR_RESERVED_PREFIXES = ("data_", "loop_", "save_", "global_", "stop_")

_CLASS_NAME_LABEL = "cryojaxmwClassName"
_STAR_COORDINATES = ("rlnCoordinateZ", "rlnCoordinateY", "rlnCoordinateX")  # array axes 0, 1, 2
_STAR_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_STAR_REQUIRED = ("rlnTomoName", *_STAR_COORDINATES, *_STAR_ANGLES, "rlnClassNumber")

_CSV_HEADER = (
    "tomo_name",
    "class_id",
    "class_name",
    "x",
    "y",
    "z",
    "x_angstrom",
    "y_angstrom",
    "z_angstrom",
    "rot",
    "tilt",
    "psi",
)
_CSV_COORDINATES = ("z", "y", "x")  # array axes 0, 1, 2
_CSV_ANGSTROM = ("z_angstrom", "y_angstrom", "x_angstrom")
_CSV_ANGLES = ("rot", "tilt", "psi")
_CSV_META_KEYS = ("voxel_size_angstrom", "tomo_name", "class_names")
# Angstrom columns of CSV files from elsewhere may be rounded; ours match exactly.
_ANGSTROM_RTOL = 1e-6


def _one_tomo_name(declared: str | None, row_names: list[str], where: str) -> str:
    """The tomogram a file's particles belong to: the name it declares (`where`), which the rows
    must agree with, else the one name its rows give."""
    if declared is not None:
        if row_names and row_names != [declared]:
            raise ValueError(
                f"particles name tomograms {row_names}, {where} {declared!r}; make them agree"
            )
        return declared
    if len(row_names) == 1:
        return row_names[0]
    if not row_names:
        raise ValueError(f"no particles and no tomogram name ({where} is missing)")
    raise ValueError(
        f"particles from {len(row_names)} tomograms {row_names}; a particle list holds one "
        "tomogram, split the file"
    )


def _float_repr(value) -> str:
    """Shortest decimal that reads back to the same float64."""
    return repr(float(value))


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class ParticleList:
    """Particles of one tomogram: class, position (voxels, (z, y, x)) and ZYZ Euler angles.

    Columns are NumPy arrays of length n (n may be 0), copied and made read-only on construction.

    Attributes:
        class_names: names of the classes; `class_names[k - 1]` is the name of class id k. Names
            use ASCII letters, digits and `_ . + -` (see the module docstring).
        class_ids: int64 (n,), 1-based class ids into `class_names`.
        positions: float64 (n, 3), positions in voxels in (z, y, x) order, 0-based voxel indices
            (the centre of voxel i is at i).
        angles_deg: float64 (n, 3), RELION ZYZ Euler angles (rot, tilt, psi) in degrees.
        voxel_size: voxel size in Angstrom, > 0.
        tomo_name: name of the tomogram the particles belong to.

    Raises:
        ValueError: columns of wrong shape, dtype or length, non-finite values, class ids outside
            1..len(class_names), repeated or malformed names, or a voxel size that is not > 0.
    """

    class_names: tuple[str, ...]
    class_ids: np.ndarray
    positions: np.ndarray
    angles_deg: np.ndarray
    voxel_size: float
    tomo_name: str

    def __post_init__(self):
        names = self.class_names
        # A bare string is iterable too, but would split into one class per character.
        if isinstance(names, str) or not np.iterable(names):
            raise ValueError(f"class_names must be a tuple of strings, got {names!r}")
        names = tuple(names)
        for name in names:
            _check_name(name, "class name")
        if len(set(names)) != len(names):
            raise ValueError(f"class_names must be distinct, got {names}")
        _check_name(self.tomo_name, "tomo_name")

        ids = np.asarray(self.class_ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"class_ids must be a 1D integer array, got shape {ids.shape} dtype {ids.dtype}"
            )
        n = ids.shape[0]
        if n and (ids.min() < 1 or ids.max() > len(names)):
            raise ValueError(
                f"class_ids must lie in 1..{len(names)} (1-based into class_names), "
                f"got values from {ids.min()} to {ids.max()}"
            )
        positions = _float_column(self.positions, "positions", n)
        angles = _float_column(self.angles_deg, "angles_deg", n)

        try:
            voxel_size = float(self.voxel_size)
        except (TypeError, ValueError):
            raise ValueError(
                f"voxel_size must be a number of Angstrom, got {self.voxel_size!r}"
            ) from None
        if not (np.isfinite(voxel_size) and voxel_size > 0):
            raise ValueError(f"voxel_size must be a positive number of Angstrom, got {voxel_size}")

        ids = np.array(ids, dtype=np.int64)
        for array in (ids, positions, angles):
            array.setflags(write=False)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "class_ids", ids)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "angles_deg", angles)
        object.__setattr__(self, "voxel_size", voxel_size)

    def __len__(self) -> int:
        return self.class_ids.shape[0]

    @property
    def positions_angstrom(self) -> np.ndarray:
        """Positions in Angstrom, float64 (n, 3) in (z, y, x) order: positions * voxel_size."""
        return self.positions * self.voxel_size


def _check_name(name, what: str) -> None:
    """Refuse names that STAR or CSV files could not hold unquoted and read back unchanged."""
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise ValueError(
            f"{what} {name!r} must be ASCII letters, digits and '_.+-', starting with a letter "
            "or digit; rename it"
        )
    lower = name.lower()
    if lower.startswith(_STAR_RESERVED_PREFIXES) or lower == "nan":
        raise ValueError(f"{what} {name!r} is a STAR reserved word or reads as NaN; rename it")


def _float_column(values, what: str, n: int) -> np.ndarray:
    """Validate a finite real (n, 3) column and return a float64 copy."""
    arr = np.asarray(values)
    if arr.shape != (n, 3):
        raise ValueError(f"{what} must have shape ({n}, 3) (one row per particle), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = np.array(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds NaN or Inf values; give finite numbers")
    return arr


def write_particles_star(path: str | os.PathLike, particles: ParticleList) -> Path:
    """Write a particle list as a RELION-style STAR file, atomically (see `atomic_write`).

    Blocks and labels are listed in the module docstring. Coordinates are in voxels with
    X = array axis 2, Y = axis 1, Z = axis 0; floats are written exactly (shortest round-trip
    decimal).

    Args:
        path: destination file; missing parent folders are created.
        particles: the list to write.

    Returns:
        The destination path.
    """
    n = len(particles)
    table = {"rlnTomoName": pd.Series([particles.tomo_name] * n, dtype=object)}
    for axis in (2, 1, 0):  # RELION's X, Y, Z column order
        table[_STAR_COORDINATES[axis]] = particles.positions[:, axis]
    for axis, label in enumerate(_STAR_ANGLES):
        table[label] = particles.angles_deg[:, axis]
    table["rlnClassNumber"] = particles.class_ids
    table["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    blocks = {
        "optics": pd.DataFrame(
            {"rlnOpticsGroup": [1], "rlnImagePixelSize": [particles.voxel_size]}
        ),
        "particles": pd.DataFrame(table),
        "classes": pd.DataFrame(
            {
                "rlnClassNumber": np.arange(1, len(particles.class_names) + 1, dtype=np.int64),
                _CLASS_NAME_LABEL: pd.Series(particles.class_names, dtype=object),
            }
        ),
        "tomogram": {"rlnTomoName": particles.tomo_name},
    }

    def write(tmp: Path) -> None:
        starfile.write(blocks, tmp, float_format=_float_repr)
        # starfile stamps the time in a first comment line; without it, same list, same bytes.
        lines = tmp.read_text().splitlines(keepends=True)
        tmp.write_text("".join(line for line in lines if not line.startswith("# Created by")))

    return atomic_write(path, write)


def write_particles_csv(path: str | os.PathLike, particles: ParticleList) -> Path:
    """Write a particle list as a CSV table, atomically (see `atomic_write`).

    The layout (three `#` comment lines, then the header and one row per particle) is given in the
    module docstring. x, y, z are voxels with x = array axis 2, y = axis 1, z = axis 0; the
    `*_angstrom` columns are the same positions times the voxel size; floats are written with
    `repr`, so they read back exactly.

    Args:
        path: destination file; missing parent folders are created.
        particles: the list to write.

    Returns:
        The destination path.
    """
    buffer = io.StringIO()
    buffer.write(f"# voxel_size_angstrom: {_float_repr(particles.voxel_size)}\n")
    buffer.write(f"# tomo_name: {particles.tomo_name}\n")
    buffer.write(f"# class_names: {','.join(particles.class_names)}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(_CSV_HEADER)
    angstrom = particles.positions_angstrom
    for i in range(len(particles)):
        class_id = int(particles.class_ids[i])
        z, y, x = (_float_repr(v) for v in particles.positions[i])
        za, ya, xa = (_float_repr(v) for v in angstrom[i])
        angles = [_float_repr(v) for v in particles.angles_deg[i]]
        name = particles.class_names[class_id - 1]
        writer.writerow([particles.tomo_name, class_id, name, x, y, z, xa, ya, za, *angles])
    text = buffer.getvalue()

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="ascii")

    return atomic_write(path, write)


def read_particles(path: str | os.PathLike) -> ParticleList:
    """Read a particle list from a STAR (`.star`) or CSV (`.csv`) file, chosen by the suffix.

    Files written by `write_particles_star` / `write_particles_csv` read back exactly. Files from
    other programs are accepted where the list is still determined:
    - STAR without a `classes` block: class id k is named `class_k`, for k up to the largest id.
      The voxel size is `rlnImagePixelSize` of the `optics` block (one value over the optics
      groups the particles use); a file without an `optics` block is refused. Without a
      `tomogram` block the tomogram name is the one `rlnTomoName` value of the particles.
    - CSV without the comment lines: the tomogram name and class names come from the rows (ids
      without a row are named `class_k`), the voxel size is fitted to the Angstrom columns.

    Args:
        path: the file.

    Returns:
        The particle list.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown suffix, a missing block or column, a value that is not a number,
            particles from more than one tomogram, Angstrom columns that disagree with the voxel
            columns, or a list that breaks the rules of `ParticleList`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".star", ".csv"):
        raise ValueError(f"cannot tell the format of {path}: the name must end in .star or .csv")
    if not path.exists():
        raise FileNotFoundError(f"particle list not found: {path}")
    try:
        fields = _read_star(path) if suffix == ".star" else _read_csv(path)
        return ParticleList(**fields)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _read_star(path: Path) -> dict:
    """Fields of a ParticleList from a STAR file."""
    try:
        blocks = starfile.read(
            path, always_dict=True, parse_as_string=["rlnTomoName", _CLASS_NAME_LABEL]
        )
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise ValueError(f"not a readable STAR file: {err}") from None
    if "particles" not in blocks:
        raise ValueError("no data_particles block; a particle list needs one")
    particles = _as_table(blocks["particles"], "particles")
    _require_columns(particles, _STAR_REQUIRED, "data_particles block")
    n = len(particles)

    tomo_names = sorted(set(particles["rlnTomoName"].astype(str)))
    declared = None
    if "tomogram" in blocks:
        tomogram = _as_table(blocks["tomogram"], "tomogram")
        _require_columns(tomogram, ("rlnTomoName",), "data_tomogram block")
        if len(tomogram) != 1:
            raise ValueError(f"the data_tomogram block names {len(tomogram)} tomograms, not one")
        declared = str(tomogram["rlnTomoName"].iloc[0])
    tomo_name = _one_tomo_name(declared, tomo_names, "the data_tomogram block")

    class_ids = _integer_column(particles["rlnClassNumber"], "rlnClassNumber")
    if "classes" in blocks:
        classes = _as_table(blocks["classes"], "classes")
        _require_columns(classes, ("rlnClassNumber", _CLASS_NAME_LABEL), "data_classes block")
        numbers = _integer_column(classes["rlnClassNumber"], "rlnClassNumber of data_classes")
        if sorted(numbers.tolist()) != list(range(1, len(numbers) + 1)):
            raise ValueError(
                f"data_classes numbers {numbers.tolist()} must be 1..{len(numbers)}, each once"
            )
        names = classes[_CLASS_NAME_LABEL].astype(str).to_numpy()
        class_names = tuple(names[np.argsort(numbers)].tolist())
    else:
        n_classes = int(class_ids.max()) if n else 0
        class_names = tuple(f"class_{k}" for k in range(1, n_classes + 1))

    if "optics" not in blocks:
        raise ValueError(
            "no data_optics block, so no voxel size (rlnImagePixelSize); add an optics block"
        )
    optics = _as_table(blocks["optics"], "optics")
    _require_columns(optics, ("rlnImagePixelSize",), "data_optics block")
    if n and "rlnOpticsGroup" in particles and "rlnOpticsGroup" in optics:
        if not set(particles["rlnOpticsGroup"]) <= set(optics["rlnOpticsGroup"]):
            raise ValueError("particles use optics groups missing from the data_optics block")
        optics = optics[optics["rlnOpticsGroup"].isin(particles["rlnOpticsGroup"])]
    sizes = sorted(set(_numeric(optics["rlnImagePixelSize"], "rlnImagePixelSize").tolist()))
    if len(sizes) != 1:
        raise ValueError(
            f"optics groups give {len(sizes)} pixel sizes {sizes}; a particle list has one"
        )

    return {
        "class_names": class_names,
        "class_ids": class_ids,
        "positions": np.stack([_numeric(particles[c], c) for c in _STAR_COORDINATES], axis=1),
        "angles_deg": np.stack([_numeric(particles[c], c) for c in _STAR_ANGLES], axis=1),
        "voxel_size": sizes[0],
        "tomo_name": tomo_name,
    }


def _as_table(block, name: str) -> pd.DataFrame:
    """A STAR block as a table: key-value blocks become one row."""
    if block is None:
        raise ValueError(f"the data_{name} block holds no labels")
    return block if isinstance(block, pd.DataFrame) else pd.DataFrame([block])


def _require_columns(table: pd.DataFrame, columns, where: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"the {where} lacks the column(s) {', '.join(missing)}; add them")


def _numeric(column, label: str) -> np.ndarray:
    """A column as float64, or a ValueError naming it."""
    try:
        return np.asarray(column, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"column {label} holds values that are not numbers") from None


def _integer_column(column, label: str) -> np.ndarray:
    """A column of whole numbers (possibly written as floats) as int64."""
    values = _numeric(column, label)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError(f"column {label} must hold whole numbers")
    return values.astype(np.int64)


def _read_csv(path: Path) -> dict:
    """Fields of a ParticleList from a CSV file."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"not a readable CSV text file: {err}") from None
    meta = {}
    n_comments = 0
    for line in lines:
        if not line.startswith("#"):
            break
        n_comments += 1
        key, sep, value = line[1:].partition(":")
        if sep and key.strip() in _CSV_META_KEYS:
            meta[key.strip()] = value.strip()
    rows = [row for row in csv.reader(lines[n_comments:]) if row]
    if not rows:
        raise ValueError(f"no header line; expected {','.join(_CSV_HEADER)}")
    header, rows = rows[0], rows[1:]
    missing = [c for c in _CSV_HEADER if c not in header]
    if missing:
        raise ValueError(f"the header lacks the column(s) {', '.join(missing)}; add them")
    index = {c: header.index(c) for c in _CSV_HEADER}
    for row_number, row in enumerate(rows, start=1):
        if len(row) != len(header):
            raise ValueError(
                f"data row {row_number} has {len(row)} fields, the header {len(header)}"
            )
    columns = {c: [row[index[c]] for row in rows] for c in _CSV_HEADER}

    def floats(names) -> np.ndarray:
        return np.stack([_numeric(columns[c], c) for c in names], axis=1).reshape(len(rows), 3)

    positions = floats(_CSV_COORDINATES)
    angstrom = floats(_CSV_ANGSTROM)
    class_ids = _integer_column(columns["class_id"], "class_id")

    tomo_name = _one_tomo_name(
        meta.get("tomo_name"), sorted(set(columns["tomo_name"])), "the tomo_name line"
    )

    if "class_names" in meta:
        class_names = tuple(meta["class_names"].split(",")) if meta["class_names"] else ()
    else:
        named = {}
        for class_id, name in zip(class_ids.tolist(), columns["class_name"]):
            if named.setdefault(class_id, name) != name:
                raise ValueError(
                    f"class id {class_id} has two names, {named[class_id]!r} and {name!r}"
                )
        n_classes = max(named, default=0)
        class_names = tuple(named.get(k, f"class_{k}") for k in range(1, n_classes + 1))
    for class_id, name in zip(class_ids.tolist(), columns["class_name"]):
        if 1 <= class_id <= len(class_names) and class_names[class_id - 1] != name:
            raise ValueError(
                f"class id {class_id} is named {name!r} in a row but "
                f"{class_names[class_id - 1]!r} in the class list; make them agree"
            )

    if "voxel_size_angstrom" in meta:
        voxel_size = _numeric([meta["voxel_size_angstrom"]], "voxel_size_angstrom")[0]
    else:
        norm = float(np.sum(positions * positions))
        if norm == 0.0:
            raise ValueError(
                "no '# voxel_size_angstrom:' line and no nonzero coordinate to infer it from; "
                "add the line"
            )
        # Least-squares fit of angstrom = voxel_size * positions.
        voxel_size = float(np.sum(angstrom * positions)) / norm
    expected = positions * voxel_size
    if not np.allclose(angstrom, expected, rtol=_ANGSTROM_RTOL, atol=_ANGSTROM_RTOL * voxel_size):
        raise ValueError(
            f"the *_angstrom columns are not x, y, z times the voxel size {voxel_size} A; "
            "fix one or the other"
        )

    return {
        "class_names": class_names,
        "class_ids": class_ids,
        "positions": positions,
        "angles_deg": floats(_CSV_ANGLES),
        "voxel_size": voxel_size,
        "tomo_name": tomo_name,
    }
