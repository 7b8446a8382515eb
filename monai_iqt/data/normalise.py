"""Per-channel normalisation of tensor volumes, saved beside the weights and reused at inference.

Statistics are computed on the training patches (inputs and targets separately) and applied
per tensor channel, so whole-volume inference applies exactly the transform training saw.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
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
    def from_samples(
        cls, inputs: torch.Tensor, targets: torch.Tensor, **extra: Any
    ) -> NormalisationStats:
        """Statistics of channel-first batches ``(B, C, X, Y, Z)`` of inputs and targets."""

        def moments(batch: torch.Tensor) -> tuple[list[float], list[float]]:
            values = batch.double().transpose(0, 1).reshape(batch.shape[1], -1)
            std = values.std(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
            return values.mean(dim=1).tolist(), std.tolist()

        input_mean, input_std = moments(inputs)
        target_mean, target_std = moments(targets)
        return cls(input_mean, input_std, target_mean, target_std, dict(extra))

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


def _channels(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-channel values over a channel-first batch ``(B, C, ...)``."""
    shape = (1, len(values)) + (1,) * (like.ndim - 2)
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(shape)
