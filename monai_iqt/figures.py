"""PNG figures of an evaluation: the paper's Fig. 5 (axial MD slice), colour-FA, error maps, and,
for a model that predicts its uncertainty, a reliability diagram and error beside uncertainty.

Figures are ``matplotlib.figure.Figure`` objects drawn by the Agg canvas, so importing this
module leaves matplotlib's global backend (and any user's pyplot session) alone. Slices are
drawn in voxel order (voxel x to the right, voxel y upwards); every slice figure labels its edges
with the subject's directions taken from the affine (``nibabel.aff2axcodes``) and says whether
the drawing is radiological (the subject's left on the image's right, as HCP's LAS storage gives)
or neurological.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from monai_iqt.metrics import RMSE_UNIT
from preprocessing.io import atomic_path

_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_SIDE = {"L": "left", "R": "right", "A": "anterior", "P": "posterior", "S": "superior"}
_SIDE["I"] = "inferior"


def axial_orientation(affine: np.ndarray) -> dict[str, str]:
    """Directions at the edges of a voxel-order axial slice, and how it is drawn.

    Returns ``right``/``left``/``top``/``bottom`` (the subject's direction each image edge
    points to, one of L R A P S I) and ``convention``, a sentence for the caption.
    """
    x, y, _ = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    edges = {"right": x, "left": _OPPOSITE[x], "top": y, "bottom": _OPPOSITE[y]}
    if x == "L":
        convention = "radiological: the subject's left is on the image's right"
    elif x == "R":
        convention = "neurological: the subject's left is on the image's left"
    else:
        convention = (
            f"voxel x runs {_SIDE[_OPPOSITE[x]]} to {_SIDE[x]}: this slice is not axial in the "
            "subject"
        )
    return {**edges, "convention": convention}


def _axial(volume: np.ndarray, z: int) -> np.ndarray:
    """Axial slice with voxel x to the right and voxel y upwards (``origin="lower"``)."""
    return np.swapaxes(volume[:, :, z], 0, 1)


def _new_figure(panels: int, height: float = 3.6) -> tuple[Figure, list]:
    figure = Figure(figsize=(3.2 * panels, height))
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, panels, squeeze=False)[0])


def _mark_sides(axis, orientation: Mapping[str, str]) -> None:
    """Letters at the four edges of a slice panel: which way the subject's axes run."""
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": axis.transAxes}
    axis.text(0.02, 0.5, orientation["left"], ha="left", va="center", **style)
    axis.text(0.98, 0.5, orientation["right"], ha="right", va="center", **style)
    axis.text(0.5, 0.98, orientation["top"], ha="center", va="top", **style)
    axis.text(0.5, 0.02, orientation["bottom"], ha="center", va="bottom", **style)


def _slice_panels(
    figure: Figure, axes: Sequence, panels: Mapping[str, np.ndarray], affine, **imshow
) -> object:
    orientation = axial_orientation(affine)
    image = None
    for axis, (name, panel) in zip(axes, panels.items(), strict=True):
        image = axis.imshow(panel, origin="lower", **imshow)
        axis.set_title(name)
        axis.axis("off")
        _mark_sides(axis, orientation)
    figure.text(0.5, -0.02, f"Drawn {orientation['convention']}.", ha="center", fontsize=9)
    return image


def _save(figure: Figure, path: Path) -> Path:
    """Save via a temporary name in the same folder, then rename (no truncated PNG on a crash)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return Path(path)


def md_figure(
    md_lr: np.ndarray,
    md_hr: Mapping[str, np.ndarray],
    z_hr: int,
    factor: int,
    affine: np.ndarray,
    path: Path,
    title: str,
) -> Path:
    """LR input | ground truth | predictions, as in the paper's Fig. 5 (MD in 1e-3 mm^2/s)."""
    panels = {"LR input": _axial(md_lr, z_hr // factor)}
    panels.update({name: _axial(volume, z_hr) for name, volume in md_hr.items()})
    vmax = max(
        float(np.percentile(p[p > 0], 99.5)) if np.any(p > 0) else 1.0 for p in panels.values()
    )
    figure, axes = _new_figure(len(panels))
    scaled = {name: panel * 1e3 for name, panel in panels.items()}
    image = _slice_panels(figure, axes, scaled, affine, cmap="gray", vmin=0, vmax=vmax * 1e3)
    figure.colorbar(image, ax=axes, shrink=0.8, label="MD (1e-3 mm$^2$/s)")
    figure.suptitle(title)
    return _save(figure, path)


def colour_fa_figure(
    rgb: Mapping[str, np.ndarray], z: int, affine: np.ndarray, path: Path, title: str
) -> Path:
    """Colour-FA (brightness FA; red, green, blue = principal direction along voxel x, y, z)."""
    figure, axes = _new_figure(len(rgb), height=3.8)
    panels = {name: np.clip(_axial(volume, z), 0, 1) for name, volume in rgb.items()}
    _slice_panels(figure, axes, panels, affine)
    codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    legend = [
        Patch(color=colour, label=f"{axis} ({_OPPOSITE[code]}–{code})")
        for colour, axis, code in zip(("red", "green", "blue"), ("x", "y", "z"), codes, strict=True)
    ]
    figure.legend(
        handles=legend, loc="lower center", ncol=3, bbox_to_anchor=(0.5, -0.12), frameon=False
    )
    figure.suptitle(f"{title}; RGB = voxel x / y / z")
    return _save(figure, path)


def error_figure(
    errors: Mapping[str, np.ndarray], z: int, affine: np.ndarray, path: Path, title: str
) -> Path:
    """Per-voxel RMSE over the 6 tensor elements (1e-5 mm^2/s), one shared colour scale."""
    panels = {name: _axial(volume, z) / RMSE_UNIT for name, volume in errors.items()}
    vmax = max(float(np.percentile(p, 99.5)) for p in panels.values()) or 1.0
    figure, axes = _new_figure(len(panels))
    image = _slice_panels(figure, axes, panels, affine, cmap="inferno", vmin=0, vmax=vmax)
    figure.colorbar(image, ax=axes, shrink=0.8, label="|error| (1e-5 mm$^2$/s)")
    figure.suptitle(title)
    return _save(figure, path)


def uncertainty_figure(
    error: np.ndarray,
    sigma: np.ndarray,
    z: int,
    affine: np.ndarray,
    path: Path,
    title: str,
    names: tuple[str, str] = ("|error|", "predicted σ"),
) -> Path:
    """A model's actual error beside its predicted standard deviation (per-voxel RMS over the
    6 elements, 1e-5 mm^2/s, one colour scale): where it is unsure should be where it errs.
    ``names`` relabels the panels (e.g. two sigma maps side by side)."""
    panels = {names[0]: _axial(error, z) / RMSE_UNIT, names[1]: _axial(sigma, z) / RMSE_UNIT}
    vmax = max(float(np.percentile(p, 99.5)) for p in panels.values()) or 1.0
    figure, axes = _new_figure(2)
    image = _slice_panels(figure, axes, panels, affine, cmap="inferno", vmin=0, vmax=vmax)
    figure.colorbar(image, ax=axes, shrink=0.8, label="RMS over 6 elements (1e-5 mm$^2$/s)")
    figure.suptitle(title)
    return _save(figure, path)


def reliability_figure(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str
) -> Path:
    """Observed against nominal coverage of Gaussian central intervals (the diagonal is
    calibrated; below it the model is over-confident)."""
    figure = Figure(figsize=(4.2, 4.2))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    for name, (expected, observed) in curves.items():
        axis.plot(expected, observed, marker="o", markersize=3, label=name)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("nominal coverage of the interval ±kσ")
    axis.set_ylabel("observed fraction of brain voxel elements")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title, fontsize=9)
    return _save(figure, path)
