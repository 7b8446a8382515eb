"""The one subject loader: what it reads equals what nibabel reads; each bad subject is one
sentence naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_patches import HR_AFFINE, write_subject

from monai_iqt.data.subjects import inspect_subject, load_subject
from preprocessing.errors import InputError
from preprocessing.geometry import lr_affine_from_hr
from preprocessing.io import save_nifti


@pytest.fixture()
def subject(tmp_path: Path) -> Path:
    return write_subject(tmp_path, "subj", seed=0)


def test_loaded_subject_equals_the_files(subject: Path) -> None:
    loaded = load_subject(subject)
    assert loaded.name == "subj" and loaded.upscale_factor == 2
    for key in ("dt_lr", "dt_hr"):
        expected = np.asarray(nib.load(subject / f"{key}.nii.gz").dataobj, dtype=np.float32)
        np.testing.assert_array_equal(getattr(loaded, key), expected)
        assert getattr(loaded, key).dtype == np.float32 and expected.shape[3] == 6
    for key in ("mask_lr", "mask_hr"):
        expected = np.asarray(nib.load(subject / f"{key}.nii.gz").dataobj) > 0
        np.testing.assert_array_equal(getattr(loaded, key), expected)
    header = loaded.header
    assert header.hr_shape == (32, 36, 30) and header.lr_shape == (16, 18, 15)
    np.testing.assert_allclose(header.hr_affine, HR_AFFINE)
    assert header.lr_voxel_size_mm == pytest.approx([2.5, 2.5, 2.5])


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    image = nib.load(path)
    save_nifti(path, data, image.affine if affine is None else affine)


def test_factor_comes_from_the_record_and_must_match_the_shapes(subject: Path) -> None:
    (subject / "preprocessing.json").write_text(json.dumps({"factor": 3}))
    with pytest.raises(InputError, match=r"dt_hr.nii.gz has spatial shape .* not 3 x .* says"):
        inspect_subject(subject)
    (subject / "preprocessing.json").write_text(json.dumps({"bmax": 1500}))
    with pytest.raises(InputError, match=r"preprocessing.json holds no downsampling factor"):
        inspect_subject(subject)


def test_lr_grid_must_be_the_block_grid_of_the_hr_grid(subject: Path) -> None:
    path = subject / "dt_lr.nii.gz"
    shifted = lr_affine_from_hr(HR_AFFINE, 2)
    shifted[0, 3] += 1.25  # one HR voxel off: not the LR grid preprocessing writes
    _rewrite(path, np.asarray(nib.load(path).dataobj), shifted)
    with pytest.raises(InputError, match=r"dt_lr.nii.gz's affine is not the 2x block grid"):
        inspect_subject(subject)


def test_masks_and_tensors_are_checked(subject: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(subject, tmp_path / "copy")
    _rewrite(copy / "mask_hr.nii.gz", np.ones((32, 36, 28), np.uint8))
    with pytest.raises(InputError, match=r"mask_hr.nii.gz has shape \(32, 36, 28\) but dt_hr"):
        inspect_subject(copy)
    _rewrite(copy / "mask_hr.nii.gz", np.zeros((32, 36, 30), np.uint8))
    with pytest.raises(InputError, match=r"mask_hr.nii.gz is empty"):
        load_subject(copy)
    dt_hr = np.asarray(nib.load(subject / "dt_hr.nii.gz").dataobj)
    _rewrite(copy / "dt_hr.nii.gz", dt_hr[..., 0])
    with pytest.raises(InputError, match=r"dt_hr.nii.gz has shape \(32, 36, 30\); expected"):
        inspect_subject(copy)
    (copy / "mask_lr.nii.gz").unlink()
    with pytest.raises(InputError, match=r"mask_lr.nii.gz is missing \(subject copy\)"):
        inspect_subject(copy)


def test_non_finite_tensors_are_named(subject: Path) -> None:
    path = subject / "dt_hr.nii.gz"
    data = np.asarray(nib.load(path).dataobj).copy()
    data[1, 2, 3, 4] = np.inf
    data[2, 2, 3, 0] = np.nan
    _rewrite(path, data)
    inspect_subject(subject)  # headers are fine
    with pytest.raises(InputError, match=r"subj/dt_hr.nii.gz contains 2 NaN or infinite"):
        load_subject(subject)
