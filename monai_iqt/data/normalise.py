"""Per-channel normalisation of tensor volumes, saved beside the weights and reused at inference.

Statistics are computed on the training patches (inputs and targets separately) and applied
per tensor channel, so whole-volume inference applies exactly the transform training saw.
Targets may instead share one scale over the six elements (``target_scale`` "shared"): the loss
then weighs every element's error in mm^2/s alike, where per-channel scales make an error in the
small off-diagonal elements count as much as a larger one on the diagonal.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from preprocessing.io import write_json


@dataclass
class NormalisationStats:
    """Mean and standard deviation per tensor channel of network inputs and targets (mm^2/s).

    ``extra`` records what inference must know about training (upscale factor, LR voxel size,
    network depth, ...) so the bundle's ``models/`` folder is self-describing.
    """

    input_mean: list[float]
    input_std: list[float]
    target_mean: list[float]
    target_std: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_batches(
        cls, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], **extra: Any
    ) -> NormalisationStats:
        """Statistics of (input, target) channel-first batches ``(B, C, X, Y, Z)``.

        ``batches()`` is called twice (means, then spreads about them), so the samples never
        need to be in memory at once; sums are float64 and the std is unbiased (n - 1). NaN
        values are not samples: a NaN target marks a voxel without a target (``target_region``
        "brain"), so the statistics are those of the voxels the loss scores.
        """
        sums: list[torch.Tensor | float] = [0.0, 0.0]
        counts: list[torch.Tensor | int] = [0, 0]
        for pair in batches():
            for index, batch in enumerate(pair):
                values, present = _by_channel(batch)
                sums[index] = sums[index] + values.sum(dim=1)
                counts[index] = counts[index] + present.sum(dim=1)
        if not all(torch.as_tensor(count).min() > 0 for count in counts):
            raise ValueError("normalisation statistics need at least one sample per channel")
        means = [total / count for total, count in zip(sums, counts, strict=True)]
        squares: list[torch.Tensor | float] = [0.0, 0.0]
        for pair in batches():
            for index, batch in enumerate(pair):
                values, present = _by_channel(batch)
                deviations = (values - means[index][:, None]) * present
                squares[index] = squares[index] + (deviations**2).sum(dim=1)
        stds = [
            (square / (count - 1).clamp_min(1)).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
            for square, count in zip(squares, counts, strict=True)
        ]
        return cls(
            input_mean=means[0].tolist(),
            input_std=stds[0].tolist(),
            target_mean=means[1].tolist(),
            target_std=stds[1].tolist(),
            extra=dict(extra),
        )

    @classmethod
    def from_samples(
        cls, inputs: torch.Tensor, targets: torch.Tensor, **extra: Any
    ) -> NormalisationStats:
        """Statistics of channel-first batches ``(B, C, X, Y, Z)`` of inputs and targets."""
        return cls.from_batches(lambda: [(inputs, targets)], **extra)

    def with_shared_target_scale(self) -> NormalisationStats:
        """A copy whose targets share one scale: the root mean square of the channel stds."""
        shared = math.sqrt(sum(std**2 for std in self.target_std) / len(self.target_std))
        return replace(self, target_std=[shared] * len(self.target_std))

    def normalise_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x - _channels(self.input_mean, x)) / _channels(self.input_std, x)

    def normalise_target(self, y: torch.Tensor) -> torch.Tensor:
        return (y - _channels(self.target_mean, y)) / _channels(self.target_std, y)

    def denormalise_output(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalise_target` on a network output (back to mm^2/s)."""
        return y * _channels(self.target_std, y) + _channels(self.target_mean, y)

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormalisationStats:
        with open(path) as stream:
            return cls(**json.load(stream))


def _by_channel(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, ...) -> (C, B * ...) in float64, NaN set to 0, and where values are present."""
    values = batch.double().transpose(0, 1).reshape(batch.shape[1], -1)
    present = ~torch.isnan(values)
    return values.nan_to_num(nan=0.0), present


def _channels(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-channel values over a channel-first batch ``(B, C, ...)``."""
    shape = (1, len(values)) + (1,) * (like.ndim - 2)
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(shape)
