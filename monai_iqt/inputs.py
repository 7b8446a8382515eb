"""What inference reads: an LR tensor image, a DWI to fit first, or a folder of subjects.

Every check here runs before the model is loaded or anything is written, and every problem is
one sentence naming the file (:class:`~preprocessing.errors.InputError`). Tensors come out as
(X, Y, Z, 6) float32 mm^2/s in DIPY's order (``preprocessing.io.TENSOR_ELEMENTS``) in the image's
voxel axes, whatever order and frame (``tensor_order``: dipy, fsl, mrtrix; see
``preprocessing.tensor_conventions``) the file used; a brain mask is taken from ``--mask``, found
beside the input as ``bvals``/``bvecs`` are, or (for a DWI) computed with DIPY's ``median_otsu``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from monai_iqt import defaults
from preprocessing import io, layout
from preprocessing.brain_mask import data_brain_mask
from preprocessing.errors import InputError
from preprocessing.geometry import voxel_sizes
from preprocessing.gradients import read_gradient_table
from preprocessing.io import load_nifti, read_nifti
from preprocessing.tensor_conventions import TENSOR_ORDERS, to_voxel_frame
from preprocessing.tensor_fit import B0_THRESHOLD, DEFAULT_BMAX, fit_dti

log = logging.getLogger(__name__)

#: Plausible median mean diffusivity of brain tissue in mm^2/s (about 0.7e-3 in white matter).
MD_RANGE_MM2_S = (1e-4, 1e-2)

#: Relative difference between input and training voxel sizes above which inference refuses.
VOXEL_SIZE_TOLERANCE = 0.1

#: What to do with an input whose voxels are not the trained LR voxels (``voxel_size_mismatch``).
VOXEL_SIZE_CHOICES = ("refuse", "resample", "allow")

#: scipy.ndimage spline order of the resampling (the cubic B-spline baseline's, ``metrics``).
RESAMPLE_SPLINE_ORDER = 3

#: Bytes per voxel per channel while a volume is processed (float32 plus working copies).
BYTES_PER_VALUE = 4


@dataclass
class InferenceInput:
    """One validated LR input: tensor volume (X, Y, Z, 6) in mm^2/s, its affine and brain mask."""

    name: str
    dt_lr: np.ndarray
    affine: np.ndarray
    mask_lr: np.ndarray | None
    source: Path
    mask_source: str = "none"
    resolution: dict | None = None


def stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    return path.name.removesuffix(".gz").removesuffix(".nii")


def inference_region(mask_lr: np.ndarray) -> np.ndarray:
    """LR voxels to predict: the LR mask grown by one voxel, so partial-brain blocks are covered."""
    cube = np.ones((3, 3, 3), dtype=bool)
    return ndimage.binary_dilation(np.asarray(mask_lr, dtype=bool), structure=cube)


def find_gradients(path: Path) -> tuple[Path | None, Path | None]:
    """FSL gradient files beside a DWI: ``bvals``/``bvecs`` (HCP) or ``<stem>.bval``/``.bvec``."""
    name = stem(path)
    found = []
    for names in (
        ("bvals", f"{name}.bval", f"{name}.bvals"),
        ("bvecs", f"{name}.bvec", f"{name}.bvecs"),
    ):
        found.append(next((path.parent / n for n in names if (path.parent / n).is_file()), None))
    return found[0], found[1]


def find_mask(path: Path) -> Path | None:
    """A brain mask beside the input, found as the gradient files are.

    ``mask_lr.nii.gz`` beside ``dt_lr.nii.gz`` (the preprocessed layout), ``<stem>_mask``,
    ``<stem>_brain_mask`` (.nii or .nii.gz), or FSL/HCP's ``nodif_brain_mask.nii.gz``.
    """
    name = stem(path)
    candidates = [layout.MASK_LR] if path.name == layout.DT_LR else []
    for base in (f"{name}_mask", f"{name}_brain_mask", "nodif_brain_mask"):
        candidates += [f"{base}.nii.gz", f"{base}.nii"]
    return next((path.parent / n for n in candidates if (path.parent / n).is_file()), None)


def check_fits_in_memory(image: nib.Nifti1Image, path: Path, channels: int) -> None:
    """One sentence before reading a header whose voxels would not fit in memory.

    Inference holds ``channels`` LR values per voxel, then the HR tensor (8 HR voxels of 6
    elements per LR voxel) with its maps and mask: about 100 more float32 values per LR voxel.
    """
    voxels = int(np.prod(image.shape[:3], dtype=np.float64))
    io.check_fits_in_memory(image, path, channels, working_bytes=voxels * 100 * BYTES_PER_VALUE)


def read_volumes(image: nib.Nifti1Image, path: Path, indices: np.ndarray) -> np.ndarray:
    """Volumes ``indices`` as (X, Y, Z, n) float32, streamed one at a time (preprocessing's
    reader: bounded memory; a truncated file or NaN is one sentence naming it)."""
    return io.read_volumes(image, [int(i) for i in indices], dtype=np.float32)


def load_mask(mask_path: Path, shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    """A 3D brain mask matching ``image_path``'s grid; one sentence naming the mask otherwise."""
    if not mask_path.is_file():
        raise InputError(f"{mask_path} does not exist (brain mask).")
    mask_image = load_nifti(mask_path)
    if mask_image.ndim != 3 or tuple(mask_image.shape[:3]) != tuple(shape):
        raise InputError(
            f"mask {mask_path} has shape {tuple(mask_image.shape)} but {image_path} has spatial "
            f"shape {tuple(shape)}."
        )
    mask = read_nifti(mask_path)[0] > 0  # a truncated mask: one sentence naming it
    if not mask.any():
        raise InputError(f"mask {mask_path} is empty.")
    return mask


def to_dipy_voxel_frame(
    dt: np.ndarray, tensor_order: str, affine: np.ndarray, path: Path
) -> np.ndarray:
    """A tensor file's elements (``tensor_order``: dipy, fsl, mrtrix) in DIPY order, voxel frame."""
    if tensor_order not in TENSOR_ORDERS:
        raise InputError(
            f"tensor_order {tensor_order!r} is not one of {', '.join(TENSOR_ORDERS)} (the element "
            f"order and frame of {path.name})."
        )
    return to_voxel_frame(dt, tensor_order, affine).astype(np.float32)


def check_units(dt: np.ndarray, brain: np.ndarray, path: Path) -> None:
    """Median mean diffusivity in the brain must look like mm^2/s; name the likely unit if not."""
    inside = dt[brain]
    if inside.size == 0:
        return
    md = float(np.median(inside[:, [0, 2, 5]].mean(axis=1)))
    low, high = MD_RANGE_MM2_S
    if low <= md <= high:
        return
    if 1e3 * low <= md <= 1e3 * high:
        likely = "um^2/ms (10^-3 mm^2/s, 1000x too large): divide by 1000"
    elif 1e-6 * low <= md <= 1e-6 * high:
        likely = "m^2/s (10^6 x too small): multiply by 1e6"
    elif 1e6 * low <= md <= 1e6 * high:
        likely = "um^2/s (10^6 x too large): divide by 1e6"
    elif md <= 0:
        likely = "not a diffusion tensor image, or the wrong --tensor_order"
    else:
        likely = "another unit or the wrong --tensor_order"
    raise InputError(
        f"{path} has a median mean diffusivity of {md:.3g} in the brain, outside "
        f"{low:g}-{high:g} mm^2/s: its unit is likely {likely}."
    )


def dwi_brain_mask(b0: np.ndarray, path: Path) -> np.ndarray:
    """Brain mask of a DWI from the mean b0 with DIPY's ``median_otsu`` (logged)."""
    mask = data_brain_mask(b0)  # the settings of preprocessing's --lr-mask lr-data
    log.info(
        "%s: no brain mask given or found beside it; DIPY median_otsu on the mean b0 gives %d "
        "brain voxels",
        path,
        int(mask.sum()),
    )
    if not mask.any():
        raise InputError(f"{path}: median_otsu found no brain in the mean b0; give --mask.")
    return mask


def load_input(
    path: str | os.PathLike,
    mask: str | os.PathLike | None = None,
    bvals: str | os.PathLike | None = None,
    bvecs: str | os.PathLike | None = None,
    name: str | None = None,
    bmax: float = DEFAULT_BMAX,
    tensor_order: str = defaults.TENSOR_ORDER,
) -> InferenceInput:
    """Validate and load an LR tensor NIfTI, or a DWI NIfTI whose tensor is fitted with DIPY.

    A 4D image with 6 volumes and no ``bvals``/``bvecs`` is a tensor image (elements in
    ``tensor_order``, mm^2/s); any other 4D image is a DWI and needs its FSL ``bvals`` and
    ``bvecs`` (given, or beside it); its tensor is fitted (DIPY WLS) on the volumes with
    b <= ``bmax`` (b0 and the b=1000 shell, as in preprocessing), inside the brain mask.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist (LR input).")
    image = load_nifti(path)
    name = name or stem(path)
    if image.ndim != 4:
        raise InputError(
            f"{path} has shape {tuple(image.shape)}: expected a 4D image (X, Y, Z, 6 tensor "
            "elements) or a 4D DWI."
        )
    mask_path = Path(mask) if mask is not None else find_mask(path)
    mask_lr = load_mask(mask_path, image.shape[:3], path) if mask_path is not None else None
    mask_source = "given" if mask is not None else (str(mask_path) if mask_path else "none")
    if mask is None and mask_path is not None:
        log.info("%s: using the brain mask found beside it, %s", path, mask_path)
    is_dwi = bvals is not None or bvecs is not None or image.shape[3] != 6
    if not is_dwi:
        check_fits_in_memory(image, path, 6)
        dt = read_volumes(image, path, np.arange(6))
        dt = to_dipy_voxel_frame(dt, tensor_order, image.affine, path)
        check_units(dt, mask_lr if mask_lr is not None else np.any(dt != 0, axis=-1), path)
        return InferenceInput(name, dt, image.affine, mask_lr, path, mask_source)
    found_bvals, found_bvecs = find_gradients(path)
    bvals_path = Path(bvals) if bvals is not None else found_bvals
    bvecs_path = Path(bvecs) if bvecs is not None else found_bvecs
    missing = " and ".join(
        what
        for what, p in (("bvals", bvals_path), ("bvecs", bvecs_path))
        if p is None or not p.is_file()
    )
    if missing:
        raise InputError(
            f"{path} has {image.shape[3]} volumes, so it is not a 6-element tensor image; as a DWI "
            f"it needs its {missing} (give --bvals/--bvecs; none found beside it)."
        )
    values, vectors = read_gradient_table(
        bvals_path, bvecs_path, path, image.shape[3], affine=image.affine, bmax=bmax
    )
    selected = np.flatnonzero(values <= bmax)  # b0 and the b=1000 shell, as in preprocessing
    check_fits_in_memory(image, path, selected.size)
    dwi = read_volumes(image, path, selected)
    if mask_lr is None:
        mask_lr = dwi_brain_mask(dwi[..., values[selected] < B0_THRESHOLD].mean(axis=-1), path)
        mask_source = "median_otsu"
    log.info("fitting DTI on the DWI input (%d volumes)", selected.size)
    tensor = fit_dti(dwi, values[selected], vectors[selected], mask=mask_lr)
    del dwi
    check_units(tensor, mask_lr, path)
    return InferenceInput(name, tensor, image.affine, mask_lr, path, mask_source)


def _mm(sizes) -> str:
    return "x".join(f"{v:.3g}" for v in sizes) + " mm"


def check_voxel_size(item: InferenceInput, trained, choice: str | None = None) -> InferenceInput:
    """Refuse, resample or allow an input whose voxels are not the trained LR voxels.

    More than :data:`VOXEL_SIZE_TOLERANCE` apart on any axis, or anisotropic (the model is
    isotropic): one sentence naming both sizes and the two ways forward, unless ``choice`` is
    ``resample`` (the tensor and mask resampled to the trained voxel size over the same field of
    view, as the cubic B-spline baseline interpolates) or ``allow`` (run as given). What was done
    is kept in ``item.resolution`` for the sidecars.
    """
    choice = "refuse" if choice is None or str(choice) in ("", "None") else str(choice)
    actual = voxel_sizes(item.affine)
    if trained is None:
        log.warning("the weights record no LR voxel size: %s is not checked", item.source)
        return item
    trained = np.broadcast_to(np.asarray(trained, dtype=float), (3,))
    off = bool(np.any(np.abs(actual - trained) > VOXEL_SIZE_TOLERANCE * trained))
    anisotropic = bool(actual.max() > (1 + VOXEL_SIZE_TOLERANCE) * actual.min())
    record = {
        "InputVoxelSizeMm": [round(float(v), 6) for v in actual],
        "TrainedLRVoxelSizeMm": [float(v) for v in trained],
    }
    if not (off or anisotropic):
        item.resolution = {**record, "VoxelSizeMismatch": "none"}
        return item
    if choice == "refuse":
        ways = (
            f"choose --voxel_size_mismatch resample (resample it to {_mm(trained)} with cubic "
            f"B-splines) or --voxel_size_mismatch allow (run it at {_mm(actual)}, a scale the "
            "model never saw)"
        )
        if anisotropic:
            raise InputError(
                f"{item.source} has anisotropic voxels of {_mm(actual)}, but the model is "
                f"isotropic (trained on LR voxels of {_mm(trained)}): {ways}."
            )
        raise InputError(
            f"{item.source} has voxels of {_mm(actual)} but the model was trained on LR voxels of "
            f"{_mm(trained)} (more than {VOXEL_SIZE_TOLERANCE:.0%} apart): {ways}."
        )
    if choice == "allow":
        log.warning(
            "%s: voxels of %s, trained on %s: run as given (--voxel_size_mismatch allow)",
            item.source,
            _mm(actual),
            _mm(trained),
        )
        item.resolution = {**record, "VoxelSizeMismatch": "allow"}
        return item
    return resample_to_voxel_size(item, trained, record)


def resample_to_voxel_size(
    item: InferenceInput, trained: np.ndarray, record: dict
) -> InferenceInput:
    """``item`` on a grid of (about) ``trained`` voxels over the same field of view.

    Each tensor element by cubic B-spline (``scipy.ndimage.zoom``, order 3, edge values
    repeated, ``grid_mode``: the outer voxel faces stay where they were), the mask by nearest
    neighbour. Resampling along the voxel axes keeps the tensors' frame.
    """
    actual = voxel_sizes(item.affine)
    shape = np.asarray(item.dt_lr.shape[:3])
    new_shape = np.maximum(1, np.round(shape * actual / trained)).astype(int)
    zoom = new_shape / shape

    def resample(volume: np.ndarray, order: int) -> np.ndarray:
        return ndimage.zoom(volume, zoom, order=order, mode="nearest", grid_mode=True)

    dt = np.stack(
        [resample(item.dt_lr[..., c].astype(np.float64), RESAMPLE_SPLINE_ORDER) for c in range(6)],
        axis=-1,
    ).astype(np.float32)
    scale = shape / new_shape  # old voxels per new voxel along each axis
    index_map = np.diag([*scale, 1.0])
    index_map[:3, 3] = 0.5 * scale - 0.5  # new voxel j's centre is old index (j + 0.5) s - 0.5
    affine = np.asarray(item.affine, dtype=np.float64) @ index_map
    support = item.mask_lr if item.mask_lr is not None else np.any(item.dt_lr != 0, axis=-1)
    support = resample(np.asarray(support, dtype=np.uint8), 0) > 0
    dt[~support] = 0  # no spline ringing beyond the brain (or the input's non-zero region)
    mask = None if item.mask_lr is None else support
    log.info(
        "%s: resampled from %s to %s voxels (%s to %s grid) with cubic B-splines "
        "(--voxel_size_mismatch resample)",
        item.source,
        _mm(actual),
        _mm(voxel_sizes(affine)),
        "x".join(map(str, shape)),
        "x".join(map(str, new_shape)),
    )
    item.resolution = {
        **record,
        "VoxelSizeMismatch": "resample",
        "ResampledVoxelSizeMm": [round(float(v), 6) for v in voxel_sizes(affine)],
        "ResampledShape": [int(n) for n in new_shape],
        "Interpolation": "cubic B-spline (scipy.ndimage.zoom order 3, grid_mode, edge repeated); "
        "mask by nearest neighbour",
    }
    item.dt_lr, item.affine, item.mask_lr = dt, affine, mask
    return item
