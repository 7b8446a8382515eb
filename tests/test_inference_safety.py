"""Inference never destroys data or silently gives a wrong number: refusals, masks, tensor order,
units, real DIPY DWIs, lying headers, truncated files and a full disk (one sentence, exit 2)."""

from __future__ import annotations

import hashlib
import logging
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dipy
import nibabel as nib
import numpy as np
import pytest
from dipy.reconst.dti import from_lower_triangular
from tiny_bundle import MEAN, STD, write_tiny_models

from monai_iqt.inference import run_inference
from monai_iqt.inputs import TENSOR_ORDERS, inference_region
from preprocessing.errors import InputError
from preprocessing.geometry import hr_affine_from_lr, repeat_blocks
from preprocessing.io import TENSOR_ELEMENTS, save_nifti
from preprocessing.tensor_conventions import to_voxel_frame

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "inference.json"
DIPY_FILES = Path(dipy.__file__).parent / "data" / "files"
AFFINE = np.diag([2.5, 2.5, 2.5, 1.0])


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("models"), num_blocks=0)


def brain_tensors(shape=(10, 9, 8), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Positive-definite LR tensors (mm^2/s) inside an ellipsoidal brain, zero outside."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum(g**2 for g in grid) <= 0.8
    dt = np.zeros(shape + (6,), np.float32)
    dt[..., [0, 2, 5]] = 0.7e-3 + rng.uniform(-1e-4, 1e-4, shape + (3,))
    dt[..., [1, 3, 4]] = rng.uniform(-5e-5, 5e-5, shape + (3,))
    return dt * brain[..., None], brain


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_sentence(error: pytest.ExceptionInfo, *fragments: str) -> str:
    message = str(error.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    return message


# ----------------------------------------------------------------------- outputs never overwrite


def test_output_folder_with_preprocessed_subjects_is_refused_in_a_fresh_process(
    preprocessed_root, tmp_path, models
):
    dataset = tmp_path / "dataset"
    shutil.copytree(preprocessed_root, dataset)
    subject = dataset / "synth000"
    before = {p.name: digest(p) for p in subject.iterdir()}
    for output_dir, source in ((subject, subject / "dt_lr.nii.gz"), (dataset, dataset)):
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
            "--input", str(source), "--output_dir", str(output_dir),
            "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "holds preprocessed subjects" in errors[0]
        assert str(output_dir) in errors[0] and "Traceback" not in done.stderr
    assert {p.name: digest(p) for p in subject.iterdir()} == before


def test_input_folder_and_foreign_files_are_refused_and_own_outputs_replaced(tmp_path, models):
    dt, brain = brain_tensors()
    scans = tmp_path / "scans"
    save_nifti(scans / "scan.nii.gz", dt, AFFINE)
    save_nifti(scans / "scan_mask.nii.gz", brain.astype(np.uint8), AFFINE)
    with pytest.raises(InputError) as raised:
        run_inference(scans / "scan.nii.gz", scans, *models, device="cpu")
    one_sentence(raised, "is the folder of the input scan.nii.gz")
    assert sorted(p.name for p in scans.iterdir()) == ["scan.nii.gz", "scan_mask.nii.gz"]

    out = tmp_path / "out"
    out.mkdir()
    (out / "fa.nii.gz").write_bytes(b"someone else's FA map")
    with pytest.raises(InputError) as raised:
        run_inference(scans / "scan.nii.gz", out, *models, device="cpu")
    one_sentence(raised, "fa.nii.gz exists and was not written by monai-iqt inference")
    assert (out / "fa.nii.gz").read_bytes() == b"someone else's FA map"

    (out / "fa.nii.gz").unlink()
    run_inference(scans / "scan.nii.gz", out, *models, device="cpu")
    first = digest(out / "dt_hr.nii.gz")
    run_inference(scans / "scan.nii.gz", out, *models, device="cpu")  # its own files: replaced
    assert digest(out / "dt_hr.nii.gz") == first
    assert (out / "inference.json").is_file()


# ----------------------------------------------------------------------- masks and tensors


def test_mask_beside_the_input_is_used_and_written_at_hr(preprocessed_root, tmp_path, models):
    folder = tmp_path / "subject"
    folder.mkdir()
    for name in ("dt_lr.nii.gz", "mask_lr.nii.gz"):  # no record: a plain folder
        shutil.copy(preprocessed_root / "synth000" / name, folder / name)
    run_inference(folder / "dt_lr.nii.gz", tmp_path / "out", *models, device="cpu")
    mask_lr = np.asarray(nib.load(folder / "mask_lr.nii.gz").dataobj) > 0
    expected = repeat_blocks(inference_region(mask_lr), 2)
    mask_hr = nib.load(tmp_path / "out" / "mask_hr.nii.gz")
    np.testing.assert_array_equal(np.asarray(mask_hr.dataobj) > 0, expected)
    dt_hr = np.asarray(nib.load(tmp_path / "out" / "dt_hr.nii.gz").dataobj)
    assert np.all(dt_hr[~expected] == 0) and np.all(np.any(dt_hr[expected] != 0, axis=-1))
    np.testing.assert_allclose(mask_hr.affine, nib.load(tmp_path / "out" / "dt_hr.nii.gz").affine)


def test_non_positive_definite_tensors_are_counted_and_repaired(tmp_path, models, caplog):
    rng = np.random.default_rng(3)
    dt = (rng.standard_normal((9, 9, 9, 6)) * np.asarray(STD) + np.asarray(MEAN)).astype("f4")
    dt[..., [0, 2, 5]] = np.abs(dt[..., [0, 2, 5]]) + 3e-4  # plausible MD; the untrained net
    save_nifti(tmp_path / "dt.nii.gz", dt, AFFINE)  # still predicts non-PD tensors
    with caplog.at_level(logging.WARNING, logger="monai_iqt.outputs"):
        run_inference(tmp_path / "dt.nii.gz", tmp_path / "raw", *models, device="cpu")
    warning = " ".join(r.getMessage() for r in caplog.records)
    raw = np.asarray(nib.load(tmp_path / "raw" / "dt_hr.nii.gz").dataobj).reshape(-1, 6)
    smallest = np.linalg.eigvalsh(from_lower_triangular(raw.astype(np.float64)))[:, 0]
    assert f"{int(np.count_nonzero(smallest <= 0))} of {raw.shape[0]} brain voxels" in warning

    run_inference(
        tmp_path / "dt.nii.gz", tmp_path / "fixed", *models, device="cpu", repair_tensors=True
    )
    fixed = np.asarray(nib.load(tmp_path / "fixed" / "dt_hr.nii.gz").dataobj).reshape(-1, 6)
    evals = np.linalg.eigvalsh(from_lower_triangular(fixed.astype(np.float64)))
    assert evals.min() > 0  # every brain tensor positive definite
    np.testing.assert_allclose(evals[smallest <= 0, 0], 1e-6, rtol=1e-2)  # clipped to the floor
    good = smallest > 1e-6  # tensors that needed no repair are kept
    np.testing.assert_allclose(fixed[good], raw[good], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("order", ["fsl", "mrtrix"])
def test_tensor_order_converts_to_dipy_order_and_back(tmp_path, models, order):
    dt, _ = brain_tensors(seed=4)
    save_nifti(tmp_path / "dipy.nii.gz", dt, AFFINE)
    columns = [TENSOR_ELEMENTS.index(name) for name in TENSOR_ORDERS[order]]
    in_frame = dt.copy()
    if order == "fsl":  # a RAS-stored image: FSL's bvec frame negates x, so Dxy and Dxz flip
        in_frame[..., [1, 3]] *= -1
    save_nifti(tmp_path / f"{order}.nii.gz", in_frame[..., columns], AFFINE)
    assert TENSOR_ORDERS["fsl"][:3] == ("Dxx", "Dxy", "Dxz")  # dtifit: xx,xy,xz,yy,yz,zz
    assert TENSOR_ORDERS["mrtrix"][:3] == ("Dxx", "Dyy", "Dzz")  # dwi2tensor: xx,yy,zz,xy,xz,yz
    run_inference(tmp_path / "dipy.nii.gz", tmp_path / "a", *models, device="cpu")
    run_inference(
        tmp_path / f"{order}.nii.gz", tmp_path / "b", *models, device="cpu", tensor_order=order
    )
    a = np.asarray(nib.load(tmp_path / "a" / "dt_hr.nii.gz").dataobj)
    b = nib.load(tmp_path / "b" / "dt_hr.nii.gz")  # written back in the input's convention
    np.testing.assert_array_equal(a, to_voxel_frame(np.asarray(b.dataobj), order, b.affine))
    # read as DIPY order, the FSL/MRtrix file is a different (wrong) tensor
    assert not np.allclose(dt, dt[..., columns])


@pytest.mark.parametrize(
    ("scale", "unit"), [(1e3, "um^2/ms"), (1e-6, "m^2/s")], ids=["um2/ms", "m2/s"]
)
def test_units_check_names_the_likely_unit(tmp_path, scale, unit):
    dt, _ = brain_tensors()
    save_nifti(tmp_path / "scaled.nii.gz", dt * scale, AFFINE)
    with pytest.raises(InputError) as raised:
        run_inference(tmp_path / "scaled.nii.gz", tmp_path / "out", "no.pt", "no.json")
    one_sentence(raised, "scaled.nii.gz", "median mean diffusivity", unit)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------- real DWIs from DIPY


@pytest.mark.parametrize("name", ["small_64D.nii", "small_101D.nii.gz"])
def test_dipy_real_dwis_give_finite_maps_twice_the_size(tmp_path, models, name, caplog):
    stem = name.removesuffix(".gz").removesuffix(".nii")
    for suffix in (name, f"{stem}.bval", f"{stem}.bvec"):
        shutil.copy(DIPY_FILES / suffix, tmp_path / suffix)
    image = nib.load(tmp_path / name)
    with caplog.at_level(logging.INFO, logger="monai_iqt.inputs"):
        written = run_inference(
            tmp_path / name, tmp_path / "out", *models, device="cpu", voxel_size_mismatch="allow"
        )
    assert "median_otsu" in caplog.text  # no mask given or found: DIPY's brain mask
    paths = written[stem]
    for key in ("dt_hr", "md", "fa", "colour_fa", "mask_hr"):
        result = nib.load(paths[key])
        assert result.shape[:3] == tuple(2 * s for s in image.shape[:3]), key
        assert np.all(np.isfinite(np.asarray(result.dataobj))), key
        np.testing.assert_allclose(result.affine, hr_affine_from_lr(image.affine, 2), atol=1e-6)
    assert np.asarray(nib.load(paths["mask_hr"]).dataobj).any()


# ----------------------------------------------------------------------- broken files


def test_lying_header_truncated_input_and_truncated_mask_are_one_sentence(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((2000, 2000, 2000, 6))
    header.set_data_dtype(np.float32)
    image = nib.Nifti1Image(np.zeros((1, 1, 1, 1), np.float32), AFFINE, header)
    image.header.set_data_shape((2000, 2000, 2000, 6))
    (tmp_path / "huge.nii").write_bytes(image.header.binaryblock + b"\0" * 4 + b"\0" * 64)

    dt, brain = brain_tensors(shape=(20, 20, 20))
    save_nifti(tmp_path / "good.nii.gz", dt, AFFINE)
    save_nifti(tmp_path / "full_mask.nii.gz", brain.astype(np.uint8), AFFINE)
    whole = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    mask = (tmp_path / "full_mask.nii.gz").read_bytes()
    (tmp_path / "broken_mask.nii.gz").write_bytes(mask[: len(mask) // 2])
    cases = {
        "huge.nii": ({}, ("huge.nii", "2000", "GB")),
        "cut.nii.gz": ({}, ("cut.nii.gz",)),
        "good.nii.gz": ({"mask": tmp_path / "broken_mask.nii.gz"}, ("broken_mask.nii.gz",)),
    }
    for name, (extra, fragments) in cases.items():
        with pytest.raises(InputError) as raised:
            run_inference(tmp_path / name, tmp_path / "out", "no.pt", "no.json", **extra)
        one_sentence(raised, *fragments)
    assert not (tmp_path / "out").exists()


def _small_file_limit() -> None:  # runs in the child: writes beyond 30 kB fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))


@pytest.mark.slow
def test_full_disk_writes_all_outputs_or_none_in_a_fresh_process(tmp_path, models):
    dt, brain = brain_tensors(shape=(16, 16, 16), seed=5)
    save_nifti(tmp_path / "scan.nii.gz", dt, AFFINE)
    save_nifti(tmp_path / "scan_mask.nii.gz", brain.astype(np.uint8), AFFINE)
    out = tmp_path / "out"
    run_inference(tmp_path / "scan.nii.gz", out, *models, device="cpu")
    before = {p.name: digest(p) for p in out.iterdir()}
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
        "--input", str(tmp_path / "scan.nii.gz"), "--output_dir", str(out),
        "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
        "--repair_tensors", "true", "--device", "cpu",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=_small_file_limit
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "could not write the outputs" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert {p.name: digest(p) for p in out.iterdir()} == before  # no temporaries left either


@pytest.mark.slow
def test_bad_settings_on_the_command_line_are_one_sentence(tmp_path, models):
    """Settings are checked in the config's ``initialize`` step (the others as these two)."""
    dt, _ = brain_tensors()
    save_nifti(tmp_path / "scan.nii.gz", dt, AFFINE)
    for setting, value, expected in (
        ("--inference_mode", "tiles", "inference_mode 'tiles' is not one of"),
        ("--repair_tensors", "maybe", "expected true or false"),
    ):
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE_CONFIG),
            "--input", str(tmp_path / "scan.nii.gz"), "--output_dir", str(tmp_path / "out"),
            "--model_path", str(models[0]), "--normalisation_path", str(models[1]),
            setting, value,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        assert done.returncode == 2 and len(errors) == 1, (setting, done.stderr[-2000:])
        assert expected in errors[0] and "Traceback" not in done.stderr, errors[0]
    assert not (tmp_path / "out").exists()
