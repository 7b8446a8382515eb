"""Evaluation: metrics.csv and summary.md against hand computations; the bundle command."""

from __future__ import annotations

import csv
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_metrics import cubic_bspline_by_hand, trilinear_by_hand
from tiny_bundle import write_tiny_models

from monai_iqt.evaluation import bundle_evaluate, evaluate
from preprocessing.geometry import lr_affine_from_hr
from preprocessing.io import InputError, save_nifti

REPO = Path(__file__).resolve().parents[1]
EVALUATE_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "evaluate.json"
SUBJECTS = ("hand0", "hand1", "hand2")


def write_hand_subject(root: Path, name: str, seed: int) -> dict[str, np.ndarray]:
    """LR 8x7x9 tensors, HR truth = smooth field + noise, masks with an interior and a rim."""
    rng = np.random.default_rng(seed)
    lr_shape, hr_shape = (8, 7, 9), (16, 14, 18)
    mask_lr = np.zeros(lr_shape, bool)
    mask_lr[1:7, 1:6, 1:8] = True
    mask_hr = np.repeat(np.repeat(np.repeat(mask_lr, 2, 0), 2, 1), 2, 2)
    mask_hr[2, 2:5, 2:5] = False
    dt_lr = rng.uniform(0.2e-3, 1.5e-3, lr_shape + (6,)) * mask_lr[..., None]
    dt_hr = rng.uniform(0.2e-3, 1.5e-3, hr_shape + (6,)) * mask_hr[..., None]
    hr_affine = np.diag([1.25, 1.25, 1.25, 1.0])
    folder = root / name
    save_nifti(folder / "dt_lr.nii.gz", dt_lr, lr_affine_from_hr(hr_affine, 2), np.float32)
    save_nifti(folder / "dt_hr.nii.gz", dt_hr, hr_affine, np.float32)
    save_nifti(folder / "mask_lr.nii.gz", mask_lr, lr_affine_from_hr(hr_affine, 2), np.uint8)
    save_nifti(folder / "mask_hr.nii.gz", mask_hr, hr_affine, np.uint8)
    as_float32 = {k: v.astype(np.float32) for k, v in (("dt_lr", dt_lr), ("dt_hr", dt_hr))}
    return {**as_float32, "mask_lr": mask_lr, "mask_hr": mask_hr}


def rmse_by_hand(prediction, truth, region) -> float:
    squared = [
        (float(prediction[index][c]) - float(truth[index][c])) ** 2
        for index in zip(*np.nonzero(region), strict=True)
        for c in range(6)
    ]
    return (sum(squared) / len(squared)) ** 0.5 / 1e-5


def interior_by_hand(mask_lr, mask_hr, radius=2):
    interior = np.zeros_like(mask_hr)
    for index in itertools.product(*[range(n) for n in mask_hr.shape]):
        j = [i // 2 for i in index]
        ok = all(j[a] - radius >= 0 and j[a] + radius < mask_lr.shape[a] for a in range(3))
        if ok and mask_hr[index]:
            interior[index] = mask_lr[tuple(slice(x - radius, x + radius + 1) for x in j)].all()
    return interior


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("hand_dataset")
    return root, {name: write_hand_subject(root, name, seed) for seed, name in enumerate(SUBJECTS)}


def test_baseline_metrics_match_an_independent_computation(hand_dataset, tmp_path):
    root, subjects = hand_dataset
    result = evaluate(root, tmp_path / "eval", compare=("trilinear", "cubic B-spline"))

    with open(tmp_path / "eval" / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 3 * 3
    expected_total = {}
    for name, data in subjects.items():
        interior = interior_by_hand(data["mask_lr"], data["mask_hr"])
        brain = data["mask_hr"]
        assert 0 < interior.sum() < brain.sum()
        hr_shape = data["dt_hr"].shape[:3]
        dt_lr = data["dt_lr"].astype(np.float64)
        predictions = {
            "nearest": dt_lr.repeat(2, 0).repeat(2, 1).repeat(2, 2),
            "trilinear": trilinear_by_hand(dt_lr, hr_shape, 2),
            "cubic B-spline": cubic_bspline_by_hand(dt_lr, hr_shape, 2),
        }
        for method, prediction in predictions.items():
            row = next(r for r in rows if r["subject"] == name and r["method"] == method)
            for region, mask in (
                ("interior", interior),
                ("exterior", brain & ~interior),
                ("total", brain),
            ):
                expected = rmse_by_hand(prediction, data["dt_hr"], mask)
                assert float(row[f"rmse_{region}"]) == pytest.approx(expected, rel=1e-4)
            expected_total[(name, method)] = float(row["rmse_total"])

    # summary.md: the Fig. 4 layout with mean (± std) over subjects
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| Model | Test subjects | RMSE Interior | RMSE Exterior | RMSE Total |" in summary
    cubic = [expected_total[(name, "cubic B-spline")] for name in SUBJECTS]
    cell = f"{statistics.mean(cubic):.2f} (± {statistics.stdev(cubic):.2f})"
    assert "| cubic B-spline | 3 |" in summary and summary.count(cell) >= 1

    # Wilcoxon signed-rank by hand: W = smaller rank sum of the paired differences
    differences = [
        expected_total[(n, "trilinear")] - expected_total[(n, "cubic B-spline")] for n in SUBJECTS
    ]
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    w = min(ranks[np.array(differences) > 0].sum(), ranks[np.array(differences) < 0].sum())
    assert result.wilcoxon["statistic"] == w
    saved = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert saved["wilcoxon"]["statistic"] == w and saved["wilcoxon"]["n"] == 3
    for name in ("md_axial.png", "colour_fa_axial.png", "abs_error_axial.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_evaluation_input_is_one_sentence(hand_dataset, tmp_path, capsys):
    root, _ = hand_dataset
    with pytest.raises(InputError, match="subject nobody in .* lacks dt_lr"):
        evaluate(root, tmp_path / "eval", subjects=["nobody"])
    with pytest.raises(InputError, match="compare must name two"):
        evaluate(root, tmp_path / "eval", compare=("cubic B-spline", "ESPCN"))
    with pytest.raises(SystemExit) as raised:
        bundle_evaluate(
            dataset_dir=tmp_path / "missing", output_dir=tmp_path / "eval", model_path=None,
            normalisation_path=None,
        )  # fmt: skip
    assert raised.value.code == 2
    stderr = capsys.readouterr().err
    assert "does not exist" in stderr and "python -m preprocessing" in stderr
    assert not (tmp_path / "eval").exists()


def test_bundle_evaluation_leaves_out_training_subjects(hand_dataset, tmp_path, capsys):
    root, _ = hand_dataset
    model_path, normalisation_path = write_tiny_models(
        tmp_path / "models", num_blocks=0, training_subjects=["hand0", "hand2"]
    )
    result = bundle_evaluate(
        dataset_dir=root, output_dir=tmp_path / "eval", model_path=model_path,
        normalisation_path=normalisation_path, device="cpu",
    )  # fmt: skip
    assert {row["subject"] for row in result.rows} == {"hand1"}
    assert "| ESPCN | 1 |" in capsys.readouterr().out
    everything = write_tiny_models(tmp_path / "all", training_subjects=list(SUBJECTS))
    with pytest.raises(SystemExit):
        bundle_evaluate(
            dataset_dir=root, output_dir=tmp_path / "eval2", model_path=everything[0],
            normalisation_path=everything[1], device="cpu",
        )  # fmt: skip
    assert "was used to train the model" in capsys.readouterr().err


@pytest.mark.slow
def test_bundle_evaluation_on_preprocessed_subjects(preprocessed_root, tmp_path):
    model_path, normalisation_path = write_tiny_models(tmp_path / "models", num_blocks=1)
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "evaluation",
        "--config_file", str(EVALUATE_CONFIG), "--dataset_dir", str(preprocessed_root),
        "--output_dir", str(out), "--model_path", str(model_path),
        "--normalisation_path", str(normalisation_path),
        "--subjects", "['synth000','synth002']", "--figure_subject", "synth002",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ESPCN-RN1 | 2 |" in done.stdout and "| cubic B-spline | 2 |" in done.stdout
    assert "Wilcoxon signed-rank test (ESPCN-RN1 vs cubic B-spline" in done.stdout
    with open(out / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert {(r["subject"], r["method"]) for r in rows} == {
        (s, m)
        for s in ("synth000", "synth002")
        for m in ("ESPCN-RN1", "nearest", "trilinear", "cubic B-spline")
    }
    assert all(float(r["rmse_total"]) > 0 for r in rows)
    assert (out / "md_axial.png").stat().st_size > 1000


def test_baselines_without_cubic_still_draw_the_error_figure(hand_dataset, tmp_path):
    root, _ = hand_dataset
    result = evaluate(root, tmp_path / "eval", methods=("nearest", "trilinear"))
    error_png = tmp_path / "eval" / "abs_error_axial.png"
    assert error_png.is_file() and error_png.stat().st_size > 0
    assert {row["method"] for row in result.rows} == {"nearest", "trilinear"}


def test_truncated_volume_is_one_sentence_naming_it(hand_dataset, tmp_path):
    import shutil

    root, subjects = hand_dataset
    name = sorted(subjects)[0]
    shutil.copytree(root / name, tmp_path / "dataset" / name)
    dt_lr = tmp_path / "dataset" / name / "dt_lr.nii.gz"
    dt_lr.write_bytes(dt_lr.read_bytes()[: dt_lr.stat().st_size // 2])
    with pytest.raises(InputError) as raised:
        evaluate(tmp_path / "dataset", tmp_path / "eval")
    message = str(raised.value)
    assert str(dt_lr) in message and "cannot be read" in message and "\n" not in message
