"""What inference writes, and where it refuses to write.

Per subject: ``dt_hr.nii.gz`` (rX, rY, rZ, 6 float32 mm^2/s, zero outside the brain),
``mask_hr.nii.gz`` (the HR brain mask used), ``md``, ``fa``, ``colour_fa``; for models with an
uncertainty, ``dt_hr_std`` (6 channels), ``md_std`` and ``fa_std``; and, last,
``inference.json``, the record that says these files were written by this tool. Beside each image
a JSON sidecar (``dt_hr.json`` ...) says what it holds: for tensors the element order, frame and
units of the convention they are written in (``preprocessing.tensor_conventions``: the input's
unless ``output_tensor_order`` says otherwise); maps do not depend on the frame, and colour-FA is
drawn from the principal direction in the image's voxel axes.

Safety rules: an output folder that holds preprocessed subjects, or the input's own folder, is
refused; an existing file with an output's name is replaced only if the folder's record lists
it (a file this tool wrote in that role). All files are written to temporary names first and
renamed together at the end, then the record: an error while writing (a full disk) leaves the
folder as it was, with no temporary files.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from dipy.reconst.dti import from_lower_triangular, lower_triangular

from monai_iqt import defaults
from monai_iqt.maps import tensor_maps
from preprocessing import layout
from preprocessing.errors import InputError
from preprocessing.io import write_json
from preprocessing.tensor_conventions import TENSOR_ORDERS, from_voxel_frame, tensor_sidecar

log = logging.getLogger(__name__)

#: Files written per subject (role -> name); the record is written after them.
OUTPUT_NAMES = {
    "dt_hr": layout.DT_HR,
    "mask_hr": layout.MASK_HR,
    "md": "md.nii.gz",
    "fa": "fa.nii.gz",
    "colour_fa": "colour_fa.nii.gz",
    "dt_hr_std": "dt_hr_std.nii.gz",
    "md_std": "md_std.nii.gz",
    "fa_std": "fa_std.nii.gz",
}
RECORD_NAME = "inference.json"
#: The record's ``tool`` field: files listed in such a record may be replaced by a new run.
TOOL = "monai-iqt inference"

#: What each image holds, for its JSON sidecar (tensor sidecars add order, frame and units).
DESCRIPTIONS = {
    "dt_hr": "Super-resolved diffusion tensor (6 elements per voxel).",
    "mask_hr": "HR brain mask: the LR brain region (grown by one LR voxel) over each HR block.",
    "md": "Mean diffusivity of the super-resolved tensor.",
    "fa": "Fractional anisotropy of the super-resolved tensor.",
    "colour_fa": (
        "Colour FA: red, green, blue = FA x |first, second, third component| of the principal "
        "eigenvector in this image's voxel axes (i, j, k: the first, second, third array axis), "
        "whatever the tensor file's frame."
    ),
    "dt_hr_std": "Predictive standard deviation of each tensor element.",
    "md_std": "Standard deviation of MD over tensors drawn from the predictive distribution.",
    "fa_std": "Standard deviation of FA over tensors drawn from the predictive distribution.",
}
UNITS = {"md": "mm^2/s", "md_std": "mm^2/s", "fa": "1", "fa_std": "1", "colour_fa": "1"}


def sidecar_name(name: str) -> str:
    """The JSON sidecar's name of an image ``name`` (``dt_hr.nii.gz`` -> ``dt_hr.json``)."""
    return name.removesuffix(".gz").removesuffix(".nii") + ".json"


#: Smallest eigenvalue (mm^2/s) of a repaired tensor (brain MD is about 7e-4 mm^2/s).
EIGENVALUE_FLOOR = 1e-6

#: Voxels per chunk of the eigen-decompositions (bounds memory for HCP-size outputs).
CHUNK_VOXELS = 1_000_000


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output_dir(
    output_dir: str | os.PathLike,
    inputs: tuple[Path, ...] = (),
    names=OUTPUT_NAMES,
    record_name: str = RECORD_NAME,
) -> Path:
    """Refuse an output folder that would overwrite inputs or files this tool did not write
    there (``names``: the output names to check), then prove it writable without creating it."""
    output_dir = Path(output_dir)
    if layout.holds_preprocessed_data(output_dir):
        raise InputError(
            f"output folder {output_dir} holds preprocessed subjects ({layout.RECORD_NAME}): "
            "inference would overwrite their ground truth; choose another --output_dir."
        )
    for source in inputs:
        if _resolved(output_dir) == _resolved(source.parent):
            raise InputError(
                f"output folder {output_dir} is the folder of the input {source.name}: outputs "
                "there could replace the input or its siblings; choose another --output_dir."
            )
    foreign = foreign_outputs(output_dir, names, record_name)
    if foreign:
        raise InputError(
            f"{output_dir / foreign[0]} exists and was not written by {TOOL} (no "
            f"{record_name} there lists it); move it or choose another --output_dir."
        )
    return check_writable(output_dir)


def check_writable(output_dir: str | os.PathLike) -> Path:
    """Prove ``output_dir`` can be made and written, before any compute, without creating it.

    A probe file is written (and removed) in the nearest folder that already exists.
    """
    output_dir = Path(output_dir)
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output folder {output_dir} is not writable: {existing} is not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(
            f"output folder {output_dir} is not writable: {error.strerror or error}."
        ) from error
    return output_dir


def foreign_outputs(
    output_dir: Path, names=OUTPUT_NAMES, record_name: str = RECORD_NAME
) -> list[str]:
    """Output names that exist in ``output_dir`` but that no inference record there lists."""
    candidates = [n for name in names.values() for n in (name, sidecar_name(name))]
    present = [n for n in candidates if (output_dir / n).exists()]
    if not present:
        return []
    listed: set[str] = set()
    try:
        record = json.loads((output_dir / record_name).read_text())
        if isinstance(record, dict) and record.get("tool") == TOOL:
            listed = set(record.get("outputs", {}).values())
            listed |= set(record.get("sidecars", {}).values())
    except (OSError, ValueError):
        pass
    return [n for n in present if n not in listed]


def repair_tensors(dt: np.ndarray, brain: np.ndarray, repair: bool, name: str) -> np.ndarray:
    """Count (and with ``repair``, fix in place) non-positive-definite tensors in the brain.

    Repair clips eigenvalues to :data:`EIGENVALUE_FLOOR` and rebuilds the tensor.
    """
    coordinates = np.nonzero(brain)
    total = 0
    for start in range(0, coordinates[0].size, CHUNK_VOXELS):
        chunk = tuple(axis[start : start + CHUNK_VOXELS] for axis in coordinates)
        evals, evecs = np.linalg.eigh(from_lower_triangular(dt[chunk].astype(np.float64)))
        bad = np.any(evals <= 0, axis=1)
        total += int(bad.sum())
        if repair and bad.any():
            clipped = np.maximum(evals[bad], EIGENVALUE_FLOOR)
            matrices = np.einsum("vij,vj,vkj->vik", evecs[bad], clipped, evecs[bad])
            dt[tuple(axis[bad] for axis in chunk)] = lower_triangular(matrices).astype(dt.dtype)
    if total == 0:
        return dt
    if not repair:
        log.warning(
            "%s: %d of %d brain voxels have a non-positive-definite tensor (kept as predicted; "
            "--repair_tensors true clips their eigenvalues to %g mm^2/s)",
            name,
            total,
            int(brain.sum()),
            EIGENVALUE_FLOOR,
        )
        return dt
    log.info(
        "%s: repaired %d non-positive-definite tensors of %d brain voxels (eigenvalues >= %g)",
        name,
        total,
        int(brain.sum()),
        EIGENVALUE_FLOOR,
    )
    return dt


def slab_maps(dt: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`~monai_iqt.maps.tensor_maps` computed slab by slab along x (bounded memory)."""
    slab = max(1, CHUNK_VOXELS // max(1, int(np.prod(dt.shape[1:3]))))
    maps: dict[str, np.ndarray] = {}
    for start in range(0, dt.shape[0], slab):
        part = tensor_maps(dt[start : start + slab], mask[start : start + slab])
        for key, value in part.items():
            if key not in maps:
                maps[key] = np.zeros(dt.shape[:3] + value.shape[3:], np.float32)
            maps[key][start : start + slab] = value
    return maps


def sampled_map_std(
    dt: np.ndarray, dt_std: np.ndarray, mask: np.ndarray, samples: int = 32, seed: int = 0
) -> dict[str, np.ndarray]:
    """Standard deviation of MD and FA over tensors drawn from the predictive Gaussian.

    Each brain voxel's six elements are drawn independently from N(mean, std^2), ``samples``
    times; MD and FA (eigenvalues clipped at 0, as DIPY does) of each draw; their std.
    """
    generator = np.random.default_rng(seed)
    coordinates = np.nonzero(mask)
    md_std = np.zeros(dt.shape[:3], np.float32)
    fa_std = np.zeros(dt.shape[:3], np.float32)
    step = max(1, CHUNK_VOXELS // (4 * samples))
    for start in range(0, coordinates[0].size, step):
        chunk = tuple(axis[start : start + step] for axis in coordinates)
        mean, std = dt[chunk].astype(np.float64), dt_std[chunk].astype(np.float64)
        draws = mean + std * generator.standard_normal((samples, *mean.shape))
        evals = np.clip(np.linalg.eigvalsh(from_lower_triangular(draws)), 0, None)
        md = evals.mean(axis=-1)
        norm = np.sqrt((evals**2).sum(axis=-1))
        deviation = np.sqrt(((evals - md[..., None]) ** 2).sum(axis=-1))
        fa = np.sqrt(1.5) * np.divide(deviation, norm, out=np.zeros_like(norm), where=norm > 0)
        md_std[chunk] = md.std(axis=0)
        fa_std[chunk] = fa.std(axis=0)
    return {"md_std": md_std, "fa_std": fa_std}


def _nifti(data: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
    array = np.asarray(data).astype(dtype, copy=False)
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return image


def write_outputs(
    output_dir: Path,
    images: dict[str, nib.Nifti1Image],
    record: dict[str, Any],
    sidecars: dict[str, dict[str, Any]] | None = None,
    names: dict[str, str] = OUTPUT_NAMES,
    record_name: str = RECORD_NAME,
) -> dict[str, Path]:
    """Write every image to a temporary name, rename them all, then their JSON sidecars
    (``sidecars``, by role) and the record. ``names``: each role's file name.

    Any error while writing removes the temporaries and leaves earlier files as they were; an
    OSError (a full disk, a quota) is one sentence.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    temporaries: dict[str, Path] = {}
    try:
        for role, image in images.items():
            fd, name = tempfile.mkstemp(
                prefix=f".{names[role]}.", suffix=".tmp.nii.gz", dir=output_dir
            )
            os.close(fd)
            temporaries[role] = Path(name)
            nib.save(image, name)
            os.chmod(name, 0o644)
    except OSError as error:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise InputError(
            f"could not write the outputs to {output_dir} ({error.strerror or error}); nothing "
            "was replaced."
        ) from error
    except BaseException:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
        raise
    paths = {}
    for role, temporary in temporaries.items():
        paths[role] = output_dir / names[role]
        os.replace(temporary, paths[role])
    sidecars = sidecars or {}
    for role, sidecar in sidecars.items():
        write_json(output_dir / sidecar_name(names[role]), sidecar)
    for role, name in names.items():  # an earlier run's files this run does not write
        if role not in images and not foreign_outputs(output_dir, {role: name}, record_name):
            (output_dir / name).unlink(missing_ok=True)
            (output_dir / sidecar_name(name)).unlink(missing_ok=True)
    written = {role: names[role] for role in images}
    written_sidecars = {role: sidecar_name(names[role]) for role in sidecars}
    write_json(
        output_dir / record_name, {**record, "outputs": written, "sidecars": written_sidecars}
    )
    return paths


class PredictionWriter:
    """Write one subject's prediction: tensor, HR mask, maps and the record.

    Args:
        repair_tensors: clip the eigenvalues of non-positive-definite brain tensors.

    ``dt_hr`` (and ``dt_std``) come in DIPY order in the voxel frame; the tensor files are
    written in ``convention`` (dipy, fsl, mrtrix), said in their sidecars with ``sidecar``'s
    entries (the input, what was done to its resolution) added to every sidecar.
    """

    def __init__(self, repair_tensors: bool = defaults.REPAIR_TENSORS) -> None:
        self.repair_tensors = bool(repair_tensors)

    def __call__(
        self,
        output_dir: Path,
        dt_hr: np.ndarray,
        mask_hr: np.ndarray,
        hr_affine: np.ndarray,
        provenance: dict[str, Any],
        dt_std: np.ndarray | None = None,
        convention: str = "dipy",
        sidecar: dict[str, Any] | None = None,
        names: dict[str, str] = OUTPUT_NAMES,
        record_name: str = RECORD_NAME,
        order: tuple[str, ...] | None = None,
    ) -> dict[str, Path]:
        mask_hr = np.asarray(mask_hr, dtype=bool)
        dt_hr = np.asarray(dt_hr, dtype=np.float32)  # modified in place (no full-size copies)
        dt_hr[~mask_hr] = 0
        dt_hr = repair_tensors(dt_hr, mask_hr, self.repair_tensors, str(output_dir))
        maps = slab_maps(dt_hr, mask_hr)
        images = {
            "dt_hr": _nifti(
                from_voxel_frame(dt_hr, convention, hr_affine, order), hr_affine, np.float32
            ),
            "mask_hr": _nifti(mask_hr, hr_affine, np.uint8),
            **{key: _nifti(maps[key], hr_affine, np.float32) for key in ("md", "fa", "colour_fa")},
        }
        if dt_std is not None:
            dt_std = np.asarray(dt_std, dtype=np.float32)
            dt_std[~mask_hr] = 0
            # element standard deviations do not rotate: in the voxel frame, in the file's order
            std_order = order or TENSOR_ORDERS[convention]
            std_file = from_voxel_frame(dt_std, "dipy", hr_affine, std_order)
            images["dt_hr_std"] = _nifti(std_file, hr_affine, np.float32)
            for key, value in sampled_map_std(dt_hr, dt_std, mask_hr).items():
                images[key] = _nifti(value, hr_affine, np.float32)
        record = {
            "tool": TOOL,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "repair_tensors": self.repair_tensors,
            "output_tensor_order": convention,
            **provenance,
        }
        sidecars = image_sidecars(images, convention, sidecar or {}, order)
        return write_outputs(Path(output_dir), images, record, sidecars, names, record_name)


def image_sidecars(
    images: dict[str, Any],
    convention: str,
    common: dict[str, Any],
    order: tuple[str, ...] | None = None,
) -> dict[str, dict[str, Any]]:
    """The JSON sidecar of each image role: what it holds, its units, and ``common``."""
    sidecars = {}
    for role in images:
        sidecar: dict[str, Any] = {"Description": DESCRIPTIONS[role]}
        if role == "dt_hr":
            sidecar |= tensor_sidecar(convention, order)
        elif role == "dt_hr_std":  # per-element deviations, in the voxel frame (they do not rotate)
            sidecar |= tensor_sidecar("dipy", order or TENSOR_ORDERS[convention])
        elif role in UNITS:
            sidecar["Units"] = UNITS[role]
        sidecars[role] = {**sidecar, **common}
    return sidecars
