"""Finding an HCP subject's inputs, checking them and reading the diffusion volumes used.

A subject is ``<hcp_root>/<id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz}``.
:func:`load_subject_inputs` checks everything that can be checked from headers, the gradient
table and the mask (and that the run fits in memory) before any diffusion volume is read, so a
bad subject is one sentence before work starts; :func:`read_selected_volumes` then reads only
the volumes with b <= bmax, one at a time.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.errors import InputError
from preprocessing.geometry import block_mean, crop_to_multiple, crop_volume, downsample_mask
from preprocessing.gradients import read_gradient_table
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.io import check_fits_in_memory, load_nifti, read_nifti, stack_volumes
from preprocessing.tensor_fit import CHUNK_VOXELS

DIFFUSION_SUBDIR = Path("T1w") / "Diffusion"
DATA_NAME, BVALS_NAME, BVECS_NAME, MASK_NAME = (
    "data.nii.gz",
    "bvals",
    "bvecs",
    "nodif_brain_mask.nii.gz",
)

#: Bytes of DIPY working memory per fitted voxel and volume and fitting thread (float64 signal,
#: weighted design matrix, its pinv and SVD factors), for the memory check before reading.
FIT_BYTES_PER_VOXEL_VOLUME = 8 * 24


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
    bvecs: np.ndarray  # in the image's voxel frame (preprocessing.gradients)
    selected: np.ndarray  # volume indices with b <= bmax (b0 included), increasing
    mask: np.ndarray  # bool, full (uncropped) shape


def find_hcp_subjects(hcp_root: str | os.PathLike) -> list[str]:
    """Subject ids under ``hcp_root``: its non-hidden sub-folders (and symlink loops, which then
    fail with a sentence saying so), sorted."""
    root = Path(hcp_root)
    _require(root, "HCP root {path} does not exist or is not a folder.", folder=True)
    return sorted(
        p.name
        for p in root.iterdir()
        if not p.name.startswith(".") and (p.is_dir() or _is_symlink_loop(p))
    )


def load_subject_inputs(
    subject_dir: str | os.PathLike,
    options: PreprocessingOptions = PreprocessingOptions(),
    fit_workers: int = 1,
) -> SubjectInputs:
    """Check one HCP subject folder and read its gradients and mask; raise InputError if bad.

    Reads only headers, the text files and the mask, so it is cheap; a header claiming more
    voxels than memory holds is refused here, before any volume is read. NaN/inf in the DWI are
    caught later, while the selected volumes are read.
    """
    subject_dir = Path(subject_dir)
    _require(
        subject_dir,
        f"Subject {subject_dir.name} not found: {{path}} does not exist.",
        folder=True,
    )
    folder = subject_dir / DIFFUSION_SUBDIR
    paths = [folder / name for name in (DATA_NAME, BVALS_NAME, BVECS_NAME, MASK_NAME)]
    for path in paths:
        _require(path, "{path} is missing.")
    data_path, bvals_path, bvecs_path, mask_path = paths

    data_image = load_nifti(data_path)
    shape = tuple(int(n) for n in data_image.shape)
    if len(shape) != 4:
        raise InputError(
            f"{data_path} is {len(shape)}D with shape {shape}, but a 4D diffusion series is needed."
        )
    volumes = shape[3]
    bvals, bvecs = read_gradient_table(
        bvals_path,
        bvecs_path,
        data_path,
        volumes,
        affine=data_image.affine,
        b0_threshold=options.b0_threshold,
        bmax=options.bmax,
    )
    selected = np.flatnonzero((bvals < options.b0_threshold) | (bvals <= options.bmax))
    _check_memory(data_image, data_path, selected.size, options.factor, fit_workers)

    mask_image = load_nifti(mask_path)
    if tuple(mask_image.shape) != shape[:3]:
        raise InputError(
            f"{mask_path} has shape {tuple(mask_image.shape)} but {data_path.name} has spatial "
            f"shape {shape[:3]}."
        )
    mask = read_nifti(mask_path)[0] > 0
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
        selected=selected,
        mask=mask,
    )


def _check_memory(image, path: Path, count: int, factor: int, fit_workers: int) -> None:
    """Refuse before reading when the HR and LR DWI, tensors, mask and fit would not fit."""
    voxels = float(np.prod(image.shape[:3], dtype=np.float64))
    lr_share = 1 + 1 / factor**3
    grids = voxels * lr_share * (6 * 4 + 1)  # float32 tensors and a bool mask, HR and LR
    fitting = fit_workers * CHUNK_VOXELS * count * FIT_BYTES_PER_VOXEL_VOLUME
    check_fits_in_memory(
        image,
        path,
        volumes=count,
        working_bytes=int(voxels * count * 4 / factor**3 + grids + fitting),
    )


def read_selected_volumes(inputs: SubjectInputs, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """HR (cropped) and LR (block-mean) DWI of the selected volumes, as (X, Y, Z, N) float32 views.

    Volumes are read one by one, in file order (``preprocessing.io.stack_volumes``), so a
    gzipped 288-volume series is decompressed once and never held whole in memory.
    """
    dwi_hr, dwi_lr = stack_volumes(
        inputs.data_path,
        inputs.selected,
        [lambda volume: crop_volume(volume, factor), lambda volume: block_mean(volume, factor)],
    )
    # Volume-major storage: each volume is one contiguous write; the fit sees a transpose.
    return dwi_hr.transpose(1, 2, 3, 0), dwi_lr.transpose(1, 2, 3, 0)


def _require(path: Path, missing: str, folder: bool = False) -> None:
    """One sentence when ``path`` is missing (``missing`` with {path}) or a symlink loop."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise InputError(f"{path} is a symlink loop.") from error
        raise InputError(missing.replace("{path}", str(path))) from error
    if folder and not path.is_dir():
        raise InputError(missing.replace("{path}", str(path)))
    if not folder and not path.is_file():
        raise InputError(missing.replace("{path}", str(path)))


def _is_symlink_loop(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False
