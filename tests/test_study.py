"""The depth study run for real: ``python -m monai.bundle run`` with ``train.json`` + ``study.json``
in subprocesses on the tiny preprocessed subjects of ``conftest.py`` (train synth000, validation
synth001, test synth002; depths [0, 1], training-set size 1, seeds [0, 1]; 1 epoch, 10 patches,
1 restart per cell).

An uninterrupted study is the reference for its own outputs and for a study killed (SIGKILL) in
the middle of a cell and rerun. Bad settings are one sentence and exit code 2.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monai_iqt.data import NormalisationStats
from monai_iqt.study import bundle_study
from monai_iqt.study.plan import check_same_training, unforwarded_settings
from monai_iqt.study.report import CUBIC, METRICS_COLUMNS, convergence_table
from monai_iqt.training.settings import compare_settings
from preprocessing.errors import InputError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "iqt_espcn_rn" / "configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = {
    "train_subjects": ["synth000"],
    "validation_subjects": ["synth001"],
    "test_subjects": ["synth002"],
    "depths": [0, 1],
    "tvs_sizes": [1],
    "seeds": [0, 1],
    "epochs": 1,
    "patches_per_subject": 10,
    "num_restarts": 1,
    "batch_size": 4,
    "learning_rate": 0.001,
    "memory_steps": 1,
}
CELLS = ("ESPCN_tvs1_seed0", "ESPCN_tvs1_seed1", "ESPCN-RN1_tvs1_seed0", "ESPCN-RN1_tvs1_seed1")


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


def test_study_figures_are_drawn_without_choosing_a_matplotlib_backend(tmp_path: Path) -> None:
    """The depth study's figures need no display and leave a caller's backend alone: they are
    drawn on ``Figure`` objects, no library code calls ``matplotlib.use``."""
    code = f"""
import matplotlib
matplotlib.use("svg")
from pathlib import Path
from monai_iqt import figures
from monai_iqt.study.report import CUBIC, cubic_means, depth_series
rows = [
    {{"subject": "s", "model": CUBIC, "depth": "", "tvs": "", "seed": "", "interior": 9.0,
     "exterior": 11.0, "total": 10.0}},
    {{"subject": "s", "model": "ESPCN", "depth": 0, "tvs": 1, "seed": 0, "interior": 4.0,
     "exterior": 6.0, "total": 5.0}},
    {{"subject": "s", "model": "ESPCN-RN1", "depth": 1, "tvs": 1, "seed": 0, "interior": 3.0,
     "exterior": 5.0, "total": 4.0}},
]
assert depth_series(rows) == {{
    1: [(0, {{"interior": [4.0], "exterior": [6.0], "total": [5.0]}}),
        (1, {{"interior": [3.0], "exterior": [5.0], "total": [4.0]}})]
}}
out = Path({str(tmp_path)!r})
figures.rmse_vs_depth_figure(depth_series(rows), cubic_means(rows), CUBIC, out / "a.png")
memory = [
    {{"depth": d, "memory_efficient": m, "saved_peak_bytes": 10**6 * (d + 1),
     "median_step_seconds": 0.1, "batch_size": 2}}
    for d in (0, 1) for m in (False, True)
]
figures.memory_time_figure(memory, out / "b.png")
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    env = {key: value for key, value in ENV.items() if key != "DISPLAY"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_study_json_forwards_every_training_setting_to_the_cells() -> None:
    study = json.loads((CONFIGS / "study.json").read_text())
    assert unforwarded_settings(CONFIGS / "train.json", study["cell_overrides"]) == []
    # each forwarded setting is the merged config's own value (a command-line override reaches
    # the cells), and exists in train.json
    train = json.loads((CONFIGS / "train.json").read_text())
    for key, value in study["cell_overrides"].items():
        assert value == f"@{key}" and key in train, key


STUDY_SETTINGS = (
    "train_subjects",
    "validation_subjects",
    "test_subjects",
    "depths",
    "tvs_sizes",
    "seeds",
    "cell_overrides",
)
BAD_SETTINGS = [
    ({"depths": [0, -2]}, "depths must be >= 0"),
    ({"tvs_sizes": [1, 3]}, "tvs_sizes asks for 3 training subjects but only 1"),
    ({"test_subjects": ["synth002", "synth000"]}, "synth000 is both a training and a test"),
    ({"validation_subjects": ["synth000"]}, "synth000 is both a training and a validation"),
    ({"validation_subjects": ["synth002"]}, "synth002 is both a validation and a test"),
    ({"seeds": []}, "seeds is empty"),
    ({"seeds": [1, 1]}, "seeds lists 1 more than once"),
    ({"seeds": [0, -1]}, "seeds must be >= 0, got -1"),
    (
        {"seeds": [0, 1], "cell_overrides": {"num_restarts": 2}},
        "seeds 0 and 1 are closer than num_restarts 2",
    ),
    # without num_restarts in cell_overrides, the training config's default (4) counts
    ({"seeds": [0, 2]}, "seeds 0 and 2 are closer than num_restarts 4"),
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
    settings = {key: value for key, value in {**TINY, **overrides}.items() if key in STUDY_SETTINGS}
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


COMMAND_LINE_ERRORS = [
    ({"depths": [0, -2]}, "depths must be >= 0 reversible blocks per stack, got -2."),
    (
        {"validation_subjects": ["synth000"]},
        "subject synth000 is both a training and a validation subject: the train, validation and "
        "test subjects must be disjoint.",
    ),
    ({"seeds": []}, 'seeds is empty: give at least one value, e.g. --seeds "[0, 2]".'),
    ({"seeds": [3, 3]}, "seeds lists 3 more than once."),
    ({"seeds": [-1]}, "seeds must be >= 0, got -1."),
]


@pytest.mark.parametrize(("overrides", "sentence"), COMMAND_LINE_ERRORS)
def test_bad_setting_on_the_command_line_is_one_sentence_and_exit_2(
    preprocessed_root: Path, tmp_path: Path, overrides: dict, sentence: str
) -> None:
    result = run_study(preprocessed_root, tmp_path / "study", **overrides)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {sentence}"]
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


def test_a_study_recorded_before_seeds_existed_is_refused(
    preprocessed_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    old = tmp_path / "study"
    (old / "cells" / "ESPCN_tvs1").mkdir(parents=True)
    record = {"train_subjects": ["synth000"], "depths": [0], "tvs_sizes": [1]}
    (old / "study.json").write_text(json.dumps(record))
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        bundle_study(
            dataset_dir=preprocessed_root,
            output_dir=old,
            train_config=CONFIGS / "train.json",
            **{key: TINY[key] for key in STUDY_SETTINGS if key in TINY},
            cell_overrides={"num_restarts": 1},
        )
    assert stop.value.code == 2
    assert "made before seeds existed" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


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
    models = [(r["model"], r["depth"], r["tvs"], r["seed"]) for r in rows]
    assert models == [
        ("nearest", "", "", ""),
        ("trilinear", "", "", ""),
        (CUBIC, "", "", ""),
        ("ESPCN", "0", "1", "0"),
        ("ESPCN", "0", "1", "1"),
        ("ESPCN-RN1", "1", "1", "0"),
        ("ESPCN-RN1", "1", "1", "1"),
    ]
    assert {r["subject"] for r in rows} == {"synth002"}
    for row in rows:  # total lies between interior and exterior (a voxel-weighted mean of both)
        low, high = sorted((float(row["interior"]), float(row["exterior"])))
        assert low <= float(row["total"]) <= high
    # two seeds train two different networks
    assert rows[3]["total"] != rows[4]["total"] and rows[5]["total"] != rows[6]["total"]

    # every cell trained on the training subjects, validated on the validation subject, at its
    # depth and seed, and is the model evaluated (its sha256 in the record)
    for name, (model, depth, tvs, seed) in zip(CELLS, models[3:], strict=True):
        cell_dir = reference / "cells" / name
        extra = NormalisationStats.load(cell_dir / "models" / "normalisation.json").extra
        assert extra["num_blocks"] == int(depth)
        assert extra["training_subjects"] == TINY["train_subjects"][: int(tvs)]
        assert extra["validation_subjects"] == TINY["validation_subjects"]
        assert extra["validation_patches"] == 2  # 10 patches x validation_fraction 0.2
        settings = json.loads((cell_dir / "runs" / "settings.json").read_text())
        assert settings["seed"] == int(seed)
        assert settings["validation_subjects"] == TINY["validation_subjects"]
        record = json.loads((cell_dir / "cell.json").read_text())
        assert record["model"] == model and record["tvs"] == int(tvs)
        assert record["seed"] == int(seed)
        assert set(record["seconds"]) == {"patches", "step", "validation", "other", "setup"}
        assert record["seconds"]["step"] > 0 and record["evaluation"]["seconds"] > 0
        # the exported run's validation curve (runs.json) ends at normalisation.json's best
        assert record["val_rmse_by_epoch"] == [pytest.approx(extra["best_val_rmse"])]
        # the training log: one line per epoch, no progress bar redrawn
        training_log = (cell_dir / "training.log").read_text()
        assert training_log.count("epoch 1/1: ") == 1 and "\r" not in training_log

    summary = (reference / "summary.md").read_text()
    for model in ("ESPCN", "ESPCN-RN1"):
        mine = [float(r["total"]) for r in rows if r["model"] == model]
        cell = f"{statistics.mean(mine):.2f} ± {statistics.stdev(mine):.2f}"
        assert f"| {model} | 1 | 2 | " in summary and cell in summary, (cell, summary)
    assert f"| {CUBIC} | — | — |" in summary
    assert "Subjects: training synth000" in summary and "validation synth001" in summary
    # the paired comparison: n = 1 subject x 2 seeds, too few for a p
    espcn = {r["seed"]: float(r["total"]) for r in rows if r["model"] == "ESPCN"}
    deeper = {r["seed"]: float(r["total"]) for r in rows if r["model"] == "ESPCN-RN1"}
    change = statistics.median((deeper[s] - espcn[s]) / espcn[s] for s in espcn)
    assert f"| ESPCN-RN1 | 1 | 2 | {100 * change:+.1f} % |" in summary
    assert "no p: n = 2 is too small" in summary
    assert "## Time" in summary and "| all | " in summary and "| Fig. 6 memory" in summary
    assert "| Model | Subjects (TVS) | Seeds | epoch 1 | best epoch per seed |" in summary
    for model, cells in (("ESPCN", CELLS[:2]), ("ESPCN-RN1", CELLS[2:])):
        curves = [
            json.loads((reference / "cells" / c / "cell.json").read_text())["val_rmse_by_epoch"]
            for c in cells
        ]
        first = [curve[0] for curve in curves]
        shown = f"{statistics.mean(first):.3f} ± {statistics.stdev(first):.3f}"
        assert f"| {model} | 1 | 2 | {shown} | 1, 1 |" in summary

    stdout = (reference / "stdout.txt").read_text()
    finished = [line for line in stdout.splitlines() if "finished: test RMSE interior" in line]
    assert len(finished) == len(CELLS)
    assert all("+ step " in line and "+ evaluation " in line for line in finished)

    memory = json.loads((reference / "memory_time.json").read_text())
    by_mode = {(m["depth"], m["memory_efficient"]): m for m in memory}
    assert set(by_mode) == {(0, False), (0, True), (1, False), (1, True)}
    # the reversible engine saves less than plain autograd as soon as there are blocks
    assert by_mode[(1, True)]["saved_peak_bytes"] < by_mode[(1, False)]["saved_peak_bytes"]
    for name in ("rmse_vs_depth.png", "memory_time_vs_depth.png"):
        assert (reference / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_table_shows_spaced_epochs_over_seeds_and_each_seeds_best_epoch() -> None:
    falling = [0.40, 0.30, 0.25, 0.22, 0.20, 0.19, 0.18, 0.17]  # still improving at epoch 8
    turned = [0.38, 0.28, 0.24, 0.21, 0.19, 0.20, 0.21, 0.22]  # lowest at epoch 5
    records = [
        {"model": "ESPCN-RN2", "depth": 2, "tvs": 3, "val_rmse_by_epoch": falling},
        {"model": "ESPCN-RN2", "depth": 2, "tvs": 3, "val_rmse_by_epoch": turned},
        {"model": "ESPCN", "depth": 0, "tvs": 3, "val_rmse_by_epoch": falling},
        {"model": "ESPCN", "depth": 0, "tvs": 3},  # a record without a curve adds nothing
    ]
    lines = convergence_table(records)
    epochs = (1, 2, 4, 5, 7, 8)  # six evenly spaced epochs of 8, rounded
    header = "| Model | Subjects (TVS) | Seeds | " + " | ".join(f"epoch {e}" for e in epochs)
    assert lines[2] == header + " | best epoch per seed |"
    assert lines[4].startswith("| ESPCN | 3 | 1 | 0.400 | 0.300 | 0.220 |")
    assert lines[4].endswith("| 0.170 | 8 |")
    pairs = [(falling[e - 1], turned[e - 1]) for e in epochs]
    shown = [f"{statistics.mean(p):.3f} ± {statistics.stdev(p):.3f}" for p in pairs]
    assert lines[5] == "| ESPCN-RN2 | 3 | 2 | " + " | ".join(shown) + " | 8, 5 |"
    assert convergence_table([{"model": "ESPCN", "depth": 0, "tvs": 3}]) == []


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
    assert f"{CELLS[0]} (N=0, 1 training subjects, seed 0) skipped" in result.stdout
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
    check_same_training(
        tmp_path, old_cell, {**wanted, "settings": {"epochs": 10, "target_scale": "channel"}}
    )
    with pytest.raises(InputError, match="target_scale=None, not 'shared'"):
        check_same_training(
            tmp_path, old_cell, {**wanted, "settings": {"epochs": 10, "target_scale": "shared"}}
        )
    compare_settings({"epochs": 10}, {"epochs": 10, "target_scale": "channel"}, tmp_path)
    with pytest.raises(InputError, match="setting target_scale was 'channel' .* is now 'shared'"):
        compare_settings({"epochs": 10}, {"epochs": 10, "target_scale": "shared"}, tmp_path)
