"""Geometry of the LR/HR pairs as preprocessing writes them: cropping, masks and affines of the
written files (the grid functions themselves are tested in ``test_geometry.py``)."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from preprocessing.geometry import block_mean
from preprocessing.hcp import preprocess_subject
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import write_synthetic_subject


def _voxel_centres(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[:3]], indexing="ij"), axis=-1)
    return nib.affines.apply_affine(affine, grid)


def test_lr_voxel_centre_is_mean_of_hr_block_centres(preprocessed_root):
    hr = nib.load(preprocessed_root / "synth000" / "dt_hr.nii.gz")
    lr = nib.load(preprocessed_root / "synth000" / "dt_lr.nii.gz")
    hr_centres = _voxel_centres(hr.affine, hr.shape)
    lr_centres = _voxel_centres(lr.affine, lr.shape)
    block_centres = block_mean(hr_centres, 2)  # mean over each 2x2x2 block, per coordinate
    np.testing.assert_allclose(lr_centres, block_centres, atol=1e-4)
    # HCP-like affine has a flipped x axis: the check is not a trivial positive diagonal.
    assert hr.affine[0, 0] < 0


@pytest.fixture(scope="module")
def odd_subject(tmp_path_factory):
    """Noise-free synthetic subject of odd shape 25 x 29 x 23, preprocessed at factor 2."""
    root = tmp_path_factory.mktemp("odd")
    subject_dir = write_synthetic_subject(root / "hcp", "odd", seed=5, shape=(25, 29, 23), snr=None)
    record = preprocess_subject(subject_dir, root / "out" / "odd", PreprocessingOptions())
    return subject_dir, root / "out" / "odd", record


def test_odd_volume_is_cropped_at_the_end(odd_subject):
    subject_dir, out, record = odd_subject
    source = nib.load(subject_dir / "T1w" / "Diffusion" / "data.nii.gz")
    dt_hr = nib.load(out / "dt_hr.nii.gz")
    dt_lr = nib.load(out / "dt_lr.nii.gz")
    assert dt_hr.shape == (24, 28, 22, 6) and dt_lr.shape == (12, 14, 11, 6)
    assert nib.load(out / "mask_hr.nii.gz").shape == (24, 28, 22)
    assert nib.load(out / "mask_lr.nii.gz").shape == (12, 14, 11)
    # Trailing voxels dropped: voxel (0,0,0) keeps its place, so the HR affine is unchanged.
    np.testing.assert_allclose(dt_hr.affine, source.affine)
    # The HR tensor is the fit of the first 24 x 28 x 22 voxels: compare with the ground truth.
    truth = nib.load(subject_dir / "ground_truth" / "dt_hr.nii.gz").get_fdata()[:24, :28, :22]
    mask = nib.load(out / "mask_hr.nii.gz").get_fdata() > 0
    np.testing.assert_allclose(dt_hr.get_fdata()[mask], truth[mask], rtol=1e-3, atol=1e-8)
    assert record["hr"]["shape"] == [24, 28, 22, 6]


def test_written_volumes_follow_the_conventions(odd_subject):
    subject_dir, out, _ = odd_subject
    mask_file = nib.load(subject_dir / "T1w" / "Diffusion" / "nodif_brain_mask.nii.gz")
    source_mask = np.asarray(mask_file.dataobj)[:24, :28, :22] > 0
    for name in ("dt_hr", "dt_lr"):
        image = nib.load(out / f"{name}.nii.gz")
        assert image.get_data_dtype() == np.float32
        mask = nib.load(out / f"mask_{name[3:]}.nii.gz")
        assert mask.get_data_dtype() == np.uint8
        inside = np.asarray(mask.dataobj) > 0
        data = image.get_fdata()
        assert np.all(data[~inside] == 0), f"{name} must be zero outside its mask"
        assert np.all(np.abs(data[inside]).max(axis=-1) > 0)
    mask_hr = np.asarray(nib.load(out / "mask_hr.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(mask_hr, source_mask)
    # LR mask: at least half of the 8 HR voxels of the block, counted by hand.
    counts = sum(
        source_mask[dx::2, dy::2, dz::2].astype(int)
        for dx, dy, dz in itertools.product(range(2), repeat=3)
    )
    mask_lr = np.asarray(nib.load(out / "mask_lr.nii.gz").dataobj) > 0
    np.testing.assert_array_equal(mask_lr, counts >= 4)


def test_dt_lr_is_dipy_fit_of_block_mean_dwi(odd_subject):
    """Independent oracle: raw DWI averaged by slicing, fitted by DIPY directly."""
    subject_dir, out, record = odd_subject
    folder = subject_dir / "T1w" / "Diffusion"
    data = nib.load(folder / "data.nii.gz").get_fdata()[:24, :28, :22]
    bvals = np.loadtxt(folder / "bvals")
    bvecs = np.loadtxt(folder / "bvecs").T
    keep = bvals <= 1500
    assert record["volume_indices"] == np.flatnonzero(keep).tolist()
    assert record["shells_used"] == [0.0, 1000.0]
    assert record["shells_available"] == [0.0, 1000.0, 2000.0, 3000.0]
    data = data[..., keep]
    lr = sum(data[dx::2, dy::2, dz::2] for dx, dy, dz in itertools.product(range(2), repeat=3)) / 8
    gtab = gradient_table(bvals[keep], bvecs=bvecs[keep], b0_threshold=100)
    mask_lr = np.asarray(nib.load(out / "mask_lr.nii.gz").dataobj) > 0
    expected = TensorModel(gtab, fit_method="WLS").fit(lr, mask=mask_lr).lower_triangular()
    np.testing.assert_allclose(
        nib.load(out / "dt_lr.nii.gz").get_fdata(), expected, rtol=1e-4, atol=1e-9
    )
    assert json.loads((out / "preprocessing.json").read_text())["lr"]["mask_voxels"] == int(
        mask_lr.sum()
    )
