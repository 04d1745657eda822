"""Scoring a particle list against the ground truth, as in the thesis (ch. 4.3.2): a predicted
particle is a true positive when it lies within `max_distance` voxels of a true particle; recall
= TP / true particles, precision = TP / predicted particles, F1 = 2 P R / (P + R).

Matching is one-to-one and ignores classes: each true particle matches at most one prediction
and each prediction at most one true particle. Classes are compared afterwards, which gives both
a localization score (position only) and a classification-aware score (the classes must agree),
and a confusion matrix.

Counts that are 0/0 give NaN: precision without predictions, recall without true particles, F1
(computed as 2 TP / (2 TP + FP + FN)) when there is neither; with true particles and no
prediction F1 is 0. The macro F1 averages the classes whose F1 is defined.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import scipy.spatial

from ..io import ParticleList

MATCHINGS = ("hungarian", "greedy")
FALSE_POSITIVE = "false_positive"
MISSED = "missed"


def _ratio(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _scores(tp, fp, fn) -> dict:
    tp, fp, fn = (np.asarray(v, dtype=np.int64) for v in (tp, fp, fn))
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Detection scores of a predicted particle list against the truth.

    Attributes:
        class_names: the classes, in the lists' order.
        max_distance: the matching distance in voxels.
        matching: "hungarian" or "greedy".
        matches: int64 (n_matched, 2), pairs (predicted index, true index).
        distances: float64 (n_matched,), their distances in voxels.
        tp, fp, fn: int64 (K,), per class, classification-aware: a true positive of class k is a
            matched pair where both are of class k; a prediction of class k matched to a particle
            of another class is a false positive of k and a false negative of the other class.
        precision, recall, f1: float64 (K,), per class (NaN where 0/0, see the module docstring).
        confusion: int64 (K + 1, K + 1); rows are the true classes then "false_positive",
            columns the predicted classes then "missed". Entry (i, j) counts matched pairs of
            true class i and predicted class j; the last row counts unmatched predictions per
            predicted class, the last column unmatched true particles per true class.
        localization: overall scores with classes ignored (keys tp, fp, fn, precision, recall,
            f1): TP = matched pairs.
        classification: overall classification-aware scores (same keys): TP = matched pairs whose
            classes agree.
        macro_f1: mean of the per-class F1 over the classes where it is defined (NaN if none).
        mean_distance: mean distance of the matched pairs in voxels (NaN if none).
    """

    class_names: tuple[str, ...]
    max_distance: float
    matching: str
    matches: np.ndarray
    distances: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    confusion: np.ndarray
    localization: dict
    classification: dict
    macro_f1: float
    mean_distance: float

    def to_json(self) -> dict:
        """Plain numbers (JSON-ready; NaN becomes None)."""

        def plain(value):
            value = float(value)
            return None if math.isnan(value) else value

        def block(scores):
            return {
                "tp": int(scores["tp"]),
                "fp": int(scores["fp"]),
                "fn": int(scores["fn"]),
                **{k: plain(scores[k]) for k in ("precision", "recall", "f1")},
            }

        return {
            "max_distance_voxels": self.max_distance,
            "matching": self.matching,
            "classes": [
                {
                    "name": name,
                    "tp": int(self.tp[k]),
                    "fp": int(self.fp[k]),
                    "fn": int(self.fn[k]),
                    "precision": plain(self.precision[k]),
                    "recall": plain(self.recall[k]),
                    "f1": plain(self.f1[k]),
                }
                for k, name in enumerate(self.class_names)
            ],
            "localization": block(self.localization),
            "classification": block(self.classification),
            "macro_f1": plain(self.macro_f1),
            "mean_distance_voxels": plain(self.mean_distance),
            "confusion": {
                "rows_true": [*self.class_names, FALSE_POSITIVE],
                "columns_predicted": [*self.class_names, MISSED],
                "counts": self.confusion.tolist(),
            },
        }

    def table(self, fmt: str = "markdown") -> str:
        """The per-class scores, the overall scores and the confusion matrix as text.

        Args:
            fmt: "markdown" (pipe tables) or "text" (aligned columns).

        Returns:
            The tables, separated by a blank line.
        """
        if fmt not in ("markdown", "text"):
            raise ValueError(f"fmt must be 'markdown' or 'text', got {fmt!r}")

        def number(value):
            return "nan" if math.isnan(float(value)) else f"{float(value):.3f}"

        header = ["class", "TP", "FP", "FN", "precision", "recall", "F1"]
        rows = [
            [name, str(self.tp[k]), str(self.fp[k]), str(self.fn[k]),
             number(self.precision[k]), number(self.recall[k]), number(self.f1[k])]
            for k, name in enumerate(self.class_names)
        ]  # fmt: skip
        for label, scores in (
            ("all (class-aware)", self.classification),
            ("all (position only)", self.localization),
        ):
            rows.append(
                [label, str(scores["tp"]), str(scores["fp"]), str(scores["fn"]),
                 number(scores["precision"]), number(scores["recall"]), number(scores["f1"])]
            )  # fmt: skip
        rows.append(["macro F1", "", "", "", "", "", number(self.macro_f1)])
        confusion_header = ["true \\ predicted", *self.class_names, MISSED]
        confusion_rows = [
            [name, *(str(v) for v in row)]
            for name, row in zip([*self.class_names, FALSE_POSITIVE], self.confusion)
        ]
        return _render(header, rows, fmt) + "\n\n" + _render(confusion_header, confusion_rows, fmt)


def _render(header: list[str], rows: list[list[str]], fmt: str) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    if fmt == "markdown":
        lines = [
            "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
            for row in [header, *rows]
        ]
        rule = "|" + "|".join(":" + "-" * (w + 1) for w in widths) + "|"
        return "\n".join([lines[0], rule, *lines[1:]])
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _pairs_within(a: np.ndarray, b: np.ndarray, max_distance: float):
    """All pairs (i, j) with |a_i - b_j| <= max_distance, and their distances."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    near = scipy.spatial.cKDTree(a).query_ball_tree(scipy.spatial.cKDTree(b), max_distance)
    i = np.repeat(np.arange(len(a)), [len(n) for n in near])
    j = np.fromiter((k for n in near for k in n), dtype=np.int64, count=len(i))
    d = np.linalg.norm(a[i] - b[j], axis=1)
    inside = d <= max_distance  # the tree's test is inclusive too; guard against its rounding
    return i[inside], j[inside], d[inside]


def _hungarian(i, j, d, n_a, n_b, max_distance):
    """A matching with the most pairs, and among those the smallest total distance: an optimal
    assignment solved separately on each connected component of the pair graph."""
    if len(i) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    graph = scipy.sparse.coo_matrix((np.ones(len(i)), (i, n_a + j)), shape=(n_a + n_b,) * 2)
    _, component = scipy.sparse.csgraph.connected_components(graph, directed=False)
    comp_of_pair = component[i]
    order = np.argsort(comp_of_pair, kind="stable")
    bounds = np.flatnonzero(np.diff(comp_of_pair[order])) + 1
    rows, cols = [], []
    for group in np.split(order, bounds):
        ai, a_local = np.unique(i[group], return_inverse=True)
        bj, b_local = np.unique(j[group], return_inverse=True)
        # Any forbidden pair costs more than all allowed pairs together, so the assignment
        # first maximises the number of allowed pairs, then minimises their total distance.
        big = max_distance * (min(len(ai), len(bj)) + 1) + 1.0
        cost = np.full((len(ai), len(bj)), big)
        allowed = np.zeros(cost.shape, dtype=bool)
        cost[a_local, b_local] = d[group]
        allowed[a_local, b_local] = True
        r, c = scipy.optimize.linear_sum_assignment(cost)
        ok = allowed[r, c]
        rows.append(ai[r[ok]])
        cols.append(bj[c[ok]])
    return np.concatenate(rows), np.concatenate(cols)


def _greedy(i, j, d, n_a, n_b, scores):
    """Without scores: pairs by increasing distance; with scores: predictions by decreasing score,
    each taking its nearest free true particle. A pair is taken when both ends are free."""
    if scores is None:
        order = np.lexsort((j, i, d))
    else:
        order = np.lexsort((j, d, i, -scores[i]))
    used_a = np.zeros(n_a, dtype=bool)
    used_b = np.zeros(n_b, dtype=bool)
    rows, cols = [], []
    for k in order:
        if not used_a[i[k]] and not used_b[j[k]]:
            used_a[i[k]] = used_b[j[k]] = True
            rows.append(i[k])
            cols.append(j[k])
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def evaluate_detections(
    predicted: ParticleList,
    truth: ParticleList,
    *,
    max_distance: float,
    matching: str = "hungarian",
    scores=None,
) -> Evaluation:
    """Precision, recall, F1 and a confusion matrix of predicted particles against the truth.

    Args:
        predicted: the particles found.
        truth: the true particles; same class names (same order) and voxel size.
        max_distance: largest distance in voxels between a prediction and the true particle it
            finds (inclusive), e.g. the particle radius (the thesis uses the ribosome radius).
        matching: "hungarian": the one-to-one matching with the most pairs (then the smallest
            total distance); "greedy": pairs taken one by one, nearest first, or in decreasing
            score order when `scores` are given (the usual detection-benchmark rule). Both ignore
            classes.
        scores: float (n_predicted,) confidence of each prediction (e.g. `Detections.scores`),
            only with greedy matching.

    Returns:
        An `Evaluation`.

    Raises:
        ValueError: different class names or voxel sizes, a negative or non-finite distance, an
            unknown matching, or scores of the wrong length or with Hungarian matching.
    """
    if predicted.class_names != truth.class_names:
        raise ValueError(
            f"predicted classes {list(predicted.class_names)} differ from the true classes "
            f"{list(truth.class_names)}; give both lists the same class names in the same order"
        )
    if not math.isclose(predicted.voxel_size, truth.voxel_size, rel_tol=1e-6):
        raise ValueError(
            f"predicted voxel size {predicted.voxel_size} A differs from the truth's "
            f"{truth.voxel_size} A; rescale the positions of one list to the other's voxel size"
        )
    max_distance = float(max_distance)
    if not (math.isfinite(max_distance) and max_distance >= 0):
        raise ValueError(f"max_distance must be a finite number of voxels >= 0, got {max_distance}")
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {', '.join(MATCHINGS)}, got {matching!r}")
    n_p, n_t = len(predicted), len(truth)
    if scores is not None:
        if matching != "greedy":
            raise ValueError("scores order the greedy matching only; pass matching='greedy'")
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape != (n_p,) or not np.all(np.isfinite(scores)):
            raise ValueError(f"scores must hold {n_p} finite values (one per prediction)")

    i, j, d = _pairs_within(predicted.positions, truth.positions, max_distance)
    if matching == "hungarian":
        rows, cols = _hungarian(i, j, d, n_p, n_t, max_distance)
    else:
        rows, cols = _greedy(i, j, d, n_p, n_t, scores)
    distances = np.linalg.norm(predicted.positions[rows] - truth.positions[cols], axis=1)

    k_classes = len(truth.class_names)
    p_class = predicted.class_ids - 1
    t_class = truth.class_ids - 1
    confusion = np.zeros((k_classes + 1, k_classes + 1), dtype=np.int64)
    np.add.at(confusion, (t_class[cols], p_class[rows]), 1)
    unmatched_p = np.ones(n_p, dtype=bool)
    unmatched_p[rows] = False
    unmatched_t = np.ones(n_t, dtype=bool)
    unmatched_t[cols] = False
    np.add.at(confusion, (k_classes, p_class[unmatched_p]), 1)
    np.add.at(confusion, (t_class[unmatched_t], k_classes), 1)

    tp = np.diag(confusion)[:k_classes].copy()
    fp = np.bincount(p_class, minlength=k_classes) - tp
    fn = np.bincount(t_class, minlength=k_classes) - tp
    per_class = _scores(tp, fp, fn)
    n_match, n_right = len(rows), int(tp.sum())
    f1 = per_class["f1"]
    return Evaluation(
        class_names=truth.class_names,
        max_distance=max_distance,
        matching=matching,
        matches=np.stack([rows, cols], axis=1).reshape(-1, 2),
        distances=distances,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=per_class["precision"],
        recall=per_class["recall"],
        f1=f1,
        confusion=confusion,
        localization={k: v[()] for k, v in _scores(n_match, n_p - n_match, n_t - n_match).items()},
        classification={
            k: v[()] for k, v in _scores(n_right, n_p - n_right, n_t - n_right).items()
        },
        macro_f1=float(np.nanmean(f1)) if np.any(np.isfinite(f1)) else math.nan,
        mean_distance=float(distances.mean()) if len(distances) else math.nan,
    )
