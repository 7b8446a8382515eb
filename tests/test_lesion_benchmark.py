"""``python -m monai_iqt.benchmark lesion``: sigma over a synthetic lesion against its twin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_bundle import write_tiny_models

from monai_iqt.benchmark.lesion import LESION_MASK, voxel_rms
from monai_iqt.data.subjects import load_subject
from monai_iqt.evaluation import lr_brain_region
from monai_iqt.inferers import make_inferer
from preprocessing.io import read_nifti

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600, env=ENV
    )


@pytest.mark.slow
def test_lesion_sigma_table_matches_the_inferer_and_draws_both_maps(tmp_path: Path) -> None:
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    for extra in ([], ["--lesion"]):
        made = _run(
            "preprocessing", "synthetic", "--anatomy", "mni152", "--voxel-size", "2.5",
            "--out", str(raw), "--count", "1", "--seed", "3", *extra,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
    done = _run("preprocessing", "hcp", "--hcp-root", str(raw), "--out", str(pre), "--no-progress")
    assert done.returncode == 0, done.stderr
    model, stats = write_tiny_models(tmp_path / "models", predict_variance=True)
    figure = tmp_path / "lesion.png"
    run = _run(
        "monai_iqt.benchmark", "lesion", "--dataset_dir", str(pre), "--raw_dir", str(raw),
        "--subject", "synth000", "--model_path", str(model), "--normalisation_path", str(stats),
        "--figure", str(figure),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert figure.stat().st_size > 10_000
    # independent recomputation of the lesion-free twin's mean sigma inside the lesion
    inferer = make_inferer(model, stats, device="cpu")
    lesion_hr = read_nifti(raw / "synth000_lesion" / LESION_MASK)[0] > 0
    sigmas = []
    for name in ("synth000", "synth000_lesion"):
        subject = load_subject(pre / name)
        _, std = inferer.predict_with_std(
            subject.dt_lr, lr_brain_region(subject.mask_hr, subject.upscale_factor)
        )
        inside = lesion_hr[tuple(slice(0, n) for n in subject.mask_hr.shape)] & subject.mask_hr
        assert inside.sum() > 0
        sigmas.append(float(voxel_rms(std)[inside].mean()))
    rows = re.findall(r"^\| (synth000\S*) \| ([\d.]+) \|", run.stdout, flags=re.M)
    assert [name for name, _ in rows] == ["synth000", "synth000_lesion"]
    for (_, printed), sigma in zip(rows, sigmas, strict=True):
        assert float(printed) == pytest.approx(sigma / 1e-5, abs=0.006)
    ratio = float(re.search(r"σ ratio in the lesion .*: ([\d.]+)", run.stdout).group(1))
    assert ratio == pytest.approx(sigmas[1] / sigmas[0], abs=0.006)


def test_a_model_without_uncertainty_is_refused(tmp_path: Path) -> None:
    model, stats = write_tiny_models(tmp_path / "models")
    run = _run(
        "monai_iqt.benchmark", "lesion", "--dataset_dir", str(tmp_path), "--raw_dir",
        str(tmp_path), "--subject", "s", "--model_path", str(model), "--normalisation_path",
        str(stats),
    )  # fmt: skip
    assert run.returncode == 2
    assert "predicts no uncertainty" in run.stderr.splitlines()[-1]
