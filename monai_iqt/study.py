"""The paper's depth study (Fig. 4 and Fig. 6) in one bundle command.

Subjects are split three ways: ``train_subjects`` (a cell of training-set size k trains on the
first k), ``validation_subjects`` (early stopping, restart selection and every choice of a
setting; none given: each training subject's ``validation_fraction`` of patches, the training
bundle's fallback) and ``test_subjects`` (reported, never used for a choice); overlapping lists
are refused. For every (depth N, training-set size k) cell and every entry of ``seeds`` the
bundle's own training runs (``num_restarts`` restarts with seeds s .. s + K - 1, the best on
validation kept) and the exported model is evaluated on the test subjects with the project's
metrics. The study writes ``metrics.csv`` (one row per test subject, model and seed,
interpolation baselines included), ``summary.md`` (the Fig. 4 table as mean ± sd over seeds of
the test-subject mean, the paired comparison of each depth against the ESPCN of the same
training-set size over (subject, seed) pairs, :mod:`monai_iqt.paired`, and where the time
went), ``rmse_vs_depth.png`` and ``memory_time_vs_depth.png`` (Fig. 6: autograd's saved bytes
and step time against N in both execution modes, measured in the same run).

How a cell is trained: ``python -m monai.bundle run --config_file <train_config>`` in a fresh
subprocess, with ``--output_dir <out>/cells/<model>_tvs<k>_seed<s> --num_revnet_blocks N
--subjects [...] --validation_subjects [...] --seed s`` and every entry of ``cell_overrides``
(which ``study.json`` fills by reference from the merged config, so a setting given on the
study's command line or in ``study_cpu.json`` reaches the cells). A subprocess per cell
isolates memory, dies with the study (``PR_SET_PDEATHSIG``), and uses the training's own
resume: a killed study rerun continues the unfinished cell from its last checkpoint and skips
the finished ones. A cell is finished when its record ``cell.json`` (written last, atomically)
exists and matches its ``models/model.pt``; a record made with other settings or subjects is
refused in one sentence rather than mixed into the table, and so is a study recorded before
seeds existed (its cells are named without a seed)."""

from __future__ import annotations

import csv
import ctypes
import hashlib
import io
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_iqt import evaluation
from monai_iqt.bundle import exit_on_bad_input
from monai_iqt.inference_plan import check_inference_settings
from monai_iqt.inferers import DEFAULT_ROI_SIZE
from monai_iqt.metrics import REGIONS
from monai_iqt.paired import PairedComparison, paired_comparison
from monai_iqt.training.settings import RECORDED_SINCE, check_values
from preprocessing import layout
from preprocessing.io import InputError, atomic_path, write_json, write_text

log = logging.getLogger(__name__)

CELLS_DIR = "cells"
CELL_RECORD = "cell.json"
CELL_LOG = "training.log"
STUDY_RECORD = "study.json"
METRICS_COLUMNS = ("subject", "model", "depth", "tvs", "seed", "interior", "exterior", "total")
BASELINES = ("nearest", "trilinear", "cubic")
CUBIC = evaluation.BASELINE_NAMES["cubic"]
#: Settings the study decides for every cell itself; ``cell_overrides`` may not set them.
#: (``resume`` is always true, so an interrupted cell continues; ``overwrite`` stays false.)
PER_CELL_SETTINGS = (
    "output_dir",
    "dataset_dir",
    "subjects",
    "validation_subjects",
    "seed",
    "num_revnet_blocks",
    "resume",
    "overwrite",
)
#: Training settings that do not change what a cell learns; a rerun may change them.
NOT_COMPARED = ("bundle_root", "device", "num_workers", "log_interval", "cache_patches")
MB = 1e6


@dataclass(frozen=True)
class Cell:
    """One (depth, training-set size) cell of the study grid, trained with one seed."""

    depth: int
    tvs: int
    seed: int = 0

    @property
    def model(self) -> str:
        return evaluation.model_label(self.depth)

    @property
    def name(self) -> str:
        return f"{self.model}_tvs{self.tvs}_seed{self.seed}"


# --------------------------------------------------------------------------- settings


def _int_list(value: Any, name: str) -> list[int]:
    """A list of whole numbers from the command line (one number is a list of one)."""
    if isinstance(value, int | str) and not isinstance(value, bool):
        value = [value]
    try:
        numbers = [int(v) for v in value]
        exact = all(not isinstance(v, bool) and float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise InputError(f"{name} must be a list of whole numbers, got {value!r}.")
    if not numbers:
        raise InputError(f'{name} is empty: give at least one value, e.g. --{name} "[0, 2]".')
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicates:
        raise InputError(f"{name} lists {duplicates[0]} more than once.")
    return numbers


@dataclass(frozen=True)
class Splits:
    """The study's subjects: train (a cell of size k uses the first k), validation (early
    stopping, restart selection, every choice of a setting; none: each training subject's
    ``validation_fraction`` of patches) and test (reported only)."""

    train: list[str]
    validation: list[str] | None
    test: list[str]


def check_splits(
    dataset_dir: str | os.PathLike,
    train_subjects: Any,
    validation_subjects: Any,
    test_subjects: Any,
) -> Splits:
    """The three subject lists, disjoint; ``train_subjects`` None means every preprocessed
    subject of ``dataset_dir`` that is neither a validation nor a test subject."""
    if test_subjects is None:
        raise InputError("test_subjects is not set: name the held-out test subjects.")
    test = layout.check_subject_ids(test_subjects)
    if not test:
        raise InputError("test_subjects is empty: name the held-out test subjects.")
    validation = None
    if validation_subjects is not None:
        validation = layout.check_subject_ids(validation_subjects) or None
    held_out = [*(validation or []), *test]
    if train_subjects is None:
        available = [f.name for f in layout.find_subjects(dataset_dir)]
        train = [s for s in available if s not in held_out]
    else:
        train = layout.check_subject_ids(train_subjects)
    roles = (("training", train), ("validation", validation or []), ("test", test))
    for number, (first, first_subjects) in enumerate(roles):
        for second, second_subjects in roles[number + 1 :]:
            overlap = [s for s in first_subjects if s in second_subjects]
            if overlap:
                raise InputError(
                    f"subject {overlap[0]} is both a {first} and a {second} subject: the "
                    "train, validation and test subjects must be disjoint."
                )
    return Splits(train, validation, test)


def check_seeds(seeds: Any, num_restarts: Any) -> list[int]:
    """The seeds, each >= 0 and at least ``num_restarts`` apart: a cell trained with seed s runs
    its restarts with seeds s .. s + num_restarts - 1, which another seed must not reuse."""
    seeds = _int_list(seeds, "seeds")
    negative = [s for s in seeds if s < 0]
    if negative:
        raise InputError(f"seeds must be >= 0, got {negative[0]}.")
    restarts = int(num_restarts) if isinstance(num_restarts, int) else 1
    ordered = sorted(seeds)
    for low, high in zip(ordered, ordered[1:], strict=False):
        if high - low < restarts:
            raise InputError(
                f"seeds {low} and {high} are closer than num_restarts {restarts}: seed {low}'s "
                f"restarts would reuse seed {high}; space the seeds at least {restarts} apart."
            )
    return seeds


def check_settings(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    train_subjects: Any,
    test_subjects: Any,
    depths: Any,
    tvs_sizes: Any,
    cell_overrides: Mapping[str, Any],
    validation_subjects: Any = None,
    seeds: Any = (0,),
    default_restarts: Any = 1,
) -> tuple[Splits, list[int], list[int], list[int]]:
    """Validate the study before anything is written; one sentence (InputError) per problem.

    ``default_restarts``: the training config's ``num_restarts``, for when ``cell_overrides``
    does not set it. Returns (subject splits, depths, training-set sizes, seeds).
    """
    depths = _int_list(depths, "depths")
    negative = [d for d in depths if d < 0]
    if negative:
        raise InputError(f"depths must be >= 0 reversible blocks per stack, got {negative[0]}.")
    tvs_sizes = _int_list(tvs_sizes, "tvs_sizes")
    if min(tvs_sizes) < 1:
        raise InputError(f"tvs_sizes must be >= 1 subject, got {min(tvs_sizes)}.")
    splits = check_splits(dataset_dir, train_subjects, validation_subjects, test_subjects)
    train = splits.train
    if max(tvs_sizes) > len(train):
        raise InputError(
            f"tvs_sizes asks for {max(tvs_sizes)} training subjects but only {len(train)} "
            f"are given ({', '.join(train) or 'none'})."
        )
    reserved = [k for k in cell_overrides if k in PER_CELL_SETTINGS]
    if reserved:
        raise InputError(
            f"cell_overrides sets {reserved[0]}, which the study sets for every cell itself."
        )
    checked = check_values(cell_overrides)  # what each cell's training would refuse, refused now
    seeds = check_seeds(seeds, checked.get("num_restarts", default_restarts))
    layout.find_subjects(dataset_dir, train[: max(tvs_sizes)])
    layout.find_subjects(dataset_dir, [*(splits.validation or []), *splits.test])
    out = Path(output_dir)
    if out.resolve() == Path(dataset_dir).resolve() or layout.holds_preprocessed_data(out):
        raise InputError(f"output_dir {out} holds preprocessed subjects: choose another folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / STUDY_RECORD).is_file():
        raise InputError(
            f"output_dir {out} holds files that are not a study's (no {STUDY_RECORD}): choose an "
            "empty or new folder."
        )
    _check_study_record(out / STUDY_RECORD)
    return splits, depths, tvs_sizes, seeds


def _check_study_record(path: Path) -> None:
    """A study recorded before seeds existed named its cells without a seed: it is refused
    rather than mixed with cells trained per seed."""
    if not path.is_file():
        return
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"{path} is not a readable study record ({error}).") from error
    if not isinstance(record, dict) or "seeds" not in record:
        raise InputError(
            f"{path} records a study made before seeds existed (one cell per depth and TVS, "
            "no seed): choose a new output_dir for a study with seeds."
        )


def unforwarded_settings(
    train_config: str | os.PathLike, cell_overrides: Mapping[str, Any]
) -> list[str]:
    """Literal top-level settings of the training config that no cell would receive: a setting
    given to the study for them would be silently ignored (add them to ``cell_overrides``)."""
    with open(train_config) as stream:
        config = json.load(stream)
    return [
        key
        for key, value in config.items()
        if _is_literal(value)
        and key not in (*PER_CELL_SETTINGS, "imports")
        and key not in cell_overrides
    ]


def _config_value(train_config: str | os.PathLike, key: str, default: Any) -> Any:
    """A literal top-level setting of the training config (``default`` if it is not one)."""
    with open(train_config) as stream:
        value = json.load(stream).get(key, default)
    return value if _is_literal(value) else default


def _is_literal(value: Any) -> bool:
    """A plain setting: no expression, reference or component anywhere inside."""
    if isinstance(value, str):
        return value[:1] not in "$@%"
    if isinstance(value, dict):
        return False
    if isinstance(value, list):
        return all(_is_literal(v) for v in value)
    return True


def _jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so records compare equal."""
    return json.loads(json.dumps(dict(settings), default=str))


# --------------------------------------------------------------------------- one cell


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
    interior_radius: int = 2,
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


def check_inferer_options(options: Mapping[str, Any], cell_overrides: Mapping[str, Any]) -> None:
    """The bundle inference's own checks of the cells' inference settings, made before any
    cell is trained: e.g. ``mc_samples`` > 1 for cells trained without dropout."""
    check_inference_settings.__wrapped__(
        options.get("inference_mode", "whole_volume"),
        options.get("roi_size", DEFAULT_ROI_SIZE),
        options.get("sw_batch_size", 1),
        tensor_order="dipy",
        repair_tensors=False,
        mc_samples=options.get("mc_samples", 1),
        dropout_rate=check_values(cell_overrides)["dropout_rate"],
    )


def _best_val_rmse(cell_dir: Path) -> float | None:
    try:
        extra = json.loads((cell_dir / "models" / "normalisation.json").read_text())["extra"]
        return extra.get("best_val_rmse")
    except (OSError, ValueError, KeyError):
        return None


#: The parts of a cell's time, in the order the log and the summary give them.
TIME_PARTS = ("patches", "step", "validation", "other", "setup", "evaluation")


def _training_times(cell_dir: Path, training_seconds: float) -> dict[str, float]:
    """A cell's training time split as its runs recorded it (``runs.json``: patches, step,
    validation, other, per epoch), ``setup`` being the rest of the subprocess's wall time
    (start, reading the subjects, statistics, checkpoints, export)."""
    try:
        runs = json.loads((cell_dir / "runs" / "runs.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        runs = []
    times = dict.fromkeys(TIME_PARTS[:4], 0.0)
    for run in runs:
        for part, seconds in (run.get("epoch_seconds") or {}).items():
            if part in times:
                times[part] += float(seconds)
    times["setup"] = max(0.0, training_seconds - sum(times.values()))
    return {part: round(value, 3) for part, value in times.items()}


def _cell_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {region: float(np.mean([r[region] for r in rows])) for region in REGIONS}


# --------------------------------------------------------------------------- the study


@dataclass
class StudyPlan:
    """Everything a cell needs: where the data and outputs are, and how cells are made."""

    dataset_dir: Path
    out: Path
    splits: Splits
    settings: dict[str, Any]
    train_config: Path
    device: str | None
    evaluation: dict[str, Any]  # test subjects, interior radius, inferer options

    @property
    def test(self) -> list[str]:
        return self.splits.test

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / CELLS_DIR / cell.name

    def training(self, cell: Cell) -> dict[str, Any]:
        """What a cell is trained with (compared with a finished cell's record)."""
        return {
            "depth": cell.depth,
            "seed": cell.seed,
            "subjects": list(self.splits.train[: cell.tvs]),
            "validation_subjects": self.splits.validation,
            "settings": dict(self.settings),
        }


def run_study(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    test_subjects: Any,
    train_subjects: Any = None,
    depths: Any = (0, 2, 4, 6, 8),
    tvs_sizes: Any = (8, 16, 32),
    train_config: str | os.PathLike = "configs/train.json",
    cell_overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
    interior_radius: int = 2,
    inferer_options: Mapping[str, Any] | None = None,
    memory_batch_size: int = 2,
    memory_steps: int = 3,
    validation_subjects: Any = None,
    seeds: Any = (0,),
) -> dict[str, Any]:
    """Train and evaluate every (depth, training-set size, seed) cell; write the outputs.

    Args:
        dataset_dir: preprocessed subjects.
        output_dir: the study folder (``cells/``, tables, figures).
        test_subjects: held-out subjects every model is evaluated on (reported, never used
            for a choice).
        train_subjects: ordered training subjects; a cell of size k uses the first k
            (default: every subject of ``dataset_dir`` that is neither validation nor test).
        depths, tvs_sizes: the grid (reversible blocks per stack, training-set sizes).
        train_config: the training bundle config each cell runs.
        cell_overrides: settings passed to every cell's training command.
        device: where evaluation and the memory/time measurement run.
        interior_radius: the metrics' interior definition (LR voxels).
        inferer_options: extra arguments of ``monai_iqt.inferers.make_inferer``.
        memory_batch_size, memory_steps: the Fig. 6 measurement's batch and timed steps.
        validation_subjects: subjects every cell validates on (early stopping, restart
            selection); none: each training subject's ``validation_fraction`` of patches.
        seeds: every cell is trained once per seed (its restarts use seed .. seed + K - 1).

    Returns ``{"rows": metrics rows, "cells": cell records, "files": {name: path}}``.
    Bad settings raise InputError before anything is written.
    """
    cell_overrides = dict(cell_overrides or {})
    if not Path(train_config).is_file():
        raise InputError(f"train_config {train_config} does not exist.")
    splits, depths, tvs_sizes, seeds = check_settings(
        dataset_dir,
        output_dir,
        train_subjects,
        test_subjects,
        depths,
        tvs_sizes,
        cell_overrides,
        validation_subjects,
        seeds,
        _config_value(train_config, "num_restarts", 1),
    )
    check_inferer_options(inferer_options or {}, cell_overrides)
    for key in unforwarded_settings(train_config, cell_overrides):
        log.warning("training setting %s is not in cell_overrides: cells keep its default", key)
    plan = StudyPlan(
        dataset_dir=Path(dataset_dir),
        out=Path(output_dir),
        splits=splits,
        settings=_jsonable(cell_overrides),
        train_config=Path(train_config),
        device=device,
        evaluation=_jsonable(
            {
                "test_subjects": splits.test,
                "interior_radius": int(interior_radius),
                "inferer_options": dict(inferer_options or {}),
            }
        ),
    )
    cells = [Cell(depth, tvs, seed) for tvs in tvs_sizes for depth in depths for seed in seeds]
    finished = {}
    for cell in cells:  # before anything is written: refuse records made with other settings
        record = read_cell_record(plan.cell_dir(cell))
        if record is not None:
            _check_same_training(plan.cell_dir(cell), record["training"], plan.training(cell))
            finished[cell] = record
    write_json(
        plan.out / STUDY_RECORD,
        {
            "train_subjects": splits.train,
            "validation_subjects": splits.validation,
            "test_subjects": splits.test,
            "depths": depths,
            "tvs_sizes": tvs_sizes,
            "seeds": seeds,
            "cell_settings": plan.settings,
            "evaluation": plan.evaluation,
        },
    )
    log.info(
        "study: %d cells (depths %s, TVS %s, seeds %s); training subjects %s, validation %s, "
        "test %s",
        len(cells),
        depths,
        tvs_sizes,
        seeds,
        ", ".join(splits.train),
        ", ".join(splits.validation) if splits.validation else "a fraction of training patches",
        ", ".join(splits.test),
    )
    start = time.perf_counter()
    baseline_rows = evaluate_models(dataset_dir, splits.test, {}, BASELINES, interior_radius)
    baseline_seconds = round(time.perf_counter() - start, 1)
    records: list[dict[str, Any]] = []
    for number, cell in enumerate(cells, 1):
        record = _run_cell(plan, cell, finished.get(cell))
        records.append(record)
        _log_cell(number, len(cells), cell, record)
        _write_tables(plan, baseline_rows, records, baseline_seconds)
    start = time.perf_counter()
    memory = measure_memory_time(depths, device, memory_batch_size, memory_steps)
    memory_seconds = round(time.perf_counter() - start, 1)
    log.info("memory and step time per depth measured in %.0f s", memory_seconds)
    files = _write_tables(plan, baseline_rows, records, baseline_seconds, memory_seconds)
    rows = metrics_rows(baseline_rows, records)
    files["memory_time_json"] = write_json(plan.out / "memory_time.json", memory)
    files["rmse_vs_depth"] = rmse_vs_depth_figure(rows, plan.out / "rmse_vs_depth.png")
    files["memory_time_vs_depth"] = memory_time_figure(
        memory, plan.out / "memory_time_vs_depth.png"
    )
    log.info("study written to %s", ", ".join(str(p) for p in files.values()))
    return {"rows": rows, "cells": records, "files": files}


def _log_cell(number: int, total: int, cell: Cell, record: Mapping[str, Any]) -> None:
    """The one log line of a finished (or skipped) cell, with its figures and time breakdown."""
    rows = record["evaluation"]["rows"]
    means = _cell_means(rows)
    times = _record_times(record)
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


def _record_times(record: Mapping[str, Any]) -> dict[str, float]:
    """A cell record's seconds per part (:data:`TIME_PARTS`); zeros where not recorded."""
    times = dict.fromkeys(TIME_PARTS, 0.0)
    times.update(record.get("seconds") or {})
    times["evaluation"] = float(record["evaluation"].get("seconds", 0.0))
    return times


def _run_cell(plan: StudyPlan, cell: Cell, record: dict[str, Any] | None) -> dict[str, Any]:
    """Train (or resume, or skip) one cell, evaluate it and write its record last."""
    cell_dir = plan.cell_dir(cell)
    if record is not None:
        record["skipped"] = True
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


def _check_same_training(
    cell_dir: Path, recorded: Mapping[str, Any], wanted: Mapping[str, Any]
) -> None:
    """A finished cell made with other settings or subjects is not silently reused."""
    for key in ("subjects", "depth", "seed", "validation_subjects"):
        if recorded.get(key) != wanted.get(key):
            raise InputError(
                f"cell {cell_dir} was trained with {key} {recorded.get(key)}, not "
                f"{wanted.get(key)}: use another output_dir, or delete that cell folder to train "
                "it again."
            )
    old, new = recorded.get("settings", {}), wanted["settings"]
    for key in sorted((set(old) | set(new)) - set(NOT_COMPARED)):
        if old.get(key, RECORDED_SINCE.get(key)) != new.get(key):
            raise InputError(
                f"cell {cell_dir} was trained with {key}={old.get(key)!r}, not "
                f"{new.get(key)!r}: use another output_dir, or delete that cell folder to train "
                "it again."
            )


# --------------------------------------------------------------------------- tables


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
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(
        {k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows
    )
    return write_text(path, buffer.getvalue())


def _matching(rows: Sequence[Mapping[str, Any]], match: Mapping[str, Any]) -> list[Mapping]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def paired_wilcoxon(
    rows: Sequence[Mapping[str, Any]],
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    region: str = "total",
) -> PairedComparison:
    """The paired comparison (:func:`monai_iqt.paired.paired_comparison`) of the rows matching
    ``first`` and ``second``, paired by (test subject, seed)."""

    def by_pair(match: Mapping[str, Any]) -> dict[tuple[str, Any], float]:
        return {(r["subject"], r.get("seed", "")): r[region] for r in _matching(rows, match)}

    names = [str(m.get("model", m)) for m in (first, second)]
    return paired_comparison(by_pair(first), by_pair(second), *names, region=region)


def _format_float(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


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
    mine = _matching(rows, {"model": model, "depth": depth, "tvs": tvs})
    seeds = sorted({r["seed"] for r in mine}, key=str)
    return {seed: _cell_means([r for r in mine if r["seed"] == seed]) for seed in seeds}


def summary_markdown(
    rows: Sequence[Mapping[str, Any]],
    splits: Splits,
    settings: Mapping[str, Any],
    times: Sequence[Mapping[str, Any]] = (),
) -> str:
    """The Fig. 4 table (mean ± sd over seeds of the test-subject mean), the paired comparisons
    against the ESPCN of the same TVS over (subject, seed) pairs, and the time breakdown."""
    models = _models(rows)
    cubic_rows = _matching(rows, {"model": CUBIC})
    cubic = _cell_means(cubic_rows) if cubic_rows else None
    lines = [
        "| Model | Subjects (TVS) | Seeds | RMSE Interior | RMSE Exterior | RMSE Total "
        "| Total / cubic B-spline |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, depth, tvs in models:
        per_seed = seed_means(rows, model, depth, tvs)
        figures = " | ".join(
            _mean_std([m[region] for m in per_seed.values()]) for region in REGIONS
        )
        total = float(np.mean([m["total"] for m in per_seed.values()]))
        ratio = f"{total / cubic['total']:.3f}" if cubic else "n/a"
        lines.append(f"| {model} | {tvs} | {len(per_seed)} | {figures} | {ratio} |")
    if cubic:
        figures = " | ".join(f"{cubic[region]:.2f}" for region in REGIONS)
        lines.append(f"| {CUBIC} | — | — | {figures} | 1.000 |")
    comparisons = [
        "| Model | Subjects (TVS) | n pairs | Median change of total RMSE | W | p |",
        "|---|---|---|---|---|---|",
    ]
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
        comparisons.append(
            f"| {model} | {tvs} | {result.n} | {change} | {statistic} | {result.p_text()} |"
        )
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
    if len(comparisons) > 2:
        text += [
            "## Paired comparison against ESPCN of the same TVS",
            "",
            "Pairs: (test subject, seed). Change: median over pairs of (RMSE − RMSE of "
            "ESPCN) / RMSE of ESPCN, total RMSE. W and p: two-sided Wilcoxon signed-rank test "
            "(scipy.stats.wilcoxon); no p where n is too small for p < 0.05 to be reachable "
            "(the smallest two-sided p with n pairs is 2 / 2^n: n ≤ 5).",
            "",
            *comparisons,
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
    if times:
        text += ["## Time", "", *time_table(times), ""]
    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    text.append(f"Training settings of every cell: {shown or 'the training config defaults'}.")
    return "\n".join(text) + "\n"


def time_table(times: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown lines: seconds per part per cell, and the total per part."""
    header = " | ".join(TIME_PARTS)
    lines = [
        "Seconds per cell: training epochs split into drawing the patches (data loader), the "
        "training step, validation and the rest of the epoch; setup (start, reading subjects, "
        "statistics, caching patches, checkpoints, export) and evaluation on the test subjects "
        "(whole volumes).",
        "",
        f"| Cell | {header} | total |",
        "|---|" + "---|" * (len(TIME_PARTS) + 1),
    ]
    sums = dict.fromkeys(TIME_PARTS, 0.0)
    for entry in times:
        values = [float(entry["seconds"][part]) for part in TIME_PARTS]
        for part, value in zip(TIME_PARTS, values, strict=True):
            sums[part] += value
        shown = " | ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {entry['cell']} | {shown} | {sum(values):.0f} |")
    total = sum(sums.values())
    shown = " | ".join(f"{sums[p]:.0f} ({100 * sums[p] / total:.0f} %)" for p in TIME_PARTS)
    lines.append(f"| all | {shown} | {total:.0f} |")
    return lines


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


def _write_tables(
    plan: StudyPlan,
    baseline_rows: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping],
    baseline_seconds: float = 0.0,
    memory_seconds: float | None = None,
) -> dict[str, Path]:
    rows = metrics_rows(baseline_rows, records)
    times = [{"cell": r["cell"], "seconds": _record_times(r)} for r in records]
    baselines = {**dict.fromkeys(TIME_PARTS, 0.0), "evaluation": baseline_seconds}
    times.append({"cell": "interpolation baselines", "seconds": baselines})
    if memory_seconds is not None:
        memory = {**dict.fromkeys(TIME_PARTS, 0.0), "other": memory_seconds}
        times.append({"cell": "Fig. 6 memory and step time (other)", "seconds": memory})
    summary = summary_markdown(rows, plan.splits, plan.settings, times)
    return {
        "metrics": write_metrics_csv(plan.out / "metrics.csv", rows),
        "summary": write_text(plan.out / "summary.md", summary),
    }


# --------------------------------------------------------------------------- Fig. 6 and plots


def measure_memory_time(
    depths: Sequence[int], device: str | None, batch_size: int = 2, steps: int = 3
) -> list[dict[str, Any]]:
    """Peak bytes saved by autograd and the median time of one Adam step, per depth and mode
    (the memory benchmark's measures; 11^3 LR patches, a small batch so it takes seconds)."""
    from monai_iqt.benchmark import memory

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = memory.make_batch(device, batch=int(batch_size))
    results = []
    for depth in sorted(depths):
        runs = []
        for memory_efficient in (False, True):
            config = memory.Config(evaluation.model_label(depth), depth, memory_efficient)
            result = memory.Result(config.name, depth, memory_efficient)
            model, optimizer = memory.build(config, device)
            memory.train_step(model, optimizer, x, y)  # lazy initialisation
            result.saved_peak_mb, _ = memory.measure_saved(model, optimizer, x, y)
            runs.append((result, model, optimizer))
        memory.time_alternating(runs, x, y, steps=int(steps), warmup=1)
        for result, _, _ in runs:
            results.append(
                {
                    "depth": depth,
                    "memory_efficient": result.memory_efficient,
                    "saved_peak_bytes": int(round(result.saved_peak_mb * MB)),
                    "median_step_seconds": result.median_s,
                    "batch_size": int(batch_size),
                    "device": str(device),
                }
            )
    return results


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    finally:
        plt.close(figure)
    return path


def rmse_vs_depth_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Interior, exterior and total RMSE against N, one line per TVS: mean ± sd over seeds of
    the test-subject mean."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    tvs_sizes = sorted({r["tvs"] for r in rows if r["tvs"] != ""})
    cubic = [r for r in rows if r["model"] == CUBIC]
    for axis, region in zip(axes, REGIONS, strict=True):
        for tvs in tvs_sizes:
            cells = [m for m in _models(rows) if m[2] == tvs]
            depths = [depth for _, depth, _ in cells]
            values = [[m[region] for m in seed_means(rows, *cell).values()] for cell in cells]
            axis.errorbar(
                depths,
                [np.mean(v) for v in values],
                yerr=[np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values],
                marker="o",
                capsize=3,
                label=f"TVS {tvs}",
            )
        if cubic:
            axis.axhline(
                np.mean([r[region] for r in cubic]), color="grey", linestyle="--", label=CUBIC
            )
        axis.set_xticks(sorted({r["depth"] for r in rows if r["depth"] != ""}))
        axis.set_title(f"RMSE {region}")
        axis.set_xlabel("reversible blocks per stack N")
        axis.set_ylabel("RMSE (1e-5 mm²/s)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    return _save(figure, path)


def memory_time_figure(results: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Fig. 6 against depth: peak bytes saved by autograd and step time, both modes."""
    plt = _pyplot()
    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for memory_efficient, label in ((False, "plain (naive)"), (True, "memory-efficient")):
        mine = sorted(
            (r for r in results if r["memory_efficient"] == memory_efficient),
            key=lambda r: r["depth"],
        )
        depths = [r["depth"] for r in mine]
        memory_axis.plot(
            depths, [r["saved_peak_bytes"] / MB for r in mine], marker="o", label=label
        )
        time_axis.plot(depths, [r["median_step_seconds"] for r in mine], marker="o", label=label)
        for axis in (memory_axis, time_axis):
            axis.set_xticks(depths)
    batch = results[0]["batch_size"] if results else "?"
    memory_axis.set_ylabel("peak bytes saved by autograd (MB)")
    time_axis.set_ylabel("median time of one training step (s)")
    for axis in (memory_axis, time_axis):
        axis.set_xlabel("reversible blocks per stack N")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"One Adam step, batch {batch} of 11³ LR patches")
    return _save(figure, path)


# --------------------------------------------------------------------------- bundle entry


@exit_on_bad_input
def bundle_study(**kwargs: Any) -> dict[str, Any]:
    """The bundle's ``run`` entry of ``study.json``: :func:`run_study`, bad input as exit 2."""
    return run_study(**kwargs)
