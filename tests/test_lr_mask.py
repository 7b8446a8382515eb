"""``preprocessing hcp --lr-mask``: the LR brain mask from the HR blocks or from the LR scan."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dipy.segment.mask import median_otsu

from preprocessing.errors import InputError
from preprocessing.hcp import preprocess_subject
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import write_synthetic_subject


def volume(path):
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return write_synthetic_subject(tmp_path_factory.mktemp("hcp"), "s0", seed=3, shape=(20, 22, 18))


def test_lr_data_mask_is_median_otsu_of_the_lr_mean_b0_and_scoring_data_stay(subject, tmp_path):
    preprocess_subject(subject, tmp_path / "blocks", PreprocessingOptions())
    preprocess_subject(subject, tmp_path / "data", PreprocessingOptions(lr_mask="lr-data"))
    blocks, data = tmp_path / "blocks", tmp_path / "data"

    # the oracle: 2x2x2 block means of the raw b0 volumes, their mean, DIPY's median_otsu
    diffusion = subject / "T1w" / "Diffusion"
    raw = volume(diffusion / "data.nii.gz").astype(np.float64)[:20, :22, :18]
    b0 = np.loadtxt(diffusion / "bvals") < 100
    lr = raw.reshape(10, 2, 11, 2, 9, 2, -1).mean(axis=(1, 3, 5))
    _, expected = median_otsu(lr[..., b0].mean(-1).astype(np.float32), median_radius=2, numpass=1)
    mask_lr = volume(data / "mask_lr.nii.gz") > 0
    np.testing.assert_array_equal(mask_lr, expected)
    assert not np.array_equal(mask_lr, volume(blocks / "mask_lr.nii.gz") > 0)
    dt_lr = volume(data / "dt_lr.nii.gz")
    assert np.all(dt_lr[~mask_lr] == 0) and np.all(np.any(dt_lr[mask_lr] != 0, axis=-1))
    # HR ground truth and HR mask (what scoring uses) do not depend on the LR mask
    for name in ("dt_hr.nii.gz", "mask_hr.nii.gz"):
        np.testing.assert_array_equal(volume(data / name), volume(blocks / name))
    assert json.loads((data / "preprocessing.json").read_text())["options"]["lr_mask"] == "lr-data"

    with pytest.raises(InputError, match=r"--lr-mask lr-data \(this run: hr-blocks\)"):
        preprocess_subject(subject, data, PreprocessingOptions())


def test_an_unknown_lr_mask_is_one_sentence_and_exit_2(subject, tmp_path):
    command = [
        sys.executable, "-m", "preprocessing", "hcp", "--hcp-root", str(subject.parent),
        "--out", str(tmp_path / "out"), "--lr-mask", "hr-mask",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--lr-mask 'hr-mask' is not one of hr-blocks, lr-data." in done.stderr
    assert not (tmp_path / "out").exists()
