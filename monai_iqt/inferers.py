"""Whole-brain inference for valid-convolution networks: halo-exact windows or the paper's patches.

:class:`HaloExactInferer` is a MONAI :class:`~monai.inferers.Inferer`. In ``whole_volume`` mode
its output equals one pass of the network over the whole input: an output voxel of ESPCN-RN-N
depends on ``halo = 2 + 6 N`` input voxels on each side (the reversible blocks' 3^3
convolutions are zero-padded), so windows from MONAI's :class:`SlidingWindowSplitter` overlap by
exactly ``2 * halo`` voxels and each keeps only the outputs at least ``halo`` voxels from its
inner sides. Each window runs the network only on its brain's bounding box plus the halo, and
windows without brain are not computed. In ``patches`` mode it is the paper's patch regression:
11^3 input patches, each zero-padded inside exactly as in training, their 7^3 outputs stitched.

:class:`WholeBrainInferer` wraps it for tensor volumes in mm^2/s: normalisation, edge
padding, denormalisation and the brain mask. The exact pass extends the LR volume beyond its
field of view by the network's own halo of repeated edge voxels, so no brain voxel's receptive
field reaches a zero the reversible blocks add at the border of their input: a brain cut by the
field of view gives the prediction it would give on the same volume extended by more repeated
edge voxels. ``patches`` mode keeps the paper's padding of ``VALID_SHRINK`` voxels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SlidingWindowSplitter

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.engine.dropout import dropout_layers, fixed_dropout_masks
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.io import InputError

log = logging.getLogger(__name__)

#: Largest window side in LR voxels. 96^3 LR voxels hold an HCP brain at 2.5 mm (72 x 87 x 72)
#: in one window; the ESPCN's activations for it take about 0.35 GB per layer. Smaller windows
#: bound memory further (each window costs 2 * halo voxels of overlap per axis).
DEFAULT_ROI_SIZE = 96

#: Inference modes: one exact pass over the volume (in windows), or the paper's patch stitching.
INFERENCE_MODES = ("whole_volume", "patches")

#: LR patch side of the paper (and of training): 11^3 patches give 7^3 LR outputs.
PATCH_SIZE = 11

#: Patches per network call in ``patches`` mode.
PATCH_BATCH = 64


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def network_halo(network: torch.nn.Module) -> int:
    """Input voxels on each side an output voxel depends on (``network.halo``; 2 for the ESPCN)."""
    return int(getattr(network, "halo", VALID_SHRINK))


def repeat_blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    """Each voxel repeated ``factor`` times along the first three axes (nearest upsampling)."""
    for axis in range(3):
        volume = np.repeat(volume, factor, axis=axis)
    return volume


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
        roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
        sw_batch_size: int = 1,
        inference_mode: str = "whole_volume",
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


class WholeBrainInferer:
    """Turn an LR tensor volume (X, Y, Z, 6) in mm^2/s into the HR one (rX, rY, rZ, 6).

    The volume is padded by repeating its edge voxels (background stays background; a brain
    cut by the field of view continues as it left it): by the network's halo (2 + 6 N LR
    voxels) for the exact pass, so no brain voxel's output depends on the zero padding inside
    the reversible blocks, or by the valid shrink (2) for the paper's ``patches``. It is then
    normalised with the statistics saved beside the weights, run through ``inferer`` and
    denormalised; the output covers the original field of view and is zero outside the brain
    region.

    Args:
        network: trained ESPCN / ESPCN-RN-N (any module with ``halo`` and valid convolutions).
        stats: normalisation statistics saved with the weights.
        upscale_factor: r, as in training.
        roi_size, sw_batch_size, inference_mode: of the :class:`HaloExactInferer` made when
            ``inferer`` is not given.
        device: where the network runs (CUDA when present by default); the volume stays on CPU.
        inferer: a configured :class:`HaloExactInferer` (e.g. the bundle's ``inferer``).
        mc_samples: Monte Carlo dropout samples for :meth:`predict_with_std` (each a fixed set
            of dropout masks drawn from ``seed + k``, so windows stay exact); 1 = no dropout.
        seed: seed of the first sample's masks.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        stats: NormalisationStats,
        upscale_factor: int = 2,
        roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
        sw_batch_size: int = 1,
        device: torch.device | str | None = None,
        inferer: HaloExactInferer | None = None,
        inference_mode: str = "whole_volume",
        mc_samples: int = 1,
        seed: int = 0,
    ) -> None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise InputError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
        self.mc_samples = mc_samples
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else default_device()
        self.network = network.to(self.device).eval()
        self.stats = stats
        self.upscale_factor = int(upscale_factor)
        self.inferer = inferer or HaloExactInferer(
            roi_size, sw_batch_size, inference_mode=inference_mode
        )
        self.halo = network_halo(network)

    @property
    def last_counts(self) -> InferenceCounts:
        return self.inferer.last_counts

    def _dtype(self) -> torch.dtype:
        parameter = next(self.network.parameters(), None)
        return parameter.dtype if parameter is not None else torch.float32

    @property
    def pad(self) -> int:
        """LR voxels of repeated edge added on each side before the inferer runs: the network's
        halo for the exact pass, the valid shrink for the paper's patch stitching."""
        return VALID_SHRINK if self.inferer.inference_mode == "patches" else self.halo

    def _padded_input(self, dt_lr: np.ndarray, pad: int) -> torch.Tensor:
        """(1, 6, X+2p, Y+2p, Z+2p): normalised tensor, ``pad`` edge voxels repeated beyond the
        field of view (as the cubic B-spline baseline, ``mode="nearest"``)."""
        dt = torch.as_tensor(np.moveaxis(np.asarray(dt_lr), -1, 0)[None], dtype=self._dtype())
        padded = torch.nn.functional.pad(dt, (pad,) * 6, mode="replicate")
        return self.stats.normalise_input(padded)

    def _infer(self, padded: torch.Tensor, brain_lr: np.ndarray, pad: int) -> torch.Tensor:
        """The inferer's output over the original field of view (1, C, rX, rY, rZ)."""
        brain = torch.from_numpy(np.pad(brain_lr, pad))
        return self.inferer(padded, self.network, brain, margin=pad - VALID_SHRINK)

    def _whole_pass(self, padded: torch.Tensor) -> torch.Tensor:
        """One network pass over ``padded`` (edge padded by the halo), cropped to the field of
        view."""
        prediction = self.network(padded.to(self.device)).cpu()
        cut = self.upscale_factor * (self.halo - VALID_SHRINK)
        return prediction[(slice(None), slice(None)) + (slice(cut, -cut or None),) * 3]

    def _finish(self, prediction: torch.Tensor, brain_lr: np.ndarray) -> np.ndarray:
        """(1, C, rX, rY, rZ) normalised -> (rX, rY, rZ, 6) float32 mm^2/s, 0 outside the brain."""
        # in place, channel by channel: an HCP-size output is 0.7 GB, so no full-size copies
        hr = prediction[0, :6].float().cpu()
        brain_hr = torch.from_numpy(repeat_blocks(np.asarray(brain_lr, bool), self.upscale_factor))
        for c, (mean, std) in enumerate(
            zip(self.stats.target_mean, self.stats.target_std, strict=True)
        ):
            hr[c].mul_(std).add_(mean).mul_(brain_hr)
        return np.moveaxis(hr.numpy(), 0, -1)

    def __call__(self, dt_lr: np.ndarray, brain_lr: np.ndarray | None = None) -> np.ndarray:
        """HR prediction; zero outside the brain region ``brain_lr`` (LR grid).

        Without ``brain_lr`` every voxel with a non-zero tensor counts as brain.
        """
        brain_lr = _brain_or_nonzero(dt_lr, brain_lr)
        prediction = self._infer(self._padded_input(dt_lr, self.pad), brain_lr, self.pad)
        return self._finish(prediction, brain_lr)

    @torch.no_grad()
    def whole_volume(self, dt_lr: np.ndarray, brain_lr: np.ndarray | None = None) -> np.ndarray:
        """One pass of the network over the whole volume padded by the halo (the reference for
        the windows)."""
        brain_lr = _brain_or_nonzero(dt_lr, brain_lr)
        prediction = self._whole_pass(self._padded_input(dt_lr, self.halo))
        return self._finish(prediction, brain_lr)

    @property
    def gives_std(self) -> bool:
        """True when :meth:`predict_with_std` has an uncertainty to report."""
        return bool(getattr(self.network, "predict_variance", False)) or self.mc_samples > 1

    @torch.no_grad()
    def predict_with_std(
        self, dt_lr: np.ndarray, brain_lr: np.ndarray | None = None, whole_volume: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictive mean and standard deviation (rX, rY, rZ, 6) in mm^2/s.

        Over ``mc_samples`` dropout samples: the mean of the samples' means; the variance is
        the mean intrinsic variance (``exp(log_var) * target_std^2``, networks with
        ``predict_variance``) plus the variance of the samples' means (parameter uncertainty).
        The std is None when the network has neither. ``whole_volume`` runs one pass over the
        whole volume per sample instead of the inferer (the reference for the windows).
        """
        brain_lr = _brain_or_nonzero(dt_lr, brain_lr)
        pad = self.halo if whole_volume else self.pad
        padded = self._padded_input(dt_lr, pad)
        std_t = torch.tensor(self.stats.target_std, dtype=torch.float32).view(6, 1, 1, 1)
        mean_t = torch.tensor(self.stats.target_mean, dtype=torch.float32).view(6, 1, 1, 1)
        dropout = self.mc_samples > 1 and bool(dropout_layers(self.network))
        mean = m2 = intrinsic = None
        for k in range(self.mc_samples):
            with fixed_dropout_masks(self.network, self.seed + k) if dropout else nullcontext():
                if whole_volume:
                    prediction = self._whole_pass(padded)
                else:
                    prediction = self._infer(padded, brain_lr, pad)
            sample = prediction[0, :6].float() * std_t + mean_t
            if prediction.shape[1] == 12:
                variance = torch.exp(prediction[0, 6:].float()) * std_t**2
                intrinsic = variance if intrinsic is None else intrinsic.add_(variance)
            if mean is None:
                mean, m2 = sample, torch.zeros_like(sample)
            else:  # Welford: running mean and sum of squared deviations of the samples' means
                delta = sample - mean
                mean.add_(delta / (k + 1))
                m2.add_(delta * (sample - mean))
        brain_hr = torch.from_numpy(repeat_blocks(brain_lr, self.upscale_factor))
        mean.mul_(brain_hr)
        std = None
        if intrinsic is not None or self.mc_samples > 1:
            total = m2 / self.mc_samples
            if intrinsic is not None:
                total.add_(intrinsic / self.mc_samples)
            std = np.moveaxis(total.sqrt_().mul_(brain_hr).numpy(), 0, -1)
        return np.moveaxis(mean.numpy(), 0, -1), std


def _brain_or_nonzero(dt_lr: np.ndarray, brain_lr: np.ndarray | None) -> np.ndarray:
    if brain_lr is None:
        return np.any(np.asarray(dt_lr) != 0, axis=-1)
    return np.asarray(brain_lr, dtype=bool)


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


def make_inferer(
    model_path,
    normalisation_path,
    roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
    inference_mode: str = "whole_volume",
    mc_samples: int = 1,
    seed: int = 0,
) -> WholeBrainInferer:
    """The bundle's volume inferer: weights and statistics loaded as one unit (``weights``)."""
    from monai_iqt.weights import load_model

    network, stats = load_model(model_path, normalisation_path, device)
    roi_size = bundle_window(roi_size, network_halo(network))
    return WholeBrainInferer(
        network,
        stats,
        upscale_factor=int(stats.extra.get("upscale_factor", 2)),
        device=device,
        inferer=HaloExactInferer(roi_size, sw_batch_size, inference_mode=inference_mode),
        mc_samples=mc_samples,
        seed=seed,
    )
