"""The depth study run for real: ``python -m monai.bundle run`` with ``train.json`` + ``study.json``
in subprocesses on the tiny preprocessed subjects of ``conftest.py`` (train synth000-001, test
synth002; depths [0, 1], training-set sizes [1, 2]; 1 epoch, 10 patches, 1 restart per cell).

An uninterrupted study is the reference for its own outputs and for a study killed (SIGKILL) in
the middle of a cell and rerun. Bad settings are one sentence and exit code 2.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monai_iqt.data import NormalisationStats
from monai_iqt.study import (
    CUBIC,
    METRICS_COLUMNS,
    _check_same_training,
    bundle_study,
    paired_wilcoxon,
    unforwarded_settings,
)
from monai_iqt.training.settings import compare_settings
from preprocessing.io import InputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "iqt_espcn_rn" / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = {
    "train_subjects": ["synth000", "synth001"],
    "test_subjects": ["synth002"],
    "depths": [0, 1],
    "tvs_sizes": [1, 2],
    "epochs": 1,
    "patches_per_subject": 10,
    "num_restarts": 1,
    "batch_size": 4,
    "learning_rate": 0.001,
    "seed": 0,
    "memory_steps": 1,
}
CELLS = ("ESPCN_tvs1", "ESPCN-RN1_tvs1", "ESPCN_tvs2", "ESPCN-RN1_tvs2")


def study_command(dataset_dir: Path, output_dir: Path, **overrides) -> list[str]:
    settings = {
        **TINY,
        **overrides,
        "bundle_root": str(CONFIGS.parent),
        "dataset_dir": str(dataset_dir),
        "output_dir": str(output_dir),
    }
    config_files = [str(CONFIGS / "train.json"), str(CONFIGS / "study.json")]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(config_files)]
    for key, value in settings.items():
        command += [f"--{key}", repr(value)]
    return command


def run_study(dataset_dir: Path, output_dir: Path, **overrides) -> subprocess.CompletedProcess:
    return subprocess.run(
        study_command(dataset_dir, output_dir, **overrides),
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )


def read_metrics(output_dir: Path) -> list[dict[str, str]]:
    with open(output_dir / "metrics.csv", newline="") as stream:
        return list(csv.DictReader(stream))


# --------------------------------------------------------------------------- fast


def test_wilcoxon_p_value_is_the_exact_signed_rank_probability() -> None:
    # 8 subjects where the model always wins: W = 0, exact two-sided p = 2 / 2^8.
    rows = []
    for index in range(8):
        rows.append({"subject": f"s{index}", "model": "A", "total": 5.0 + 0.1 * index})
        rows.append({"subject": f"s{index}", "model": "B", "total": 6.0 + 0.3 * index})
    assert paired_wilcoxon(rows, {"model": "A"}, {"model": "B"}) == pytest.approx(2 / 256)
    assert paired_wilcoxon(rows[:2], {"model": "A"}, {"model": "B"}) is None  # one pair


def test_study_json_forwards_every_training_setting_to_the_cells() -> None:
    study = json.loads((CONFIGS / "study.json").read_text())
    assert unforwarded_settings(CONFIGS / "train.json", study["cell_overrides"]) == []
    # each forwarded setting is the merged config's own value (a command-line override reaches
    # the cells), and exists in train.json
    train = json.loads((CONFIGS / "train.json").read_text())
    for key, value in study["cell_overrides"].items():
        assert value == f"@{key}" and key in train, key


BAD_SETTINGS = [
    ({"depths": [0, -2]}, "depths must be >= 0"),
    ({"tvs_sizes": [1, 3]}, "tvs_sizes asks for 3 training subjects but only 2"),
    ({"test_subjects": ["synth002", "synth001"]}, "synth001 is both a training and a test"),
    ({"depths": []}, "depths is empty"),
    ({"tvs_sizes": []}, "tvs_sizes is empty"),
    ({"cell_overrides": {"target_region": "mask"}}, "setting target_region must be one of"),
    ({"cell_overrides": {"learning_rate": "1e-3x"}}, "setting learning_rate must be a number"),
]


@pytest.mark.parametrize(("overrides", "sentence"), BAD_SETTINGS)
def test_bad_settings_stop_with_one_sentence_and_exit_2(
    preprocessed_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    overrides: dict,
    sentence: str,
) -> None:
    settings = {
        key: value
        for key, value in {**TINY, **overrides}.items()
        if key in ("train_subjects", "test_subjects", "depths", "tvs_sizes", "cell_overrides")
    }
    with pytest.raises(SystemExit) as stop:
        bundle_study(
            dataset_dir=preprocessed_root,
            output_dir=tmp_path / "study",
            train_config=CONFIGS / "train.json",
            **settings,
        )
    assert stop.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and sentence in errors[0]
    assert not (tmp_path / "study").exists()


def test_bad_setting_on_the_command_line_is_one_sentence_and_exit_2(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    result = run_study(preprocessed_root, tmp_path / "study", depths=[0, -2])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: depths must be >= 0 reversible blocks per stack, got -2."]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "study").exists()


def test_mc_samples_without_dropout_is_refused_before_any_cell_is_trained(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    """As the bundle's inference refuses it: Monte Carlo samples of a network without dropout
    would all be equal, a zero sigma."""
    result = run_study(preprocessed_root, tmp_path / "study", inferer_options={"mc_samples": 3})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: mc_samples 3 needs weights trained with dropout, but the models are trained "
        "with dropout_rate 0.0: give --dropout_rate > 0 or mc_samples 1."
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "study").exists()


# --------------------------------------------------------------------------- the study


@pytest.fixture(scope="module")
def reference(preprocessed_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny study."""
    output_dir = tmp_path_factory.mktemp("study") / "out"
    result = run_study(preprocessed_root, output_dir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (output_dir / "stdout.txt").write_text(result.stdout)
    return output_dir


@pytest.mark.slow
def test_study_writes_the_fig4_table_metrics_and_figures(reference: Path) -> None:
    rows = read_metrics(reference)
    assert tuple(rows[0]) == METRICS_COLUMNS
    models = [(r["model"], r["depth"], r["tvs"]) for r in rows]
    assert models == [
        ("nearest", "", ""),
        ("trilinear", "", ""),
        (CUBIC, "", ""),
        ("ESPCN", "0", "1"),
        ("ESPCN-RN1", "1", "1"),
        ("ESPCN", "0", "2"),
        ("ESPCN-RN1", "1", "2"),
    ]
    assert {r["subject"] for r in rows} == {"synth002"}
    for row in rows:  # total lies between interior and exterior (a voxel-weighted mean of both)
        low, high = sorted((float(row["interior"]), float(row["exterior"])))
        assert low <= float(row["total"]) <= high

    # every cell trained on the first tvs training subjects, at its depth, and is the model
    # evaluated (its sha256 in the record)
    for name, (model, depth, tvs) in zip(CELLS, models[3:], strict=True):
        cell_dir = reference / "cells" / name
        extra = NormalisationStats.load(cell_dir / "models" / "normalisation.json").extra
        assert extra["num_blocks"] == int(depth)
        assert extra["training_subjects"] == TINY["train_subjects"][: int(tvs)]
        record = json.loads((cell_dir / "cell.json").read_text())
        assert record["model"] == model and record["tvs"] == int(tvs)

    summary = (reference / "summary.md").read_text()
    for model, depth, tvs in models[3:]:
        total = next(
            float(r["total"])
            for r in rows
            if (r["model"], r["depth"], r["tvs"]) == (model, depth, tvs)
        )
        assert f"| {model} | {tvs} |" in summary and f"{total:.2f}" in summary
    assert f"| {CUBIC} | — |" in summary and "p vs ESPCN (same TVS)" in summary

    stdout = (reference / "stdout.txt").read_text()
    finished = [line for line in stdout.splitlines() if "finished: test RMSE interior" in line]
    assert len(finished) == len(CELLS)

    memory = json.loads((reference / "memory_time.json").read_text())
    by_mode = {(m["depth"], m["memory_efficient"]): m for m in memory}
    assert set(by_mode) == {(0, False), (0, True), (1, False), (1, True)}
    # the reversible engine saves less than plain autograd as soon as there are blocks
    assert by_mode[(1, True)]["saved_peak_bytes"] < by_mode[(1, False)]["saved_peak_bytes"]
    for name in ("rmse_vs_depth.png", "memory_time_vs_depth.png"):
        assert (reference / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_killed_in_a_cell_and_rerun_skips_finished_cells_and_equals_uninterrupted(
    reference: Path, preprocessed_root: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "killed"
    process = subprocess.Popen(
        study_command(preprocessed_root, output_dir),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = output_dir / "cells" / CELLS[0] / "cell.json"
    second_log = output_dir / "cells" / CELLS[1] / "training.log"
    deadline = time.monotonic() + 600
    while not (first.exists() and second_log.exists()) and time.monotonic() < deadline:
        assert process.poll() is None, "the study ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "cells" / CELLS[1] / "cell.json").exists(), "killed too late"
    first_record = first.read_bytes()

    result = run_study(preprocessed_root, output_dir)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert f"{CELLS[0]} (N=0, 1 training subjects) skipped" in result.stdout
    assert first.read_bytes() == first_record
    # the finished cell was not trained again: its log holds one training command
    log_lines = (output_dir / "cells" / CELLS[0] / "training.log").read_text().splitlines()
    assert sum(line.startswith("$ ") for line in log_lines) == 1
    assert (output_dir / "metrics.csv").read_bytes() == (reference / "metrics.csv").read_bytes()
    for name in CELLS:
        a = json.loads((output_dir / "cells" / name / "cell.json").read_text())
        b = json.loads((reference / "cells" / name / "cell.json").read_text())
        assert a["model_sha256"] == b["model_sha256"], name


@pytest.mark.slow
def test_rerun_with_other_training_settings_is_refused_and_changes_nothing(
    reference: Path, preprocessed_root: Path
) -> None:
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    result = run_study(preprocessed_root, reference, epochs=2)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "was trained with epochs=1, not 2" in result.stderr
    after = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    assert after == before


def test_records_made_before_target_scale_existed_mean_per_channel(tmp_path: Path) -> None:
    """Runs and cells recorded before ``target_scale`` existed were trained per channel: they
    resume under "channel" and are refused under "shared", naming the setting."""
    old_cell = {"subjects": ["s1"], "depth": 2, "settings": {"epochs": 10}}
    wanted = {"subjects": ["s1"], "depth": 2, "settings": {"epochs": 10}}
    _check_same_training(
        tmp_path, old_cell, {**wanted, "settings": {"epochs": 10, "target_scale": "channel"}}
    )
    with pytest.raises(InputError, match="target_scale=None, not 'shared'"):
        _check_same_training(
            tmp_path, old_cell, {**wanted, "settings": {"epochs": 10, "target_scale": "shared"}}
        )
    compare_settings({"epochs": 10}, {"epochs": 10, "target_scale": "channel"}, tmp_path)
    with pytest.raises(InputError, match="setting target_scale was 'channel' .* is now 'shared'"):
        compare_settings({"epochs": 10}, {"epochs": 10, "target_scale": "shared"}, tmp_path)
