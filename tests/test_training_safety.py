"""Training refuses bad settings and unsafe folder states before touching anything, and stops
cleanly on Ctrl-C: real ``python -m monai.bundle run`` processes on the tiny fixture subjects.

Every refusal is one sentence on stderr (``error: ...``) naming the setting, flag or file, exit
code 2, no traceback, and the files of earlier runs byte for byte as they were.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from training_commands import ENV, REPO, TRAIN_CONFIG, run_training, training_command

from monai_iqt.training import check_settings
from monai_iqt.training.settings import compare_settings
from preprocessing.errors import InputError

#: ESPCN (no reversible blocks), 1 run of 1 epoch on 3 x 10 patches: seconds.
QUICK = {
    "patches_per_subject": 10,
    "num_revnet_blocks": 0,
    "batch_size": 4,
    "learning_rate": 0.001,
    "epochs": 1,
    "num_restarts": 1,
}


def command(dataset_dir: Path, output_dir: Path, **settings) -> list[str]:
    return training_command(dataset_dir, output_dir, **{**QUICK, **settings})


def train(dataset_dir: Path, output_dir: Path, **settings) -> subprocess.CompletedProcess:
    return run_training(dataset_dir, output_dir, **{**QUICK, **settings})


def refusal(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` sentence of a refused run (asserting exit 2 and no traceback)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained(preprocessed_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output folder holding one finished quick training (checkpoints, settings, models)."""
    output_dir = tmp_path_factory.mktemp("trained")
    result = train(preprocessed_root, output_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output_dir


def settings(dataset_dir: Path, output_dir: Path, /, **overrides) -> dict:
    """The bundle's defaults with QUICK, as the config hands them to ``check_settings``
    (MONAI's parser resolves the config's references, e.g. ``$monai_iqt.defaults.NAME``)."""
    config = ConfigParser()
    config.read_config(str(TRAIN_CONFIG))
    values = {key: config.get_parsed_content(key) for key in config["settings"]}
    return {**values, **QUICK, "dataset_dir": dataset_dir, "output_dir": output_dir, **overrides}


BAD_SETTINGS = [
    ("learning_rate", "1e-3x", "setting learning_rate must be a number in (0, inf), got '1e-3x'."),
    ("learning_rate", -0.1, "setting learning_rate must be a number in (0, inf), got -0.1."),
    ("batch_size", 0, "setting batch_size must be an integer >= 1, got 0."),
    ("epochs", 0, "setting epochs must be an integer >= 1, got 0."),
    ("epochs", 2.5, "setting epochs must be an integer >= 1, got 2.5."),
    ("num_revnet_blocks", -1, "setting num_revnet_blocks must be an integer >= 0, got -1."),
    ("patches_per_subject", 1, "setting patches_per_subject must be an integer >= 2, got 1."),
    ("lr_patch_size", 3, "setting lr_patch_size must be an integer >= 5, got 3."),
    ("validation_fraction", 1.5, "setting validation_fraction must be a number in (0, 1)"),
    ("num_restarts", 0, "setting num_restarts must be an integer >= 1, got 0."),
    ("early_stopping_patience", 0, "setting early_stopping_patience must be an integer >= 1"),
    ("dropout_rate", 1.0, "setting dropout_rate must be a number in [0, 1), got 1.0."),
    ("lr_decay", float("nan"), "setting lr_decay must be a number in (0, inf), got nan."),
    ("memory_efficient", "maybe", "setting memory_efficient must be true or false, got 'maybe'."),
    ("loss", "mse", "setting loss must be one of rmse, gaussian_nll, rmse_nll, got 'mse'."),
    ("loss", "gaussian_nll", "setting loss gaussian_nll trains a predicted variance: give "),
    ("amp", "true", "setting amp is true but no GPU is available: MONAI's trainer autocasts"),
    ("dataset_dir", None, "setting dataset_dir is not set: give --dataset_dir DIR"),
    ("subjects", "../synth000", "subject id '../synth000' is not a plain folder name"),
    ("subjects", ["synth000", "synth000"], "subject synth000 is listed more than once."),
    ("cache_patches", "maybe", "setting cache_patches must be true or false, got 'maybe'."),
    ("validation_subjects", ["nobody"], "subject nobody is not a complete preprocessed subject"),
]


def test_a_validation_subject_that_also_trains_is_refused(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    given = {"subjects": ["synth000", "synth001"], "validation_subjects": ["synth002", "synth000"]}
    with pytest.raises(InputError) as raised:
        check_settings(settings(preprocessed_root, tmp_path / "out", **given))
    assert str(raised.value) == (
        "subject synth000 is both a training and a validation subject: validation subjects must "
        "be held out of training."
    )
    # no training subjects named: every subject but the validation subjects trains
    checked = check_settings(
        settings(preprocessed_root, tmp_path / "out", validation_subjects=["synth002"])
    )
    assert [folder.name for folder in checked["subject_folders"]] == ["synth000", "synth001"]
    assert checked["record"]["validation_subjects"] == ["synth002"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "value", "sentence"), BAD_SETTINGS)
def test_each_bad_setting_is_one_sentence_naming_it(
    name: str, value: object, sentence: str, preprocessed_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(InputError) as raised:
        check_settings(settings(preprocessed_root, tmp_path / "out", **{name: value}))
    assert str(raised.value).startswith(sentence)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bad_settings_on_the_command_line_exit_2_and_keep_the_runs(
    trained: Path, preprocessed_root: Path
) -> None:
    before = snapshot(trained)
    cases = {
        ("learning_rate", "1e-3x"): "error: setting learning_rate must be a number",
        ("batch_size", "0"): "error: setting batch_size must be an integer >= 1, got 0.",
        ("epochs", "0"): "error: setting epochs must be an integer >= 1, got 0.",
        ("num_revnet_blocks", "-1"): "error: setting num_revnet_blocks must be an integer >= 0",
        ("loss", "gaussian_nll"): "error: setting loss gaussian_nll trains a predicted variance",
        ("target_scale", "physical"): "error: setting target_scale must be one of channel, shared",
        ("target_region", "mask"): "error: setting target_region must be one of patch, brain",
    }
    processes = {
        case: subprocess.Popen(
            command(preprocessed_root, trained, overwrite="true", **{case[0]: case[1]}),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in cases
    }
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        assert refusal(result).startswith(cases[case])
    assert snapshot(trained) == before, "a refused run changed the earlier run's files"


@pytest.mark.slow
def test_a_folder_with_runs_needs_resume_or_overwrite(
    trained: Path, preprocessed_root: Path
) -> None:
    before = snapshot(trained)
    sentence = refusal(train(preprocessed_root, trained))
    assert sentence == (
        f"error: {trained / 'runs'} already holds training runs ({trained / 'runs' / 'runs.json'})"
        ": give --resume true to continue them or --overwrite true to start over."
    )
    both = refusal(train(preprocessed_root, trained, resume="true", overwrite="true"))
    assert both.startswith("error: settings resume and overwrite are both true")
    assert snapshot(trained) == before


def test_runs_recorded_before_brain_only_statistics_resume_only_with_whole_blocks(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    """Runs recorded before ``target_statistics`` existed normalised targets over whole
    blocks: with ``target_region`` patch they still resume; with brain they are refused."""
    records = {
        region: check_settings(settings(preprocessed_root, tmp_path, target_region=region))[
            "record"
        ]
        for region in ("patch", "brain")
    }
    assert records["patch"]["target_statistics"] == "whole_blocks"
    assert records["brain"]["target_statistics"] == "brain_voxels"
    for region, record in records.items():
        older = {key: value for key, value in record.items() if key != "target_statistics"}
        if region == "patch":
            compare_settings(older, record, tmp_path)
            continue
        with pytest.raises(InputError) as refused:
            compare_settings(older, record, tmp_path)
        assert str(refused.value) == (
            f"--resume true: the runs in {tmp_path} normalised their targets with statistics "
            "over whole blocks, and training with these settings uses brain voxels; give "
            "--overwrite true to start over."
        )


@pytest.mark.slow
def test_resume_with_other_settings_names_the_first_difference(
    trained: Path, preprocessed_root: Path, tmp_path: Path
) -> None:
    before = snapshot(trained)
    depth = refusal(train(preprocessed_root, trained, resume="true", num_revnet_blocks=1))
    assert depth == (
        f"error: --resume true: setting num_revnet_blocks was 0 for the runs in "
        f"{trained / 'runs'} and is now 1; resume with the runs' settings, or give "
        "--overwrite true to start over."
    )
    subjects = refusal(
        train(preprocessed_root, trained, resume="true", subjects="['synth000','synth001']")
    )
    assert "were trained on subjects ['synth000', 'synth001', 'synth002'], not " in subjects

    # The same subject names, but one preprocessed again since: its record differs.
    dataset = tmp_path / "dataset"
    shutil.copytree(preprocessed_root, dataset)
    record = dataset / "synth001" / "preprocessing.json"
    record.write_text(record.read_text().replace('"seconds"', '"seconds_again"'))
    changed = refusal(train(dataset, trained, resume="true"))
    assert "subject synth001's preprocessing.json changed since the runs in" in changed
    assert snapshot(trained) == before


@pytest.mark.slow
def test_corrupt_last_checkpoint_on_resume_is_named_and_kept(
    trained: Path, preprocessed_root: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    shutil.copytree(trained, output_dir)
    runs = json.loads((output_dir / "runs" / "runs.json").read_text())
    runs["runs"] = []  # the run did not finish: resume must read its last checkpoint
    (output_dir / "runs" / "runs.json").write_text(json.dumps(runs))
    last = output_dir / "runs" / "run_0" / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = snapshot(output_dir)
    sentence = refusal(train(preprocessed_root, output_dir, resume="true"))
    assert sentence.startswith(f"error: {last} is not a readable checkpoint (")
    assert "delete it to restart run 0 from its first epoch" in sentence
    assert snapshot(output_dir) == before


@pytest.mark.slow
def test_numeric_subject_ids_train(preprocessed_root: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(preprocessed_root / "synth000", dataset / "100307")
    shutil.copytree(preprocessed_root / "synth001", dataset / "100408")
    processes = [
        subprocess.Popen(
            command(dataset, tmp_path / name, subjects=subjects),
            cwd=REPO,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, subjects in (("one", "100307"), ("list", "[100307,100408]"))
    ]
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout[-2000:] + stderr[-2000:]
    one = json.loads((tmp_path / "one" / "models" / "normalisation.json").read_text())
    both = json.loads((tmp_path / "list" / "models" / "normalisation.json").read_text())
    assert one["extra"]["training_subjects"] == ["100307"]
    assert both["extra"]["training_subjects"] == ["100307", "100408"]


@pytest.mark.slow
def test_ctrl_c_says_where_training_stopped_and_resume_finishes(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    process = subprocess.Popen(
        command(preprocessed_root, output_dir, epochs=4),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = output_dir / "runs" / "run_0" / "checkpoint_last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.startswith("training interrupted")]
    assert len(lines) == 1, stderr[-2000:]
    assert lines[0].startswith("training interrupted in run 0 of 1 at epoch ")
    assert f"{last} holds epoch " in lines[0]
    assert lines[0].endswith("run the same command with --resume true to continue.")
    assert last.is_file()

    result = train(preprocessed_root, output_dir, epochs=4, resume="true")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((output_dir / "runs" / "runs.json").read_text())["runs"][0]
    assert record["resumed_from"] == str(last)
    assert [e["epoch"] for e in record["history"]] == [1, 2, 3, 4]
    assert (output_dir / "models" / "model.pt").is_file()


def test_trained_on_comes_from_the_subjects_records_and_raw_folders(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    from monai_iqt.training.settings import data_source, trained_on

    subject = tmp_path / "dataset" / "s1"
    shutil.copytree(preprocessed_root / "synth000", subject)
    assert data_source(subject) == "synthetic-geometric"  # the fixture's raw ground_truth/

    record_path = subject / "preprocessing.json"
    record = json.loads(record_path.read_text())
    raw = tmp_path / "raw" / "s1"
    record["inputs"]["data"] = str(raw / "T1w" / "Diffusion" / "data.nii.gz")
    record_path.write_text(json.dumps(record))
    assert data_source(subject) == "unknown"  # raw folder gone: not guessed
    (raw / "ground_truth").mkdir(parents=True)
    (raw / "ground_truth" / "phantom.json").write_text(json.dumps({"anatomy": "mni152"}))
    assert data_source(subject) == "synthetic-mni152"
    record_path.write_text(json.dumps({**record, "source": "hcp"}))
    assert data_source(subject) == "hcp"
    # Subjects of different sources: the model's source is unknown.
    assert trained_on([subject, preprocessed_root / "synth000"]) == "unknown"


def test_an_output_folder_holding_preprocessed_subjects_is_refused(
    preprocessed_root: Path,
) -> None:
    before = snapshot(preprocessed_root)
    with pytest.raises(InputError) as raised:
        check_settings(settings(preprocessed_root, preprocessed_root))
    assert str(raised.value) == (
        f"output_dir {preprocessed_root} holds preprocessed subjects; training writes runs/ and "
        "models/ there: choose another --output_dir."
    )
    assert snapshot(preprocessed_root) == before
