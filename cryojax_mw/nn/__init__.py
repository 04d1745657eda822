"""Neural networks for tomograms: the DeepFinder 3D U-Net (flax.nnx), segmentation losses,
training targets from particle lists, class-balanced patch sampling with missing-wedge-safe
augmentation, and a training loop with exact resumption and pickle-free checkpoints.

Arrays: volumes (z, y, x), patches (batch, z, y, x), network inputs channels-last
(batch, z, y, x, channels); label maps are integers with 0 = background.
"""

from ._checkpoint import Segmenter, load_segmenter
from ._dataset import LabelledTomogram, SegmentationDataset, load_dataset, split_train_val
from ._losses import cross_entropy_loss, dice_loss, tversky_loss
from ._patches import (
    PatchBatch,
    PatchSampler,
    flip_tilt_axis,
    key_to_rng,
    turn_beam_axis,
    zscore_patches,
)
from ._targets import shape_targets, sphere_targets
from ._train import (
    LOSSES,
    SCHEDULES,
    TrainConfig,
    learning_rate_schedule,
    plot_history,
    train_segmenter,
)
from ._unet import DeepFinderUNet

__all__ = [
    "LOSSES",
    "SCHEDULES",
    "DeepFinderUNet",
    "LabelledTomogram",
    "PatchBatch",
    "PatchSampler",
    "SegmentationDataset",
    "Segmenter",
    "TrainConfig",
    "cross_entropy_loss",
    "dice_loss",
    "flip_tilt_axis",
    "turn_beam_axis",
    "key_to_rng",
    "learning_rate_schedule",
    "load_dataset",
    "load_segmenter",
    "plot_history",
    "shape_targets",
    "sphere_targets",
    "split_train_val",
    "train_segmenter",
    "tversky_loss",
    "zscore_patches",
]
