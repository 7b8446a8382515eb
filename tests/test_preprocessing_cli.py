"""The real command line in fresh processes: synthetic subjects, --workers, progress, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from preprocessing.hcp import preprocess_hcp
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.layout import OUTPUT_NAMES


def _cli(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "preprocessing", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_synthetic_then_hcp_with_two_workers(tmp_path):
    hcp_root, out = tmp_path / "hcp", tmp_path / "out"
    made_args = ["--shape", "16", "18", "16", "--snr", "30"]
    made = _cli("synthetic", "--out", str(hcp_root), "--count", "3", "--seed", "9", *made_args)
    assert made.returncode == 0, made.stderr
    subjects = ["synth000", "synth001", "synth002"]
    assert sorted(p.name for p in hcp_root.iterdir()) == subjects
    data = nib.load(hcp_root / "synth002" / "T1w" / "Diffusion" / "data.nii.gz")
    assert data.shape == (16, 18, 16, 288) and data.get_data_dtype() == np.float32
    # One broken subject: a bvals file with one value missing.
    shutil.copytree(hcp_root / "synth000", hcp_root / "broken")
    bvals = hcp_root / "broken" / "T1w" / "Diffusion" / "bvals"
    bvals.write_text(" ".join(bvals.read_text().split()[:-1]) + "\n")

    run = _cli("hcp", "--hcp-root", str(hcp_root), "--out", str(out), "--workers", "2")
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    for subject_id in subjects:  # one log line per subject
        assert sum(f"{subject_id}: done" in line for line in lines) == 1
    assert "100%" in run.stderr and "4/4" in run.stderr  # the tqdm bar over subjects
    # The failure list comes last, one sentence naming the file.
    assert lines[-2] == "1 subject(s) failed:"
    assert lines[-1] == f"  broken: {bvals} has 287 b-values but data.nii.gz has 288 volumes."

    # Two workers give the same files as one in-process worker.
    serial = tmp_path / "serial"
    preprocess_hcp(hcp_root, serial, subjects, PreprocessingOptions(), workers=1, progress=False)
    for subject_id in subjects:
        for name in OUTPUT_NAMES:
            assert (out / subject_id / name).read_bytes() == (
                serial / subject_id / name
            ).read_bytes()
        record = json.loads((out / subject_id / "preprocessing.json").read_text())
        assert record["inputs"]["data_shape"] == [16, 18, 16, 288]
        assert record["versions"]["dipy"] and record["seconds"] > 0
        assert record["hr"]["mask_voxels"] > 0 and record["lr"]["shape"] == [8, 9, 8, 6]

    again = _cli("hcp", "--hcp-root", str(hcp_root), "--out", str(out), "--subjects", *subjects)
    assert again.returncode == 0, again.stderr
    assert all(f"{subject_id}: skipped" in again.stderr for subject_id in subjects)


def test_no_torch_in_preprocessing():
    """The DIPY stage must run on CPU-only nodes without torch."""
    code = "import sys, preprocessing.hcp, preprocessing.synthetic, preprocessing.benchmark;"
    code += "import preprocessing.__main__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
