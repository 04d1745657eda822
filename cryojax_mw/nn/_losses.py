"""Voxel-wise segmentation losses on logits and integer label maps.

Conventions shared by every loss here: `logits` is (..., C) channels-last (the network's output,
before the softmax), `labels` is an integer map of the same shape without the class axis, with
values 0..C-1 (0 = background). Overlap losses (Dice, Tversky) sum their counts over every voxel
of the batch (a "batch Dice"), then average the per-class scores with `class_weights`
(normalised to sum 1; default: uniform over the C classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _class_weights(class_weights: Sequence[float] | jax.Array | None, n_classes: int, dtype):
    """Weights (C,) as an array of `dtype`; uniform if None."""
    if class_weights is None:
        return jnp.ones((n_classes,), dtype)
    weights = jnp.asarray(class_weights, dtype)
    if weights.shape != (n_classes,):
        raise ValueError(
            f"class_weights needs one weight per class ({n_classes}), got shape {weights.shape}"
        )
    return weights


def _check(logits: jax.Array, labels: jax.Array) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., C) and labels (...) must share their leading shape, got "
            f"{logits.shape} and {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer map of class indices, got {labels.dtype}")


def _soft_counts(logits: jax.Array, labels: jax.Array):
    """Softmax probabilities and one-hot targets, flattened to (n_voxels, C)."""
    _check(logits, labels)
    n_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1).reshape(-1, n_classes)
    target = jax.nn.one_hot(labels.reshape(-1), n_classes, dtype=probs.dtype)
    return probs, target


def _weighted_mean(scores: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(weights * scores) / jnp.sum(weights)


def dice_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weights: Sequence[float] | jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Soft multi-class Dice loss: 1 - weighted mean over classes of the soft Dice score.

    With p the softmax probabilities and t the one-hot targets, summed over all voxels of the
    batch, class c scores D_c = (2 Σ p t + 2 eps) / (Σ p + Σ t + 2 eps), i.e. the Dice coefficient
    2|P ∩ T| / (|P| + |T|) with `eps` added to the overlap and to the half-sum; a class absent
    from both prediction and target scores 1.

    Args:
        logits: (..., C) network outputs before the softmax.
        labels: (...) integer class indices in 0..C-1.
        class_weights: (C,) non-negative weights of the classes in the mean (default uniform).
        eps: smoothing count (voxels), > 0.

    Returns:
        Scalar loss in [0, 1]; 0 for a perfect prediction.
    """
    # The Tversky index at alpha = beta = 1/2: (TP + eps) / (TP + (FP + FN) / 2 + eps), and
    # 2 TP + FP + FN = sum p + sum t, so it is exactly D_c above.
    return tversky_loss(
        logits, labels, alpha=0.5, beta=0.5, class_weights=class_weights, eps=eps
    )


def tversky_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    class_weights: Sequence[float] | jax.Array | None = None,
    eps: float = 1e-6,
) -> jax.Array:
    """Soft multi-class Tversky loss (Salehi et al. 2017): 1 - weighted mean of the Tversky index.

    Per class, with soft counts over the batch TP = Σ p t, FP = Σ p (1 - t), FN = Σ (1 - p) t:
    T_c = (TP + eps) / (TP + alpha FP + beta FN + eps). alpha = beta = 0.5 gives the Dice loss
    (`dice_loss`); beta > alpha penalises missed voxels more than false alarms (higher recall).

    Args:
        logits: (..., C) network outputs before the softmax.
        labels: (...) integer class indices in 0..C-1.
        alpha: weight of false positives, >= 0.
        beta: weight of false negatives, >= 0.
        class_weights: (C,) non-negative weights of the classes in the mean (default uniform).
        eps: smoothing count (voxels), > 0.

    Returns:
        Scalar loss in [0, 1]; 0 for a perfect prediction.
    """
    probs, target = _soft_counts(logits, labels)
    weights = _class_weights(class_weights, logits.shape[-1], probs.dtype)
    tp = jnp.sum(probs * target, axis=0)
    fp = jnp.sum(probs * (1 - target), axis=0)
    fn = jnp.sum((1 - probs) * target, axis=0)
    index = (tp + eps) / (tp + alpha * fp + beta * fn + eps)
    return 1 - _weighted_mean(index, weights)


def cross_entropy_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weights: Sequence[float] | jax.Array | None = None,
    label_smoothing: float | jax.Array = 0.0,
) -> jax.Array:
    """Categorical cross-entropy averaged over voxels (the published DeepFinder loss).

    The target of a voxel of class k is (1 - s) one_hot(k) + s / C with s = `label_smoothing`;
    its loss is -Σ_c target_c log softmax(logits)_c. With class weights w, each voxel counts with
    the weight of its true class and the mean is Σ w_k loss / Σ w_k (as in PyTorch).

    Args:
        logits: (..., C) network outputs before the softmax.
        labels: (...) integer class indices in 0..C-1.
        class_weights: (C,) non-negative weights (default all 1).
        label_smoothing: s in [0, 1).

    Returns:
        Scalar loss >= 0.
    """
    _check(logits, labels)
    n_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target = jax.nn.one_hot(labels, n_classes, dtype=log_probs.dtype)
    target = (1 - label_smoothing) * target + label_smoothing / n_classes
    per_voxel = -jnp.sum(target * log_probs, axis=-1)
    weights = _class_weights(class_weights, n_classes, log_probs.dtype)[labels]
    return jnp.sum(weights * per_voxel) / jnp.sum(weights)
