"""HCP subjects to paired LR/HR diffusion tensor volumes (one subject, or many in parallel).

Per subject: check every input (before anything is written), read only the volumes with
b <= bmax from ``data.nii.gz`` one at a time through nibabel's dataobj, crop to a multiple of
the factor, block-average the raw DWI, fit DTI (DIPY TensorModel, WLS) at both resolutions
inside the masks, write ``dt_hr, dt_lr, mask_hr, mask_lr`` atomically, then
``preprocessing.json`` last: a subject with that record is complete (``preprocessing.layout``).
Finding and checking a subject's inputs is ``preprocessing.hcp_inputs``; the options and the
check of the settings complete subjects recorded is ``preprocessing.hcp_settings``.

Tensors are expressed in the image's voxel axes: the FSL ``bvecs`` are converted to that frame
from the image's affine (``preprocessing.gradients``), so Dxy and Dxz have the signs of the
stored array's axes whether the data are stored LAS (HCP) or RAS.

Safety: a run checks its settings, its subject ids, ``--out`` (a probe write) and every complete
subject's recorded settings before any fit; a subject's output folder is locked
(``<out>/.<id>.lock``, fcntl) while it is made, so a second run on the same ``--out`` waits for
it and then skips the finished subject; temporaries carry their writer's pid and only those of
ended processes are cleared.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from preprocessing.brain_mask import data_brain_mask
from preprocessing.errors import InputError
from preprocessing.geometry import (
    crop_volume,
    downsample_mask,
    lr_affine_from_hr,
)
from preprocessing.gradients import read_gradient_table
from preprocessing.hcp_inputs import (
    DIFFUSION_SUBDIR,
    SubjectInputs,
    find_hcp_subjects,
    load_subject_inputs,
    read_selected_volumes,
)
from preprocessing.hcp_settings import (
    PreprocessingOptions,
    check_dataset_settings,
    check_recorded_settings,
)
from preprocessing.io import (
    TENSOR_ELEMENTS,
    check_writable_folder,
    describe_os_error,
    remove_stale_temporaries,
    save_nifti,
    write_json,
)
from preprocessing.layout import (
    DT_HR,
    DT_LR,
    MASK_HR,
    MASK_LR,
    OUTPUT_NAMES,
    RECORD_NAME,
    check_subject_ids,
    is_complete,
)
from preprocessing.tensor_fit import (
    count_non_positive_definite,
    default_fit_workers,
    fit_dti,
)

log = logging.getLogger(__name__)

# Names other modules take from here (the layout's names live in preprocessing.layout, the
# inputs' in preprocessing.hcp_inputs, the options' in preprocessing.hcp_settings).
__all__ = [
    "DIFFUSION_SUBDIR",
    "OUTPUT_NAMES",
    "RECORD_NAME",
    "PreprocessingOptions",
    "RunSummary",
    "find_hcp_subjects",
    "load_subject_inputs",
    "preprocess_hcp",
    "preprocess_subject",
    "read_gradient_table",
    "subject_lock",
]


@dataclass
class RunSummary:
    """Outcome of :func:`preprocess_hcp`: subject ids done, skipped, and failed (id -> message)."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


# --- one subject ------------------------------------------------------------------------------


def preprocess_subject(
    subject_dir: str | os.PathLike,
    out_subject_dir: str | os.PathLike,
    options: PreprocessingOptions = PreprocessingOptions(),
    overwrite: bool = False,
    fit_workers: int = 1,
) -> dict | None:
    """Preprocess one HCP subject folder into ``out_subject_dir``; returns the record written.

    Returns None (and touches nothing) when the subject is already complete with the same
    settings and not ``overwrite``; complete with other settings is an InputError. Raises
    InputError, before writing anything, when an input is bad; a failed write (a full disk) is
    one sentence too, and leaves no record. ``fit_workers`` threads fit the tensors.
    """
    started = time.perf_counter()
    options = options.checked()
    out_subject_dir = Path(out_subject_dir)
    if is_complete(out_subject_dir) and not overwrite:
        check_recorded_settings(out_subject_dir, options)
        return None
    inputs = load_subject_inputs(subject_dir, options, fit_workers)
    with subject_lock(out_subject_dir):
        if is_complete(out_subject_dir) and not overwrite:  # another run finished it meanwhile
            check_recorded_settings(out_subject_dir, options)
            return None
        return _make_subject(inputs, out_subject_dir, options, fit_workers, started)


def _make_subject(
    inputs: SubjectInputs,
    out_subject_dir: Path,
    options: PreprocessingOptions,
    fit_workers: int,
    started: float,
) -> dict:
    factor = options.factor
    dwi_hr, dwi_lr = read_selected_volumes(inputs, factor)
    bvals = inputs.bvals[inputs.selected]
    bvecs = inputs.bvecs[inputs.selected]
    mask_hr = crop_volume(inputs.mask, factor)
    if options.lr_mask == "lr-data":  # from the LR scan alone, as inference on a new scan
        is_b0 = inputs.bvals[inputs.selected] < options.b0_threshold
        mask_lr = data_brain_mask(dwi_lr[..., is_b0].mean(axis=-1))
        if not mask_lr.any():
            raise InputError(
                f"{inputs.data_path}: median_otsu finds no brain in the LR mean b0 "
                "(--lr-mask lr-data); use --lr-mask hr-blocks."
            )
    else:
        mask_lr = downsample_mask(inputs.mask, factor).astype(bool)

    fit = {"b0_threshold": options.b0_threshold, "fit_method": options.fit_method}
    dt_lr = fit_dti(dwi_lr, bvals, bvecs, mask_lr, workers=fit_workers, **fit)
    del dwi_lr
    dt_hr = fit_dti(dwi_hr, bvals, bvecs, mask_hr, workers=fit_workers, **fit)
    del dwi_hr

    hr_affine = np.asarray(inputs.affine, dtype=np.float64)
    lr_affine = lr_affine_from_hr(hr_affine, factor)
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
        "tensor_frame": "voxel axes of the image (FSL bvecs x negated for det(affine) > 0)",
        "shells_available": sorted({float(b) for b in rounded}),
        "shells_used": sorted({float(b) for b in rounded[inputs.selected]}),
        "volume_indices": inputs.selected.tolist(),
        "b0_indices": [int(i) for i in inputs.selected if inputs.bvals[i] < options.b0_threshold],
        "tensor_elements": list(TENSOR_ELEMENTS),
        "units": "mm^2/s",
        "hr": _grid_record(dt_hr, mask_hr, hr_affine),
        "lr": _grid_record(dt_lr, mask_lr, lr_affine),
        "versions": _versions(),
    }
    outputs = [
        (DT_HR, dt_hr, hr_affine, np.float32),
        (DT_LR, dt_lr, lr_affine, np.float32),
        (MASK_HR, mask_hr, hr_affine, np.uint8),
        (MASK_LR, mask_lr, lr_affine, np.uint8),
    ]
    # From here on files are replaced: drop the old record first, so a crash never leaves a
    # record next to a mix of old and new volumes; clear temporaries of ended runs.
    path = out_subject_dir
    try:
        out_subject_dir.mkdir(parents=True, exist_ok=True)
        (out_subject_dir / RECORD_NAME).unlink(missing_ok=True)
        remove_stale_temporaries(out_subject_dir)
        for name, data, affine, dtype in outputs:
            path = out_subject_dir / name
            save_nifti(path, data, affine, dtype)
        path = out_subject_dir / RECORD_NAME
        record["seconds"] = round(time.perf_counter() - started, 3)
        write_json(path, record)
    except OSError as error:
        raise InputError(
            f"{path} cannot be written ({describe_os_error(error)}); the subject is left "
            "incomplete (no record) and other subjects are untouched."
        ) from error
    return record


@contextmanager
def subject_lock(out_subject_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on a subject's output folder (``<out>/.<id>.lock``, fcntl.flock).

    A second process making the same subject waits here until the first has finished (then it
    finds the subject complete and skips it). The lock file is left in place: deleting it would
    let a waiting process lock a file no longer on disk.
    """
    out_subject_dir = Path(out_subject_dir)
    lock_path = out_subject_dir.parent / f".{out_subject_dir.name}.lock"
    try:
        out_subject_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise InputError(f"{lock_path} cannot be created ({describe_os_error(error)}).") from error
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(
                "%s: another process is making it; waiting for it (%s)",
                out_subject_dir.name,
                lock_path,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock_path
    finally:
        os.close(fd)  # releases the lock


# --- many subjects ----------------------------------------------------------------------------


def preprocess_hcp(
    hcp_root: str | os.PathLike,
    out: str | os.PathLike,
    subjects: list[str] | None = None,
    options: PreprocessingOptions = PreprocessingOptions(),
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    fit_workers: int | None = None,
) -> RunSummary:
    """Preprocess subjects of ``hcp_root`` (all when ``subjects`` is None) into ``out/<id>/``.

    Before any subject is read: the options, the subject ids (plain folder names, each once),
    the recorded settings of the complete subjects in ``out`` (one dataset, one setting) and a
    probe write in ``out`` are checked (InputError). Then a bad subject is recorded in
    ``RunSummary.failed`` and the others still run. ``workers`` subject processes run at once,
    each fitting with ``fit_workers`` threads (default: the cores shared among the workers, so
    that the cores are used once). Logs one line per subject; a tqdm bar when ``progress``.
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    options = options.checked()
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}.")
    if fit_workers is not None and fit_workers < 1:
        raise InputError(f"--fit-workers must be at least 1, got {fit_workers}.")
    subject_ids = check_subject_ids(subjects) if subjects else find_hcp_subjects(hcp_root)
    if not subject_ids:
        raise InputError(f"HCP root {hcp_root} contains no subject folder.")
    out = Path(out)
    if out.resolve() == Path(hcp_root).resolve():
        raise InputError(
            f"--out {out} is the HCP root itself; write the preprocessed dataset to another folder."
        )
    check_dataset_settings(out, subject_ids, options, overwrite)
    check_writable_folder(out, "--out")
    workers = min(workers, len(subject_ids))
    if fit_workers is None:
        fit_workers = default_fit_workers(workers)
    elif workers * fit_workers > default_fit_workers(1):
        log.warning(
            "%d subject processes x %d fit threads on %d cores: they will compete for the cores",
            workers,
            fit_workers,
            default_fit_workers(1),
        )
    summary = RunSummary()
    jobs = [
        (sid, Path(hcp_root) / sid, out / sid, options, overwrite, fit_workers)
        for sid in subject_ids
    ]
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


def _run_one(subject_id, subject_dir, out_subject_dir, options, overwrite, fit_workers):
    """Worker: ("done"|"skipped"|"failed", subject id, detail). Never raises for bad input."""
    try:
        record = preprocess_subject(subject_dir, out_subject_dir, options, overwrite, fit_workers)
    except InputError as error:
        return "failed", subject_id, str(error)
    except Exception as error:  # a bug or a system error: still let the other subjects run
        logging.getLogger(__name__).exception("subject %s crashed", subject_id)
        return "failed", subject_id, f"unexpected {type(error).__name__}: {error}"
    if record is None:
        return "skipped", subject_id, f"{RECORD_NAME} exists with these settings"
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


# --- helpers ----------------------------------------------------------------------------------


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
