"""Trained weights and their normalisation statistics, loaded as one unit.

``models/model.pt`` is a plain ESPCN_RN state dict; ``models/normalisation.json`` holds the
statistics and, in ``extra``, the sha256 of ``model.pt`` and the network settings it was trained
with (``num_blocks``, ``upscale_factor``, ``predict_variance``, ``dropout_rate``). The network is
built from those settings, and a pair whose sha256 differs is refused: weights never meet
statistics they were not trained with.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.networks import ESPCN_RN
from preprocessing.errors import InputError

log = logging.getLogger(__name__)

#: Network settings recorded in ``normalisation.json`` and their defaults for older records.
NETWORK_SETTINGS = {
    "num_blocks": 0,
    "upscale_factor": 2,
    "in_channels": 6,
    "predict_variance": False,
    "dropout_rate": 0.0,
}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_stats(normalisation_path: str | os.PathLike) -> NormalisationStats:
    """``normalisation.json``; one sentence if it is missing or malformed."""
    path = Path(normalisation_path)
    if not path.is_file():
        raise InputError(f"{path} does not exist: it is written beside the trained weights.")
    try:
        return NormalisationStats.load(path)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise InputError(f"{path} is not a normalisation statistics file ({error}).") from error


def network_settings(normalisation_path: str | os.PathLike) -> dict[str, Any]:
    """ESPCN_RN arguments recorded beside the weights (what the bundle's ``network_def`` reads)."""
    extra = read_stats(normalisation_path).extra
    settings = {key: extra.get(key, default) for key, default in NETWORK_SETTINGS.items()}
    settings["num_blocks"] = int(settings["num_blocks"])
    settings["upscale_factor"] = int(settings["upscale_factor"])
    settings["in_channels"] = int(settings["in_channels"])
    settings["predict_variance"] = bool(settings["predict_variance"])
    settings["dropout_rate"] = float(settings["dropout_rate"])
    return settings


def build_network(settings: dict[str, Any], memory_efficient: bool = False) -> torch.nn.Module:
    """ESPCN_RN from recorded settings (variance and dropout passed only when set)."""
    arguments = {
        "num_blocks": settings["num_blocks"],
        "memory_efficient": memory_efficient,
        "in_channels": settings["in_channels"],
        "upscale_factor": settings["upscale_factor"],
    }
    accepted = inspect.signature(ESPCN_RN).parameters
    for key, default in (("predict_variance", False), ("dropout_rate", 0.0)):
        if settings.get(key, default) != default:
            if key not in accepted:
                raise InputError(
                    f"the weights were trained with {key}={settings[key]}, which this version "
                    "of ESPCN_RN does not support."
                )
            arguments[key] = settings[key]
    return ESPCN_RN(**arguments)


def check_pair(model_path: str | os.PathLike, stats: NormalisationStats, stats_path: Any) -> None:
    """Refuse weights whose sha256 is not the one recorded in their statistics."""
    recorded = stats.extra.get("weights_sha256")
    if recorded is None:
        log.warning(
            "%s records no weights_sha256: cannot check that %s is the model it belongs to",
            stats_path,
            model_path,
        )
        return
    if file_sha256(model_path) != recorded:
        raise InputError(
            f"{model_path} is not the model {stats_path} was saved with (its sha256 differs "
            "from weights_sha256): copy model.pt and normalisation.json together."
        )


def load_weights(
    network: torch.nn.Module,
    model_path: str | os.PathLike,
    normalisation_path: str | os.PathLike,
) -> torch.nn.Module:
    """Load ``model.pt`` into ``network`` after checking it against ``normalisation.json``."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path} does not exist: train the bundle or give --model_path.")
    stats = read_stats(normalisation_path)
    check_pair(model_path, stats, normalisation_path)
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        for key in ("network", "model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        network.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, UnpicklingError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise InputError(
            f"{model_path} is not an ESPCN-RN{getattr(network, 'num_blocks', '?')} state dict "
            f"matching its normalisation statistics ({reason})."
        ) from error
    return network.eval()


def load_model(
    model_path: str | os.PathLike,
    normalisation_path: str | os.PathLike,
    device: torch.device | str | None = None,
    memory_efficient: bool = False,
) -> tuple[torch.nn.Module, NormalisationStats]:
    """The trained network (built from the recorded settings) and its statistics, as a pair."""
    stats = read_stats(normalisation_path)
    network = build_network(network_settings(normalisation_path), memory_efficient)
    load_weights(network, model_path, normalisation_path)
    warn_synthetic_training(stats)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return network.to(device).eval(), stats


def warn_synthetic_training(stats: NormalisationStats) -> None:
    """Weights trained on synthetic phantoms are not validated on scans: say so."""
    trained_on = str(stats.extra.get("trained_on", "unknown"))
    if trained_on.startswith("synthetic"):
        subjects = stats.extra.get("training_subjects") or []
        log.warning(
            "these weights were trained on synthetic phantoms only (%s%s); predictions on real "
            "scans are not validated",
            trained_on,
            f": {', '.join(map(str, subjects))}" if subjects else "",
        )
