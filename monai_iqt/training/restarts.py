"""Restarts runner of the training bundle: K runs with distinct seeds, resume, best model export.

The paper trains 4 models per setting and keeps the best on validation. Each run gets fresh
components built from the bundle config (network, optimizer, trainer, handlers, ...), with
``run_index`` set so that the run's seed is ``seed + run_index`` and its files go to
``runs/run_<index>/``; the patch data is read once and shared. After every run ``runs.json``
is rewritten; at the end the best run's ``model_best.pt`` becomes ``models/model.pt`` with
``models/normalisation.json`` beside it.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.handlers import CheckpointLoader
from monai.utils import set_determinism

from monai_iqt.data.patches import PatchData
from monai_iqt.training.distributed import is_writer, rank, state_digest, world_size
from monai_iqt.training.handlers import TrainingDiverged, TrainingHistory, as_bool
from preprocessing.io import InputError, atomic_path, write_json

log = logging.getLogger(__name__)

RUNS_FILE = "runs.json"
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "model_best.pt"
#: Exit code of the bundle command on bad input or divergence (as the project's other CLIs).
EXIT_BAD_INPUT = 2


@dataclass
class TrainingRun:
    """One run as wired by the bundle config's ``run`` component."""

    index: int
    seed: int
    run_dir: str
    trainer: Engine
    network: torch.nn.Module
    history: TrainingHistory
    early_stopping: Any
    checkpoint_objects: dict[str, Any]
    checkpoint_handlers: list[Any]
    summary_writer: Any = None

    def __post_init__(self) -> None:
        # Wired here, not in the config: the trainer references the evaluator, whose handlers
        # would otherwise reference the trainer back (a cycle the config parser cannot build).
        self.early_stopping.set_trainer(self.trainer)
        for handler in self.checkpoint_handlers:  # after the trainer's own handlers: saves last
            handler.attach(self.trainer)

    @property
    def last_checkpoint(self) -> Path:
        return Path(self.run_dir) / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.run_dir) / BEST_CHECKPOINT

    def execute(self, resume: bool) -> dict[str, Any]:
        """Train (resuming from the last checkpoint when asked and present); return the record."""
        resumed_from = None
        if resume and self.last_checkpoint.is_file():
            loader = CheckpointLoader(
                load_path=str(self.last_checkpoint),
                load_dict=self.checkpoint_objects,
                map_location="cpu",
            )
            loader.attach(self.trainer)
            resumed_from = str(self.last_checkpoint)
        start = time.perf_counter()
        try:
            self.trainer.run()
        finally:
            if self.summary_writer is not None:
                self.summary_writer.close()
        return self.record(
            status=None, seconds=time.perf_counter() - start, resumed_from=resumed_from
        )

    def record(self, status: str | None, seconds: float, resumed_from: str | None = None) -> dict:
        state = self.trainer.state
        best = self.history.best()
        if status is None:
            status = "finished" if state.epoch >= state.max_epochs else "stopped early"
        return {
            "index": self.index,
            "seed": self.seed,
            "status": status,
            "epochs_completed": len(self.history.epochs),
            "max_epochs": state.max_epochs,
            "best_epoch": None if best is None else best["epoch"],
            "best_val_rmse": None if best is None else best["val_rmse"],
            "history": self.history.epochs,
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(self.best_checkpoint),
            "last_checkpoint": str(self.last_checkpoint),
            "resumed_from": resumed_from,
            "seconds": round(seconds, 2),
            "weights_sha256": state_digest(self.network),
        }


def train_with_restarts(
    num_restarts: int,
    output_dir: str,
    resume: bool = False,
    model_extra: dict[str, Any] | None = None,
    data_id: str = "patch_data",
    run_id: str = "run",
    parser: ConfigParser | None = None,
) -> dict[str, Any]:
    """Run ``num_restarts`` trainings of the bundle's ``run`` component and export the best.

    Writes ``output_dir/runs/runs.json`` and ``output_dir/models/{model.pt,normalisation.json}``
    (rank 0 only). ``parser`` defaults to the ``monai.bundle`` parser evaluating this call.
    Raises ``InputError`` on bad data and ``TrainingDiverged`` on a NaN loss.
    """
    if int(num_restarts) < 1:
        raise InputError(f"num_restarts must be >= 1, got {num_restarts}.")
    resume = as_bool(resume)
    parser = parser if parser is not None else _running_parser()
    patch_data: PatchData = _resolve(parser, data_id)
    runs_dir = Path(output_dir) / "runs"
    summary = _load_summary(runs_dir) if resume else {"runs": []}
    writer = is_writer()
    for index in range(int(num_restarts)):
        done = _finished_record(summary, index)
        if done is not None:
            log.info("run %d already finished (runs.json), skipping it", index)
            continue
        run_parser = _run_parser(parser, index, data_id, patch_data)
        seed = int(run_parser.get_parsed_content("run_seed"))
        run_dir = Path(run_parser.get_parsed_content("run_dir"))
        resuming = resume and (run_dir / LAST_CHECKPOINT).is_file()
        if writer and not resuming:
            _clear_run_dir(run_dir)
        set_determinism(seed=seed)
        run: TrainingRun = _resolve(run_parser, run_id)
        log.info(
            "run %d of %d: seed %d, files in %s%s",
            index + 1,
            num_restarts,
            seed,
            run_dir,
            " (resuming)" if resuming else "",
        )
        start = time.perf_counter()
        try:
            record = run.execute(resume=resuming)
        except TrainingDiverged:
            _set_record(summary, run.record("diverged", time.perf_counter() - start))
            if writer:
                write_json(runs_dir / RUNS_FILE, summary)
            raise
        _set_record(summary, record)
        log.info(
            "rank %d/%d run %d: %s after %d epochs, best val_rmse %s at epoch %s, weights %s",
            rank(),
            world_size(),
            index,
            record["status"],
            record["epochs_completed"],
            record["best_val_rmse"],
            record["best_epoch"],
            record["weights_sha256"],
        )
        if writer:
            write_json(runs_dir / RUNS_FILE, summary)
    best = _best_record(summary)
    summary["best_run"] = best["index"]
    extra = {
        **patch_data.model_extra(),
        **(model_extra or {}),
        "seed": best["seed"],
        "best_val_rmse": best["best_val_rmse"],
        "best_epoch": best["best_epoch"],
    }
    if writer:
        models_dir = Path(output_dir) / "models"
        summary["model"] = str(export_model(best["best_checkpoint"], models_dir / "model.pt"))
        stats = copy.deepcopy(patch_data.stats)
        stats.extra = extra
        summary["normalisation"] = str(stats.save(models_dir / "normalisation.json"))
        write_json(runs_dir / RUNS_FILE, summary)
        log.info(
            "best run %d (val_rmse %.5g) exported to %s",
            best["index"],
            best["best_val_rmse"],
            summary["model"],
        )
    return summary


def run_restarts(**kwargs: Any) -> dict[str, Any] | None:
    """Bundle entry point: :func:`train_with_restarts`, turning bad input and divergence into
    one logged sentence and exit code 2 (as the project's other command-line tools do)."""
    try:
        return train_with_restarts(**kwargs)
    except (InputError, TrainingDiverged) as error:
        log.error("%s", error)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except RuntimeError as error:
        cause = _input_error_cause(error)
        if cause is None:
            raise
        log.error("%s", cause)
        raise SystemExit(EXIT_BAD_INPUT) from None


def export_model(best_checkpoint: str | os.PathLike, model_path: str | os.PathLike) -> Path:
    """Copy a run's best weights (a plain ESPCN_RN state dict) to ``model_path`` atomically."""
    state_dict = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
    if "network" in state_dict and isinstance(state_dict["network"], dict):
        state_dict = state_dict["network"]
    return save_atomically(state_dict, model_path)


def save_atomically(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the destination folder, then rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        torch.save(payload, stream)  # a stream, not a path: no random temporary name inside
    return Path(path)


def _running_parser() -> ConfigParser:
    """The ``ConfigParser`` evaluating the current bundle expression.

    A bundle config cannot reference its own parser, yet every restart needs fresh components
    built from exactly the config being run (files merged, command-line overrides applied), so
    the parser is taken from the call stack (``ConfigParser.get_parsed_content`` -> ``eval``).
    """
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigParser):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "train_with_restarts needs parser= when not called from a monai.bundle config"
    )


def _run_parser(parser: ConfigParser, index: int, data_id: str, patch_data: Any) -> ConfigParser:
    """A fresh parser of the same config with ``run_index`` set and the shared patch data."""
    config = copy.deepcopy({k: v for k, v in parser.get().items() if k != data_id})
    config["run_index"] = index
    config[data_id] = patch_data
    return ConfigParser(config=config, globals=dict(parser.globals))


def _resolve(parser: ConfigParser, config_id: str) -> Any:
    return parser.get_parsed_content(config_id)


def _input_error_cause(error: BaseException) -> InputError | None:
    while error is not None:
        if isinstance(error, InputError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _load_summary(runs_dir: Path) -> dict[str, Any]:
    path = runs_dir / RUNS_FILE
    if not path.is_file():
        return {"runs": []}
    with open(path) as stream:
        return json.load(stream)


def _finished_record(summary: dict[str, Any], index: int) -> dict[str, Any] | None:
    for record in summary["runs"]:
        if record["index"] == index and record["status"] in ("finished", "stopped early"):
            return record
    return None


def _set_record(summary: dict[str, Any], record: dict[str, Any]) -> None:
    summary["runs"] = [r for r in summary["runs"] if r["index"] != record["index"]] + [record]
    summary["runs"].sort(key=lambda r: r["index"])


def _best_record(summary: dict[str, Any]) -> dict[str, Any]:
    scored = [
        r
        for r in summary["runs"]
        if r["best_val_rmse"] is not None and math.isfinite(r["best_val_rmse"])
    ]
    if not scored:
        raise RuntimeError("no run produced a finite validation RMSE")
    return min(scored, key=lambda r: (r["best_val_rmse"], r["index"]))


def _clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's checkpoints and TensorBoard events before starting afresh."""
    if not run_dir.is_dir():
        return
    stale = [
        run_dir / LAST_CHECKPOINT,
        run_dir / BEST_CHECKPOINT,
        *run_dir.glob("events.out.tfevents.*"),
    ]
    for path in stale:
        if path.exists():
            path.unlink()
    for path in run_dir.glob("tmp*"):  # ignite's temporaries of a save that was killed
        if path.is_file():
            path.unlink()
