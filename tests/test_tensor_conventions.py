"""FSL and MRtrix tensor files: order *and* frame, in and out, checked against their own rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.reconst.dti import TensorModel
from tiny_bundle import MEAN, STD, write_tiny_models

from monai_iqt.inference import run_inference
from monai_iqt.inputs import load_input
from preprocessing.io import save_nifti
from preprocessing.tensor_conventions import from_voxel_frame, to_voxel_frame

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "inference.json"

#: The tools' element orders as (row, column) of the symmetric matrix, from their manuals:
#: dtifit --save_tensor writes Dxx Dxy Dxz Dyy Dyz Dzz; dwi2tensor writes D11 D22 D33 D12 D13 D23;
#: DIPY's lower triangular is Dxx Dxy Dyy Dxz Dyz Dzz.
FSL_PAIRS = [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
MRTRIX_PAIRS = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
DIPY_PAIRS = [(0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]


def oblique(voxel: float = 2.5, flip_x: bool = False) -> np.ndarray:
    """An affine rotated about all three axes; ``flip_x`` stores it LAS (negative determinant)."""
    a, b, c = np.deg2rad([20.0, -12.0, 33.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag([-voxel if flip_x else voxel, voxel, voxel])
    affine[:3, 3] = [-30.0, 12.5, -7.0]
    return affine


def matrices(shape, seed=0) -> np.ndarray:
    """Random symmetric positive-definite tensors (..., 3, 3) in mm^2/s."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.standard_normal(shape + (3, 3)))[0]
    evals = rng.uniform(0.2e-3, 1.7e-3, shape + (3,))
    return np.einsum("...ij,...j,...kj->...ik", q, evals, q)


def stored(full: np.ndarray, pairs) -> np.ndarray:
    return np.stack([full[..., r, c] for r, c in pairs], axis=-1)


def full_from(elements: np.ndarray, pairs) -> np.ndarray:
    full = np.zeros(elements.shape[:-1] + (3, 3))
    for k, (r, c) in enumerate(pairs):
        full[..., r, c] = full[..., c, r] = elements[..., k]
    return full


def unit(vectors):
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def rotation_of(affine):
    linear = affine[:3, :3]
    return linear / np.linalg.norm(linear, axis=0)


def as_fsl(d_voxel, affine):
    """FSL's rule: its bvec frame is the voxel axes with x negated when det(affine) > 0."""
    flip = np.diag([-1.0 if np.linalg.det(affine[:3, :3]) > 0 else 1.0, 1, 1])
    return stored(flip @ d_voxel @ flip, FSL_PAIRS)


def as_mrtrix(d_voxel, affine):
    """MRtrix's rule: scanner frame, D_world = R D_voxel R^T."""
    r = rotation_of(affine)
    return stored(r @ d_voxel @ r.T, MRTRIX_PAIRS)


@pytest.mark.parametrize("flip_x", [False, True], ids=["oblique RAS", "oblique LAS"])
def test_each_convention_gives_the_same_voxel_frame_tensors(flip_x):
    affine = oblique(flip_x=flip_x)
    assert (np.linalg.det(affine[:3, :3]) > 0) != flip_x
    d_voxel = matrices((5, 4, 3), seed=1)
    expected = stored(d_voxel, DIPY_PAIRS)
    scale = np.abs(expected).max()
    for convention, stored_file in (
        ("dipy", expected),
        ("fsl", as_fsl(d_voxel, affine)),
        ("mrtrix", as_mrtrix(d_voxel, affine)),
    ):
        got = to_voxel_frame(stored_file, convention, affine)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-14 * scale, err_msg=convention)
        back = from_voxel_frame(expected, convention, affine)
        np.testing.assert_allclose(back, stored_file, rtol=0, atol=1e-14 * scale)
    # reordering alone (the old behaviour) is wrong on an oblique image
    reordered = stored(full_from(as_mrtrix(d_voxel, affine), MRTRIX_PAIRS), DIPY_PAIRS)
    assert np.abs(reordered - expected).max() > 0.1 * scale


@pytest.mark.parametrize("flip_x", [False, True], ids=["RAS", "LAS"])
def test_round_trips_are_exact(flip_x):
    affine = oblique(flip_x=flip_x)
    d_voxel = matrices((6, 5, 4), seed=2)
    fsl = as_fsl(d_voxel, affine).astype(np.float32)
    np.testing.assert_array_equal(
        from_voxel_frame(to_voxel_frame(fsl, "fsl", affine), "fsl", affine), fsl
    )
    mrtrix = as_mrtrix(d_voxel, affine)
    again = from_voxel_frame(to_voxel_frame(mrtrix, "mrtrix", affine), "mrtrix", affine)
    np.testing.assert_allclose(again, mrtrix, rtol=0, atol=4 * np.finfo(float).eps * 2e-3)
    # float32 files survive the round trip to their own precision
    mrtrix32 = mrtrix.astype(np.float32)
    again32 = from_voxel_frame(to_voxel_frame(mrtrix32, "mrtrix", affine), "mrtrix", affine)
    np.testing.assert_allclose(again32, mrtrix32, rtol=0, atol=2 * np.finfo(np.float32).eps * 2e-3)


def test_principal_directions_of_a_dipy_fit_and_of_mrtrix_tensors_agree(tmp_path):
    """An oblique RAS DWI simulated from world-frame tensors: DIPY fitted on the FSL bvecs
    (voxel frame) and MRtrix's tensors (a fit with the world-frame gradients, as dwi2tensor
    does) give the same principal directions once the MRtrix file is read as MRtrix."""
    affine = oblique(flip_x=False)
    shape = (4, 4, 3)
    d_world = matrices(shape, seed=3)
    d_world = d_world + 2e-3 * np.einsum("i,j->ij", *[np.array([0.6, 0.8, 0.0])] * 2)  # anisotropic
    rng = np.random.default_rng(0)
    directions = disperse_charges(HemiSphere(xyz=unit(rng.standard_normal((30, 3)))), 200)[
        0
    ].vertices
    g_world = np.vstack([np.zeros((3, 3)), directions])
    bvals = np.r_[np.zeros(3), np.full(30, 1000.0)]
    signal = 1000 * np.exp(-bvals * np.einsum("ni,...ij,nj->...n", g_world, d_world, g_world))
    # FSL bvecs: the voxel axes (R^T g), x negated for a positive determinant
    g_fsl = g_world @ rotation_of(affine)
    g_fsl[:, 0] *= -1
    save_nifti(tmp_path / "dwi.nii.gz", signal.astype(np.float32), affine)
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(tmp_path / "dwi.bvec", g_fsl.T, fmt="%.8f")
    mask = np.ones(shape, np.uint8)
    save_nifti(tmp_path / "mask.nii.gz", mask, affine)
    fitted = load_input(tmp_path / "dwi.nii.gz", tmp_path / "mask.nii.gz").dt_lr

    world_fit = TensorModel(gradient_table(bvals, bvecs=g_world)).fit(signal)
    mrtrix = stored(world_fit.quadratic_form, MRTRIX_PAIRS)
    save_nifti(tmp_path / "dt_mrtrix.nii.gz", mrtrix.astype(np.float32), affine)
    as_read = load_input(
        tmp_path / "dt_mrtrix.nii.gz", tmp_path / "mask.nii.gz", tensor_order="mrtrix"
    )

    def principal(dt):
        return np.linalg.eigh(full_from(dt.astype(np.float64), DIPY_PAIRS))[1][..., -1]

    cosine = np.abs(np.sum(principal(fitted) * principal(as_read.dt_lr), axis=-1))
    assert cosine.min() > 0.9999
    # the same file read with order only (the old behaviour) points elsewhere
    as_order_only = stored(full_from(mrtrix, MRTRIX_PAIRS), DIPY_PAIRS)
    wrong = np.abs(np.sum(principal(fitted) * principal(as_order_only), axis=-1))
    assert np.median(wrong) < 0.99


def brain_field(shape, seed=5):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    mask = sum((g / 0.8) ** 2 for g in grid) <= 1.0
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape + (6,)) * np.asarray(STD) + np.asarray(MEAN)
    return values * mask[..., None], mask


@pytest.mark.slow
def test_mrtrix_fsl_and_dipy_inputs_give_the_same_prediction_written_back_in_kind(tmp_path):
    """Must hold: MRtrix tensors on an oblique RAS affine, FSL tensors on a RAS affine and DIPY
    tensors: the three HR outputs agree in the voxel frame, each written in its own convention."""
    models = write_tiny_models(tmp_path / "models", num_blocks=0)
    dt_voxel, mask = brain_field((12, 10, 9))
    ras = np.diag([2.5, 2.5, 2.5, 1.0])
    cases = {
        "mrtrix": (oblique(), as_mrtrix(full_from(dt_voxel, DIPY_PAIRS), oblique())),
        "fsl": (ras, as_fsl(full_from(dt_voxel, DIPY_PAIRS), ras)),
        "dipy": (ras, dt_voxel),
    }
    outputs = {}
    for convention, (affine, elements) in cases.items():
        save_nifti(tmp_path / f"{convention}.nii.gz", elements.astype(np.float32), affine)
        save_nifti(tmp_path / f"{convention}_mask.nii.gz", mask, affine, np.uint8)
    # the MRtrix case through the bundle's own command line, the others through the library
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
        "--input", str(tmp_path / "mrtrix.nii.gz"), "--output_dir", str(tmp_path / "out_mrtrix"),
        "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
        "--tensor_order", "mrtrix", "--roi_size", "10",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for convention in ("fsl", "dipy"):
        run_inference(
            tmp_path / f"{convention}.nii.gz",
            tmp_path / f"out_{convention}",
            *models,
            tensor_order=convention,
            device="cpu",
        )
    for convention in cases:
        image = nib.load(tmp_path / f"out_{convention}" / "dt_hr.nii.gz")
        sidecar = json.loads((tmp_path / f"out_{convention}" / "dt_hr.json").read_text())
        assert sidecar["TensorConvention"] == convention
        assert sidecar["Units"] == "mm^2/s"
        order = {"fsl": FSL_PAIRS, "mrtrix": MRTRIX_PAIRS, "dipy": DIPY_PAIRS}[convention]
        expected_order = [f"D{'xyz'[r]}{'xyz'[c]}" for r, c in order]
        assert sidecar["TensorElementOrder"] == expected_order
        # back to the voxel frame by the tool's own rule (inverse of as_fsl / as_mrtrix)
        full = full_from(np.asarray(image.dataobj, dtype=np.float64), order)
        if convention == "mrtrix":
            r = rotation_of(image.affine)
            full = r.T @ full @ r
        elif convention == "fsl":
            full = full * np.array([[1, -1, -1], [-1, 1, 1], [-1, 1, 1]])
        outputs[convention] = stored(full, DIPY_PAIRS)
        colour = json.loads((tmp_path / f"out_{convention}" / "colour_fa.json").read_text())
        assert "voxel axes" in colour["Description"]
    scale = np.abs(outputs["dipy"]).max()
    for convention in ("mrtrix", "fsl"):
        np.testing.assert_allclose(outputs[convention], outputs["dipy"], rtol=0, atol=1e-5 * scale)
    fa = [np.asarray(nib.load(tmp_path / f"out_{c}" / "fa.nii.gz").dataobj) for c in cases]
    np.testing.assert_allclose(fa[0], fa[2], atol=1e-5)
    np.testing.assert_allclose(fa[1], fa[2], atol=1e-5)

    # --output_tensor_order overrides the input's convention
    run_inference(
        tmp_path / "fsl.nii.gz",
        tmp_path / "out_fsl_as_dipy",
        *models,
        tensor_order="fsl",
        output_tensor_order="dipy",
        device="cpu",
    )
    as_dipy = np.asarray(nib.load(tmp_path / "out_fsl_as_dipy" / "dt_hr.nii.gz").dataobj)
    np.testing.assert_allclose(as_dipy, outputs["dipy"], rtol=0, atol=1e-5 * scale)
    sidecar = json.loads((tmp_path / "out_fsl_as_dipy" / "dt_hr.json").read_text())
    assert sidecar["TensorConvention"] == "dipy" and sidecar["InputTensorConvention"] == "fsl"
