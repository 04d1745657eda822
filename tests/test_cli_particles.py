"""The particle-finding commands end to end: localize (segmentation -> particle list) and evaluate
(particle list against the truth)."""

import json

import numpy as np
import pytest

from cryojax_mw import io
from cryojax_mw.cli import main
from cryojax_mw.simulate import SimulationConfig, write_dataset

# Compact templates only: a hollow one (4v94) falls apart into several clusters.
CLASSES = ("1bxn", "3qm1", "2cg9")


def run(args, capsys):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    config = SimulationConfig(
        shape=(40, 80, 80), classes=CLASSES, n_particles=12, occupancy=None, n_vesicles=0,
        n_gold=0, n_decoys=0,
    )  # fmt: skip
    return write_dataset(tmp_path_factory.mktemp("data"), config, 1, seed=2, progress=False)


@pytest.mark.parametrize(
    ("method", "bandwidth"),
    [
        ("components", ["5"]),
        ("mean-shift", ["5"]),
        ("mean-shift", ["1bxn=5", "3qm1=2.5", "2cg9=4.5"]),
    ],
)
def test_true_labels_localize_to_the_true_particles(dataset, tmp_path, capsys, method, bandwidth):
    # One mean-shift bandwidth is the largest class's radius (1bxn: 497 voxels, a 4.9-voxel
    # ball); at 3 voxels it splits particles (F1 0.65), at 4 one of the 12 (0.96). Per class,
    # each class gets its own equivalent-ball radius (3qm1: about 53 voxels, 2.3; 2cg9: about
    # 360 voxels, 4.4), and at 2.5 the small 3qm1 particles stay whole.
    out = tmp_path / "found.star"
    radii = [a for r in bandwidth for a in ("--bandwidth", r)]
    code, stdout, err = run(
        ["localize", "--segmentation", dataset / "tomo_000_labels.mrc", "--out", out,
         "--method", method, *radii, "--classes", ",".join(CLASSES)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    found, truth = io.read_particles(out), io.read_particles(dataset / "tomo_000_particles.star")
    assert found.class_names == truth.class_names == CLASSES
    assert f"{len(found)} particles" in stdout

    scores = tmp_path / "scores.json"
    code, stdout, err = run(
        ["evaluate", "--predicted", out, "--truth", dataset / "tomo_000_particles.star",
         "--distance", 3, "--out", scores],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(scores.read_text())
    # Every particle's label blob sits around its listed centre (the centre of mass of its
    # shape), so each is found once, in its class, within 3 voxels.
    assert result["localization"]["f1"] == 1.0
    assert result["classification"]["f1"] == 1.0
    assert "precision" in stdout and "false_positive" in stdout


def test_evaluate_counts_a_moved_and_a_missing_particle(dataset, tmp_path, capsys):
    truth = io.read_particles(dataset / "tomo_000_particles.star")
    positions = truth.positions.copy()
    positions[0] += 10.0  # out of reach: one false positive and one miss
    moved = io.ParticleList(
        class_names=truth.class_names, class_ids=truth.class_ids[:-1],
        positions=positions[:-1], angles_deg=truth.angles_deg[:-1],
        voxel_size=truth.voxel_size, tomo_name=truth.tomo_name,
    )  # fmt: skip
    pred = io.write_particles_csv(tmp_path / "pred.csv", moved)
    scores = tmp_path / "scores.json"
    code, _, err = run(
        ["evaluate", "--predicted", pred, "--truth", dataset / "tomo_000_particles.star",
         "--distance", 3, "--out", scores], capsys,
    )  # fmt: skip
    assert code == 0, err
    loc = json.loads(scores.read_text())["localization"]
    n = len(truth)
    assert (loc["tp"], loc["fp"], loc["fn"]) == (n - 2, 1, 2)
    assert loc["f1"] == pytest.approx(2 * (n - 2) / (2 * (n - 2) + 3))


def test_segment_folder_input_and_scores(dataset, tmp_path, capsys):
    # A `segment` output folder: labels, the max probability as scores, and the class names.
    seg = tmp_path / "seg"
    seg.mkdir()
    labels, voxel = io.read_mrc(dataset / "tomo_000_labels.mrc")
    labels = np.where(labels <= len(CLASSES), labels, 0)
    io.write_mrc(seg / "labels.mrc", labels, voxel, dtype=np.int8)
    io.write_mrc(seg / "max_probability.mrc", np.full(labels.shape, 0.75, np.float32), voxel)
    (seg / "segmentation.json").write_text(json.dumps({"class_names": list(CLASSES)}))
    out = tmp_path / "found.csv"
    code, _, err = run(
        ["localize", "--segmentation", seg, "--out", out, "--method", "components"], capsys
    )
    assert code == 0, err
    assert len(io.read_particles(out)) == len(io.read_particles(dataset / "tomo_000_particles.star"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distance", "0"], "--distance must be > 0"),
        (["--distance", "3", "--out", "TRUTH"], "input"),
    ],
)
def test_evaluate_bad_input_is_one_error_line(dataset, capsys, args, message):
    truth = dataset / "tomo_000_particles.star"
    args = [str(truth) if a == "TRUTH" else a for a in args]
    code, _, err = run(["evaluate", "--predicted", truth, "--truth", truth, *args], capsys)
    assert code == 2
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_localize_bad_input_is_one_error_line(dataset, tmp_path, capsys):
    labels = dataset / "tomo_000_labels.mrc"
    cases = [
        (["--out", tmp_path / "p.txt"], ".star or .csv"),
        (["--out", tmp_path / "p.star", "--classes", "ribosome"], "ribosome"),
        (["--out", tmp_path / "p.star", "--class-names", "a"], "only 1 class names"),
        (["--out", tmp_path / "p.star", "--min-size", "1bxn=x"], "NAME=N"),
        (["--out", tmp_path / "p.star", "--bandwidth", "wide"], "R or NAME=R"),
        (["--out", tmp_path / "p.star", "--bandwidth", "1bxn=5"], "missing ['3qm1', '2cg9']"),
        (["--out", tmp_path / "p.star", "--bandwidth", "ribosome=5"], "'ribosome'"),
        (["--out", tmp_path / "p.star", "--bandwidth", "0"], "positive"),
    ]
    for args, message in cases:
        code, _, err = run(["localize", "--segmentation", labels, *args], capsys)
        assert code == 2 and message in err, (args, err)
    lone = tmp_path / "lone.mrc"
    io.write_mrc(lone, np.zeros((8, 8, 8), np.float32), 10.0)
    code, _, err = run(["localize", "--segmentation", lone, "--out", tmp_path / "q.star"], capsys)
    assert code == 2 and "--class-names" in err


def test_localize_refuses_class_names_that_do_not_match_the_model(dataset, tmp_path, capsys):
    # A `segment` folder of a 6-class model whose map only uses labels 1..3: three names would
    # pass the label check yet misname the model's classes, seven would invent one.
    seg = tmp_path / "seg"
    seg.mkdir()
    labels, voxel = io.read_mrc(dataset / "tomo_000_labels.mrc")
    assert labels.max() <= len(CLASSES)
    io.write_mrc(seg / "labels.mrc", labels, voxel, dtype=np.int8)
    model_names = [*CLASSES, "membrane", "gold", "decoy"]
    (seg / "segmentation.json").write_text(json.dumps({"class_names": model_names}))
    for names in (CLASSES, [*model_names, "extra"]):
        code, _, err = run(["localize", "--segmentation", seg, "--out", tmp_path / "p.star",
                            "--class-names", ",".join(names)], capsys)  # fmt: skip
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
        assert f"gives {len(names)} names" in err and "has 6 classes" in err
    renamed = [n.upper() for n in model_names]
    code, _, err = run(["localize", "--segmentation", seg, "--out", tmp_path / "p.star",
                        "--class-names", ",".join(renamed), "--classes", "1BXN"], capsys)  # fmt: skip
    assert code == 0, err
    assert io.read_particles(tmp_path / "p.star").class_names == ("1BXN",)


def _empty_like(particles: io.ParticleList) -> io.ParticleList:
    return io.ParticleList(
        class_names=particles.class_names, class_ids=np.zeros(0, np.int64),
        positions=np.zeros((0, 3)), angles_deg=np.zeros((0, 3)),
        voxel_size=particles.voxel_size, tomo_name=particles.tomo_name,
    )  # fmt: skip


def test_evaluate_empty_lists_give_the_documented_scores(dataset, tmp_path, capsys):
    # Nothing found: recall 0, precision undefined (null in JSON); nothing to find: the reverse.
    truth_path = dataset / "tomo_000_particles.star"
    truth = io.read_particles(truth_path)
    empty = io.write_particles_star(tmp_path / "empty.star", _empty_like(truth))
    for predicted, true, defined, undefined in (
        (empty, truth_path, "recall", "precision"),
        (truth_path, empty, "precision", "recall"),
    ):
        out = tmp_path / "scores.json"
        code, stdout, err = run(["evaluate", "--predicted", predicted, "--truth", true,
                                 "--distance", 3, "--out", out], capsys)  # fmt: skip
        assert code == 0, err
        loc = json.loads(out.read_text())["localization"]
        assert loc[defined] == 0.0 and loc[undefined] is None and loc["f1"] == 0.0
        out.unlink()


def test_evaluate_refuses_lists_with_other_class_names(dataset, tmp_path, capsys):
    truth_path = dataset / "tomo_000_particles.star"
    truth = io.read_particles(truth_path)
    other = io.ParticleList(
        class_names=truth.class_names[::-1], class_ids=truth.class_ids,
        positions=truth.positions, angles_deg=truth.angles_deg,
        voxel_size=truth.voxel_size, tomo_name=truth.tomo_name,
    )  # fmt: skip
    other_path = io.write_particles_star(tmp_path / "other.star", other)
    code, _, err = run(["evaluate", "--predicted", other_path, "--truth", truth_path,
                        "--distance", 3], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert "same class names" in err


def test_train_segmenter_refuses_a_patch_size_pooling_cannot_halve(dataset, tmp_path, capsys):
    code, _, err = run(["train-segmenter", "--dataset", dataset, "--out", tmp_path / "m",
                        "--patch-size", 18, "--widths", "4,6,8"], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error:") and "multiple of 4" in err
    assert not (tmp_path / "m" / "checkpoint.json").exists()


def test_train_segment_localize_evaluate_chain_and_its_bad_input(dataset, tmp_path, capsys):
    # A tiny network for a few steps: the commands' plumbing, not the network's accuracy (that is
    # benchmarks/bench_segmentation.py's job).
    model = tmp_path / "model"
    code, out, err = run(
        ["train-segmenter", "--dataset", dataset, "--out", model, "--steps", 2,
         "--batch-size", 2, "--patch-size", 16, "--widths", "4,6,8", "--validate-every", 1,
         "--lr-schedule", "constant-then-decay"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "trained 2 steps" in out and (model / "history.png").exists()
    saved = json.loads((model / "checkpoint.json").read_text())["config"]
    assert saved["learning_rate_schedule"] == "constant-then-decay"
    seg = tmp_path / "seg"
    tomogram = dataset / "tomo_000_tomogram.mrc"
    code, _, err = run(["segment", "--model", model, "--tomogram", tomogram, "--out", seg], capsys)
    assert code == 0, err
    meta = json.loads((seg / "segmentation.json").read_text())
    assert meta["class_names"] == [*CLASSES, "membrane", "gold", "decoy"]
    labels, _ = io.read_mrc(seg / "labels.mrc")
    assert labels.shape == io.read_mrc(tomogram)[0].shape and labels.max() <= len(CLASSES) + 3
    found = tmp_path / "found.star"
    code, _, err = run(["localize", "--segmentation", seg, "--out", found], capsys)
    assert code == 0, err
    assert io.read_particles(found).class_names == CLASSES  # membrane, gold, decoy not picked
    code, _, err = run(["evaluate", "--predicted", found, "--truth",
                        dataset / "tomo_000_particles.star", "--distance", 3], capsys)  # fmt: skip
    assert code == 0, err

    # A tomogram at another voxel size, and a model folder without a checkpoint.
    other = tmp_path / "other.mrc"
    io.write_mrc(other, io.read_mrc(tomogram)[0], 13.0)
    code, _, err = run(["segment", "--model", model, "--tomogram", other, "--out", seg], capsys)
    assert code == 2 and "10 Å per voxel" in err and "13" in err
    code, _, err = run(["segment", "--model", model, "--tomogram", tomogram, "--out", seg,
                        "--patch-size", 18], capsys)  # fmt: skip
    assert code == 2 and "multiple of 4" in err
    # A tomogram thinner than a window is padded and says so; the labels keep its shape.
    thin = tmp_path / "thin.mrc"
    io.write_mrc(thin, io.read_mrc(tomogram)[0][:8], 10.0)
    with pytest.warns(UserWarning, match="padded by reflection"):
        code, _, err = run(["segment", "--model", model, "--tomogram", thin, "--out",
                            tmp_path / "thin_seg", "--average-rotations",
                            "--foreground-threshold", 0.5], capsys)  # fmt: skip
    assert code == 0, err
    assert io.read_mrc(tmp_path / "thin_seg" / "labels.mrc")[0].shape == (8, 80, 80)
    meta = json.loads((tmp_path / "thin_seg" / "segmentation.json").read_text())
    assert meta["average_rotations"] and meta["foreground_threshold"] == 0.5
    code, _, err = run(["segment", "--model", model, "--tomogram", tomogram, "--out", seg,
                        "--foreground-threshold", 1], capsys)  # fmt: skip
    assert code == 2 and "foreground-threshold" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(["segment", "--model", empty, "--tomogram", tomogram, "--out", seg], capsys)
    assert code == 2 and err.startswith("error:")
