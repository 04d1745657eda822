"""DeepFinder object lists (XML) in.

DeepFinder writes particle lists as
    <objlist>
      <object tomo_idx="0" obj_id="3" class_label="1" x="34.0" y="16.0" z="64.0"
              psi="..." phi="..." the="..." cluster_size="120"/>
      ...
    </objlist>
where only `class_label`, `x`, `y`, `z` are always present. Coordinates are 0-based voxel indices
of the tomogram array, x = array axis 2, y = axis 1, z = axis 0 (DeepFinder reads tomograms with
mrcfile as (z, y, x), like this package). Class labels are 1-based (0 is its background). One file
may hold several tomograms, told apart by `tomo_idx`.

Orientations: DeepFinder stores Euler angles (phi, psi, the) which its documentation places in the
TOM / PyTom "ZXZ" convention, but its own rotation code departs from that convention (it swaps
and negates angles to match PyTom and samples on a transposed grid), and the handedness of that
frame relative to RELION's cannot be checked without its code running on a known structure. So
`read_particles_xml` does not convert them: particles get zero angles. `read_objlist_xml` returns
the raw angles (and every other attribute) for whoever knows the convention of their file.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._particles import ParticleList, _check_name

_FLOAT_ATTRIBUTES = ("x", "y", "z", "phi", "psi", "the")
_INT_ATTRIBUTES = ("class_label", "tomo_idx", "obj_id", "cluster_size")
_REQUIRED = ("class_label", "x", "y", "z")


def read_objlist_xml(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every attribute of a DeepFinder object list, as columns.

    Args:
        path: the XML file.

    Returns:
        A dict of arrays, one entry per object: float64 `x`, `y`, `z` (voxels), `phi`, `psi`,
        `the` (degrees as written, NaN where absent); int64 `class_label`, `tomo_idx`, `obj_id`,
        `cluster_size` (-1 where absent).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an `<objlist>` of `<object>` elements, a missing required attribute
            (class_label, x, y, z), or a value that is not a number (whole number for the
            integer attributes).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"object list not found: {path}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"{path}: not well-formed XML ({err})") from None
    if root.tag != "objlist":
        raise ValueError(
            f"{path}: the root element is <{root.tag}>, a DeepFinder list is <objlist>"
        )
    columns: dict[str, list] = {name: [] for name in (*_FLOAT_ATTRIBUTES, *_INT_ATTRIBUTES)}
    for n, element in enumerate(root):
        if element.tag != "object":
            raise ValueError(f"{path}: element {n} is <{element.tag}>, expected <object>")
        missing = [a for a in _REQUIRED if element.get(a) is None]
        if missing:
            raise ValueError(f"{path}: object {n} lacks the attribute(s) {', '.join(missing)}")
        for name in _FLOAT_ATTRIBUTES:
            columns[name].append(_number(element.get(name), name, n, path, integer=False))
        for name in _INT_ATTRIBUTES:
            columns[name].append(_number(element.get(name), name, n, path, integer=True))
    out = {name: np.asarray(columns[name], dtype=np.float64) for name in _FLOAT_ATTRIBUTES}
    out.update({name: np.asarray(columns[name], dtype=np.int64) for name in _INT_ATTRIBUTES})
    return out


def _number(text: str | None, name: str, n: int, path: Path, *, integer: bool):
    if text is None:
        return -1 if integer else np.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{path}: object {n} has {name}={text!r}, not a number") from None
    if not np.isfinite(value):
        raise ValueError(f"{path}: object {n} has {name}={text!r}; give a finite number")
    if integer:
        if value != round(value):
            raise ValueError(f"{path}: object {n} has {name}={text!r}, not a whole number")
        return round(value)
    return value


def read_particles_xml(
    path: str | os.PathLike,
    *,
    voxel_size: float,
    class_names: Sequence[str] | None = None,
    tomo_name: str | None = None,
    tomo_idx: int | None = None,
) -> ParticleList:
    """Read a DeepFinder object list as a `ParticleList` (zero angles, see the module docstring).

    Args:
        path: the XML file.
        voxel_size: Angstrom per voxel (the file does not carry it).
        class_names: names of class labels 1..K (default `class_1`..`class_K`, K the largest
            label in the file); every label in the file must have a name.
        tomo_name: the particle list's tomogram name (default the file name without `.xml`).
        tomo_idx: which tomogram to read from a file holding several (`tomo_idx` attribute);
            required then. Every object must carry `tomo_idx` for a selection.

    Returns:
        The particles, positions in voxels (z, y, x) as written, angles zero.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a malformed file (see `read_objlist_xml`), labels < 1 or without a name,
            several tomograms and no `tomo_idx`, or names the particle list refuses.
    """
    path = Path(path)
    table = read_objlist_xml(path)
    present = table["tomo_idx"]
    if tomo_idx is not None:
        if np.any(present < 0):
            raise ValueError(
                f"{path}: some objects carry no tomo_idx, so tomo_idx={tomo_idx} cannot select; "
                "leave tomo_idx out"
            )
        keep = present == int(tomo_idx)
        if not np.any(keep):
            raise ValueError(
                f"{path}: no object has tomo_idx={tomo_idx}; the file holds "
                f"{sorted(set(present.tolist()))}"
            )
        table = {name: column[keep] for name, column in table.items()}
    else:
        tomograms = sorted(set(present[present >= 0].tolist()))
        if len(tomograms) > 1:
            raise ValueError(
                f"{path}: objects from tomograms {tomograms}; pick one with tomo_idx=..."
            )
    labels = table["class_label"]
    if len(labels) and labels.min() < 1:
        raise ValueError(
            f"{path}: class_label {labels.min()} found; labels start at 1 (0 is background)"
        )
    if class_names is None:
        n_classes = int(labels.max()) if len(labels) else 0
        class_names = tuple(f"class_{k}" for k in range(1, n_classes + 1))
    elif len(labels) and labels.max() > len(class_names):
        raise ValueError(
            f"{path}: class_label {labels.max()} found but class_names names "
            f"{len(class_names)} classes; name every label"
        )
    if tomo_name is None:
        tomo_name = path.name[: -len(".xml")] if path.name.lower().endswith(".xml") else path.name
        try:
            _check_name(tomo_name, "tomogram name")
        except ValueError:
            raise ValueError(
                f"{path}: the file name {tomo_name!r} is not a valid tomogram name (ASCII "
                "letters, digits and '_.+-'); pass tomo_name="
            ) from None
    try:
        return ParticleList(
            class_names=tuple(class_names),
            class_ids=labels,
            positions=np.stack([table["z"], table["y"], table["x"]], axis=1).reshape(-1, 3),
            angles_deg=np.zeros((len(labels), 3)),
            voxel_size=voxel_size,
            tomo_name=tomo_name,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
