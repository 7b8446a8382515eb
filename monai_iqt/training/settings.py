"""The training settings: checked before anything is read or written, recorded when training
starts, compared when it resumes.

``check_settings`` is the first step of the bundle's ``run`` entry: every setting's type and
range, the dataset and its subjects, and the state of the output folder (a folder that already
holds training runs needs ``--resume true`` or ``--overwrite true``) are checked from the
settings and the subjects' ``preprocessing.json`` records alone. A bad value is one sentence
naming the setting (``InputError``). ``runs/settings.json`` records what the runs were trained
with (subjects with the sha256 of their preprocessing records, depth, factor, patches, seed,
loss, ...); a resume whose settings differ is refused, naming the first difference.

``amp`` (default false) turns on the automatic mixed precision of MONAI's trainer and evaluator:
``torch.autocast("cuda")`` (float16) with a gradient scaler. It is a GPU setting: MONAI does not
autocast on the CPU, and CPU bfloat16 autocast is slower than float32 for these 3D
convolutions, so ``amp`` true without a GPU is refused rather than silently ignored. The
memory-efficient reversible engine restores the forward's autocast state when it rebuilds
activations, so both execution modes train under AMP.

``loss`` "gaussian_nll" or "rmse_nll" trains the log-variance head, so it needs
``predict_variance`` true; the combination is refused rather than implied, so the network the
settings describe is the network trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from monai_iqt import defaults
from monai_iqt.data.patches import TARGET_REGIONS, TARGET_SCALES
from monai_iqt.losses import LOSSES
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.errors import InputError, as_bool, choice
from preprocessing.layout import (
    RECORD_NAME,
    check_subject_ids,
    find_subjects,
    holds_preprocessed_data,
    read_record,
)

SETTINGS_FILE = "settings.json"
RUNS_FILE = "runs.json"
LAST_CHECKPOINT = "checkpoint_last.pt"
BEST_CHECKPOINT = "model_best.pt"
#: What ``trained_on`` may say about the training data (``normalisation.json``).
DATA_SOURCES = ("synthetic-geometric", "synthetic-mni152", "hcp", "unknown")

#: Integer settings and their smallest value.
_INTEGERS = {
    "num_revnet_blocks": 0,
    "lr_patch_size": 2 * VALID_SHRINK + 1,
    "patches_per_subject": 2,
    "epochs": 1,
    "val_interval": 1,
    "batch_size": 1,
    "early_stopping_patience": 1,
    "num_restarts": 1,
    "seed": 0,
    "num_workers": 0,
    "log_interval": 1,
}
_FLAGS = ("memory_efficient", "resume", "overwrite", "predict_variance", "amp", "cache_patches")
#: Settings a resume must share with the runs it continues, in the order they are compared.
RESUME_KEYS = (
    "subjects",
    "upscale_factor",
    "validation_subjects",
    "num_revnet_blocks",
    "lr_patch_size",
    "patches_per_subject",
    "validation_fraction",
    "seed",
    "batch_size",
    "learning_rate",
    "lr_decay",
    "loss",
    "target_scale",
    "target_region",
    "target_statistics",
    "predict_variance",
    "dropout_rate",
)
#: Settings added after runs were first recorded, and the value older records imply:
#: ``target_statistics`` (derived from ``target_region``) says over which voxels the target's
#: normalisation statistics were computed; before it was recorded, over whole blocks always.
RECORDED_SINCE = {
    "target_scale": "channel",
    "target_region": "patch",
    "target_statistics": "whole_blocks",
    "val_interval": 1,
    "validation_subjects": None,
}


def check_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Each given setting's type, range or choice checked and converted (flags to bool); reads
    nothing, so the study checks its cells' settings with it before it writes anything."""
    checked = dict(settings)
    for name, lowest in _INTEGERS.items():
        if name in checked:
            checked[name] = _integer(name, checked[name], lowest)
    for name in _FLAGS:
        if name in checked:
            checked[name] = _flag(name, checked[name])
    for name in ("learning_rate", "lr_decay"):
        if name in checked:
            checked[name] = _number(name, checked[name], low=0.0)
    if "validation_fraction" in checked:
        checked["validation_fraction"] = _number(
            "validation_fraction", checked["validation_fraction"], low=0.0, high=1.0
        )
    checked["dropout_rate"] = _number(
        "dropout_rate",
        checked.get("dropout_rate", defaults.DROPOUT_RATE),
        low=0.0,
        high=1.0,
        low_inclusive=True,
    )
    loss = choice("loss", checked.get("loss", defaults.LOSS), LOSSES)
    if loss != "rmse" and not checked.get("predict_variance", False):
        raise InputError(
            f"setting loss {loss} trains a predicted variance: give --predict_variance true "
            "with it (or --loss rmse)."
        )
    choice("target_scale", checked.setdefault("target_scale", defaults.TARGET_SCALE), TARGET_SCALES)
    choice(
        "target_region", checked.setdefault("target_region", defaults.TARGET_REGION), TARGET_REGIONS
    )
    if checked.get("amp") and not torch.cuda.is_available():
        raise InputError(
            "setting amp is true but no GPU is available: MONAI's trainer autocasts on CUDA "
            "only; give --amp false to train on the CPU."
        )
    return checked


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings checked and converted (flags to bool, subjects to folder names).

    Adds ``subject_folders`` (the dataset's subject folders used) and ``record`` (what
    ``runs/settings.json`` holds for these settings). Reads only ``preprocessing.json`` files.
    """
    checked = check_values(settings)
    if checked["resume"] and checked["overwrite"]:
        raise InputError(
            "settings resume and overwrite are both true: give --resume true to continue the "
            "runs or --overwrite true to start over, not both."
        )
    if checked.get("dataset_dir") in (None, ""):
        raise InputError(
            "setting dataset_dir is not set: give --dataset_dir DIR, a folder of preprocessed "
            "subjects (python -m preprocessing hcp --out DIR)."
        )
    if checked.get("output_dir") in (None, ""):
        raise InputError("setting output_dir is not set: give --output_dir DIR.")
    output_dir = Path(str(checked["output_dir"]))
    if holds_preprocessed_data(output_dir):
        raise InputError(
            f"output_dir {output_dir} holds preprocessed subjects; training writes runs/ and "
            "models/ there: choose another --output_dir."
        )
    held_out = checked.get("validation_subjects")
    held_out = None if held_out is None else (check_subject_ids(held_out) or None)
    folders = find_subjects(checked["dataset_dir"], checked.get("subjects"))
    if held_out is not None:
        if checked.get("subjects") is None:  # every subject that is not a validation subject
            folders = [folder for folder in folders if folder.name not in held_out]
        overlap = [folder.name for folder in folders if folder.name in held_out]
        if overlap:
            raise InputError(
                f"subject {overlap[0]} is both a training and a validation subject: validation "
                "subjects must be held out of training."
            )
        find_subjects(checked["dataset_dir"], held_out)
    checked["validation_subjects"] = held_out
    checked["subjects"] = None if checked.get("subjects") is None else [f.name for f in folders]
    checked["subject_folders"] = folders
    validation = max(1, round(checked["patches_per_subject"] * checked["validation_fraction"]))
    if validation >= checked["patches_per_subject"]:
        raise InputError(
            f"settings patches_per_subject {checked['patches_per_subject']} and "
            f"validation_fraction {checked['validation_fraction']} leave no training patch."
        )
    checked["record"] = settings_record(checked, folders)
    check_output_dir(output_dir / "runs", checked)
    return checked


def settings_record(checked: Mapping[str, Any], folders: list[Path]) -> dict[str, Any]:
    """What ``runs/settings.json`` records (and a resume compares), in comparison order."""
    records = [read_record(folder) for folder in folders]
    factors = sorted({r.get("factor") for r in records}, key=str)
    values = {
        "subjects": [[f.name, _sha256(f / RECORD_NAME)] for f in folders],
        "upscale_factor": factors[0] if len(factors) == 1 else factors,
        **{key: checked.get(key) for key in RESUME_KEYS[2:]},
    }
    values["loss"] = values["loss"] or "rmse"
    values["predict_variance"] = bool(values["predict_variance"])
    values["dropout_rate"] = float(values["dropout_rate"] or 0.0)
    brain = values["target_region"] == "brain"
    values["target_statistics"] = "brain_voxels" if brain else "whole_blocks"
    return {key: values[key] for key in RESUME_KEYS}


def trained_on(folders: list[Path]) -> str:
    """What the subjects were made from (one of :data:`DATA_SOURCES`): "unknown" unless every
    subject tells the same (see :func:`data_source`)."""
    sources = {data_source(folder) for folder in folders}
    return sources.pop() if len(sources) == 1 else "unknown"


def data_source(subject_dir: Path) -> str:
    """Where a preprocessed subject's raw data came from.

    A ``source`` in its ``preprocessing.json`` if one is recorded; else the raw subject folder
    the record names (``<raw>/<id>/T1w/Diffusion/data.nii.gz``) is looked at: the project's
    generators write ``ground_truth/`` beside ``T1w/`` (``phantom.json`` names the anatomy of
    the MNI152 phantoms; the geometric phantom writes only ``dt_hr.nii.gz``). Anything else,
    including raw data that has moved, is "unknown": real scans are not guessed.
    """
    record = read_record(subject_dir)
    if record.get("source") in DATA_SOURCES:
        return record["source"]
    data = (record.get("inputs") or {}).get("data")
    parents = Path(str(data)).parents if data else []
    if len(parents) < 3:
        return "unknown"
    truth = parents[2] / "ground_truth"
    try:
        if (truth / "phantom.json").is_file():
            anatomy = json.loads((truth / "phantom.json").read_text()).get("anatomy")
            source = f"synthetic-{anatomy}"
            return source if source in DATA_SOURCES else "unknown"
        if (truth / "dt_hr.nii.gz").is_file():
            return "synthetic-geometric"
    except (OSError, ValueError, AttributeError):
        pass
    return "unknown"


def existing_runs(runs_dir: Path) -> list[Path]:
    """Files of earlier trainings in ``runs_dir`` (checkpoints, the run and settings records)."""
    found = [runs_dir / name for name in (RUNS_FILE, SETTINGS_FILE) if (runs_dir / name).is_file()]
    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        found += sorted(runs_dir.glob(f"run_*/{name}"))
    return found


def check_output_dir(runs_dir: Path, checked: Mapping[str, Any]) -> None:
    """Refuse a runs folder holding earlier runs unless resuming (with the same settings) or
    overwriting."""
    found = existing_runs(runs_dir)
    if not found or checked["overwrite"]:
        return
    if not checked["resume"]:
        raise InputError(
            f"{runs_dir} already holds training runs ({found[0]}): give --resume true to "
            "continue them or --overwrite true to start over."
        )
    recorded = load_settings(runs_dir)
    if recorded is None:
        raise InputError(
            f"{runs_dir} holds training runs but no {SETTINGS_FILE} saying how they were "
            "trained, so they cannot be resumed safely: give --overwrite true to start over."
        )
    compare_settings(recorded, checked["record"], runs_dir)


def load_settings(runs_dir: Path) -> dict[str, Any] | None:
    path = runs_dir / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        with open(path) as stream:
            recorded = json.load(stream)
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable settings record ({error}).") from None
    if not isinstance(recorded, dict):
        raise InputError(f"{path} is not a settings record (not a JSON object).")
    return recorded


def compare_settings(recorded: Mapping[str, Any], current: Mapping[str, Any], runs_dir: Path):
    """One sentence naming the first setting in which ``current`` differs from ``recorded``."""
    advice = "resume with the runs' settings, or give --overwrite true to start over."
    for key, value in current.items():
        old = recorded.get(key, RECORDED_SINCE.get(key))
        if key == "subjects" and old != value:
            old_names = [name for name, _ in old or []]
            new_names = [name for name, _ in value]
            if old_names != new_names:
                raise InputError(
                    f"--resume true: the runs in {runs_dir} were trained on subjects "
                    f"{old_names}, not {new_names}; {advice}"
                )
            changed = next(n for (n, a), (_, b) in zip(old, value, strict=True) if a != b)
            raise InputError(
                f"--resume true: subject {changed}'s {RECORD_NAME} changed since the runs in "
                f"{runs_dir} started (it was preprocessed again); {advice}"
            )
        if key == "target_statistics" and old != value:
            raise InputError(
                f"--resume true: the runs in {runs_dir} normalised their targets with "
                f"statistics over {old.replace('_', ' ')}, and training with these settings "
                f"uses {value.replace('_', ' ')}; give --overwrite true to start over."
            )
        if key == "normalisation":
            if old is not None and not _same_numbers(old, value):
                raise InputError(
                    f"--resume true: the normalisation statistics of the patches differ from "
                    f"those the runs in {runs_dir} were trained with; {advice}"
                )
            continue
        if old != value and not _same_numbers(old, value):
            raise InputError(
                f"--resume true: setting {key} was {old!r} for the runs in {runs_dir} and is "
                f"now {value!r}; {advice}"
            )


def _same_numbers(a: Any, b: Any) -> bool:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_numbers(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_numbers(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, numbers.Real) and isinstance(b, numbers.Real):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0) or a == b
    return a == b


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _integer(name: str, value: Any, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"setting {name} must be an integer >= {lowest}, got {value!r}.")
    if value < lowest:
        raise InputError(f"setting {name} must be an integer >= {lowest}, got {value}.")
    return int(value)


def _number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_inclusive: bool = False,
) -> float:
    interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"setting {name} must be a number in {interval}, got {value!r}.")
    number = float(value)
    above = number >= low if low_inclusive else number > low
    if not (math.isfinite(number) and above and number < high):
        raise InputError(f"setting {name} must be a number in {interval}, got {value!r}.")
    return number


def _flag(name: str, value: Any) -> bool:
    try:
        return as_bool(value)
    except InputError:
        raise InputError(f"setting {name} must be true or false, got {value!r}.") from None
