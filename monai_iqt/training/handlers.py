"""Ignite/MONAI pieces the training bundle wires together: loss, metric input, and the handlers
that make a run resumable (atomic checkpoints, early-stopping and RNG state) and safe (NaN guard).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver, EarlyStopHandler

from preprocessing.io import InputError

log = logging.getLogger(__name__)


def as_bool(value: bool | str | int) -> bool:
    """A command-line flag as a bool: ``--memory_efficient false`` reaches the config as the
    string ``"false"`` (fire only converts Python literals such as ``False``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise InputError(f"expected true or false, got {value!r}.")


class RMSELoss(torch.nn.Module):
    """Root-mean-squared error over every element of the batch (the paper's training loss)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.nn.functional.mse_loss(prediction, target))


def batch_loss(output: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Detached loss of a trainer iteration (``SupervisedTrainer`` output, decollate off)."""
    return output["loss"].detach()


def flat_pred_label(output: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluator output as 1-D ``(pred, label)``, so ignite's ``RootMeanSquaredError`` averages
    over every voxel and channel (it divides by the first dimension's length)."""
    return output["pred"].reshape(-1), output["label"].reshape(-1)


def negative_metric(name: str):
    """Score for early stopping on an error metric (ignite keeps the highest score)."""

    def score(engine: Engine) -> float:
        return -float(engine.state.metrics[name])

    return score


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` of the evaluator: validation RMSE improves when it goes down."""
    return current < best


class _AtomicDiskSaver(DiskSaver):
    """Ignite's atomic ``DiskSaver`` (temporary file, then rename), optionally to a fixed name.

    A fixed-name file is replaced in place by the next save, so ``remove`` leaves it alone:
    deleting it first (what MONAI's fixed-name saver does) would leave no checkpoint at all if
    the process were killed between the delete and the write.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing atomically, with a fixed name for the "last" file.

    MONAI builds its ignite ``DiskSaver`` with ``atomic=False``, so a kill during ``torch.save``
    would leave a truncated file under the final name. ``last_filename`` names the interval
    checkpoint (e.g. ``checkpoint_last.pt``, replaced every ``save_interval`` epochs). The saver
    also exposes its key-metric tracker (``state_dict``), so the "last" checkpoint can record
    which score the "best" file holds and a resumed run keeps the true best.
    """

    def __init__(self, *args: Any, last_filename: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        fixed_names = (
            (self._final_checkpoint, self._final_filename),
            (self._key_metric_checkpoint, kwargs.get("key_metric_filename")),
            (self._interval_checkpoint, last_filename),
        )
        for checkpoint, filename in fixed_names:
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename)

    def state_dict(self) -> dict[str, Any]:
        if self._key_metric_checkpoint is None:
            return {"saved": []}
        return {"saved": [[float(p), str(f)] for p, f in self._key_metric_checkpoint._saved]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._key_metric_checkpoint is not None:
            self._key_metric_checkpoint.load_state_dict(
                {"_saved": [tuple(item) for item in state_dict.get("saved", [])]}
            )


def every_n_iterations(n: int):
    """Event filter for iteration-level logging every ``n`` iterations."""

    def event_filter(engine: Engine, event: int) -> bool:
        return event % max(int(n), 1) == 0

    return event_filter


class ResumableEarlyStopHandler(EarlyStopHandler):
    """MONAI's ``EarlyStopHandler`` with ``state_dict``/``load_state_dict`` (patience counter and
    best score), so resuming from a checkpoint continues the same early-stopping decision."""

    def state_dict(self) -> dict[str, Any]:
        if self._handler is None:
            return {"counter": 0, "best_score": None}
        return {"counter": self._handler.counter, "best_score": self._handler.best_score}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._handler is None:
            raise RuntimeError("set the trainer of the early-stopping handler before loading it")
        self._handler.counter = int(state_dict["counter"])
        best = state_dict["best_score"]
        self._handler.best_score = None if best is None else float(best)


class RandomStates:
    """Python, NumPy and torch (CPU and CUDA) random generator states, saved in checkpoints.

    Stored as plain lists/tensors so ``torch.load(weights_only=True)`` (MONAI's loader) reads them.
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
    scalar all-reduce), so every rank stops at the same iteration instead of hanging. Nothing is
    saved on the way out, so the last checkpoint on disk is the last good one.
    """

    def __init__(self, checkpoint_path: str | None = None) -> None:
        self.checkpoint_path = checkpoint_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

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
                f"the last good checkpoint {self.checkpoint_path} is kept"
                if self.checkpoint_path
                else "no checkpoint was written"
            )
            raise TrainingDiverged(
                f"training diverged: the loss became {float(torch.as_tensor(loss)):.4g} at epoch "
                f"{engine.state.epoch}, iteration {iteration_in_epoch} of "
                f"{engine.state.epoch_length} (global iteration {engine.state.iteration}); "
                f"{where}; lower learning_rate or check the data."
            )


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
        metric = self.evaluator.state.metrics.get(self.metric_name, math.nan)
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
