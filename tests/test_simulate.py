"""The crowded-tomogram simulator: rotations in RELION's convention, templates, placement without
overlap that the particle list reproduces, the acquisition (SNR, missing wedge, half series) and
byte-identical datasets by seed."""

import hashlib
import json
from pathlib import Path

import jax
import mrcfile
import numpy as np
import pytest
import scipy.ndimage

from cryojax_mw import io, simulate
from cryojax_mw.operators import TiltGeometry, missing_wedge_mask
from cryojax_mw.simulate import (
    SimulationConfig,
    euler_zyz_to_matrix,
    load_template,
    matrix_to_euler_zyz,
    random_euler_zyz,
    rotate_volume,
    simulate_tomogram,
)

SHARED_TEMPLATES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "templates_10A"

SMALL = SimulationConfig(
    shape=(48, 80, 80),
    classes=("1bxn", "4v94", "3qm1"),
    n_particles=12,
    occupancy=None,
    n_vesicles=1,
    vesicle_radius=(120.0, 150.0),
    n_gold=1,
    n_decoys=3,
    tilt_step=4.0,
)


@pytest.fixture(scope="module")
def small():
    return simulate_tomogram(jax.random.key(7), SMALL)


# ------------------------------------------------------------------------------------ rotations


def test_euler_matrices_are_rotations_and_invert_to_their_angles():
    angles = random_euler_zyz(np.random.default_rng(0), 200)
    a = euler_zyz_to_matrix(angles)
    np.testing.assert_allclose(
        a @ np.swapaxes(a, -1, -2), np.broadcast_to(np.eye(3), a.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(a), 1.0, atol=1e-12)
    np.testing.assert_allclose(euler_zyz_to_matrix(matrix_to_euler_zyz(a)), a, atol=1e-9)


@pytest.mark.parametrize("angles", [(30.0, 0.0, 0.0), (30.0, 180.0, 0.0), (0.0, 0.0, -50.0)])
def test_matrix_to_euler_handles_tilt_0_and_180(angles):
    a = euler_zyz_to_matrix(angles)
    np.testing.assert_allclose(euler_zyz_to_matrix(matrix_to_euler_zyz(a)), a, atol=1e-9)


def test_euler_matrix_is_relions_zyz_product():
    # A = Rz(psi) Ry(tilt) Rz(rot) with coordinate-frame rotations, as RELION's Euler_angles2matrix.
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    def ry(b):
        c, s = np.cos(np.deg2rad(b)), np.sin(np.deg2rad(b))
        return np.array([[c, 0, -s], [0, 1, 0], [s, 0, c]])

    rot, tilt, psi = 25.0, 70.0, -110.0
    np.testing.assert_allclose(
        euler_zyz_to_matrix((rot, tilt, psi)), rz(psi) @ ry(tilt) @ rz(rot), atol=1e-12
    )


def test_rotate_volume_moves_a_point_by_the_matrix():
    # particle(r) = template(A^T r): a point at x = +3 moves to A (3, 0, 0).
    n, c = 11, 5
    template = np.zeros((n, n, n), np.float32)
    template[c, c, c + 3] = 1.0
    for angles in [(90.0, 0.0, 0.0), (0.0, 90.0, 0.0), (0.0, 90.0, 90.0), (90.0, 90.0, 0.0)]:
        target = np.rint(euler_zyz_to_matrix(angles) @ np.array([3.0, 0.0, 0.0])).astype(int)
        rotated = rotate_volume(template, angles)
        peak = np.unravel_index(np.argmax(rotated), rotated.shape)
        assert peak == (c + target[2], c + target[1], c + target[0])
        assert rotated.max() == pytest.approx(1.0, abs=1e-5)


def test_rotate_volume_agrees_with_scipy_affine_transform():
    template = np.asarray(load_template("1bxn").density)
    angles = (33.0, 71.0, -152.0)
    a = euler_zyz_to_matrix(angles)
    # scipy maps output index o to input index M o + offset, in (z, y, x): M = P A^T P with P
    # reversing the axis order.
    p = np.eye(3)[::-1]
    m = p @ a.T @ p
    centre = (np.asarray(template.shape) - 1) / 2
    expected = scipy.ndimage.affine_transform(
        template, m, offset=centre - m @ centre, order=1, mode="constant", cval=0.0
    )
    np.testing.assert_allclose(rotate_volume(template, angles), expected, atol=1e-4)


def test_random_orientations_are_uniform_on_the_sphere():
    a = euler_zyz_to_matrix(random_euler_zyz(np.random.default_rng(1), 40000))
    # Haar measure: E[A] = 0 and each row is uniform on the sphere, E[a_ij^2] = 1/3.
    assert np.abs(a.mean(axis=0)).max() < 0.015
    np.testing.assert_allclose((a**2).mean(axis=0), 1 / 3, atol=0.01)


# ------------------------------------------------------------------------------------ templates


def test_the_shrec_classes_ship_with_the_package():
    assert set(simulate.SHREC_CLASSES) <= set(simulate.available_templates())


@pytest.mark.skipif(not SHARED_TEMPLATES.is_dir(), reason="shared/data not present")
def test_shipped_maps_hold_the_source_maps():
    for name in ("1bxn", "4v4r", "8tux"):
        shipped, v1 = io.read_mrc(simulate.default_template_folder() / f"{name}.mrc.gz")
        source, v2 = io.read_mrc(SHARED_TEMPLATES / f"{name}.mrc")
        np.testing.assert_array_equal(shipped, source)
        assert v1 == v2 == 10.0


def test_template_is_centred_normalised_and_scales_with_voxel_size():
    t = load_template("4cr2")
    m = t.density.shape[0]
    assert m % 2 == 1
    np.testing.assert_allclose(scipy.ndimage.center_of_mass(t.mask), [(m - 1) / 2] * 3, atol=0.5)
    assert t.density[t.mask].mean() == pytest.approx(1.0, rel=1e-5)
    assert t.density.min() >= 0
    coarse = load_template("4cr2", 20.0)
    assert coarse.n_mask_voxels == pytest.approx(t.n_mask_voxels / 8, rel=0.15)
    # The box holds every orientation: nothing carrying density is cut by rotation.
    turned = rotate_volume(t.density, (20.0, 80.0, 45.0))
    assert turned.sum() == pytest.approx(t.density.sum(), rel=0.02)


def test_template_from_a_user_folder(tmp_path):
    volume = np.zeros((20, 20, 20), np.float32)
    volume[6:14, 8:12, 5:15] = 2.0
    io.write_mrc(tmp_path / "brick.mrc", volume, 10.0)
    t = load_template("brick", 10.0, folder=tmp_path)
    assert t.n_mask_voxels == 8 * 4 * 10
    assert simulate.available_templates(tmp_path) == ("brick",)


def test_bad_templates_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown class 'nope'.*1bxn"):
        load_template("nope")
    io.write_mrc(tmp_path / "flat.mrc", np.zeros((16, 16), np.float32), 10.0)
    with pytest.raises(ValueError, match="not a 3D density map"):
        load_template("flat", folder=tmp_path)
    io.write_mrc(tmp_path / "empty.mrc", -np.ones((16, 16, 16), np.float32), 10.0)
    with pytest.raises(ValueError, match="not a density map"):
        load_template("empty", folder=tmp_path)
    io.write_mrc(tmp_path / "novoxel.mrc", np.ones((16, 16, 16), np.float32), None)
    with pytest.raises(ValueError, match="no voxel size"):
        load_template("novoxel", folder=tmp_path)


# ------------------------------------------------------------------------------------ placement


def test_particle_list_reproduces_every_placed_shape(small):
    """Re-rotating each template by its listed angles at its listed centre gives exactly the
    voxels that carry its instance id, with its class label."""
    particles = small.particles
    assert len(particles) == SMALL.n_particles
    assert set(particles.class_ids.tolist()) == {1, 2, 3}
    for i in range(len(particles)):
        template = load_template(particles.class_names[particles.class_ids[i] - 1])
        mask = rotate_volume(template.mask.astype(np.float32), particles.angles_deg[i]) > 0.5
        half = (mask.shape[0] - 1) // 2
        expected = np.zeros(SMALL.shape, bool)
        z, y, x = particles.positions[i].astype(int) - half
        m = mask.shape[0]
        padded = np.pad(expected, m)
        padded[z + m : z + 2 * m, y + m : y + 2 * m, x + m : x + 2 * m] = mask
        expected = padded[m:-m, m:-m, m:-m]
        instance = small.particle_instances[i]
        np.testing.assert_array_equal(small.instances == instance, expected)
        assert np.all(small.labels[expected] == particles.class_ids[i])
        centre = tuple(particles.positions[i].astype(int))
        if template.mask[(half,) * 3]:  # hollow barrels (4v94) have no density at their centre
            assert small.labels[centre] == particles.class_ids[i]


def test_no_two_bodies_overlap_and_labels_follow_instances(small):
    ids = np.unique(small.instances[small.instances > 0])
    n_bodies = len(small.particles) + len(small.bodies)
    np.testing.assert_array_equal(ids, np.arange(1, n_bodies + 1))
    for body in small.bodies:
        label = SMALL.label_of("membrane" if body["kind"] == "vesicle" else body["kind"])
        assert np.all(small.labels[small.instances == body["instance"]] == label)
    assert np.array_equal(small.labels > 0, small.instances > 0)
    kinds = sorted(b["kind"] for b in small.bodies)
    assert kinds == ["decoy"] * 3 + ["gold", "vesicle"]


def test_canvas_refuses_a_body_that_touches_another_or_leaves_the_volume():
    from cryojax_mw.simulate._placement import Canvas

    canvas = Canvas((10, 10, 10))
    density, mask = simulate.gold_bead(20.0, 10.0, 5.0)  # radius 2 voxels, box 7
    assert canvas.try_stamp(density, mask, (0, 0, 0), label=4) == 1
    before = (canvas.density.copy(), canvas.labels.copy(), canvas.instances.copy())
    assert canvas.try_stamp(density, mask, (3, 0, 0), label=4) == 0  # masks share voxels
    assert canvas.try_stamp(density, mask, (5, 5, 5), label=4) == 0  # runs out of the volume
    for a, b in zip(before, (canvas.density, canvas.labels, canvas.instances)):
        np.testing.assert_array_equal(a, b)
    assert canvas.try_stamp(density, mask, (3, 3, 3), label=2) == 2  # free space
    assert canvas.n_occupied == 2 * mask.sum() == np.count_nonzero(canvas.instances)


def test_ground_truth_is_the_sum_of_the_placed_particles():
    config = SimulationConfig(
        shape=(32, 64, 64), classes=("1bxn", "3qm1"), n_particles=6, occupancy=None,
        n_vesicles=0, n_gold=0, n_decoys=0, tilt_step=6.0,
    )  # fmt: skip
    sim = simulate_tomogram(jax.random.key(3), config)
    expected = np.zeros(config.shape, np.float32)
    p = sim.particles
    for i in range(len(p)):
        density = rotate_volume(
            load_template(p.class_names[p.class_ids[i] - 1]).density, p.angles_deg[i]
        )
        m = density.shape[0]
        start = p.positions[i].astype(int) - (m - 1) // 2
        padded = np.pad(expected, m)
        region = tuple(slice(s + m, s + 2 * m) for s in start)
        padded[region] += density
        expected = padded[m:-m, m:-m, m:-m]
    np.testing.assert_allclose(sim.ground_truth, expected, atol=1e-5)


def test_occupancy_target_is_reached():
    config = SimulationConfig(
        shape=(32, 64, 64), classes=("1bxn", "3qm1"), occupancy=0.08,
        n_vesicles=0, n_gold=0, n_decoys=0, tilt_step=6.0,
    )  # fmt: skip
    sim = simulate_tomogram(jax.random.key(4), config)
    assert 0.08 <= sim.occupancy < 0.09
    assert sim.occupancy == pytest.approx(
        np.isin(sim.instances, sim.particle_instances).mean(), rel=1e-9
    )


def test_same_key_same_tomogram_other_key_other_tomogram(small):
    again = simulate_tomogram(jax.random.key(7), SMALL)
    np.testing.assert_array_equal(again.tomogram, small.tomogram)
    np.testing.assert_array_equal(again.labels, small.labels)
    np.testing.assert_array_equal(again.particles.angles_deg, small.particles.angles_deg)
    other = simulate_tomogram(jax.random.key(8), SMALL)
    assert not np.array_equal(other.particles.positions, small.particles.positions)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"n_particles": 400}, "could not fit"),
        ({"shape": (16, 80, 80)}, "does not fit"),
        ({"classes": ("1bxn", "ribosome")}, "unknown class 'ribosome'"),
        ({"n_particles": None, "occupancy": 0.6}, "cannot be reached"),
        ({"occupancy": 0.1}, "exactly one of"),
        ({"classes": ("1bxn", "gold")}, "reserved"),
        ({"tilt_min": 60.0, "tilt_max": -60.0}, "tilt range"),
        ({"snr": 0.0}, "snr must be > 0"),
    ],
)
def test_bad_configs_say_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        config = SimulationConfig(**{**SMALL.__dict__, **change})
        simulate_tomogram(jax.random.key(0), config)


# ---------------------------------------------------------------------------------- acquisition


@pytest.mark.parametrize("noise", ["gaussian", "poisson"])
def test_measured_snr_is_the_requested_one(noise):
    config = SimulationConfig(**{**SMALL.__dict__, "noise": noise, "snr": 0.05})
    acq = simulate_tomogram(jax.random.key(1), config).acquisition
    measured = np.var(acq.clean) / np.var(acq.noisy - acq.clean)
    assert measured == pytest.approx(0.05, rel=0.2)
    assert acq.measured_snr == pytest.approx(measured, rel=1e-4)
    # The half series are independent and each carries half the dose (twice the noise variance).
    n_even, n_odd = acq.even - acq.clean, acq.odd - acq.clean
    assert abs(np.corrcoef(n_even.ravel(), n_odd.ravel())[0, 1]) < 0.02
    assert np.var(n_even) / np.var(acq.noisy - acq.clean) == pytest.approx(2.0, rel=0.05)


def test_full_series_is_the_mean_of_the_halves_for_gaussian_noise(small):
    acq = small.acquisition
    np.testing.assert_allclose(acq.noisy, 0.5 * (acq.even + acq.odd), atol=1e-6)


def test_missing_wedge_is_empty_where_the_tilt_range_says():
    shape = (48, 48, 48)
    power = {}
    for tilt_max in (40.0, 60.0):
        config = SimulationConfig(
            **{**SMALL.__dict__, "shape": shape, "n_particles": 6, "n_vesicles": 0,
               "tilt_min": -tilt_max, "tilt_max": tilt_max, "tilt_step": 2.0}
        )  # fmt: skip
        power[tilt_max] = (
            np.abs(np.fft.rfftn(simulate_tomogram(jax.random.key(2), config).tomogram)) ** 2
        )
    k = np.sqrt(sum(f**2 for f in np.meshgrid(
        np.fft.fftfreq(48), np.fft.fftfreq(48), np.fft.rfftfreq(48), indexing="ij")))  # fmt: skip
    # Above 0.15 cycles/voxel the Fourier grid resolves angles to a few degrees.
    band = (k > 0.15) & (k < 0.45)

    def observed(tilt):
        return np.asarray(missing_wedge_mask(shape, -tilt, tilt)) > 0.5

    # With 8 degrees of margin, what is left in the wedge (about 3% of the observed power) is the
    # aliasing of discrete backprojection; a tomogram without a wedge would give about 1.
    missing = ~observed(68.0) & band
    assert power[60.0][missing].mean() < 0.05 * power[60.0][observed(60.0) & band].mean()
    # Between 48 and 52 degrees: measured at +-60, missing at +-40.
    between = observed(52.0) & ~observed(48.0) & band
    assert power[40.0][between].mean() < 0.1 * power[60.0][between].mean()


def test_dose_symmetric_order_alternates_outwards():
    angles = TiltGeometry.from_range(-6, 6, 2).angles_deg
    order = simulate.acquisition_order(angles, "dose-symmetric")
    assert [angles[i] for i in order] == [0, 2, -2, 4, -4, 6, -6]
    assert [angles[i] for i in simulate.acquisition_order(angles, "ascending")] == sorted(angles)


def test_radiation_damage_keeps_the_mean_and_fades_high_frequencies():
    f = simulate.exposure_attenuation((32, 32), 10.0, [0.0, 20.0, 60.0])
    assert np.all(f[:, 0, 0] == 1.0) and np.all(f[0] == 1.0)
    assert np.all(np.diff(f[:, 5, 10], axis=0) < 0)  # more dose, less signal
    assert f[2, 0, 16] < f[2, 0, 4] < 1.0  # higher frequency, less signal


def test_ctf_modulates_the_clean_series_and_is_phase_flipped_before_wbp():
    config = SimulationConfig(**{**SMALL.__dict__, "defocus": 3.0, "total_dose": 0.0})
    with_ctf = simulate_tomogram(jax.random.key(5), config)
    without = simulate_tomogram(
        jax.random.key(5), SimulationConfig(**{**SMALL.__dict__, "total_dose": 0.0})
    )
    np.testing.assert_array_equal(with_ctf.ground_truth, without.ground_truth)
    spectrum_ratio = np.fft.rfft2(with_ctf.acquisition.clean) / np.fft.rfft2(
        without.acquisition.clean
    )
    ctf = with_ctf.acquisition.ctf
    strong = (
        np.abs(np.fft.rfft2(without.acquisition.clean))
        > 1e-2 * np.abs(np.fft.rfft2(without.acquisition.clean)).max()
    )
    np.testing.assert_allclose(
        spectrum_ratio[strong].real, np.broadcast_to(ctf, spectrum_ratio.shape)[strong], atol=1e-3
    )
    # After phase flipping, the reconstruction correlates positively with the truth.
    assert np.corrcoef(with_ctf.tomogram.ravel(), with_ctf.ground_truth.ravel())[0, 1] > 0.05


# -------------------------------------------------------------------------------------- dataset


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset")
    simulate.write_dataset(out, SMALL, n_tomograms=2, seed=11, progress=False)
    return out


def test_dataset_folder_holds_every_file_with_telling_names(dataset):
    names = {p.name for p in dataset.iterdir()}
    for i in range(2):
        assert set(simulate.dataset_file_names(f"tomo_{i:03d}").values()) <= names
    assert "tomo_000_tomogram.mrc" in names and "tomo_001_particles.star" in names
    params = json.loads((dataset / "parameters.json").read_text())
    assert params["seed"] == 11 and params["config"]["classes"] == list(SMALL.classes)
    assert params["label_names"][0] == "background" and params["label_names"][-1] == "decoy"
    assert params["tomograms"]["tomo_001"]["n_particles"] == SMALL.n_particles
    with mrcfile.open(dataset / "tomo_000_labels.mrc") as f:
        assert f.data.dtype == np.int8 and float(f.voxel_size.x) == pytest.approx(10.0)
    labels, _ = io.read_mrc(dataset / "tomo_000_labels.mrc")
    particles = io.read_particles(dataset / "tomo_000_particles.star")
    assert particles.tomo_name == "tomo_000"
    for i in range(len(particles)):
        if particles.class_names[particles.class_ids[i] - 1] != "4v94":
            assert labels[tuple(particles.positions[i].astype(int))] == particles.class_ids[i]
    csv = io.read_particles(dataset / "tomo_000_particles.csv")
    np.testing.assert_array_equal(csv.positions, particles.positions)
    assert io.read_tilt_angles(dataset / "tomo_000_tilt_series.tlt")[0] == -60


def test_dataset_is_byte_identical_by_seed_and_resumes(dataset, tmp_path):
    simulate.write_dataset(tmp_path, SMALL, n_tomograms=2, seed=11, progress=False)
    assert _digest(tmp_path) == _digest(dataset)
    other = tmp_path.parent / (tmp_path.name + "_other")
    simulate.write_dataset(other, SMALL, n_tomograms=1, seed=12, progress=False)
    assert _digest(other)["tomo_000_tomogram.mrc"] != _digest(dataset)["tomo_000_tomogram.mrc"]
    with pytest.raises(ValueError, match="finished dataset"):
        simulate.write_dataset(tmp_path, SMALL, n_tomograms=2, seed=11, progress=False)


def test_interrupted_dataset_resumes_to_the_same_files(dataset, tmp_path, monkeypatch):
    from cryojax_mw.simulate import _dataset

    real = _dataset._write_tomogram
    calls = []

    def crash_on_second(folder, sim, name):
        calls.append(name)
        if name == "tomo_001":
            raise KeyboardInterrupt
        real(folder, sim, name)

    monkeypatch.setattr(_dataset, "_write_tomogram", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        simulate.write_dataset(tmp_path, SMALL, n_tomograms=2, seed=11, progress=False)
    monkeypatch.setattr(_dataset, "_write_tomogram", real)
    with pytest.raises(ValueError, match="other parameters"):
        simulate.write_dataset(tmp_path, SMALL, n_tomograms=2, seed=12, progress=False)
    written = []
    monkeypatch.setattr(
        _dataset, "_write_tomogram", lambda f, s, n: (written.append(n), real(f, s, n))
    )
    simulate.write_dataset(tmp_path, SMALL, n_tomograms=2, seed=11, progress=False)
    assert written == ["tomo_001"]  # tomo_000 was kept
    assert _digest(tmp_path) == _digest(dataset)
