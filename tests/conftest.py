"""Shared pytest fixtures: tiny synthetic HCP subjects and their preprocessed LR/HR tensors.

Both fixtures are session-scoped and cheap (a few seconds together); treat them as read-only
(copy them with ``shutil.copytree`` before modifying anything).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from preprocessing.hcp import preprocess_hcp
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import write_synthetic_subjects

#: HR grid of the fixture subjects: LR is 12 x 14 x 12 at factor 2, so 11^3 LR patches fit.
FIXTURE_SHAPE = (24, 28, 24)
FIXTURE_SUBJECTS = ("synth000", "synth001", "synth002")
FIXTURE_SEED = 20240917
FIXTURE_SNR = 30.0


@pytest.fixture(scope="session")
def synthetic_hcp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HCP root with 3 synthetic subjects ``synth000..synth002`` (seed 20240917, SNR 30).

    Each ``<id>/T1w/Diffusion/`` has ``data.nii.gz`` (24 x 28 x 24 x 288 float32, 1.25 mm,
    HCP-like scheme: 18 b0 at b=5, 90 directions at each of b=1000/2000/3000), ``bvals``,
    ``bvecs`` (FSL 3 x 288) and ``nodif_brain_mask.nii.gz`` (24 x 28 x 24 uint8); plus
    ``<id>/ground_truth/dt_hr.nii.gz`` (24 x 28 x 24 x 6 float32 mm^2/s, noise-free tensor).
    """
    root = tmp_path_factory.mktemp("synthetic_hcp")
    write_synthetic_subjects(root, len(FIXTURE_SUBJECTS), FIXTURE_SEED, FIXTURE_SHAPE, FIXTURE_SNR)
    return root


@pytest.fixture(scope="session")
def preprocessed_root(synthetic_hcp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synthetic_hcp_root`` run through preprocessing (factor 2, b <= 1500, DIPY WLS).

    ``<root>/<id>/`` holds ``dt_hr.nii.gz`` (24 x 28 x 24 x 6), ``dt_lr.nii.gz``
    (12 x 14 x 12 x 6), both float32 mm^2/s in ``TENSOR_ELEMENTS`` order and zero outside
    the mask, ``mask_hr.nii.gz`` (24 x 28 x 24 uint8), ``mask_lr.nii.gz`` (12 x 14 x 12
    uint8) and ``preprocessing.json``. Subject ids: ``synth000``, ``synth001``, ``synth002``.
    """
    out = tmp_path_factory.mktemp("preprocessed")
    summary = preprocess_hcp(
        synthetic_hcp_root, out, options=PreprocessingOptions(), progress=False
    )
    assert sorted(summary.done) == list(FIXTURE_SUBJECTS), summary
    return out
