"""Evaluate trained models and interpolation baselines on preprocessed test subjects.

Per subject (found by ``preprocessing.layout.find_subjects``, read by
``monai_iqt.data.subjects.load_subject``): predict the HR tensor from ``dt_lr`` with every model,
interpolate ``dt_lr`` (nearest, trilinear, cubic B-spline), and compute RMSE against ``dt_hr`` in
the interior, exterior and whole brain (:mod:`monai_iqt.metrics`). A model that also returns a
standard deviation per element gets ``coverage_1sigma``, ``coverage_2sigma`` and
``spearman_sigma_error``. :func:`evaluate` returns one row per (subject, model) and, given an
output folder, writes ``metrics.csv``, ``summary.md`` (mean ± std per model in the layout of the
paper's Fig. 4, plus a Wilcoxon signed-rank test), ``summary.json`` and PNG figures.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from monai_iqt import defaults, figures
from monai_iqt.data.subjects import Subject, inspect_subject, load_subject
from monai_iqt.inference_plan import check_inference_settings
from monai_iqt.inferers import make_inferer
from monai_iqt.metrics import (
    BASELINE_ORDERS,
    REGIONS,
    calibration_curve,
    interior_mask,
    interpolate_lr,
    region_rmse,
    uncertainty_metrics,
)
from monai_iqt.outputs import check_writable
from monai_iqt.reporting import mean_sd, model_table, paired_sentence, paired_wilcoxon, write_csv
from preprocessing.errors import InputError, as_bool, exit_on_bad_input
from preprocessing.geometry import block_any
from preprocessing.io import write_json, write_text
from preprocessing.layout import DT_HR, DT_LR, MASK_HR, MASK_LR, find_subjects

log = logging.getLogger(__name__)

#: Method names of the interpolation baselines, as they appear in the tables.
BASELINE_NAMES = {"nearest": "nearest", "trilinear": "trilinear", "cubic": "cubic B-spline"}

#: Columns of ``metrics.csv``, one row per (subject, model); RMSE in 1e-5 mm^2/s. ``depth``
#: (reversible blocks per stack) and ``tvs`` (training subjects) are empty for baselines; the
#: uncertainty columns are empty for models that predict no standard deviation.
COLUMNS = (
    "subject",
    "model",
    "depth",
    "tvs",
    *REGIONS,
    "voxels_interior",
    "voxels_exterior",
    "coverage_1sigma",
    "coverage_2sigma",
    "spearman_sigma_error",
)
UNCERTAINTY_COLUMNS = COLUMNS[-3:]

EVALUATION_FILES = (DT_LR, DT_HR, MASK_LR, MASK_HR)


class Model(Protocol):
    """What evaluation needs of a model: an HR prediction from an LR tensor volume.

    ``model(dt_lr, brain_lr)`` takes (X, Y, Z, 6) mm^2/s and the LR voxels to predict, and returns
    the HR tensor (rX, rY, rZ, 6) in mm^2/s, or ``(mean, std)`` with the predictive standard
    deviation per element (same shape and units). A model whose ``gives_std`` is true is asked
    ``model.predict_with_std(dt_lr, brain_lr) -> (mean, std)`` instead (as
    :class:`~monai_iqt.inferers.WholeBrainInferer`). ``upscale_factor`` is r; ``stats.extra``
    (the model's ``normalisation.json``) gives its depth and training subjects when present.
    """

    upscale_factor: int

    def __call__(self, dt_lr: np.ndarray, brain_lr: np.ndarray) -> Any: ...


@dataclass
class Prediction:
    """An HR prediction (rX, rY, rZ, 6) in mm^2/s, with its standard deviation when predicted."""

    mean: np.ndarray
    std: np.ndarray | None = None


@dataclass
class EvaluationResult:
    """Rows per (subject, model), the Wilcoxon test and the files written."""

    rows: list[dict] = field(default_factory=list)
    wilcoxon: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    summary_markdown: str = ""


def model_label(num_blocks: int) -> str:
    """The paper's model name: ESPCN, or ESPCN-RN<N> with N reversible blocks per stack."""
    return "ESPCN" if int(num_blocks) == 0 else f"ESPCN-RN{int(num_blocks)}"


def model_facts(model: Model) -> dict[str, Any]:
    """Depth, training-set size, training and validation subjects recorded with a model's
    weights."""
    extra = getattr(getattr(model, "stats", None), "extra", None) or {}
    trained = [str(s) for s in extra.get("training_subjects") or []]
    depth = extra.get("num_blocks")
    return {
        "depth": None if depth is None else int(depth),
        "tvs": len(trained) if trained else None,
        "training_subjects": trained,
        "validation_subjects": [str(s) for s in extra.get("validation_subjects") or []],
    }


def as_prediction(output: Any, name: str) -> Prediction:
    """A model's output as a :class:`Prediction`: an array, ``(mean, std)``, or a mapping with
    ``dt_hr`` and optionally ``dt_hr_std`` (the inference output names)."""
    if isinstance(output, Prediction):
        return output
    if isinstance(output, Mapping):
        return Prediction(np.asarray(output["dt_hr"]), _optional(output.get("dt_hr_std")))
    if isinstance(output, tuple | list):
        if len(output) != 2:
            raise ValueError(f"model {name} returned {len(output)} volumes, not (mean, std)")
        return Prediction(np.asarray(output[0]), _optional(output[1]))
    return Prediction(np.asarray(output))


def _optional(volume: Any) -> np.ndarray | None:
    return None if volume is None else np.asarray(volume)


def predict_subject(
    subject: Subject, models: Mapping[str, Model], methods: Sequence[str]
) -> dict[str, Prediction]:
    """HR predictions of every model and baseline for one subject."""
    predictions = {}
    region = block_any(subject.mask_hr, subject.upscale_factor)
    for name, model in models.items():
        factor = getattr(model, "upscale_factor", subject.upscale_factor)
        if int(factor) != subject.upscale_factor:
            raise InputError(
                f"subject {subject.name} is downsampled by {subject.upscale_factor} but model "
                f"{name} upsamples by {factor}."
            )
        if getattr(model, "gives_std", False):
            output = model.predict_with_std(subject.dt_lr, region)
        else:
            output = model(subject.dt_lr, region)
        predictions[name] = as_prediction(output, name)
    for method in methods:
        predictions[BASELINE_NAMES[method]] = Prediction(
            interpolate_lr(subject.dt_lr, subject.upscale_factor, method)
        )
    return predictions


def select_subjects(
    dataset_dir: str | os.PathLike,
    subjects: Any,
    training_subjects: Sequence[str] = (),
    validation_subjects: Sequence[str] = (),
) -> list[Path]:
    """The subjects to evaluate, as folders.

    Named ``subjects`` are taken as given (a warning names those the models were trained or
    validated on). Without names: every preprocessed subject of ``dataset_dir`` the models were
    neither trained nor validated on (a validation subject chose the epoch and the restart, so
    it is no test subject); a held-out subject lacking a file evaluation needs (e.g. ``dt_hr``)
    is named in a warning, or in the error when no held-out subject is complete.
    """
    trained = set(training_subjects)
    validated = set(validation_subjects) - trained
    if _named(subjects):
        folders = find_subjects(dataset_dir, subjects, require=EVALUATION_FILES)
        for role, used_for in (("train", trained), ("validate", validated)):
            used = [f.name for f in folders if f.name in used_for]
            if used:
                log.warning(
                    "subjects %s were used to %s the model: their RMSE does not measure "
                    "generalisation",
                    ", ".join(used),
                    role,
                )
        return folders
    candidates = find_subjects(dataset_dir, require=())
    held_out = [f for f in candidates if f.name not in trained | validated]
    if not held_out:
        raise InputError(
            f"every subject in {dataset_dir} was used to train or validate the model; pass "
            "--subjects to evaluate them anyway."
        )
    lacking = {f.name: [n for n in EVALUATION_FILES if not (f / n).is_file()] for f in held_out}
    lacking = {name: missing for name, missing in lacking.items() if missing}
    described = "; ".join(f"{name} has no {', '.join(m)}" for name, m in lacking.items())
    complete = [f for f in held_out if f.name not in lacking]
    if not complete:
        raise InputError(
            f"no held-out subject of {dataset_dir} can be evaluated ({described}): evaluation "
            f"compares predictions with {DT_HR}, the HR ground truth."
        )
    if lacking:
        log.warning("held-out subjects left out of the evaluation: %s", described)
    return complete


def _named(subjects: Any) -> bool:
    """Whether subjects are named (``None`` or an empty list means all held-out subjects)."""
    return subjects is not None and not (isinstance(subjects, list | tuple) and not subjects)


def summary_table(rows: list[dict], models: Sequence[str]) -> str:
    """Markdown table in the layout of the paper's Fig. 4: mean (± std) RMSE per model."""

    def cells(mine: list[dict]) -> list[str]:
        tvs = mine[0]["tvs"] if mine and mine[0]["tvs"] is not None else "–"
        return [str(tvs), str(len(mine)), *(mean_sd([r[k] for r in mine]) for k in REGIONS)]

    headings = ("Model", "Subjects (TVS)", "Test subjects", "RMSE Interior", "RMSE Exterior")
    return model_table(rows, models, (*headings, "RMSE Total"), cells)


def uncertainty_table(rows: list[dict], models: Sequence[str]) -> str:
    """Markdown table of coverage and rank correlation, mean (± std) over test subjects."""

    def cells(mine: list[dict]) -> list[str]:
        return [mean_sd([r[c] for r in mine], digits=3) for c in UNCERTAINTY_COLUMNS]

    headings = ("Model", "Coverage 1σ", "Coverage 2σ", "Spearman σ vs error")
    return model_table(rows, models, headings, cells)


def evaluate(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    inferers: Mapping[str, Model] | None = None,
    subjects: Sequence[str] | None = None,
    methods: Sequence[str] = ("nearest", "trilinear", "cubic"),
    interior_radius: int = defaults.INTERIOR_RADIUS,
    compare: Sequence[str] | None = None,
    figure_subject: str | None = None,
) -> EvaluationResult:
    """Evaluate models and baselines on held-out subjects; rows per (subject, model).

    Args:
        dataset_dir: preprocessed subjects (``python -m preprocessing hcp`` output).
        output_dir: where ``metrics.csv``, ``summary.md``/``.json`` and the figures go; ``None``
            writes nothing (the rows are in the result).
        inferers: models by display name, e.g. ``{"ESPCN": a, "ESPCN-RN2": b}`` (see
            :class:`Model`); none = baselines only.
        subjects: subject ids; default: every subject none of the models was trained or
            validated on.
        methods: interpolation baselines among nearest, trilinear, cubic.
        interior_radius: LR neighbourhood radius defining the interior (DESIGN.md: 2).
        compare: two model names for the Wilcoxon test (default: first model vs cubic B-spline).
        figure_subject: subject shown in the figures (default: the first).
    """
    models = dict(inferers or {})
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    unknown = [m for m in methods if m not in BASELINE_ORDERS]
    if unknown:
        raise InputError(
            f"unknown baseline {unknown[0]!r}: choose among {sorted(BASELINE_ORDERS)}."
        )
    if (
        isinstance(interior_radius, bool)
        or not isinstance(interior_radius, int)
        or (interior_radius < 0)
    ):
        raise InputError(
            f"interior_radius must be a whole number of LR voxels >= 0, got {interior_radius!r}."
        )
    names = list(models) + [BASELINE_NAMES[m] for m in methods]
    if not names:
        raise InputError("nothing to evaluate: give a model or at least one baseline method.")
    if compare is None:
        compare = (
            (names[0], BASELINE_NAMES["cubic"]) if models and "cubic" in methods else names[:2]
        )
    compare = list(compare)
    if len(names) >= 2 and (len(compare) != 2 or any(c not in names for c in compare)):
        raise InputError(f"compare must name two of the evaluated methods {names}, got {compare}.")
    facts = {name: model_facts(model) for name, model in models.items()}
    trained = sorted({s for f in facts.values() for s in f["training_subjects"]})
    validated = sorted({s for f in facts.values() for s in f["validation_subjects"]})
    folders = select_subjects(dataset_dir, subjects, trained, validated)
    headers = [inspect_subject(folder) for folder in folders]  # every header before any voxel
    out = None if output_dir is None else check_writable(output_dir)
    figure_subject = str(figure_subject) if figure_subject is not None else headers[0].name
    if figure_subject not in {h.name for h in headers}:
        raise InputError(f"figure_subject {figure_subject} is not among the evaluated subjects.")
    result = EvaluationResult()
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for header in headers:
        subject = load_subject(header)
        predictions = predict_subject(subject, models, methods)
        interior = interior_mask(
            subject.mask_lr, subject.mask_hr, subject.upscale_factor, interior_radius
        )
        for name, prediction in predictions.items():
            result.rows.append(_row(subject, name, prediction, interior, facts.get(name), curves))
        log.info(
            "%s: %s",
            subject.name,
            ", ".join(f"{r['model']} {r['total']:.3f}" for r in result.rows[-len(predictions) :]),
        )
        if out is not None and subject.name == figure_subject:
            out.mkdir(parents=True, exist_ok=True)
            preferred = (next(iter(models), None), BASELINE_NAMES["cubic"])
            result.files.update(figures.subject_figures(subject, predictions, preferred, out))
    if len(compare) == 2:
        result.wilcoxon = paired_wilcoxon(result.rows, *compare).as_dict()
    result.summary_markdown = _summary_markdown(result, names, interior_radius)
    if out is None:
        return result
    out.mkdir(parents=True, exist_ok=True)
    if curves:
        result.files["reliability"] = figures.reliability_figure(
            curves, out / "reliability.png", f"calibration over {len(headers)} test subjects"
        )
    result.files["metrics"] = write_csv(out / "metrics.csv", COLUMNS, result.rows)
    result.files["summary"] = write_text(out / "summary.md", result.summary_markdown)
    result.files["summary_json"] = write_json(
        out / "summary.json",
        {"rows": result.rows, "wilcoxon": result.wilcoxon, "interior_radius": interior_radius},
    )
    return result


def _row(
    subject: Subject,
    name: str,
    prediction: Prediction,
    interior: np.ndarray,
    facts: dict[str, Any] | None,
    curves: dict[str, list],
) -> dict[str, Any]:
    """One row of ``metrics.csv`` (RMSE in 1e-5 mm^2/s); collects the calibration curve."""
    rmse = region_rmse(prediction.mean, subject.dt_hr, subject.mask_hr, interior)
    row: dict[str, Any] = {
        "subject": subject.name,
        "model": name,
        "depth": facts["depth"] if facts else None,
        "tvs": facts["tvs"] if facts else None,
        **rmse,
        "voxels_interior": int(np.count_nonzero(interior)),
        "voxels_exterior": int(np.count_nonzero(subject.mask_hr & ~interior)),
        **dict.fromkeys(UNCERTAINTY_COLUMNS),
    }
    if prediction.std is not None:
        error = prediction.mean.astype(np.float64) - subject.dt_hr
        row.update(uncertainty_metrics(error, prediction.std, subject.mask_hr))
        curves.setdefault(name, []).append(
            calibration_curve(error, prediction.std, subject.mask_hr)
        )
    return row


def _summary_markdown(result: EvaluationResult, names: Sequence[str], radius: int) -> str:
    text = (
        "# Evaluation\n\n"
        "RMSE over the 6 tensor elements of brain voxels, in 1e-5 mm²/s, mean (± std) over test "
        f"subjects. Interior: brain voxels whose LR voxel's radius-{radius} neighbourhood lies "
        "inside the LR mask; exterior: the other brain voxels. Subjects (TVS): training subjects "
        "of the model.\n\n"
        f"{summary_table(result.rows, names)}\n\n{paired_sentence(result.wilcoxon)}\n"
    )
    predicted_sigma = {r["model"] for r in result.rows if r["coverage_1sigma"] is not None}
    uncertain = [n for n in names if n in predicted_sigma]
    if uncertain:
        text += (
            "\n## Uncertainty\n\n"
            "Coverage: fraction of brain voxel elements with |error| ≤ kσ (a calibrated Gaussian "
            "gives 0.68 for 1σ and 0.95 for 2σ). Spearman: rank correlation over brain voxels of "
            "the predicted σ and the actual error, each the RMS over the 6 elements.\n\n"
            f"{uncertainty_table(result.rows, uncertain)}\n"
        )
    return text


@exit_on_bad_input
def bundle_evaluate(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike | None,
    normalisation_path: str | os.PathLike | None,
    roi_size: Sequence[int] | int = defaults.ROI_SIZE,
    sw_batch_size: int = defaults.SW_BATCH_SIZE,
    device: str | None = None,
    baselines_only: bool = defaults.BASELINES_ONLY,
    inferer: Model | None = None,
    inferer_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> EvaluationResult:
    """The bundle's evaluation entry: load the model, :func:`evaluate`, print the table once.

    Without ``subjects``, the subjects the model was trained on (``training_subjects`` in its
    normalisation statistics) are left out: the table is about held-out subjects. ``inferer``
    (a :class:`Model`, e.g. wired by the config) replaces loading ``model_path``;
    ``inferer_options`` go to ``make_inferer`` (e.g. ``inference_mode``);
    ``baselines_only`` (or no model) evaluates the interpolation baselines only. Bad input
    prints one sentence and exits with code 2.
    """
    if dataset_dir is None or str(dataset_dir) in ("", "None"):
        raise InputError(
            "setting dataset_dir is required: pass --dataset_dir DIR (preprocessed subjects)."
        )
    subjects = kwargs.get("subjects")  # checked before loading the model
    find_subjects(dataset_dir, *((subjects, EVALUATION_FILES) if _named(subjects) else (None, ())))
    models: dict[str, Model] = {}
    if not as_bool(baselines_only) and (inferer is not None or model_path is not None):
        if inferer is None:
            options = dict(inferer_options or {})
            # the inference entry's own checks; evaluation reads DIPY-ordered dt_lr, no repair
            check_inference_settings(
                options.get("inference_mode", defaults.INFERENCE_MODE),
                roi_size,
                sw_batch_size,
                tensor_order="dipy",
                repair_tensors=False,
                mc_samples=options.get("mc_samples", defaults.MC_SAMPLES),
                normalisation_path=normalisation_path,
            )
            inferer = make_inferer(
                model_path, normalisation_path, roi_size, sw_batch_size, device, **options
            )
        depth = model_facts(inferer)["depth"]
        models[model_label(depth or 0)] = inferer
    result = evaluate(dataset_dir, output_dir, models, **kwargs)
    print(result.summary_markdown, flush=True)
    print(f"wrote {', '.join(str(p) for p in result.files.values())}", flush=True)
    return result
