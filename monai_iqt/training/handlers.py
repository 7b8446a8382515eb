"""Ignite/MONAI pieces the training bundle wires together: metric input, the NaN guard, the
per-epoch history, random states and atomic fixed-name checkpoint files.

Checkpointing and early stopping are ignite's own ``Checkpoint`` and ``EarlyStopping`` (both
have public ``state_dict``/``load_state_dict``); this module only gives ``Checkpoint`` a save
handler that writes one fixed file name through the project's atomic writer.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler

from monai_iqt.losses import scored
from preprocessing.io import atomic_path

log = logging.getLogger(__name__)


def batch_loss(output: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Detached loss of a trainer iteration (``SupervisedTrainer`` output, decollate off)."""
    return output["loss"].detach()


def flat_pred_label(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator output as 1-D ``(pred, label)`` over the label's channels, so ignite's
    ``RootMeanSquaredError`` averages over every voxel and channel (it divides by the first
    dimension's length). A network predicting a variance returns the mean in its first channels
    and the log-variance after them: only the mean is scored. NaN labels (no target) are left
    out (:func:`monai_iqt.losses.scored`)."""
    label = output["label"]
    return scored(output["pred"][:, : label.shape[1]], label)


def negative_metric(name: str):
    """Score of an error metric for ignite's ``EarlyStopping``/``Checkpoint`` (higher = better)."""

    def score(engine: Engine) -> float:
        return -float(engine.state.metrics[name])

    return score


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of MONAI's engines: a loss or an RMSE improves when it goes down."""
    return current < best


def every_n_iterations(n: int):
    """Event filter for iteration-level logging every ``n`` iterations."""

    def event_filter(engine: Engine, event: int) -> bool:
        return event % max(int(n), 1) == 0

    return event_filter


class FixedNameSaver(BaseSaveHandler):
    """Save handler of ignite's ``Checkpoint`` writing always the same file, atomically.

    ``Checkpoint`` names files after the step or score and removes the previous one; here the
    new file replaces the old one in a single rename (``preprocessing.io.atomic_path``:
    temporary file, fsync, rename), so there is always one complete file and never none: a
    failed or killed save keeps the previous checkpoint. ``folder`` may change between runs.
    """

    def __init__(self, filename: str, folder: str | os.PathLike | None = None) -> None:
        self.filename = filename
        self.folder = None if folder is None else Path(folder)

    @property
    def path(self) -> Path:
        if self.folder is None:
            raise RuntimeError(f"no folder set for {self.filename}")
        return self.folder / self.filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "wb") as stream:
            torch.save(checkpoint, stream)

    def remove(self, filename: str) -> None:
        """Nothing to remove: the next save replaces the same file."""


class RunSummaryWriter:
    """A TensorBoard ``SummaryWriter`` that restarts reopen in their own run folder.

    MONAI's TensorBoard handlers keep the writer they were built with; this stand-in forwards
    to a ``SummaryWriter`` of the current run, created only when :meth:`open` is called (so
    building the bundle's components writes nothing).
    """

    def __init__(self) -> None:
        self._writer = None

    def open(self, log_dir: str | os.PathLike) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __getattr__(self, name: str) -> Any:
        writer = self.__dict__.get("_writer")
        if writer is None:
            raise RuntimeError(f"RunSummaryWriter.{name}: no run is open")
        return getattr(writer, name)


class RandomStates:
    """Python, NumPy and torch (CPU and CUDA) random generator states, saved in checkpoints.

    Stored as plain lists/tensors so ``torch.load(weights_only=True)`` reads them.
    """

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss:
    """Stop training with a clear sentence when the loss is NaN or infinite.

    Runs at every iteration; in distributed training the check is agreed across ranks (one
    scalar all-reduce), so every rank stops at the same iteration instead of hanging. The
    trainer is terminated (no exception inside the engine, so no handler logs a traceback) before
    the epoch completes, so nothing is saved: the last checkpoint on disk is the last good one.
    :attr:`error` holds the :class:`TrainingDiverged` to raise once the engine has stopped.
    """

    def __init__(self, checkpoint_name: str | None = None) -> None:
        self.checkpoint_name = checkpoint_name
        self.error: TrainingDiverged | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def reset(self, engine: Engine | None = None) -> None:
        self.error = None

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output["loss"] if isinstance(output, Mapping) else output[0]["loss"]
        finite = torch.isfinite(torch.as_tensor(loss).detach()).all().float().reshape(1)
        if dist.is_available() and dist.is_initialized():
            finite = finite.to(_collective_device())
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            iteration_in_epoch = (engine.state.iteration - 1) % engine.state.epoch_length + 1
            where = (
                f"the last good checkpoint {self.checkpoint_name} is kept"
                if self.checkpoint_name
                else "no checkpoint was written"
            )
            self.error = TrainingDiverged(
                f"training diverged: the loss became {float(torch.as_tensor(loss)):.4g} at epoch "
                f"{engine.state.epoch}, iteration {iteration_in_epoch} of "
                f"{engine.state.epoch_length} (global iteration {engine.state.iteration}); "
                f"{where}; lower learning_rate or check the data."
            )
            engine.terminate()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TrainingHistory:
    """Per-epoch record of learning rate, mean training loss and validation metric.

    Sets ``engine.state.learning_rate`` at every epoch start (for the TensorBoard and stats
    handlers) and appends ``{"epoch", "learning_rate", "train_loss", <metric>}`` after validation,
    so it must be attached after the ``ValidationHandler``. Saved in checkpoints, written to
    ``runs.json``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        evaluator: Engine,
        metric_name: str = "val_rmse",
        loss_name: str = "train_loss",
    ) -> None:
        self.optimizer = optimizer
        self.evaluator = evaluator
        self.metric_name = metric_name
        self.loss_name = loss_name
        self.epochs: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.record_learning_rate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record_epoch)

    def record_learning_rate(self, engine: Engine) -> None:
        engine.state.learning_rate = float(self.optimizer.param_groups[0]["lr"])

    def record_epoch(self, engine: Engine) -> None:
        # NaN for an epoch without validation (``val_interval`` > 1), not the last epoch's value
        validated = getattr(self.evaluator.state, "epoch", None) == engine.state.epoch
        metric = (
            self.evaluator.state.metrics.get(self.metric_name, math.nan) if validated else math.nan
        )
        self.epochs.append(
            {
                "epoch": int(engine.state.epoch),
                "learning_rate": float(engine.state.learning_rate),
                self.loss_name: float(engine.state.metrics.get(self.loss_name, math.nan)),
                self.metric_name: float(metric),
            }
        )

    def best(self) -> dict[str, float] | None:
        scored = [e for e in self.epochs if math.isfinite(e[self.metric_name])]
        return min(scored, key=lambda e: e[self.metric_name]) if scored else None

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.epochs = [dict(e) for e in state_dict["epochs"]]


def on_terminal() -> bool:
    """Whether stderr is a terminal: a progress bar there, one line per epoch in a log file."""
    return sys.stderr.isatty()


class EpochTimes:
    """Where each epoch's time goes, logged as one line per epoch with the epoch's figures.

    Parts: ``patches`` (the data loader: sampling, cropping, normalising and collating the
    training patches), ``step`` (moving the batch to the device, forward, loss, backward,
    optimiser: ignite's ITERATION_STARTED to MONAI's MODEL_COMPLETED), ``validation`` (the
    evaluator's whole run) and ``other`` (the rest of the epoch: iteration handlers, history,
    the best checkpoint). Kept in checkpoints so a resumed run reports every epoch.
    """

    PARTS = ("patches", "step", "validation", "other")

    def __init__(self, evaluator: Engine, history: TrainingHistory | None = None) -> None:
        self.evaluator = evaluator
        self.history = history
        self.epochs: list[dict[str, float]] = []
        self._current = dict.fromkeys(self.PARTS, 0.0)
        self._marks: dict[str, float] = {}

    def attach(self, trainer: Engine) -> None:
        from monai.engines.utils import IterationEvents

        trainer.add_event_handler(Events.EPOCH_STARTED, self._start_epoch)
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._mark, "patches")
        trainer.add_event_handler(Events.GET_BATCH_COMPLETED, self._add, "patches")
        trainer.add_event_handler(Events.ITERATION_STARTED, self._mark, "step")
        trainer.add_event_handler(IterationEvents.MODEL_COMPLETED, self._add, "step")
        self.evaluator.add_event_handler(Events.STARTED, self._mark, "validation")
        self.evaluator.add_event_handler(Events.COMPLETED, self._add, "validation")
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._end_epoch)

    def _start_epoch(self, engine: Engine) -> None:
        self._current = dict.fromkeys(self.PARTS, 0.0)
        self._marks = {"epoch": time.perf_counter()}

    def _mark(self, engine: Engine, part: str) -> None:
        self._marks[part] = time.perf_counter()

    def _add(self, engine: Engine, part: str) -> None:
        if part in self._marks:
            self._current[part] += time.perf_counter() - self._marks.pop(part)

    def _end_epoch(self, engine: Engine) -> None:
        total = time.perf_counter() - self._marks.get("epoch", time.perf_counter())
        times = dict(self._current)
        times["other"] = max(0.0, total - times["patches"] - times["step"] - times["validation"])
        self.epochs.append(
            {"epoch": int(engine.state.epoch), **{k: round(v, 3) for k, v in times.items()}}
        )
        figures = ""
        if self.history is not None and self.history.epochs:
            last = self.history.epochs[-1]
            figures = ", ".join(f"{key} {last[key]:.5g}" for key in last if key != "epoch") + "; "
        log.info(
            "epoch %d/%d: %s%.1f s = patches %.1f + step %.1f + validation %.1f + other %.1f",
            engine.state.epoch,
            engine.state.max_epochs,
            figures,
            total,
            times["patches"],
            times["step"],
            times["validation"],
            times["other"],
        )

    def totals(self) -> dict[str, float]:
        """Seconds per part over the recorded epochs."""
        return {part: round(sum(e[part] for e in self.epochs), 3) for part in self.PARTS}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(e) for e in self.epochs]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.epochs = [dict(e) for e in state_dict["epochs"]]
