"""The `cryojax-mw` command end to end on small cases, and its answers to bad input."""

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from cryojax_mw import io
from cryojax_mw.cli import main


def run(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


SIMULATE = "simulate --shape 24 6 32 --tilt-range -60 60 --tilt-step 4 --snr 10 --seed 3".split()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    main([*SIMULATE, "--out", str(out)])
    return out


def test_simulate_writes_a_consistent_dataset(simulated):
    truth, voxel = io.read_mrc(simulated / "ground_truth.mrc")
    series, _ = io.read_mrc(simulated / "tilt_series.mrc")
    angles = io.read_tilt_angles(simulated / "angles.tlt")
    assert truth.shape == (24, 6, 32) and voxel == pytest.approx(10.0)
    assert series.shape == (31, 6, 32) and len(angles) == 31
    assert angles[0] == -60 and angles[-1] == 60
    assert (simulated / "overview.png").stat().st_size > 1000
    params = json.loads((simulated / "simulation.json").read_text())
    assert params["seed"] == 3 and params["n_tilts"] == 31


def test_simulate_is_deterministic_by_seed(simulated, tmp_path):
    main([*SIMULATE, "--out", str(tmp_path)])
    a = (simulated / "tilt_series.mrc").read_bytes()
    assert a == (tmp_path / "tilt_series.mrc").read_bytes()


@pytest.mark.parametrize("method", ["wbp", "sirt", "cgls", "tv"])
def test_reconstruct_end_to_end_recovers_the_phantom(simulated, tmp_path, capsys, method):
    out = tmp_path / f"{method}.mrc"
    code, stdout, _ = run(
        [
            "reconstruct",
            "--tilt-series",
            str(simulated / "tilt_series.mrc"),
            "--angles",
            str(simulated / "angles.tlt"),
            "--thickness",
            "24",
            "--method",
            method,
            "--iterations",
            "20",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, stdout
    volume, voxel = io.read_mrc(out)
    truth, _ = io.read_mrc(simulated / "ground_truth.mrc")
    assert volume.shape == truth.shape and voxel == pytest.approx(10.0)
    corr = np.corrcoef(volume.ravel(), truth.ravel())[0, 1]
    assert corr > 0.5, corr
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["method"] == method and len(record["residuals"]) == (1 if method == "wbp" else 20)
    assert out.with_suffix(".png").exists()


def test_fsc_command_prints_resolutions_and_writes_curve(simulated, tmp_path, capsys):
    truth = simulated / "ground_truth.mrc"
    code, stdout, _ = run(
        ["fsc", str(truth), str(truth), "--out", str(tmp_path / "fsc.json")], capsys
    )
    assert code == 0
    assert "0.143" in stdout and "Å" in stdout
    curve = json.loads((tmp_path / "fsc.json").read_text())
    assert np.allclose(curve["fsc"], 1.0, atol=1e-5)


def _bad(args, capsys, expected):
    code, _, err = run(args, capsys)
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("angles", "expected"),
    [
        (np.linspace(-60, 60, 7), "31 images but 7 tilt angles"),
        (np.linspace(-90, 90, 31), "between -90 and 90"),
    ],
    ids=["angle-count-not-matching", "angles-outside-the-open-range"],
)
def test_bad_tilt_angles(simulated, tmp_path, capsys, angles, expected):
    tlt = tmp_path / "bad.tlt"
    io.write_tilt_angles(tlt, angles)
    series = str(simulated / "tilt_series.mrc")
    out = str(tmp_path / "x.mrc")
    _bad(
        ["reconstruct", "--tilt-series", series, "--angles", str(tlt), "--out", out],
        capsys,
        expected,
    )


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_non_finite_tilt_series(tmp_path, capsys):
    data = np.ones((5, 4, 8), np.float32)
    data[2, 1, 3] = np.nan
    path = tmp_path / "nan.mrc"
    with mrcfile.new(path) as mrc:  # the project's writer refuses NaN, other programs may not
        mrc.set_data(data)
    _bad(
        [
            "reconstruct",
            "--tilt-series",
            str(path),
            "--tilt-range",
            "-8",
            "8",
            "--tilt-step",
            "4",
            "--out",
            str(tmp_path / "x.mrc"),
        ],
        capsys,
        "NaN",
    )


def test_unreadable_file(tmp_path, capsys):
    junk = tmp_path / "junk.mrc"
    junk.write_text("not a map")
    _bad(
        [
            "reconstruct",
            "--tilt-series",
            str(junk),
            "--tilt-range",
            "-8",
            "8",
            "--out",
            str(tmp_path / "x.mrc"),
        ],
        capsys,
        "junk.mrc",
    )
    _bad(["fsc", str(tmp_path / "missing.mrc"), str(junk)], capsys, "missing.mrc")


def test_output_equal_to_input_is_refused_and_input_kept(simulated, capsys):
    series = simulated / "tilt_series.mrc"
    before = series.read_bytes()
    _bad(
        [
            "reconstruct",
            "--tilt-series",
            str(series),
            "--angles",
            str(simulated / "angles.tlt"),
            "--out",
            str(series),
        ],
        capsys,
        "input",
    )
    assert series.read_bytes() == before


def test_wrong_shape_between_maps(simulated, tmp_path, capsys):
    other = tmp_path / "other.mrc"
    io.write_mrc(other, np.zeros((4, 4, 4), np.float32), 10.0)
    _bad(["fsc", str(simulated / "ground_truth.mrc"), str(other)], capsys, "differ in shape")


def test_missing_angles_explains_the_options(simulated, tmp_path, capsys):
    _bad(
        [
            "reconstruct",
            "--tilt-series",
            str(simulated / "tilt_series.mrc"),
            "--out",
            str(tmp_path / "x.mrc"),
        ],
        capsys,
        "--angles",
    )


def test_help_teaches_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "cryojax_mw.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for word in ("simulate", "reconstruct", "fsc", "demo", "(z, y, x)", "degrees"):
        assert word in out
    sub = subprocess.run(
        [sys.executable, "-m", "cryojax_mw.cli", "reconstruct", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--method" in sub and "tv" in sub and "--thickness" in sub
