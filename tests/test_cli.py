"""The `cryojax-mw` command end to end on small cases, and its answers to bad input."""

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from cryojax_mw import io, metrics
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


def _help(*command: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "cryojax_mw.cli", *command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_help_teaches_every_command():
    out = _help()
    for word in (
        "simulate",
        "simulate-dataset",
        "reconstruct",
        "fsc",
        "demo",
        "(z, y, x)",
        "degrees",
    ):
        assert word in out
    sub = _help("reconstruct")
    assert "--method" in sub and "tv" in sub and "--thickness" in sub and "--phase-flip" in sub
    sub = _help("simulate-dataset")
    assert "--list-classes" in sub and "rlnCoordinateX" in sub and "Example" in sub


DATASET = (
    "simulate-dataset --n-tomograms 1 --shape 32 64 64 --classes 1bxn,3qm1 --n-particles 5 "
    "--vesicles 0 --decoys 2 --tilt-step 6 --seed 2"
).split()


def test_simulate_dataset_writes_a_dataset_and_tells_where(tmp_path, capsys):
    code, stdout, _ = run([*DATASET, "--out", str(tmp_path), "--ctf"], capsys)
    assert code == 0 and "1 tomogram(s) with 5 particles of 2 classes" in stdout
    params = json.loads((tmp_path / "parameters.json").read_text())
    assert params["config"]["defocus"] == 3.0 and params["config"]["classes"] == ["1bxn", "3qm1"]
    particles = io.read_particles(tmp_path / "tomo_000_particles.star")
    assert len(particles) == 5 and particles.class_names == ("1bxn", "3qm1")
    labels, voxel = io.read_mrc(tmp_path / "tomo_000_labels.mrc")
    assert labels.shape == (32, 64, 64) and voxel == 10.0
    assert (tmp_path / "tomo_000_overview.png").stat().st_size > 1000


def test_simulate_dataset_lists_classes(capsys):
    code, stdout, _ = run(["simulate-dataset", "--list-classes"], capsys)
    assert code == 0 and "4v4r" in stdout.split() and "1bxn" in stdout.split()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--classes", "1bxn,ribosome"], "unknown class 'ribosome'"),
        (["--n-particles", "500"], "could not fit"),
        (["--shape", "16", "64", "64"], "does not fit"),
        (["--occupancy", "0.9"], "cannot be reached"),
    ],
)
def test_simulate_dataset_bad_input_says_what_to_change(tmp_path, capsys, extra, message):
    args = (
        [a for a in DATASET if a not in ("--n-particles", "5")]
        if "--occupancy" in extra
        else DATASET
    )
    code, _, stderr = run([*args, *extra, "--out", str(tmp_path / "out")], capsys)
    # Progress bars may come first; the answer is one last line.
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and message in last and last.startswith("error:")
    assert "Traceback" not in stderr


def test_simulate_dataset_refuses_a_template_that_is_not_a_density_map(tmp_path, capsys):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "junk.mrc").write_bytes(b"not an mrc file at all" * 100)
    code, _, stderr = run(
        [
            *DATASET,
            "--templates",
            str(tmp_path / "maps"),
            "--classes",
            "junk",
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 2 and "junk.mrc is not a readable MRC file" in stderr


def test_phase_flipping_undoes_the_simulated_ctf(tmp_path, capsys):
    """Between the CTF's first and second zeros (8 um underfocus, 300 kV: 1/39.7 and 1/28.1 per
    Angstrom) the CTF is negative: there the unflipped tomogram anti-correlates with its truth and
    the phase-flipped one correlates."""
    code, _, _ = run(
        [*DATASET, "--out", str(tmp_path), "--ctf", "--defocus", "8", "--snr", "5"], capsys
    )
    assert code == 0
    truth, _ = io.read_mrc(tmp_path / "tomo_000_ground_truth.mrc")
    band_fsc = {}
    for flip in ([], ["--phase-flip", "8"]):
        out = tmp_path / f"rec{len(flip)}.mrc"
        args = ["reconstruct", "--tilt-series", str(tmp_path / "tomo_000_tilt_series.mrc"),
                "--angles", str(tmp_path / "tomo_000_tilt_series.tlt"), "--thickness", "32",
                "--filter", "hann", "--out", str(out), *flip]  # fmt: skip
        assert run(args, capsys)[0] == 0
        volume, _ = io.read_mrc(out)
        result = metrics.fsc(volume, truth, voxel_size=10.0)
        f = np.asarray(result.frequency)
        band = (f > 1 / 37.0) & (f < 1 / 30.0)
        band_fsc[bool(flip)] = float(np.mean(np.asarray(result.fsc)[band]))
    assert band_fsc[False] < -0.1 and band_fsc[True] > 0.1
    assert json.loads((tmp_path / "rec2.json").read_text())["phase_flip_defocus_um"] == 8.0


def test_phase_flip_needs_images_and_a_pixel_size(simulated, tmp_path, capsys):
    code, _, stderr = run(
        ["reconstruct", "--tilt-series", str(simulated / "tilt_series.mrc"), "--angles",
         str(simulated / "angles.tlt"), "--phase-flip", "3", "--out", str(tmp_path / "r.mrc")],
        capsys,
    )  # fmt: skip
    assert code == 0  # the simulate command writes a voxel size
    io.write_mrc(tmp_path / "nopix.mrc", io.read_mrc(simulated / "tilt_series.mrc")[0], None)
    code, _, stderr = run(
        ["reconstruct", "--tilt-series", str(tmp_path / "nopix.mrc"), "--angles",
         str(simulated / "angles.tlt"), "--phase-flip", "3", "--out", str(tmp_path / "r2.mrc")],
        capsys,
    )  # fmt: skip
    assert code == 2 and "give --voxel-size" in stderr


@pytest.fixture(scope="module")
def wedge_tomogram(simulated, tmp_path_factory):
    """A small WBP tomogram of the simulated phantom: it carries a missing wedge."""
    out = tmp_path_factory.mktemp("wedge") / "wbp.mrc"
    main(["reconstruct", "--tilt-series", str(simulated / "tilt_series.mrc"), "--angles",
          str(simulated / "angles.tlt"), "--thickness", "24", "--filter", "hann",
          "--out", str(out)])  # fmt: skip
    return out


SHORT_RUN = ["--chains", "2", "--samples", "8", "--burn-in", "4"]


@pytest.mark.parametrize("sampler", ["mwr", "myula"])
def test_restore_writes_the_posterior_summary(wedge_tomogram, tmp_path, capsys, sampler):
    code, stdout, _ = run(
        ["restore", "--tomogram", str(wedge_tomogram), "--tilt-range", "-60", "60",
         "--sampler", sampler, *SHORT_RUN, "--out", str(tmp_path)],
        capsys,
    )  # fmt: skip
    assert code == 0 and "R-hat" in stdout
    mean, voxel = io.read_mrc(tmp_path / "mean.mrc")
    std, _ = io.read_mrc(tmp_path / "std.mrc")
    low, _ = io.read_mrc(tmp_path / "ci_low.mrc")
    high, _ = io.read_mrc(tmp_path / "ci_high.mrc")
    data, _ = io.read_mrc(wedge_tomogram)
    assert mean.shape == data.shape and voxel == pytest.approx(10.0)
    assert np.all(std >= 0) and np.all(low <= high)
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["sampler"] == sampler and report["chains"] == 2 and report["kept_per_chain"] == 8
    assert "voxel_rhat_max" in report["diagnostics"]
    assert (tmp_path / "most_visited.mrc").exists() == (sampler == "mwr")
    assert (tmp_path / "posterior.png").stat().st_size > 1000
    assert not (tmp_path / "checkpoint.npz").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "tilt range"),
        (["--tilt-range", "-60", "60", "--chains", "0"], "--chains"),
        (["--tilt-range", "-60", "60", "--samples", "2"], "--samples"),
        (["--tilt-range", "-60", "60", "--beta", "0"], "--beta must be > 0"),
    ],
)
def test_restore_bad_input(wedge_tomogram, tmp_path, capsys, extra, message):
    code, _, stderr = run(
        ["restore", "--tomogram", str(wedge_tomogram), *extra, "--out", str(tmp_path)], capsys
    )
    assert code == 2 and message in stderr and "Traceback" not in stderr


def test_sample_tilt_series_writes_the_posterior_summary(simulated, tmp_path, capsys):
    code, stdout, _ = run(
        ["sample-tilt-series", "--tilt-series", str(simulated / "tilt_series.mrc"), "--angles",
         str(simulated / "angles.tlt"), "--thickness", "24", *SHORT_RUN, "--out", str(tmp_path)],
        capsys,
    )  # fmt: skip
    assert code == 0 and "24x6x32" in stdout
    mean, _ = io.read_mrc(tmp_path / "mean.mrc")
    truth, _ = io.read_mrc(simulated / "ground_truth.mrc")
    assert mean.shape == truth.shape
    assert np.corrcoef(mean.ravel(), truth.ravel())[0, 1] > 0.5
    report = json.loads((tmp_path / "diagnostics.json").read_text())
    assert report["parameters"]["noise_sigma"] > 0
