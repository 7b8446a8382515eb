"""The one loader of preprocessed subjects, shared by training patches and evaluation.

A subject folder (``preprocessing.layout``) holds ``dt_lr`` and ``dt_hr`` (X, Y, Z, 6) tensor
volumes in mm^2/s, ``mask_lr`` and ``mask_hr``, and ``preprocessing.json``. The upscale factor is
the record's ``factor`` (what preprocessing did), checked against the volumes: the HR shape is
``factor`` times the LR shape and the LR affine is the HR affine's block grid
(``preprocessing.geometry``). :func:`inspect_subject` checks everything the headers say without
reading voxels, so a bad subject among many stops the run before any is loaded;
:func:`load_subject` then reads the voxels and checks that they are finite.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.errors import InputError
from preprocessing.geometry import lr_affine_from_hr, voxel_sizes
from preprocessing.io import TENSOR_ELEMENTS, check_finite, load_nifti, read_nifti
from preprocessing.layout import DT_HR, DT_LR, MASK_HR, MASK_LR, RECORD_NAME, read_record

#: Largest distance (mm) between an LR affine and the block grid of its HR affine: NIfTI stores
#: affines in float32, so equal grids may differ by rounding.
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class SubjectHeader:
    """A subject checked from its record and NIfTI headers (no voxel data read)."""

    name: str
    folder: Path
    upscale_factor: int
    lr_shape: tuple[int, int, int]
    lr_affine: np.ndarray
    hr_affine: np.ndarray

    @property
    def hr_shape(self) -> tuple[int, int, int]:
        return tuple(self.upscale_factor * n for n in self.lr_shape)  # type: ignore[return-value]

    @property
    def lr_voxel_size_mm(self) -> list[float]:
        return [float(v) for v in voxel_sizes(self.lr_affine)]


@dataclass
class Subject:
    """A loaded subject: tensors (X, Y, Z, 6) float32 mm^2/s, boolean masks, and its header."""

    header: SubjectHeader
    dt_lr: np.ndarray
    dt_hr: np.ndarray
    mask_lr: np.ndarray
    mask_hr: np.ndarray

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def upscale_factor(self) -> int:
        return self.header.upscale_factor


def inspect_subject(folder: str | os.PathLike) -> SubjectHeader:
    """Check a subject's record and headers: 4D tensors of 6 elements, 3D masks of the same grid,
    HR = ``factor`` x LR in shape and affine. Each problem is one sentence naming the file."""
    folder = Path(folder)
    for name in (DT_LR, DT_HR, MASK_LR, MASK_HR):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name} is missing (subject {folder.name}).")
    factor = _record_factor(folder)
    images = {name: load_nifti(folder / name) for name in (DT_LR, DT_HR, MASK_LR, MASK_HR)}
    for name in (DT_LR, DT_HR):
        shape = tuple(images[name].shape)
        if len(shape) != 4 or shape[3] != len(TENSOR_ELEMENTS):
            raise InputError(
                f"{folder / name} has shape {shape}; expected a tensor volume (X, Y, Z, 6) in "
                f"the order {', '.join(TENSOR_ELEMENTS)}."
            )
    lr_shape = tuple(int(n) for n in images[DT_LR].shape[:3])
    hr_shape = tuple(int(n) for n in images[DT_HR].shape[:3])
    if hr_shape != tuple(factor * n for n in lr_shape):
        raise InputError(
            f"{folder / DT_HR} has spatial shape {hr_shape}, which is not {factor} x the shape "
            f"{lr_shape} of {DT_LR} ({RECORD_NAME} says factor {factor})."
        )
    for name, shape in ((MASK_LR, lr_shape), (MASK_HR, hr_shape)):
        tensor = DT_LR if name == MASK_LR else DT_HR
        if tuple(images[name].shape) != shape:
            raise InputError(
                f"{folder / name} has shape {tuple(images[name].shape)} but {tensor} has spatial "
                f"shape {shape}."
            )
    lr_affine = np.asarray(images[DT_LR].affine, dtype=np.float64)
    hr_affine = np.asarray(images[DT_HR].affine, dtype=np.float64)
    if not np.allclose(lr_affine, lr_affine_from_hr(hr_affine, factor), atol=AFFINE_TOLERANCE_MM):
        raise InputError(
            f"{folder / DT_LR}'s affine is not the {factor}x block grid of {DT_HR}'s affine: "
            "the two volumes do not come from one preprocessing run."
        )
    return SubjectHeader(folder.name, folder, factor, lr_shape, lr_affine, hr_affine)  # type: ignore[arg-type]


def load_subject(subject: str | os.PathLike | SubjectHeader) -> Subject:
    """Read a subject checked by :func:`inspect_subject` (a folder is inspected first)."""
    header = subject if isinstance(subject, SubjectHeader) else inspect_subject(subject)
    folder = header.folder
    tensors = {}
    for name in (DT_LR, DT_HR):
        data, _ = read_nifti(folder / name, np.float32)
        check_finite(folder / name, data)
        tensors[name] = data
    masks = {name: read_nifti(folder / name)[0] > 0 for name in (MASK_LR, MASK_HR)}
    if not masks[MASK_HR].any():
        raise InputError(f"{folder / MASK_HR} is empty: the subject has no brain voxel.")
    return Subject(header, tensors[DT_LR], tensors[DT_HR], masks[MASK_LR], masks[MASK_HR])


def _record_factor(folder: Path) -> int:
    factor = read_record(folder).get("factor")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InputError(
            f"{folder / RECORD_NAME} holds no downsampling factor (a whole number >= 1, found "
            f"{factor!r}); preprocess the subject again."
        )
    return factor
