"""Streaming volume reads and the memory check, against nibabel's own full reads."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from preprocessing.errors import InputError
from preprocessing.io import available_memory_bytes, check_fits_in_memory, read_volumes


def _scaled_int16(path, shape=(6, 5, 4, 9), big_endian=False):
    """A real int16 NIfTI with scl_slope/scl_inter, optionally big-endian; returns the image."""
    rng = np.random.default_rng(2)
    data = rng.integers(-3000, 3000, shape).astype(">i2" if big_endian else "<i2")
    image = nib.Nifti1Image(data, np.diag([-2.0, 2, 2, 1]))
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(0.25, 10.0)
    nib.save(image, path)
    return nib.load(path)


@pytest.mark.parametrize("name", ["dwi.nii.gz", "dwi.nii", "big_endian.nii.gz"])
def test_read_volumes_equals_nibabel_full_read(tmp_path, name):
    image = _scaled_int16(tmp_path / name, big_endian=name.startswith("big"))
    full = np.asarray(image.dataobj, dtype=np.float64)  # nibabel applies the scaling
    assert np.abs(full).max() > 100 and not np.allclose(full, np.round(full))  # really scaled
    indices = [7, 0, 3]  # any order: returned in the order asked
    volumes = read_volumes(tmp_path / name, indices)
    assert volumes.shape == (6, 5, 4, 3) and volumes.dtype == np.float32
    np.testing.assert_allclose(volumes, full[..., indices].astype(np.float32), rtol=0, atol=0)
    # An image object (here file-backed) reads the same.
    np.testing.assert_array_equal(read_volumes(image, indices), volumes)


def test_read_volumes_of_a_truncated_file_is_one_sentence(tmp_path):
    _scaled_int16(tmp_path / "dwi.nii.gz", shape=(20, 20, 20, 9))
    payload = (tmp_path / "dwi.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(payload[: len(payload) * 2 // 3])
    with pytest.raises(InputError, match=r"cut\.nii\.gz cannot be read: .*\.$"):
        read_volumes(tmp_path / "cut.nii.gz", range(9))


def test_read_volumes_names_a_volume_with_nan(tmp_path):
    data = np.ones((4, 4, 4, 5), np.float32)
    data[1, 2, 3, 2] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    assert read_volumes(tmp_path / "nan.nii.gz", [0, 1, 3, 4]).shape == (4, 4, 4, 4)
    with pytest.raises(InputError, match=r"nan\.nii\.gz volume 2 contains NaN or inf values\."):
        read_volumes(tmp_path / "nan.nii.gz", [0, 2])


def test_header_claiming_more_than_memory_is_refused_before_reading(tmp_path):
    """A real tiny file whose header claims 2000^3 voxels per volume."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((2000, 2000, 2000, 10))
    header.set_data_offset(352)
    with gzip.open(tmp_path / "liar.nii.gz", "wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4 + np.zeros(16, np.float32).tobytes())
    image = nib.load(tmp_path / "liar.nii.gz")
    with pytest.raises(InputError) as caught:
        check_fits_in_memory(image, tmp_path / "liar.nii.gz", volumes=2)
    needed = 2000**3 * 2 * 4 / 1e9
    message = str(caught.value)
    assert message.startswith(
        f"{tmp_path / 'liar.nii.gz'} has shape (2000, 2000, 2000, 10): reading 2 volume(s) of it "
        f"needs {needed:.1f} GB of memory but only "
    )
    available = float(message.split("but only ")[1].split(" GB")[0])
    assert message.endswith(" GB are available.")
    assert abs(available - available_memory_bytes() / 1e9) < 2  # memory moves a little
    small = nib.Nifti1Image(np.zeros((10, 10, 10, 3), np.float32), np.eye(4))
    assert check_fits_in_memory(small, "small.nii") == 10 * 10 * 10 * 3 * 4
