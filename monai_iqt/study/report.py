"""The depth study's tables: ``metrics.csv`` and ``summary.md``.

``metrics.csv`` has one row per test subject, model and seed, interpolation baselines included.
``summary.md`` gives the subjects of each role, the Fig. 4 table as mean ± sd over seeds of the
test-subject mean, the paired comparison of each depth against the ESPCN of the same
training-set size over (subject, seed) pairs (:func:`monai_iqt.reporting.paired_wilcoxon`), the
cell with the lowest mean total RMSE, and where the time went. The same per-seed means feed the
RMSE-against-depth figure (:func:`depth_series`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_iqt import evaluation
from monai_iqt.metrics import REGIONS
from monai_iqt.reporting import markdown_table, matching, mean_sd, paired_wilcoxon, write_csv
from monai_iqt.study.cell import TIME_PARTS, cell_means, record_times
from monai_iqt.study.plan import Splits, StudyPlan
from preprocessing.io import write_text

METRICS_COLUMNS = ("subject", "model", "depth", "tvs", "seed", "interior", "exterior", "total")
CUBIC = evaluation.BASELINE_NAMES["cubic"]


def metrics_rows(
    baseline_rows: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Rows of ``metrics.csv``: baselines (empty depth, tvs and seed), then every cell's."""
    rows = [{**r, "depth": "", "tvs": "", "seed": ""} for r in baseline_rows]
    for record in records:
        for row in record["evaluation"]["rows"]:
            rows.append(
                {
                    **row,
                    "model": record["model"],
                    "depth": record["depth"],
                    "tvs": record["tvs"],
                    "seed": record["seed"],
                }
            )
    return [{column: row[column] for column in METRICS_COLUMNS} for row in rows]


def write_metrics_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``metrics.csv``, every float as its repr (a NumPy float too, not its str)."""
    shown = [{k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return write_csv(path, METRICS_COLUMNS, shown, lineterminator="\n")


def _models(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
    """(model, depth, tvs) of every trained cell, by TVS then depth."""
    models = []
    for row in rows:
        key = (row["model"], row["depth"], row["tvs"])
        if row["depth"] != "" and key not in models:
            models.append(key)
    return sorted(models, key=lambda k: (k[2], k[1]))


def seed_means(
    rows: Sequence[Mapping[str, Any]], model: str, depth: int, tvs: int
) -> dict[Any, dict[str, float]]:
    """Per seed, the cell's mean RMSE over the test subjects, per region."""
    mine = matching(rows, {"model": model, "depth": depth, "tvs": tvs})
    seeds = sorted({r["seed"] for r in mine}, key=str)
    return {seed: cell_means([r for r in mine if r["seed"] == seed]) for seed in seeds}


def cubic_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
    """Cubic B-spline's mean RMSE over the test subjects, per region (None: not evaluated)."""
    cubic_rows = matching(rows, {"model": CUBIC})
    return cell_means(cubic_rows) if cubic_rows else None


def depth_series(
    rows: Sequence[Mapping[str, Any]],
) -> dict[Any, list[tuple[int, dict[str, list[float]]]]]:
    """What the RMSE-against-depth figure draws: per TVS, by depth, ``(depth, {region: the
    per-seed means over the test subjects})``."""
    series: dict[Any, list[tuple[int, dict[str, list[float]]]]] = {}
    for tvs in sorted({r["tvs"] for r in rows if r["tvs"] != ""}):
        series[tvs] = []
        for model, depth, _ in (m for m in _models(rows) if m[2] == tvs):
            per_seed = seed_means(rows, model, depth, tvs).values()
            per_region = {region: [m[region] for m in per_seed] for region in REGIONS}
            series[tvs].append((depth, per_region))
    return series


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    splits: Splits,
    settings: Mapping[str, Any],
    times: Sequence[Mapping[str, Any]] = (),
    records: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Fig. 4 table (mean ± sd over seeds of the test-subject mean), the paired comparisons
    against the ESPCN of the same TVS over (subject, seed) pairs, the cells' validation curves
    (from ``records``) and the time breakdown."""
    models = _models(rows)
    cubic = cubic_means(rows)
    cells = []
    for model, depth, tvs in models:
        per_seed = seed_means(rows, model, depth, tvs)
        shown = [
            mean_sd([m[region] for m in per_seed.values()], bracketed=False, skip_missing=False)
            for region in REGIONS
        ]
        total = float(np.mean([m["total"] for m in per_seed.values()]))
        ratio = f"{total / cubic['total']:.3f}" if cubic else "n/a"
        cells.append([model, f"{tvs}", f"{len(per_seed)}", *shown, ratio])
    if cubic:
        cells.append([CUBIC, "—", "—", *(f"{cubic[region]:.2f}" for region in REGIONS), "1.000"])
    headings = ("Model", "Subjects (TVS)", "Seeds", "RMSE Interior", "RMSE Exterior")
    lines = markdown_table((*headings, "RMSE Total", "Total / cubic B-spline"), cells)
    comparisons = []
    for model, depth, tvs in models:
        if depth == 0:
            continue
        espcn = {"model": evaluation.model_label(0), "depth": 0, "tvs": tvs}
        result = paired_wilcoxon(rows, {"model": model, "depth": depth, "tvs": tvs}, espcn)
        change = (
            "n/a"
            if result.median_relative_change is None
            else f"{100 * result.median_relative_change:+.1f} %"
        )
        statistic = "n/a" if result.statistic is None else f"{result.statistic:g}"
        comparisons.append([model, f"{tvs}", f"{result.n}", change, statistic, result.p_text()])
    validation = (
        ", ".join(splits.validation)
        if splits.validation
        else "none (each training subject's validation_fraction of patches)"
    )
    text = [
        "# Depth study",
        "",
        f"Subjects: training {', '.join(splits.train)} (a cell of TVS k uses the first k); "
        f"validation {validation} (early stopping, restart selection); test "
        f"{', '.join(splits.test)} (reported only, used for no choice).",
        "",
        "RMSE over the 6 tensor elements of brain voxels of the test subjects, in 1e-5 mm²/s: "
        "per cell, mean ± sd over seeds of the mean over test subjects (one seed: that "
        "value); cubic B-spline: mean over test subjects.",
        "",
        *lines,
        "",
    ]
    if comparisons:
        headings = ("Model", "Subjects (TVS)", "n pairs", "Median change of total RMSE", "W", "p")
        text += [
            "## Paired comparison against ESPCN of the same TVS",
            "",
            "Pairs: (test subject, seed). Change: median over pairs of (RMSE − RMSE of "
            "ESPCN) / RMSE of ESPCN, total RMSE. W and p: two-sided Wilcoxon signed-rank test "
            "(scipy.stats.wilcoxon); no p where n is too small for p < 0.05 to be reachable "
            "(the smallest two-sided p with n pairs is 2 / 2^n: n ≤ 5).",
            "",
            *markdown_table(headings, comparisons),
            "",
        ]
    best = _best_model(rows, models)
    if best is not None and cubic:
        model, tvs, means = best
        text.append(
            f"Lowest mean total RMSE: {model} at TVS {tvs}, {means['total']:.2f} = "
            f"{means['total'] / cubic['total']:.3f} × cubic B-spline's {cubic['total']:.2f}; "
            f"interior {means['interior']:.2f} = "
            f"{means['interior'] / cubic['interior']:.3f} × cubic's {cubic['interior']:.2f}."
        )
        text.append("")
    curves = convergence_table(records)
    if curves:
        text += ["## Validation RMSE by epoch", "", *curves, ""]
    if times:
        text += ["## Time", "", *time_table(times), ""]
    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    text.append(f"Training settings of every cell: {shown or 'the training config defaults'}.")
    return "\n".join(text) + "\n"


def convergence_table(records: Sequence[Mapping[str, Any]], columns: int = 6) -> list[str]:
    """Markdown lines: per cell (N, k), the validation RMSE after evenly spaced epochs, mean ±
    sd over seeds, and the epoch of the lowest one: still falling at the last epoch means the
    cells were compared at a training budget, not at convergence. Empty without curves."""
    curves: dict[tuple[str, int, int], list[list[float]]] = {}
    for record in records:
        curve = record.get("val_rmse_by_epoch") or []
        if curve:
            key = (record["model"], record["depth"], record["tvs"])
            curves.setdefault(key, []).append(curve)
    if not curves:
        return []
    shortest = min(len(c) for seeds in curves.values() for c in seeds)
    epochs = sorted({int(round(e)) for e in np.linspace(1, shortest, min(columns, shortest))})
    cells = []
    for (model, _, tvs), seeds in sorted(curves.items(), key=lambda item: (item[0][2], item[0][1])):
        shown = [
            mean_sd([c[e - 1] for c in seeds], bracketed=False, skip_missing=False, digits=3)
            for e in epochs
        ]
        best = ", ".join(str(int(np.argmin(c)) + 1) for c in seeds)
        cells.append([model, f"{tvs}", f"{len(seeds)}", *shown, best])
    intro = [
        "Validation RMSE (normalised units, on the validation patches) of each cell's exported "
        "run after the given epochs, mean ± sd over seeds, and per seed the epoch of its "
        "lowest value: a curve still falling at the last epoch was stopped by the epoch "
        "budget, not by convergence.",
        "",
    ]
    headings = ("Model", "Subjects (TVS)", "Seeds", *(f"epoch {e}" for e in epochs))
    return [*intro, *markdown_table((*headings, "best epoch per seed"), cells)]


def time_table(times: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: seconds per part per cell, and the total per part."""
    intro = [
        "Seconds per cell: training epochs split into drawing the patches (data loader), the "
        "training step, validation and the rest of the epoch; setup (start, reading subjects, "
        "statistics, caching patches, checkpoints, export) and evaluation on the test subjects "
        "(whole volumes).",
        "",
    ]
    cells = []
    sums = dict.fromkeys(TIME_PARTS, 0.0)
    for entry in times:
        values = [float(entry["seconds"][part]) for part in TIME_PARTS]
        for part, value in zip(TIME_PARTS, values, strict=True):
            sums[part] += value
        cells.append([f"{entry['cell']}", *(f"{v:.0f}" for v in values), f"{sum(values):.0f}"])
    total = sum(sums.values())
    shown = [f"{sums[p]:.0f} ({100 * sums[p] / total:.0f} %)" for p in TIME_PARTS]
    cells.append(["all", *shown, f"{total:.0f}"])
    return [*intro, *markdown_table(("Cell", *TIME_PARTS, "total"), cells)]


def _best_model(rows, models) -> tuple | None:
    """(model, tvs, region means over seeds) of the cell with the lowest mean total RMSE."""
    scored = []
    for model, depth, tvs in models:
        per_seed = seed_means(rows, model, depth, tvs).values()
        means = {region: float(np.mean([m[region] for m in per_seed])) for region in REGIONS}
        scored.append((means["total"], model, tvs, means))
    if not scored:
        return None
    _, model, tvs, means = min(scored, key=lambda s: s[0])
    return model, tvs, means


def write_tables(
    plan: StudyPlan,
    baseline_rows: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping],
    baseline_seconds: float = 0.0,
    memory_seconds: float | None = None,
) -> dict[str, Path]:
    """``metrics.csv`` and ``summary.md`` of the cells so far (rewritten after every cell)."""
    rows = metrics_rows(baseline_rows, records)
    times = [{"cell": r["cell"], "seconds": record_times(r)} for r in records]
    baselines = {**dict.fromkeys(TIME_PARTS, 0.0), "evaluation": baseline_seconds}
    times.append({"cell": "interpolation baselines", "seconds": baselines})
    if memory_seconds is not None:
        memory = {**dict.fromkeys(TIME_PARTS, 0.0), "other": memory_seconds}
        times.append({"cell": "Fig. 6 memory and step time (other)", "seconds": memory})
    summary = summary_markdown(rows, plan.splits, plan.settings, times, records)
    return {
        "metrics": write_metrics_csv(plan.out / "metrics.csv", rows),
        "summary": write_text(plan.out / "summary.md", summary),
    }
