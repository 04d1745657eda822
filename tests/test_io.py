"""MRC and tilt-angle files: real files from other programs, round trips, atomic writes, errors."""

from __future__ import annotations

import itertools
import os
import shutil
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryojax_mw.io import (
    _mrc,
    atomic_write,
    check_output_not_input,
    read_mrc,
    read_tilt_angles,
    write_mrc,
    write_tilt_angles,
)

EXAMPLES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mrc_examples"
needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared/data not present")

# (file, shape as (z, y, x), voxel size in Angstrom or None, anisotropic header).
# EMD-3001 stores columns along z, rows along x, sections along y (mapc, mapr, maps = 3, 1, 2):
# its 73 columns are the z axis.
EXAMPLE_FILES = [
    ("EMD-3197.map", (20, 20, 20), 11.4, False),
    ("EMD-3001.map", (73, 25, 43), 0.44825, True),
    ("EMD-3001.map.bz2", (73, 25, 43), 0.44825, True),
    ("emd_3001.map.gz", (73, 25, 43), 0.44825, True),
    ("tomotwin/5MRC.mrc", (20, 26, 26), 1.0, False),
    ("tomotwin/model_0_1BXN_1.mrc", (37, 37, 37), None, False),
]


def _files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@needs_examples
def test_example_table_covers_every_mrc_file_in_the_examples_folder():
    on_disk = {
        p.relative_to(EXAMPLES).as_posix()
        for p in EXAMPLES.rglob("*")
        if p.is_file() and any(s in (".map", ".mrc") for s in p.suffixes)
    }
    assert on_disk == {name for name, *_ in EXAMPLE_FILES}


@needs_examples
@pytest.mark.parametrize(("name", "shape", "voxel_size", "anisotropic"), EXAMPLE_FILES)
def test_read_mrc_reads_files_written_by_other_programs(name, shape, voxel_size, anisotropic):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, got_voxel = read_mrc(EXAMPLES / name)
    assert data.shape == shape
    assert data.dtype == np.float32
    assert data.flags.c_contiguous
    assert np.all(np.isfinite(data)) and np.ptp(data) > 0
    if voxel_size is None:
        assert got_voxel is None
    else:
        assert isinstance(got_voxel, float)
        assert got_voxel == pytest.approx(voxel_size, rel=1e-6)
    messages = [str(w.message) for w in caught]
    assert any("anisotropic" in m for m in messages) == anisotropic, messages


@needs_examples
def test_read_mrc_returns_the_file_values_with_crystallographic_axes_put_in_zyx_order():
    # EMD-3001: sections are y, rows are x, columns are z, so stored[s, r, c] = volume[c, s, r].
    with mrcfile.open(EXAMPLES / "EMD-3001.map") as mrc:
        stored = np.array(mrc.data)
    with pytest.warns(RuntimeWarning, match="anisotropic"):
        data, _ = read_mrc(EXAMPLES / "EMD-3001.map")
    z, y, x = 7, 11, 19
    assert data[z, y, x] == stored[y, x, z]
    np.testing.assert_array_equal(data, np.moveaxis(stored, 2, 0))


@needs_examples
@pytest.mark.parametrize("compressed", ["EMD-3001.map.bz2", "emd_3001.map.gz"])
def test_compressed_copies_read_the_same_as_the_uncompressed_file(compressed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, plain_voxel = read_mrc(EXAMPLES / "EMD-3001.map")
        packed, packed_voxel = read_mrc(EXAMPLES / compressed)
    np.testing.assert_array_equal(packed, plain)
    assert packed_voxel == plain_voxel


@pytest.mark.parametrize("labels", list(itertools.permutations((1, 2, 3))))
def test_every_header_axis_order_reads_back_as_zyx(tmp_path, labels):
    # labels = (maps, mapr, mapc): which of x=1, y=2, z=3 runs along sections, rows, columns.
    rng = np.random.default_rng(0)
    volume = rng.standard_normal((4, 5, 6)).astype(np.float32)  # (z, y, x)
    axis_of = {3: 0, 2: 1, 1: 2}
    stored = np.ascontiguousarray(volume.transpose([axis_of[a] for a in labels]))
    path = tmp_path / "axes.mrc"
    with mrcfile.new(path, data=stored) as mrc:
        mrc.header.maps, mrc.header.mapr, mrc.header.mapc = labels
        mrc.voxel_size = 3.0
    data, voxel_size = read_mrc(path)
    np.testing.assert_array_equal(data, volume)
    assert voxel_size == 3.0


@pytest.mark.parametrize("shape", [(6, 7), (3, 6, 7), (1, 4, 5)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_write_read_round_trip_keeps_values_shape_and_voxel_size(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    array = (100 * rng.standard_normal(shape)).astype(dtype)
    path = write_mrc(tmp_path / "map.mrc", array, 2.73)
    data, voxel_size = read_mrc(path)
    assert data.shape == shape
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, array.astype(np.float32))
    assert voxel_size == 2.73


def test_write_mrc_accepts_jax_arrays_and_writes_header_statistics(tmp_path):
    import jax.numpy as jnp

    array = jnp.arange(24.0).reshape(2, 3, 4)
    write_mrc(tmp_path / "j.mrc", array, 1.5)
    with mrcfile.open(tmp_path / "j.mrc") as mrc:
        assert int(mrc.header.mode) == 2
        assert float(mrc.header.dmax) == 23.0 and float(mrc.header.dmin) == 0.0
    np.testing.assert_array_equal(read_mrc(tmp_path / "j.mrc")[0], np.asarray(array))


def test_voxel_size_none_is_written_as_zero_and_read_back_as_none(tmp_path):
    write_mrc(tmp_path / "novox.mrc", np.ones((3, 4, 5)), None)
    with mrcfile.open(tmp_path / "novox.mrc") as mrc:
        assert float(mrc.header.cella.x) == 0.0
    assert read_mrc(tmp_path / "novox.mrc")[1] is None


@pytest.mark.parametrize("suffix", [".mrc.gz", ".mrc.bz2"])
def test_compressed_names_are_written_compressed_and_read_back(tmp_path, suffix):
    array = np.random.default_rng(2).standard_normal((5, 6, 7))
    path = write_mrc(tmp_path / f"map{suffix}", array, 4.0)
    magic = {".mrc.gz": b"\x1f\x8b", ".mrc.bz2": b"BZh"}[suffix]
    assert path.read_bytes().startswith(magic)
    data, voxel_size = read_mrc(path)
    np.testing.assert_array_equal(data, array.astype(np.float32))
    assert voxel_size == 4.0


def test_write_mrc_creates_missing_parent_folders_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "map.mrc"
    write_mrc(path, np.zeros((2, 3)), 1.0)
    assert _files_in(path.parent) == {"map.mrc"}


def test_written_files_get_the_usual_permissions_not_the_private_temporary_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_mrc(tmp_path / "map.mrc", np.zeros((2, 3)), 1.0)
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failing_mrc_write_leaves_the_old_file_intact_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_mrc(tmp_path / "map.mrc", np.ones((3, 4)), 1.0)
    before = path.read_bytes()

    def half_written_then_crash(name, **kwargs):
        Path(name).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(_mrc.mrcfile, "new", half_written_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_mrc(path, np.zeros((3, 4)), 2.0)
    assert path.read_bytes() == before
    assert _files_in(tmp_path) == {"map.mrc"}


def test_failing_array_conversion_leaves_the_old_file_intact(tmp_path):
    path = write_mrc(tmp_path / "map.mrc", np.ones((3, 4)), 1.0)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="numeric"):
        write_mrc(path, np.array([["a", "b"], ["c", "d"]]), 1.0)
    with pytest.raises(ValueError, match="cannot turn the data into an array"):
        write_mrc(path, [[1.0, 2.0], [3.0]], 1.0)
    assert path.read_bytes() == before
    assert _files_in(tmp_path) == {"map.mrc"}


def test_atomic_write_removes_its_temporary_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def crash(tmp: Path):
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new but incomplete")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert _files_in(tmp_path) == {"out.txt"}


def test_atomic_write_refuses_a_folder_as_destination(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        atomic_write(tmp_path, lambda tmp: tmp.write_text("x"))


@pytest.mark.parametrize(
    ("array", "voxel_size", "message"),
    [
        (np.zeros(5), 1.0, "2D"),
        (np.zeros((2, 2, 2, 2)), 1.0, "2D"),
        (np.zeros((0, 3)), 1.0, "empty"),
        (np.zeros((2, 3), dtype=np.complex64), 1.0, "real-valued"),
        (np.array([[1.0, np.nan], [np.inf, 0.0]]), 1.0, "2 values"),
        (np.array([[1e39, 0.0]]), 1.0, "float32 range"),
        (np.zeros((2, 3)), 0.0, "positive"),
        (np.zeros((2, 3)), -1.0, "positive"),
        (np.zeros((2, 3)), float("nan"), "positive"),
    ],
)
def test_write_mrc_rejects_bad_input_with_a_clear_message(tmp_path, array, voxel_size, message):
    with pytest.raises(ValueError, match=message):
        write_mrc(tmp_path / "bad.mrc", array, voxel_size)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16])
def test_label_maps_are_written_as_integers_and_read_back_exactly(tmp_path, dtype):
    info = np.iinfo(dtype)
    labels = np.array([[[info.min, 0], [1, info.max]]], dtype=np.int64)
    write_mrc(tmp_path / "labels.mrc", labels, 10.0, dtype=dtype)
    with mrcfile.open(tmp_path / "labels.mrc") as mrc:
        assert mrc.data.dtype == dtype
    np.testing.assert_array_equal(read_mrc(tmp_path / "labels.mrc")[0], labels)


@pytest.mark.parametrize(
    "array, dtype, message",
    [
        (np.array([[0.5, 1.0]]), np.int8, "not integers"),
        (np.array([[0, 300]]), np.int8, r"\[-128, 127\]"),
        (np.array([[-1, 3]]), np.uint16, r"\[0, 65535\]"),
        (np.array([[1, 2]]), np.float64, "float32, int8, int16 or uint16"),
    ],
)
def test_integer_mrc_output_refuses_values_that_do_not_fit(tmp_path, array, dtype, message):
    with pytest.raises(ValueError, match=message):
        write_mrc(tmp_path / "bad.mrc", array, 10.0, dtype=dtype)


def test_the_same_data_gives_the_same_bytes(tmp_path):
    # mrcfile's default header label holds the time of writing; ours does not.
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    a = write_mrc(tmp_path / "a.mrc", data, 10.0).read_bytes()
    b = write_mrc(tmp_path / "b.mrc", data, 10.0).read_bytes()
    assert a == b


def test_read_mrc_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.mrc"
    with pytest.raises(FileNotFoundError, match="nowhere.mrc"):
        read_mrc(path)


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not a map\n" * 50, b"\0" * 2000, b"MRC"],
    ids=["text", "zeros", "tiny"],
)
def test_read_mrc_refuses_files_that_are_not_mrc(tmp_path, content):
    path = tmp_path / "fake.mrc"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"fake\.mrc is not a readable MRC file: "):
        read_mrc(path)


def test_read_mrc_refuses_a_truncated_file(tmp_path):
    path = write_mrc(tmp_path / "full.mrc", np.ones((4, 5, 6)), 1.0)
    truncated = tmp_path / "cut.mrc"
    truncated.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="is not a readable MRC file"):
        read_mrc(truncated)


def test_read_mrc_refuses_a_folder(tmp_path):
    with pytest.raises(ValueError, match="is not a readable MRC file"):
        read_mrc(tmp_path)


def test_read_mrc_reads_a_file_without_map_id_in_permissive_mode_with_a_warning(tmp_path):
    array = np.random.default_rng(3).standard_normal((3, 4, 5)).astype(np.float32)
    path = write_mrc(tmp_path / "old.mrc", array, 2.0)
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"\0\0\0\0"  # the MAP identifier, absent from pre-2000 files
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="permissive"):
        data, voxel_size = read_mrc(path)
    np.testing.assert_array_equal(data, array)
    assert voxel_size == 2.0


def test_read_mrc_refuses_complex_data(tmp_path):
    path = tmp_path / "complex.mrc"
    with mrcfile.new(path, data=np.ones((3, 4), dtype=np.complex64)):
        pass
    with pytest.raises(ValueError, match="complex"):
        read_mrc(path)


def test_read_mrc_counts_non_finite_values_unless_told_not_to_check(tmp_path):
    path = tmp_path / "nan.mrc"
    array = np.zeros((3, 4, 5), dtype=np.float32)
    array[0, 0, 0] = np.nan
    array[1, 2, 3] = np.inf
    array[2, 3, 4] = -np.inf
    with pytest.warns(RuntimeWarning, match="NaN"), mrcfile.new(path, data=array):
        pass
    with pytest.raises(ValueError, match="3 non-finite values"):
        read_mrc(path)
    data, _ = read_mrc(path, check_finite=False)
    assert np.count_nonzero(~np.isfinite(data)) == 3


def test_anisotropic_voxel_size_warns_and_returns_x(tmp_path):
    path = tmp_path / "aniso.mrc"
    with mrcfile.new(path, data=np.zeros((3, 4, 5), dtype=np.float32)) as mrc:
        mrc.voxel_size = (2.0, 3.0, 4.0)
    with pytest.warns(RuntimeWarning, match="anisotropic"):
        _, voxel_size = read_mrc(path)
    assert voxel_size == 2.0


def test_image_stack_with_unset_z_cell_is_not_called_anisotropic(tmp_path):
    path = tmp_path / "stack.mrc"
    with mrcfile.new(path, data=np.zeros((3, 4, 5), dtype=np.float32)) as mrc:
        mrc.set_image_stack()
        mrc.voxel_size = (2.5, 2.5, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, voxel_size = read_mrc(path)
    assert voxel_size == 2.5


# Tilt-angle files


def test_tilt_angles_round_trip_exactly(tmp_path):
    random_angles = np.random.default_rng(4).uniform(-70, 70, 7)
    angles = np.concatenate([np.arange(-60.0, 61.0, 3.0), random_angles])
    path = write_tilt_angles(tmp_path / "ts.tlt", angles)
    back = read_tilt_angles(path)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, angles)
    assert _files_in(tmp_path) == {"ts.tlt"}


def test_tilt_angles_from_float32_and_int_read_back_to_the_same_values(tmp_path):
    f32 = np.array([-59.7, 0.1, 41.3], dtype=np.float32)
    write_tilt_angles(tmp_path / "f.tlt", f32)
    np.testing.assert_array_equal(read_tilt_angles(tmp_path / "f.tlt").astype(np.float32), f32)
    write_tilt_angles(tmp_path / "i.tlt", [-3, 0, 3])
    np.testing.assert_array_equal(read_tilt_angles(tmp_path / "i.tlt"), [-3.0, 0.0, 3.0])


def test_read_tilt_angles_accepts_imod_layout_with_blank_lines(tmp_path):
    path = tmp_path / "imod.tlt"
    path.write_text("  -60.00\n  -57.00\n\n   \n   -0.02\n   57.00\n   60.00\n\n")
    np.testing.assert_array_equal(read_tilt_angles(path), [-60.0, -57.0, -0.02, 57.0, 60.0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-60\n-57\nabc\n", "line 3: 'abc' is not a number"),
        ("-60\n\n-57 -54\n", "line 3: '-57 -54' is not a number"),
        ("", "holds no tilt angles"),
        ("\n  \n\n", "holds no tilt angles"),
        ("-60\nnan\n", "line 2: tilt angle 'nan' is not finite"),
        ("inf\n", "line 1: tilt angle 'inf' is not finite"),
    ],
)
def test_read_tilt_angles_rejects_bad_files_with_the_line_number(tmp_path, text, message):
    path = tmp_path / "bad.tlt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_tilt_angles(path)


def test_read_tilt_angles_refuses_binary_and_missing_files(tmp_path):
    binary = tmp_path / "binary.tlt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="not a readable tilt angle text file"):
        read_tilt_angles(binary)
    with pytest.raises(FileNotFoundError, match="missing.tlt"):
        read_tilt_angles(tmp_path / "missing.tlt")


@pytest.mark.parametrize(
    ("angles", "message"),
    [
        ([], "non-empty 1D"),
        ([[1.0, 2.0]], "non-empty 1D"),
        (5.0, "non-empty 1D"),
        ([1.0, float("nan")], "finite"),
        (["a", "b"], "real numbers"),
        ([1j], "real numbers"),
    ],
)
def test_write_tilt_angles_rejects_bad_input(tmp_path, angles, message):
    with pytest.raises(ValueError, match=message):
        write_tilt_angles(tmp_path / "bad.tlt", angles)
    assert not any(tmp_path.iterdir())


# Output-not-input guard


def test_check_output_not_input_refuses_the_same_file_however_it_is_spelled(tmp_path):
    src = tmp_path / "in.mrc"
    src.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.mrc"
    link.symlink_to(src)
    hard = tmp_path / "hard.mrc"
    os.link(src, hard)
    for same in [src, tmp_path / "sub" / ".." / "in.mrc", link, hard, str(src)]:
        with pytest.raises(ValueError, match="same file as input"):
            check_output_not_input(same, tmp_path / "other.mrc", src)


def test_check_output_not_input_allows_new_and_distinct_files(tmp_path):
    src = tmp_path / "in.mrc"
    src.write_bytes(b"x")
    copy = tmp_path / "copy.mrc"
    shutil.copy(src, copy)
    check_output_not_input(copy, src)
    check_output_not_input(tmp_path / "new.mrc", src, tmp_path / "angles.tlt")
    check_output_not_input(tmp_path / "new.mrc")
