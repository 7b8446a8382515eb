"""Every flag is a setting: the bundle refuses an undeclared ``--name``, naming the nearest setting,
and docs/settings.md documents exactly the settings the configs declare.

The refusals run as real ``python -m monai.bundle run`` processes (four at once, they cost
seconds each); the docs and the commands quoted in the docs are checked against the configs
in-process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from monai_iqt import bundle_settings

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "iqt_espcn_rn"
CONFIGS = BUNDLE / "configs"
SETTINGS_DOCS = BUNDLE / "docs" / "settings.md"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

#: The shipped commands: the config files each merges, in order.
COMMANDS = {
    "train": ["train.json"],
    "multi_gpu_train": ["train.json", "multi_gpu_train.json"],
    "inference": ["inference.json"],
    "evaluate": ["evaluate.json"],
    "study": ["train.json", "study.json"],
    "study_cpu": ["train.json", "study.json", "study_cpu.json"],
}


def config_files() -> list[Path]:
    return sorted(p for p in CONFIGS.glob("*.json") if p.name != "metadata.json")


def file_settings(path: Path) -> list[str]:
    return bundle_settings.config_settings(json.loads(path.read_text()))


def documented_sections(text: str) -> list[tuple[set[str], set[str]]]:
    """(config file names in the heading, setting names in the table) per ``##`` section."""
    sections = []
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        files = set(re.findall(r"`([\w.]+\.json)`", heading))
        names = set()
        for line in body.splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if line.startswith("|") and cells[0] not in ("setting", "") and "---" not in cells[0]:
                names |= set(re.findall(r"`([\w]+)`", cells[0]))
        sections.append((files, names))
    return sections


def check_documented(text: str) -> list[str]:
    """Problems between the docs' tables and the configs' settings (empty: they agree)."""
    settings = {path.name: set(file_settings(path)) for path in config_files()}
    sections = documented_sections(text)
    problems = []
    for files, names in sections:
        unknown_files = files - set(settings)
        if unknown_files:
            problems.append(f"section of {sorted(files)} names no config file {unknown_files}")
        declared = set().union(*(settings.get(f, set()) for f in files))
        for name in sorted(names - declared):
            problems.append(f"documented {name} is a setting of none of {sorted(files)}")
    for config, names in settings.items():
        for name in names:
            owners = {f for f, declared in settings.items() if name in declared}
            if not any(name in documented and files & owners for files, documented in sections):
                problems.append(f"{config} setting {name} has no row in settings.md")
    return problems


def test_settings_docs_match_the_configs() -> None:
    text = SETTINGS_DOCS.read_text()
    sections = documented_sections(text)
    assert len(sections) == 4 and all(files and names for files, names in sections)
    assert check_documented(text) == []


def test_an_undocumented_or_unread_setting_fails_the_docs_check(tmp_path: Path) -> None:
    """The check can fail both ways: a row no config declares, a config setting with no row."""
    text = SETTINGS_DOCS.read_text()
    extra_row = text.replace(
        "| `seed` | 0 | patches,", "| `sead` | 0 | a typo |\n| `seed` | 0 | patches,"
    )
    assert check_documented(extra_row) == [
        "documented sead is a setting of none of ['multi_gpu_train.json', 'train.json']"
    ]
    missing_row = re.sub(r"^\| `lr_decay` \|.*\n", "", text, flags=re.M)
    assert sorted(check_documented(missing_row)) == [
        "study_cpu.json setting lr_decay has no row in settings.md",
        "train.json setting lr_decay has no row in settings.md",
    ]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_is_read_by_its_command(command: str) -> None:
    """A setting that no other entry refers to would be accepted and do nothing."""
    config = bundle_settings.load_configs([str(CONFIGS / name) for name in COMMANDS[command]])
    for name in bundle_settings.config_settings(config):
        others = json.dumps({key: value for key, value in config.items() if key != name})
        assert re.search(rf"@{name}\b", others), f"{command}: setting {name} is read by nothing"


def test_setting_rule_separates_settings_from_wiring() -> None:
    inference = json.loads((CONFIGS / "inference.json").read_text())
    settings = bundle_settings.config_settings(inference)
    assert {"model_path", "device", "repair_tensors", "bundle_root", "input"} <= set(settings)
    assert not {"network_def", "network_settings", "network", "inferer", "writer"} & set(settings)
    assert not set(bundle_settings.WORKFLOW_IDS) & set(settings)


def refusal(*argv: str, cwd: Path = BUNDLE) -> str | None:
    """The sentence ``refuse_unknown_settings`` gives for ``run argv`` (None: accepted)."""
    before = Path.cwd()
    os.chdir(cwd)
    try:
        bundle_settings.refuse_unknown_settings.__wrapped__(["run", *argv])
    except bundle_settings.InputError as error:
        return str(error)
    finally:
        os.chdir(before)
    return None


@pytest.mark.parametrize(
    "argv",
    [
        # MONAI's own arguments, positional or named, with = or a bare boolean flag
        ("--config_file", "configs/inference.json", "--meta_file", "configs/metadata.json"),
        ("run", "initialize", "finalize", "configs/metadata.json", "configs/evaluate.json"),
        ("--config_file=configs/train.json", "--logging_file", "configs/logging.conf", "--resume"),
        ("--config_file", "configs/train.json", "--workflow_type", "train", "--run_id", "run"),
        # nested overrides of declared ids, wiring ids, MONAI's comma-separated config list
        ("--config_file", "configs/train.json", "--network_factory#init", "icnr"),
        ("--config_file", "configs/inference.json", "--network_def::num_blocks", "2"),
        ("--config_file", "configs/train.json,configs/multi_gpu_train.json", "--network", "x"),
        # study settings and training settings both reach a study; --tracking adds its own ids
        ("--config_file", "['configs/train.json','configs/study.json']", "--depths", "[0]"),
        ("--config_file", "configs/train.json", "--tracking", "mlflow", "--experiment_name", "e"),
        # a negative number is a value, not a flag; fire's own flags follow a lone --
        ("--config_file", "configs/train.json", "--lr_decay", "-1", "--", "--verbose"),
    ],
)
def test_declared_names_and_monai_arguments_are_accepted(argv: tuple[str, ...]) -> None:
    assert refusal(*argv) is None


def test_refusal_names_every_unknown_name_and_its_nearest_setting(tmp_path: Path) -> None:
    message = refusal("--config_file", "configs/train.json", "--learning-rat", "0.1", "--zzz")
    assert message == (
        "unknown settings --learning_rat (nearest: --learning_rate), --zzz (no similar setting) "
        "given to configs/train.json; the bundle's docs/settings.md lists every setting."
    )
    args_file = tmp_path / "args.json"  # --args_file entries are command-line defaults
    args_file.write_text(json.dumps({"config_file": "configs/evaluate.json", "subject": "x"}))
    assert "unknown setting --subject given to configs/evaluate.json" in refusal(
        "--args_file", str(args_file)
    )
    assert "--noresume" in refusal("--config_file", "configs/train.json", "--noresume")
    # outside `python -m monai.bundle run` there is no command line to check
    assert bundle_settings.refuse_unknown_settings() is None


@pytest.mark.slow
def test_misspelt_settings_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    """The issue's four cases as run from a shell: one sentence, exit 2, no folder touched.

    Every config's output folder defaults to ``bundle_root`` (``.``, the empty working folder
    here), and inference is also given an existing output folder that must stay as it was.
    """
    existing = tmp_path / "existing_outputs"
    existing.mkdir()
    (existing / "keep.txt").write_text("unchanged")
    train, study = str(CONFIGS / "train.json"), str(CONFIGS / "study.json")
    cases = {
        "inference": (
            ["--config_file", str(CONFIGS / "inference.json"), "--input", "scan.nii.gz"]
            + ["--output_dir", str(existing), "--repair_tensor", "true"],
            f"unknown setting --repair_tensor given to {CONFIGS / 'inference.json'}: "
            "the nearest setting is --repair_tensors",
        ),
        "train": (
            ["--config_file", train, "--learning_rat", "0.01"],
            f"unknown setting --learning_rat given to {train}: the nearest setting is "
            "--learning_rate",
        ),
        "evaluate": (
            ["--config_file", str(CONFIGS / "evaluate.json"), "--subject", "x"],
            f"unknown setting --subject given to {CONFIGS / 'evaluate.json'}: the nearest "
            "setting is --subjects",
        ),
        "study": (
            ["--config_file", repr([train, study]), "--depth", "2"],
            f"unknown setting --depth given to {train} and {study}: the nearest setting is "
            "--depths",
        ),
    }
    processes = {}
    for name, (argv, _) in cases.items():
        workdir = tmp_path / name
        workdir.mkdir()
        processes[name] = subprocess.Popen(
            [sys.executable, "-m", "monai.bundle", "run", *argv],
            cwd=workdir,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, (_, expected) in cases.items():
        stdout, stderr = processes[name].communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert processes[name].returncode == 2, stdout + stderr
        assert len(errors) == 1 and errors[0].startswith(f"error: {expected}; "), stderr
        assert "Traceback" not in stderr
        assert list((tmp_path / name).iterdir()) == [], f"{name} wrote into its working folder"
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert (existing / "keep.txt").read_text() == "unchanged"


# --------------------------------------------------------------------------- commands in the docs
DOCUMENTS = [REPO / "README.md", REPO / "scripts" / "demo.sh", *sorted(BUNDLE.glob("docs/*.md"))]


def quoted_commands(path: Path) -> list[str]:
    """Every ``monai.bundle run`` command quoted in a shell script or a markdown file."""
    text = path.read_text().replace("$BUNDLE", "bundles/iqt_espcn_rn")
    text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
    if path.suffix == ".sh":
        blocks, prose = [text], ""
    else:
        blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    spans = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return [c for c in lines + spans if "-m monai.bundle run" in c and "--config_file" in c]


def command_argv(command: str) -> tuple[list[str], Path]:
    """The command's ``--config_file`` (absolute) and its flags, placeholders as values."""
    tokens = shlex.split(command.split("-m monai.bundle run", 1)[1])
    config, argv = None, []
    for index, token in enumerate(tokens):
        name = token.lstrip("[")
        if name.startswith("--") and name != "--config_file":
            argv += [name.rstrip("]"), "1"]
        elif name == "--config_file":
            config = tokens[index + 1]
    root = REPO if "bundles/iqt_espcn_rn" in command else BUNDLE
    paths = ast.literal_eval(config) if config.startswith("[") else [config]
    return ["--config_file", repr([str(root / p) for p in paths]), *argv], root


def test_every_documented_command_uses_declared_settings() -> None:
    commands = [c for path in DOCUMENTS for c in quoted_commands(path)]
    assert len(commands) >= 15, commands
    for command in commands:
        argv, root = command_argv(command)
        assert refusal(*argv, cwd=root) is None, command


# --------------------------------------------------------------------------- argparse commands
def test_argparse_commands_name_the_nearest_option(capsys: pytest.CaptureFixture) -> None:
    from monai_iqt.benchmark import __main__ as benchmark
    from monai_iqt.benchmark import step
    from preprocessing import __main__ as preprocessing

    argv = ["synthetic", "--out", "x", "--seed", "0", "--lesion-md-factr", "2"]
    with pytest.raises(SystemExit) as stopped:
        preprocessing.main(argv)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "python -m preprocessing: error: unrecognized arguments: --lesion-md-factr 2; "
        "the nearest option to --lesion-md-factr is --lesion-md-factor"
    )
    with pytest.raises(SystemExit):  # a misspelt required option: reported missing, and named
        preprocessing.main(["hcp", "--hcp-rot", "raw", "--out", "x"])
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("required: --hcp-root; the nearest option to --hcp-rot is --hcp-root")
    )
    with pytest.raises(SystemExit):
        step.main(["--threadz", "2"])
    assert capsys.readouterr().err.endswith("the nearest option to --threadz is --threads\n")
    assert benchmark.main(["lesoin"]) == 2
    error = capsys.readouterr().err
    assert error.endswith("unknown benchmark lesoin; the nearest benchmark is lesion\n")


def _documented_defaults() -> dict[str, set[str]]:
    """Setting name -> the default texts its rows in settings.md give (backticks removed)."""
    found: dict[str, set[str]] = {}
    for line in SETTINGS_DOCS.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 3:
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split(", ")]
        if len(names) == len(values):
            for name, value in zip(names, values):
                found.setdefault(name, set()).add(value)
    return found


def test_library_defaults_are_the_configs_defaults_and_the_docs():
    """A setting with a library default has it once, in monai_iqt.defaults: the configs read it
    by the setting's own name (a preset such as study_cpu.json may set another value, never the
    same one), each is read by a config, and settings.md shows its value."""
    from monai_iqt import defaults

    names = {n for n in vars(defaults) if n.isupper()}
    read = set()
    for path in config_files():
        for key, value in json.loads(path.read_text()).items():
            match = re.fullmatch(r"\$monai_iqt\.defaults\.(\w+)", str(value))
            if match:
                assert match.group(1) == key.upper(), f"{path.name}: {key} reads {value}"
                read.add(match.group(1))
            elif key.upper() in names and value == getattr(defaults, key.upper()):
                raise AssertionError(f"{path.name}: {key} = {value!r} repeats a library default")
    assert read == names
    documented = _documented_defaults()
    for name in sorted(names):
        value = getattr(defaults, name)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert documented.get(name.lower()) == {text}, name
