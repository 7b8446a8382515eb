"""Bad input: one sentence naming the file and the problem, exit 2, other subjects still run."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.__main__ import main
from preprocessing.io import save_nifti

DIFFUSION = Path("T1w") / "Diffusion"


def _replace_text(path: Path, text: str) -> None:
    path.unlink()  # the copy is a hard link to the shared fixture: never write through it
    path.write_text(text)


def _write_table(path: Path, table: np.ndarray) -> None:
    _replace_text(path, "\n".join(" ".join(f"{v:g}" for v in row) for row in table) + "\n")


def _gradients(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.loadtxt(folder / "bvals"), np.loadtxt(folder / "bvecs")


def _data(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(folder / "data.nii.gz")
    return image.get_fdata(dtype=np.float32), image.affine


def _missing_file(folder):
    (folder / "bvecs").unlink()


def _bvals_count(folder):
    bvals, _ = _gradients(folder)
    _write_table(folder / "bvals", bvals[None, :-1])


def _bvecs_count(folder):
    _, bvecs = _gradients(folder)
    _write_table(folder / "bvecs", bvecs[:, :-1])


def _bvecs_shape(folder):
    _, bvecs = _gradients(folder)
    _write_table(folder / "bvecs", bvecs[:2])


def _bvecs_not_unit(folder):
    _, bvecs = _gradients(folder)
    bvecs[:, 1] *= 0.5
    _write_table(folder / "bvecs", bvecs)


def _no_b0(folder):
    bvals, bvecs = _gradients(folder)
    bvecs[:, bvals < 100] = [[1.0], [0.0], [0.0]]
    bvals[bvals < 100] = 1000
    _write_table(folder / "bvals", bvals[None])
    _write_table(folder / "bvecs", bvecs)


def _few_directions(folder):
    bvals, _ = _gradients(folder)
    shell = np.flatnonzero((bvals > 100) & (bvals <= 1500))
    bvals[shell[5:]] = 2500  # only 5 directions left with b <= 1500
    _write_table(folder / "bvals", bvals[None])


def _data_3d(folder):
    data, affine = _data(folder)
    (folder / "data.nii.gz").unlink()
    save_nifti(folder / "data.nii.gz", data[..., 0], affine)


def _mask_shape(folder):
    mask = nib.load(folder / "nodif_brain_mask.nii.gz")
    cut = np.asarray(mask.dataobj)[:, :, :-1]
    (folder / "nodif_brain_mask.nii.gz").unlink()
    save_nifti(folder / "nodif_brain_mask.nii.gz", cut, mask.affine)


def _empty_mask(folder):
    mask = nib.load(folder / "nodif_brain_mask.nii.gz")
    (folder / "nodif_brain_mask.nii.gz").unlink()
    save_nifti(folder / "nodif_brain_mask.nii.gz", np.zeros(mask.shape, np.uint8), mask.affine)


def _bad_value(value):
    def corrupt(folder):
        data, affine = _data(folder)
        data[12, 14, 12, 4] = value  # volume 4 is a b=1000 volume: it is read
        (folder / "data.nii.gz").unlink()
        save_nifti(folder / "data.nii.gz", data, affine)

    return corrupt


def _truncated_data(folder):
    payload = (folder / "data.nii.gz").read_bytes()
    (folder / "data.nii.gz").unlink()
    (folder / "data.nii.gz").write_bytes(payload[: len(payload) // 2])


# subject id -> (corruption, file named in the message, words of the problem)
CASES = {
    "missing_file": (_missing_file, "bvecs", "is missing"),
    "bvals_count": (_bvals_count, "bvals", "has 287 b-values but data.nii.gz has 288 volumes"),
    "bvecs_count": (_bvecs_count, "bvecs", "has 287 directions but data.nii.gz has 288 volumes"),
    "bvecs_shape": (_bvecs_shape, "bvecs", "has shape (2, 288)"),
    "bvecs_not_unit": (_bvecs_not_unit, "bvecs", "direction 1 has length 0.5"),
    "no_b0": (_no_b0, "bvals", "has no b0 volume"),
    "few_directions": (_few_directions, "bvals", "has 5 distinct directions"),
    "data_3d": (_data_3d, "data.nii.gz", "is 3D"),
    "mask_shape": (_mask_shape, "nodif_brain_mask.nii.gz", "has shape (24, 28, 23)"),
    "empty_mask": (_empty_mask, "nodif_brain_mask.nii.gz", "is empty"),
    "nan_data": (_bad_value(np.nan), "data.nii.gz", "volume 4 contains NaN or inf"),
    "inf_data": (_bad_value(np.inf), "data.nii.gz", "volume 4 contains NaN or inf"),
    "truncated_data": (_truncated_data, "data.nii.gz", "cannot be read"),
}


def _link_copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, copy_function=os.link)


def _run(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


@pytest.fixture(scope="module")
def broken_run(synthetic_hcp_root, tmp_path_factory):
    """One run over a good subject, one broken subject per case and an unknown id."""
    root = tmp_path_factory.mktemp("broken")
    _link_copy(synthetic_hcp_root / "synth000", root / "hcp" / "good")
    for subject_id, (corrupt, _, _) in CASES.items():
        _link_copy(synthetic_hcp_root / "synth001", root / "hcp" / subject_id)
        corrupt(root / "hcp" / subject_id / DIFFUSION)
    subjects = ["good", *CASES, "nosuch"]
    argv = ["hcp", "--hcp-root", str(root / "hcp"), "--out", str(root / "out"), "--subjects"]
    code, stderr = _run([*argv, *subjects])
    return root, code, stderr


def _failure_lines(stderr: str) -> dict[str, str]:
    """The list printed at the end: '  <id>: <message>' lines after 'N subject(s) failed:'."""
    listing = stderr.split("subject(s) failed:")[-1]
    return dict(line.strip().split(": ", 1) for line in listing.strip().splitlines())


def test_bad_subjects_exit_2_and_good_subject_is_processed(broken_run):
    root, code, stderr = broken_run
    assert code == 2
    assert (root / "out" / "good" / "preprocessing.json").is_file()
    assert set(_failure_lines(stderr)) == {*CASES, "nosuch"}


@pytest.mark.parametrize("subject_id", sorted(CASES))
def test_each_bad_input_is_one_sentence_naming_file_and_problem(broken_run, subject_id):
    root, _, stderr = broken_run
    _, file_name, problem = CASES[subject_id]
    message = _failure_lines(stderr)[subject_id]
    assert str(root / "hcp" / subject_id / DIFFUSION / file_name) in message
    assert problem in message
    assert message.endswith(".") and "Traceback" not in stderr
    assert not (root / "out" / subject_id).exists(), "nothing may be written for a bad subject"


def test_unknown_subject_id_is_reported(broken_run):
    root, _, stderr = broken_run
    message = _failure_lines(stderr)["nosuch"]
    assert message == f"Subject nosuch not found: {root / 'hcp' / 'nosuch'} does not exist."


def test_bad_input_on_rerun_loses_nothing_already_written(synthetic_hcp_root, tmp_path):
    _link_copy(synthetic_hcp_root / "synth002", tmp_path / "hcp" / "synth002")
    argv = ["hcp", "--hcp-root", str(tmp_path / "hcp"), "--out", str(tmp_path / "out")]
    assert _run(argv)[0] == 0
    outputs = sorted((tmp_path / "out" / "synth002").iterdir())
    before = {path.name: path.read_bytes() for path in outputs}
    _bvals_count(tmp_path / "hcp" / "synth002" / DIFFUSION)
    code, stderr = _run([*argv, "--overwrite"])
    assert code == 2 and "has 287 b-values" in stderr
    after = {path.name: path.read_bytes() for path in (tmp_path / "out" / "synth002").iterdir()}
    assert after == before


@pytest.mark.parametrize(
    "arguments, problem",
    [
        (["hcp", "--hcp-root", "{missing}", "--out", "{out}"], "does not exist"),
        (["hcp", "--hcp-root", "{empty}", "--out", "{out}"], "contains no subject folder"),
        (["hcp", "--hcp-root", "{empty}", "--out", "{out}", "--factor", "0"], "--factor"),
        (["hcp", "--hcp-root", "{empty}", "--out", "{out}", "--workers", "0"], "--workers"),
        (["synthetic", "--out", "{out}", "--count", "0", "--seed", "1"], "--count"),
        (["synthetic", "--out", "{out}", "--count", "1", "--seed", "1", "--snr", "0"], "--snr"),
    ],
)
def test_bad_command_line_values_exit_2(tmp_path, arguments, problem):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "out": tmp_path / "o"}
    code, stderr = _run([a.format(**paths) for a in arguments])
    assert code == 2
    assert stderr.startswith("error: ") and problem in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
