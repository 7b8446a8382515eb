"""The model zoo's unit test of this bundle, in the form of Project-MONAI/model-zoo's
``ci/unit_tests/test_<bundle>.py``: each config run in-process by MONAI's ``ConfigWorkflow``
with parameterised overrides, its required properties checked (``check_properties``), then
``initialize``, ``run`` and ``finalize``. Training runs two iterations on a small generated
subject (the session's synthetic fixture subjects); inference then super-resolves the subjects
with the weights that training exported, and must equal the package's own inference path.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow

from monai_iqt.inference import run_inference

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "iqt_espcn_rn"

TEST_CASE_1 = {  # train: 1 subject, 10 patches (8 training, 2 validation), batch 4: 2 iterations
    "bundle_root": str(BUNDLE),
    "subjects": ["synth000"],
    "patches_per_subject": 10,
    "batch_size": 4,
    "epochs": 1,
    "val_interval": 1,
    "num_restarts": 1,
    "num_revnet_blocks": 2,
    "learning_rate": 0.001,
    "log_interval": 1,
}

TEST_CASE_2 = {  # inference on every subject folder of dataset_dir, with the trained weights
    "bundle_root": str(BUNDLE),
    "device": "cpu",
    "roi_size": 8,  # windows smaller than the subject: the halo-exact stitching is exercised
}


@pytest.fixture
def isolated_process_state():
    """The workflow configures the root logger (``logging.conf``) and training installs a Ctrl-C
    handler; both are restored so later tests in this session see the state they expect."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    sigint = signal.getsignal(signal.SIGINT)
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    signal.signal(signal.SIGINT, sigint)


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = False) -> None:
    """As the zoo's ``ci/unit_tests/utils.py``: properties checked, then the workflow run."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()


def workflow(kind: str, config: str, override: dict) -> ConfigWorkflow:
    return ConfigWorkflow(
        workflow_type=kind,
        config_file=str(BUNDLE / "configs" / config),
        logging_file=str(BUNDLE / "configs" / "logging.conf"),
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        **override,
    )


@pytest.mark.parametrize("train_override, infer_override", [(TEST_CASE_1, TEST_CASE_2)])
def test_train_then_infer_config(
    train_override, infer_override, preprocessed_root: Path, tmp_path: Path, isolated_process_state
):
    trained = tmp_path / "trained"
    trainer = workflow(
        "train",
        "train.json",
        {**train_override, "dataset_dir": str(preprocessed_root), "output_dir": str(trained)},
    )
    check_workflow(trainer, check_properties=True)
    assert trainer.max_epochs == 1
    (run,) = json.loads((trained / "runs" / "runs.json").read_text())["runs"]
    assert run["status"] == "finished" and len(run["history"]) == 1
    assert np.isfinite(run["history"][0]["val_rmse"])
    assert trainer.trainer.state.iteration == 2  # two iterations: 8 patches, batch 4
    model_path = trained / "models" / "model.pt"
    normalisation_path = trained / "models" / "normalisation.json"
    stats = json.loads(normalisation_path.read_text())["extra"]
    assert stats["num_blocks"] == 2 and stats["training_subjects"] == ["synth000"]

    out = tmp_path / "sr"
    inferrer = workflow(
        "infer",
        "inference.json",
        {
            **infer_override,
            "dataset_dir": str(preprocessed_root),
            "output_dir": str(out),
            "model_path": str(model_path),
            "normalisation_path": str(normalisation_path),
        },
    )
    check_workflow(inferrer, check_properties=True)
    subjects = sorted(p.name for p in preprocessed_root.iterdir() if (p / "dt_lr.nii.gz").is_file())
    assert subjects == ["synth000", "synth001", "synth002"]
    # the package's own inference path (no config) as the reference
    run_inference(
        preprocessed_root / "synth002" / "dt_lr.nii.gz",
        tmp_path / "reference",
        model_path,
        normalisation_path,
        roi_size=infer_override["roi_size"],
        device="cpu",
    )
    for subject in subjects:
        dt_hr = nib.load(out / subject / "dt_hr.nii.gz")
        mask_hr = np.asarray(nib.load(out / subject / "mask_hr.nii.gz").dataobj, dtype=bool)
        data = np.asarray(dt_hr.dataobj)
        assert data.shape == (24, 28, 24, 6) and data.dtype == np.float32
        assert np.isfinite(data).all() and not data[~mask_hr].any() and data[mask_hr].any()
        record = json.loads((out / subject / "inference.json").read_text())
        assert record["weights_sha256"] == stats["weights_sha256"]
    expected = np.asarray(nib.load(tmp_path / "reference" / "dt_hr.nii.gz").dataobj)
    actual = np.asarray(nib.load(out / "synth002" / "dt_hr.nii.gz").dataobj)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-12)
