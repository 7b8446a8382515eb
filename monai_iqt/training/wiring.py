"""Decisions the training configs delegate: the device, the subjects, and which handlers run.

``train.json`` and ``multi_gpu_train.json`` hold the wiring (which component gets which
reference); whatever depends on the run's circumstances (a GPU present, stderr a terminal, this
rank the one writing files, subjects given or not) is decided here, by one named call per
config entry, so the rule can be read, tested and changed in Python rather than inside a JSON
string. Each function returns exactly what the config's expression did before it moved here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine

from monai_iqt.inferers import default_device
from monai_iqt.training.handlers import every_n_iterations, on_terminal
from preprocessing.layout import check_subject_ids


def device_name() -> str:
    """The ``device`` setting's default: the inference's :func:`default_device`, as its name."""
    return default_device().type


def checked_subjects(subjects: Any) -> list[str] | None:
    """The ``subjects`` setting checked as subject ids (one sentence if bad); None: all."""
    return None if subjects is None else check_subject_ids(subjects)


def stats_iteration_log(log_interval: int) -> Callable[[Engine, int], bool] | bool:
    """``StatsHandler``'s ``iteration_log``: every ``log_interval`` iterations on a terminal,
    none in a log file (where the one line per epoch says enough)."""
    return every_n_iterations(log_interval) if on_terminal() else False


def trainer_handlers(
    sync_handlers: list[Any],
    handlers: list[Any],
    history: Any,
    writer_handlers: list[Any],
    terminal_handlers: list[Any],
    write_outputs: bool,
) -> list[Any]:
    """The trainer's handlers in the order they must run: the ranks' synchronisation, the
    learning-rate schedule and validation, the history (after validation), then, on the rank
    writing files only, the statistics and TensorBoard writers and, on a terminal only, the
    progress bar."""
    writing: list[Any] = []
    if write_outputs:
        writing = writer_handlers + (terminal_handlers if on_terminal() else [])
    return sync_handlers + handlers + [history] + writing


def evaluator_handlers(
    handlers: list[Any], writer_handlers: list[Any], write_outputs: bool
) -> list[Any]:
    """The evaluator's handlers: its own, then its writers on the rank writing files only."""
    return handlers + (writer_handlers if write_outputs else [])
