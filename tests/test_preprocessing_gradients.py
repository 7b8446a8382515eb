"""Gradient tables and the tensor frame: DIPY's real files, bad tables, LAS vs RAS storage."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.data import get_fnames
from dipy.reconst.dti import from_lower_triangular

from preprocessing.errors import InputError
from preprocessing.gradients import fsl_to_voxel_frame, read_gradient_table
from preprocessing.hcp import preprocess_subject
from preprocessing.hcp_inputs import DIFFUSION_SUBDIR
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.io import save_nifti
from preprocessing.layout import DT_HR, DT_LR, MASK_HR
from preprocessing.synthetic import write_synthetic_subject
from preprocessing.tensor_fit import fit_dti


def _small_64d() -> tuple[Path, Path, Path]:
    data, bvals, bvecs = get_fnames(name="small_64D")
    return Path(data), Path(bvals), Path(bvecs)


def test_dipy_small_64d_b0_direction_nan_is_ignored():
    """DIPY's own small_64D.bvec holds `nan nan nan` for its b0: that direction means nothing."""
    data, bvals_path, bvecs_path = _small_64d()
    assert bvecs_path.read_text().split("\n")[0].split() == ["nan", "nan", "nan"]
    image = nib.load(data)
    bvals, bvecs = read_gradient_table(
        bvals_path, bvecs_path, data, image.shape[3], affine=image.affine
    )
    raw = np.loadtxt(bvecs_path)  # 65 rows of x y z
    assert bvals.shape == (65,) and bvecs.shape == (65, 3)
    assert bvals[0] == 0 and np.all(bvecs[0] == 0)
    assert np.isfinite(bvecs).all()
    assert np.linalg.det(image.affine[:3, :3]) < 0  # stored radiologically: FSL frame = voxels
    np.testing.assert_array_equal(bvecs[1:], raw[1:])
    # The same table for an image stored with a positive determinant: x is negated.
    flipped = image.affine @ np.diag([-1.0, 1, 1, 1])
    _, in_voxels = read_gradient_table(bvals_path, bvecs_path, data, 65, affine=flipped)
    np.testing.assert_array_equal(in_voxels[1:, 0], -raw[1:, 0])
    np.testing.assert_array_equal(in_voxels[1:, 1:], raw[1:, 1:])


def test_dipy_small_64d_fits_finite_tensors():
    data, bvals_path, bvecs_path = _small_64d()
    image = nib.load(data)
    bvals, bvecs = read_gradient_table(bvals_path, bvecs_path, data, 65, affine=image.affine)
    tensors = fit_dti(np.asarray(image.dataobj), bvals, bvecs)
    assert tensors.shape == (10, 10, 10, 6) and np.isfinite(tensors).all()


def _write(path: Path, rows) -> Path:
    path.write_text("\n".join(" ".join(f"{v:g}" for v in row) for row in rows) + "\n")
    return path


@pytest.fixture
def table(tmp_path):
    """A valid 3-b0 + 12-direction table (FSL layout) and a way to break it."""
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((12, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bvals = np.r_[[0, 5, 0], np.full(12, 1000.0)]
    bvecs = np.r_[np.zeros((3, 3)), directions]
    return tmp_path, bvals, bvecs


def _read(folder: Path, bvals, bvecs):
    return read_gradient_table(
        _write(folder / "bvals", [bvals]), _write(folder / "bvecs", bvecs.T), "data.nii.gz", 15
    )


@pytest.mark.parametrize(
    "value, words",
    [(-5.0, "b-value 4 is -5"), (np.nan, "b-value 4 is nan"), (np.inf, "b-value 4 is inf")],
)
def test_negative_or_non_finite_b_values_are_one_sentence(table, value, words):
    folder, bvals, bvecs = table
    bvals[4] = value
    with pytest.raises(InputError) as caught:
        _read(folder, bvals, bvecs)
    message = str(caught.value)
    assert message.startswith(str(folder / "bvals")) and words in message
    assert "must be finite and not negative" in message and message.count(".") <= 2


def test_non_finite_direction_of_a_weighted_volume_is_one_sentence(table):
    folder, bvals, bvecs = table
    bvecs[6] = [np.nan, 0.0, 1.0]
    with pytest.raises(InputError, match=r"bvecs direction 6 \(b=1000\) is not finite"):
        _read(folder, bvals, bvecs)


def test_any_b0_direction_is_ignored(table):
    folder, bvals, bvecs = table
    bvecs[0] = [np.nan, np.nan, np.nan]
    bvecs[1] = [0.3, 7.0, -2.0]  # b=5, below the b0 threshold: not a unit vector, ignored
    bvecs[2] = [np.inf, 0, 0]
    read_bvals, read_bvecs = _read(folder, bvals, bvecs)
    assert np.all(read_bvecs[:3] == 0)
    np.testing.assert_allclose(read_bvecs[3:], bvecs[3:], atol=1e-5)


def test_voxel_frame_conversion_follows_the_determinant():
    bvecs = np.array([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8]])
    las = np.diag([-1.25, 1.25, 1.25, 1.0])
    ras = np.diag([1.25, 1.25, 1.25, 1.0])
    np.testing.assert_array_equal(fsl_to_voxel_frame(bvecs, las), bvecs)
    np.testing.assert_array_equal(fsl_to_voxel_frame(bvecs, ras), bvecs * [-1, 1, 1])


def _store_ras(source: Path, target: Path) -> None:
    """The subject stored RAS: every volume flipped along x, affine adjusted (same world points),
    the same bvals/bvecs files (FSL's bvecs do not change with this flip)."""
    folder, out = source / DIFFUSION_SUBDIR, target / DIFFUSION_SUBDIR
    out.mkdir(parents=True)
    for name in ("bvals", "bvecs"):
        shutil.copy(folder / name, out / name)
    for name in ("data.nii.gz", "nodif_brain_mask.nii.gz"):
        image = nib.load(folder / name)
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, image.shape[0] - 1
        affine = image.affine @ flip
        assert np.linalg.det(image.affine[:3, :3]) < 0 < np.linalg.det(affine[:3, :3])
        data = np.asarray(image.dataobj)[::-1]
        save_nifti(out / name, data, affine, image.get_data_dtype())


def test_las_and_ras_storage_give_the_same_tensors_up_to_the_flip(tmp_path):
    """Independent oracle: the same acquisition stored both ways, real DIPY fits end to end."""
    las = write_synthetic_subject(tmp_path / "hcp", "las", seed=4, shape=(24, 26, 20), snr=30.0)
    ras = tmp_path / "hcp" / "ras"
    _store_ras(las, ras)
    for subject in (las, ras):
        preprocess_subject(subject, tmp_path / "out" / subject.name, PreprocessingOptions())
    mask = np.asarray(nib.load(tmp_path / "out" / "las" / MASK_HR).dataobj) > 0
    sign = np.array([1, -1, 1, -1, 1, 1])  # Dxx, Dxy, Dyy, Dxz, Dyz, Dzz under x -> -x
    for name in (DT_HR, DT_LR):
        in_las = nib.load(tmp_path / "out" / "las" / name)
        in_ras = nib.load(tmp_path / "out" / "ras" / name)
        np.testing.assert_allclose(
            nib.affines.apply_affine(in_las.affine, [0, 0, 0]),
            nib.affines.apply_affine(in_ras.affine, [in_las.shape[0] - 1, 0, 0]),
        )
        expected = in_las.get_fdata()[::-1] * sign
        np.testing.assert_allclose(in_ras.get_fdata(), expected, rtol=1e-4, atol=1e-10)
    # The off-diagonal elements really change sign (the test would pass trivially if all were 0).
    dt_las = nib.load(tmp_path / "out" / "las" / DT_HR).get_fdata()
    assert np.abs(dt_las[mask][:, [1, 3]]).max() > 1e-4
    # Both are the ground truth in their own voxel axes.
    truth = nib.load(las / "ground_truth" / "dt_hr.nii.gz").get_fdata()
    dt_ras = nib.load(tmp_path / "out" / "ras" / DT_HR).get_fdata()
    error = np.linalg.norm(dt_ras[::-1][mask] * sign - truth[mask], axis=-1)
    assert np.median(error / np.linalg.norm(truth[mask], axis=-1)) < 0.15
    eigenvalues = np.linalg.eigvalsh(from_lower_triangular(dt_ras[::-1][mask] * sign))
    np.testing.assert_allclose(
        eigenvalues, np.linalg.eigvalsh(from_lower_triangular(dt_las[mask])), rtol=1e-3, atol=1e-9
    )


def test_fit_workers_do_not_change_the_result():
    rng = np.random.default_rng(1)
    _, bvals_path, bvecs_path = _small_64d()
    bvals, bvecs = read_gradient_table(bvals_path, bvecs_path, "small_64D.nii", 65)
    signal = rng.uniform(50, 1000, (30, 40, 20, 65)).astype(np.float32)
    serial = fit_dti(signal, bvals, bvecs, workers=1)
    threaded = fit_dti(signal, bvals, bvecs, workers=2)
    np.testing.assert_array_equal(serial, threaded)
