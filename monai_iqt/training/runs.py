"""Bookkeeping of the restarts: the run-summary file ``runs/runs.json`` and the run folders.

:mod:`monai_iqt.training.restarts` runs the trainings; this module holds what it records and
reads back between them: one record per run (status, history, checkpoints, weights digest), the
summary's finished runs (skipped on resume) and best run (exported), the last checkpoints a
resume continues from (read up front, so a corrupt one is one sentence before anything changes),
and the removal of earlier runs' files on ``--overwrite true`` or before a run starts afresh.
Kept apart so the loop reads as the order of events and the file formats live in one place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from monai_iqt.data.patches import PatchData
from monai_iqt.training.distributed import state_digest
from monai_iqt.training.settings import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RUNS_FILE,
    existing_runs,
)
from preprocessing.errors import InputError
from preprocessing.io import remove_stale_temporaries

if TYPE_CHECKING:  # restarts imports this module: the type only, not an import circle
    from monai_iqt.training.restarts import TrainingRun


def make_run_record(
    training_run: TrainingRun, status: str | None, seconds: float, resumed_from: str | None = None
) -> dict:
    """The ``runs.json`` record of the run ``training_run`` has just trained; ``status`` None:
    "finished" or "stopped early" from the trainer's epochs."""
    state = training_run.trainer.state
    best = training_run.history.best()
    if status is None:
        status = "finished" if state.epoch >= state.max_epochs else "stopped early"
    return {
        "index": training_run.index,
        "seed": training_run.seed,
        "status": status,
        "epochs_completed": len(training_run.history.epochs),
        "max_epochs": state.max_epochs,
        "best_epoch": None if best is None else best["epoch"],
        "best_val_rmse": None if best is None else best["val_rmse"],
        "history": training_run.history.epochs,
        "run_dir": str(training_run.run_dir),
        "best_checkpoint": str(training_run.best_checkpoint),
        "last_checkpoint": str(training_run.last_checkpoint),
        "resumed_from": resumed_from,
        "seconds": round(seconds, 2),
        "epoch_seconds": training_run.epoch_times.totals(),
        "weights_sha256": state_digest(training_run.network),
    }


def normalisation_record(patch_data: PatchData) -> dict[str, list[float]]:
    """The normalisation statistics as ``runs/settings.json`` records them (plain lists)."""
    stats = patch_data.stats
    return {
        "input_mean": list(stats.input_mean),
        "input_std": list(stats.input_std),
        "target_mean": list(stats.target_mean),
        "target_std": list(stats.target_std),
    }


def resumable_checkpoints(
    runs_dir: Path, num_restarts: int, summary: dict, resume: bool
) -> dict[int, dict]:
    """The last checkpoints a resume continues from, each read now (one sentence if corrupt)."""
    checkpoints = {}
    if not resume:
        return checkpoints
    for index in range(num_restarts):
        path = runs_dir / f"run_{index}" / LAST_CHECKPOINT
        if finished_record(summary, index) is not None or not path.is_file():
            continue
        try:
            checkpoints[index] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a truncated or foreign file
            raise InputError(
                f"{path} is not a readable checkpoint ({type(error).__name__}); delete it to "
                f"restart run {index} from its first epoch, or give --overwrite true instead of "
                "--resume true to start every run over."
            ) from None
    return checkpoints


def load_summary(runs_dir: Path) -> dict[str, Any]:
    """``runs_dir``'s ``runs.json`` (no runs if absent); one sentence if it is not a run record."""
    path = runs_dir / RUNS_FILE
    if not path.is_file():
        return {"runs": []}
    try:
        with open(path) as stream:
            summary = json.load(stream)
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable run record ({error}).") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("runs"), list):
        raise InputError(f"{path} is not a run record (no list of runs).")
    return summary


def finished_record(summary: dict[str, Any], index: int) -> dict[str, Any] | None:
    """Run ``index``'s record if it ran to the end (a resume skips it), else None."""
    for record in summary["runs"]:
        if record["index"] == index and record["status"] in ("finished", "stopped early"):
            return record
    return None


def set_record(summary: dict[str, Any], record: dict[str, Any]) -> None:
    """Put ``record`` in ``summary`` in place of its run's previous one, runs kept in order."""
    summary["runs"] = [r for r in summary["runs"] if r["index"] != record["index"]] + [record]
    summary["runs"].sort(key=lambda r: r["index"])


def best_record(summary: dict[str, Any]) -> dict[str, Any]:
    """The run with the lowest finite validation RMSE (the lower index on a tie): it is exported."""
    scored = [
        r
        for r in summary["runs"]
        if r["best_val_rmse"] is not None and math.isfinite(r["best_val_rmse"])
    ]
    if not scored:
        raise RuntimeError("no run produced a finite validation RMSE")
    return min(scored, key=lambda r: (r["best_val_rmse"], r["index"]))


def clear_runs(runs_dir: Path, num_restarts: int) -> None:
    """``--overwrite true``: remove what earlier trainings wrote in ``runs_dir`` (only that)."""
    for path in existing_runs(runs_dir):
        if path.parent == runs_dir:
            path.unlink()
    for run_dir in sorted(runs_dir.glob("run_*")):
        clear_run_dir(run_dir)


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's checkpoints and TensorBoard events before starting afresh."""
    if not run_dir.is_dir():
        return
    for path in (run_dir / LAST_CHECKPOINT, run_dir / BEST_CHECKPOINT):
        path.unlink(missing_ok=True)
    for path in run_dir.glob("events.out.tfevents.*"):
        path.unlink()
    remove_stale_temporaries(run_dir)
