"""Scans as a clinic has them: another voxel size, thick slices, DIPY's own real DWIs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import dipy
import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.io.gradients import read_bvals_bvecs
from dipy.reconst.dti import TensorModel, fractional_anisotropy
from dipy.segment.mask import median_otsu
from tiny_bundle import MEAN, STD, write_tiny_models

from monai_iqt.inference import run_inference
from monai_iqt.inputs import check_voxel_size, load_input
from preprocessing.errors import InputError
from preprocessing.io import save_nifti

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "iqt_espcn_rn"
INFERENCE_CONFIG = BUNDLE / "configs" / "inference.json"
DIPY_FILES = Path(dipy.__file__).parent / "data" / "files"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("models"), num_blocks=0)  # 2.5 mm LR


def scan(folder: Path, voxel, shape=(12, 12, 10), seed=0) -> Path:
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum((g / 0.8) ** 2 for g in grid) <= 1.0
    rng = np.random.default_rng(seed)
    dt = (rng.standard_normal(shape + (6,)) * np.asarray(STD) + np.asarray(MEAN)) * brain[..., None]
    affine = np.diag([*np.broadcast_to(voxel, (3,)), 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    path = folder / "scan.nii.gz"
    save_nifti(path, dt.astype(np.float32), affine)
    save_nifti(folder / "scan_mask.nii.gz", brain, affine, np.uint8)
    return path


def test_a_2mm_scan_to_2_5mm_weights_is_refused_resampled_or_allowed(tmp_path, models):
    """Must hold: exit 2 and one sentence without a choice; resample and allow each run and
    record what they did."""
    path = scan(tmp_path, 2.0)
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
        "--input", str(path), "--output_dir", str(tmp_path / "refused"),
        "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "scan.nii.gz" in message
    for fragment in ("2x2x2 mm", "2.5x2.5x2.5 mm", "resample", "allow"):
        assert fragment in message
    assert not (tmp_path / "refused").exists()

    allowed = run_inference(
        path, tmp_path / "allow", *models, device="cpu", voxel_size_mismatch="allow"
    )["scan"]
    assert nib.load(allowed["dt_hr"]).header.get_zooms()[:3] == pytest.approx((1.0, 1.0, 1.0))
    sidecar = json.loads((tmp_path / "allow" / "dt_hr.json").read_text())
    assert sidecar["VoxelSizeMismatch"] == "allow"
    assert sidecar["InputVoxelSizeMm"] == [2.0, 2.0, 2.0]
    assert sidecar["TrainedLRVoxelSizeMm"] == [2.5, 2.5, 2.5]

    resampled = run_inference(
        path, tmp_path / "resample", *models, device="cpu", voxel_size_mismatch="resample"
    )["scan"]
    image = nib.load(resampled["dt_hr"])
    # 12x12x10 voxels of 2 mm -> 10x10x8 LR voxels of 2.4-2.5 mm -> twice that at HR
    assert image.shape == (20, 20, 16, 6)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (1.2, 1.2, 1.25), rtol=1e-5)
    record = json.loads((tmp_path / "resample" / "inference.json").read_text())
    assert record["resolution"]["VoxelSizeMismatch"] == "resample"
    sidecar = json.loads((tmp_path / "resample" / "fa.json").read_text())
    assert sidecar["VoxelSizeMismatch"] == "resample" and "cubic" in sidecar["Interpolation"]
    # the field of view is kept: the outer faces of the HR grid are those of the input
    corner = image.affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner, nib.load(path).affine @ [-0.5, -0.5, -0.5, 1.0])


def test_resampling_reproduces_a_linear_field_at_the_new_voxel_centres(tmp_path, models):
    """Cubic B-splines reproduce a linear field exactly: the resampled values, read at the new
    voxel centres through the new affine, are the field there (away from the edge)."""
    shape = (30, 28, 25)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-15.0, 3.0, 8.0]
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    slope = np.array([1e-5, -2e-5, 3e-5])
    base = np.array([7e-4, 1e-5, 6e-4, -2e-5, 3e-5, 8e-4])
    field = (base + (world @ slope)[..., None] * np.arange(1, 7)).astype(np.float32)
    save_nifti(tmp_path / "linear.nii.gz", field, affine)
    save_nifti(tmp_path / "linear_mask.nii.gz", np.ones(shape, np.uint8), affine)
    item = check_voxel_size(load_input(tmp_path / "linear.nii.gz"), [2.5] * 3, "resample")
    assert item.dt_lr.shape[:3] == (24, 22, 20)
    new_ijk = np.stack(
        np.meshgrid(*[np.arange(n) for n in item.dt_lr.shape[:3]], indexing="ij"), -1
    )
    new_world = new_ijk @ item.affine[:3, :3].T + item.affine[:3, 3]
    expected = base + (new_world @ slope)[..., None] * np.arange(1, 7)
    inner = (slice(8, -8),) * 3  # the spline prefilter's edge extension decays inwards
    np.testing.assert_allclose(item.dt_lr[inner], expected[inner], rtol=0, atol=1e-8)


def test_thick_slices_are_refused_saying_the_model_is_isotropic(tmp_path, models):
    path = scan(tmp_path, (2.5, 2.5, 5.0))
    with pytest.raises(InputError) as raised:
        run_inference(path, tmp_path / "out", *models, device="cpu")
    message = str(raised.value)
    assert "anisotropic" in message and "isotropic" in message and "2.5x2.5x5 mm" in message
    assert "--voxel_size_mismatch resample" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="voxel_size_mismatch 'stretch' is not one of"):
        run_inference(path, tmp_path / "out", *models, voxel_size_mismatch="stretch")


def lr_fit(path: Path):
    """DIPY's own fit of a DWI (b <= 1500, FSL bvecs in the voxel frame) and its brain mask."""
    image = nib.load(path)
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    bvals, bvecs = read_bvals_bvecs(
        str(path.parent / f"{stem}.bval"), str(path.parent / f"{stem}.bvec")
    )
    if np.linalg.det(image.affine[:3, :3]) > 0:
        bvecs = bvecs * [-1, 1, 1]
    keep = bvals <= 1500
    data = np.asarray(image.dataobj, dtype=np.float64)[..., keep]
    gtab = gradient_table(bvals[keep], bvecs=bvecs[keep], b0_threshold=100)
    _, mask = median_otsu(data[..., gtab.b0s_mask].mean(-1), median_radius=2, numpass=1)
    fit = TensorModel(gtab).fit(data, mask=mask)
    return fit.evecs[..., 0], fractional_anisotropy(fit.evals), mask, image.affine


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "choice"), [("small_64D.nii", "resample"), ("small_101D.nii.gz", None)]
)
def test_dipy_real_dwis_keep_their_principal_directions(tmp_path, name, choice):
    """Must hold: DIPY's sample scans through DWI inference with the shipped weights; each HR
    voxel's principal direction agrees with the LR fit at the native voxel it lies in."""
    stem = name.removesuffix(".gz").removesuffix(".nii")
    for suffix in (name, f"{stem}.bval", f"{stem}.bvec"):
        shutil.copy(DIPY_FILES / suffix, tmp_path / suffix)
    run_inference(
        tmp_path / name,
        tmp_path / "out",
        BUNDLE / "models" / "model.pt",
        BUNDLE / "models" / "normalisation.json",
        device="cpu",
        voxel_size_mismatch=choice,
    )
    direction_lr, fa_lr, mask_lr, affine_lr = lr_fit(tmp_path / name)
    hr = nib.load(tmp_path / "out" / "dt_hr.nii.gz")
    dt = np.asarray(hr.dataobj, dtype=np.float64)
    brain = np.any(dt != 0, axis=-1)
    hr_ijk = np.argwhere(brain)
    native = np.linalg.inv(affine_lr) @ hr.affine @ np.c_[hr_ijk, np.ones(len(hr_ijk))].T
    native = np.round(native[:3].T).astype(int)
    inside = np.all((native >= 0) & (native < mask_lr.shape), axis=1)
    hr_ijk, native = hr_ijk[inside], native[inside]
    lr_index = tuple(native.T)
    selected = mask_lr[lr_index] & (fa_lr[lr_index] >= 0.3)
    assert selected.sum() >= 20, selected.sum()
    d = dt[tuple(hr_ijk[selected].T)]
    full = np.stack([d[:, [0, 1, 3]], d[:, [1, 2, 4]], d[:, [3, 4, 5]]], axis=1)  # DIPY order
    direction_hr = np.linalg.eigh(full)[1][..., -1]
    cosine = np.abs(np.sum(direction_hr * direction_lr[lr_index][selected], axis=1))
    assert np.median(cosine) >= 0.9, np.median(cosine)
    sidecar = json.loads((tmp_path / "out" / "dt_hr.json").read_text())
    assert sidecar["VoxelSizeMismatch"] == ("resample" if choice else "none")
