"""The preprocessed dataset's layout: file names, the completion record, the one subject finder.

A preprocessed dataset is a folder of subject folders, each holding ``dt_lr``, ``dt_hr``,
``mask_lr`` and ``mask_hr`` (NIfTI) and ``preprocessing.json``, which preprocessing writes last:
a subject is complete exactly when its record exists. Training, evaluation, inference and the
study all find subjects here, so they agree on what a subject is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from preprocessing.errors import InputError

DT_LR = "dt_lr.nii.gz"
DT_HR = "dt_hr.nii.gz"
MASK_LR = "mask_lr.nii.gz"
MASK_HR = "mask_hr.nii.gz"
#: The volumes preprocessing writes per subject, then the record (written last).
OUTPUT_NAMES = (DT_HR, DT_LR, MASK_HR, MASK_LR)
RECORD_NAME = "preprocessing.json"

#: How to make preprocessed subjects, quoted when none are found.
PREPROCESS_HINT = "run `python -m preprocessing hcp --hcp-root RAW --out DATASET` first"


def check_subject_id(subject_id: Any) -> str:
    """A subject id as a folder name; numeric ids (``100307`` parsed as int) become strings.

    An id that would leave its parent folder (a path separator, ``..``, an absolute path) or is
    empty is one sentence (InputError): ids name folders inside the dataset and nothing else.
    """
    if isinstance(subject_id, bool) or not isinstance(subject_id, str | int):
        raise InputError(f"subject id {subject_id!r} must be a string or an integer.")
    name = str(subject_id)
    if (
        not name.strip()
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or os.sep in name
        or (os.altsep is not None and os.altsep in name)
        or Path(name).is_absolute()
        or "\0" in name
    ):
        raise InputError(
            f"subject id {name!r} is not a plain folder name (no path separators, '..' or "
            "absolute paths)."
        )
    return name


def check_subject_ids(subjects: Any) -> list[str]:
    """A list of subject ids (one id, a string or a number, is a list of one)."""
    if isinstance(subjects, str | int) and not isinstance(subjects, bool):
        subjects = [subjects]
    if not isinstance(subjects, Iterable):
        raise InputError(f"subjects {subjects!r} must be a list of subject ids.")
    names = [check_subject_id(s) for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"subject {duplicates[0]} is listed more than once.")
    return names


def is_complete(subject_dir: str | os.PathLike) -> bool:
    """A subject is complete when its ``preprocessing.json`` (written last) exists."""
    return (Path(subject_dir) / RECORD_NAME).is_file()


def read_record(subject_dir: str | os.PathLike) -> dict[str, Any]:
    """The subject's ``preprocessing.json``; one sentence if it is missing or not JSON."""
    path = Path(subject_dir) / RECORD_NAME
    try:
        with open(path) as stream:
            record = json.load(stream)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist: the subject is not preprocessed.") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a readable preprocessing record ({error}).") from error
    if not isinstance(record, dict):
        raise InputError(f"{path} is not a preprocessing record (not a JSON object).")
    return record


def find_subjects(
    dataset_dir: str | os.PathLike,
    subjects: Any = None,
    require: Iterable[str] = OUTPUT_NAMES,
) -> list[Path]:
    """Folders of complete preprocessed subjects in ``dataset_dir`` (all, sorted, or ``subjects``).

    Complete means the record exists and every file in ``require`` is there. Named subjects that
    are missing or incomplete, or a dataset without subjects, are one sentence (InputError).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise InputError(f"dataset folder {dataset_dir} does not exist: {PREPROCESS_HINT}.")
    require = tuple(require)
    if subjects is not None:
        folders = [dataset_dir / name for name in check_subject_ids(subjects)]
        for folder in folders:
            missing = [n for n in (*require, RECORD_NAME) if not (folder / n).is_file()]
            if missing:
                raise InputError(
                    f"subject {folder.name} is not a complete preprocessed subject of "
                    f"{dataset_dir} (no {', '.join(missing)})."
                )
        return folders
    folders = subject_folders(dataset_dir, (RECORD_NAME, *require))
    if not folders:
        raise InputError(
            f"{dataset_dir} holds no preprocessed subject (no <subject>/{RECORD_NAME}): "
            f"{PREPROCESS_HINT}."
        )
    return folders


def subject_folders(dataset_dir: str | os.PathLike, require: Sequence[str]) -> list[Path]:
    """Sub-folders of ``dataset_dir`` holding every file named in ``require``, sorted: the one
    way a dataset's subjects are listed (preprocessed ones, or new scans' ``dt_lr`` folders)."""
    first, *rest = require
    found = Path(dataset_dir).glob(f"*/{first}")
    return sorted(p.parent for p in found if all((p.parent / n).is_file() for n in rest))


def holds_preprocessed_data(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a preprocessed subject or a dataset of them (never write there)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / RECORD_NAME).exists():
        return True
    return any(folder.glob(f"*/{RECORD_NAME}"))
