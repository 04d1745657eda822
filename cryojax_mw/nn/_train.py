"""Training the DeepFinder segmenter: configuration, jitted steps, validation, history,
checkpoints and exact resumption.

One step draws a class-balanced batch (`PatchSampler`), splits it into micro-batches whose
gradients are summed, and takes one Adam step (beta1 0.9, beta2 0.999, as published) on the mean
gradient. Cross-entropy is a mean over voxels, so its micro-batched gradient equals the whole
batch's; Dice and Tversky are computed per micro-batch and averaged.

Why micro-batches, measured on 2 CPU cores at 56^3 with the published widths: memory stays that
of one micro-batch (a whole batch of 25 would need 7.7 GB), and with the project's CPU
convolution kernels (`_conv.py`), which use both cores inside every convolution, a step of 25
patches took 13.9 s as five micro-batches of five, 16.6 s as 25 of one (per-call overheads) and
14.9 s as one of 25 (medians of 3 steps, one run each). Several micro-batches can still be written as independent graphs in one
compiled call (`concurrent_micro_batches`), which kept both cores busy with XLA's own
convolutions (2.3 s per patch for four against 3.1 s one after the other); a `lax.scan` over
micro-batches was 30 times slower (XLA:CPU convolutions inside a while loop lose their fast
kernels), hence the unrolled graphs and a Python loop over calls.

Batch i of a run is drawn with the key `fold_in(batch_key, i)`, where `batch_key` comes from the
seed: the sampler's RNG state is the seed and the step, so a run resumed from a checkpoint
continues exactly as an uninterrupted one would (same batches, same weights bit for bit).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from matplotlib.figure import Figure
from tqdm import tqdm

from ..io import atomic_write
from ..plot import save_figure
from ._checkpoint import (
    CHECKPOINT_FILE,
    Segmenter,
    build_model,
    read_checkpoint,
    restore_state,
    write_checkpoint,
)
from ._dataset import as_labelled
from ._losses import cross_entropy_loss, dice_loss, tversky_loss
from ._patches import PatchSampler

LOSSES = ("ce", "dice", "dice+ce", "tversky")
SCHEDULES = ("constant", "cosine", "constant-then-decay")
# Share of the steps over which "constant-then-decay" brings the rate down to 0.
DECAY_FRACTION = 0.2
# Settings that may change when a run is resumed: they do not alter the weights' trajectory.
_RESUMABLE_CHANGES = ("steps", "validate_every", "checkpoint_every")


def _largest_divisor(n: int, bound: int) -> int:
    return max(d for d in range(1, min(n, bound) + 1) if n % d == 0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run of the segmenter.

    Attributes:
        patch_size: edge of the cubic training patches (voxels), a multiple of
            2 ** (len(widths) - 1).
        batch_size: patches per Adam step.
        micro_batch_size: patches per forward/backward pass (gradients summed over the batch);
            must divide batch_size. None: the largest divisor of batch_size up to 5 (the
            fastest measured, see above).
        concurrent_micro_batches: at most this many micro-batches are computed as independent
            graphs in one compiled call (XLA runs them on different cores): the largest divisor
            of batch_size / micro_batch_size not above it. Memory grows with it.
        steps: Adam steps in total.
        learning_rate: Adam step size (the first step's, with a schedule).
        learning_rate_schedule: "constant"; "cosine": half a cosine from learning_rate down
            to 0 at `steps`, so that the last steps settle instead of swinging around a minimum
            (in the segmentation benchmark's 3000 steps it did worse than constant: the small
            classes are learned late); "constant-then-decay": constant for the first 80% of
            the steps, then a straight line down to 0, so the small classes are learned at the
            full rate and only the last steps settle. A run with a schedule other than
            constant resumes only with the same steps.
        loss: "ce" (cross-entropy, as published), "dice", "dice+ce" (their sum) or "tversky".
        class_weights: one weight per class (background first) for the loss; None = equal.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        tversky_alpha, tversky_beta: Tversky weights of false positives and false negatives.
        max_shift: largest random shift of a patch centre from its particle (voxels per axis),
            < patch_size / 2.
        background_fraction: fraction of each batch drawn anywhere in the tomograms.
        augment_flip: rotate half the patches by 180 degrees about the tilt axis y.
        augment_turn: rotate half the patches by 180 degrees about the beam axis z as well: with
            augment_flip, all four rotations that keep a wedge symmetric about z (identity,
            180 degrees about z, y and x), which the tilt-axis flip alone does not cover.
        augment_contrast, augment_brightness, augment_noise: ranges of the intensity
            augmentation of z-scored patches (see `PatchSampler`); 0 = off.
        validate_every: steps between validations (the last step is always validated).
        validation_size: validation patches, drawn once per run (no augmentation), evaluated
            in chunks of the largest divisor of validation_size up to micro_batch_size.
        checkpoint_every: steps between checkpoints (the last step is always saved).
        seed: seeds the initial weights, the batches and the validation patches.
        widths, convs_per_level, bottom_convs: the network (`DeepFinderUNet`).
    """

    patch_size: int = 48
    batch_size: int = 24
    micro_batch_size: int | None = None
    concurrent_micro_batches: int = 1
    steps: int = 1000
    learning_rate: float = 1e-4
    learning_rate_schedule: str = "constant"
    loss: str = "ce"
    class_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    max_shift: int = 13
    background_fraction: float = 0.0
    augment_flip: bool = True
    augment_turn: bool = False
    augment_contrast: float = 0.0
    augment_brightness: float = 0.0
    augment_noise: float = 0.0
    validate_every: int = 100
    validation_size: int = 24
    checkpoint_every: int = 500
    seed: int = 0
    widths: tuple[int, ...] = (32, 48, 64)
    convs_per_level: int = 2
    bottom_convs: int = 4

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.micro_batch_size is None and self.batch_size >= 1:
            object.__setattr__(self, "micro_batch_size", _largest_divisor(self.batch_size, 5))
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"class_weights must be >= 0 and not all 0, got {weights}")
            object.__setattr__(self, "class_weights", weights)
        for name in ("patch_size", "batch_size", "micro_batch_size", "concurrent_micro_batches",
                     "steps", "validate_every", "validation_size", "checkpoint_every"):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        multiple = 2 ** (len(self.widths) - 1)
        if self.patch_size % multiple:
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of {multiple} for "
                f"{len(self.widths) - 1} poolings (widths {self.widths})"
            )
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size {self.micro_batch_size} must divide batch_size {self.batch_size}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.learning_rate_schedule not in SCHEDULES:
            raise ValueError(
                f"learning_rate_schedule must be one of {', '.join(SCHEDULES)}, got "
                f"{self.learning_rate_schedule!r}"
            )
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.tversky_alpha < 0 or self.tversky_beta < 0:
            raise ValueError("tversky_alpha and tversky_beta must be >= 0")
        if not 0 <= self.max_shift < self.patch_size / 2:
            raise ValueError(
                f"max_shift must lie in [0, patch_size / 2), got {self.max_shift} for patch "
                f"{self.patch_size}"
            )

    @property
    def micro_batches_per_call(self) -> int:
        """Micro-batches in one compiled gradient call: the largest divisor of the number of
        micro-batches per step that is at most concurrent_micro_batches."""
        return _largest_divisor(self.batch_size // self.micro_batch_size,
                                self.concurrent_micro_batches)  # fmt: skip

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**record)


def learning_rate_schedule(config: TrainConfig) -> float | optax.Schedule:
    """The Adam step size of `config`: a number when constant, else a function of the step
    count (0 for the first step)."""
    if config.learning_rate_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, config.steps)
    if config.learning_rate_schedule == "constant-then-decay":
        decay_steps = max(1, round(DECAY_FRACTION * config.steps))
        return optax.join_schedules(
            [optax.constant_schedule(config.learning_rate),
             optax.linear_schedule(config.learning_rate, 0.0, decay_steps)],
            boundaries=[config.steps - decay_steps],
        )  # fmt: skip
    return config.learning_rate


def _loss_value(name: str, logits, labels, params: dict) -> jax.Array:
    weights = params["class_weights"]
    if name == "tversky":
        return tversky_loss(logits, labels, alpha=params["alpha"], beta=params["beta"],
                            class_weights=weights)  # fmt: skip
    value = jnp.zeros((), logits.dtype)
    if name in ("dice", "dice+ce"):
        value = value + dice_loss(logits, labels, class_weights=weights)
    if name in ("ce", "dice+ce"):
        value = value + cross_entropy_loss(
            logits, labels, class_weights=weights, label_smoothing=params["label_smoothing"]
        )
    return value


@functools.partial(nnx.jit, static_argnames=("loss", "parts"))
def _gradients(model, images, labels, loss_params, *, loss, parts):
    """Sums over `parts` equal micro-batches of the batch of their loss, voxel accuracy and
    gradient, each micro-batch its own graph (see the module docstring)."""

    def objective(model, x, y):
        logits = model(x[..., None])
        return _loss_value(loss, logits, y, loss_params), logits

    size = images.shape[0] // parts
    totals = None
    for i in range(parts):
        x, y = images[i * size : (i + 1) * size], labels[i * size : (i + 1) * size]
        (value, logits), grads = nnx.value_and_grad(objective, has_aux=True)(model, x, y)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
        part = (value, accuracy, grads)
        totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
    return totals


@nnx.jit
def _apply_gradients(model, optimizer, grads, scale):
    optimizer.update(model, jax.tree.map(lambda g: g * scale, grads))


_add = jax.jit(lambda total, new: jax.tree.map(jnp.add, total, new), donate_argnums=0)


@functools.partial(nnx.jit, static_argnames=("loss",))
def _evaluate(model, images, labels, loss_params, *, loss):
    logits = model(images[..., None])
    n = logits.shape[-1]
    predicted = jnp.argmax(logits, axis=-1)
    confusion = jnp.bincount((labels * n + predicted).ravel(), length=n * n).reshape(n, n)
    return _loss_value(loss, logits, labels, loss_params), confusion


def _scores(confusion: np.ndarray) -> tuple[float, list[float | None]]:
    """Voxel accuracy and per-class Dice (None for a class absent from truth and prediction)
    from a confusion matrix [true, predicted]."""
    total = confusion.sum()
    accuracy = float(np.trace(confusion) / total)
    size = confusion.sum(axis=0) + confusion.sum(axis=1)
    dice = [float(2 * confusion[c, c] / size[c]) if size[c] else None for c in range(len(size))]
    return accuracy, dice


def _validate(model, batch, chunk: int, loss_params: dict, loss: str) -> tuple[float, np.ndarray]:
    losses, confusion = [], 0
    for start in range(0, len(batch.images), chunk):
        part = slice(start, start + chunk)
        value, counts = _evaluate(
            model, jnp.asarray(batch.images[part]), jnp.asarray(batch.labels[part]), loss_params,
            loss=loss,
        )  # fmt: skip
        losses.append(float(value))
        confusion = confusion + np.asarray(counts, np.int64)
    return float(np.mean(losses)), confusion


def _new_history() -> dict:
    return {
        "step": [], "loss": [], "accuracy": [], "seconds": [],
        "validation": {"step": [], "loss": [], "accuracy": [], "dice": []},
    }  # fmt: skip


def plot_history(history: dict, class_names: Sequence[str], path: str | Path) -> Path:
    """Loss, voxel accuracy and per-class validation Dice against the step, as a PNG."""
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    ax_loss, ax_acc, ax_dice = fig.subplots(1, 3)
    val = history["validation"]
    ax_loss.plot(history["step"], history["loss"], lw=0.7, alpha=0.6, label="training batch")
    ax_loss.plot(val["step"], val["loss"], "o-", ms=3, label="validation")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.plot(history["step"], history["accuracy"], lw=0.7, alpha=0.6, label="training batch")
    ax_acc.plot(val["step"], val["accuracy"], "o-", ms=3, label="validation")
    ax_acc.set(xlabel="step", ylabel="voxel accuracy", title="accuracy", ylim=(0, 1))
    for c, name in enumerate(class_names):
        scores = [np.nan if d[c] is None else d[c] for d in val["dice"]]
        ax_dice.plot(val["step"], scores, "o-", ms=2, lw=0.8, label=name)
    ax_dice.set(xlabel="step", ylabel="Dice", title="validation Dice per class", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.legend(fontsize=7)
    ax_dice.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def _voxel_size(items) -> float:
    sizes = {round(item.particles.voxel_size, 6) for item in items}
    if len(sizes) != 1:
        raise ValueError(f"tomograms have different voxel sizes {sorted(sizes)} Å; resample them")
    return items[0].particles.voxel_size


def _label_names(items, label_names) -> tuple[str, ...]:
    top = max(int(item.labels.max()) for item in items)
    if label_names is None:
        particle_names = items[0].particles.class_names
        n = max(top + 1, len(particle_names) + 1)
        names = ["background", *particle_names]
        return tuple(names + [f"label_{k}" for k in range(len(names), n)])
    names = tuple(label_names)
    if top >= len(names):
        raise ValueError(f"label maps hold label {top} but only {len(names)} label names are given")
    return names


def train_segmenter(
    config: TrainConfig,
    train,
    val,
    out_dir: str | Path,
    *,
    label_names: Sequence[str] | None = None,
    progress: bool = True,
    resume: bool = True,
) -> Segmenter:
    """Train a `DeepFinderUNet` on labelled tomograms, with validation and checkpoints.

    Writes to `out_dir`: the checkpoint (`checkpoint.json` and its .npz archives, see
    `cryojax_mw.nn._checkpoint`; `load_segmenter(out_dir)` reads it), `history.json` (per step:
    training-batch loss, voxel accuracy and seconds; per validation: loss, voxel accuracy and
    per-class Dice) and `history.png`.

    Args:
        config: the run's settings.
        train: training tomograms: `LabelledTomogram`s or (tomogram, labels, ParticleList) tuples
            (e.g. `load_dataset(...).tomograms` split by `split_train_val`).
        val: validation tomograms, same form.
        out_dir: the run's folder.
        label_names: name of each label value, background first (e.g. a dataset's
            `label_names`); default "background", the particle classes, then "label_k".
        progress: show a progress bar with the loss and the last validation scores.
        resume: continue from the folder's checkpoint if there is one (its settings must equal
            `config` except steps (constant learning rate only), validate_every and
            checkpoint_every); False starts afresh and overwrites it.

    Returns:
        The trained `Segmenter` (also saved in `out_dir`).
    """
    train, val = as_labelled(train), as_labelled(val)
    if not train or not val:
        raise ValueError("give at least one training and one validation tomogram")
    voxel_size = _voxel_size(train + val)
    names = _label_names(train + val, label_names)
    n_classes = len(names)
    if config.class_weights is not None and len(config.class_weights) != n_classes:
        raise ValueError(
            f"class_weights has {len(config.class_weights)} entries for {n_classes} classes "
            f"({', '.join(names)})"
        )
    out = Path(out_dir)
    architecture = {
        "n_classes": n_classes, "in_channels": 1, "widths": list(config.widths),
        "convs_per_level": config.convs_per_level, "bottom_convs": config.bottom_convs,
        "param_dtype": "float32",
    }  # fmt: skip
    key_init, key_batches, key_val = jax.random.split(jax.random.key(config.seed), 3)
    model = build_model(architecture, key_init)
    optimizer = nnx.Optimizer(
        model, optax.adam(learning_rate_schedule(config), b1=0.9, b2=0.999), wrt=nnx.Param
    )
    history = _new_history()
    start = 0
    if resume and (out / CHECKPOINT_FILE).exists():
        folder, record = read_checkpoint(out)
        saved = TrainConfig.from_json(record["config"]).to_json()
        resumable = set(_RESUMABLE_CHANGES)
        if config.learning_rate_schedule != "constant":
            resumable.discard("steps")  # the schedule already taken depends on them
        changed = sorted(k for k, v in config.to_json().items()
                         if saved[k] != v and k not in resumable)  # fmt: skip
        if changed or tuple(record["class_names"]) != names:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(changed) or 'class names'}); "
                "choose another out_dir or pass resume=False"
            )
        if record["step"] > config.steps:
            raise ValueError(
                f"{out} holds a run at step {record['step']}, past steps={config.steps}; raise "
                "steps or choose another out_dir"
            )
        restore_state(folder, record, "weights", model)
        restore_state(folder, record, "optimizer", optimizer)
        history, start = record["history"], record["step"]

    sampler = PatchSampler(
        train, n_classes=n_classes, patch_size=config.patch_size, max_shift=config.max_shift,
        background_fraction=config.background_fraction,
        flip_probability=0.5 if config.augment_flip else 0.0,
        turn_probability=0.5 if config.augment_turn else 0.0, contrast=config.augment_contrast,
        brightness=config.augment_brightness, noise=config.augment_noise,
    )  # fmt: skip
    val_batch = PatchSampler(
        val, n_classes=n_classes, patch_size=config.patch_size, max_shift=config.max_shift,
        background_fraction=config.background_fraction, flip_probability=0.0,
    ).sample(key_val, config.validation_size)  # fmt: skip
    dtype = model.param_dtype
    loss_params = {
        "class_weights": jnp.asarray(config.class_weights or [1.0] * n_classes, dtype),
        "label_smoothing": jnp.asarray(config.label_smoothing, dtype),
        "alpha": jnp.asarray(config.tversky_alpha, dtype),
        "beta": jnp.asarray(config.tversky_beta, dtype),
    }
    parts = config.micro_batches_per_call
    call = parts * config.micro_batch_size
    n_micro = config.batch_size // config.micro_batch_size
    scale = jnp.asarray(1.0 / n_micro, dtype)
    metadata = {
        "config": config.to_json(), "class_names": list(names), "voxel_size": voxel_size,
        "patch_size": config.patch_size, "architecture": architecture,
    }  # fmt: skip

    def save(step: int) -> None:
        sampler_state = {"seed": config.seed, "next_batch": step,
                         "rule": "batch i uses fold_in(split(key(seed), 3)[1], i)"}  # fmt: skip
        write_checkpoint(out, step, model, optimizer,
                         {**metadata, "sampler": sampler_state, "history": history})  # fmt: skip

    def write_history() -> None:
        text = json.dumps({"class_names": list(names), **history}, indent=1) + "\n"
        atomic_write(out / "history.json", lambda tmp: tmp.write_text(text))
        plot_history(history, names, out / "history.png")

    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=config.steps, initial=start, desc="training", unit="step",
               disable=not progress)  # fmt: skip
    postfix = {}
    for step in range(start + 1, config.steps + 1):
        tic = time.perf_counter()
        batch = sampler.sample(jax.random.fold_in(key_batches, step - 1), config.batch_size)
        total = None
        for first in range(0, config.batch_size, call):
            sums = _gradients(
                model, jnp.asarray(batch.images[first : first + call]),
                jnp.asarray(batch.labels[first : first + call]), loss_params, loss=config.loss,
                parts=parts,
            )  # fmt: skip
            total = sums if total is None else _add(total, sums)
        loss_sum, accuracy_sum, grads = total
        _apply_gradients(model, optimizer, grads, scale)
        history["step"].append(step)
        history["loss"].append(float(loss_sum) / n_micro)
        history["accuracy"].append(float(accuracy_sum) / n_micro)
        history["seconds"].append(time.perf_counter() - tic)
        postfix["loss"] = f"{history['loss'][-1]:.4f}"
        if step % config.validate_every == 0 or step == config.steps:
            val_loss, confusion = _validate(
                model, val_batch, _largest_divisor(config.validation_size, config.micro_batch_size),
                loss_params, config.loss,
            )  # fmt: skip
            accuracy, dice = _scores(confusion)
            for name, value in (("step", step), ("loss", val_loss), ("accuracy", accuracy),
                                ("dice", dice)):  # fmt: skip
                history["validation"][name].append(value)
            postfix.update(val_loss=f"{val_loss:.4f}", val_acc=f"{accuracy:.3f}")
            write_history()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save(step)
        bar.set_postfix(postfix, refresh=False)
        bar.update()
    bar.close()
    if start == config.steps:
        write_history()
    return Segmenter(model, class_names=names, voxel_size=voxel_size,
                     patch_size=config.patch_size, step=config.steps)  # fmt: skip
