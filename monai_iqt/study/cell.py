"""One cell of the depth study: train it, evaluate it on the test subjects, record it.

How a cell is trained: ``python -m monai.bundle run --config_file <train_config>`` in a fresh
subprocess, with ``--output_dir <out>/cells/<model>_tvs<k>_seed<s> --num_revnet_blocks N
--subjects [...] --validation_subjects [...] --seed s`` and every entry of ``cell_overrides``
(which ``study.json`` fills by reference from the merged config, so a setting given on the
study's command line or in ``study_cpu.json`` reaches the cells). A subprocess per cell
isolates memory, dies with the study (``PR_SET_PDEATHSIG``), and uses the training's own
resume: a killed study rerun continues the unfinished cell from its last checkpoint and skips
the finished ones. A cell is finished when its record ``cell.json`` (written last, atomically)
exists and matches its ``models/model.pt``; the record keeps the cell's test rows and where
its time went (:data:`TIME_PARTS`).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monai_iqt import defaults, evaluation
from monai_iqt.metrics import REGIONS
from monai_iqt.study.plan import CELL_LOG, CELL_RECORD, Cell, StudyPlan
from monai_iqt.training.runs import best_record
from preprocessing.errors import InputError
from preprocessing.io import write_json

#: The study's one logger (its log lines keep the name they always had).
log = logging.getLogger("monai_iqt.study")

#: The parts of a cell's time, in the order the log and the summary give them.
TIME_PARTS = ("patches", "step", "validation", "other", "setup", "evaluation")


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child receives SIGKILL when the study process dies (Linux), so a
    killed study leaves no training behind that would race with its rerun."""

    def arm() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the study died before prctl took effect
            os._exit(1)

    return arm


def cell_command(
    train_config: str | os.PathLike,
    cell_dir: Path,
    dataset_dir: str | os.PathLike,
    cell: Cell,
    subjects: Sequence[str],
    settings: Mapping[str, Any],
    validation_subjects: Sequence[str] | None = None,
) -> list[str]:
    """The training bundle command of one cell; values as Python literals (fire parses them).

    ``resume`` is always true: a cell an interrupted study left continues from its last
    checkpoint, and a new cell starts afresh.
    """
    flags = {
        **settings,
        "dataset_dir": str(Path(dataset_dir).resolve()),
        "output_dir": str(cell_dir.resolve()),
        "num_revnet_blocks": cell.depth,
        "subjects": list(subjects),
        "validation_subjects": None if validation_subjects is None else list(validation_subjects),
        "seed": cell.seed,
        "resume": True,
    }
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    command.append(str(Path(train_config).resolve()))
    for key, value in flags.items():
        command += [f"--{key}", repr(value)]
    return command


def train_cell(command: list[str], cell: Cell, cell_dir: Path) -> float:
    """Run one cell's training subprocess, its output appended to ``training.log``; seconds."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    log_path = cell_dir / CELL_LOG
    start = time.perf_counter()
    with open(log_path, "a") as stream:
        stream.write(f"$ {' '.join(command)}\n")
        stream.flush()
        preexec = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
        returncode = subprocess.call(
            command, stdout=stream, stderr=subprocess.STDOUT, preexec_fn=preexec
        )
    if returncode == 2:
        raise InputError(f"cell {cell.name}: {_error_sentence(log_path)} (log: {log_path})")
    if returncode != 0:
        raise RuntimeError(
            f"training of cell {cell.name} failed with exit code {returncode}; see {log_path}"
        )
    if not (cell_dir / "models" / "model.pt").is_file():
        raise RuntimeError(
            f"training of cell {cell.name} exported no models/model.pt: is the training config's "
            f"entry id `run`? (see {log_path})"
        )
    return time.perf_counter() - start


def _error_sentence(log_path: Path) -> str:
    """The training's one-sentence error: its last ``error:`` or ERROR log line."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: ") :]
        if " - ERROR - " in line:
            return line.split(" - ERROR - ", 1)[1]
    return "training stopped on bad input"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_cell_record(cell_dir: Path) -> dict[str, Any] | None:
    """The finished cell's record, or None when the cell is unfinished (or its model changed)."""
    path = cell_dir / CELL_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"{path} is not a readable cell record ({error}).") from error
    model = cell_dir / "models" / "model.pt"
    if not model.is_file() or sha256_of(model) != record.get("model_sha256"):
        log.warning("%s does not match %s: the cell is trained again", path, model)
        return None
    return record


def evaluate_models(
    dataset_dir: str | os.PathLike,
    subjects: Sequence[str],
    inferers: Mapping[str, Any],
    methods: Sequence[str] = (),
    interior_radius: int = defaults.INTERIOR_RADIUS,
) -> list[dict[str, Any]]:
    """RMSE rows ``{subject, model, interior, exterior, total}`` (1e-5 mm^2/s) of the models
    and interpolation baselines on the test subjects (the evaluation library, nothing written)."""
    result = evaluation.evaluate(
        dataset_dir,
        None,
        inferers,
        subjects=list(subjects),
        methods=list(methods),
        interior_radius=int(interior_radius),
    )
    return [{key: row[key] for key in ("subject", "model", *REGIONS)} for row in result.rows]


def evaluate_cell(
    cell_dir: Path,
    dataset_dir: str | os.PathLike,
    test: Sequence[str],
    device: Any,
    radius: int,
    inferer_options: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Test rows of a cell's exported model (``models/model.pt`` with its statistics)."""
    from monai_iqt.inferers import make_inferer

    models = cell_dir / "models"
    inferer = make_inferer(
        models / "model.pt", models / "normalisation.json", device=device, **inferer_options
    )
    return evaluate_models(dataset_dir, test, {"model": inferer}, (), radius)


def _best_val_rmse(cell_dir: Path) -> float | None:
    try:
        extra = json.loads((cell_dir / "models" / "normalisation.json").read_text())["extra"]
        return extra.get("best_val_rmse")
    except (OSError, ValueError, KeyError):
        return None


def _runs(cell_dir: Path) -> list[dict[str, Any]]:
    """The cell's training runs as ``runs/runs.json`` records them (none if unreadable)."""
    try:
        return json.loads((cell_dir / "runs" / "runs.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []


def validation_curve(cell_dir: Path) -> list[float]:
    """Validation RMSE after each epoch of the cell's exported run (the best of its restarts,
    ``runs/runs.json``); empty where the runs record none. It shows whether a cell's training
    had converged or was still improving when its epochs ran out."""
    try:
        history = best_record({"runs": _runs(cell_dir)}).get("history") or []
    except (KeyError, RuntimeError):
        return []
    return [float(entry["val_rmse"]) for entry in history if entry.get("val_rmse") is not None]


def _training_times(cell_dir: Path, training_seconds: float) -> dict[str, float]:
    """A cell's training time split as its runs recorded it (``runs.json``: patches, step,
    validation, other, per epoch), ``setup`` being the rest of the subprocess's wall time
    (start, reading the subjects, statistics, checkpoints, export)."""
    times = dict.fromkeys(TIME_PARTS[:4], 0.0)
    for run in _runs(cell_dir):
        for part, seconds in (run.get("epoch_seconds") or {}).items():
            if part in times:
                times[part] += float(seconds)
    times["setup"] = max(0.0, training_seconds - sum(times.values()))
    return {part: round(value, 3) for part, value in times.items()}


def cell_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {region: float(np.mean([r[region] for r in rows])) for region in REGIONS}


def record_times(record: Mapping[str, Any]) -> dict[str, float]:
    """A cell record's seconds per part (:data:`TIME_PARTS`); zeros where not recorded."""
    times = dict.fromkeys(TIME_PARTS, 0.0)
    times.update(record.get("seconds") or {})
    times["evaluation"] = float(record["evaluation"].get("seconds", 0.0))
    return times


def run_cell(plan: StudyPlan, cell: Cell, record: dict[str, Any] | None) -> dict[str, Any]:
    """Train (or resume, or skip) one cell, evaluate it and write its record last."""
    cell_dir = plan.cell_dir(cell)
    if record is not None:
        record["skipped"] = True
        record["val_rmse_by_epoch"] = validation_curve(cell_dir)
        if record["evaluation"]["settings"] == plan.evaluation:
            return record
    else:
        training = plan.training(cell)
        command = cell_command(
            plan.train_config,
            cell_dir,
            plan.dataset_dir,
            cell,
            training["subjects"],
            plan.settings,
            plan.splits.validation,
        )
        log.info("cell %s: training (log: %s)", cell.name, cell_dir / CELL_LOG)
        seconds = train_cell(command, cell, cell_dir)
        record = {
            "cell": cell.name,
            "model": cell.model,
            "depth": cell.depth,
            "tvs": cell.tvs,
            "seed": cell.seed,
            "training": training,
            "model_sha256": sha256_of(cell_dir / "models" / "model.pt"),
            "best_val_rmse": _best_val_rmse(cell_dir),
            "val_rmse_by_epoch": validation_curve(cell_dir),
            "training_seconds": round(seconds, 1),
            "seconds": _training_times(cell_dir, seconds),
        }
    start = time.perf_counter()
    rows = evaluate_cell(
        cell_dir,
        plan.dataset_dir,
        plan.test,
        plan.device,
        plan.evaluation["interior_radius"],
        plan.evaluation["inferer_options"],
    )
    for row in rows:
        row["model"] = cell.model
    record["evaluation"] = {
        "settings": plan.evaluation,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json(cell_dir / CELL_RECORD, {k: v for k, v in record.items() if k != "skipped"})
    return record


def log_cell(number: int, total: int, cell: Cell, record: Mapping[str, Any]) -> None:
    """The one log line of a finished (or skipped) cell, with its figures and time breakdown."""
    rows = record["evaluation"]["rows"]
    means = cell_means(rows)
    times = record_times(record)
    log.info(
        "cell %d/%d %s (N=%d, %d training subjects, seed %d) %s: test RMSE interior %.3f, "
        "exterior %.3f, total %.3f (1e-5 mm^2/s, %d subjects), best val RMSE %s; time %.0f s = "
        "%s",
        number,
        total,
        cell.name,
        cell.depth,
        cell.tvs,
        cell.seed,
        "skipped (finished before)" if record.get("skipped") else "finished",
        means["interior"],
        means["exterior"],
        means["total"],
        len(rows),
        _format_float(record.get("best_val_rmse")),
        sum(times.values()),
        " + ".join(f"{part} {times[part]:.0f}" for part in TIME_PARTS),
    )


def _format_float(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"
