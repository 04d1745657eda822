"""Template matching, the baseline DeepFinder is compared with (thesis ch. 1.3 and 4.3).

`match_template` slides a template over the tomogram in every orientation of a rotation grid and
keeps, per voxel, the best score and the rotation that gave it. The score is the normalised
cross-correlation under a mask (Roseman's fast local correlation, the standard cryo-ET score):
at a position x, with M the mask placed at x (N voxels),

    NCC(x) = sum_M (f - mean_M f)(t - mean_M t) / (N std_M f std_M t),

the Pearson correlation of the tomogram f and the template t over the mask, in [-1, 1], 1 where
the tomogram is an affine copy of the template. The tomogram's local mean and variance under the
mask come from FFT correlations with the mask (rfftn, jitted, one `lax.scan` over rotations).
With the default spherical mask they are computed once; a template-shaped mask turns with the
template and they are recomputed for each rotation (two more correlations per rotation).
Optionally the rotated template is seen through the missing wedge (`wedge`), as the particles in
the tomogram are.

`pick_peaks` turns the score maps of several classes into particles: a voxel belongs to the class
with the highest score there (Best et al. 2007: when templates compete for a position, the class
with the highest score wins), peaks are local maxima of that score, and a greedy non-maximum
suppression keeps peaks at least a per-class distance apart.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.spatial
from tqdm import tqdm

from ..io import ParticleList
from ..operators import missing_wedge_mask
from ..simulate import euler_zyz_to_matrix, rotate_with_matrix
from ._clustering import Detections, _per_class
from ._inference import real_volume

# Local variances below this fraction of the tomogram's variance are treated as empty (score 0):
# there the correlation is 0/0 and round-off of the FFTs decides its value.
_MIN_RELATIVE_VARIANCE = 1e-3


def rotation_grid(angular_step_deg: float) -> np.ndarray:
    """Rotations covering SO(3) about evenly, as RELION ZYZ Euler angles.

    The direction the template's z axis is turned to, (rot, tilt), runs over a Fibonacci sphere of
    round(4 pi / step^2) points (each point owns about step^2 steradians, so neighbours are about a
    step apart), and the in-plane angle psi over 0..360 degrees by round(360 / step) equal steps;
    a 30 degree step gives 46 x 12 = 552 rotations, 10 degrees 413 x 36 = 14868. The first
    rotation is close to the identity (tilt < step); no symmetry is assumed.

    Args:
        angular_step_deg: angular spacing in degrees, in (0, 180].

    Returns:
        float64 (n, 3) angles (rot, tilt, psi) in degrees.
    """
    step = float(angular_step_deg)
    if not 0 < step <= 180:
        raise ValueError(f"angular_step_deg must lie in (0, 180], got {angular_step_deg}")
    step_rad = math.radians(step)
    n_dir = max(1, round(4 * math.pi / step_rad**2))
    i = np.arange(n_dir)
    cos_tilt = 1 - (2 * i + 1) / n_dir
    rot = np.rad2deg(np.mod(i * math.pi * (3 - math.sqrt(5)), 2 * math.pi))
    tilt = np.rad2deg(np.arccos(cos_tilt))
    n_psi = max(1, round(360 / step))
    psi = np.arange(n_psi) * 360.0 / n_psi
    directions = np.repeat(np.stack([rot, tilt], axis=1), n_psi, axis=0)
    return np.concatenate([directions, np.tile(psi, n_dir)[:, None]], axis=1)


@dataclasses.dataclass(frozen=True)
class TemplateMatch:
    """Result of matching one template over a tomogram.

    Attributes:
        scores: (z, y, x), the best normalised cross-correlation over the rotations of the
            template centred at each voxel (0 where the tomogram is flat under the mask); float32,
            float64 for a float64 tomogram with x64 enabled.
        rotation_index: int32 (z, y, x), the rotation that gave it (row of `angles_deg`).
        angles_deg: float64 (n_rotations, 3), the rotations tried (RELION ZYZ, degrees).
        mask_voxels: number of voxels of the template's mask.
    """

    scores: np.ndarray
    rotation_index: np.ndarray
    angles_deg: np.ndarray
    mask_voxels: int

    def standardized(self) -> TemplateMatch:
        """The same match with its scores as robust z-scores of the map: (s - median) / (1.4826 MAD).

        Correlations of different templates are not on one scale: a small template's correlation
        with noise spreads wider (about 1 / sqrt(mask voxels)), so its noise peaks outscore a large
        template's true ones and win every competition for a voxel in `pick_peaks`. Most voxels of
        a tomogram are background, so the median and the MAD measure each map's noise, and
        standardised maps of different templates can compete. Raises ValueError for a map whose
        MAD is 0 (a blank tomogram).
        """
        scores = np.asarray(self.scores)
        centre = np.median(scores)
        spread = 1.4826 * np.median(np.abs(scores - centre))
        if not spread > 0:
            raise ValueError(
                "the score map has no spread (MAD 0): the tomogram is flat under the mask almost "
                "everywhere, so there is no noise level to standardise by"
            )
        return dataclasses.replace(self, scores=((scores - centre) / spread).astype(scores.dtype))


def _sphere(m: int, dtype) -> np.ndarray:
    r = np.arange(m) - (m - 1) / 2
    d2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    return (d2 <= ((m - 1) / 2) ** 2).astype(dtype)


def _embed(block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """A centred (m, m, m) block placed with its centre voxel at index 0, wrapping around."""
    m = block.shape[0]
    idx = [(np.arange(m) - (m - 1) // 2) % n for n in shape]
    return jnp.zeros(shape, block.dtype).at[np.ix_(*idx)].set(block)


def _local_variance(f_hat, f2_hat, mask, n, shape, out_shape):
    """Variance of the tomogram under the mask centred at each voxel (FFT correlations)."""
    crop = tuple(slice(0, k) for k in out_shape)
    m_hat = jnp.conj(jnp.fft.rfftn(_embed(mask, shape)))
    mean = jnp.fft.irfftn(f_hat * m_hat, s=shape)[crop] / n
    square = jnp.fft.irfftn(f2_hat * m_hat, s=shape)[crop] / n
    return square - mean * mean


@functools.partial(
    jax.jit, static_argnames=("shape", "out_shape", "rotate_mask"), donate_argnums=(7, 8)
)
def _match_rotations(
    f_hat, f2_hat, variance, template, mask, wedge, matrices, best, best_index, first_index,
    *, shape, out_shape, rotate_mask,
):  # fmt: skip
    m = template.shape[0]
    crop = tuple(slice(0, n) for n in out_shape)

    def one(carry, item):
        best, best_index = carry
        matrix, index = item
        t = rotate_with_matrix(template, matrix, m)
        msk = (rotate_with_matrix(mask, matrix, m) > 0.5).astype(t.dtype) if rotate_mask else mask
        if wedge is not None:
            # Filter in a box twice the template's size so the wedge's streaks do not wrap.
            pad = (wedge.shape[0] - m) // 2
            box = jnp.pad(t, pad)
            inner = (slice(pad, pad + m),) * 3
            t = jnp.fft.irfftn(jnp.fft.rfftn(box) * wedge, s=box.shape)[inner]
        n = jnp.sum(msk)
        mean = jnp.sum(msk * t) / n
        std = jnp.sqrt(jnp.maximum(jnp.sum(msk * t * t) / n - mean * mean, 0.0))
        normalised = msk * (t - mean) / jnp.where(std > 0, std, 1.0)
        t_hat = jnp.conj(jnp.fft.rfftn(_embed(normalised, shape)))
        numerator = jnp.fft.irfftn(f_hat * t_hat, s=shape)[crop]
        var = _local_variance(f_hat, f2_hat, msk, n, shape, out_shape) if rotate_mask else variance
        ok = var > _MIN_RELATIVE_VARIANCE
        score = jnp.where(ok, numerator / (n * jnp.sqrt(jnp.where(ok, var, 1.0))), 0.0)
        better = score > best
        best = jnp.where(better, score, best)
        best_index = jnp.where(better, index, best_index)
        return (best, best_index), None

    indices = first_index + jnp.arange(matrices.shape[0], dtype=jnp.int32)
    (best, best_index), _ = jax.lax.scan(one, (best, best_index), (matrices, indices))
    return best, best_index


def match_template(
    tomogram,
    template,
    mask=None,
    *,
    angles_deg,
    wedge: tuple[float, float] | None = None,
    rotations_per_call: int = 16,
    progress: bool = True,
) -> TemplateMatch:
    """Normalised cross-correlation of a template over a tomogram, best over a rotation grid.

    The tomogram is standardised (the score does not depend on its offset or scale) and padded
    with its mean (zero after standardisation) by at least a template's width per axis, so the
    circular FFT correlations do not wrap around; positions whose mask reaches past the border see
    that flat padding.

    Args:
        tomogram: real (z, y, x) array; computed in float32, or float64 for a float64 array with
            x64 enabled.
        template: (m, m, m) density, m odd, centred on its central voxel (e.g.
            `load_template(...).density`); rotated about that voxel in RELION's convention, as the
            simulator places particles (`rotate_volume`), with trilinear interpolation.
        mask: (m, m, m) region where the correlation is computed (e.g. `Template.mask`); it turns
            with the template (value > 0.5 after rotation). Default: the ball inscribed in the
            box, which needs no turning, so the tomogram's local statistics are computed once.
        angles_deg: (n, 3) rotations (rot, tilt, psi) in degrees to try, e.g.
            `rotation_grid(30.0)`.
        wedge: (tilt_min, tilt_max) in degrees to see each rotated template through the missing
            wedge of that tilt range (`missing_wedge_mask`), or None.
        rotations_per_call: rotations per jitted call (one compilation; the progress bar moves
            once per call).
        progress: show a progress bar.

    Returns:
        A `TemplateMatch` of the tomogram's shape.
    """
    volume = real_volume(tomogram)
    # float64 only where JAX computes in float64 (x64 enabled).
    dtype = jax.dtypes.canonicalize_dtype(np.float64 if volume.dtype == np.float64 else np.float32)
    t = np.asarray(template, dtype=dtype)
    m = t.shape[0]
    if t.ndim != 3 or t.shape != (m, m, m) or m % 2 == 0:
        raise ValueError(f"template must be a cube with an odd edge (m, m, m), got {t.shape}")
    if any(m > n for n in volume.shape):
        raise ValueError(f"template ({m}^3) is larger than the tomogram {volume.shape}")
    rotate_mask = mask is not None
    msk = _sphere(m, dtype) if mask is None else (np.asarray(mask) > 0.5).astype(dtype)
    if msk.shape != t.shape:
        raise ValueError(f"mask must have the template's shape {t.shape}, got {msk.shape}")
    if msk.sum() < 2:
        raise ValueError("the mask must cover at least 2 voxels")
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3)
    if len(angles) == 0:
        raise ValueError("angles_deg holds no rotation; give at least one (e.g. rotation_grid)")
    if int(rotations_per_call) < 1:
        raise ValueError(f"rotations_per_call must be >= 1, got {rotations_per_call}")

    std = volume.std()
    f = (volume - volume.mean()) / (std if std > 0 else 1.0)
    half = (m - 1) // 2
    shape = tuple(scipy.fft.next_fast_len(n + 2 * half, real=True) for n in volume.shape)
    # Circular correlation reaches `half` voxels past each side: zeros (the mean) there.
    padded = np.zeros(shape, dtype=dtype)
    padded[tuple(slice(0, n) for n in volume.shape)] = f
    f_hat = jnp.fft.rfftn(jnp.asarray(padded))
    f2_hat = jnp.fft.rfftn(jnp.asarray(padded) ** 2)
    out_shape = volume.shape
    variance = None
    if not rotate_mask:
        variance = jax.jit(_local_variance, static_argnums=(4, 5))(
            f_hat, f2_hat, jnp.asarray(msk), jnp.asarray(msk.sum()), shape, out_shape
        )
    w = None
    if wedge is not None:
        lo, hi = wedge
        w = missing_wedge_mask((2 * m + 1,) * 3, lo, hi, dtype=dtype)

    per_call = min(int(rotations_per_call), len(angles))
    n_calls = -(-len(angles) // per_call)
    matrices = euler_zyz_to_matrix(angles).astype(dtype)
    # The last call repeats the last rotation; a repeat never beats itself (strict >).
    filler = np.repeat(matrices[-1:], n_calls * per_call - len(angles), axis=0)
    filled = np.concatenate([matrices, filler])
    best = jnp.full(out_shape, -jnp.inf, dtype=dtype)
    best_index = jnp.zeros(out_shape, dtype=jnp.int32)
    tj, mj = jnp.asarray(t), jnp.asarray(msk)
    for call in tqdm(range(n_calls), desc="template matching", unit="call", disable=not progress):
        chunk = jnp.asarray(filled[call * per_call : (call + 1) * per_call])
        best, best_index = _match_rotations(
            f_hat, f2_hat, variance, tj, mj, w, chunk, best, best_index,
            jnp.int32(call * per_call),
            shape=shape, out_shape=out_shape, rotate_mask=rotate_mask,
        )  # fmt: skip
    scores, index = jax.device_get((best, best_index))
    # Filler rotations (indices past the end) repeat the last one and never beat it (strict >).
    index = np.minimum(index, len(angles) - 1).astype(np.int32)
    return TemplateMatch(np.asarray(scores), index, angles, int(msk.sum()))


def pick_peaks(
    matches: Mapping[str, TemplateMatch],
    *,
    voxel_size: float,
    min_distance: float | Mapping[str, float],
    threshold: float | Mapping[str, float] | None = None,
    top_k: int | Mapping[str, int] | None = None,
    class_names: Sequence[str] | None = None,
    tomo_name: str = "tomogram",
) -> Detections:
    """Particles from the score maps of one or more templates.

    1. Each voxel takes the class whose template scores highest there (ties: the first class in
       `class_names`), so a voxel can be one class only. Raw correlations of templates of
       different sizes are not comparable; with several classes, pass `TemplateMatch.standardized`
       matches.
    2. Candidates are the voxels whose score is at least their class's threshold and the largest
       in the cube inscribed in a ball of radius min(d_k) (half-width max(1, floor(min(d_k) /
       sqrt(3)))): a separable filter, and a voxel it drops has a higher one within min(d_k).
    3. Greedy non-maximum suppression by decreasing score: a candidate is dropped if a kept peak
       lies closer than max(d_a, d_b) voxels, a and b the two classes (d_k about the particle
       radius of class k).
    4. Each class keeps at most its `top_k` best peaks (the suppression stops early once every
       class has them).

    Args:
        matches: class name -> `TemplateMatch`, all of the tomogram's shape.
        voxel_size: Angstrom per voxel, carried into the particle list.
        min_distance: d_k in voxels (> 0), one number or a mapping from class name to number
            (classes left out get the largest number given).
        threshold: smallest score kept, one number or per-class mapping (classes left out: no
            threshold); None: no threshold.
        top_k: most peaks kept per class, one number or per-class mapping (classes left out: no
            limit); None: no limit. Give `threshold`, `top_k` or both.
        class_names: the particle list's classes, in order (default the keys of `matches`); each
            key of `matches` must be one of them.
        tomo_name: name written in the particle list.

    Returns:
        `Detections` with the best rotation of each peak as its angles, its score as score and
        its template's mask size as size; ordered by class, then by decreasing score.
    """
    if not matches:
        raise ValueError("matches is empty; give at least one class's TemplateMatch")
    names = tuple(matches) if class_names is None else tuple(class_names)
    unknown = sorted(set(matches) - set(names))
    if unknown:
        raise ValueError(f"matches names classes {unknown} missing from class_names {list(names)}")
    if threshold is None and top_k is None:
        raise ValueError(
            "give a score threshold, a top_k or both; otherwise every noise peak is kept"
        )
    order = [name for name in names if name in matches]
    shapes = {matches[name].scores.shape for name in order}
    if len(shapes) != 1:
        raise ValueError(
            f"the score maps have different shapes {sorted(shapes)}; match one tomogram"
        )
    if isinstance(min_distance, Mapping):
        given = [v for v in min_distance.values() if v is not None]
        default_d = max(given) if given else None
    else:
        default_d = min_distance
    dist = _per_class(min_distance, names, default_d, "min_distance")
    if not np.all(dist[[names.index(n) + 1 for n in order]] > 0):
        raise ValueError(f"min_distance must be > 0 voxels for every class, got {min_distance!r}")
    thresholds = _per_class(
        -np.inf if threshold is None else threshold,
        names,
        -np.inf,
        "threshold",
        nonnegative=False,
    )
    limits = _per_class(top_k, names, None, "top_k")

    # 1. One class per voxel.
    best = np.full(shapes.pop(), -np.inf, dtype=np.float32)
    winner = np.zeros(best.shape, dtype=np.int16)
    for name in order:
        score = matches[name].scores
        better = score > best
        best[better] = score[better]
        winner[better] = names.index(name) + 1

    # 2. Local maxima above their class's threshold.
    half = max(1, math.floor(min(dist[[names.index(n) + 1 for n in order]]) / math.sqrt(3)))
    local_max = scipy.ndimage.maximum_filter(best, size=2 * half + 1, mode="constant", cval=-np.inf)
    peak = (best == local_max) & (best >= thresholds[winner]) & np.isfinite(best)
    candidates = np.argwhere(peak)
    cand_scores = best[tuple(candidates.T)].astype(np.float64)
    cand_class = winner[tuple(candidates.T)].astype(np.int64)
    rank = np.lexsort((*candidates.T[::-1], -cand_scores))
    candidates, cand_scores, cand_class = candidates[rank], cand_scores[rank], cand_class[rank]

    # 3. Greedy non-maximum suppression.
    kept = []
    if len(candidates):
        tree = scipy.spatial.cKDTree(candidates)
        classes_present = np.unique(cand_class)
        reach = float(dist[classes_present].max())
        suppressed = np.zeros(len(candidates), dtype=bool)
        n_kept = np.zeros(len(names) + 1, dtype=np.int64)
        for i in range(len(candidates)):
            if np.all(n_kept[classes_present] >= limits[classes_present]):
                break  # later peaks could only join classes that are full
            if suppressed[i]:
                continue
            kept.append(i)
            n_kept[cand_class[i]] += 1
            near = np.asarray(tree.query_ball_point(candidates[i], reach), dtype=np.int64)
            gap = np.linalg.norm(candidates[near] - candidates[i], axis=1)
            suppressed[near[gap < np.maximum(dist[cand_class[i]], dist[cand_class[near]])]] = True
    kept = np.asarray(kept, dtype=np.int64)

    # 4. At most top_k per class (kept is in decreasing score order).
    ids = cand_class[kept]
    rank_in_class = np.zeros(len(kept), dtype=np.int64)
    for k in np.unique(ids):
        rank_in_class[ids == k] = np.arange(np.sum(ids == k))
    kept = kept[rank_in_class < limits[ids]]
    kept = kept[np.lexsort((-cand_scores[kept], cand_class[kept]))]

    positions = candidates[kept]
    ids = cand_class[kept]
    angles = np.zeros((len(kept), 3))
    sizes = np.zeros(len(kept), dtype=np.int64)
    for k in np.unique(ids):
        match = matches[names[k - 1]]
        rows = ids == k
        angles[rows] = match.angles_deg[match.rotation_index[tuple(positions[rows].T)]]
        sizes[rows] = match.mask_voxels
    particles = ParticleList(
        class_names=names,
        class_ids=ids,
        positions=positions.astype(np.float64),
        angles_deg=angles,
        voxel_size=voxel_size,
        tomo_name=tomo_name,
    )
    return Detections(particles, sizes, cand_scores[kept])
