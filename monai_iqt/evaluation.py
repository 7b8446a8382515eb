"""Evaluate a trained model and interpolation baselines on preprocessed test subjects.

Per subject (``<dataset_dir>/<id>/{dt_lr,dt_hr,mask_lr,mask_hr}.nii.gz``, as written by
``python -m preprocessing``): predict the HR tensor from ``dt_lr`` by sliding-window inference,
interpolate ``dt_lr`` (nearest, trilinear, cubic B-spline), and compute RMSE against ``dt_hr`` in
the interior, exterior and whole brain (:mod:`monai_iqt.metrics`). Writes ``metrics.csv``
(subject x method), ``summary.md`` (mean +- std per method, laid out like the paper's Fig. 4
table, plus a Wilcoxon signed-rank test), ``summary.json`` and PNG figures.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as scipy_stats

from monai_iqt import figures
from monai_iqt.inference import DEFAULT_ROI_SIZE, WholeBrainInferer, check_output_dir, make_inferer
from monai_iqt.maps import tensor_maps
from monai_iqt.metrics import BASELINE_ORDERS, REGIONS, interior_mask, interpolate_lr, region_rmse
from monai_iqt.training.handlers import as_bool
from preprocessing.io import InputError, read_nifti, write_json, write_text

log = logging.getLogger(__name__)

SUBJECT_FILES = ("dt_lr", "dt_hr", "mask_lr", "mask_hr")

#: Method names of the interpolation baselines, as they appear in the tables.
BASELINE_NAMES = {"nearest": "nearest", "trilinear": "trilinear", "cubic": "cubic B-spline"}

_PREPROCESS_HINT = (
    "make them with `python -m preprocessing synthetic --out demo/hcp --subjects 4 --seed 0` "
    "then `python -m preprocessing hcp --hcp-root demo/hcp --out demo/preprocessed`"
)


@dataclass
class Subject:
    """One preprocessed test subject, loaded."""

    name: str
    dt_lr: np.ndarray
    dt_hr: np.ndarray
    mask_lr: np.ndarray
    mask_hr: np.ndarray
    factor: int


@dataclass
class EvaluationResult:
    """RMSE per (subject, method, region), the Wilcoxon test and the files written."""

    rows: list[dict] = field(default_factory=list)
    wilcoxon: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    summary_markdown: str = ""


def model_label(num_blocks: int) -> str:
    """The paper's model name: ESPCN, or ESPCN-RN<N> with N reversible blocks per stack."""
    return "ESPCN" if int(num_blocks) == 0 else f"ESPCN-RN{int(num_blocks)}"


def find_subjects(
    dataset_dir: str | os.PathLike, subjects: Sequence[str] | None = None
) -> list[Path]:
    """Subject folders to evaluate; one clear sentence if the dataset or a subject is missing."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise InputError(f"dataset folder {dataset_dir} does not exist: {_PREPROCESS_HINT}")
    if isinstance(subjects, str | int):  # "--subjects 100307" on the command line
        subjects = [str(subjects)]
    if subjects:
        folders = [dataset_dir / str(name) for name in subjects]
        for folder in folders:
            missing = [n for n in SUBJECT_FILES if not (folder / f"{n}.nii.gz").is_file()]
            if missing:
                raise InputError(
                    f"subject {folder.name} in {dataset_dir} lacks {', '.join(missing)} (.nii.gz)"
                )
        return folders
    folders = sorted(
        p
        for p in dataset_dir.iterdir()
        if all((p / f"{n}.nii.gz").is_file() for n in SUBJECT_FILES)
    )
    if not folders:
        raise InputError(f"{dataset_dir} holds no preprocessed subject: {_PREPROCESS_HINT}")
    return folders


def load_subject(folder: Path) -> tuple[Subject, np.ndarray]:
    """Load and check one subject; returns it and the LR affine."""
    dt_lr, lr_affine = read_nifti(folder / "dt_lr.nii.gz", np.float32)
    dt_hr, _ = read_nifti(folder / "dt_hr.nii.gz", np.float32)
    mask_lr = read_nifti(folder / "mask_lr.nii.gz")[0] > 0
    mask_hr = read_nifti(folder / "mask_hr.nii.gz")[0] > 0
    if dt_lr.ndim != 4 or dt_lr.shape[3] != 6 or dt_hr.ndim != 4 or dt_hr.shape[3] != 6:
        raise InputError(
            f"{folder}: dt_lr {dt_lr.shape} and dt_hr {dt_hr.shape} must be (X, Y, Z, 6)"
        )
    ratios = {dt_hr.shape[i] / dt_lr.shape[i] for i in range(3)}
    if len(ratios) != 1 or not float(next(iter(ratios))).is_integer():
        raise InputError(
            f"{folder}: dt_hr shape {dt_hr.shape[:3]} is not a whole multiple of dt_lr "
            f"shape {dt_lr.shape[:3]}"
        )
    if mask_lr.shape != dt_lr.shape[:3] or mask_hr.shape != dt_hr.shape[:3]:
        raise InputError(f"{folder}: mask shapes differ from the tensor volumes")
    for name, data in (("dt_lr", dt_lr), ("dt_hr", dt_hr)):
        if not np.isfinite(data).all():
            raise InputError(f"{folder / name}.nii.gz contains NaN or infinite values")
    subject = Subject(folder.name, dt_lr, dt_hr, mask_lr, mask_hr, int(next(iter(ratios))))
    return subject, lr_affine


def lr_brain_region(mask_hr: np.ndarray, factor: int) -> np.ndarray:
    """LR voxels whose HR block touches the brain: where the model must predict."""
    x, y, z = (s // factor for s in mask_hr.shape)
    blocks = mask_hr[: x * factor, : y * factor, : z * factor].reshape(
        x, factor, y, factor, z, factor
    )
    return blocks.any(axis=(1, 3, 5))


def predict_subject(
    subject: Subject, inferers: Mapping[str, WholeBrainInferer], methods: Sequence[str]
) -> dict[str, np.ndarray]:
    """HR predictions of every model and baseline for one subject."""
    predictions = {}
    region = lr_brain_region(subject.mask_hr, subject.factor)
    for name, inferer in inferers.items():
        if inferer.upscale_factor != subject.factor:
            raise InputError(
                f"subject {subject.name} is downsampled by {subject.factor} but model {name} "
                f"upsamples by {inferer.upscale_factor}"
            )
        predictions[name] = inferer(subject.dt_lr, region)
    for method in methods:
        predictions[BASELINE_NAMES[method]] = interpolate_lr(
            subject.dt_lr, subject.dt_hr.shape, subject.factor, method
        )
    return predictions


def wilcoxon_test(rows: list[dict], first: str, second: str, region: str = "total") -> dict:
    """Wilcoxon signed-rank test of paired per-subject RMSE of two methods (scipy)."""
    by_subject: dict[str, dict[str, float]] = {}
    for row in rows:
        by_subject.setdefault(row["subject"], {})[row["method"]] = row[f"rmse_{region}"]
    pairs = [(v[first], v[second]) for v in by_subject.values() if first in v and second in v]
    result = {"first": first, "second": second, "region": region, "n": len(pairs)}
    differences = [a - b for a, b in pairs]
    if len(pairs) < 2 or not any(differences):
        result.update(statistic=None, p_value=None, note="needs two or more subjects that differ")
        return result
    test = scipy_stats.wilcoxon([a for a, _ in pairs], [b for _, b in pairs])
    wins = sum(a < b for a, b in pairs)
    result.update(
        statistic=float(test.statistic),
        p_value=float(test.pvalue),
        first_better_in=wins,
        note=f"{first} has the lower {region} RMSE in {wins} of {len(pairs)} subjects",
    )
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} (± {np.std(values, ddof=1):.2f})"


def summary_table(rows: list[dict], methods: Sequence[str]) -> str:
    """Markdown table in the layout of the paper's Fig. 4: mean (± std) RMSE per method."""
    lines = [
        "| Model | Test subjects | RMSE Interior | RMSE Exterior | RMSE Total |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        cells = [_mean_std([r[f"rmse_{region}"] for r in mine]) for region in REGIONS]
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def _figures(
    subject: Subject, predictions: Mapping[str, np.ndarray], model: str | None, out: Path
) -> dict[str, Path]:
    """Fig. 5-like MD panel, colour-FA and error maps at the brain's central axial slice."""
    z = int(np.round(np.nonzero(subject.mask_hr.any(axis=(0, 1)))[0].mean()))
    preferred = [name for name in (model, BASELINE_NAMES["cubic"]) if name in predictions]
    shown = preferred or list(predictions)[:1]  # e.g. baselines only, without cubic
    maps = {"ground truth": tensor_maps(subject.dt_hr, subject.mask_hr)}
    maps.update({name: tensor_maps(predictions[name], subject.mask_hr) for name in shown})
    md_lr = tensor_maps(subject.dt_lr, subject.mask_lr)["md"]
    errors = {
        name: np.sqrt(np.mean((predictions[name] - subject.dt_hr) ** 2, axis=-1)) * subject.mask_hr
        for name in shown
    }
    title = f"subject {subject.name}, axial slice z={z}"
    return {
        "md": figures.md_figure(
            md_lr,
            {k: v["md"] for k, v in maps.items()},
            z,
            subject.factor,
            out / "md_axial.png",
            title,
        ),
        "colour_fa": figures.colour_fa_figure(
            {k: v["colour_fa"] for k, v in maps.items()}, z, out / "colour_fa_axial.png", title
        ),
        "error": figures.error_figure(errors, z, out / "abs_error_axial.png", title),
    }


def evaluate(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    inferers: Mapping[str, WholeBrainInferer] | None = None,
    subjects: Sequence[str] | None = None,
    methods: Sequence[str] = ("nearest", "trilinear", "cubic"),
    interior_radius: int = 2,
    compare: Sequence[str] | None = None,
    figure_subject: str | None = None,
) -> EvaluationResult:
    """Evaluate models and baselines on the subjects; write metrics.csv, summary.md/json, figures.

    Args:
        dataset_dir: preprocessed subjects (``python -m preprocessing hcp`` output).
        output_dir: where the tables and figures go.
        inferers: models by display name (e.g. ``{"ESPCN-RN2": inferer}``); none = baselines only.
        subjects: subject ids (default: every complete subject folder).
        methods: interpolation baselines among nearest, trilinear, cubic.
        interior_radius: LR neighbourhood radius defining the interior (DESIGN.md: 2).
        compare: two method names for the Wilcoxon test (default: first model vs cubic B-spline).
        figure_subject: subject shown in the figures (default: the first).
    """
    inferers = dict(inferers or {})
    unknown = [m for m in methods if m not in BASELINE_ORDERS]
    if unknown:
        raise InputError(f"unknown baseline {unknown[0]!r}: choose among {sorted(BASELINE_ORDERS)}")
    names = list(inferers) + [BASELINE_NAMES[m] for m in methods]
    if compare is None:
        compare = (
            (names[0], BASELINE_NAMES["cubic"]) if inferers and "cubic" in methods else names[:2]
        )
    compare = list(compare)
    if len(compare) != 2 or any(c not in names for c in compare):
        raise InputError(f"compare must name two of the evaluated methods {names}, got {compare}")
    folders = find_subjects(dataset_dir, subjects)
    out = check_output_dir(output_dir)
    figure_subject = figure_subject or folders[0].name
    result = EvaluationResult()
    for folder in folders:
        subject, _ = load_subject(folder)
        predictions = predict_subject(subject, inferers, methods)
        interior = interior_mask(subject.mask_lr, subject.mask_hr, subject.factor, interior_radius)
        for method, prediction in predictions.items():
            rmse = region_rmse(prediction, subject.dt_hr, subject.mask_hr, interior)
            result.rows.append(
                {
                    "subject": subject.name,
                    "method": method,
                    **{f"rmse_{region}": rmse[region] for region in REGIONS},
                    "voxels_interior": int(np.count_nonzero(interior)),
                    "voxels_exterior": int(np.count_nonzero(subject.mask_hr & ~interior)),
                }
            )
        log.info(
            "%s: %s",
            subject.name,
            ", ".join(
                f"{r['method']} {r['rmse_total']:.3f}" for r in result.rows[-len(predictions) :]
            ),
        )
        if subject.name == figure_subject:
            first_model = next(iter(inferers), None)
            result.files.update(_figures(subject, predictions, first_model, out))
    out.mkdir(parents=True, exist_ok=True)
    result.wilcoxon = wilcoxon_test(result.rows, *compare)
    result.summary_markdown = _summary_markdown(result, names, interior_radius)
    result.files["metrics"] = _write_csv(out / "metrics.csv", result.rows)
    result.files["summary"] = write_text(out / "summary.md", result.summary_markdown)
    result.files["summary_json"] = write_json(
        out / "summary.json",
        {"rows": result.rows, "wilcoxon": result.wilcoxon, "interior_radius": interior_radius},
    )
    return result


def _summary_markdown(result: EvaluationResult, names: Sequence[str], radius: int) -> str:
    w = result.wilcoxon
    if w.get("statistic") is None:
        test = f"Wilcoxon signed-rank test ({w['first']} vs {w['second']}, {w['region']} RMSE): "
        test += f"not computed ({w['note']}; n = {w['n']})."
    else:
        test = (
            f"Wilcoxon signed-rank test ({w['first']} vs {w['second']}, paired {w['region']} RMSE, "
            f"n = {w['n']}): W = {w['statistic']:g}, p = {w['p_value']:.4g}; {w['note']}."
        )
    return (
        "# Evaluation\n\n"
        "RMSE over the 6 tensor elements of brain voxels, in 1e-5 mm²/s, mean (± std) over test "
        f"subjects. Interior: brain voxels whose LR voxel's radius-{radius} neighbourhood lies "
        "inside the LR mask; exterior: the other brain voxels.\n\n"
        f"{summary_table(result.rows, names)}\n\n{test}\n"
    )


def bundle_evaluate(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike | None,
    normalisation_path: str | os.PathLike | None,
    roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
    sw_batch_size: int = 1,
    device: str | None = None,
    baselines_only: bool = False,
    **kwargs,
) -> EvaluationResult:
    """The bundle's ``evaluation``: load the model, :func:`evaluate`, print the table.

    Without ``subjects``, the subjects the model was trained on (``training_subjects`` in its
    normalisation statistics) are left out: the table is about held-out subjects. Bad input
    (missing data, weights or subjects) prints one sentence and exits with code 2.
    ``baselines_only`` (or ``model_path=None``) evaluates the interpolation baselines only.
    """
    try:
        folders = find_subjects(dataset_dir, kwargs.get("subjects"))  # before loading anything
        inferers = {}
        if model_path is not None and not as_bool(baselines_only):
            inferer = make_inferer(model_path, normalisation_path, roi_size, sw_batch_size, device)
            inferers[model_label(inferer.stats.extra.get("num_blocks", 0))] = inferer
            trained = set(inferer.stats.extra.get("training_subjects") or [])
            if not kwargs.get("subjects") and trained:
                kwargs["subjects"] = [f.name for f in folders if f.name not in trained]
                if not kwargs["subjects"]:
                    raise InputError(
                        f"every subject in {dataset_dir} was used to train the model; pass "
                        "--subjects to evaluate training subjects anyway"
                    )
                log.info("held-out subjects: %s", ", ".join(kwargs["subjects"]))
        result = evaluate(dataset_dir, output_dir, inferers, **kwargs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    print(result.summary_markdown, flush=True)
    print(f"wrote {', '.join(str(p) for p in result.files.values())}", flush=True)
    return result
