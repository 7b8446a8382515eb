"""Physics: the DTI fit recovers known tensors; the phantom is brain-like and reproducible."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.reconst.dti import decompose_tensor, from_lower_triangular

from preprocessing.hcp import preprocess_subject
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import hcp_like_acquisition, write_synthetic_subject
from preprocessing.tensor_fit import count_non_positive_definite, fit_dti

SHAPE = (24, 28, 24)


def _relative_error(estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(estimate - truth, axis=-1) / np.linalg.norm(truth, axis=-1)


@pytest.fixture(scope="module")
def noise_free(tmp_path_factory):
    """Noise-free subject; returns (subject folder, out root)."""
    root = tmp_path_factory.mktemp("noise_free")
    subject_dir = write_synthetic_subject(root / "hcp", "clean", seed=11, shape=SHAPE, snr=None)
    return subject_dir, root / "out"


def test_noise_free_dt_hr_equals_ground_truth_within_one_percent(noise_free):
    subject_dir, out = noise_free
    preprocess_subject(subject_dir, out / "bmax1500", PreprocessingOptions())
    dt_hr = nib.load(out / "bmax1500" / "dt_hr.nii.gz").get_fdata()
    mask = nib.load(out / "bmax1500" / "mask_hr.nii.gz").get_fdata() > 0
    truth = nib.load(subject_dir / "ground_truth" / "dt_hr.nii.gz").get_fdata()
    error = _relative_error(dt_hr[mask], truth[mask])
    assert mask.sum() > 1000
    assert error.max() < 0.01, f"max relative error {error.max():.2e}"


def test_higher_shells_bias_the_fit(noise_free):
    """The b=2000/3000 shells deviate from the tensor model: including them must hurt."""
    subject_dir, out = noise_free
    record = preprocess_subject(subject_dir, out / "bmax3500", PreprocessingOptions(bmax=3500))
    assert record["shells_used"] == [0.0, 1000.0, 2000.0, 3000.0]
    assert len(record["volume_indices"]) == 288
    dt_hr = nib.load(out / "bmax3500" / "dt_hr.nii.gz").get_fdata()
    mask = nib.load(out / "bmax3500" / "mask_hr.nii.gz").get_fdata() > 0
    truth = nib.load(subject_dir / "ground_truth" / "dt_hr.nii.gz").get_fdata()
    assert np.median(_relative_error(dt_hr[mask], truth[mask])) > 0.05


def test_noisy_fit_is_close_to_truth_in_white_matter(synthetic_hcp_root, preprocessed_root):
    dt_hr = nib.load(preprocessed_root / "synth000" / "dt_hr.nii.gz").get_fdata()
    mask = nib.load(preprocessed_root / "synth000" / "mask_hr.nii.gz").get_fdata() > 0
    truth = nib.load(synthetic_hcp_root / "synth000" / "ground_truth" / "dt_hr.nii.gz").get_fdata()
    error = _relative_error(dt_hr[mask], truth[mask])
    # SNR 30 on 18 b0 + 90 directions: a few percent typical error, far from exact.
    assert 0.005 < np.median(error) < 0.15
    record = json.loads((preprocessed_root / "synth000" / "preprocessing.json").read_text())
    assert record["hr"]["non_positive_definite"] == count_non_positive_definite(dt_hr, mask)


def test_fit_dti_recovers_random_tensors_from_hand_made_signal():
    """Independent oracle: random positive-definite tensors, signal S0 exp(-b g'Dg) by hand."""
    rng = np.random.default_rng(3)
    acquisition = hcp_like_acquisition()
    keep = acquisition.bvals <= 1500
    bvals, bvecs = acquisition.bvals[keep], acquisition.bvecs[keep]
    eigenvalues = rng.uniform(0.2e-3, 2.5e-3, (4, 5, 3, 3))
    rotations = np.linalg.qr(rng.standard_normal((4, 5, 3, 3, 3)))[0]
    tensors = np.einsum("...ij,...j,...kj->...ik", rotations, eigenvalues, rotations)
    signal = 800 * np.exp(-np.einsum("n,ni,...ij,nj->...n", bvals, bvecs, tensors, bvecs))
    mask = rng.random((4, 5, 3)) < 0.7
    fitted = fit_dti(signal.astype(np.float32), bvals, bvecs, mask)
    assert fitted.shape == (4, 5, 3, 6) and fitted.dtype == np.float32
    np.testing.assert_allclose(from_lower_triangular(fitted[mask]), tensors[mask], atol=2e-8)
    assert np.all(fitted[~mask] == 0)
    assert count_non_positive_definite(fitted, mask) == 0


def test_count_non_positive_definite():
    tensors = np.zeros((2, 1, 1, 6))
    tensors[0, 0, 0] = [1e-3, 0, 1e-3, 0, 0, 1e-3]
    tensors[1, 0, 0] = [1e-3, 0, 1e-3, 0, 0, -1e-4]
    assert count_non_positive_definite(tensors, np.ones((2, 1, 1), bool)) == 1


def test_phantom_is_brain_like(synthetic_hcp_root):
    truth = nib.load(synthetic_hcp_root / "synth001" / "ground_truth" / "dt_hr.nii.gz")
    mask = nib.load(synthetic_hcp_root / "synth001" / "T1w/Diffusion/nodif_brain_mask.nii.gz")
    inside = np.asarray(mask.dataobj) > 0
    evals, _ = decompose_tensor(from_lower_triangular(truth.get_fdata()[inside]))
    md = evals.mean(axis=1)
    fa = np.sqrt(1.5 * ((evals - md[:, None]) ** 2).sum(1) / (evals**2).sum(1))
    assert 0.15 < inside.mean() < 0.6  # a brain inside a head inside the field of view
    assert np.any(md > 2.5e-3)  # CSF (ventricles, outer layer)
    assert np.any((fa < 0.1) & (np.abs(md - 0.8e-3) < 0.1e-3))  # grey matter
    assert np.any(fa > 0.65)  # coherent fibre bundles
    planar = (evals[:, 1] > 0.7 * evals[:, 0]) & (evals[:, 1] > 2 * evals[:, 2])
    assert np.any(planar), "a bundle crossing gives planar (oblate) tensors"


def test_acquisition_is_hcp_like():
    acquisition = hcp_like_acquisition()
    b0 = acquisition.bvals < 100
    assert acquisition.bvals.shape == (288,) and acquisition.bvecs.shape == (288, 3)
    assert b0.sum() == 18 and np.all(acquisition.bvals[b0] == 5)
    assert np.all(np.diff(np.flatnonzero(b0)) == 16)  # interleaved
    for shell in (1000, 2000, 3000):
        in_shell = np.abs(acquisition.bvals - shell) <= 10
        assert in_shell.sum() == 90
        np.testing.assert_allclose(np.linalg.norm(acquisition.bvecs[in_shell], axis=1), 1)


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    names = ["T1w/Diffusion/" + n for n in ("data.nii.gz", "bvals", "bvecs")]
    names += ["T1w/Diffusion/nodif_brain_mask.nii.gz", "ground_truth/dt_hr.nii.gz"]
    shape = (16, 18, 16)
    first = write_synthetic_subject(tmp_path / "a", "s", seed=7, shape=shape)
    second = write_synthetic_subject(tmp_path / "b", "s", seed=7, shape=shape)
    other = write_synthetic_subject(tmp_path / "c", "s", seed=8, shape=shape)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("T1w/Diffusion/data.nii.gz", "ground_truth/dt_hr.nii.gz"):
        assert (first / name).read_bytes() != (other / name).read_bytes(), name
