"""Figures people would rather look at than read: ortho-slices of volumes and FSC curves.

Used by the CLI, the notebooks and the paper, so it lives beside the other public modules.
Every function returns the Figure (notebooks show it inline) and `save_figure` writes it
atomically and closes it. The backend is left to matplotlib, which picks Agg when there is no
display.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap


def _central_sections(volume: np.ndarray) -> list[tuple[str, np.ndarray]]:
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim == 2:
        return [("z-x", v)]
    nz, ny, nx = v.shape
    # z-x holds the tilt plane (missing-wedge elongation shows along z); x-y is what people scroll.
    return [
        ("x-y (z centre)", v[nz // 2]),
        ("z-x (y centre)", v[:, ny // 2, :]),
        ("z-y (x centre)", v[:, :, nx // 2]),
    ]


def ortho_slices(
    volumes: Mapping[str, np.ndarray],
    title: str | None = None,
    *,
    categorical: Collection[str] = (),
) -> plt.Figure:
    """Central sections of each volume (rows) through its centre (columns).

    Args:
        volumes: name -> (z, y, x) volume or (z, x) image, shown in the given order. Each row has its
            own grey scale (1st to 99th percentile) so noisy and clean volumes stay readable.
        title: optional figure title.
        categorical: names of label maps (integers, 0 = background) to draw with one colour per
            value instead of a grey scale.
    """
    rows = list(volumes.items())
    n_cols = len(_central_sections(rows[0][1]))
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(3.2 * n_cols, 3.0 * len(rows)), squeeze=False
    )
    for r, (name, vol) in enumerate(rows):
        if name in categorical:
            n_labels = max(int(np.max(vol)), 1)
            colours = plt.get_cmap("tab20")(np.arange(n_labels) % 20)
            cmap = ListedColormap(np.vstack([[0.0, 0.0, 0.0, 1.0], colours]))
            lo, hi = -0.5, n_labels + 0.5
        else:
            cmap = "gray"
            lo, hi = np.percentile(np.asarray(vol), [1, 99])
        for c, (label, section) in enumerate(_central_sections(vol)):
            ax = axes[r, c]
            ax.imshow(section, cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def fsc_curves(
    curves: Mapping[str, object], title: str | None = None, unit: str = "1/Å"
) -> plt.Figure:
    """FSC curves (FSCResult-like objects with `frequency`, `fsc`) with the 0.143 and 0.5 lines.

    Args:
        curves: name -> FSC result, drawn in the given order.
        title: optional axes title.
        unit: the frequency unit, "1/Å" when the FSC was given a voxel size, else "1/voxel".
    """
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, res in curves.items():
        ax.plot(np.asarray(res.frequency), np.asarray(res.fsc), label=name)
    for level in (0.5, 0.143):
        ax.axhline(level, color="gray", lw=0.8, ls="--")
    ax.set_xlabel(f"spatial frequency ({unit})")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.02)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure to PNG atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return path
