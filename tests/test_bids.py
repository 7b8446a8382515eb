"""BIDS datasets in, a BIDS-derivatives tree out (datasets laid out by hand, by BIDS's rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tiny_bundle import write_tiny_models

from monai_iqt.inference import run_inference
from preprocessing.errors import InputError

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "inference.json"
TENSOR = "space-orig_model-tensor_param-diffusivity_res-hr_dwimap"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("models"), num_blocks=0)


def write_dwi(stem: Path, seed: int = 0, shape=(10, 9, 8), bval=True, extra_bvec=False) -> None:
    """``<stem>.nii.gz`` + ``.bval`` + ``.bvec`` + ``.json`` as BIDS's DWI page says: FSL
    format, bvec 3 rows x N, relative to the image axes with x negated for a RAS affine."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum((g / 0.85) ** 2 for g in grid) <= 1.0
    evals = np.array([1.5e-3, 0.4e-3, 0.4e-3])
    direction = rng.standard_normal(shape + (3,))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    d = evals[1] * np.eye(3) + (evals[0] - evals[1]) * np.einsum("...i,...j", direction, direction)
    g = rng.standard_normal((15, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g = np.vstack([np.zeros((2, 3)), g])
    b = np.r_[0, 0, np.full(15, 1000.0)]
    signal = 100 + 900 * brain[..., None] * np.exp(-b * np.einsum("ni,...ij,nj->...n", g, d, g))
    affine = np.diag([2.5, 2.5, 2.5, 1.0])  # RAS: positive determinant
    affine[:3, 3] = [-12.0, -10.0, -9.0]
    nib.save(nib.Nifti1Image(signal.astype(np.float32), affine), f"{stem}.nii.gz")
    bvec = (g * [-1, 1, 1]).T  # the voxel axes, x negated (positive determinant)
    if extra_bvec:
        bvec = np.hstack([bvec, [[1.0], [0.0], [0.0]]])
    np.savetxt(f"{stem}.bvec", bvec, fmt="%.6f")
    if bval:
        np.savetxt(f"{stem}.bval", b[None], fmt="%d")
    Path(f"{stem}.json").write_text(json.dumps({"PhaseEncodingDirection": "j-"}))


def dataset(root: Path, broken: str | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "two subjects", "BIDSVersion": "1.10.0"})
    )
    write_dwi(root / "sub-01" / "dwi" / "sub-01_dwi", seed=1)
    write_dwi(root / "sub-02" / "ses-1" / "dwi" / "sub-02_ses-1_acq-b1000_run-1_dwi", seed=2)
    if broken == "no bval":
        write_dwi(root / "sub-03" / "dwi" / "sub-03_dwi", seed=3, bval=False)
    elif broken == "bvec count":
        write_dwi(root / "sub-03" / "dwi" / "sub-03_dwi", seed=3, extra_bvec=True)
    return root


def test_two_subjects_in_one_command_and_a_broken_third_is_one_sentence(tmp_path, models):
    """Must hold: one command; a derivatives tree with dataset_description.json; the broken
    third subject is one sentence and exit 2 while the other two are written."""
    root = dataset(tmp_path / "ds", broken="no bval")
    out = tmp_path / "derivatives" / "iqt"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
        "--input", str(root), "--output_dir", str(out),
        "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and done.stderr.rstrip().endswith(error_lines[0])
    assert "sub-03_dwi.nii.gz" in error_lines[0] and ".bval" in error_lines[0]

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"]
    assert description["GeneratedBy"][0]["Name"] == "monai-iqt"
    for folder, prefix in (
        (out / "sub-01" / "dwi", "sub-01"),
        (out / "sub-02" / "ses-1" / "dwi", "sub-02_ses-1_acq-b1000_run-1"),
    ):
        tensor = nib.load(folder / f"{prefix}_{TENSOR}.nii.gz")
        assert tensor.shape[3] == 6 and tensor.header.get_zooms()[:3] == (1.25, 1.25, 1.25)
        sidecar = json.loads((folder / f"{prefix}_{TENSOR}.json").read_text())
        assert sidecar["OrientationEncoding"] == {
            "Type": "tensor",
            "TensorRank": 2,
            "EncodingAxis": 3,
            "Reference": "ijk",
        }
        assert sidecar["TensorElementOrder"] == ["Dxx", "Dxy", "Dxz", "Dyy", "Dyz", "Dzz"]
        for param in ("md", "fa", "colfa"):
            name = f"{prefix}_space-orig_model-tensor_param-{param}_res-hr_dwimap"
            assert (folder / f"{name}.nii.gz").is_file() and (folder / f"{name}.json").is_file()
        assert (folder / f"{prefix}_space-orig_res-hr_desc-brain_mask.nii.gz").is_file()
    assert not (out / "sub-03").exists()


def test_subject_and_session_folders_and_the_bids_tensor_order(tmp_path, models):
    root = dataset(tmp_path / "ds")
    session = root / "sub-02" / "ses-1"
    written = run_inference(session, tmp_path / "out", *models, device="cpu")
    assert list(written) == ["sub-02_ses-1_acq-b1000_run-1"]
    written = run_inference(root / "sub-01", tmp_path / "out", *models, device="cpu")
    assert list(written) == ["sub-01"]
    # the same DWI given as one file: DIPY order in the voxel frame, BEP016's D11 D12 D13 ...
    dwi = root / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    run_inference(dwi, tmp_path / "single", *models, device="cpu")
    single = np.asarray(nib.load(tmp_path / "single" / "dt_hr.nii.gz").dataobj)
    bids_file = tmp_path / "out" / "sub-01" / "dwi" / f"sub-01_{TENSOR}.nii.gz"
    as_bids = np.asarray(nib.load(bids_file).dataobj)
    np.testing.assert_array_equal(as_bids, single[..., [0, 1, 3, 2, 4, 5]])


def test_a_bvec_whose_count_differs_is_named_and_the_others_are_written(tmp_path, models):
    root = dataset(tmp_path / "ds", broken="bvec count")
    with pytest.raises(InputError) as raised:
        run_inference(root, tmp_path / "out", *models, device="cpu")
    message = str(raised.value)
    assert "sub-03_dwi.bvec has 18 directions but sub-03_dwi.nii.gz has 17 volumes" in message
    assert "the other 2 DWI(s) were written" in message and "\n" not in message
    assert (tmp_path / "out" / "sub-01" / "dwi" / f"sub-01_{TENSOR}.nii.gz").is_file()
    # the output folder must not be the dataset itself
    with pytest.raises(InputError, match="was not written by monai-iqt"):
        run_inference(root, root, *models, device="cpu")
