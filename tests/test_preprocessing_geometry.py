"""Geometry of the LR/HR pairs: block means, cropping, masks and affines, from the written files."""

from __future__ import annotations

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from preprocessing.downsample import block_mean, downsample_mask
from preprocessing.hcp import preprocess_subject
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import write_synthetic_subject


def test_block_mean_matches_hand_computed_array():
    volume = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    # Block (0,0,0) holds x in {0,1}, y in {0,1}, z in {0,1}: values 8x + 2y + z.
    expected = np.array(
        [
            [[np.mean([0, 1, 2, 3, 8, 9, 10, 11])], [np.mean([4, 5, 6, 7, 12, 13, 14, 15])]],
            [
                [np.mean([16, 17, 18, 19, 24, 25, 26, 27])],
                [np.mean([20, 21, 22, 23, 28, 29, 30, 31])],
            ],
        ]
    )
    np.testing.assert_array_equal(block_mean(volume, 2), expected)


def test_block_mean_of_odd_volume_drops_trailing_voxels():
    rng = np.random.default_rng(0)
    volume = rng.random((5, 7, 3, 2)).astype(np.float32)
    result = block_mean(volume, 2)
    assert result.shape == (2, 3, 1, 2)
    for i, j, k in itertools.product(range(2), range(3), range(1)):
        block = volume[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2]
        np.testing.assert_allclose(result[i, j, k], block.mean(axis=(0, 1, 2)), rtol=1e-6)


def test_block_mean_factor_three():
    volume = np.zeros((6, 3, 3), dtype=np.float32)
    volume[3:] = 27.0
    np.testing.assert_array_equal(block_mean(volume, 3)[:, 0, 0], [0.0, 27.0])


def test_lr_mask_is_at_least_half_of_the_block():
    mask = np.zeros((4, 2, 2), dtype=np.uint8)
    mask[0:2].reshape(-1)[:4] = 1  # block 0: exactly 4 of 8 voxels
    mask[2:4].reshape(-1)[:3] = 1  # block 1: 3 of 8 voxels
    assert mask[0:2].sum() == 4 and mask[2:4].sum() == 3
    lr = downsample_mask(mask, 2)
    assert lr.dtype == np.uint8
    np.testing.assert_array_equal(lr[:, 0, 0], [1, 0])


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
