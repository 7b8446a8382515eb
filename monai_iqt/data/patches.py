"""Training patches: LR 11^3 inputs paired with the HR 14^3 blocks the network predicts.

Each preprocessed subject (``dt_lr``, ``dt_hr``, ``mask_hr`` and ``preprocessing.json`` written
by ``python -m preprocessing hcp``) is read from disk once into a MONAI ``CacheDataset``; the
patch pairs are then cropped from those in-memory volumes, so nothing is re-read per epoch and
the cache holds only the two tensor volumes and the HR mask of each subject (float32/bool, about
101 MB for an HCP-size subject) instead of every overlapping patch (220 MB at 2250 patches).

Geometry: an LR patch of ``n`` voxels starting at LR index ``s`` gives, through the network's
valid convolutions, LR output voxels ``s + 2 .. s + n - 3``, i.e. the HR block of
``r * (n - 4)`` voxels starting at HR index ``r * (s + 2)`` (``preprocessing.geometry``:
LR voxel ``j`` covers HR voxels ``r j .. r j + r - 1``). A patch position is valid when the HR
block's centre voxel (offset ``r * (n - 4) // 2``) lies in ``mask_hr`` (the paper's rule).
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Transform

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.hcp import RECORD_NAME
from preprocessing.io import TENSOR_ELEMENTS, InputError, load_nifti, read_nifti

log = logging.getLogger(__name__)

VOLUME_NAMES = ("dt_lr.nii.gz", "dt_hr.nii.gz", "mask_hr.nii.gz")
#: Where the demo's preprocessed subjects come from (quoted when ``dataset_dir`` is missing).
MAKE_DEMO_DATA = (
    "python -m preprocessing synthetic --out demo/raw --subjects 6 --seed 0 && "
    "python -m preprocessing hcp --hcp-root demo/raw --out demo/preprocessed"
)


def hr_patch_size(lr_patch_size: int, upscale_factor: int) -> int:
    """HR target size of an LR patch: the network's valid output ``r * (n - 4)``."""
    return upscale_factor * (lr_patch_size - 2 * VALID_SHRINK)


def find_subjects(dataset_dir: str | Path, subjects: Sequence[str] | None = None) -> list[Path]:
    """Subject folders of ``dataset_dir`` holding a ``preprocessing.json`` (complete subjects)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise InputError(
            f"dataset_dir {dataset_dir} does not exist; make the demo's preprocessed subjects "
            f"with `{MAKE_DEMO_DATA}` (or pass --dataset_dir DIR)."
        )
    if subjects is not None:
        if isinstance(subjects, str):
            subjects = [subjects]
        folders = []
        for name in subjects:
            folder = dataset_dir / str(name)
            if not (folder / RECORD_NAME).is_file():
                raise InputError(
                    f"subject {name} is not a preprocessed subject of {dataset_dir} "
                    f"(no {folder / RECORD_NAME})."
                )
            folders.append(folder)
        return folders
    folders = sorted(p.parent for p in dataset_dir.glob(f"*/{RECORD_NAME}"))
    if not folders:
        raise InputError(
            f"dataset_dir {dataset_dir} has no preprocessed subjects (no <subject>/{RECORD_NAME}); "
            f"run `python -m preprocessing hcp --hcp-root RAW --out {dataset_dir}` first."
        )
    return folders


def inspect_subject(folder: Path) -> dict[str, Any]:
    """Check one subject from its NIfTI headers (no voxel data read), before anything is loaded.

    Returns ``{"subject", "folder", "channels", "upscale_factor", "lr_voxel_size_mm"}``.
    """
    for name in VOLUME_NAMES:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name} is missing (subject {folder.name}).")
    lr_image = load_nifti(folder / "dt_lr.nii.gz")
    hr_image = load_nifti(folder / "dt_hr.nii.gz")
    for name, image in (("dt_lr.nii.gz", lr_image), ("dt_hr.nii.gz", hr_image)):
        if len(image.shape) != 4:
            raise InputError(
                f"{folder / name} has shape {image.shape}; expected a 4D tensor volume (X,Y,Z,C)."
            )
    if lr_image.shape[3] != hr_image.shape[3]:
        raise InputError(
            f"{folder / 'dt_hr.nii.gz'} has {hr_image.shape[3]} channels but "
            f"{folder / 'dt_lr.nii.gz'} has {lr_image.shape[3]}."
        )
    factor = _upscale_factor(folder, lr_image.shape[:3], hr_image.shape[:3])
    mask_shape = load_nifti(folder / "mask_hr.nii.gz").shape
    if tuple(mask_shape) != tuple(hr_image.shape[:3]):
        raise InputError(
            f"{folder / 'mask_hr.nii.gz'} has shape {tuple(mask_shape)} but dt_hr.nii.gz has "
            f"spatial shape {tuple(hr_image.shape[:3])}."
        )
    zooms = np.linalg.norm(np.asarray(lr_image.affine)[:3, :3], axis=0)
    return {
        "subject": folder.name,
        "folder": str(folder),
        "channels": int(lr_image.shape[3]),
        "upscale_factor": factor,
        "lr_voxel_size_mm": [float(z) for z in zooms],
    }


class LoadSubject(Transform):
    """Read a subject checked by :func:`inspect_subject` into channel-first float32 arrays.

    Adds ``dt_lr`` (C, X, Y, Z), ``dt_hr`` (C, rX, rY, rZ) and ``mask_hr`` (rX, rY, rZ, bool).
    """

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        folder = Path(item["folder"])
        volumes = {}
        for key in ("dt_lr", "dt_hr"):
            data, _ = read_nifti(folder / f"{key}.nii.gz", np.float32)
            volumes[key] = np.ascontiguousarray(np.moveaxis(data, -1, 0))
        volumes["mask_hr"] = read_nifti(folder / "mask_hr.nii.gz")[0] > 0
        return {**item, **volumes}


def _check_finite(volume: dict[str, Any]) -> None:
    for key in ("dt_lr", "dt_hr"):
        if not np.isfinite(volume[key]).all():
            path = Path(volume["folder"]) / f"{key}.nii.gz"
            raise InputError(f"{path} contains NaN or infinite values.")


def _upscale_factor(folder: Path, lr_shape: tuple[int, ...], hr_shape: tuple[int, ...]) -> int:
    with open(folder / RECORD_NAME) as stream:
        record = json.load(stream)
    factor = record.get("factor")
    if factor is None:
        factor = hr_shape[0] // max(lr_shape[0], 1)
    if tuple(int(factor) * n for n in lr_shape) != tuple(hr_shape):
        raise InputError(
            f"{folder / 'dt_hr.nii.gz'} has spatial shape {tuple(hr_shape)}, which is not "
            f"{factor} x the shape {tuple(lr_shape)} of dt_lr.nii.gz."
        )
    return int(factor)


def valid_patch_starts(
    mask_hr: np.ndarray, lr_shape: Sequence[int], lr_patch_size: int, upscale_factor: int
) -> np.ndarray:
    """LR start indices (K, 3) of every patch whose HR target centre voxel lies in ``mask_hr``."""
    hr_size = hr_patch_size(lr_patch_size, upscale_factor)
    centres = [
        upscale_factor * (np.arange(size - lr_patch_size + 1) + VALID_SHRINK) + hr_size // 2
        for size in lr_shape
    ]
    if any(len(c) == 0 for c in centres):
        return np.zeros((0, 3), dtype=np.int64)
    valid = mask_hr[np.ix_(*centres)]
    return np.argwhere(valid)


@dataclass(frozen=True)
class PatchLocation:
    """One patch pair: subject index into the cache and LR start index."""

    subject: int
    start: tuple[int, int, int]


class ExtractPatchPair(Transform):
    """Crop an LR input patch and its HR target block from cached volumes, then normalise.

    Returns ``{"image": (C, n, n, n), "label": (C, m, m, m)}`` float32 tensors, the keys that
    MONAI's ``SupervisedTrainer`` reads; ``stats=None`` returns raw mm^2/s values.
    """

    def __init__(
        self,
        volumes: Sequence[dict[str, Any]],
        lr_patch_size: int,
        stats: NormalisationStats | None = None,
    ) -> None:
        self.volumes = volumes
        self.lr_patch_size = lr_patch_size
        self.stats = stats

    def crop(self, location: PatchLocation) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.volumes[location.subject]
        r = volume["upscale_factor"]
        n = self.lr_patch_size
        m = hr_patch_size(n, r)
        x, y, z = location.start
        hx, hy, hz = (r * (s + VALID_SHRINK) for s in location.start)
        lr = volume["dt_lr"][:, x : x + n, y : y + n, z : z + n]
        hr = volume["dt_hr"][:, hx : hx + m, hy : hy + m, hz : hz + m]
        return torch.from_numpy(np.array(lr)), torch.from_numpy(np.array(hr))

    def __call__(self, location: PatchLocation) -> dict[str, torch.Tensor]:
        image, label = self.crop(location)
        if self.stats is not None:
            image = self.stats.normalise_input(image[None])[0]
            label = self.stats.normalise_target(label[None])[0]
        return {"image": image, "label": label}


@dataclass
class PatchData:
    """Training and validation patch datasets of a set of subjects, with their statistics."""

    subjects: list[str]
    upscale_factor: int
    in_channels: int
    lr_patch_size: int
    lr_voxel_size_mm: list[float]
    stats: NormalisationStats
    train_dataset: Dataset
    val_dataset: Dataset
    patch_pairs: ExtractPatchPair
    cache_bytes: int

    @property
    def hr_patch_size(self) -> int:
        return hr_patch_size(self.lr_patch_size, self.upscale_factor)

    def model_extra(self) -> dict[str, Any]:
        """What inference must know about the training data (saved in ``normalisation.json``)."""
        return {
            "upscale_factor": self.upscale_factor,
            "lr_patch_size": self.lr_patch_size,
            "hr_patch_size": self.hr_patch_size,
            "lr_voxel_size_mm": self.lr_voxel_size_mm,
            "tensor_elements": list(TENSOR_ELEMENTS[: self.in_channels])
            if self.in_channels == len(TENSOR_ELEMENTS)
            else [f"channel{i}" for i in range(self.in_channels)],
            "in_channels": self.in_channels,
            "training_subjects": self.subjects,
            "train_patches": len(self.train_dataset),
            "validation_patches": len(self.val_dataset),
        }


def build_patch_data(
    dataset_dir: str | Path,
    subjects: Sequence[str] | None = None,
    patches_per_subject: int = 2250,
    lr_patch_size: int = 11,
    validation_fraction: float = 0.2,
    seed: int = 0,
    num_workers: int = 0,
) -> PatchData:
    """Sample ``patches_per_subject`` seeded patch pairs per subject, split them 80/20 and
    compute the normalisation statistics on the training patches.

    Patch positions of a subject depend only on ``seed`` and the subject id (not on which other
    subjects are used); each subject contributes ``1 - validation_fraction`` of its patches to
    training and the rest to validation.
    """
    if int(patches_per_subject) < 1:
        raise InputError(f"patches_per_subject must be >= 1, got {patches_per_subject}.")
    if int(lr_patch_size) < 2 * VALID_SHRINK + 1:
        raise InputError(f"lr_patch_size must be >= {2 * VALID_SHRINK + 1}, got {lr_patch_size}.")
    if not 0.0 < float(validation_fraction) < 1.0:
        raise InputError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    folders = find_subjects(dataset_dir, subjects)
    records = [inspect_subject(folder) for folder in folders]
    _check_consistent(records)
    try:
        cache = CacheDataset(
            records,
            transform=LoadSubject(),
            num_workers=max(1, int(num_workers)),
            progress=False,
            copy_cache=False,
        )
    except RuntimeError as error:  # MONAI wraps a transform's error: surface the input error
        cause = error
        while cause is not None and not isinstance(cause, InputError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None
    volumes = [cache[i] for i in range(len(cache))]
    for volume in volumes:
        _check_finite(volume)
    train, val = _sample_locations(
        volumes, int(patches_per_subject), int(lr_patch_size), float(validation_fraction), int(seed)
    )
    raw = ExtractPatchPair(volumes, int(lr_patch_size))
    stats = patch_statistics(raw, train)
    normalised = ExtractPatchPair(volumes, int(lr_patch_size), stats)
    cache_bytes = sum(v["dt_lr"].nbytes + v["dt_hr"].nbytes + v["mask_hr"].nbytes for v in volumes)
    log.info(
        "patch data: %d subjects, %d training and %d validation patches (LR %d^3 -> HR %d^3), "
        "%.1f MB of volumes cached",
        len(volumes),
        len(train),
        len(val),
        lr_patch_size,
        hr_patch_size(int(lr_patch_size), volumes[0]["upscale_factor"]),
        cache_bytes / 1e6,
    )
    return PatchData(
        subjects=[v["subject"] for v in volumes],
        upscale_factor=volumes[0]["upscale_factor"],
        in_channels=volumes[0]["dt_lr"].shape[0],
        lr_patch_size=int(lr_patch_size),
        lr_voxel_size_mm=volumes[0]["lr_voxel_size_mm"],
        stats=stats,
        train_dataset=Dataset(train, transform=normalised),
        val_dataset=Dataset(val, transform=normalised),
        patch_pairs=normalised,
        cache_bytes=cache_bytes,
    )


def _check_consistent(records: Sequence[dict[str, Any]]) -> None:
    first = records[0]
    for other in records[1:]:
        for what, key in (("channel counts", "channels"), ("upscale factors", "upscale_factor")):
            a, b = first[key], other[key]
            if a != b:
                raise InputError(
                    f"subjects {first['subject']} and {other['subject']} have different {what} "
                    f"({a} in {first['folder']}, {b} in {other['folder']}); train on subjects "
                    f"preprocessed alike."
                )
        if not np.allclose(first["lr_voxel_size_mm"], other["lr_voxel_size_mm"], rtol=0.01):
            log.warning(
                "subjects %s and %s have different LR voxel sizes (%s mm vs %s mm)",
                first["subject"],
                other["subject"],
                first["lr_voxel_size_mm"],
                other["lr_voxel_size_mm"],
            )


def _sample_locations(
    volumes: Sequence[dict[str, Any]],
    patches_per_subject: int,
    lr_patch_size: int,
    validation_fraction: float,
    seed: int,
) -> tuple[list[PatchLocation], list[PatchLocation]]:
    n_val = max(1, round(patches_per_subject * validation_fraction))
    if n_val >= patches_per_subject:
        raise InputError(
            f"patches_per_subject={patches_per_subject} is too few to split into training and "
            f"validation patches (validation_fraction={validation_fraction})."
        )
    train: list[PatchLocation] = []
    val: list[PatchLocation] = []
    for index, volume in enumerate(volumes):
        starts = valid_patch_starts(
            volume["mask_hr"], volume["dt_lr"].shape[1:], lr_patch_size, volume["upscale_factor"]
        )
        if len(starts) < patches_per_subject:
            raise InputError(
                f"subject {volume['subject']} ({volume['folder']}) has only {len(starts)} "
                f"{lr_patch_size}^3 patch positions whose HR centre lies in mask_hr.nii.gz, "
                f"fewer than patches_per_subject={patches_per_subject}."
            )
        rng = np.random.default_rng([seed, zlib.crc32(volume["subject"].encode())])
        chosen = starts[rng.choice(len(starts), size=patches_per_subject, replace=False)]
        locations = [PatchLocation(index, tuple(int(v) for v in s)) for s in chosen]
        train.extend(locations[n_val:])
        val.extend(locations[:n_val])
    return train, val


def patch_statistics(
    extract: ExtractPatchPair, locations: Sequence[PatchLocation], chunk: int = 256
) -> NormalisationStats:
    """Per-channel mean and (unbiased) std of raw input and target patches, two passes in float64
    over chunks, so the statistics never need every patch in memory at once."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for pass_ in ("mean", "var"):
        for begin in range(0, len(locations), chunk):
            pairs = [extract.crop(loc) for loc in locations[begin : begin + chunk]]
            for key, batch in (("input", [p[0] for p in pairs]), ("target", [p[1] for p in pairs])):
                values = torch.stack(batch).double().transpose(0, 1).flatten(1)
                if pass_ == "mean":
                    sums[key] = sums.get(key, 0) + values.sum(dim=1)
                    counts[key] = counts.get(key, 0) + values.shape[1]
                else:
                    mean = sums[key] / counts[key]
                    sums[key + "_sq"] = sums.get(key + "_sq", 0) + (
                        (values - mean[:, None]) ** 2
                    ).sum(dim=1)
    moments = {}
    for key in ("input", "target"):
        mean = sums[key] / counts[key]
        std = (sums[key + "_sq"] / max(counts[key] - 1, 1)).sqrt()
        std = std.clamp_min(torch.finfo(torch.float64).tiny)
        moments[key] = (mean.tolist(), std.tolist())
    return NormalisationStats(
        input_mean=moments["input"][0],
        input_std=moments["input"][1],
        target_mean=moments["target"][0],
        target_std=moments["target"][1],
    )
