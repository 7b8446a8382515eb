"""Training losses and the NaN-target masking they share: RMSE (the paper's) and the Gaussian
negative log-likelihood of a network that also predicts a per-voxel log-variance (Tanno et al.
2017, heteroscedastic intrinsic uncertainty).

``gaussian_nll`` trains mean and log-variance together; its residuals are weighted by
``exp(-log_var)``, so the mean fits least where the error is largest (the brain's edge), which
costs total RMSE. ``rmse_nll`` keeps the mean on the paper's RMSE and trains the log-variance by
the likelihood of the detached mean's residual; the bundle trains it with the network's
``detach_variance``, so the likelihood trains the log-variance head alone and the shared layers
follow the mean's RMSE only (what sharing them costs is measured in the bundle's
``docs/uncertainty.md``).

Predictions are (B, C, ...) means or (B, 2C, ...) [mean, log_var] (see
:func:`monai_iqt.networks.split_mean_log_var`); targets are (B, C, ...), in normalised units,
NaN where there is no target (``target_region="brain"``): every loss averages over the others.
This module imports nothing from :mod:`monai_iqt.training`, which uses it (settings, metrics).
"""

from __future__ import annotations

import torch
from torch import nn

from monai_iqt.networks.espcn import split_mean_log_var

LOSSES = ("rmse", "gaussian_nll", "rmse_nll")


def scored(prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of ``prediction`` and ``target`` that have a target: NaN targets mark voxels
    left out (``target_region="brain"``), so every loss and metric skips them."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape"
        )
    has_target = ~torch.isnan(target)
    return prediction[has_target], target[has_target]


class RMSELoss(torch.nn.Module):
    """Root-mean-squared error over every scored element of the batch (the paper's training loss;
    NaN targets are skipped, see :func:`scored`)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(torch.nn.functional.mse_loss(*scored(prediction, target)))


def _mean_and_log_var(
    pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if target.dim() < 2:
        raise ValueError(f"expected a (batch, channels, ...) target, got {tuple(target.shape)}")
    mean, log_var = split_mean_log_var(pred, channels=target.shape[1])
    if mean.shape != target.shape:
        raise ValueError(
            f"prediction mean {tuple(mean.shape)} and target {tuple(target.shape)} differ in shape"
        )
    return mean, log_var


class MeanRMSELoss(nn.Module):
    """RMSE of the mean channels: a [mean, log_var] prediction is scored on its mean only."""

    def __init__(self) -> None:
        super().__init__()
        self.rmse = RMSELoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mean, _ = _mean_and_log_var(pred, target)
        return self.rmse(mean, target)


class GaussianNLLLoss(nn.Module):
    """Mean over every voxel and element of 0.5 (log_var + (target - mean)^2 exp(-log_var)),
    the Gaussian negative log-likelihood without its constant 0.5 log(2 pi).

    Computed from the log-variance directly (no exp then log), which together with the network's
    bounded log-variance (|log_var| < 10) keeps it finite in float32.
    """

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mean, log_var = _mean_and_log_var(pred, target)
        if log_var is None:
            raise ValueError(
                f"the gaussian_nll loss needs a prediction with {2 * target.shape[1]} channels "
                f"(mean and log-variance, predict_variance=True), got {pred.shape[1]}"
            )
        has_target = ~torch.isnan(target)
        mean, log_var, target = mean[has_target], log_var[has_target], target[has_target]
        return 0.5 * (log_var + (target - mean).square() * torch.exp(-log_var)).mean()


class RMSEAndNLLLoss(nn.Module):
    """RMSE of the mean plus the Gaussian NLL of the log-variance given the *detached* mean.

    The mean's gradient is the RMSE's alone; the log-variance head learns the distribution of
    the mean's residual (and shapes the shared layers through that head unless the network
    detaches them from it: ``detach_variance``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.rmse = RMSELoss()
        self.nll = GaussianNLLLoss()

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mean, log_var = _mean_and_log_var(pred, target)
        if log_var is None:
            return self.nll(pred, target)  # the same one-sentence error
        return self.rmse(mean, target) + self.nll(torch.cat((mean.detach(), log_var), 1), target)


def detached_variance(name: str) -> bool:
    """Whether the loss ``name`` trains the log-variance head on detached features (the
    network's ``detach_variance``): ``rmse_nll`` does, so the shared layers follow the mean."""
    return name == "rmse_nll"


def build_loss(name: str) -> nn.Module:
    """The training loss called ``name``: "rmse", "gaussian_nll" or "rmse_nll"."""
    if name == "rmse":
        return MeanRMSELoss()
    if name == "gaussian_nll":
        return GaussianNLLLoss()
    if name == "rmse_nll":
        return RMSEAndNLLLoss()
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
