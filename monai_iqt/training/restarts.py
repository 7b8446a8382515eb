"""Restarts runner of the training bundle: K runs with distinct seeds, resume, best model export.

The paper trains 4 models per setting and keeps the best on validation. The bundle config builds
one set of components (network, optimizer, trainer, evaluator, ...) and :class:`TrainingRun`
returns them to their initial state before each run: the network's weights are those of a new
network built by the config's ``network_factory`` under the run's seed (``seed + index``), so
they are exactly what the network's own initialisation draws; every other component gets back
the state it had before any training (the same ``state_dict`` mechanism that resumes from a
checkpoint), and checkpoints and TensorBoard events go to ``runs/run_<index>/``.

Why reuse rather than rebuild: a bundle expression has no public handle on the ``ConfigParser``
evaluating it (references resolve to instantiated objects, and a ``%`` macro's copy of the config
is parsed and instantiated like the rest), so rebuilding per run would need the parser found by
other means. Resetting the components through their public ``state_dict``/``load_state_dict``
needs none, and the config stays the one place where the training is wired.

After every run ``runs/runs.json`` is rewritten; at the end the best run's ``model_best.pt``
becomes ``models/model.pt`` and ``models/normalisation.json`` (with the sha256 of model.pt). What
the records hold and how run folders are read back or cleared is :mod:`monai_iqt.training.runs`;
this module is the loop, the per-run reset and Ctrl-C.
"""

from __future__ import annotations

import copy
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EarlyStopping
from monai.utils import set_determinism
from tqdm import tqdm

from monai_iqt.data.patches import PatchData, build_patch_data
from monai_iqt.training.distributed import (
    is_writer,
    rank,
    synchronise,
    unwrap,
    world_size,
)
from monai_iqt.training.export import export_models
from monai_iqt.training.handlers import (
    EpochTimes,
    FixedNameSaver,
    RandomStates,
    RunSummaryWriter,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    TrainingHistory,
    negative_metric,
    on_terminal,
)
from monai_iqt.training.runs import (
    best_record,
    clear_run_dir,
    clear_runs,
    finished_record,
    load_summary,
    make_run_record,
    normalisation_record,
    resumable_checkpoints,
    set_record,
)
from monai_iqt.training.settings import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    RUNS_FILE,
    SETTINGS_FILE,
    check_settings,
    compare_settings,
    load_settings,
    trained_on,
)
from preprocessing.errors import exit_on_bad_input
from preprocessing.io import write_json

log = logging.getLogger(__name__)

#: Exit code after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130


class TrainingRun:
    """The components every run trains with, and what a run adds to them: early stopping, the
    best and last checkpoints, the NaN guard and the run's folder.

    ``checkpoint_objects`` is everything a run's state consists of; ``checkpoint_last.pt``
    holds it after every epoch, so a resumed run continues exactly where it stopped.
    """

    def __init__(
        self,
        trainer: Engine,
        evaluator: Engine,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        history: TrainingHistory,
        network_factory: Callable[[], torch.nn.Module],
        early_stopping_patience: int,
        train_sampler: Any = None,
        summary_writer: RunSummaryWriter | None = None,
        metric_name: str = "val_rmse",
        write_outputs: bool = True,
    ) -> None:
        self.trainer = trainer
        self.evaluator = evaluator
        self.network = network
        self.network_factory = network_factory
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.history = history
        self.train_sampler = train_sampler
        self.summary_writer = summary_writer
        self.write_outputs = write_outputs
        self.run_dir: Path | None = None
        score = negative_metric(metric_name)
        # Built here, not in the config: the trainer references the evaluator (validation),
        # whose handlers would reference the trainer back, a cycle the config cannot build.
        self.early_stopping = EarlyStopping(int(early_stopping_patience), score, trainer)
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.early_stopping)
        self.nan_guard = StopOnNonFiniteLoss()
        self.nan_guard.attach(trainer)
        self.epoch_times = EpochTimes(evaluator, history)
        self.epoch_times.attach(trainer)
        if not on_terminal():  # a log file: the epoch line above, not the engines' chatter
            for engine in (trainer, evaluator):
                engine.logger.setLevel(max(engine.logger.getEffectiveLevel(), logging.WARNING))
        self.best_saver = Checkpoint(
            {"network": network},
            FixedNameSaver(BEST_CHECKPOINT),
            n_saved=1,
            score_function=score,
            score_name=metric_name,
        )
        self.checkpoint_objects = {
            "network": network,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "trainer": trainer,
            "early_stopping": self.early_stopping,
            "best_model_tracker": self.best_saver,
            "history": history,
            "random_states": RandomStates(),
            "epoch_times": self.epoch_times,
        }
        self.last_saver = Checkpoint(
            self.checkpoint_objects, FixedNameSaver(LAST_CHECKPOINT), n_saved=1
        )
        if write_outputs:
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.best_saver)
            # After the trainer's own handlers (validation, history): saves the whole epoch.
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self.last_saver)
        self._initial = {
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "lr_scheduler": copy.deepcopy(lr_scheduler.state_dict()),
            "early_stopping": copy.deepcopy(self.early_stopping.state_dict()),
        }

    @property
    def last_checkpoint(self) -> Path:
        return self.run_dir / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST_CHECKPOINT

    def start(self, index: int, seed: int, run_dir: Path, checkpoint: dict | None = None) -> None:
        """Return every component to its state before training, with the network initialised
        from ``seed``; then load ``checkpoint`` (a run's ``checkpoint_last.pt``) if given."""
        self.index, self.seed, self.run_dir = index, seed, Path(run_dir)
        set_determinism(seed=seed)
        fresh = self.network_factory()
        unwrap(self.network).load_state_dict(fresh.state_dict())
        self.optimizer.load_state_dict(copy.deepcopy(self._initial["optimizer"]))
        self.lr_scheduler.load_state_dict(copy.deepcopy(self._initial["lr_scheduler"]))
        self.early_stopping.load_state_dict(copy.deepcopy(self._initial["early_stopping"]))
        self.history.load_state_dict({"epochs": []})
        self.epoch_times.load_state_dict({"epochs": []})
        self.best_saver.reset()
        self.last_saver.reset()
        for engine in (self.trainer, self.evaluator):
            _reset_engine(engine)
        if hasattr(self.train_sampler, "seed"):
            self.train_sampler.seed = seed  # torch's DistributedSampler shuffles with seed+epoch
        self.best_saver.save_handler.folder = self.run_dir
        self.last_saver.save_handler.folder = self.run_dir
        self.nan_guard.checkpoint_name = str(self.last_checkpoint) if self.write_outputs else None
        if checkpoint is not None:  # checkpoints written before epoch_times existed lack it
            objects = {
                key: value
                for key, value in self.checkpoint_objects.items()
                if key in checkpoint or key != "epoch_times"
            }
            Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)

    def execute(self) -> None:
        """Train (from the state :meth:`start` set). Ctrl-C asks the trainer to stop after the
        current iteration (ignite's ``terminate``: the epoch's checkpoint is not written half
        done) and raises ``KeyboardInterrupt`` once it has; a second Ctrl-C stops at once."""
        stop = _StopRequest(self.trainer)
        previous = _set_sigint(stop)
        if self.write_outputs and self.summary_writer is not None:
            self.summary_writer.open(self.run_dir)
        try:
            self.trainer.run()
        finally:
            _set_sigint(previous)
            if self.summary_writer is not None:
                self.summary_writer.close()
        if stop.requested:
            raise KeyboardInterrupt
        if self.nan_guard.error is not None:
            raise self.nan_guard.error


def _set_sigint(handler: Any) -> Any:
    """Install a SIGINT handler (only the main thread may); returns the previous one."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, handler)


class _StopRequest:
    """SIGINT handler during training: the first asks the trainer to stop, a second interrupts."""

    def __init__(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.default_int_handler(signum, frame)
        self.requested = True
        self.trainer.terminate()


def _reset_engine(engine: Engine) -> None:
    engine.state.iteration = 0
    engine.state.epoch = 0
    engine.state.metrics = {}
    if hasattr(engine.state, "best_metric"):  # MONAI's workflows track their key metric
        engine.state.best_metric = -1
        engine.state.best_metric_epoch = -1


#: ``build_patch_data`` whose bad input (a missing subject, a truncated volume, ...) is one
#: sentence and exit 2 even when the bundle's parser builds it.
load_patch_data = exit_on_bad_input(build_patch_data)


@exit_on_bad_input
def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """First step of the bundle's ``run`` entry: :func:`check_settings` before anything is built.

    Also makes Ctrl-C outside a training epoch (loading the data, between runs, exporting) one
    line and exit 130; during an epoch :meth:`TrainingRun.execute` handles it.
    """
    _set_sigint(_interrupted_outside_training)
    return check_settings(settings)


def _interrupted_outside_training(signum: int, frame: Any) -> None:
    print(
        "training interrupted outside a training epoch: run the same command with --resume true "
        "to continue.",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(EXIT_INTERRUPTED)


@exit_on_bad_input
def train_with_restarts(
    training_run: TrainingRun, patch_data: PatchData, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Run ``num_restarts`` trainings and export the best (the bundle's ``run`` entry).

    Writes ``runs/settings.json``, ``runs/runs.json``, ``runs/run_<k>/`` and
    ``models/{model.pt,normalisation.json}`` in ``output_dir`` (rank 0 only). Bad input, a
    corrupt checkpoint or divergence: one sentence, exit 2; Ctrl-C: one line, exit 130.
    """
    checked = check_settings(settings)
    output_dir = Path(str(checked["output_dir"]))
    runs_dir = output_dir / "runs"
    record = {**checked["record"], "normalisation": normalisation_record(patch_data)}
    if checked["resume"]:
        recorded = load_settings(runs_dir)
        if recorded is not None:
            compare_settings(recorded, {"normalisation": record["normalisation"]}, runs_dir)
    num_restarts = checked["num_restarts"]
    summary = load_summary(runs_dir) if checked["resume"] else {"runs": []}
    checkpoints = resumable_checkpoints(runs_dir, num_restarts, summary, checked["resume"])
    writer = is_writer()
    synchronise()  # every rank has checked the output folder before rank 0 changes it
    # Everything is checked: from here on the output folder changes.
    if writer:
        if checked["overwrite"]:
            clear_runs(runs_dir, num_restarts)
        write_json(runs_dir / SETTINGS_FILE, record)
    for index in range(num_restarts):
        if finished_record(summary, index) is not None:
            log.info("run %d already finished (%s), skipping it", index, RUNS_FILE)
            continue
        seed = checked["seed"] + index
        run_dir = runs_dir / f"run_{index}"
        checkpoint = checkpoints.get(index)
        if writer and checkpoint is None:
            clear_run_dir(run_dir)
        training_run.start(index, seed, run_dir, checkpoint)
        log.info(
            "run %d of %d: seed %d, files in %s%s",
            index + 1,
            num_restarts,
            seed,
            run_dir,
            " (resuming)" if checkpoint is not None else "",
        )
        start = time.perf_counter()
        try:
            training_run.execute()
        except TrainingDiverged as error:
            seconds = time.perf_counter() - start
            set_record(summary, make_run_record(training_run, "diverged", seconds))
            if writer:
                write_json(runs_dir / RUNS_FILE, summary)
            _say(f"error: {error}")
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            _report_interrupt(training_run, num_restarts)
        resumed_from = str(training_run.last_checkpoint) if checkpoint is not None else None
        run_record = make_run_record(training_run, None, time.perf_counter() - start, resumed_from)
        set_record(summary, run_record)
        log.info(
            "rank %d/%d run %d: %s after %d epochs, best val_rmse %s at epoch %s, weights %s",
            rank(),
            world_size(),
            index,
            run_record["status"],
            run_record["epochs_completed"],
            run_record["best_val_rmse"],
            run_record["best_epoch"],
            run_record["weights_sha256"],
        )
        if writer:
            write_json(runs_dir / RUNS_FILE, summary)
    best = best_record(summary)
    summary["best_run"] = best["index"]
    if writer:
        extra = {
            **patch_data.model_extra(),
            "num_blocks": checked["num_revnet_blocks"],
            "memory_efficient": checked["memory_efficient"],
            "patches_per_subject": checked["patches_per_subject"],
            "batch_size": checked["batch_size"],
            "learning_rate": checked["learning_rate"],
            "loss": record["loss"],
            "predict_variance": record["predict_variance"],
            "dropout_rate": record["dropout_rate"],
            "trained_on": trained_on(checked["subject_folders"]),
            "settings": checked["record"],
            "seed": best["seed"],
            "best_val_rmse": best["best_val_rmse"],
            "best_epoch": best["best_epoch"],
        }
        model, stats = export_models(
            best["best_checkpoint"], patch_data.stats, extra, output_dir / "models"
        )
        summary["model"], summary["normalisation"] = str(model), str(stats)
        write_json(runs_dir / RUNS_FILE, summary)
        log.info(
            "best run %d (val_rmse %.5g) exported to %s",
            best["index"],
            best["best_val_rmse"],
            model,
        )
    return summary


def _report_interrupt(training_run: TrainingRun, num_restarts: int) -> None:
    last = training_run.last_checkpoint
    try:
        trainer = torch.load(last, map_location="cpu", weights_only=True)["trainer"]
        saved = f"{last} holds epoch {trainer['iteration'] // trainer['epoch_length']}"
    except Exception:  # not written yet (or unreadable): say so rather than guess
        saved = f"no complete epoch of this run was saved ({last})"
    _say(
        f"training interrupted in run {training_run.index} of {num_restarts} at epoch "
        f"{training_run.trainer.state.epoch}; {saved}: run the same command with --resume true "
        "to continue."
    )
    raise SystemExit(EXIT_INTERRUPTED)


def _say(line: str) -> None:
    """One line on stderr, on a line of its own even when a progress bar was drawing there."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()
