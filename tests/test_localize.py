"""Localization: sliding-window segmentation equals classifying the whole tomogram at once,
mean-shift agrees with a direct implementation of the same algorithm and finds blob centroids,
connected components, template matching (NCC of a template with itself is 1, peaks at the true
positions and rotations, translation equivariance, the wedge helps), peak picking, detection
scores against hand-computed cases, and DeepFinder XML object lists."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.csgraph

from cryojax_mw.io import ParticleList
from cryojax_mw.io._xml import read_objlist_xml, read_particles_xml
from cryojax_mw.localize import (
    TemplateMatch,
    cluster_connected_components,
    cluster_mean_shift,
    evaluate_detections,
    label_voxels,
    match_template,
    mean_shift,
    pick_peaks,
    rotation_grid,
    segment_tomogram,
)
from cryojax_mw.operators import missing_wedge_mask
from cryojax_mw.simulate import (
    SimulationConfig,
    euler_zyz_to_matrix,
    load_template,
    rotate_volume,
    simulate_tomogram,
)

# ------------------------------------------------------------------------ sliding-window inference

THRESHOLDS = jnp.array([-3.0, 4.0])  # local sums below, between and above: classes 0, 1, 2


def _local_classifier(patches: jax.Array) -> jax.Array:
    """One-hot classes from the sum over each voxel's 3x3x3 neighbourhood (zeros outside the
    array): a local classifier of receptive radius 1. Inputs are small integers, so every sum
    is exact and the result cannot depend on how the volume is cut."""
    x = jnp.pad(patches, ((0, 0), (1, 1), (1, 1), (1, 1)))
    z, y, w = patches.shape[1:]
    total = sum(
        x[:, i : i + z, j : j + y, k : k + w] for i in range(3) for j in range(3) for k in range(3)
    )
    labels = jnp.searchsorted(THRESHOLDS, total, side="right")
    # Unequal weights so that the maximum probability is not the same for every class.
    return jax.nn.one_hot(labels, 3) * jnp.array([0.5, 0.7, 0.9]) + jnp.array([0.2, 0.1, 0.0])


def _untiled(volume: np.ndarray) -> np.ndarray:
    """The classifier on the whole volume at once, border handled by the same reflection."""
    padded = np.pad(volume, 1, mode="reflect")[None]
    return np.asarray(_local_classifier(jnp.asarray(padded, jnp.float32)))[0, 1:-1, 1:-1, 1:-1]


@pytest.mark.parametrize(
    "shape, patch_size, crop, batch_size",
    [((37, 29, 51), 16, 3, 3), ((23, 41, 18), 12, 1, 2), ((9, 30, 25), 16, 2, 4)],
)
def test_tiled_segmentation_equals_the_untiled_classifier_exactly(
    shape, patch_size, crop, batch_size
):
    volume = np.random.default_rng(0).integers(-2, 3, size=shape).astype(np.float32)
    expected = _untiled(volume)

    def run():
        return segment_tomogram(
            jax.jit(_local_classifier),
            volume,
            patch_size=patch_size,
            n_classes=3,
            crop=crop,
            batch_size=batch_size,
            progress=False,
        )

    if min(shape) + 2 * crop < patch_size:
        with pytest.warns(UserWarning, match="smaller than a patch"):
            seg = run()
    else:
        seg = run()
    np.testing.assert_array_equal(seg.probabilities, expected)
    np.testing.assert_array_equal(seg.label_map, np.argmax(expected, axis=-1))
    np.testing.assert_array_equal(seg.max_probability, expected.max(axis=-1))
    assert seg.label_map.dtype == np.int16 and seg.probabilities.dtype == np.float32
    assert len(np.unique(seg.label_map)) == 3  # the case exercises every class


def test_segmentation_compiles_the_classifier_once_and_pads_the_last_batch():
    shapes = []

    @jax.jit
    def classifier(patches):
        shapes.append(patches.shape)  # runs at trace time only
        return _local_classifier(patches)

    volume = np.random.default_rng(1).integers(-2, 3, size=(30, 31, 33)).astype(np.float32)
    seg = segment_tomogram(
        classifier, volume, patch_size=16, n_classes=3, crop=2, batch_size=4, progress=False
    )
    assert seg.n_tiles == 27 and seg.n_tiles % 4 != 0
    assert shapes == [(4, 16, 16, 16)]


def test_float16_and_label_only_outputs_keep_the_labels():
    volume = np.random.default_rng(2).integers(-2, 3, size=(20, 22, 24)).astype(np.float32)
    kwargs = {"patch_size": 12, "n_classes": 3, "crop": 2, "batch_size": 2, "progress": False}
    full = segment_tomogram(_local_classifier, volume, **kwargs)
    half = segment_tomogram(_local_classifier, volume, probabilities="float16", **kwargs)
    labels_only = segment_tomogram(_local_classifier, volume, probabilities=None, **kwargs)
    assert half.probabilities.dtype == np.float16 and labels_only.probabilities is None
    np.testing.assert_allclose(half.probabilities, full.probabilities, rtol=1e-3)
    for other in (half, labels_only):
        np.testing.assert_array_equal(other.label_map, full.label_map)
        np.testing.assert_array_equal(other.max_probability, full.max_probability)


def test_foreground_threshold_labels_voxels_whose_particle_classes_together_win():
    probs = np.array([
        [0.4, 0.35, 0.25],  # argmax background, but particle 0.6: class 1
        [0.6, 0.1, 0.3],  # background even with the classes pooled
        [0.5, 0.2, 0.3],  # particle exactly 0.5 reaches the threshold: class 2
        [0.1, 0.2, 0.7],  # both rules agree
    ], np.float32)  # fmt: skip
    labels, best = label_voxels(probs)
    np.testing.assert_array_equal(labels, [0, 0, 0, 2])
    np.testing.assert_array_equal(best, np.float32([0.4, 0.6, 0.5, 0.7]))
    labels, best = label_voxels(probs, 0.5)
    np.testing.assert_array_equal(labels, [1, 0, 2, 2])
    np.testing.assert_array_equal(best, np.float32([0.35, 0.6, 0.3, 0.7]))
    assert labels.dtype == np.int16 and best.dtype == np.float32
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="foreground_threshold"):
            label_voxels(probs, bad)
    with pytest.raises(ValueError, match="background and at least one"):
        label_voxels(probs[:, :1], 0.5)


def test_tiled_segmentation_with_a_foreground_threshold_labels_as_label_voxels():
    volume = np.random.default_rng(3).integers(-2, 3, size=(20, 22, 24)).astype(np.float32)
    kwargs = {"patch_size": 12, "n_classes": 3, "crop": 2, "batch_size": 2, "progress": False}
    full = segment_tomogram(_local_classifier, volume, **kwargs)
    # The classifier's background voxels have P = (0.7, 0.1, 0.0): a threshold of 0.05 turns
    # them into class 1, 0.5 leaves them background.
    for t in (0.05, 0.5):
        seg = segment_tomogram(
            _local_classifier, volume, probabilities=None, foreground_threshold=t, **kwargs
        )
        labels, best = label_voxels(full.probabilities, t)
        np.testing.assert_array_equal(seg.label_map, labels)
        np.testing.assert_array_equal(seg.max_probability, best)
    assert (seg.label_map == 0).any() and not (
        segment_tomogram(_local_classifier, volume, foreground_threshold=0.05, **kwargs).label_map
        == 0
    ).any()


def test_segmentation_refuses_bad_sizes_and_wrong_classifier_output():
    volume = np.zeros((20, 20, 20), np.float32)
    with pytest.raises(ValueError, match="multiple of 4"):
        segment_tomogram(_local_classifier, volume, patch_size=18, n_classes=3, progress=False)
    with pytest.raises(ValueError, match="crop"):
        segment_tomogram(
            _local_classifier, volume, patch_size=16, n_classes=3, crop=8, progress=False
        )
    with pytest.raises(ValueError, match="n_classes = 4"):
        segment_tomogram(_local_classifier, volume, patch_size=16, n_classes=4, progress=False)
    with pytest.raises(ValueError, match="real"):
        segment_tomogram(_local_classifier, volume[0], patch_size=16, n_classes=3, progress=False)


# ---------------------------------------------------------------------------------- clustering


def _reference_mean_shift(points: np.ndarray, bandwidth: float):
    """The same algorithm written directly (float64, all points per step)."""
    points = points.astype(np.float64)
    seeds = np.unique(np.round(points / bandwidth), axis=0) * bandwidth
    modes, counts = [], []
    for c in seeds:
        for _ in range(300):
            inside = np.sum((points - c) ** 2, axis=1) <= bandwidth**2
            new = points[inside].mean(axis=0)
            done = np.linalg.norm(new - c) < 1e-3 * bandwidth
            c = new
            if done:
                break
        modes.append(c)
        counts.append(np.sum(np.sum((points - c) ** 2, axis=1) <= bandwidth**2))
    modes, counts = np.array(modes), np.array(counts)
    order = np.lexsort((*modes.T[::-1], -counts))
    kept = []
    for i in order:
        if all(np.linalg.norm(modes[i] - modes[k]) > bandwidth for k in kept):
            kept.append(i)
    centres = modes[kept]
    assignment = np.argmin(np.linalg.norm(points[:, None] - centres[None], axis=2), axis=1)
    return centres, assignment


def test_mean_shift_agrees_with_a_direct_implementation():
    rng = np.random.default_rng(3)
    blobs = [
        rng.normal(centre, spread, size=(n, 3))
        for centre, spread, n in [((10, 12, 9), 2.0, 150), ((18, 20, 22), 3.0, 250),
                                  ((5, 25, 25), 1.5, 80)]
    ]  # fmt: skip
    points = np.unique(np.round(np.concatenate(blobs)).astype(np.int64), axis=0)
    for bandwidth in (3.7, 6.3):
        centres, assignment = mean_shift(points, bandwidth)
        ref_centres, ref_assignment = _reference_mean_shift(points, bandwidth)
        order, ref_order = np.lexsort(centres.T[::-1]), np.lexsort(ref_centres.T[::-1])
        np.testing.assert_allclose(centres[order], ref_centres[ref_order], atol=1e-4)
        relabel = np.empty(len(order), np.int64)
        relabel[order] = ref_order
        np.testing.assert_array_equal(relabel[assignment], ref_assignment)
        assert 2 <= len(centres) <= 12


def _ball_voxels(shape, centre, radius):
    z, y, x = np.indices(shape)
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2


def _blob_map():
    """Balls of classes 1 and 2 at half-integer centres (their centroids are the centres)."""
    shape = (40, 44, 48)
    labels = np.zeros(shape, np.int16)
    balls = [((10.5, 10.5, 12.5), 1), ((28.5, 30.5, 11.5), 2), ((20.5, 12.5, 36.5), 1)]
    for centre, k in balls:
        labels[_ball_voxels(shape, centre, 4.2)] = k
    return labels, balls


@pytest.mark.parametrize("method", ["mean_shift", "components"])
def test_clustering_finds_each_blob_with_its_class_centroid_and_size(method):
    labels, balls = _blob_map()
    # A few voxels of the other class inside the first ball: the majority still decides.
    labels[10, 10, 11:13] = 2
    kwargs = {"class_names": ("a", "b"), "voxel_size": 7.5, "tomo_name": "t1"}
    if method == "mean_shift":
        found = cluster_mean_shift(labels, bandwidth=6.0, **kwargs)
    else:
        found = cluster_connected_components(labels, min_cluster_size=5, **kwargs)
    p = found.particles
    assert p.voxel_size == 7.5 and p.tomo_name == "t1" and np.all(p.angles_deg == 0)
    size = int(_ball_voxels(labels.shape, balls[0][0], 4.2).sum())
    order = np.argsort(p.positions[:, 2])
    expected = sorted(balls, key=lambda b: b[0][2])
    if method == "mean_shift":
        np.testing.assert_allclose(p.positions[order], [b[0] for b in expected], atol=1e-12)
        np.testing.assert_array_equal(p.class_ids[order], [b[1] for b in expected])
        np.testing.assert_array_equal(found.sizes, size)
    else:  # the two relabelled voxels split the first ball's component; the rest is exact
        far = [i for i in order if p.positions[i, 2] > 20 or p.class_ids[i] == 2]
        assert len(p) == 3
        np.testing.assert_allclose(p.positions[far[-1]], (20.5, 12.5, 36.5), atol=1e-12)
    np.testing.assert_array_equal(found.scores, found.sizes)


def test_cluster_scores_are_mean_probabilities_over_members():
    labels, _ = _blob_map()
    rng = np.random.default_rng(4)
    probs = rng.uniform(size=(*labels.shape, 3))
    found = cluster_connected_components(
        labels, class_names=("a", "b"), voxel_size=1.0, scores=probs
    )
    by_map = cluster_connected_components(
        labels, class_names=("a", "b"), voxel_size=1.0, scores=probs[..., 0]
    )
    only_b = cluster_connected_components(
        labels, class_names=("a", "b"), voxel_size=1.0, scores=probs, classes=("b",)
    )
    assert only_b.particles.class_names == ("b",) and len(only_b) == 1
    ball = _ball_voxels(labels.shape, only_b.particles.positions[0], 4.2)
    assert only_b.scores[0] == pytest.approx(probs[..., 2][ball].mean(), rel=1e-12)
    assert len(found) == len(by_map) == 3
    for detections, channel in ((found, None), (by_map, 0)):
        for i in range(len(detections)):
            ball = _ball_voxels(labels.shape, detections.particles.positions[i], 4.2)
            k = detections.particles.class_ids[i] if channel is None else channel
            assert detections.scores[i] == pytest.approx(probs[..., k][ball].mean(), rel=1e-12)


def test_size_limits_per_class_and_excluded_classes():
    labels, _ = _blob_map()
    labels[35, 40, 45] = 1  # a one-voxel speck of class a
    labels[0:2, 0:2, 40:48] = 3  # a "membrane" slab
    names = ("a", "b", "membrane")
    found = cluster_mean_shift(
        labels, bandwidth=6.0, class_names=names, voxel_size=1.0, classes=("a", "b")
    )
    assert len(found) == 4 and found.particles.class_names == ("a", "b")
    limited = cluster_mean_shift(
        labels,
        bandwidth=6.0,
        class_names=names,
        voxel_size=1.0,
        classes=("a", "b"),
        min_cluster_size={"a": 2},
        max_cluster_size={"b": 10},
    )
    np.testing.assert_array_equal(limited.particles.class_ids, [1, 1])
    with pytest.raises(ValueError, match="unknown classes"):
        cluster_mean_shift(
            labels, bandwidth=6.0, class_names=names, voxel_size=1.0, min_cluster_size={"c": 2}
        )
    with pytest.raises(ValueError, match="give a name"):
        cluster_mean_shift(labels, bandwidth=6.0, class_names=("a", "b"), voxel_size=1.0)


def test_per_class_bandwidth_keeps_large_and_small_particles_whole():
    """One radius suited to the small class cuts a large particle into several clusters; a
    radius per class clusters each class with its own and finds one particle per ball."""
    shape = (48, 48, 64)
    labels = np.zeros(shape, np.int16)
    big, small = [(16.5, 16.5, 16.5), (30.5, 30.5, 44.5)], [(12.5, 36.5, 44.5), (36.5, 12.5, 20.5)]
    for c in big:
        labels[_ball_voxels(shape, c, 9.0)] = 1
    for c in small:
        labels[_ball_voxels(shape, c, 2.5)] = 2
    kwargs = {"class_names": ("big", "small"), "voxel_size": 1.0}
    pooled = cluster_mean_shift(labels, bandwidth=3.0, **kwargs)
    assert np.sum(pooled.particles.class_ids == 1) > len(big)
    per_class = cluster_mean_shift(labels, bandwidth={"big": 9.0, "small": 3.0}, **kwargs)
    p = per_class.particles
    for k, centres in ((1, big), (2, small)):
        got = p.positions[p.class_ids == k]
        assert len(got) == len(centres)
        np.testing.assert_allclose(got[np.argsort(got[:, 0])], sorted(centres), atol=1e-9)
    with pytest.raises(ValueError, match="missing \\['small'\\]"):
        cluster_mean_shift(labels, bandwidth={"big": 9.0}, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        cluster_mean_shift(labels, bandwidth={"big": 9.0, "small": 0.0}, **kwargs)
    with pytest.raises(ValueError, match="positive"):  # checked even when nothing is labelled
        cluster_mean_shift(np.zeros_like(labels), bandwidth=-1.0, **kwargs)


def test_per_class_clusters_of_one_particle_merge_into_one_of_its_majority_class():
    """A large particle with a patch of voxels labelled as the small class gives a small cluster
    near its centre: merged, it is one particle of the large class at its centroid; a small
    particle beyond the large one's radius stays on its own."""
    shape = (40, 40, 48)
    labels = np.zeros(shape, np.int16)
    ball = _ball_voxels(shape, (19.5, 19.5, 19.5), 8.0)
    labels[ball] = 1
    labels[_ball_voxels(shape, (19.5, 19.5, 22.0), 3.0)] = 2  # 2.5 voxels off centre
    labels[_ball_voxels(shape, (19.5, 19.5, 37.5), 2.5)] = 2
    kwargs = {"bandwidth": {"big": 8.0, "small": 3.0}, "class_names": ("big", "small"),
              "voxel_size": 1.0}  # fmt: skip
    apart = cluster_mean_shift(labels, merge=False, **kwargs)
    assert len(apart) == 3 and np.sum(apart.particles.class_ids == 2) == 2
    merged = cluster_mean_shift(labels, **kwargs)
    p = merged.particles
    assert len(merged) == 2 and list(p.class_ids) == [1, 2]
    np.testing.assert_allclose(p.positions[0], (19.5, 19.5, 19.5), atol=1e-9)
    np.testing.assert_allclose(p.positions[1], (19.5, 19.5, 37.5), atol=1e-9)
    assert merged.sizes[0] == ball.sum()  # every label of the particle counted
    # With a pooled bandwidth there is nothing to merge: the option changes nothing.
    pooled = [cluster_mean_shift(labels, bandwidth=8.0, class_names=("big", "small"),
                                 voxel_size=1.0, merge=m) for m in (True, False)]  # fmt: skip
    np.testing.assert_array_equal(pooled[0].particles.positions, pooled[1].particles.positions)


def test_connectivity_decides_whether_diagonal_voxels_join():
    labels = np.zeros((5, 5, 5), np.int16)
    labels[1, 1, 1] = labels[2, 2, 2] = 1
    faces = cluster_connected_components(labels, class_names=("a",), voxel_size=1.0)
    corners = cluster_connected_components(
        labels, class_names=("a",), voxel_size=1.0, connectivity=3
    )
    assert len(faces) == 2 and len(corners) == 1
    np.testing.assert_allclose(corners.particles.positions, [[1.5, 1.5, 1.5]])


def test_empty_label_map_gives_no_particles():
    labels = np.zeros((6, 7, 8), np.int16)
    for found in (
        cluster_mean_shift(labels, bandwidth=3.0, class_names=("a",), voxel_size=1.0),
        cluster_connected_components(labels, class_names=("a",), voxel_size=1.0),
    ):
        assert len(found) == 0 and found.particles.class_names == ("a",)


def test_segment_cluster_evaluate_recovers_simulated_particles():
    """End to end on a simulated tomogram: an oracle classifier that reads the true labels off
    its input, tiled segmentation, mean-shift clustering and scoring against the simulator's
    particle list. Two classes of similar size, bandwidth about their radius."""
    config = SimulationConfig(
        shape=(40, 64, 64),
        classes=("1bxn", "3cf3"),
        n_particles=10,
        occupancy=None,
        n_vesicles=0,
        n_gold=1,
        n_decoys=2,
        tilt_step=6.0,
    )
    sim = simulate_tomogram(jax.random.key(11), config)
    n_labels = len(config.label_names)

    def oracle(patches):
        return jax.nn.one_hot(jnp.round(patches).astype(jnp.int32), n_labels)

    seg = segment_tomogram(
        oracle, sim.labels.astype(np.float32), patch_size=24, n_classes=n_labels, progress=False
    )
    np.testing.assert_array_equal(seg.label_map, sim.labels)
    found = cluster_mean_shift(
        seg.label_map,
        bandwidth=6.0,
        class_names=config.label_names[1:],
        voxel_size=config.voxel_size,
        classes=config.classes,
        min_cluster_size=50,
    )
    assert found.particles.class_names == sim.particles.class_names == config.classes
    scores = evaluate_detections(found.particles, sim.particles, max_distance=3.0)
    assert scores.classification["f1"] == 1.0
    assert scores.mean_distance < 1.0


# ------------------------------------------------------------------------- template matching


def _geodesic_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Rotation angle between rotation matrices, pairwise (len(a), len(b)), in degrees."""
    trace = np.einsum("aij,bij->ab", a, b)
    return np.rad2deg(np.arccos(np.clip((trace - 1) / 2, -1, 1)))


def test_rotation_grid_covers_so3_within_its_step():
    grid = rotation_grid(30.0)
    assert grid.shape == (552, 3)
    rng = np.random.default_rng(5)
    q = rng.normal(size=(500, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    random = np.stack(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    ).transpose(2, 0, 1)
    nearest = _geodesic_deg(random, euler_zyz_to_matrix(grid)).min(axis=1)
    assert nearest.max() < 30.0
    assert len(rotation_grid(10.0)) == 413 * 36
    with pytest.raises(ValueError, match="angular_step_deg"):
        rotation_grid(0.0)


def _place(volume, density, centre):
    h = (density.shape[0] - 1) // 2
    box = tuple(slice(c - h, c + h + 1) for c in centre)
    volume[box] += density


@pytest.fixture(scope="module")
def rubisco():
    return load_template("1bxn", 10.0)


def test_ncc_of_a_template_with_itself_is_one(rubisco):
    volume = np.zeros((30, 32, 34), np.float32)
    _place(volume, rubisco.density, (14, 15, 17))
    angles = np.array([[40.0, 70.0, 10.0], [0.0, 0.0, 0.0], [0.0, 90.0, 0.0]])
    for mask in (None, rubisco.mask):
        match = match_template(volume, rubisco.density, mask, angles_deg=angles, progress=False)
        assert match.scores[14, 15, 17] == pytest.approx(1.0, abs=1e-5)
        assert match.rotation_index[14, 15, 17] == 1
        assert np.unravel_index(np.argmax(match.scores), volume.shape) == (14, 15, 17)
        assert match.scores.max() <= 1.0 + 1e-5 and match.scores.min() >= -1.0 - 1e-5
    with jax.enable_x64(True):
        exact = match_template(
            volume.astype(np.float64), rubisco.density, angles_deg=angles[1:2], progress=False
        )
    assert exact.scores.dtype == np.float64
    assert exact.scores[14, 15, 17] == pytest.approx(1.0, abs=1e-12)


def test_template_matching_finds_rotated_particles_and_their_rotations(rubisco):
    grid = rotation_grid(30.0)
    truth_rows = [17, 260, 431]
    angles = grid[np.r_[truth_rows, 3, 100, 200, 300, 500]]
    centres = [(12, 14, 13), (26, 30, 17), (14, 29, 33)]
    clean = np.zeros((40, 44, 46), np.float32)
    for row, centre in zip(truth_rows, centres):
        _place(clean, rotate_volume(rubisco.density, grid[row]), centre)
    match = match_template(clean, rubisco.density, rubisco.mask, angles_deg=angles, progress=False)
    for i, centre in enumerate(centres):
        assert match.scores[centre] == pytest.approx(1.0, abs=1e-5)
        assert match.rotation_index[centre] == i

    noisy = clean + np.random.default_rng(6).normal(0, 0.5, clean.shape).astype(np.float32)
    match = match_template(noisy, rubisco.density, rubisco.mask, angles_deg=angles, progress=False)
    found = pick_peaks({"1bxn": match}, voxel_size=10.0, min_distance=6.0, top_k=3)
    order = np.argsort(found.particles.positions[:, 0])
    np.testing.assert_array_equal(found.particles.positions[order], np.array(centres)[[0, 2, 1]])
    np.testing.assert_allclose(found.particles.angles_deg[order], grid[truth_rows][[0, 2, 1]])
    assert np.all(found.scores > 0.5) and np.all(found.sizes == rubisco.n_mask_voxels)


def test_template_matching_is_translation_equivariant(rubisco):
    rng = np.random.default_rng(7)
    angles = rotation_grid(60.0)[:6]
    volume = np.zeros((36, 36, 36), np.float32)
    _place(volume, rotate_volume(rubisco.density, angles[2]), (15, 17, 16))
    volume[8:28, 8:28, 8:28] += rng.normal(0, 0.3, (20, 20, 20)).astype(np.float32)
    shift = (3, -2, 4)
    moved = np.roll(volume, shift, axis=(0, 1, 2))  # the content stays clear of the border
    a = match_template(volume, rubisco.density, angles_deg=angles, progress=False)
    b = match_template(moved, rubisco.density, angles_deg=angles, progress=False)
    # Positions whose mask (radius 10) stays inside the volume before and after the shift;
    # nearer the border the mask reaches the padding, which does not move with the content.
    inner = (slice(10, 23), slice(12, 26), slice(10, 22))
    shifted = tuple(slice(s.start + d, s.stop + d) for s, d in zip(inner, shift))
    np.testing.assert_allclose(b.scores[shifted], a.scores[inner], atol=2e-5)
    np.testing.assert_array_equal(b.rotation_index[shifted], a.rotation_index[inner])


def test_wedge_weighted_template_matches_a_wedge_corrupted_particle_better(rubisco):
    angles = rotation_grid(45.0)[[5, 40, 77]]
    volume = np.zeros((32, 32, 32), np.float32)
    _place(volume, rotate_volume(rubisco.density, angles[1]), (16, 15, 17))
    wedge = missing_wedge_mask(volume.shape, -50.0, 50.0)
    corrupted = np.asarray(jnp.fft.irfftn(jnp.fft.rfftn(volume) * wedge, s=volume.shape))
    plain = match_template(corrupted, rubisco.density, angles_deg=angles, progress=False)
    aware = match_template(
        corrupted, rubisco.density, angles_deg=angles, wedge=(-50.0, 50.0), progress=False
    )
    assert aware.scores[16, 15, 17] > plain.scores[16, 15, 17] + 0.05
    assert aware.scores[16, 15, 17] > 0.95
    assert np.unravel_index(np.argmax(aware.scores), volume.shape) == (16, 15, 17)


def _match(scores, angle_rows=1):
    scores = np.asarray(scores, np.float32)
    return TemplateMatch(
        scores=scores,
        rotation_index=np.zeros(scores.shape, np.int32),
        angles_deg=np.zeros((angle_rows, 3)),
        mask_voxels=100,
    )


def test_standardized_scores_let_a_large_template_win_its_particle_from_a_small_one(rubisco):
    # A small template correlates with noise more widely than a large one: on raw NCC its noise
    # peaks take the large particle's voxels; as z-scores of each map the large template wins.
    small = load_template("3qm1", 10.0)
    volume = np.zeros((40, 40, 40), np.float32)
    _place(volume, rubisco.density, (20, 20, 20))
    sigma = 2 * rubisco.density[rubisco.mask > 0].std()
    volume += np.random.default_rng(0).normal(0, sigma, volume.shape).astype(np.float32)
    angles = rotation_grid(90.0)[:4]
    raw = {
        "3qm1": match_template(volume, small.density, small.mask, angles_deg=angles, progress=False),
        "1bxn": match_template(volume, rubisco.density, rubisco.mask, angles_deg=angles, progress=False),
    }  # fmt: skip
    kwargs = {"voxel_size": 10.0, "min_distance": {"3qm1": 2.0, "1bxn": 5.0}, "top_k": 1,
              "class_names": ("3qm1", "1bxn")}  # fmt: skip

    def large_ones_near_the_particle(matches):
        found = pick_peaks(matches, **kwargs)
        large = found.particles.class_ids == 2
        near = np.linalg.norm(found.particles.positions[large] - 20, axis=1) <= 2
        return int(near.sum()), found.scores[large], found.scores[~large]

    assert large_ones_near_the_particle(raw)[0] == 0
    standard = {name: match.standardized() for name, match in raw.items()}
    n_near, large_scores, small_scores = large_ones_near_the_particle(standard)
    assert n_near == 1 and large_scores.min() > small_scores.max()
    for name, match in standard.items():
        assert abs(np.median(match.scores)) < 1e-5
        assert np.median(np.abs(match.scores)) == pytest.approx(1 / 1.4826, rel=1e-4)
        np.testing.assert_array_equal(match.rotation_index, raw[name].rotation_index)
    blank = match_template(np.zeros((24, 24, 24), np.float32), small.density, angles_deg=angles,
                           progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="no spread"):
        blank.standardized()


def test_peak_picking_suppresses_neighbours_and_lets_the_best_class_win():
    a = np.zeros((20, 20, 20))
    b = np.zeros((20, 20, 20))
    a[5, 5, 5], a[5, 5, 8] = 0.9, 0.8  # 3 voxels apart
    a[15, 15, 15], b[15, 15, 15] = 0.6, 0.7  # both classes claim a voxel: b wins
    b[5, 14, 5] = 0.4
    a[12, 3, 3] = 0.3
    matches = {"a": _match(a), "b": _match(b)}
    found = pick_peaks(matches, voxel_size=1.0, min_distance=4.0, threshold=0.35)
    pos = {
        tuple(p): (k, s)
        for p, k, s in zip(
            found.particles.positions.astype(int), found.particles.class_ids, found.scores
        )
    }
    assert pos == {(5, 5, 5): (1, pytest.approx(0.9)), (15, 15, 15): (2, pytest.approx(0.7)),
                   (5, 14, 5): (2, pytest.approx(0.4))}  # fmt: skip
    # A distance of 2 for class a keeps both a peaks; b's 4 does not reach them.
    found = pick_peaks(matches, voxel_size=1.0, min_distance={"a": 2.0, "b": 4.0}, threshold=0.35)
    assert len(found) == 4
    # Per-class threshold and top_k.
    found = pick_peaks(matches, voxel_size=1.0, min_distance=2.0, threshold={"a": 0.85}, top_k=1)
    assert sorted(map(tuple, found.particles.positions.astype(int))) == [(5, 5, 5), (15, 15, 15)]
    with pytest.raises(ValueError, match="threshold, a top_k"):
        pick_peaks(matches, voxel_size=1.0, min_distance=2.0)


def test_a_peak_beyond_its_class_top_k_still_occupies_its_place():
    a = np.zeros((20, 20, 20))
    b = np.zeros((20, 20, 20))
    a[4, 4, 4], a[15, 15, 15], b[15, 15, 12] = 0.9, 0.8, 0.7
    matches = {"a": _match(a), "b": _match(b)}
    found = pick_peaks(matches, voxel_size=1.0, min_distance=4.0, top_k={"a": 1})
    np.testing.assert_array_equal(found.particles.positions, [[4, 4, 4]])


def test_peak_distance_between_classes_is_the_larger_one():
    a = np.zeros((20, 20, 20))
    b = np.zeros((20, 20, 20))
    a[10, 10, 5], b[10, 10, 10] = 0.9, 0.8  # 5 voxels apart
    matches = {"a": _match(a), "b": _match(b)}
    near = pick_peaks(matches, voxel_size=1.0, min_distance={"a": 6.0, "b": 1.0}, threshold=0.1)
    far = pick_peaks(matches, voxel_size=1.0, min_distance={"a": 5.0, "b": 1.0}, threshold=0.1)
    assert len(near) == 1 and len(far) == 2


# -------------------------------------------------------------------------------- evaluation


def _plist(positions, ids, names=("a", "b"), voxel_size=10.0):
    positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return ParticleList(
        class_names=names,
        class_ids=np.asarray(ids, dtype=np.int64),
        positions=positions,
        angles_deg=np.zeros_like(positions),
        voxel_size=voxel_size,
        tomo_name="t",
    )


def test_perfect_prediction_scores_one():
    truth = _plist([[1, 2, 3], [10, 10, 10], [20, 5, 5]], [1, 2, 2])
    result = evaluate_detections(truth, truth, max_distance=2.0)
    np.testing.assert_array_equal(result.f1, [1.0, 1.0])
    assert result.localization["f1"] == result.classification["f1"] == result.macro_f1 == 1.0
    np.testing.assert_array_equal(result.confusion, [[1, 0, 0], [0, 2, 0], [0, 0, 0]])
    assert result.mean_distance == 0.0


def test_distance_threshold_is_inclusive_and_beyond_it_is_a_miss():
    truth = _plist([[0, 0, 0], [20, 0, 0]], [1, 1])
    within = evaluate_detections(_plist([[0, 3, 4], [20, 0, 0]], [1, 1]), truth, max_distance=5.0)
    assert within.localization["tp"] == 2 and within.mean_distance == pytest.approx(2.5)
    beyond = evaluate_detections(
        _plist([[0, 3, 4.01], [20, 0, 0]], [1, 1]), truth, max_distance=5.0
    )
    assert (beyond.tp[0], beyond.fp[0], beyond.fn[0]) == (1, 1, 1)
    assert beyond.f1[0] == pytest.approx(0.5)


def test_hungarian_finds_more_matches_than_greedy_where_greedy_blocks():
    truth = _plist([[0, 0, 0], [0, 0, 2]], [1, 1])
    predicted = _plist([[0, 0, 1.2], [0, 0, 3.0]], [1, 1])
    hungarian = evaluate_detections(predicted, truth, max_distance=1.5)
    greedy = evaluate_detections(predicted, truth, max_distance=1.5, matching="greedy")
    assert hungarian.localization["tp"] == 2 and greedy.localization["tp"] == 1
    np.testing.assert_array_equal(hungarian.matches, [[0, 0], [1, 1]])
    np.testing.assert_array_equal(greedy.matches, [[0, 1]])
    # Scores make the greedy rule go by confidence: the second prediction first.
    by_score = evaluate_detections(
        predicted, truth, max_distance=1.5, matching="greedy", scores=[0.1, 0.9]
    )
    assert by_score.localization["tp"] == 2


def test_hungarian_matching_has_maximum_cardinality_on_random_scenes():
    rng = np.random.default_rng(8)
    for _ in range(5):
        truth = _plist(rng.uniform(0, 30, (60, 3)), np.ones(60, np.int64))
        predicted = _plist(rng.uniform(0, 30, (70, 3)), np.ones(70, np.int64))
        result = evaluate_detections(predicted, truth, max_distance=3.0)
        d = np.linalg.norm(predicted.positions[:, None] - truth.positions[None], axis=2)
        graph = scipy.sparse.csr_matrix(d <= 3.0)
        best = scipy.sparse.csgraph.maximum_bipartite_matching(graph, perm_type="column")
        assert result.localization["tp"] == np.sum(best >= 0)
        greedy = evaluate_detections(predicted, truth, max_distance=3.0, matching="greedy")
        assert greedy.localization["tp"] <= result.localization["tp"]
        assert np.all(result.distances <= 3.0)


def test_hand_computed_scores_and_confusion_matrix():
    # Truth: a at x=0, a at 10, b at 20, b at 30. Predicted: a near 0 (right), b near 10
    # (wrong class), b near 20 (right), a far away (false positive). The b at 30 is missed.
    truth = _plist([[0, 0, 0], [0, 0, 10], [0, 0, 20], [0, 0, 30]], [1, 1, 2, 2])
    predicted = _plist([[0, 0, 0.5], [0, 0, 10.5], [0, 0, 19], [0, 0, 50]], [1, 2, 2, 1])
    r = evaluate_detections(predicted, truth, max_distance=2.0)
    np.testing.assert_array_equal(r.confusion, [[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(r.tp, [1, 1])
    np.testing.assert_array_equal(r.fp, [1, 1])  # a: the far one; b: the one near an a
    np.testing.assert_array_equal(r.fn, [1, 1])  # a: the one found as b; b: the missed one
    np.testing.assert_allclose(r.precision, [0.5, 0.5])
    np.testing.assert_allclose(r.f1, [0.5, 0.5])
    assert (r.localization["tp"], r.localization["fp"], r.localization["fn"]) == (3, 1, 1)
    assert r.localization["f1"] == pytest.approx(0.75)
    assert r.classification["f1"] == pytest.approx(0.5)
    assert r.mean_distance == pytest.approx(2 / 3)
    data = json.loads(json.dumps(r.to_json()))
    assert data["classes"][0] == {
        "name": "a", "tp": 1, "fp": 1, "fn": 1, "precision": 0.5, "recall": 0.5, "f1": 0.5
    }  # fmt: skip
    assert data["confusion"]["rows_true"][-1] == "false_positive"
    table = r.table()
    assert table.startswith("| class") and "| all (position only)" in table and "missed" in table
    text = r.table("text")
    assert "|" not in text and "0.750" in text


def test_empty_lists_give_zero_or_undefined_scores():
    truth = _plist([[0, 0, 0]], [1])
    empty = _plist(np.zeros((0, 3)), [])
    nothing_found = evaluate_detections(empty, truth, max_distance=1.0)
    assert math.isnan(nothing_found.precision[0]) and nothing_found.recall[0] == 0.0
    assert nothing_found.f1[0] == 0.0 and math.isnan(nothing_found.f1[1])
    assert nothing_found.macro_f1 == 0.0  # class b has neither truth nor prediction
    both_empty = evaluate_detections(empty, empty, max_distance=1.0)
    assert math.isnan(both_empty.localization["f1"]) and math.isnan(both_empty.macro_f1)
    assert json.loads(json.dumps(both_empty.to_json()))["macro_f1"] is None


def test_evaluation_refuses_lists_that_cannot_be_compared():
    truth = _plist([[0, 0, 0]], [1])
    with pytest.raises(ValueError, match="same class names"):
        evaluate_detections(_plist([[0, 0, 0]], [1], names=("b", "a")), truth, max_distance=1)
    with pytest.raises(ValueError, match="voxel size"):
        evaluate_detections(_plist([[0, 0, 0]], [1], voxel_size=5.0), truth, max_distance=1)
    with pytest.raises(ValueError, match="greedy"):
        evaluate_detections(truth, truth, max_distance=1, scores=[1.0])
    with pytest.raises(ValueError, match="matching"):
        evaluate_detections(truth, truth, max_distance=1, matching="nearest")


# ----------------------------------------------------------------------------- DeepFinder XML

XML = """<objlist>
  <object tomo_idx="0" obj_id="0" class_label="2" x="34.5" y="16" z="64"
          psi="10.0" phi="20.0" the="30.0" cluster_size="120"/>
  <object tomo_idx="0" class_label="1" x="63" y="72" z="21"/>
  <object tomo_idx="1" class_label="1" x="1" y="2" z="3" cluster_size="7"/>
</objlist>
"""


def test_deepfinder_xml_reads_positions_in_zyx_and_keeps_raw_columns(tmp_path):
    path = tmp_path / "tomo1_objlist.xml"
    path.write_text(XML)
    raw = read_objlist_xml(path)
    np.testing.assert_array_equal(raw["class_label"], [2, 1, 1])
    np.testing.assert_array_equal(raw["cluster_size"], [120, -1, 7])
    np.testing.assert_array_equal(raw["obj_id"], [0, -1, -1])
    assert raw["phi"][0] == 20.0 and np.isnan(raw["the"][1])
    first = read_particles_xml(path, voxel_size=13.68, tomo_idx=0)
    np.testing.assert_array_equal(first.positions, [[64, 16, 34.5], [21, 72, 63]])
    np.testing.assert_array_equal(first.class_ids, [2, 1])
    assert first.class_names == ("class_1", "class_2") and first.tomo_name == "tomo1_objlist"
    assert np.all(first.angles_deg == 0) and first.voxel_size == 13.68
    second = read_particles_xml(
        path, voxel_size=13.68, tomo_idx=1, class_names=("ribo", "proteasome"), tomo_name="TS_2"
    )
    assert len(second) == 1 and second.class_names == ("ribo", "proteasome")
    np.testing.assert_array_equal(second.positions, [[3, 2, 1]])


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        (XML, {}, "tomo_idx"),
        (XML, {"tomo_idx": 5}, "no object has tomo_idx=5"),
        (XML, {"tomo_idx": 0, "class_names": ("a",)}, "name every label"),
        ('<objlist><object class_label="0" x="1" y="1" z="1"/></objlist>', {}, "start at 1"),
        ('<objlist><object class_label="1" x="1" y="1"/></objlist>', {}, "lacks the attribute"),
        ('<objlist><object class_label="1" x="a" y="1" z="1"/></objlist>', {}, "not a number"),
        ('<objlist><object class_label="1.5" x="1" y="1" z="1"/></objlist>', {}, "whole"),
        ('<particles><object class_label="1" x="1" y="1" z="1"/></particles>', {}, "objlist"),
        ("<objlist><object", {}, "well-formed"),
    ],
)
def test_deepfinder_xml_errors_say_what_is_wrong(tmp_path, text, kwargs, message):
    path = tmp_path / "list.xml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_particles_xml(path, voxel_size=10.0, **kwargs)


def test_deepfinder_xml_without_objects_is_an_empty_list(tmp_path):
    path = tmp_path / "empty.xml"
    path.write_text("<objlist/>")
    empty = read_particles_xml(path, voxel_size=10.0, class_names=("a",))
    assert len(empty) == 0 and empty.class_names == ("a",)
    with pytest.raises(FileNotFoundError):
        read_particles_xml(tmp_path / "missing.xml", voxel_size=10.0)
