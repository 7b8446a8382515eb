"""PNG figures of an evaluation and of the depth study: the paper's Fig. 5 (axial MD slice),
colour-FA, error maps, and, for a model that predicts its uncertainty, a reliability diagram and
error beside uncertainty; the study's RMSE against depth (Fig. 4) and its autograd memory and
step time against depth (Fig. 6).

Figures are ``matplotlib.figure.Figure`` objects drawn by the Agg canvas, so neither importing
this module nor drawing selects matplotlib's global backend (or touches any user's pyplot
session), and no display is needed. Slices are
drawn in voxel order (voxel x to the right, voxel y upwards); every slice figure labels its edges
with the subject's directions taken from the affine (``nibabel.aff2axcodes``) and says whether
the drawing is radiological (the subject's left on the image's right, as HCP's LAS storage gives)
or neurological.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from monai_iqt.maps import tensor_maps
from monai_iqt.metrics import REGIONS, RMSE_UNIT, voxel_rms
from preprocessing.io import atomic_path

if TYPE_CHECKING:
    from monai_iqt.data.subjects import Subject
    from monai_iqt.evaluation import Prediction

#: Bytes per MB, as the memory benchmark counts them.
MB = 1e6

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


def _mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Observed coverage averaged over subjects (each subject weighs the same)."""
    return curves[0][0], np.mean([observed for _, observed in curves], axis=0)


def reliability_figure(
    curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], path: Path, title: str
) -> Path:
    """Observed against nominal coverage of Gaussian central intervals (the diagonal is
    calibrated; below it the model is over-confident), averaged over subjects: ``curves``
    holds per model one (nominal, observed) curve per subject."""
    figure = Figure(figsize=(4.2, 4.2))
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    for name, per_subject in curves.items():
        expected, observed = _mean_curve(per_subject)
        axis.plot(expected, observed, marker="o", markersize=3, label=name)
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_aspect("equal")
    axis.set_xlabel("nominal coverage of the interval ±kσ")
    axis.set_ylabel("observed fraction of brain voxel elements")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title(title, fontsize=9)
    return _save(figure, path)


# --------------------------------------------------------------------------- one subject


def _central_slice(mask_hr: np.ndarray) -> int:
    return int(np.round(np.nonzero(mask_hr.any(axis=(0, 1)))[0].mean()))


def subject_figures(
    subject: Subject,
    predictions: Mapping[str, Prediction],
    preferred: Sequence[str | None],
    out: Path,
) -> dict[str, Path]:
    """Fig. 5-like MD panel, colour-FA and error maps at the brain's central axial slice, and
    the error beside the uncertainty of the first model that predicts one.

    The panels show the ``preferred`` predictions that exist (evaluation: its first model and
    cubic B-spline), else the first prediction.
    """
    z = _central_slice(subject.mask_hr)
    affine = subject.header.hr_affine
    preferred = [name for name in preferred if name in predictions]
    shown = preferred or list(predictions)[:1]  # e.g. baselines only, without cubic
    maps = {"ground truth": tensor_maps(subject.dt_hr, subject.mask_hr)}
    maps.update({name: tensor_maps(predictions[name].mean, subject.mask_hr) for name in shown})
    md_lr = tensor_maps(subject.dt_lr, subject.mask_lr)["md"]
    errors = {
        name: voxel_rms(predictions[name].mean - subject.dt_hr) * subject.mask_hr for name in shown
    }
    title = f"subject {subject.name}, axial slice z={z}"
    files = {
        "md": md_figure(
            md_lr,
            {k: v["md"] for k, v in maps.items()},
            z,
            subject.upscale_factor,
            affine,
            out / "md_axial.png",
            title,
        ),
        "colour_fa": colour_fa_figure(
            {k: v["colour_fa"] for k, v in maps.items()},
            z,
            affine,
            out / "colour_fa_axial.png",
            title,
        ),
        "error": error_figure(errors, z, affine, out / "abs_error_axial.png", title),
    }
    uncertain = next((n for n, p in predictions.items() if p.std is not None), None)
    if uncertain is not None:
        error = errors.get(uncertain)
        if error is None:
            error = voxel_rms(predictions[uncertain].mean - subject.dt_hr) * subject.mask_hr
        files["uncertainty"] = uncertainty_figure(
            error,
            voxel_rms(predictions[uncertain].std) * subject.mask_hr,
            z,
            affine,
            out / "uncertainty_axial.png",
            f"{uncertain}, {title}",
        )
    return files


# --------------------------------------------------------------------------- depth study


def rmse_vs_depth_figure(
    series: Mapping[Any, Sequence[tuple[int, Mapping[str, Sequence[float]]]]],
    baseline: Mapping[str, float] | None,
    baseline_name: str,
    path: Path,
) -> Path:
    """Interior, exterior and total RMSE against N, one line per TVS: mean ± sd of each
    depth's values (the study's: per seed, the test-subject mean), the baseline dashed.

    ``series``: per TVS, ``(depth, {region: values})`` by depth; ``baseline``: its RMSE per
    region, or None.
    """
    figure = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    ticks = sorted({depth for cells in series.values() for depth, _ in cells})
    for axis, region in zip(axes, REGIONS, strict=True):
        for tvs, cells in series.items():
            depths = [depth for depth, _ in cells]
            values = [per_region[region] for _, per_region in cells]
            axis.errorbar(
                depths,
                [np.mean(v) for v in values],
                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values],
                marker="o",
                capsize=3,
                label=f"TVS {tvs}",
            )
        if baseline is not None:
            axis.axhline(baseline[region], color="grey", linestyle="--", label=baseline_name)
        axis.set_xticks(ticks)
        axis.set_title(f"RMSE {region}")
        axis.set_xlabel("reversible blocks per stack N")
        axis.set_ylabel("RMSE (1e-5 mm²/s)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    return _save(figure, path)


def memory_time_figure(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Fig. 6 against depth: peak bytes saved by autograd and step time, both modes."""
    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    memory_axis, time_axis = figure.subplots(1, 2)
    for memory_efficient, label in ((False, "plain (naive)"), (True, "memory-efficient")):
        mine = sorted(
            (r for r in results if r["memory_efficient"] == memory_efficient),
            key=lambda r: r["depth"],
        )
        depths = [r["depth"] for r in mine]
        memory_axis.plot(
            depths, [r["saved_peak_bytes"] / MB for r in mine], marker="o", label=label
        )
        time_axis.plot(depths, [r["median_step_seconds"] for r in mine], marker="o", label=label)
        for axis in (memory_axis, time_axis):
            axis.set_xticks(depths)
    batch = results[0]["batch_size"] if results else "?"
    memory_axis.set_ylabel("peak bytes saved by autograd (MB)")
    time_axis.set_ylabel("median time of one training step (s)")
    for axis in (memory_axis, time_axis):
        axis.set_xlabel("reversible blocks per stack N")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"One Adam step, batch {batch} of 11³ LR patches")
    return _save(figure, path)
