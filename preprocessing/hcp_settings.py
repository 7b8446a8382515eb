"""Settings of the HCP stage and the check that a dataset holds one value of each.

:class:`PreprocessingOptions` is what ``python -m preprocessing hcp`` is asked to do; every
complete subject records it in ``preprocessing.json``, and a run refuses, before any fit, to add
subjects made otherwise to the same ``--out`` or to skip a finished subject made otherwise
(:func:`check_recorded_settings`, :func:`check_dataset_settings`): a dataset mixing factors, shells
or masks would train on inconsistent pairs without a word.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocessing.errors import InputError
from preprocessing.layout import RECORD_NAME, read_record
from preprocessing.tensor_fit import B0_THRESHOLD, DEFAULT_BMAX, check_fit_method

#: Settings a preprocessed subject records; a dataset holds one value of each.
#: (option field, command-line flag)
RECORDED_SETTINGS = (
    ("factor", "--factor"),
    ("bmax", "--bmax"),
    ("b0_threshold", "--b0-threshold"),
    ("fit_method", "--fit-method"),
    ("lr_mask", "--lr-mask"),
)

#: How the LR brain mask is made (``--lr-mask``): ``hr-blocks``, the paper's (an LR voxel is
#: brain when half its HR block is in the HR mask), or ``lr-data``, DIPY's median_otsu on the LR
#: mean b0 as inference does on a new scan (no knowledge of the HR mask).
LR_MASKS = ("hr-blocks", "lr-data")


@dataclass(frozen=True)
class PreprocessingOptions:
    """Settings of the DIPY stage (defaults follow the paper: r=2, b0 + b=1000 shell, WLS)."""

    factor: int = 2
    bmax: float = DEFAULT_BMAX
    b0_threshold: float = B0_THRESHOLD
    fit_method: str = "WLS"
    lr_mask: str = "hr-blocks"

    def checked(self) -> PreprocessingOptions:
        """These options with the fit method checked against DIPY's (upper case); InputError."""
        if int(self.factor) != self.factor or self.factor < 1:
            raise InputError(f"--factor must be a whole number >= 1, got {self.factor}.")
        if self.lr_mask not in LR_MASKS:
            raise InputError(f"--lr-mask {self.lr_mask!r} is not one of {', '.join(LR_MASKS)}.")
        return dataclasses.replace(self, fit_method=check_fit_method(self.fit_method))


def check_recorded_settings(out_subject_dir: Path, options: PreprocessingOptions) -> None:
    """One sentence (InputError) when a complete subject was made with other settings."""
    record = read_record(out_subject_dir)
    recorded = record.get("options", {})
    wanted = asdict(options)
    differences = []
    for key, flag in RECORDED_SETTINGS:
        old, new = recorded.get(key), wanted[key]
        if key == "lr_mask":
            old = old or "hr-blocks"  # records from before --lr-mask existed
            same = old == new
        elif key == "fit_method":
            same = str(old).upper() == str(new).upper()
        else:
            same = _equal(old, new)
        if not same:
            differences.append(f"{flag} {old} (this run: {new})")
    if differences:
        raise InputError(
            f"{out_subject_dir / RECORD_NAME} records other settings than this run's, "
            f"{', '.join(differences)}: use another --out, or --overwrite to redo the subject."
        )


def _equal(old, new) -> bool:
    try:
        return float(old) == float(new)
    except (TypeError, ValueError):
        return False


def check_dataset_settings(
    out: Path, subject_ids: list[str], options: PreprocessingOptions, overwrite: bool
) -> None:
    """Complete subjects this run keeps must carry this run's settings (one dataset, one setting).

    With ``overwrite`` the listed subjects are redone, so only the others are compared.
    """
    try:
        records = sorted(out.glob(f"*/{RECORD_NAME}"))
    except OSError:  # an unusable --out is reported by the probe write
        return
    redone = set(subject_ids) if overwrite else set()
    for record in records:
        if record.parent.name not in redone:
            check_recorded_settings(record.parent, options)
