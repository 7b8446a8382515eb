"""Halo-exact window inference for valid-convolution networks, or the paper's patch stitching.

:class:`HaloExactInferer` is a MONAI :class:`~monai.inferers.Inferer`. In ``whole_volume`` mode
its output equals one pass of the network over the whole input: an output voxel of ESPCN-RN-N
depends on ``halo = 2 + 6 N`` input voxels on each side (the reversible blocks' 3^3
convolutions are zero-padded), so windows from MONAI's :class:`SlidingWindowSplitter` overlap by
exactly ``2 * halo`` voxels and each keeps only the outputs at least ``halo`` voxels from its
inner sides. Each window runs the network only on its brain's bounding box plus the halo, and
windows without brain are not computed. In ``patches`` mode it is the paper's patch regression:
11^3 input patches, each zero-padded inside exactly as in training, their 7^3 outputs stitched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowSplitter

from monai_iqt import defaults
from monai_iqt.networks.espcn import VALID_SHRINK

#: The package's name, as each log line shows it (``logging.conf``: ``%(name)s``).
log = logging.getLogger("monai_iqt.inferers")

#: Inference modes: one exact pass over the volume (in windows), or the paper's patch stitching.
INFERENCE_MODES = ("whole_volume", "patches")

#: LR patch side of the paper (and of training): 11^3 patches give 7^3 LR outputs.
PATCH_SIZE = 11

#: Patches per network call in ``patches`` mode.
PATCH_BATCH = 64


def network_halo(network: torch.nn.Module) -> int:
    """Input voxels on each side an output voxel depends on (``network.halo``; 2 for the ESPCN)."""
    return int(getattr(network, "halo", VALID_SHRINK))


def plan_windows(
    padded_shape: Sequence[int], max_window: Sequence[int] | int, halo: int
) -> tuple[int, ...]:
    """Window size per axis: at most ``max_window`` (the whole axis if it fits, or if <= 0),
    shrunk so that windows overlapping by ``2 * halo`` share the axis evenly."""
    if isinstance(max_window, int):
        max_window = (max_window,) * 3
    roi = []
    for size, limit in zip(padded_shape, max_window, strict=True):
        if limit <= 0 or size <= limit:
            roi.append(int(size))
            continue
        if limit <= 2 * halo:
            raise ValueError(
                f"windows of {limit} LR voxels leave no exact output for a network whose output "
                f"depends on {halo} voxels each side; use windows larger than {2 * halo}"
            )
        count = math.ceil((size - 2 * halo) / (limit - 2 * halo))
        roi.append(math.ceil((size - 2 * halo) / count) + 2 * halo)
    return tuple(roi)


@dataclass
class InferenceCounts:
    """What the last call computed (for logs, tests and the benchmark)."""

    windows_computed: int = 0
    windows_skipped: int = 0
    voxels_computed: int = 0
    crops: list[tuple[slice, ...]] = field(default_factory=list)


class HaloExactInferer(Inferer):
    """MONAI inferer for networks with valid outer convolutions (output = input - 4 per axis, x r).

    ``inputs`` (1, C, X, Y, Z) is the network input, already normalised and padded as the caller
    wants; the result (1, C_out, r(X-4-2m), r(Y-4-2m), r(Z-4-2m)) equals ``network(inputs)``
    at every output voxel whose input voxel lies in ``brain`` (1, 1, X, Y, Z) (all voxels
    without it), without the outputs of the ``margin`` = m input voxels on each side beyond
    the valid shrink (the caller's extra padding); output voxels far from the brain are zero.

    Args:
        roi_size: largest window in input voxels (int or 3 ints; <= 0 means the whole axis).
        sw_batch_size: windows handed over at once; crops of equal shape share a network call.
        inference_mode: ``whole_volume`` (exact windows) or ``patches`` (the paper's 11^3
            patch stitching; equal to ``whole_volume`` for the ESPCN, not for ESPCN-RN-N).
        patch_size: input patch side in ``patches`` mode (11, as in training).
        sw_device: where the network runs (default: the device of its parameters).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int = defaults.ROI_SIZE,
        sw_batch_size: int = defaults.SW_BATCH_SIZE,
        inference_mode: str = defaults.INFERENCE_MODE,
        patch_size: int = PATCH_SIZE,
        sw_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if inference_mode not in INFERENCE_MODES:
            raise ValueError(
                f"inference_mode {inference_mode!r} is not one of {', '.join(INFERENCE_MODES)}"
            )
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.inference_mode = inference_mode
        self.patch_size = int(patch_size)
        self.sw_device = torch.device(sw_device) if sw_device is not None else None
        self.last_counts = InferenceCounts()
        self._offset = VALID_SHRINK

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        brain: torch.Tensor | None = None,
        *args: Any,
        margin: int = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        if inputs.ndim != 5 or inputs.shape[0] != 1:
            raise ValueError(f"expected inputs of shape (1, C, X, Y, Z), got {tuple(inputs.shape)}")
        margin = int(margin)
        if margin < 0 or min(inputs.shape[2:]) <= 2 * (VALID_SHRINK + margin):
            raise ValueError(
                f"margin {margin} leaves no output of inputs of shape {tuple(inputs.shape)}"
            )
        # input index of the first output voxel kept
        self._offset = VALID_SHRINK + margin
        if brain is None:
            brain = torch.ones((1, 1, *inputs.shape[2:]), dtype=torch.bool)
        brain = brain.reshape(inputs.shape[2:]).to(device="cpu", dtype=torch.bool)
        device = self.sw_device or _parameter_device(network)
        self.last_counts = InferenceCounts()
        if self.inference_mode == "patches":
            jobs = self._patch_jobs(tuple(inputs.shape[2:]), brain)
            batch = max(self.sw_batch_size, PATCH_BATCH)
        else:
            jobs = self._window_jobs(inputs, brain, network_halo(network))
            batch = self.sw_batch_size
        out: torch.Tensor | None = None
        for group in _batches(jobs, batch):
            out = self._run(group, inputs, network, device, out)
        if out is None:  # no brain at all: zeros of the right shape
            out = self._empty_output(inputs, network, device)
        log.debug("%s", self.last_counts)
        return out

    # -- job planning: (crop of the input, exact region of the output in input coordinates)

    def _window_jobs(
        self, inputs: torch.Tensor, brain: torch.Tensor, halo: int
    ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
        shape = tuple(inputs.shape[2:])
        roi = plan_windows(shape, self.roi_size, halo)
        overlap = tuple(0 if w == s else 2 * halo for w, s in zip(roi, shape, strict=True))
        splitter = SlidingWindowSplitter(roi, overlap=overlap, pad_mode="constant")
        # the brain indicator alone is split; the network input is cropped from ``inputs``
        for _, location in splitter(brain[None, None].to(torch.uint8)):
            exact = []
            for start, window, size in zip(location, roi, shape, strict=True):
                stop = min(start + window, size)
                low = self._offset if start == 0 else max(start + halo, self._offset)
                high = (
                    size - self._offset if stop == size else min(stop - halo, size - self._offset)
                )
                exact.append((low, high))
            crop = _brain_crop(brain, exact, halo, shape)
            if crop is None:
                self.last_counts.windows_skipped += 1
                continue
            yield (
                crop,
                tuple(
                    slice(max(lo, c.start + VALID_SHRINK), min(hi, c.stop - VALID_SHRINK))
                    for (lo, hi), c in zip(exact, crop, strict=True)
                ),
            )

    def _patch_jobs(
        self, shape: tuple[int, ...], brain: torch.Tensor
    ) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
        size, core = self.patch_size, self.patch_size - 2 * VALID_SHRINK
        starts = []
        for n in shape:
            if n <= size:
                starts.append([0])
            else:  # stride of the output core; the last patch ends at the volume's end
                starts.append(sorted({min(k * core, n - size) for k in range(-(-(n - 4) // core))}))
        for corner in np.ndindex(*(len(s) for s in starts)):
            crop = tuple(
                slice(starts[a][i], min(starts[a][i] + size, shape[a]))
                for a, i in enumerate(corner)
            )
            exact = tuple(
                slice(
                    max(c.start + VALID_SHRINK, self._offset),
                    min(c.stop - VALID_SHRINK, n - self._offset),
                )
                for c, n in zip(crop, shape, strict=True)
            )
            if any(e.start >= e.stop for e in exact) or not bool(brain[exact].any()):
                self.last_counts.windows_skipped += 1
                continue
            yield crop, exact

    # -- running

    def _run(self, group, inputs, network, device, out):
        by_shape: dict[tuple[int, ...], list] = {}
        for crop, exact in group:
            by_shape.setdefault(tuple(c.stop - c.start for c in crop), []).append((crop, exact))
        for crop_shape, members in by_shape.items():
            batch = torch.cat([inputs[(slice(None), slice(None), *c)] for c, _ in members])
            prediction = network(batch.to(device)).to("cpu")
            r = prediction.shape[2] // (crop_shape[0] - 2 * VALID_SHRINK)
            if out is None:
                out_shape = [r * (s - 2 * self._offset) for s in inputs.shape[2:]]
                out = prediction.new_zeros((1, prediction.shape[1], *out_shape))
            self.last_counts.windows_computed += len(members)
            self.last_counts.voxels_computed += len(members) * math.prod(crop_shape)
            for index, (crop, exact) in enumerate(members):
                self.last_counts.crops.append(crop)
                target = tuple(
                    slice(r * (e.start - self._offset), r * (e.stop - self._offset)) for e in exact
                )
                source = tuple(
                    slice(
                        r * (e.start - c.start - VALID_SHRINK),
                        r * (e.stop - c.start - VALID_SHRINK),
                    )
                    for e, c in zip(exact, crop, strict=True)
                )
                out[(0, slice(None), *target)] = prediction[(index, slice(None), *source)]
        return out

    def _empty_output(self, inputs, network, device) -> torch.Tensor:
        probe = network(inputs[(slice(None), slice(None)) + (slice(0, 5),) * 3].to(device))
        r = probe.shape[2]
        shape = [r * (s - 2 * self._offset) for s in inputs.shape[2:]]
        return probe.new_zeros((1, probe.shape[1], *shape)).cpu()


def _parameter_device(network: torch.nn.Module) -> torch.device:
    parameter = next(network.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _batches(items: Iterator, size: int) -> Iterator[list]:
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _brain_crop(
    brain: torch.Tensor, exact: list[tuple[int, int]], halo: int, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """Input crop to run: the brain's bounding box inside ``exact`` plus the halo (or None)."""
    if any(low >= high for low, high in exact):
        return None
    inside = brain[tuple(slice(low, high) for low, high in exact)]
    profiles = [inside.any(dim=d).any(dim=e) for d, e in ((2, 1), (2, 0), (1, 0))]
    if not bool(profiles[0].any()):
        return None
    crop = []
    for (low, _), profile, size in zip(exact, profiles, shape, strict=True):
        occupied = torch.nonzero(profile)[:, 0]
        first, last = low + int(occupied[0]), low + int(occupied[-1]) + 1
        crop.append(slice(max(0, first - halo), min(size, last + halo)))
    return tuple(crop)


def bundle_window(roi_size: Sequence[int] | int, halo: int) -> tuple[int, ...]:
    """Windows of at least ``4 * halo`` LR voxels, so at least half of each axis is kept.

    ESPCN-RN-N discards ``2 + 6 N`` voxels on each inner side of a window (N = 4: 26), so a
    small window would be mostly halo; the bundle then enlarges the window (one whole-volume
    window for an HCP-size ESPCN-RN4 input) and says so.
    """
    sizes = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(s) for s in roi_size)
    enlarged = tuple(s if s <= 0 else max(s, 4 * halo) for s in sizes)
    if enlarged != sizes:
        log.info(
            "windows enlarged from %s to %s LR voxels (network halo %d)", sizes, enlarged, halo
        )
    return enlarged
