"""Evaluation: metrics.csv and summary.md against hand computations; the bundle command."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
from test_metrics import cubic_bspline_by_hand, trilinear_by_hand
from tiny_bundle import write_tiny_models

from monai_iqt.evaluation import as_prediction, bundle_evaluate, evaluate
from monai_iqt.figures import axial_orientation
from monai_iqt.metrics import REGIONS
from preprocessing.errors import InputError
from preprocessing.geometry import lr_affine_from_hr
from preprocessing.io import save_nifti, write_json

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
    write_json(folder / "preprocessing.json", {"factor": 2})
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
            row = next(r for r in rows if r["subject"] == name and r["model"] == method)
            assert row["depth"] == "" and row["tvs"] == "" and row["coverage_1sigma"] == ""
            for region, mask in (
                ("interior", interior),
                ("exterior", brain & ~interior),
                ("total", brain),
            ):
                expected = rmse_by_hand(prediction, data["dt_hr"], mask)
                assert float(row[region]) == pytest.approx(expected, rel=1e-4)
            expected_total[(name, method)] = float(row["total"])

    # summary.md: the Fig. 4 layout with mean (± std) over subjects
    summary = (tmp_path / "eval" / "summary.md").read_text()
    header = (
        "| Model | Subjects (TVS) | Test subjects | RMSE Interior | RMSE Exterior | RMSE Total |"
    )
    assert header in summary
    cubic = [expected_total[(name, "cubic B-spline")] for name in SUBJECTS]
    cell = f"{statistics.mean(cubic):.2f} (± {statistics.stdev(cubic):.2f})"
    assert "| cubic B-spline | – | 3 | " in summary and summary.count(cell) >= 1

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
    with pytest.raises(InputError, match=r"subject nobody is not a complete .* \(no dt_lr.nii.gz"):
        evaluate(root, tmp_path / "eval", subjects=["nobody"])
    with pytest.raises(InputError, match="compare must name two"):
        evaluate(root, tmp_path / "eval", compare=("cubic B-spline", "ESPCN"))
    with pytest.raises(InputError, match="unknown baseline 'bicubic'"):
        evaluate(root, tmp_path / "eval", methods="bicubic")
    with pytest.raises(InputError, match=r"interior_radius must be .* got -1"):
        evaluate(root, tmp_path / "eval", interior_radius=-1)
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate(root, tmp_path / "eval", methods=[])
    with pytest.raises(InputError, match="figure_subject hand9 is not among"):
        evaluate(root, tmp_path / "eval", figure_subject="hand9")
    with pytest.raises(InputError, match=r"subject id '../hand0' is not a plain folder name"):
        evaluate(root, tmp_path / "eval", subjects=["../hand0"])
    with pytest.raises(SystemExit) as raised:
        bundle_evaluate(
            dataset_dir=tmp_path / "missing", output_dir=tmp_path / "eval", model_path=None,
            normalisation_path=None,
        )  # fmt: skip
    assert raised.value.code == 2
    stderr = capsys.readouterr().err
    assert "does not exist" in stderr and "python -m preprocessing" in stderr
    assert not (tmp_path / "eval").exists()
    with pytest.raises(SystemExit) as raised:
        bundle_evaluate(
            dataset_dir=None, output_dir=tmp_path / "eval", model_path=None,
            normalisation_path=None,
        )  # fmt: skip
    assert raised.value.code == 2
    assert "setting dataset_dir is required" in capsys.readouterr().err
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
    out = capsys.readouterr().out
    assert "| ESPCN | 2 | 1 |" in out and out.count("| Model |") == 1  # the table, once
    everything = write_tiny_models(tmp_path / "all", training_subjects=list(SUBJECTS))
    with pytest.raises(SystemExit):
        bundle_evaluate(
            dataset_dir=root, output_dir=tmp_path / "eval2", model_path=everything[0],
            normalisation_path=everything[1], device="cpu",
        )  # fmt: skip
    assert "was used to train or validate the model" in capsys.readouterr().err
    # a validation subject chose the epoch and the restart: it is no test subject either
    validated = write_tiny_models(
        tmp_path / "validated", training_subjects=["hand0"], validation_subjects=["hand2"]
    )
    result = bundle_evaluate(
        dataset_dir=root, output_dir=tmp_path / "eval3", model_path=validated[0],
        normalisation_path=validated[1], device="cpu",
    )  # fmt: skip
    assert {row["subject"] for row in result.rows} == {"hand1"}


@pytest.mark.slow
def test_bundle_evaluation_on_preprocessed_subjects(preprocessed_root, tmp_path):
    model_path, normalisation_path = write_tiny_models(tmp_path / "models", num_blocks=1)
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(EVALUATE_CONFIG), "--dataset_dir", str(preprocessed_root),
        "--output_dir", str(out), "--model_path", str(model_path),
        "--normalisation_path", str(normalisation_path),
        "--subjects", "['synth000','synth002']", "--figure_subject", "synth002",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| ESPCN-RN1 | – | 2 |" in done.stdout and "| cubic B-spline | – | 2 |" in done.stdout
    assert done.stdout.count("| Model |") == 1
    assert "Wilcoxon signed-rank test (ESPCN-RN1 vs cubic B-spline" in done.stdout
    with open(out / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert {(r["subject"], r["model"]) for r in rows} == {
        (s, m)
        for s in ("synth000", "synth002")
        for m in ("ESPCN-RN1", "nearest", "trilinear", "cubic B-spline")
    }
    assert all(float(r["total"]) > 0 for r in rows)
    assert (out / "md_axial.png").stat().st_size > 1000


def test_bad_setting_on_the_command_line_is_one_sentence_and_exit_2(hand_dataset, tmp_path):
    root, _ = hand_dataset
    out = tmp_path / "eval"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", str(EVALUATE_CONFIG),
        "--dataset_dir", str(root), "--output_dir", str(out), "--baselines_only", "true",
        "--methods", "['cubic','bicubic']",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown baseline 'bicubic': choose among ['cubic', 'nearest', "
                      "'trilinear']."]  # fmt: skip
    assert "Traceback" not in done.stderr and not out.exists()


def test_baselines_without_cubic_still_draw_the_error_figure(hand_dataset, tmp_path):
    root, _ = hand_dataset
    result = evaluate(root, tmp_path / "eval", methods=("nearest", "trilinear"))
    error_png = tmp_path / "eval" / "abs_error_axial.png"
    assert error_png.is_file() and error_png.stat().st_size > 0
    assert {row["model"] for row in result.rows} == {"nearest", "trilinear"}


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


class OracleModel:
    """A stand-in model that knows the truth: it returns ``dt_hr`` plus N(0, sigma^2) noise and,
    when ``with_sigma``, that sigma, so a calibrated uncertainty is known by construction."""

    upscale_factor = 2

    def __init__(self, subjects: dict, depth: int, trained: list[str], with_sigma: bool, seed=0):
        self.subjects = subjects
        self.with_sigma = with_sigma
        self.rng = np.random.default_rng(seed)
        self.stats = SimpleNamespace(extra={"num_blocks": depth, "training_subjects": trained})

    @property
    def gives_std(self) -> bool:
        return self.with_sigma

    def predict_with_std(self, dt_lr, brain_lr):
        data = next(d for d in self.subjects.values() if np.array_equal(d["dt_lr"], dt_lr))
        shape = data["dt_hr"].shape
        per_voxel = np.exp(self.rng.uniform(np.log(2e-6), np.log(1e-4), shape[:3]))
        sigma = per_voxel[..., None] * np.ones(shape)
        return data["dt_hr"] + self.rng.normal(0.0, sigma), sigma

    def __call__(self, dt_lr, brain_lr):
        return self.predict_with_std(dt_lr, brain_lr)[0]


def test_model_outputs_of_every_documented_form():
    mean, std = np.ones((2, 2, 2, 6)), np.full((2, 2, 2, 6), 0.5)
    for output in ((mean, std), [mean, std], {"dt_hr": mean, "dt_hr_std": std}):
        prediction = as_prediction(output, "m")
        assert prediction.mean is not None and prediction.std is std
    assert as_prediction(mean, "m").std is None
    assert as_prediction((mean, None), "m").std is None
    assert as_prediction({"dt_hr": mean}, "m").std is None
    with pytest.raises(ValueError, match="returned 3 volumes"):
        as_prediction((mean, std, std), "m")


def test_several_models_at_once_with_uncertainty_columns(hand_dataset, tmp_path):
    root, subjects = hand_dataset
    models = {
        "ESPCN": OracleModel(subjects, 0, ["other0"], with_sigma=False),
        "ESPCN-RN2 σ": OracleModel(subjects, 2, ["other0", "other1"], with_sigma=True, seed=1),
    }
    result = evaluate(root, None, models, methods=("cubic",))  # rows only, nothing written
    assert not any(tmp_path.iterdir())
    assert [(r["subject"], r["model"]) for r in result.rows] == [
        (s, m) for s in SUBJECTS for m in ("ESPCN", "ESPCN-RN2 σ", "cubic B-spline")
    ]
    for row in result.rows:
        facts = {"ESPCN": (0, 1), "ESPCN-RN2 σ": (2, 2), "cubic B-spline": (None, None)}
        assert (row["depth"], row["tvs"]) == facts[row["model"]]
        if row["model"] == "ESPCN-RN2 σ":
            # about 10,000 brain voxel elements per subject: binomial std error < 0.005
            assert row["coverage_1sigma"] == pytest.approx(0.683, abs=0.02)
            assert row["coverage_2sigma"] == pytest.approx(0.954, abs=0.02)
            assert row["spearman_sigma_error"] > 0.4
        else:
            assert row["coverage_1sigma"] is None and row["spearman_sigma_error"] is None
    assert result.wilcoxon["first"] == "ESPCN" and result.wilcoxon["n"] == 3

    written = evaluate(root, tmp_path / "eval", models, methods=("cubic",))
    with open(tmp_path / "eval" / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0])[:7] == ["subject", "model", "depth", "tvs", *REGIONS]
    sigma_rows = [r for r in rows if r["model"] == "ESPCN-RN2 σ"]
    assert all(0.6 < float(r["coverage_1sigma"]) < 0.76 for r in sigma_rows)
    assert "| ESPCN-RN2 σ | 2 | 3 |" in written.summary_markdown
    assert "| Model | Coverage 1σ | Coverage 2σ | Spearman σ vs error |" in written.summary_markdown
    for name in ("reliability.png", "uncertainty_axial.png", "md_axial.png"):
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_subjects_named_explicitly_give_a_warning(hand_dataset, tmp_path, caplog):
    root, subjects = hand_dataset
    model = OracleModel(subjects, 0, ["hand0", "hand2"], with_sigma=False)
    with caplog.at_level(logging.WARNING, logger="monai_iqt.evaluation"):
        result = evaluate(root, None, {"ESPCN": model}, subjects=["hand0", "hand1"])
    assert {r["subject"] for r in result.rows} == {"hand0", "hand1"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "subjects hand0 were used to train the model" in warnings[0]


def test_held_out_subject_without_ground_truth_is_named(hand_dataset, tmp_path, caplog):
    root, subjects = hand_dataset
    dataset = shutil.copytree(root, tmp_path / "dataset")
    (dataset / "hand1" / "dt_hr.nii.gz").unlink()
    model = OracleModel(subjects, 0, ["hand0", "hand2"], with_sigma=False)
    with pytest.raises(InputError) as raised:
        evaluate(dataset, None, {"ESPCN": model})
    message = str(raised.value)
    assert "hand1 has no dt_hr.nii.gz" in message and "used to train" not in message
    # with another complete held-out subject, the incomplete one is left out with a warning
    shutil.copytree(root / "hand0", dataset / "hand3")
    with caplog.at_level(logging.WARNING, logger="monai_iqt.evaluation"):
        result = evaluate(dataset, None, {"ESPCN": OracleModel(subjects, 0, ["hand0"], False)})
    assert {r["subject"] for r in result.rows} == {"hand2", "hand3"}
    assert any("hand1 has no dt_hr.nii.gz" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("diagonal", "edges", "convention"),
    [
        ((-1.25, 1.25, 1.25), ("L", "R", "A", "P"), "radiological"),  # LAS, as HCP stores
        ((1.25, 1.25, 1.25), ("R", "L", "A", "P"), "neurological"),  # RAS
        ((1.25, -1.25, 1.25), ("R", "L", "P", "A"), "neurological"),  # RPS: y runs backwards
    ],
)
def test_slice_orientation_comes_from_the_affine(diagonal, edges, convention):
    affine = np.diag([*diagonal, 1.0])
    orientation = axial_orientation(affine)
    assert (orientation["right"], orientation["left"]) == edges[:2]
    assert (orientation["top"], orientation["bottom"]) == edges[2:]
    assert orientation["convention"].startswith(convention)
    # a voxel x axis running anterior-posterior is said to be no axial left-right axis
    swapped = np.array([[0, 1.25, 0, 0], [1.25, 0, 0, 0], [0, 0, 1.25, 0], [0, 0, 0, 1]])
    assert "not axial" in axial_orientation(swapped)["convention"]


def test_importing_figures_leaves_the_matplotlib_backend_alone():
    code = (
        "import matplotlib; matplotlib.use('svg'); import monai_iqt.figures; "
        "import monai_iqt.evaluation, monai_iqt.study; "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bundle_evaluation_of_a_model_that_predicts_its_uncertainty(hand_dataset, tmp_path, capsys):
    """An (untrained) ESPCN with a variance head and dropout, 3 MC samples: the uncertainty
    columns equal coverage and rank correlation recomputed by hand from the inferer's output."""
    from monai_iqt.inferers import make_inferer

    root, subjects = hand_dataset
    model_path, normalisation_path = write_tiny_models(
        tmp_path / "models", predict_variance=True, dropout_rate=0.2, training_subjects=["hand0"]
    )
    result = bundle_evaluate(
        dataset_dir=root, output_dir=tmp_path / "eval", model_path=model_path,
        normalisation_path=normalisation_path, device="cpu", methods=["cubic"],
        inferer_options={"mc_samples": 3},
    )  # fmt: skip
    assert "| Model | Coverage 1σ | Coverage 2σ | Spearman σ vs error |" in capsys.readouterr().out
    inferer = make_inferer(model_path, normalisation_path, device="cpu", mc_samples=3)
    for name in ("hand1", "hand2"):
        data = subjects[name]
        region = data["mask_hr"].reshape(8, 2, 7, 2, 9, 2).any(axis=(1, 3, 5))
        mean, std = inferer.predict_with_std(data["dt_lr"], region)
        brain = data["mask_hr"]
        error = np.abs(mean.astype(np.float64) - data["dt_hr"])[brain]
        sigma = std.astype(np.float64)[brain]
        row = next(r for r in result.rows if r["subject"] == name and r["model"] == "ESPCN")
        assert row["coverage_1sigma"] == pytest.approx(np.mean(error <= sigma), abs=1e-12)
        assert row["coverage_2sigma"] == pytest.approx(np.mean(error <= 2 * sigma), abs=1e-12)
        by_voxel = stats.spearmanr(np.sqrt((sigma**2).mean(-1)), np.sqrt((error**2).mean(-1)))
        assert row["spearman_sigma_error"] == pytest.approx(by_voxel.statistic, abs=1e-9)
    for figure in ("reliability.png", "uncertainty_axial.png"):
        assert (tmp_path / "eval" / figure).stat().st_size > 1000


def test_inference_settings_reach_the_evaluated_inferer(hand_dataset, tmp_path):
    """``--inference_mode`` and ``--mc_samples`` reach the inferer, checked as inference checks
    them: a bad value is one sentence, exit 2, and nothing written."""
    root, _ = hand_dataset
    model_path, normalisation_path = write_tiny_models(tmp_path / "models")
    out = tmp_path / "eval"
    for setting, value, sentence in (
        ("--inference_mode", "bogus", "inference_mode 'bogus' is not one of"),
        ("--mc_samples", "0", "mc_samples 0 must be an integer >= 1"),
        ("--mc_samples", "2", "mc_samples 2 needs weights trained with dropout"),
    ):
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", str(EVALUATE_CONFIG),
            "--dataset_dir", str(root), "--output_dir", str(out), "--model_path", str(model_path),
            "--normalisation_path", str(normalisation_path), "--device", "cpu", setting, value,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and sentence in errors[0], done.stderr[-3000:]
        assert "Traceback" not in done.stderr and not out.exists()
