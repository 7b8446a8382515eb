"""PNG figures of an evaluation: the paper's Fig. 5 (axial MD slice), colour-FA and error maps.

Matplotlib runs headless (Agg); every figure shows one axial slice (fixed z) of one subject.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from monai_iqt.metrics import RMSE_UNIT  # noqa: E402
from preprocessing.io import atomic_path  # noqa: E402


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice with x to the right and y upwards (no radiological flip)."""
    return np.swapaxes(volume[:, :, z], 0, 1)


def _save(figure: plt.Figure, path: Path) -> Path:
    """Save via a temporary name in the same folder, then rename (no truncated PNG on a crash)."""
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def md_figure(
    md_lr: np.ndarray,
    md_hr: Mapping[str, np.ndarray],
    z_hr: int,
    factor: int,
    path: Path,
    title: str,
) -> Path:
    """LR input | ground truth | predictions, as in the paper's Fig. 5 (MD in 1e-3 mm^2/s)."""
    panels = {"LR input": _axial(md_lr, z_hr // factor)}
    panels.update({name: _axial(volume, z_hr) for name, volume in md_hr.items()})
    vmax = max(
        float(np.percentile(p[p > 0], 99.5)) if np.any(p > 0) else 1.0 for p in panels.values()
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (name, panel) in zip(axes, panels.items(), strict=True):
        image = axis.imshow(panel * 1e3, cmap="gray", origin="lower", vmin=0, vmax=vmax * 1e3)
        axis.set_title(name)
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="MD (1e-3 mm$^2$/s)")
    figure.suptitle(title)
    return _save(figure, path)


def colour_fa_figure(rgb: Mapping[str, np.ndarray], z: int, path: Path, title: str) -> Path:
    """Colour-FA (red x, green y, blue z, brightness FA) of each volume at axial slice ``z``."""
    figure, axes = plt.subplots(1, len(rgb), figsize=(3.2 * len(rgb), 3.4))
    for axis, (name, volume) in zip(np.atleast_1d(axes), rgb.items(), strict=True):
        axis.imshow(np.clip(_axial(volume, z), 0, 1), origin="lower")
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    return _save(figure, path)


def error_figure(errors: Mapping[str, np.ndarray], z: int, path: Path, title: str) -> Path:
    """Per-voxel RMSE over the 6 tensor elements (1e-5 mm^2/s), one shared colour scale."""
    panels = {name: _axial(volume, z) / RMSE_UNIT for name, volume in errors.items()}
    vmax = max(float(np.percentile(p, 99.5)) for p in panels.values()) or 1.0
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for axis, (name, panel) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        image = axis.imshow(panel, cmap="inferno", origin="lower", vmin=0, vmax=vmax)
        axis.set_title(name)
        axis.axis("off")
    figure.colorbar(image, ax=axes, shrink=0.8, label="|error| (1e-5 mm$^2$/s)")
    figure.suptitle(title)
    return _save(figure, path)
