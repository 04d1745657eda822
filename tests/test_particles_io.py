"""Particle lists: exact STAR / CSV round trips, RELION axis mapping, foreign files, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from cryojax_mw.io import (
    ParticleList,
    _particles,
    read_particles,
    write_particles_csv,
    write_particles_star,
)

WRITERS = {".star": write_particles_star, ".csv": write_particles_csv}


def _random_list(seed: int, n: int, n_classes: int = 3, voxel_size: float = 13.48) -> ParticleList:
    rng = np.random.default_rng(seed)
    return ParticleList(
        class_names=tuple(f"protein{k}" for k in range(n_classes)),
        class_ids=rng.integers(1, n_classes + 1, size=n),
        positions=rng.uniform(-5.0, 200.0, size=(n, 3)),
        angles_deg=rng.uniform(-180.0, 180.0, size=(n, 3)),
        voxel_size=voxel_size,
        tomo_name="TS_01",
    )


def _assert_identical(got: ParticleList, want: ParticleList) -> None:
    assert got.class_names == want.class_names
    assert got.tomo_name == want.tomo_name
    assert got.voxel_size == want.voxel_size
    assert got.class_ids.dtype == np.int64
    np.testing.assert_array_equal(got.class_ids, want.class_ids)
    for name in ("positions", "angles_deg"):
        got_column, want_column = getattr(got, name), getattr(want, name)
        assert got_column.dtype == np.float64
        assert got_column.shape == want_column.shape
        # Exact: both writers keep every bit of a float64.
        np.testing.assert_array_equal(got_column, want_column)


@pytest.mark.parametrize("suffix", [".star", ".csv"])
@pytest.mark.parametrize("n", [0, 1, 17])
def test_round_trip_is_exact(tmp_path, suffix, n):
    particles = _random_list(seed=n, n=n, voxel_size=1.2345678901234567)
    path = WRITERS[suffix](tmp_path / f"list{suffix}", particles)
    _assert_identical(read_particles(path), particles)


@pytest.mark.parametrize("suffix", [".star", ".csv"])
def test_round_trip_keeps_classes_without_particles_and_numeric_looking_names(tmp_path, suffix):
    particles = ParticleList(
        class_names=("001", "1e5", "ribosome", "empty_class"),
        class_ids=np.array([2, 1, 2, 3]),
        positions=np.arange(12.0).reshape(4, 3),
        angles_deg=np.zeros((4, 3)),
        voxel_size=10.0,
        tomo_name="0042",
    )
    path = WRITERS[suffix](tmp_path / f"list{suffix}", particles)
    _assert_identical(read_particles(path), particles)


def test_star_keeps_digits_that_starfiles_default_format_would_round(tmp_path):
    # starfile writes '%.6f' unless told otherwise; 1e-7 would come back as 0.
    particles = ParticleList(
        class_names=("a",),
        class_ids=np.array([1]),
        positions=np.array([[1e-7, 0.1234567891, 123456.7890123]]),
        angles_deg=np.array([[1e-9, -0.3333333333333333, 179.99999999]]),
        voxel_size=0.123456789,
        tomo_name="t",
    )
    path = write_particles_star(tmp_path / "p.star", particles)
    _assert_identical(read_particles(path), particles)


def test_star_columns_follow_relion_axis_mapping(tmp_path):
    particles = ParticleList(
        class_names=("ribosome", "proteasome"),
        class_ids=np.array([2]),
        positions=np.array([[1.0, 2.0, 3.0]]),  # (z, y, x)
        angles_deg=np.array([[10.0, 20.0, 30.0]]),
        voxel_size=13.48,
        tomo_name="TS_07",
    )
    blocks = starfile.read(write_particles_star(tmp_path / "p.star", particles), always_dict=True)
    row = blocks["particles"].iloc[0]
    assert (row["rlnCoordinateX"], row["rlnCoordinateY"], row["rlnCoordinateZ"]) == (3, 2, 1)
    assert (row["rlnAngleRot"], row["rlnAngleTilt"], row["rlnAnglePsi"]) == (10, 20, 30)
    assert row["rlnClassNumber"] == 2
    assert row["rlnTomoName"] == "TS_07"
    assert row["rlnOpticsGroup"] == 1
    assert blocks["optics"]["rlnImagePixelSize"].tolist() == [13.48]
    assert blocks["optics"]["rlnOpticsGroup"].tolist() == [1]
    assert blocks["classes"]["rlnClassNumber"].tolist() == [1, 2]
    assert blocks["classes"]["cryojaxmwClassName"].tolist() == ["ribosome", "proteasome"]


def test_csv_columns_follow_relion_axis_mapping_and_angstrom_is_voxels_times_voxel_size(tmp_path):
    particles = _random_list(seed=3, n=5, voxel_size=7.3)
    positions = np.vstack(
        [[1.0, 2.0, 3.0], particles.positions[1:]]
    )  # first at (z, y, x) = (1, 2, 3)
    particles = dataclasses.replace(particles, positions=positions)
    path = write_particles_csv(tmp_path / "p.csv", particles)
    lines = path.read_text().splitlines()
    assert lines[3] == (
        "tomo_name,class_id,class_name,x,y,z,x_angstrom,y_angstrom,z_angstrom,rot,tilt,psi"
    )
    table = pd.read_csv(path, comment="#")
    assert len(table) == 5
    assert (table["x"][0], table["y"][0], table["z"][0]) == (3.0, 2.0, 1.0)
    np.testing.assert_array_equal(table[["z", "y", "x"]].to_numpy(), particles.positions)
    np.testing.assert_array_equal(
        table[["z_angstrom", "y_angstrom", "x_angstrom"]].to_numpy(),
        particles.positions * 7.3,
    )
    np.testing.assert_array_equal(table[["rot", "tilt", "psi"]].to_numpy(), particles.angles_deg)
    assert table["class_name"].tolist() == [
        particles.class_names[k - 1] for k in particles.class_ids
    ]
    assert set(table["tomo_name"]) == {"TS_01"}


def test_positions_angstrom_is_positions_times_voxel_size():
    particles = dataclasses.replace(
        _random_list(seed=1, n=2, voxel_size=2.5), positions=np.array([[1, 2, 3], [0, -4, 0.5]])
    )
    np.testing.assert_array_equal(particles.positions_angstrom, [[2.5, 5.0, 7.5], [0, -10, 1.25]])
    assert len(particles) == 2


def test_particle_list_copies_its_columns_and_makes_them_read_only():
    positions = np.ones((2, 3))
    particles = ParticleList(
        class_names=["a"],
        class_ids=[1, 1],
        positions=positions,
        angles_deg=np.zeros((2, 3), dtype=np.float32),
        voxel_size=1,
        tomo_name="t",
    )
    positions[0, 0] = 5.0
    assert particles.positions[0, 0] == 1.0
    assert particles.class_names == ("a",)
    assert particles.angles_deg.dtype == np.float64
    with pytest.raises(ValueError, match="read-only"):
        particles.positions[0, 0] = 2.0


RELION_STYLE_STAR = """
# written by another program: no classes or tomogram block, two optics groups
data_optics

loop_
_rlnOpticsGroup #1
_rlnOpticsGroupName #2
_rlnImagePixelSize #3
1 opticsGroup1 10.0
2 opticsGroup2 6.75

data_particles

loop_
_rlnTomoName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnCoordinateZ #4
_rlnAngleRot #5
_rlnAngleTilt #6
_rlnAnglePsi #7
_rlnClassNumber #8
_rlnOpticsGroup #9
TS_03 30.5 20.0 10.0 1.0 2.0 3.0 3 2
TS_03 0.0 1.0 2.0 -4.0 5.0 -6.0 1 2
"""


def test_star_without_classes_block_names_classes_by_number(tmp_path):
    path = tmp_path / "relion.star"
    path.write_text(RELION_STYLE_STAR)
    particles = read_particles(path)
    assert particles.class_names == ("class_1", "class_2", "class_3")
    np.testing.assert_array_equal(particles.class_ids, [3, 1])
    # Pixel size of the optics group the particles use, not of the first row.
    assert particles.voxel_size == 6.75
    assert particles.tomo_name == "TS_03"
    np.testing.assert_array_equal(particles.positions, [[10.0, 20.0, 30.5], [2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(particles.angles_deg, [[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]])


def test_csv_without_comment_lines_takes_names_from_rows_and_fits_the_voxel_size(tmp_path):
    voxel_size = 3.3
    positions = np.array([[1.0, 2.0, 3.0], [4.5, 0.0, 7.25]])  # (z, y, x)
    angstrom = positions * voxel_size
    rows = ["tomo_name,class_id,class_name,x,y,z,x_angstrom,y_angstrom,z_angstrom,rot,tilt,psi"]
    for class_id, name, (z, y, x), (za, ya, xa) in zip(
        (3, 1), ("ribosome", "actin"), positions.tolist(), angstrom.tolist(), strict=True
    ):
        rows.append(f"TS_9,{class_id},{name},{x!r},{y!r},{z!r},{xa!r},{ya!r},{za!r},1.0,2.0,3.0")
    path = tmp_path / "other.csv"
    path.write_text("\n".join(rows) + "\n")
    particles = read_particles(path)
    assert particles.class_names == ("actin", "class_2", "ribosome")
    assert particles.tomo_name == "TS_9"
    np.testing.assert_array_equal(particles.positions, positions)
    # Least squares from products rounded to float64: within a few ulp of the true value.
    assert abs(particles.voxel_size - voxel_size) <= 4 * np.spacing(voxel_size)


def _one_of_each_class() -> ParticleList:
    """Three particles, classes 1, 2, 3, so that every class name appears in a row."""
    particles = _random_list(seed=0, n=3)
    return dataclasses.replace(particles, class_ids=np.array([1, 2, 3]))


def _star_text(tmp_path, particles=None) -> str:
    path = write_particles_star(tmp_path / "good.star", particles or _one_of_each_class())
    return path.read_text()


def _drop_star_block(text: str, name: str) -> str:
    start = text.index(f"data_{name}\n")
    end = text.find("data_", start + 1)
    return text[:start] + (text[end:] if end >= 0 else "")


def test_star_without_optics_block_is_refused(tmp_path):
    path = tmp_path / "no_optics.star"
    path.write_text(_drop_star_block(_star_text(tmp_path), "optics"))
    with pytest.raises(ValueError, match="no data_optics block"):
        read_particles(path)


def test_star_without_tomogram_block_takes_the_name_from_the_particles(tmp_path):
    particles = _random_list(seed=5, n=3)
    path = tmp_path / "no_tomogram.star"
    path.write_text(_drop_star_block(_star_text(tmp_path, particles), "tomogram"))
    _assert_identical(read_particles(path), particles)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_names": "abc"}, "tuple of strings"),
        ({"class_names": ("a", "a", "b")}, "distinct"),
        ({"class_names": ("has space", "b", "c")}, "rename it"),
        ({"class_names": ("a", 'q"uote', "c")}, "rename it"),
        ({"class_names": ("a", "b#c", "c")}, "rename it"),
        ({"class_names": ("a", "", "c")}, "rename it"),
        ({"class_names": ("a", "NaN", "c")}, "reads as NaN"),
        ({"class_names": ("a", "b", 3)}, "rename it"),
        ({"tomo_name": "data_ts"}, "reserved word"),
        ({"tomo_name": "Loop_1"}, "reserved word"),
        ({"tomo_name": 7}, "rename it"),
        ({"class_ids": np.array([1, 0, 2, 1])}, r"in 1\.\.3"),
        ({"class_ids": np.array([1, 4, 2, 1])}, r"in 1\.\.3"),
        ({"class_ids": np.array([1.0, 2.0, 2.0, 1.0])}, "integer"),
        ({"class_ids": np.array([[1, 2, 2, 1]])}, "1D integer"),
        ({"positions": np.zeros((4, 2))}, r"positions must have shape \(4, 3\)"),
        ({"positions": np.zeros((3, 3))}, r"positions must have shape \(4, 3\)"),
        ({"angles_deg": np.zeros((5, 3))}, r"angles_deg must have shape \(4, 3\)"),
        ({"positions": np.full((4, 3), np.nan)}, "NaN or Inf"),
        ({"angles_deg": np.full((4, 3), np.inf)}, "NaN or Inf"),
        ({"angles_deg": np.full((4, 3), 1j)}, "real numbers"),
        ({"voxel_size": 0.0}, "positive"),
        ({"voxel_size": -1.0}, "positive"),
        ({"voxel_size": float("nan")}, "positive"),
        ({"voxel_size": "big"}, "number of Angstrom"),
    ],
)
def test_particle_list_refuses_bad_input(change, message):
    fields = {
        "class_names": ("a", "b", "c"),
        "class_ids": np.array([1, 2, 3, 1]),
        "positions": np.zeros((4, 3)),
        "angles_deg": np.zeros((4, 3)),
        "voxel_size": 1.0,
        "tomo_name": "ts",
    }
    with pytest.raises(ValueError, match=message):
        ParticleList(**{**fields, **change})


def _csv_text(tmp_path) -> str:
    return write_particles_csv(tmp_path / "good.csv", _one_of_each_class()).read_text()


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) >= 1
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("name", "make_text", "message"),
    [
        ("empty.star", lambda tmp: "", "no data_particles block"),
        ("empty.csv", lambda tmp: "", "no header line"),
        ("comments_only.csv", lambda tmp: "# tomo_name: ts\n", "no header line"),
        (
            "missing_column.star",
            lambda tmp: _replace_once(_star_text(tmp), "_rlnAngleTilt ", "_rlnSomethingElse "),
            "lacks the column.*rlnAngleTilt",
        ),
        (
            "missing_column.csv",
            lambda tmp: _replace_once(_csv_text(tmp), ",tilt,", ",tlt,"),
            "lacks the column.*tilt",
        ),
        (
            "missing_pixel_size.star",
            lambda tmp: _replace_once(_star_text(tmp), "_rlnImagePixelSize", "_rlnOther"),
            "lacks the column.*rlnImagePixelSize",
        ),
        (
            "not_a_number.csv",
            lambda tmp: _csv_text(tmp) + "TS_01,one,protein0,1.0,2.0,3.0,13.48,26.96,40.44,0,0,0\n",
            "class_id holds values that are not numbers",
        ),
        (
            "short_row.csv",
            lambda tmp: _csv_text(tmp) + "TS_01,1,protein0,1.0\n",
            "data row 4 has 4 fields",
        ),
        (
            "two_tomograms.star",
            lambda tmp: _replace_once(
                _drop_star_block(_star_text(tmp), "tomogram"), "TS_01\t", "TS_02\t"
            ),
            "from 2 tomograms",
        ),
        (
            "tomogram_disagrees.star",
            lambda tmp: _replace_once(
                _star_text(tmp), "_rlnTomoName\t\t\tTS_01", "_rlnTomoName\t\t\tX"
            ),
            "make them agree",
        ),
        (
            "tomogram_disagrees.csv",
            lambda tmp: _replace_once(_csv_text(tmp), "# tomo_name: TS_01", "# tomo_name: X"),
            "make them agree",
        ),
        (
            "class_name_disagrees.csv",
            lambda tmp: _replace_once(
                _csv_text(tmp), "# class_names: protein0", "# class_names: p"
            ),
            "make them agree",
        ),
        (
            "angstrom_disagrees.csv",
            lambda tmp: _replace_once(
                _csv_text(tmp), "# voxel_size_angstrom: 13.48", "# voxel_size_angstrom: 13.5"
            ),
            "not x, y, z times the voxel size",
        ),
        (
            "bad_class_numbers.star",
            lambda tmp: _replace_once(_star_text(tmp), "\n3\tprotein2", "\n4\tprotein2"),
            r"must be 1\.\.3",
        ),
        (
            "nan_position.csv",
            lambda tmp: _csv_text(tmp) + "TS_01,1,protein0,1.0,2.0,inf,13.48,26.96,inf,0,0,0\n",
            "NaN or Inf",
        ),
    ],
)
def test_read_particles_refuses_bad_files(tmp_path, name, make_text, message):
    path = tmp_path / name
    path.write_text(make_text(tmp_path))
    with pytest.raises(ValueError, match=message):
        read_particles(path)


def test_read_particles_refuses_an_unknown_suffix_and_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.star or \.csv"):
        read_particles(tmp_path / "list.txt")
    with pytest.raises(FileNotFoundError):
        read_particles(tmp_path / "missing.star")


@pytest.mark.parametrize("suffix", [".star", ".csv"])
def test_failed_write_leaves_the_previous_file_untouched(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"list{suffix}"
    WRITERS[suffix](path, _random_list(seed=1, n=2))
    before = path.read_bytes()

    real_atomic_write = _particles.atomic_write

    def atomic_write_then_fail(target, write):
        def write_then_fail(tmp: Path) -> None:
            write(tmp)
            raise RuntimeError("disk full")

        return real_atomic_write(target, write_then_fail)

    monkeypatch.setattr(_particles, "atomic_write", atomic_write_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        WRITERS[suffix](path, _random_list(seed=2, n=5))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


@pytest.mark.parametrize("suffix", [".star", ".csv"])
def test_the_same_list_gives_the_same_bytes(tmp_path, suffix):
    particles = _random_list(seed=5, n=9)
    a = WRITERS[suffix](tmp_path / f"a{suffix}", particles).read_bytes()
    b = WRITERS[suffix](tmp_path / f"b{suffix}", particles).read_bytes()
    assert a == b
