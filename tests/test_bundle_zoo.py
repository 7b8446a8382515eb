"""The bundle as the MONAI model zoo expects it: metadata, TorchScript export, shape check,
a copied bundle running from its own ``models/`` (real ``python -m monai.bundle`` processes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_bundle import MEAN, STD, write_tiny_models

from monai_iqt.inferers import WholeBrainInferer
from monai_iqt.weights import load_model
from preprocessing.io import save_nifti

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "iqt_espcn_rn"

#: Fields the MONAI bundle specification requires in ``metadata.json`` (the schema file,
#: meta_schema_20240725.json, cannot be downloaded here; ``verify_metadata`` checks it online).
REQUIRED_FIELDS = {
    "schema": str,
    "version": str,
    "changelog": dict,
    "monai_version": str,
    "pytorch_version": str,
    "numpy_version": str,
    "required_packages_version": dict,
    "name": str,
    "task": str,
    "description": str,
    "authors": str,
    "copyright": str,
    "network_data_format": dict,
}
TENSOR_FIELDS = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def monai_bundle(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "monai.bundle", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)


def test_metadata_has_the_required_fields_and_a_license():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for field, kind in REQUIRED_FIELDS.items():
        assert isinstance(metadata.get(field), kind), field
    assert metadata["version"] in metadata["changelog"]
    assert "synthetic" in metadata["changelog"][metadata["version"]]
    for role in ("inputs", "outputs"):
        (tensor,) = metadata["network_data_format"][role].values()
        for field in TENSOR_FIELDS:
            assert field in tensor, (role, field)
        assert tensor["num_channels"] == 6 and tensor["dtype"] == "float32"
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    stats = json.loads((BUNDLE / "models" / "normalisation.json").read_text())["extra"]
    assert stats["trained_on"] in metadata["data_source"] or "synthetic" in metadata["data_source"]


@pytest.mark.slow
def test_verify_net_in_out_and_torchscript_export_match_the_eager_network(tmp_path):
    done = monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.json", "--n", "3", "--device", "cpu", cwd=BUNDLE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "verified with no error" in done.stderr + done.stdout

    # scripted, as the zoo's ci/verify_bundle.py exports (no --use_trace), for the deepest
    # shipped network (ESPCN-RN2: reversible blocks and the float64 input stream)
    exported = tmp_path / "model.ts"
    done = monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(exported),
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--bundle_root", ".", "--ckpt_file", "models/espcn_rn2/model.pt",
        "--normalisation_path", "models/espcn_rn2/normalisation.json", cwd=BUNDLE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    scripted = torch.jit.load(str(exported))
    eager, _ = load_model(
        BUNDLE / "models" / "espcn_rn2" / "model.pt",
        BUNDLE / "models" / "espcn_rn2" / "normalisation.json",
    )
    assert eager.num_blocks == 2
    x = torch.randn(1, 6, 19, 14, 11, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = eager.cpu()(x), scripted(x)
    assert actual.shape == expected.shape == (1, 6, 30, 20, 14)  # any input shape
    assert float((actual - expected).abs().max() / expected.abs().max()) <= 1e-6


@pytest.mark.slow
def test_a_copied_bundle_runs_inference_from_its_own_models(tmp_path):
    copy = tmp_path / "elsewhere" / "iqt_espcn_rn"
    shutil.copytree(BUNDLE, copy, ignore=shutil.ignore_patterns("outputs", "evaluation", "runs"))
    # other (validly paired) weights in the copy; the repository's stay as they are
    model_path, normalisation_path = write_tiny_models(copy / "models", num_blocks=0, seed=11)
    rng = np.random.default_rng(0)
    dt_lr = (rng.standard_normal((10, 9, 8, 6)) * np.asarray(STD) + np.asarray(MEAN)).astype(
        np.float32
    )
    affine = np.diag([2.5, 2.5, 2.5, 1.0])
    save_nifti(tmp_path / "scan.nii.gz", dt_lr, affine)

    done = monai_bundle(
        "run", "--config_file", "configs/inference.json", "--input", str(tmp_path / "scan.nii.gz"),
        "--output_dir", str(tmp_path / "out"), "--device", "cpu", cwd=copy,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    written = np.asarray(nib.load(tmp_path / "out" / "dt_hr.nii.gz").dataobj)

    def predicted_by(models: Path) -> np.ndarray:
        network, stats = load_model(models / "model.pt", models / "normalisation.json", "cpu")
        return WholeBrainInferer(network, stats, 2, device="cpu").whole_volume(dt_lr)

    copy_weights = predicted_by(copy / "models")
    shipped_weights = predicted_by(BUNDLE / "models")
    scale = np.abs(copy_weights).max()
    assert np.abs(written - copy_weights).max() < 1e-5 * scale
    assert np.abs(written - shipped_weights).max() > 1e-2 * scale
    record = json.loads((tmp_path / "out" / "inference.json").read_text())
    assert record["model_path"] == "./models/model.pt"

    # the copy's weights beside the shipped statistics: refused, one sentence, exit 2
    shutil.copy(BUNDLE / "models" / "normalisation.json", normalisation_path)
    done = monai_bundle(
        "run", "--config_file", "configs/inference.json", "--input", str(tmp_path / "scan.nii.gz"),
        "--output_dir", str(tmp_path / "out2"), "--device", "cpu", cwd=copy,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "sha256" in error[0] and str(model_path.name) in error[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
@pytest.mark.parametrize("models", ["models", "models/uncertainty", "models/espcn_rn2"])
def test_shipped_synthetic_weights_warn_what_they_were_trained_on(tmp_path, models):
    """Every shipped weight pair loads (its sha256 pair checked), runs, and says what it saw."""
    dt_lr = np.zeros((9, 9, 9, 6), np.float32)
    dt_lr[..., [0, 2, 5]] = 0.7e-3
    save_nifti(tmp_path / "scan.nii.gz", dt_lr, np.diag([2.5, 2.5, 2.5, 1.0]))
    done = monai_bundle(
        "run", "--config_file", "configs/inference.json", "--input", str(tmp_path / "scan.nii.gz"),
        "--output_dir", str(tmp_path / "out"), "--device", "cpu",
        "--model_path", f"{models}/model.pt",
        "--normalisation_path", f"{models}/normalisation.json", cwd=BUNDLE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    shipped = json.loads((BUNDLE / models / "normalisation.json").read_text())["extra"]
    assert shipped["trained_on"].startswith("synthetic-")
    said = f"trained on synthetic phantoms only ({shipped['trained_on']}"
    assert said in done.stdout + done.stderr
    assert (tmp_path / "out" / "dt_hr.nii.gz").is_file()
