"""``python -m monai_iqt.benchmark lesion``: sigma over a synthetic lesion against its twin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_bundle import write_tiny_models

from monai_iqt.benchmark.lesion import LESION_MASK
from monai_iqt.data.subjects import load_subject
from monai_iqt.inferers import make_inferer
from preprocessing.geometry import block_any
from preprocessing.io import read_nifti

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600, env=ENV
    )


@pytest.mark.slow
def test_lesion_table_matches_the_inferer_and_draws_both_maps(tmp_path: Path) -> None:
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for extra in ([], ["--lesion", "--lesion-md-factor", "3"]):
        made = _run(
            "preprocessing", "synthetic", "--anatomy", "mni152", "--voxel-size", "2.5",
            "--out", str(raw), "--count", "2", "--seed", "3", *extra,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
    done = _run("preprocessing", "hcp", "--hcp-root", str(raw), "--out", str(pre), "--no-progress")
    assert done.returncode == 0, done.stderr
    model, stats = write_tiny_models(tmp_path / "models", predict_variance=True)
    figure = tmp_path / "lesion.png"
    run = _run(
        "monai_iqt.benchmark", "lesion", "--dataset_dir", str(pre), "--raw_dir", str(raw),
        "--subjects", "synth000", "synth001", "--model_path", str(model),
        "--normalisation_path", str(stats), "--figure", str(figure),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert figure.stat().st_size > 10_000
    lines = [line for line in run.stdout.splitlines() if line.startswith("| synth00")]
    printed = [[float(cell) for cell in line.strip("| ").split(" | ")[1:]] for line in lines]
    # independent recomputation inside each lesion: sigma, |error| and 2-sigma coverage by hand
    inferer = make_inferer(model, stats, device="cpu")
    expected = []
    for subject in ("synth000", "synth001"):
        lesion_hr = read_nifti(raw / f"{subject}_lesion" / LESION_MASK)[0] > 0
        values = {}
        for name in (subject, f"{subject}_lesion"):
            data = load_subject(pre / name)
            mean, std = inferer.predict_with_std(
                data.dt_lr, block_any(data.mask_hr, data.upscale_factor)
            )
            inside = lesion_hr[: mean.shape[0], : mean.shape[1], : mean.shape[2]] & data.mask_hr
            error = np.abs(mean - data.dt_hr)[inside]
            values[name] = (
                inside.sum(),
                np.sqrt(np.mean(std[inside] ** 2, axis=1)).mean() / 1e-5,
                np.sqrt(np.mean(error**2, axis=1)).mean() / 1e-5,
                np.mean(error <= 2 * std[inside]),
            )
        (voxels, s0, e0, c0), (_, s1, e1, c1) = values.values()
        assert voxels > 0
        expected.append([voxels, s0, s1, s1 / s0, e0, e1, e1 / e0, None, None, c0, c1])
    assert len(printed) == 2
    for row, oracle in zip(printed, expected, strict=True):
        for value, wanted in zip(row, oracle, strict=True):
            if wanted is not None:
                assert value == pytest.approx(wanted, abs=0.006)
    mean_row = next(line for line in run.stdout.splitlines() if line.startswith("| mean |"))
    ratio_mean = float(mean_row.split(" | ")[4])
    assert ratio_mean == pytest.approx((expected[0][3] + expected[1][3]) / 2, abs=0.006)


def test_a_model_without_uncertainty_is_refused(tmp_path: Path) -> None:
    model, stats = write_tiny_models(tmp_path / "models")
    run = _run(
        "monai_iqt.benchmark", "lesion", "--dataset_dir", str(tmp_path), "--raw_dir",
        str(tmp_path), "--subjects", "s", "--model_path", str(model), "--normalisation_path",
        str(stats),
    )  # fmt: skip
    assert run.returncode == 2
    assert "predicts no uncertainty" in run.stderr.splitlines()[-1]


@pytest.mark.slow
def test_a_missing_twin_is_one_sentence_before_any_inference(tmp_path: Path) -> None:
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    made = _run(
        "preprocessing", "synthetic", "--anatomy", "mni152", "--voxel-size", "2.5",
        "--slab", "30", "40", "--out", str(raw), "--count", "1", "--seed", "3",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    done = _run("preprocessing", "hcp", "--hcp-root", str(raw), "--out", str(pre), "--no-progress")
    assert done.returncode == 0, done.stderr
    model, stats = write_tiny_models(tmp_path / "models", predict_variance=True)
    argv = ["monai_iqt.benchmark", "lesion", "--dataset_dir", str(pre), "--raw_dir", str(raw)]
    argv += ["--model_path", str(model), "--normalisation_path", str(stats)]
    figure = tmp_path / "lesion.png"
    # the lesion twin was never preprocessed
    run = _run(*argv, "--subjects", "synth000", "--figure", str(figure))
    assert run.returncode == 2 and run.stderr.startswith("error: "), run.stderr
    assert run.stderr.count("\n") == 1 and "synth000_lesion" in run.stderr
    assert not figure.exists()
    # preprocessed, but the raw folder lacks its lesion mask
    (pre / "synth000_lesion").symlink_to(pre / "synth000")
    run = _run(*argv, "--subjects", "synth000", "--figure", str(figure))
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "lesion_mask.nii.gz is missing" in run.stderr and "--lesion" in run.stderr
    assert not figure.exists()
