"""HCP subjects to paired LR/HR diffusion tensor volumes (one subject, or many in parallel).

Per subject: check every input (before anything is written), read only the volumes with
b <= bmax from ``data.nii.gz`` one at a time through nibabel's dataobj, crop to a multiple of
the factor, block-average the raw DWI, fit DTI (DIPY TensorModel, WLS) at both resolutions
inside the masks, write ``dt_hr, dt_lr, mask_hr, mask_lr`` atomically, then
``preprocessing.json`` last: a subject with that record is complete.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing.downsample import block_mean, crop_volume, downsample_mask
from preprocessing.geometry import crop_to_multiple, lr_affine_from_hr
from preprocessing.io import TENSOR_ELEMENTS, InputError, load_nifti, save_nifti, write_json
from preprocessing.tensor_fit import (
    B0_THRESHOLD,
    DEFAULT_BMAX,
    count_non_positive_definite,
    fit_dti,
)

log = logging.getLogger(__name__)

DIFFUSION_SUBDIR = Path("T1w") / "Diffusion"
DATA_NAME, BVALS_NAME, BVECS_NAME, MASK_NAME = (
    "data.nii.gz",
    "bvals",
    "bvecs",
    "nodif_brain_mask.nii.gz",
)
OUTPUT_NAMES = ("dt_hr.nii.gz", "dt_lr.nii.gz", "mask_hr.nii.gz", "mask_lr.nii.gz")
RECORD_NAME = "preprocessing.json"
#: Tolerance on |bvec| - 1 for diffusion-weighted directions (FSL files carry ~4-6 decimals).
UNIT_LENGTH_TOLERANCE = 1e-2


@dataclass(frozen=True)
class PreprocessingOptions:
    """Settings of the DIPY stage (defaults follow the paper: r=2, b0 + b=1000 shell, WLS)."""

    factor: int = 2
    bmax: float = DEFAULT_BMAX
    b0_threshold: float = B0_THRESHOLD
    fit_method: str = "WLS"


@dataclass
class SubjectInputs:
    """Validated inputs of one subject: file paths, header facts and the volumes to use."""

    subject_id: str
    data_path: Path
    bvals_path: Path
    bvecs_path: Path
    mask_path: Path
    data_shape: tuple[int, ...]
    affine: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    selected: np.ndarray  # volume indices with b <= bmax (b0 included), increasing
    mask: np.ndarray  # bool, full (uncropped) shape


@dataclass
class RunSummary:
    """Outcome of :func:`preprocess_hcp`: subject ids done, skipped, and failed (id -> message)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# --- input checks -----------------------------------------------------------------------------


def find_subjects(hcp_root: str | os.PathLike) -> list[str]:
    """Subject ids under ``hcp_root``: its non-hidden sub-folders, sorted."""
    root = Path(hcp_root)
    if not root.is_dir():
        raise InputError(f"HCP root {root} does not exist or is not a folder.")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_subject_inputs(
    subject_dir: str | os.PathLike, options: PreprocessingOptions = PreprocessingOptions()
) -> SubjectInputs:
    """Check one HCP subject folder and read its gradients and mask; raise InputError if bad.

    Reads only headers, the text files and the mask, so it is cheap; NaN/inf in the DWI are
    caught later, while the selected volumes are read.
    """
    subject_dir = Path(subject_dir)
    if not subject_dir.is_dir():
        raise InputError(f"Subject {subject_dir.name} not found: {subject_dir} does not exist.")
    folder = subject_dir / DIFFUSION_SUBDIR
    paths = [folder / name for name in (DATA_NAME, BVALS_NAME, BVECS_NAME, MASK_NAME)]
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path} is missing.")
    data_path, bvals_path, bvecs_path, mask_path = paths

    data_image = load_nifti(data_path)
    shape = tuple(int(n) for n in data_image.shape)
    if len(shape) != 4:
        raise InputError(
            f"{data_path} is {len(shape)}D with shape {shape}, but a 4D diffusion series is needed."
        )
    volumes = shape[3]
    bvals, bvecs = read_gradient_table(
        bvals_path, bvecs_path, data_path, volumes, options.b0_threshold, options.bmax
    )

    mask_image = load_nifti(mask_path)
    if tuple(mask_image.shape) != shape[:3]:
        raise InputError(
            f"{mask_path} has shape {tuple(mask_image.shape)} but {data_path.name} has spatial "
            f"shape {shape[:3]}."
        )
    mask = np.asarray(mask_image.dataobj) > 0
    cropped = crop_to_multiple(shape, options.factor)
    if min(cropped) == 0:
        raise InputError(
            f"{data_path} has spatial shape {shape[:3]}, smaller than the factor {options.factor}."
        )
    if not crop_volume(mask, options.factor).any():
        raise InputError(f"{mask_path} is empty (no brain voxel inside the cropped volume).")
    if not downsample_mask(mask, options.factor).any():
        raise InputError(
            f"{mask_path} has no {options.factor}^3 block that is at least half brain, "
            "so the LR mask would be empty."
        )
    return SubjectInputs(
        subject_id=subject_dir.name,
        data_path=data_path,
        bvals_path=bvals_path,
        bvecs_path=bvecs_path,
        mask_path=mask_path,
        data_shape=shape,
        affine=data_image.affine,
        bvals=bvals,
        bvecs=bvecs,
        selected=np.flatnonzero((bvals < options.b0_threshold) | (bvals <= options.bmax)),
        mask=mask,
    )


def read_selected_volumes(inputs: SubjectInputs, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """HR (cropped) and LR (block-mean) DWI of the selected volumes, as (X, Y, Z, N) float32 views.

    Volumes are read one by one, in file order, through nibabel's dataobj with the file kept
    open, so a gzipped 288-volume series is decompressed once and never held whole in memory.
    """
    image = nib.load(inputs.data_path, keep_file_open=True)
    hr_shape = crop_to_multiple(inputs.data_shape, factor)
    lr_shape = tuple(n // factor for n in hr_shape)
    count = inputs.selected.size
    # Volume-major storage: each volume is one contiguous write; the fit sees a transpose.
    dwi_hr = np.empty((count,) + hr_shape, dtype=np.float32)
    dwi_lr = np.empty((count,) + lr_shape, dtype=np.float32)
    try:
        for position, volume_index in enumerate(inputs.selected):
            volume = np.asarray(image.dataobj[..., int(volume_index)], dtype=np.float32)
            volume = crop_volume(volume, factor)
            if not np.isfinite(volume).all():
                raise InputError(
                    f"{inputs.data_path} volume {volume_index} contains NaN or inf values."
                )
            dwi_hr[position] = volume
            dwi_lr[position] = block_mean(volume, factor)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{inputs.data_path} cannot be read: {error}.") from error
    finally:
        image.uncache()
        del image
    return dwi_hr.transpose(1, 2, 3, 0), dwi_lr.transpose(1, 2, 3, 0)


# --- one subject ------------------------------------------------------------------------------


def is_complete(out_subject_dir: str | os.PathLike) -> bool:
    """A subject is complete when its ``preprocessing.json`` (written last) exists."""
    return (Path(out_subject_dir) / RECORD_NAME).is_file()


def preprocess_subject(
    subject_dir: str | os.PathLike,
    out_subject_dir: str | os.PathLike,
    options: PreprocessingOptions = PreprocessingOptions(),
    overwrite: bool = False,
) -> dict | None:
    """Preprocess one HCP subject folder into ``out_subject_dir``; returns the record written.

    Returns None (and touches nothing) when the subject is already complete and not
    ``overwrite``. Raises InputError, before writing anything, when an input is bad.
    """
    started = time.perf_counter()
    out_subject_dir = Path(out_subject_dir)
    if is_complete(out_subject_dir) and not overwrite:
        return None
    inputs = load_subject_inputs(subject_dir, options)
    factor = options.factor
    dwi_hr, dwi_lr = read_selected_volumes(inputs, factor)
    bvals = inputs.bvals[inputs.selected]
    bvecs = inputs.bvecs[inputs.selected]
    mask_hr = crop_volume(inputs.mask, factor)
    mask_lr = downsample_mask(inputs.mask, factor).astype(bool)

    dt_lr = fit_dti(dwi_lr, bvals, bvecs, mask_lr, options.b0_threshold, options.fit_method)
    del dwi_lr
    dt_hr = fit_dti(dwi_hr, bvals, bvecs, mask_hr, options.b0_threshold, options.fit_method)
    del dwi_hr

    hr_affine = np.asarray(inputs.affine, dtype=np.float64)
    lr_affine = lr_affine_from_hr(hr_affine, factor)
    # From here on files are replaced: drop the old record first, so a crash never leaves a
    # record next to a mix of old and new volumes; clear temporaries of interrupted runs.
    out_subject_dir.mkdir(parents=True, exist_ok=True)
    (out_subject_dir / RECORD_NAME).unlink(missing_ok=True)
    for stale in out_subject_dir.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)
    save_nifti(out_subject_dir / "dt_hr.nii.gz", dt_hr, hr_affine, np.float32)
    save_nifti(out_subject_dir / "dt_lr.nii.gz", dt_lr, lr_affine, np.float32)
    save_nifti(out_subject_dir / "mask_hr.nii.gz", mask_hr, hr_affine, np.uint8)
    save_nifti(out_subject_dir / "mask_lr.nii.gz", mask_lr, lr_affine, np.uint8)

    rounded = np.round(inputs.bvals, -2)
    record = {
        "subject": inputs.subject_id,
        "inputs": {
            "data": str(inputs.data_path.resolve()),
            "bvals": str(inputs.bvals_path.resolve()),
            "bvecs": str(inputs.bvecs_path.resolve()),
            "mask": str(inputs.mask_path.resolve()),
            "data_shape": list(inputs.data_shape),
        },
        "options": asdict(options),
        "factor": factor,
        "fit_method": f"dipy.reconst.dti.TensorModel(fit_method={options.fit_method!r})",
        "shells_available": sorted({float(b) for b in rounded}),
        "shells_used": sorted({float(b) for b in rounded[inputs.selected]}),
        "volume_indices": inputs.selected.tolist(),
        "b0_indices": [int(i) for i in inputs.selected if inputs.bvals[i] < options.b0_threshold],
        "tensor_elements": list(TENSOR_ELEMENTS),
        "units": "mm^2/s",
        "hr": _grid_record(dt_hr, mask_hr, hr_affine),
        "lr": _grid_record(dt_lr, mask_lr, lr_affine),
        "versions": _versions(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(out_subject_dir / RECORD_NAME, record)
    return record


# --- many subjects ----------------------------------------------------------------------------


def preprocess_hcp(
    hcp_root: str | os.PathLike,
    out: str | os.PathLike,
    subjects: list[str] | None = None,
    options: PreprocessingOptions = PreprocessingOptions(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Preprocess subjects of ``hcp_root`` (all when ``subjects`` is None) into ``out/<id>/``.

    A bad subject is recorded in ``RunSummary.failed`` and the others still run. Logs one line
    per subject; shows a tqdm progress bar over subjects when ``progress``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    subject_ids = list(subjects) if subjects else find_subjects(hcp_root)
    summary = RunSummary()
    if not subject_ids:
        raise InputError(f"HCP root {hcp_root} contains no subject folder.")
    jobs = [(sid, Path(hcp_root) / sid, Path(out) / sid, options, overwrite) for sid in subject_ids]
    bar = tqdm(total=len(jobs), unit="subject", disable=not progress, desc="preprocessing")
    with logging_redirect_tqdm():
        if workers <= 1:
            outcomes = (_run_one(*job) for job in jobs)
            for outcome in outcomes:
                _record_outcome(outcome, summary)
                bar.update()
        else:
            context = get_context("spawn")  # no inherited BLAS/threads state
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = [pool.submit(_run_one, *job) for job in jobs]
                for future in as_completed(futures):
                    _record_outcome(future.result(), summary)
                    bar.update()
    bar.close()
    return summary


def _run_one(subject_id, subject_dir, out_subject_dir, options, overwrite):
    """Worker: ("done"|"skipped"|"failed", subject id, detail). Never raises for bad input."""
    try:
        record = preprocess_subject(subject_dir, out_subject_dir, options, overwrite)
    except InputError as error:
        return "failed", subject_id, str(error)
    except Exception as error:  # a bug or a system error: still let the other subjects run
        logging.getLogger(__name__).exception("subject %s crashed", subject_id)
        return "failed", subject_id, f"unexpected {type(error).__name__}: {error}"
    if record is None:
        return "skipped", subject_id, f"{RECORD_NAME} exists (use --overwrite to redo)"
    detail = (
        f"HR {tuple(record['hr']['shape'])} {record['hr']['mask_voxels']} brain voxels, "
        f"LR {tuple(record['lr']['shape'])}, non-positive-definite HR/LR "
        f"{record['hr']['non_positive_definite']}/{record['lr']['non_positive_definite']}, "
        f"{record['seconds']:.1f} s"
    )
    return "done", subject_id, detail


def _record_outcome(outcome, summary: RunSummary) -> None:
    status, subject_id, detail = outcome
    if status == "done":
        summary.done.append(subject_id)
        log.info("%s: done (%s)", subject_id, detail)
    elif status == "skipped":
        summary.skipped.append(subject_id)
        log.info("%s: skipped, %s", subject_id, detail)
    else:
        summary.failed[subject_id] = detail
        log.error("%s: FAILED: %s", subject_id, detail)


def read_gradient_table(
    bvals_path: str | os.PathLike,
    bvecs_path: str | os.PathLike,
    data_path: str | os.PathLike,
    volumes: int,
    b0_threshold: float = B0_THRESHOLD,
    bmax: float = DEFAULT_BMAX,
) -> tuple[np.ndarray, np.ndarray]:
    """FSL bvals (N,) and bvecs (N, 3) checked for a DTI fit of ``data_path``'s N volumes.

    One sentence (InputError) for: counts differing from the volumes, bvecs of the wrong shape or
    not unit length (b0 rows aside), no b0 volume, fewer than 6 directions with b <= ``bmax``.
    """
    bvals_path, bvecs_path, data_name = Path(bvals_path), Path(bvecs_path), Path(data_path).name
    bvals = _read_numbers(bvals_path).ravel()
    if bvals.size != volumes:
        raise InputError(
            f"{bvals_path} has {bvals.size} b-values but {data_name} has {volumes} volumes."
        )
    bvecs = _read_bvecs(bvecs_path, volumes, data_name)
    is_b0 = bvals < b0_threshold
    lengths = np.linalg.norm(bvecs, axis=1)
    bad = np.flatnonzero(~is_b0 & (np.abs(lengths - 1) > UNIT_LENGTH_TOLERANCE))
    if bad.size:
        raise InputError(
            f"{bvecs_path} direction {bad[0]} has length {lengths[bad[0]]:.3g} "
            f"(b={bvals[bad[0]]:g}), "
            "but diffusion-weighted directions must be unit vectors."
        )
    if not is_b0.any():
        raise InputError(
            f"{bvals_path} has no b0 volume (b < {b0_threshold:g}); a tensor fit needs one."
        )
    in_shell = ~is_b0 & (bvals <= bmax)
    directions = _distinct_directions(bvecs[in_shell])
    if directions < 6:
        raise InputError(
            f"{bvals_path} has {directions} distinct directions with "
            f"{b0_threshold:g} <= b <= {bmax:g}, but a tensor fit needs at least 6."
        )
    return bvals, bvecs


# --- helpers ----------------------------------------------------------------------------------


def _read_numbers(path: Path) -> np.ndarray:
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise InputError(f"{path} is not a table of numbers ({error}).") from error
    if not np.isfinite(values).all():
        raise InputError(f"{path} contains NaN or inf values.")
    return values


def _read_bvecs(path: Path, volumes: int, data_name: str) -> np.ndarray:
    """FSL bvecs (3 rows x N columns; N rows x 3 columns also accepted) as (N, 3)."""
    table = _read_numbers(path)
    if table.shape[0] == 3 and table.shape[1] != 3:
        bvecs = table.T
    elif table.shape[1] == 3 and table.shape[0] != 3:
        bvecs = table
    elif table.shape == (3, 3):
        bvecs = table.T
    else:
        raise InputError(
            f"{path} has shape {table.shape}, but FSL bvecs need 3 rows (x, y, z) of one "
            "column per volume."
        )
    if bvecs.shape[0] != volumes:
        raise InputError(
            f"{path} has {bvecs.shape[0]} directions but {data_name} has {volumes} volumes."
        )
    return bvecs


def _distinct_directions(bvecs: np.ndarray) -> int:
    """Directions counted once whatever their sign (g and -g give the same DTI measurement)."""
    if len(bvecs) == 0:
        return 0
    unit = bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)
    leading = unit[np.arange(len(unit)), np.argmax(np.abs(unit) > 1e-6, axis=1)]
    canonical = unit * np.where(leading < 0, -1.0, 1.0)[:, None]
    return len(np.unique(np.round(canonical, 3), axis=0))


def _grid_record(tensors: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict:
    return {
        "shape": list(tensors.shape),
        "affine": np.asarray(affine).tolist(),
        "mask_voxels": int(np.count_nonzero(mask)),
        "non_positive_definite": count_non_positive_definite(tensors, mask),
    }


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("monai-iqt", "numpy", "scipy", "nibabel", "dipy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions
