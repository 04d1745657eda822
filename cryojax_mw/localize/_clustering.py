"""From a voxel-wise label map to a list of particles, as DeepFinder does (thesis ch. 4.2.1).

Two ways to group labelled voxels into objects:
- `cluster_mean_shift`: mean-shift with a flat kernel over the coordinates of all non-background
  voxels, classes pooled (DeepFinder's clustering step); the bandwidth is about the particle radius.
  Each cluster takes its most frequent class, so a particle whose voxels got mixed labels is still
  one particle.
  With a bandwidth per class, each class is clustered on its own and clusters within half a
  larger one's radius are merged into it, which keeps that property.
- `cluster_connected_components`: 3D connected components of each class separately.

Both give each cluster its size (voxels), its centroid (the mean of its voxels' coordinates, so
sub-voxel) and a score, drop clusters outside a size range (per class), and return `Detections`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import scipy.spatial

from ..io import ParticleList

# Seeds moved together in one jitted call: bounds the (seeds x kernel offsets) work arrays
# to about 2^22 entries (tens of MB), whatever the bandwidth.
_WORK_ENTRIES = 2**22
_MAX_ITER = 300
_STEPS_PER_ROUND = 20


@dataclasses.dataclass(frozen=True)
class Detections:
    """Particles found in a tomogram, with the size and score of each.

    Attributes:
        particles: the particles (positions in voxels, (z, y, x); angles zero where the method
            gives no orientation).
        sizes: int64 (n,), the number of voxels of each particle's cluster (clustering) or of its
            template's mask (template matching).
        scores: float64 (n,), the confidence of each particle: the mean probability of its class
            over its voxels or its size (clustering), the normalised cross-correlation (template
            matching). Higher is more confident.
    """

    particles: ParticleList
    sizes: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        n = len(self.particles)
        sizes = np.asarray(self.sizes, dtype=np.int64).reshape(-1)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if sizes.shape != (n,) or scores.shape != (n,):
            raise ValueError(
                f"sizes and scores need one value per particle ({n}), got {sizes.shape} and "
                f"{scores.shape}"
            )
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "scores", scores)

    def __len__(self) -> int:
        return len(self.particles)


def _per_class(
    value, class_names: Sequence[str], default, what: str, *, nonnegative: bool = True
) -> np.ndarray:
    """A per-class setting (one value, or a mapping from class name to value with `default` for
    the classes it leaves out; None means no limit, +inf) as a float array indexed by class id
    (entry 0, background, holds `default`)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(class_names))
        if unknown:
            raise ValueError(
                f"{what} names unknown classes {unknown}; the classes are {list(class_names)}"
            )
        values = [default] + [value.get(name, default) for name in class_names]
    else:
        values = [default] + [value] * len(class_names)
    out = np.array([np.inf if v is None else v for v in values], dtype=np.float64)
    if np.any(np.isnan(out)) or (nonnegative and np.any(out[1:] < 0)):
        raise ValueError(f"{what} must be >= 0, got {value!r}")
    return out


def _check_label_map(label_map, class_names, classes):
    """The label map relabelled to the output classes (`classes`, default all of `class_names`;
    other labels become background), the output class names, and for each output id the label
    it came from (its channel in a probability map)."""
    labels = np.asarray(label_map)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"label_map must be an integer (z, y, x) array, got shape {labels.shape} dtype "
            f"{labels.dtype}"
        )
    names = tuple(class_names)
    if labels.size and (labels.min() < 0 or labels.max() > len(names)):
        raise ValueError(
            f"label_map holds labels {labels.min()}..{labels.max()} but class_names names "
            f"{len(names)} classes (label k is class_names[k - 1], 0 is background); give a name "
            "to every label"
        )
    if classes is None:
        return labels, names, np.arange(len(names) + 1)
    classes = tuple(classes)
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise ValueError(f"classes {unknown} are not in class_names {list(names)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes lists a class twice: {list(classes)}")
    channels = np.array([0] + [names.index(c) + 1 for c in classes])
    relabel = np.zeros(len(names) + 1, dtype=np.int16)
    relabel[channels] = np.arange(len(channels))
    return relabel[labels], classes, channels


def _summary(coords, cluster, labels, n_clusters, n_labels):
    """Size, majority class (ties: the lowest id; never background) and centroid of each
    cluster."""
    sizes = np.bincount(cluster, minlength=n_clusters)
    votes = np.bincount(cluster * n_labels + labels, minlength=n_clusters * n_labels)
    votes = votes.reshape(n_clusters, n_labels)
    votes[:, 0] = -1  # members are foreground voxels; background never wins
    winner = np.argmax(votes, axis=1)
    centroids = (
        np.stack(
            [np.bincount(cluster, weights=coords[:, a], minlength=n_clusters) for a in range(3)], 1
        )
        / np.maximum(sizes, 1)[:, None]
    )
    return sizes, winner, centroids


def _cluster_table(
    coords: np.ndarray,
    cluster: np.ndarray,
    labels: np.ndarray,
    n_clusters: int,
    *,
    class_names: tuple[str, ...],
    channels: np.ndarray,
    scores,
    min_size: np.ndarray,
    max_size: np.ndarray,
    voxel_size: float,
    tomo_name: str,
) -> Detections:
    """Size, majority class, centroid and score of each cluster; clusters outside the size range
    of their class dropped; ordered by class, then by decreasing score."""
    sizes, winner, centroids = _summary(coords, cluster, labels, n_clusters, len(class_names) + 1)
    if scores is None:
        score = sizes.astype(np.float64)
    else:
        if scores.ndim == 3:
            member_scores = scores[tuple(coords.T)]
        else:
            member_scores = scores[(*coords.T, channels[winner[cluster]])]
        score = np.bincount(
            cluster, weights=member_scores.astype(np.float64), minlength=n_clusters
        ) / np.maximum(sizes, 1)
    keep = (sizes > 0) & (sizes >= min_size[winner]) & (sizes <= max_size[winner])
    order = np.flatnonzero(keep)
    order = order[np.lexsort((-score[order], winner[order]))]
    particles = ParticleList(
        class_names=class_names,
        class_ids=winner[order].astype(np.int64),
        positions=centroids[order],
        angles_deg=np.zeros((len(order), 3)),
        voxel_size=voxel_size,
        tomo_name=tomo_name,
    )
    return Detections(particles, sizes[order], score[order])


def _check_scores(scores, shape, n_labels):
    if scores is None:
        return None
    scores = np.asarray(scores)
    if scores.shape not in (shape, (*shape, n_labels)):
        raise ValueError(
            f"scores must have the label map's shape {shape} or {(*shape, n_labels)} "
            f"(class probabilities, background first), got {scores.shape}"
        )
    return scores


def _kernel_offsets(bandwidth: float) -> np.ndarray:
    """Integer offsets o from round(c) of every voxel that can lie within `bandwidth` of c: each
    coordinate of c - round(c) is at most 1/2, so |o| <= bandwidth + sqrt(3) / 2."""
    reach = bandwidth + math.sqrt(3) / 2
    r = math.ceil(reach)
    g = np.arange(-r, r + 1)
    offsets = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    return offsets[np.sum(offsets * offsets, axis=1) <= reach * reach].astype(np.int32)


def _window(occupied, strides, offsets, c, bandwidth):
    """Voxel count and offset sum of the occupied voxels within `bandwidth` of each centre c.

    Windows are gathered from the dense occupancy grid (the voxel grid is the cell grid) at
    round(c) + offsets. |round(c) + o - c|^2 is expanded as |delta|^2 + 2 delta.o + |o|^2 so that
    the distance test is one small matrix product, and offset sums are integers below 2^24, exact
    in float32.
    """
    off = offsets.astype(c.dtype)
    base = jnp.round(c)
    delta = base - c
    d2 = jnp.sum(delta * delta, axis=1)[:, None] + 2 * (delta @ off.T) + jnp.sum(off * off, 1)
    flat = (base.astype(jnp.int32) * strides).sum(axis=1)[:, None] + (offsets * strides).sum(1)
    w = (d2 <= bandwidth * bandwidth) & occupied[flat]
    count = jnp.sum(w, axis=1, dtype=jnp.int32)
    return base, count, w.astype(c.dtype) @ off


@functools.partial(jax.jit, static_argnames=("n_steps",))
def _shift_seeds(occupied, strides, offsets, seeds, bandwidth, n_steps):
    """`n_steps` flat-kernel mean-shift steps of each seed; a seed that moves less than
    1e-3 * bandwidth stops (as scikit-learn's). Returns the positions and which have stopped."""

    def step(state, _):
        c, done = state
        base, count, offset_sum = _window(occupied, strides, offsets, c, bandwidth)
        new = jnp.where(count[:, None] > 0, base + offset_sum / jnp.maximum(count, 1)[:, None], c)
        moved = jnp.sqrt(jnp.sum((new - c) ** 2, axis=1))
        c = jnp.where(done[:, None], c, new)
        return (c, done | (moved < 1e-3 * bandwidth)), None

    done = jnp.zeros(seeds.shape[0], dtype=bool)
    (c, done), _ = jax.lax.scan(step, (seeds, done), None, length=n_steps)
    return c, done


@jax.jit
def _window_counts(occupied, strides, offsets, c, bandwidth):
    return _window(occupied, strides, offsets, c, bandwidth)[1]


def _filled(block: np.ndarray, size: int) -> np.ndarray:
    """`block` with its last row repeated up to `size` rows: one shape for every jitted call."""
    return np.concatenate([block, np.repeat(block[-1:], size - len(block), axis=0)])


def mean_shift(points, bandwidth: float):
    """Mean-shift clustering of integer voxel coordinates with a flat kernel.

    As scikit-learn's `MeanShift(bandwidth, bin_seeding=True)` (which DeepFinder uses): seeds are
    the occupied cells of a grid of spacing `bandwidth`; each seed moves to the mean of the points
    within `bandwidth` of it until it moves less than 1e-3 * bandwidth (at most 300 steps); modes
    are taken by decreasing number of points in their window, and a mode within `bandwidth` of one
    already taken is dropped; every point joins its nearest mode.

    Args:
        points: int (n, 3) voxel coordinates (z, y, x), n >= 1, all distinct.
        bandwidth: kernel radius in voxels, > 0.

    Returns:
        (centres float64 (k, 3), assignment int64 (n,) index of each point's centre).
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"points must be a non-empty (n, 3) array, got shape {points.shape}")
    if not np.issubdtype(points.dtype, np.integer):
        raise ValueError(f"points must be integer voxel coordinates, got dtype {points.dtype}")
    if not (np.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a positive number of voxels, got {bandwidth}")
    offsets = _kernel_offsets(bandwidth)
    pad = int(np.abs(offsets).max()) + 1
    low = points.min(axis=0)
    local = (points - low + pad).astype(np.int64)
    shape = tuple(int(s) for s in local.max(axis=0) + pad + 1)
    if np.prod(shape, dtype=np.int64) >= 2**31:
        raise ValueError(
            f"the points span {shape} voxels, too many for int32 indexing; cluster a sub-volume"
        )
    occupied = np.zeros(shape, dtype=bool)
    occupied[tuple(local.T)] = True
    strides = np.array([shape[1] * shape[2], shape[2], 1], dtype=np.int32)

    # Seeds on the grid of the original coordinates, as scikit-learn's bin seeding (unique
    # cells found on one int64 key per point: a 1D sort, much faster than unique rows).
    cells = np.round(points / bandwidth).astype(np.int64)
    cells -= cells.min(axis=0)
    extent = cells.max(axis=0) + 1
    keys = np.unique((cells[:, 0] * extent[1] + cells[:, 1]) * extent[2] + cells[:, 2])
    cells = np.stack(np.unravel_index(keys, tuple(extent)), axis=1)
    cells += np.round(points.min(axis=0) / bandwidth).astype(np.int64)
    modes = (cells * bandwidth - low + pad).astype(np.float32)
    device = (jnp.asarray(occupied.ravel()), jnp.asarray(strides), jnp.asarray(offsets))
    bw = jnp.float32(bandwidth)
    # Seeds move in rounds of a few steps and those that stopped leave, so the slow tail runs on
    # its own (on a simulated 200 x 512 x 512 label map: median 22 steps, 1 % of seeds > 87).
    # Chunks are filled up to a size from a short list (the largest, 1/8 and 1/64 of it for the
    # tail), so each function compiles at most three times.
    chunk = min(max(64, _WORK_ENTRIES // len(offsets)), 1 << (len(modes) - 1).bit_length())
    active = np.arange(len(modes))
    for _ in range(-(-_MAX_ITER // _STEPS_PER_ROUND)):
        if len(active) == 0:
            break
        size = chunk
        for _ in range(2):
            if size // 8 >= max(len(active), 64):
                size //= 8
        stopped = np.zeros(len(active), dtype=bool)
        for start in range(0, len(active), size):
            rows = active[start : start + size]
            block = jnp.asarray(_filled(modes[rows], size))
            c, done = jax.device_get(_shift_seeds(*device, block, bw, _STEPS_PER_ROUND))
            modes[rows] = c[: len(rows)]
            stopped[start : start + len(rows)] = done[: len(rows)]
        active = active[~stopped]
    counts = np.zeros(len(modes), dtype=np.int64)
    for start in range(0, len(modes), chunk):
        block = modes[start : start + chunk]
        counts[start : start + chunk] = jax.device_get(
            _window_counts(*device, jnp.asarray(_filled(block, chunk)), bw)
        )[: len(block)]
    modes = modes.astype(np.float64)

    modes, first = np.unique(modes, axis=0, return_index=True)
    counts = counts[first]
    order = np.lexsort((*modes.T[::-1], -counts))  # most populated first; ties by position
    tree = scipy.spatial.cKDTree(modes)
    suppressed = np.zeros(len(modes), dtype=bool)
    kept = []
    for i in order:
        if not suppressed[i]:
            kept.append(i)
            suppressed[tree.query_ball_point(modes[i], bandwidth)] = True
    centres = modes[kept]
    _, assignment = scipy.spatial.cKDTree(centres).query(local)
    return centres + low - pad, assignment.astype(np.int64)


def _merge_nearby(coords, cluster, labels, n_clusters, radii):
    """Clusters (ids `cluster` of the points `coords` with class `labels`) merged into larger ones
    whose centre lies within half the radius of their class (`radii`, by class id): the largest
    cluster takes every smaller one around it first. Two particles that do not overlap have
    centres at least the sum of their radii apart, so half a radius joins only pieces of one
    particle (a full radius also swallowed small neighbours: on simulated tomograms recall fell
    from 0.81 to 0.61). Returns the new ids and their number."""
    sizes, winner, centres = _summary(coords, cluster, labels, n_clusters, len(radii))
    tree = scipy.spatial.cKDTree(centres)
    owner = np.full(n_clusters, -1, dtype=np.int64)
    for i in np.lexsort((np.arange(n_clusters), -sizes)):  # largest first; ties by id
        if owner[i] < 0:
            near = tree.query_ball_point(centres[i], radii[winner[i]] / 2)
            near = np.asarray(near, dtype=np.int64)
            owner[near[owner[near] < 0]] = i
    merged, new_ids = np.unique(owner[cluster], return_inverse=True)
    return new_ids.reshape(-1), len(merged)


def cluster_mean_shift(
    label_map,
    *,
    bandwidth: float | Mapping[str, float],
    class_names: Sequence[str],
    voxel_size: float,
    merge: bool = True,
    min_cluster_size: int | Mapping[str, int] = 1,
    max_cluster_size: int | Mapping[str, int] | None = None,
    scores=None,
    classes: Sequence[str] | None = None,
    tomo_name: str = "tomogram",
) -> Detections:
    """Particles from a label map by mean-shift clustering (DeepFinder's clustering step).

    With one `bandwidth`, all non-background voxels (classes pooled) are clustered by
    `mean_shift` with a flat kernel of that radius, as DeepFinder does; each cluster becomes one
    particle whose class is the most frequent label among its voxels (ties: the lowest class id),
    whose position is the mean of its voxels' coordinates and whose size is its number of voxels
    (all labels counted). One radius for particles of very different sizes splits the large ones
    into several clusters; a per-class `bandwidth` clusters each class's voxels on their own with
    that class's radius instead, then (`merge`) joins each cluster to a larger one whose centre
    lies within half the larger one's class radius, so that a particle whose voxels got mixed labels
    is still one particle, of its majority class.

    Args:
        label_map: int (z, y, x), 0 = background, k = class_names[k - 1].
        bandwidth: kernel radius in voxels, about the particles' radius (DeepFinder's
            `clustRadius`), or a mapping from each clustered class's name to its radius.
        class_names: names of the labels 1..K.
        voxel_size: Angstrom per voxel, carried into the particle list.
        merge: with a per-class bandwidth, merge clusters whose centres lie within half a larger
            cluster's class radius (False: one particle per class cluster).
        min_cluster_size: smallest cluster kept, in voxels (after merging): one number or a
            mapping from class name (of the clustered classes) to number (classes left out: 1).
            Smaller clusters are false positives in the thesis's analysis.
        max_cluster_size: largest cluster kept, same forms (None: no limit).
        scores: optional per-voxel confidence, (z, y, x) (e.g. `Segmentation.max_probability`:
            score = its mean over the cluster) or (z, y, x, K + 1) class probabilities over all
            of `class_names` (score = the mean probability of the cluster's class over its
            voxels). Default: the size.
        classes: names of the classes to cluster (default all), which are also the particle
            list's classes, in this order; voxels of other classes count as background (e.g.
            leave membranes out, and get a list comparable with the simulator's particles).
        tomo_name: name written in the particle list.

    Returns:
        `Detections` ordered by class, then by decreasing score; angles are zero.
    """
    labels, names, channels = _check_label_map(label_map, class_names, classes)
    scores = _check_scores(scores, labels.shape, len(class_names) + 1)
    min_size = _per_class(min_cluster_size, names, 1, "min_cluster_size")
    max_size = _per_class(max_cluster_size, names, None, "max_cluster_size")
    coords = np.argwhere(labels > 0)
    voxel_labels = labels[tuple(coords.T)].astype(np.int64)
    cluster, n_clusters = np.zeros(len(coords), dtype=np.int64), 0
    if isinstance(bandwidth, Mapping):
        missing = [n for n in names if n not in bandwidth]
        if missing:
            raise ValueError(
                f"a per-class bandwidth needs every clustered class; missing {missing} (classes "
                f"{list(names)})"
            )
        radii = _per_class(bandwidth, names, None, "bandwidth")
        groups = [(voxel_labels == k, radii[k]) for k in range(1, len(names) + 1)]
    else:
        groups = [(np.ones(len(coords), dtype=bool), bandwidth)]
    for _, radius in groups:  # checked before any work, even for an empty label map
        if not (np.isfinite(radius) and radius > 0):
            raise ValueError(f"bandwidth must be a positive number of voxels, got {bandwidth!r}")
    for members, radius in groups:
        if members.any():
            _, found = mean_shift(coords[members], radius)
            cluster[members] = found + n_clusters
            n_clusters += int(found.max()) + 1
    if merge and len(groups) > 1 and n_clusters > 1:
        cluster, n_clusters = _merge_nearby(coords, cluster, voxel_labels, n_clusters, radii)
    return _cluster_table(
        coords,
        cluster,
        voxel_labels,
        n_clusters,
        class_names=names,
        channels=channels,
        scores=scores,
        min_size=min_size,
        max_size=max_size,
        voxel_size=voxel_size,
        tomo_name=tomo_name,
    )


def cluster_connected_components(
    label_map,
    *,
    class_names: Sequence[str],
    voxel_size: float,
    min_cluster_size: int | Mapping[str, int] = 1,
    max_cluster_size: int | Mapping[str, int] | None = None,
    scores=None,
    classes: Sequence[str] | None = None,
    connectivity: int = 1,
    tomo_name: str = "tomogram",
) -> Detections:
    """Particles from a label map as the 3D connected components of each class.

    Args:
        label_map: int (z, y, x), 0 = background, k = class_names[k - 1].
        class_names: names of the labels 1..K.
        voxel_size: Angstrom per voxel, carried into the particle list.
        min_cluster_size: smallest component kept, in voxels (number or per-class mapping).
        max_cluster_size: largest component kept (None: no limit).
        scores: optional (z, y, x) or (z, y, x, K + 1) confidence, as in `cluster_mean_shift`.
        classes: names of the classes to label (default all), which are also the particle
            list's classes, in this order.
        connectivity: 1 (faces, 6 neighbours), 2 (and edges, 18) or 3 (and corners, 26).
        tomo_name: name written in the particle list.

    Returns:
        `Detections` ordered by class, then by decreasing score; angles are zero.
    """
    labels, names, channels = _check_label_map(label_map, class_names, classes)
    scores = _check_scores(scores, labels.shape, len(class_names) + 1)
    if connectivity not in (1, 2, 3):
        raise ValueError(f"connectivity must be 1, 2 or 3, got {connectivity}")
    structure = scipy.ndimage.generate_binary_structure(3, connectivity)
    min_size = _per_class(min_cluster_size, names, 1, "min_cluster_size")
    max_size = _per_class(max_cluster_size, names, None, "max_cluster_size")
    components = np.zeros(labels.shape, dtype=np.int64)
    n_clusters = 0
    for k in np.unique(labels[labels > 0]):
        component, n = scipy.ndimage.label(labels == k, structure=structure)
        inside = component > 0
        components[inside] = component[inside] + n_clusters
        n_clusters += n
    coords = np.argwhere(components > 0)
    return _cluster_table(
        coords,
        components[tuple(coords.T)] - 1,
        labels[tuple(coords.T)].astype(np.int64),
        n_clusters,
        class_names=names,
        channels=channels,
        scores=scores,
        min_size=min_size,
        max_size=max_size,
        voxel_size=voxel_size,
        tomo_name=tomo_name,
    )
