"""Whole-brain inference on tensor volumes in mm^2/s: a prediction, or its MC-dropout mean and std.

:class:`WholeBrainInferer` wraps a :class:`~monai_iqt.inferers.halo.HaloExactInferer`:
normalisation, edge padding, denormalisation and the brain mask. The exact pass extends the LR
volume beyond its field of view by the network's own halo of repeated edge voxels, so no brain
voxel's receptive field reaches a zero the reversible blocks add at the border of their input: a
brain cut by the field of view gives the prediction it would give on the same volume extended by
more repeated edge voxels. ``patches`` mode keeps the paper's padding of ``VALID_SHRINK`` voxels.
:func:`make_inferer` builds one from the shipped ``model.pt`` and ``normalisation.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from monai_iqt import defaults
from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.engine.dropout import dropout_layers, fixed_dropout_masks
from monai_iqt.inferers.halo import (
    HaloExactInferer,
    InferenceCounts,
    bundle_window,
    network_halo,
)
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.errors import InputError
from preprocessing.geometry import repeat_blocks


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
        roi_size: Sequence[int] | int = defaults.ROI_SIZE,
        sw_batch_size: int = defaults.SW_BATCH_SIZE,
        device: torch.device | str | None = None,
        inferer: HaloExactInferer | None = None,
        inference_mode: str = defaults.INFERENCE_MODE,
        mc_samples: int = defaults.MC_SAMPLES,
        seed: int = defaults.SEED,
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
        # in place, channel by channel: an HCP-size output is large, so no full-size copies
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


def make_inferer(
    model_path,
    normalisation_path,
    roi_size: Sequence[int] | int = defaults.ROI_SIZE,
    sw_batch_size: int = defaults.SW_BATCH_SIZE,
    device: torch.device | str | None = None,
    inference_mode: str = defaults.INFERENCE_MODE,
    mc_samples: int = defaults.MC_SAMPLES,
    seed: int = defaults.SEED,
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
