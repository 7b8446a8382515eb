"""Multi-process training through the bundle's multi_gpu_train.json: real torchrun, gloo on CPU.

Validation is sharded without padding (MONAI's ``DistributedSampler(even_divisible=False)``) and
ignite's metric sums over ranks, so with an odd number of validation patches the distributed
``val_rmse`` must equal the RMSE of the same weights over every validation patch once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_iqt.data import build_patch_data
from monai_iqt.networks import ESPCN_RN
from monai_iqt.training import state_digest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "iqt_espcn_rn" / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_torchrun_two_ranks_end_identical_and_only_rank0_writes(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    config_files = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file", config_files,
        "--dataset_dir", str(preprocessed_root), "--output_dir", str(tmp_path / "out"),
        "--patches_per_subject", "15", "--num_revnet_blocks", "1", "--batch_size", "2",
        "--epochs", "2", "--num_restarts", "1", "--learning_rate", "0.001",
    ]  # fmt: skip
    workdir = tmp_path / "workdir"  # nothing may be written where the command runs
    workdir.mkdir()
    result = subprocess.run(
        command, cwd=workdir, env=ENV, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # Each rank logs the SHA-256 of its final parameters and buffers.
    digests = dict(re.findall(r"rank (\d)/2 run 0: .* weights ([0-9a-f]{64})", output))
    assert set(digests) == {"0", "1"}, output[-4000:]
    assert digests["0"] == digests["1"], "ranks ended with different weights"

    # The final weights rank 0 checkpointed are those both ranks reported.
    out = tmp_path / "out"
    last = torch.load(out / "runs" / "run_0" / "checkpoint_last.pt", weights_only=True)
    network = ESPCN_RN(num_blocks=1)
    network.load_state_dict(last["network"])
    assert state_digest(network) == digests["0"]
    # 2 ranks x batch 2 per rank: 36 training patches make 9 iterations per epoch, not 18.
    assert last["trainer"]["epoch_length"] == 9

    # Oracle: the checkpointed (last epoch) weights scored in one process on every validation
    # patch once: 3 subjects x 3 patches = 9, odd, so a padding sampler would count one twice.
    data = build_patch_data(preprocessed_root, patches_per_subject=15, seed=0)
    assert len(data.val_dataset) == 9
    images = torch.stack([data.val_dataset[i]["image"] for i in range(9)])
    labels = torch.stack([data.val_dataset[i]["label"] for i in range(9)])
    network.eval()
    with torch.no_grad():
        prediction = network(images)
    # labels are NaN outside the brain (no target): nanmean skips them, as training does
    expected = torch.sqrt(torch.nanmean((prediction.double() - labels.double()) ** 2)).item()
    history = json.loads((out / "runs" / "runs.json").read_text())["runs"][0]["history"]
    np.testing.assert_allclose(history[-1]["val_rmse"], expected, rtol=1e-6)

    # Only rank 0 wrote: exactly its files (two ranks would leave two TensorBoard event files).
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    events = [p for p in written if "events.out.tfevents" in p]
    assert len(events) == 1
    assert [p for p in written if p not in events] == [
        "models/model.pt",
        "models/normalisation.json",
        "runs/run_0/checkpoint_last.pt",
        "runs/run_0/model_best.pt",
        "runs/runs.json",
        "runs/settings.json",
    ]
    assert "rank 1 of 2 on cpu (gloo)" in output
    assert list(workdir.iterdir()) == [], "a rank wrote in the working folder (TensorBoard runs/?)"
