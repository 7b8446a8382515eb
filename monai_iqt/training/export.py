"""Export of the trained model: ``model.pt`` and ``normalisation.json`` as one unit.

``model.pt`` is a plain ESPCN_RN state dict (MONAI's ``CheckpointLoader`` and ``ckpt_export``
load it); ``normalisation.json`` carries the statistics the weights were trained with and the
sha256 of ``model.pt``'s bytes, so a reader can refuse a pair that does not belong together.
Both are written atomically, model.pt first: a kill between the two leaves a new model.pt beside
statistics whose sha256 names the old one, which loading refuses instead of mixing them.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from monai_iqt.data.normalise import NormalisationStats
from preprocessing.io import atomic_path


def export_models(
    best_checkpoint: str | os.PathLike,
    stats: NormalisationStats,
    extra: dict[str, Any],
    models_dir: str | os.PathLike,
) -> tuple[Path, Path]:
    """Write ``models_dir/model.pt`` (the weights of ``best_checkpoint``), then
    ``models_dir/normalisation.json`` (``stats`` with ``extra`` and ``weights_sha256``)."""
    models_dir = Path(models_dir)
    model_path = export_model(best_checkpoint, models_dir / "model.pt")
    paired = copy.deepcopy(stats)
    paired.extra = {**extra, "weights_sha256": file_sha256(model_path)}
    return model_path, paired.save(models_dir / "normalisation.json")


def export_model(best_checkpoint: str | os.PathLike, model_path: str | os.PathLike) -> Path:
    """Copy a run's best weights (a plain ESPCN_RN state dict) to ``model_path`` atomically."""
    state_dict = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
    if "network" in state_dict and isinstance(state_dict["network"], dict):
        state_dict = state_dict["network"]
    return save_atomically(state_dict, model_path)


def save_atomically(payload: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the destination folder, then rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        torch.save(payload, stream)  # a stream, not a path: no random temporary name inside
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
