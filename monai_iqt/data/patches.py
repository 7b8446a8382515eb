"""Training patches: LR 11^3 inputs paired with the HR 14^3 blocks the network predicts.

Each preprocessed subject (found by ``preprocessing.layout.find_subjects``, checked and read by
``monai_iqt.data.subjects``, the loader evaluation uses too) is read once into a MONAI
``CacheDataset``; the
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

import logging
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset
from monai.transforms import Transform

from monai_iqt import defaults
from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.data.subjects import SubjectHeader, inspect_subject, load_subject
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.errors import InputError, choice, input_error_cause
from preprocessing.geometry import hr_block
from preprocessing.io import TENSOR_ELEMENTS
from preprocessing.layout import check_subject_ids, find_subjects

log = logging.getLogger(__name__)

#: How targets are scaled for the loss: per tensor channel, or one scale for all six.
TARGET_SCALES = ("channel", "shared")
#: Which HR voxels of a target block the loss and validation score: all of them (outside the
#: brain as zero tensors, the paper's), or the brain voxels only (the others become NaN).
TARGET_REGIONS = ("patch", "brain")


def hr_patch_size(lr_patch_size: int, upscale_factor: int) -> int:
    """HR target size of an LR patch: the network's valid output ``r * (n - 4)``."""
    return upscale_factor * (lr_patch_size - 2 * VALID_SHRINK)


class LoadSubjectVolumes(Transform):
    """Read one subject (:func:`~monai_iqt.data.subjects.load_subject`) into what patches are
    cut from: ``dt_lr`` (C, X, Y, Z), ``dt_hr`` (C, rX, rY, rZ) float32 and ``mask_hr``."""

    def __call__(self, header: SubjectHeader) -> dict[str, Any]:
        subject = load_subject(header)
        return {
            "subject": header.name,
            "folder": str(header.folder),
            "upscale_factor": header.upscale_factor,
            "lr_voxel_size_mm": header.lr_voxel_size_mm,
            "dt_lr": np.ascontiguousarray(np.moveaxis(subject.dt_lr, -1, 0)),
            "dt_hr": np.ascontiguousarray(np.moveaxis(subject.dt_hr, -1, 0)),
            "mask_hr": subject.mask_hr,
        }


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
    MONAI's ``SupervisedTrainer`` reads; ``stats=None`` returns raw mm^2/s values. With
    ``target_region="brain"`` the label is NaN outside ``mask_hr``: no target there, so the losses
    and the validation metric, which skip NaN targets, score brain voxels only.
    """

    def __init__(
        self,
        volumes: Sequence[dict[str, Any]],
        lr_patch_size: int,
        stats: NormalisationStats | None = None,
        target_region: str = defaults.TARGET_REGION,
    ) -> None:
        self.volumes = volumes
        self.lr_patch_size = lr_patch_size
        self.stats = stats
        self.target_region = target_region

    def _hr_block(self, location: PatchLocation) -> tuple[slice, slice, slice]:
        """The HR target block of a patch: the HR block of its valid core, the LR cube of side
        ``n - 4`` at ``s + 2``."""
        r = self.volumes[location.subject]["upscale_factor"]
        core = [s + VALID_SHRINK for s in location.start]
        return hr_block(core, self.lr_patch_size - 2 * VALID_SHRINK, r)

    def crop(self, location: PatchLocation) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.volumes[location.subject]
        n = self.lr_patch_size
        x, y, z = location.start
        lr = volume["dt_lr"][:, x : x + n, y : y + n, z : z + n]
        hr = volume["dt_hr"][(slice(None), *self._hr_block(location))]
        return torch.from_numpy(np.array(lr)), torch.from_numpy(np.array(hr))

    def batches(
        self, locations: Sequence[PatchLocation], chunk: int = 256
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Raw (input, target) batches of ``chunk`` patches, e.g. for the statistics; with
        ``target_region`` "brain" the targets are NaN outside ``mask_hr``, as the labels."""
        for begin in range(0, len(locations), chunk):
            group = locations[begin : begin + chunk]
            pairs = [self.crop(location) for location in group]
            targets = torch.stack([p[1] for p in pairs])
            if self.target_region == "brain":
                brain = torch.stack([self.brain(location) for location in group])
                targets = targets.masked_fill(~brain[:, None], float("nan"))
            yield torch.stack([p[0] for p in pairs]), targets

    def brain(self, location: PatchLocation) -> torch.Tensor:
        """The HR target block's ``mask_hr`` (m, m, m) bool."""
        mask = self.volumes[location.subject]["mask_hr"][self._hr_block(location)]
        return torch.from_numpy(np.array(mask, dtype=bool))

    def __call__(self, location: PatchLocation) -> dict[str, torch.Tensor]:
        image, label = self.crop(location)
        if self.stats is not None:
            image = self.stats.normalise_input(image[None])[0]
            label = self.stats.normalise_target(label[None])[0]
        if self.target_region == "brain":
            label = label.masked_fill(~self.brain(location)[None], float("nan"))
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
    validation_subjects: list[str] = field(default_factory=list)

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
            "tensor_elements": list(TENSOR_ELEMENTS),
            "in_channels": self.in_channels,
            "training_subjects": self.subjects,
            "validation_subjects": self.validation_subjects,
            "train_patches": len(self.train_dataset),
            "validation_patches": len(self.val_dataset),
        }


def build_patch_data(
    dataset_dir: str | Path,
    subjects: Sequence[str] | None = None,
    patches_per_subject: int = defaults.PATCHES_PER_SUBJECT,
    lr_patch_size: int = defaults.LR_PATCH_SIZE,
    validation_fraction: float = defaults.VALIDATION_FRACTION,
    seed: int = defaults.SEED,
    num_workers: int = defaults.NUM_WORKERS,
    target_scale: str = defaults.TARGET_SCALE,
    target_region: str = defaults.TARGET_REGION,
    validation_subjects: Sequence[str] | None = None,
    cache_patches: bool = defaults.CACHE_PATCHES,
) -> PatchData:
    """Sample ``patches_per_subject`` seeded patch pairs per subject, split them 80/20 and
    compute the normalisation statistics on the training patches (targets scaled per channel,
    or by one scale shared over the six elements: ``target_scale`` "channel" or "shared").
    ``target_region`` "brain" leaves the target's non-brain voxels out of loss and validation
    (:class:`ExtractPatchPair`) and out of the target's statistics, so the normalised target
    is centred and scaled over the voxels the loss scores. The input's statistics stay those of
    whole patches, background included, either way: the network reads every input voxel, in
    training as at inference, whatever the loss scores.

    Patch positions of a subject depend only on ``seed`` and the subject id (not on which other
    subjects are used); each subject contributes ``1 - validation_fraction`` of its patches to
    training and the rest to validation. With ``validation_subjects`` the split is by subject
    instead: every patch of ``subjects`` trains, and each validation subject gives
    ``round(patches_per_subject * validation_fraction)`` patches (a fixed sample of positions
    whose HR centre is brain), so early stopping and restart selection see subjects the
    network never trained on.

    ``cache_patches`` crops and normalises every patch pair once, into memory (MONAI's
    ``CacheDataset``; about 98 KB per 11^3 pair), instead of at every epoch: the same pairs in
    the same order, so the same training, with the per-patch work out of the epochs.
    """
    if int(patches_per_subject) < 1:
        raise InputError(f"patches_per_subject must be >= 1, got {patches_per_subject}.")
    if int(lr_patch_size) < 2 * VALID_SHRINK + 1:
        raise InputError(f"lr_patch_size must be >= {2 * VALID_SHRINK + 1}, got {lr_patch_size}.")
    if not 0.0 < float(validation_fraction) < 1.0:
        raise InputError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    choice("target_scale", target_scale, TARGET_SCALES)
    choice("target_region", target_region, TARGET_REGIONS)
    held_out = [] if validation_subjects is None else check_subject_ids(validation_subjects)
    folders = find_subjects(dataset_dir, subjects)
    if subjects is None:  # every subject that is not a validation subject
        folders = [folder for folder in folders if folder.name not in held_out]
    headers = [inspect_subject(folder) for folder in folders]
    if held_out:
        overlap = [h.name for h in headers if h.name in held_out]
        if overlap:
            raise InputError(
                f"subject {overlap[0]} is both a training and a validation subject: validation "
                "subjects must be held out of training."
            )
        headers += [inspect_subject(folder) for folder in find_subjects(dataset_dir, held_out)]
    _check_consistent(headers)
    try:
        cache = CacheDataset(
            headers,
            transform=LoadSubjectVolumes(),
            num_workers=max(1, int(num_workers)),
            progress=False,
            copy_cache=False,
        )
    except RuntimeError as error:  # MONAI wraps a transform's error: surface the input error
        cause = input_error_cause(error)
        if cause is None:
            raise
        raise cause from None
    volumes = [cache[i] for i in range(len(cache))]
    n_train = len(volumes) - len(held_out)
    train, val = _sample_locations(
        volumes[:n_train],
        int(patches_per_subject),
        int(lr_patch_size),
        float(validation_fraction) if not held_out else 0.0,
        int(seed),
    )
    if held_out:
        n_val = max(1, round(int(patches_per_subject) * float(validation_fraction)))
        val, _ = _sample_locations(volumes, n_val, int(lr_patch_size), 0.0, int(seed), n_train)
    raw = ExtractPatchPair(volumes, int(lr_patch_size), target_region=target_region)
    stats = NormalisationStats.from_batches(lambda: raw.batches(train))
    if target_scale == "shared":
        stats = stats.with_shared_target_scale()
    normalised = ExtractPatchPair(volumes, int(lr_patch_size), stats, target_region)
    cache_bytes = sum(v["dt_lr"].nbytes + v["dt_hr"].nbytes + v["mask_hr"].nbytes for v in volumes)
    log.info(
        "patch data: %d training and %d validation subjects, %d training and %d validation "
        "patches (LR %d^3 -> HR %d^3), %.1f MB of volumes cached",
        n_train,
        len(held_out),
        len(train),
        len(val),
        lr_patch_size,
        hr_patch_size(int(lr_patch_size), volumes[0]["upscale_factor"]),
        cache_bytes / 1e6,
    )
    return PatchData(
        subjects=[v["subject"] for v in volumes[:n_train]],
        validation_subjects=[v["subject"] for v in volumes[n_train:]],
        upscale_factor=volumes[0]["upscale_factor"],
        in_channels=len(TENSOR_ELEMENTS),
        lr_patch_size=int(lr_patch_size),
        lr_voxel_size_mm=volumes[0]["lr_voxel_size_mm"],
        stats=stats,
        train_dataset=_dataset(train, normalised, cache_patches, num_workers),
        val_dataset=_dataset(val, normalised, cache_patches, num_workers),
        patch_pairs=normalised,
        cache_bytes=cache_bytes,
    )


def _dataset(
    locations: list[PatchLocation], pairs: ExtractPatchPair, cache: bool, num_workers: int
) -> Dataset:
    """Patch pairs cropped at every access, or once into memory (``cache``)."""
    if not cache:
        return Dataset(locations, transform=pairs)
    return CacheDataset(
        locations,
        transform=pairs,
        num_workers=max(1, int(num_workers)),
        progress=False,
        copy_cache=False,
    )


def _check_consistent(headers: Sequence[SubjectHeader]) -> None:
    first = headers[0]
    for other in headers[1:]:
        if other.upscale_factor != first.upscale_factor:
            raise InputError(
                f"subjects {first.name} and {other.name} have different upscale factors "
                f"({first.upscale_factor} in {first.folder}, {other.upscale_factor} in "
                f"{other.folder}); train on subjects preprocessed alike."
            )
        if not np.allclose(first.lr_voxel_size_mm, other.lr_voxel_size_mm, rtol=0.01):
            log.warning(
                "subjects %s and %s have different LR voxel sizes (%s mm vs %s mm)",
                first.name,
                other.name,
                first.lr_voxel_size_mm,
                other.lr_voxel_size_mm,
            )


def _sample_locations(
    volumes: Sequence[dict[str, Any]],
    patches_per_subject: int,
    lr_patch_size: int,
    validation_fraction: float,
    seed: int,
    first: int = 0,
) -> tuple[list[PatchLocation], list[PatchLocation]]:
    """Seeded patch positions of ``volumes[first:]``, split into (train, validation); a
    ``validation_fraction`` of 0 puts every patch in the first list."""
    n_val = max(1, round(patches_per_subject * validation_fraction)) if validation_fraction else 0
    if n_val >= patches_per_subject:
        raise InputError(
            f"patches_per_subject={patches_per_subject} is too few to split into training and "
            f"validation patches (validation_fraction={validation_fraction})."
        )
    train: list[PatchLocation] = []
    val: list[PatchLocation] = []
    for index, volume in enumerate(volumes):
        if index < first:
            continue
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
