"""The training bundle run for real: ``python -m monai.bundle run`` in subprocesses on the
tiny preprocessed synthetic subjects of ``conftest.py`` (3 subjects, LR 12 x 14 x 12).

One uninterrupted reference run (2 restarts x 2 epochs, ESPCN-RN2) is compared with: its own outputs
(TensorBoard events, runs.json, exported model), a run killed after one epoch and resumed, a
run in the other execution mode, a diverging run and a run on an empty dataset folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import training_commands
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_commands import ENV, REPO

from monai_iqt.data import NormalisationStats, build_patch_data
from monai_iqt.networks import ESPCN_RN

SETTINGS = {
    "patches_per_subject": 10,
    "num_revnet_blocks": 2,
    "batch_size": 4,
    "learning_rate": 0.001,
    "epochs": 2,
    "num_restarts": 2,
    "seed": 0,
}

pytestmark = pytest.mark.slow


def training_command(dataset_dir: Path, output_dir: Path, **overrides) -> list[str]:
    return training_commands.training_command(dataset_dir, output_dir, **{**SETTINGS, **overrides})


def run_training(dataset_dir: Path, output_dir: Path, **overrides) -> subprocess.CompletedProcess:
    return training_commands.run_training(dataset_dir, output_dir, **{**SETTINGS, **overrides})


def load_runs(output_dir: Path) -> dict:
    return json.loads((output_dir / "runs" / "runs.json").read_text())


def load_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(preprocessed_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted training: 2 restarts (seeds 0 and 1) of 2 epochs, memory-efficient mode."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run_training(preprocessed_root, output_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


def test_training_writes_tensorboard_runs_and_a_loadable_best_model(
    reference: Path, preprocessed_root: Path
) -> None:
    runs = load_runs(reference)
    assert [r["seed"] for r in runs["runs"]] == [0, 1]
    assert runs["runs"][0]["weights_sha256"] != runs["runs"][1]["weights_sha256"]
    for record in runs["runs"]:
        assert record["status"] == "finished" and record["epochs_completed"] == 2
        losses = [e["train_loss"] for e in record["history"]]
        assert losses[-1] < losses[0], f"training loss did not decrease: {losses}"
        rates = [e["learning_rate"] for e in record["history"]]
        assert rates[0] == pytest.approx(1e-3) and rates[1] < rates[0], "no decaying schedule"
        # where the epochs' time went, summed over the run's epochs
        seconds = record["epoch_seconds"]
        assert set(seconds) == {"patches", "step", "validation", "other"}
        assert seconds["step"] > 0 and seconds["validation"] > 0

        # TensorBoard: one event file per run with loss, validation RMSE and learning rate.
        run_dir = Path(record["run_dir"])
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(run_dir))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train_loss", "train_loss_iteration", "val_rmse", "learning_rate"} <= tags
        val_curve = [e.value for e in events.Scalars("val_rmse")]
        np.testing.assert_allclose(val_curve, [e["val_rmse"] for e in record["history"]], rtol=1e-6)

    best = min(runs["runs"], key=lambda r: r["best_val_rmse"])
    assert runs["best_run"] == best["index"]
    model = load_state(reference / "models" / "model.pt")
    assert_same_state(model, load_state(Path(best["best_checkpoint"])))

    stats = NormalisationStats.load(reference / "models" / "normalisation.json")
    extra = stats.extra
    assert extra["upscale_factor"] == 2 and extra["num_blocks"] == 2
    # Weights and statistics are one unit: the statistics name model.pt's bytes.
    model_bytes = (reference / "models" / "model.pt").read_bytes()
    assert extra["weights_sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert extra["training_subjects"] == ["synth000", "synth001", "synth002"]
    assert extra["trained_on"] == "synthetic-geometric"  # the fixture's raw data has ground_truth
    assert extra["predict_variance"] is False and extra["dropout_rate"] == 0.0
    assert extra["settings"]["num_revnet_blocks"] == 2 and extra["settings"]["seed"] == 0
    assert [name for name, _ in extra["settings"]["subjects"]] == extra["training_subjects"]
    assert extra["lr_patch_size"] == 11 and extra["hr_patch_size"] == 14
    assert extra["lr_voxel_size_mm"] == pytest.approx([2.5, 2.5, 2.5])
    assert extra["tensor_elements"] == ["Dxx", "Dxy", "Dyy", "Dxz", "Dyz", "Dzz"]

    # Oracle: rebuild the validation patches independently and score the exported model in both
    # modes; it must reproduce the best validation RMSE recorded during training.
    data = build_patch_data(preprocessed_root, patches_per_subject=10, seed=0)
    np.testing.assert_allclose(data.stats.target_std, stats.target_std, rtol=1e-12)
    images = torch.stack([data.val_dataset[i]["image"] for i in range(len(data.val_dataset))])
    labels = torch.stack([data.val_dataset[i]["label"] for i in range(len(data.val_dataset))])
    for memory_efficient in (False, True):
        network = ESPCN_RN(num_blocks=2, memory_efficient=memory_efficient, upscale_factor=2)
        network.load_state_dict(model)
        network.eval()
        with torch.enable_grad():  # memory-efficient mode takes its engine only under autograd
            prediction = network(images.requires_grad_(memory_efficient)).detach()
        # labels are NaN outside the brain (no target): nanmean skips them
        rmse = torch.sqrt(torch.nanmean((prediction.double() - labels.double()) ** 2)).item()
        assert rmse == pytest.approx(best["best_val_rmse"], rel=1e-5)


def test_killed_after_one_epoch_and_resumed_equals_uninterrupted(
    reference: Path, preprocessed_root: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "killed"
    process = subprocess.Popen(
        training_command(preprocessed_root, output_dir),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = output_dir / "runs" / "run_0" / "checkpoint_last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    trainer = load_state(last)["trainer"]
    assert trainer["iteration"] == trainer["epoch_length"], "not killed right after epoch 1"
    assert not (output_dir / "runs" / "runs.json").exists(), "the first run had already finished"

    result = run_training(preprocessed_root, output_dir, resume=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed, uninterrupted = load_runs(output_dir), load_runs(reference)
    assert resumed["runs"][0]["resumed_from"] and not resumed["runs"][1]["resumed_from"]
    for a, b in zip(resumed["runs"], uninterrupted["runs"], strict=True):
        assert a["history"] == b["history"]
        assert a["weights_sha256"] == b["weights_sha256"]
        assert_same_state(
            load_state(Path(a["best_checkpoint"])), load_state(Path(b["best_checkpoint"]))
        )
    # Run 1 started from scratch in both processes: the same seed gives the same weights.
    assert_same_state(
        load_state(output_dir / "models" / "model.pt"),
        load_state(reference / "models" / "model.pt"),
    )


def test_plain_and_memory_efficient_modes_give_the_same_loss_curve(
    reference: Path, preprocessed_root: Path, tmp_path: Path
) -> None:
    result = run_training(preprocessed_root, tmp_path, memory_efficient=False, num_restarts=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plain = load_runs(tmp_path)["runs"][0]["history"]
    efficient = load_runs(reference)["runs"][0]["history"]
    # Float tolerance of a training curve: float32 rounding differences grow through Adam steps.
    # Measured here (ESPCN-RN2, these patches, lr 1e-3): scaling the plain run's initial weights
    # by (1 + 2^-23), one float32 ulp, moves its epoch losses by 1.2e-4 and 1.4e-3 relative;
    # memory-efficient vs plain differ by 3e-5 and 1.5e-4 (in-process) and 4e-6 and 4e-4 here.
    for key in ("train_loss", "val_rmse"):
        np.testing.assert_allclose([e[key] for e in plain], [e[key] for e in efficient], rtol=2e-3)
    model_plain = load_state(tmp_path / "models" / "model.pt")
    model_efficient = load_state(Path(load_runs(reference)["runs"][0]["best_checkpoint"]))
    # The two runs did take different engines: their float rounding differs.
    assert not all(torch.equal(v, model_efficient[k]) for k, v in model_plain.items())
    assert (
        NormalisationStats.load(tmp_path / "models" / "normalisation.json").extra[
            "memory_efficient"
        ]
        is False
    )


def test_nan_loss_stops_naming_epoch_and_iteration_and_keeps_last_good_checkpoint(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    # lr_decay 1e12 turns the learning rate of epoch 2 into 1e9: Adam's first step there blows
    # the weights up and the loss becomes infinite or NaN.
    result = run_training(preprocessed_root, tmp_path, lr_decay=1e12, num_restarts=1)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "training diverged: the loss became" in output
    assert "Traceback" not in output
    assert "at epoch 2, iteration" in output and "checkpoint_last.pt is kept" in output
    last = load_state(tmp_path / "runs" / "run_0" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == last["trainer"]["epoch_length"]  # end of epoch 1
    assert all(torch.isfinite(v).all() for v in last["network"].values() if v.is_floating_point())
    assert load_runs(tmp_path)["runs"][0]["status"] == "diverged"
    assert not (tmp_path / "models" / "model.pt").exists()


def test_dataset_dir_without_subjects_stops_with_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_training(tmp_path / "empty", tmp_path / "out")
    assert result.returncode == 2
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'empty'} holds no preprocessed subject (no <subject>/"
        "preprocessing.json): run `python -m preprocessing hcp --hcp-root RAW --out DATASET` "
        "first."
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_best_run_is_the_lowest_validation_rmse(reference: Path) -> None:
    runs = load_runs(reference)
    for record in runs["runs"]:
        scores = [e["val_rmse"] for e in record["history"]]
        assert record["best_val_rmse"] == min(scores)
        assert record["best_epoch"] == 1 + scores.index(min(scores))
        assert all(math.isfinite(s) for s in scores)


def test_variance_model_trains_with_gaussian_nll_and_validates_on_the_mean(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    result = run_training(
        preprocessed_root,
        tmp_path,
        num_revnet_blocks=1,
        epochs=1,
        num_restarts=1,
        predict_variance=True,
        loss="gaussian_nll",
        dropout_rate=0.1,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = load_runs(tmp_path)["runs"][0]
    extra = NormalisationStats.load(tmp_path / "models" / "normalisation.json").extra
    assert extra["predict_variance"] is True and extra["dropout_rate"] == 0.1
    assert extra["loss"] == "gaussian_nll" and extra["settings"]["loss"] == "gaussian_nll"
    model = load_state(tmp_path / "models" / "model.pt")
    network = ESPCN_RN(num_blocks=1, predict_variance=True, dropout_rate=0.1)
    network.load_state_dict(model)
    network.eval()  # no dropout: what the evaluator scored

    # Oracle: the mean channels (the first 6 of 12) scored on the rebuilt validation patches.
    data = build_patch_data(preprocessed_root, patches_per_subject=10, seed=0)
    images = torch.stack([data.val_dataset[i]["image"] for i in range(len(data.val_dataset))])
    labels = torch.stack([data.val_dataset[i]["label"] for i in range(len(data.val_dataset))])
    with torch.no_grad():
        prediction = network(images)
    assert prediction.shape[1] == 12
    mean = prediction[:, :6].double()
    rmse = torch.sqrt(torch.nanmean((mean - labels.double()) ** 2)).item()  # NaN: no target
    assert rmse == pytest.approx(record["best_val_rmse"], rel=1e-5)
