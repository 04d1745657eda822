"""Checkpoints without pickle, and the trained segmenter they hold.

A model folder holds `checkpoint.json` (format version, step, configuration, class names, voxel
size, patch size, architecture, the sampler's RNG state, training history, and the file name and
SHA-256 of each array file) and two NumPy archives written next to it: `weights_<step>.npz`
(the model's parameters) and `optimizer_<step>.npz` (the optimiser's state), each array keyed by
its pytree path (e.g. `encoder/0/1/kernel/value`). Every file is written atomically and the
JSON last, so a folder always describes one complete checkpoint; archives of older steps are
removed once the JSON points past them. Reading checks every digest: a missing, truncated or
altered file is a `ValueError`, never a silent partial load.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..io import atomic_write
from ._patches import zscore_patches
from ._unet import DeepFinderUNet

CHECKPOINT_FILE = "checkpoint.json"
FORMAT_VERSION = 1


def flatten_state(state) -> dict[str, np.ndarray]:
    """A pytree of arrays (e.g. an `nnx.State`) as {path: array}, paths joined by '/'."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in leaves
    }


def unflatten_state(template, arrays: Mapping[str, np.ndarray], what: str):
    """Fill the structure of `template` with `arrays` keyed as `flatten_state` keys them;
    shapes and dtypes must match the template's exactly."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    missing = sorted(set(keys) - set(arrays))
    extra = sorted(set(arrays) - set(keys))
    if missing or extra:
        raise ValueError(
            f"{what} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "load it with the configuration it was trained with"
        )
    values = []
    for key, (_, leaf) in zip(keys, leaves):
        array = arrays[key]
        if array.shape != np.shape(leaf) or array.dtype != np.asarray(leaf).dtype:
            raise ValueError(
                f"{what}: {key} is {array.dtype}{list(array.shape)}, the model expects "
                f"{np.asarray(leaf).dtype}{list(np.shape(leaf))}"
            )
        values.append(jnp.asarray(array))
    return jax.tree_util.tree_unflatten(treedef, values)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Write arrays to an .npz file atomically; returns the file's SHA-256."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, **arrays)

    atomic_write(path, write)
    return _sha256(path)


def load_arrays(path: Path, sha256: str) -> dict[str, np.ndarray]:
    """Read an .npz file written by `save_arrays` after checking its SHA-256 (no pickle)."""
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing; the model folder is incomplete")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"checkpoint file {path} is corrupt (its SHA-256 differs from checkpoint.json); "
            "restore it or train again"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"checkpoint file {path} cannot be read ({err})") from None


def write_checkpoint(folder: Path, step: int, model: nnx.Module, optimizer, record: dict) -> None:
    """Write the model's parameters, the optimiser's state and `record` (JSON-ready metadata)
    as the folder's checkpoint at `step`, then remove the archives of older checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for role, state in (("weights", nnx.state(model, nnx.Param)),
                        ("optimizer", nnx.state(optimizer))):  # fmt: skip
        path = folder / f"{role}_{step:08d}.npz"
        files[role] = {"file": path.name, "sha256": save_arrays(path, flatten_state(state))}
    record = {"format": FORMAT_VERSION, "step": int(step), **record, "files": files}
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(folder / CHECKPOINT_FILE, lambda tmp: tmp.write_text(text))
    keep = {f["file"] for f in files.values()}
    for role in files:
        for old in folder.glob(f"{role}_*.npz"):
            if old.name not in keep:
                old.unlink()


def read_checkpoint(model_dir: str | Path) -> tuple[Path, dict]:
    """(folder, record) of a model folder's `checkpoint.json`, checked for the expected keys."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise ValueError(
            f"no {CHECKPOINT_FILE} at {path.parent}; give a folder that training wrote"
        )
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); restore it or train again") from None
    needed = ("format", "step", "config", "class_names", "voxel_size", "patch_size",
              "architecture", "files")  # fmt: skip
    if not isinstance(record, dict) or any(k not in record for k in needed):
        raise ValueError(f"{path} is not a cryojax_mw checkpoint (needs keys {needed})")
    if record["format"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format {record['format']}, this version reads {FORMAT_VERSION}"
        )
    return path.parent, record


def build_model(architecture: Mapping, key: jax.Array | int = 0) -> DeepFinderUNet:
    """A `DeepFinderUNet` from a checkpoint's architecture record, initialised from `key`."""
    return DeepFinderUNet(
        architecture["n_classes"],
        in_channels=architecture["in_channels"],
        widths=tuple(architecture["widths"]),
        convs_per_level=architecture["convs_per_level"],
        bottom_convs=architecture["bottom_convs"],
        param_dtype=jnp.dtype(architecture["param_dtype"]),
        rngs=nnx.Rngs(params=key),
    )


def restore_state(folder: Path, record: dict, role: str, target) -> None:
    """Load archive `role` ("weights" or "optimizer") of a checkpoint into `target` in place."""
    info = record["files"][role]
    arrays = load_arrays(folder / info["file"], info["sha256"])
    template = nnx.state(target, nnx.Param) if role == "weights" else nnx.state(target)
    nnx.update(target, unflatten_state(template, arrays, f"{folder / info['file']}"))


# Spatial axes reversed by each rotation that keeps a wedge symmetric about z: identity, 180
# degrees about y (`flip_tilt_axis`), z (`turn_beam_axis`) and x; of (B, z, y, x) patches.
_WEDGE_ROTATIONS = ((), (1, 3), (2, 3), (1, 2))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _predict(graphdef, state, patches, average_rotations: bool):
    model = nnx.merge(graphdef, state)
    x = zscore_patches(patches)[..., None]
    if not average_rotations:
        return model.predict_proba(x)
    # Each rotation is its own inverse: predict on the rotated patches, rotate back, average.
    total = sum(jnp.flip(model.predict_proba(jnp.flip(x, axes)), axes)
                for axes in _WEDGE_ROTATIONS)  # fmt: skip
    return total / len(_WEDGE_ROTATIONS)


class Segmenter:
    """A trained voxel classifier with what is needed to apply it.

    Attributes:
        model: the `DeepFinderUNet`.
        class_names: name of each output channel (0 = background).
        voxel_size: Angstrom per voxel of the training tomograms.
        patch_size: edge of the training patches (a good window for inference).
        step: training steps behind the weights.
    """

    def __init__(
        self,
        model: DeepFinderUNet,
        *,
        class_names,
        voxel_size: float,
        patch_size: int,
        step: int = 0,
    ):
        self.model = model
        self.class_names = tuple(class_names)
        if len(self.class_names) != model.n_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for a model with {model.n_classes} outputs"
            )
        self.voxel_size = float(voxel_size)
        self.patch_size = int(patch_size)
        self.step = int(step)

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

    def predict_proba(self, patches, *, average_rotations: bool = False) -> jax.Array:
        """Class probabilities of raw patches, z-scored one by one exactly as in training.

        Args:
            patches: (B, p, p, p) float (any p that is a multiple of the model's
                `patch_multiple`; statistics are taken over each whole patch).
            average_rotations: average the probabilities predicted for the patches turned by
                each of the four rotations that keep a wedge symmetric about z in place
                (identity, 180 degrees about z, y, x), each turned back: 4 times the work, a
                prediction that commutes with those rotations exactly.

        Returns:
            (B, p, p, p, n_classes) probabilities in the model's dtype (jitted; one compilation
            per patch shape).
        """
        x = jnp.asarray(patches)
        if x.ndim != 4:
            raise ValueError(f"patches must be (batch, z, y, x), got shape {x.shape}")
        graphdef, state = nnx.split(self.model)
        return _predict(graphdef, state, x.astype(self.model.param_dtype), bool(average_rotations))


def load_segmenter(model_dir: str | Path) -> Segmenter:
    """Load the latest checkpoint of a training folder (or a `checkpoint.json`) as a `Segmenter`.

    Raises:
        ValueError: missing or corrupt checkpoint files, or arrays that do not fit the recorded
            architecture.
    """
    folder, record = read_checkpoint(model_dir)
    model = build_model(record["architecture"])
    restore_state(folder, record, "weights", model)
    return Segmenter(
        model,
        class_names=record["class_names"],
        voxel_size=record["voxel_size"],
        patch_size=record["patch_size"],
        step=record["step"],
    )
