"""The 3D ESPCN of Tanno et al. (2017), the baseline IQT super-resolution network.

Conv 3^3 6->50, ReLU, Conv 1^3 50->100, ReLU, Conv 3^3 100->6 r^3, then a 3D pixel shuffle
(:func:`monai.networks.utils.pixelshuffle`). All convolutions are *valid* (no padding), so each
side of the LR grid shrinks by :data:`VALID_SHRINK` = 2 voxels: an 11^3 LR patch gives a 7^3
LR-grid output, i.e. 14^3 HR voxels for ``upscale_factor=2``.

Uncertainty (Tanno et al., MICCAI 2017 and NeuroImage 2021): ``predict_variance=True`` adds a
second sub-pixel head ``conv3_log_var`` (same shape as ``conv3``, on the same hidden features)
whose pixel-shuffled output is a per-voxel, per-element log-variance (intrinsic uncertainty,
trained with a Gaussian negative log-likelihood, :mod:`monai_iqt.losses`); ``dropout_rate > 0``
adds channel-wise 3D dropout after both hidden ReLUs (parameter uncertainty by Monte Carlo
dropout, :func:`monai_iqt.engine.dropout.fixed_dropout_masks`).
"""

from __future__ import annotations

import torch
from monai.networks.utils import pixelshuffle
from torch import nn

from monai_iqt.engine.dropout import ChannelDropout3d, check_dropout_rate
from monai_iqt.networks.initialisation import initialise

#: LR voxels lost on each side by the valid 3^3, 1^3, 3^3 convolutions (1 + 0 + 1).
VALID_SHRINK = 2

#: The log-variance head's soft bound: log_var = B tanh(raw / B) lies in (-B, B), so the
#: variance stays within [4.5e-5, 2.2e4] (normalised units) and exp(-log_var) in float32 range.
LOG_VAR_BOUND = 10.0

#: Channels of the two hidden ESPCN layers (Tanno et al. 2017).
HIDDEN_CHANNELS = (50, 100)


def describe_shape(x: torch.Tensor) -> str:
    """``x``'s shape as ``(1, 6, 11, 11, 11)``, in eager code and in TorchScript alike."""
    return "(" + ", ".join([str(side) for side in x.shape]) + ")"


def check_network_input(x: torch.Tensor, in_channels: int, min_size: int) -> None:
    """Raise a clear ``ValueError`` unless ``x`` is (B, in_channels, X, Y, Z), sides >= min_size."""
    if x.dim() != 5:
        raise ValueError(
            f"expected a 5D input (batch, channels, x, y, z), got shape {describe_shape(x)}"
        )
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got shape {describe_shape(x)}")
    if min(x.shape[2:]) < min_size:
        raise ValueError(
            f"every spatial side must be at least {min_size} LR voxels for the valid "
            f"convolutions, got shape {describe_shape(x)}"
        )


def bound_log_var(raw: torch.Tensor, bound: float = LOG_VAR_BOUND) -> torch.Tensor:
    """Soft clamp to (-B, B), B = ``bound`` (default :data:`LOG_VAR_BOUND`): B tanh(raw / B),
    the identity near 0 (slope 1) and smooth everywhere, unlike a hard clamp that stops
    gradients. (B is an argument because TorchScript cannot read module globals.)"""
    return bound * torch.tanh(raw / bound)


def split_mean_log_var(
    pred: torch.Tensor, channels: int = 6
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean, log_var) of a network output: channels [:C] and [C:] of a (B, 2C, ...) prediction,
    or (pred, None) for a (B, C, ...) one. The log-variance is in normalised target units."""
    if pred.dim() < 2 or pred.shape[1] not in (channels, 2 * channels):
        raise ValueError(
            f"expected a prediction with {channels} (mean) or {2 * channels} (mean and "
            f"log-variance) channels, got shape {tuple(pred.shape)}"
        )
    if pred.shape[1] == channels:
        return pred, None
    return pred[:, :channels], pred[:, channels:]


def check_upscale_factor(upscale_factor: int) -> None:
    if (
        not isinstance(upscale_factor, int)
        or isinstance(upscale_factor, bool)
        or upscale_factor < 1
    ):
        raise ValueError(f"upscale_factor must be an integer >= 1, got {upscale_factor!r}")


class ESPCN(nn.Module):
    """3D efficient sub-pixel CNN for IQT (Tanno et al., MICCAI 2017; Shi et al., CVPR 2016).

    Valid convolutions: an output LR-grid voxel depends on the input voxels within
    :attr:`halo` = 2 LR voxels on each side (a 5^3 receptive field), and the output LR grid
    is :attr:`valid_shrink` = 2 voxels smaller on each side than the input.

    Initialisation (``init``): "he" (default, as in the paper): every convolution weight
    He-normal, N(0, 2 / fan_in) with fan_in = input channels x kernel volume, biases zero;
    "icnr": the same, except that the sub-pixel convolution ``conv3`` gets ICNR (one He kernel
    repeated for the r^3 sub-pixel positions of each output channel); "default": PyTorch's.
    See :mod:`monai_iqt.networks.initialisation`.

    Output: (B, C, rX', rY', rZ') with C = ``in_channels``; with ``predict_variance`` (B, 2C,
    ...): channels [:C] the mean, [C:] the log-variance in normalised units, bounded by
    :func:`bound_log_var` to (-10, 10) for float32 stability (:func:`split_mean_log_var`).

    Args:
        in_channels: input channels (6 unique diffusion tensor elements).
        upscale_factor: r; the output has ``in_channels`` channels at r times the resolution.
        predict_variance: add the log-variance head ``conv3_log_var``.
        dropout_rate: channel-wise 3D dropout after both hidden ReLUs, in [0, 1); 0 adds no
            dropout layer. Dropout has no parameters: state dicts do not depend on it.
        init: "he", "icnr" (both heads) or "default".
        detach_variance: the log-variance head reads the last hidden features detached, so its
            loss trains that head alone and cannot pull the shared layers away from the mean's
            objective (the ``rmse_nll`` training). Outputs and state dicts do not depend on it.
    """

    valid_shrink: int = VALID_SHRINK
    # TorchScript compiles forward and what it calls; properties are for Python callers only.
    __jit_unused_properties__ = ["halo"]

    def __init__(
        self,
        in_channels: int = 6,
        upscale_factor: int = 2,
        predict_variance: bool = False,
        dropout_rate: float = 0.0,
        init: str = "he",
        detach_variance: bool = False,
    ) -> None:
        super().__init__()
        check_upscale_factor(upscale_factor)
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = in_channels
        # An instance attribute (TorchScript reads neither module globals nor class attributes).
        self.min_input_size = 2 * VALID_SHRINK + 1
        self.upscale_factor = upscale_factor
        self.predict_variance = bool(predict_variance)
        self.detach_variance = bool(detach_variance)
        self.dropout_rate = check_dropout_rate(dropout_rate)
        hidden1, hidden2 = HIDDEN_CHANNELS
        out_channels = in_channels * upscale_factor**3
        self.conv1 = nn.Conv3d(in_channels, hidden1, kernel_size=3)
        self.conv2 = nn.Conv3d(hidden1, hidden2, kernel_size=1)
        self.conv3 = nn.Conv3d(hidden2, out_channels, kernel_size=3)
        heads = [self.conv3]
        self.conv3_log_var: nn.Conv3d | None = None
        if self.predict_variance:
            self.conv3_log_var = nn.Conv3d(hidden2, out_channels, kernel_size=3)
            heads.append(self.conv3_log_var)
        self.dropout1 = self.dropout2 = None
        if self.dropout_rate > 0:
            self.dropout1 = ChannelDropout3d(hidden1, self.dropout_rate)
            self.dropout2 = ChannelDropout3d(hidden2, self.dropout_rate)
        initialise(self, init, heads, upscale_factor)

    @property
    def halo(self) -> int:
        """LR voxels on each side of an output voxel that it depends on (2 for the ESPCN)."""
        return VALID_SHRINK

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        """LR-grid channels (B, C r^3, X, Y, Z) -> HR voxels (B, C, rX, rY, rZ)."""
        return pixelshuffle(x, spatial_dims=3, scale_factor=self.upscale_factor)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The sub-pixel output from the last hidden features: the mean, or [mean, log_var]."""
        mean = self.shuffle(self.conv3(features))
        conv3_log_var = self.conv3_log_var  # None without predict_variance
        if conv3_log_var is None:
            return mean
        if self.detach_variance:
            features = features.detach()
        log_var = bound_log_var(self.shuffle(conv3_log_var(features)))
        return torch.cat((mean, log_var), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_network_input(x, self.in_channels, self.min_input_size)
        x = torch.relu(self.conv1(x))
        if self.dropout1 is not None:
            x = self.dropout1(x)
        x = torch.relu(self.conv2(x))
        if self.dropout2 is not None:
            x = self.dropout2(x)
        return self.head(x)
