"""Helper for the training tests: the bundle's training command line, run in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "train.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def training_command(dataset_dir: Path, output_dir: Path, **settings: object) -> list[str]:
    """``python -m monai.bundle run`` of train.json with ``--key value`` per setting (None: left
    out, so the config's default applies; booleans as ``true``/``false``)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN_CONFIG)]
    values = {**settings, "dataset_dir": dataset_dir, "output_dir": output_dir}
    for key, value in values.items():
        if value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            command += [f"--{key}", text]
    return command


def run_training(dataset_dir: Path, output_dir: Path, **settings: object):
    """Run :func:`training_command` to the end; its CompletedProcess (text output captured)."""
    return subprocess.run(
        training_command(dataset_dir, output_dir, **settings),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
