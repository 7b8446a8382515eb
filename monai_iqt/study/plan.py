"""The plan of a depth study: its cells, its subjects and its settings, checked before anything
is written.

Subjects are split three ways: ``train_subjects`` (a cell of training-set size k trains on the
first k), ``validation_subjects`` (early stopping, restart selection and every choice of a
setting; none given: each training subject's ``validation_fraction`` of patches, the training
bundle's fallback) and ``test_subjects`` (reported, never used for a choice); overlapping lists
are refused. Every setting the cells would refuse is refused here in one sentence
(:class:`~preprocessing.errors.InputError`), and so are a finished cell recorded with other settings
or subjects and a study recorded before seeds existed (its cells are named without a seed).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_iqt import defaults, evaluation
from monai_iqt.inference_plan import check_inference_settings
from monai_iqt.training.settings import RECORDED_SINCE, check_values
from preprocessing import layout
from preprocessing.errors import InputError

CELLS_DIR = "cells"
CELL_RECORD = "cell.json"
CELL_LOG = "training.log"
STUDY_RECORD = "study.json"
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


def config_value(train_config: str | os.PathLike, key: str, default: Any) -> Any:
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


def jsonable(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so records compare equal."""
    return json.loads(json.dumps(dict(settings), default=str))


def check_inferer_options(options: Mapping[str, Any], cell_overrides: Mapping[str, Any]) -> None:
    """The bundle inference's own checks of the cells' inference settings, made before any
    cell is trained: e.g. ``mc_samples`` > 1 for cells trained without dropout."""
    check_inference_settings.__wrapped__(
        options.get("inference_mode", defaults.INFERENCE_MODE),
        options.get("roi_size", defaults.ROI_SIZE),
        options.get("sw_batch_size", defaults.SW_BATCH_SIZE),
        tensor_order="dipy",
        repair_tensors=False,
        mc_samples=options.get("mc_samples", defaults.MC_SAMPLES),
        dropout_rate=check_values(cell_overrides)["dropout_rate"],
    )


# --------------------------------------------------------------------------- the plan


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


def check_same_training(
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
