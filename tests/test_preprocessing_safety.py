"""Mistakes a user makes on the command line, in fresh processes: one sentence, exit 2, no loss.

Ids that leave the dataset, repeated ids, unknown fit methods, unwritable or full --out, a
truncated mask, a header claiming more voxels than memory, reruns with other settings, symlink
loops, and two runs on one --out (they wait for each other and never delete each other's files).
"""

from __future__ import annotations

import fcntl
import gzip
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.hcp import preprocess_hcp
from preprocessing.hcp_inputs import DIFFUSION_SUBDIR
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.io import atomic_path, remove_stale_temporaries, write_text
from preprocessing.layout import OUTPUT_NAMES, RECORD_NAME


def _cli(*arguments: str, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """``python -m preprocessing hcp ...`` in a fresh process; optionally with a file-size limit
    (RLIMIT_FSIZE: writes past it fail with EFBIG, as writes to a full disk fail with ENOSPC)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "preprocessing", "hcp", "--no-progress", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=None if file_size_limit is None else limit,
    )


def _one_sentence(result: subprocess.CompletedProcess) -> str:
    """The run's only stderr line, an 'error: ...' sentence (checked), without the prefix."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), lines
    return lines[0].removeprefix("error: ")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def hcp(synthetic_hcp_root, tmp_path):
    """A private HCP root with synth000 and synth001 (hard links to the shared fixture)."""
    root = tmp_path / "hcp"
    for subject_id in ("synth000", "synth001"):
        shutil.copytree(synthetic_hcp_root / subject_id, root / subject_id, copy_function=os.link)
    return root


@pytest.mark.parametrize("subject_id", ["../escaped", "a/b", "/tmp/absolute", ".."])
def test_subject_id_leaving_the_dataset_is_refused(hcp, tmp_path, subject_id):
    out = tmp_path / "out"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    message = _one_sentence(
        _cli("--hcp-root", str(hcp), "--out", str(out), "--subjects", subject_id)
    )
    assert message == (
        f"subject id {subject_id!r} is not a plain folder name (no path separators, '..' or "
        "absolute paths)."
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_repeated_subject_id_is_refused(hcp, tmp_path):
    result = _cli(
        "--hcp-root", str(hcp), "--out", str(tmp_path / "out"), "--workers", "3",
        "--subjects", "synth000", "synth001", "synth000",
    )  # fmt: skip
    assert _one_sentence(result) == "subject synth000 is listed more than once."
    assert not (tmp_path / "out").exists()


def test_unknown_fit_method_is_refused_before_reading_data(hcp, tmp_path):
    (hcp / "synth000" / DIFFUSION_SUBDIR / "data.nii.gz").unlink()  # reading data would fail
    result = _cli("--hcp-root", str(hcp), "--out", str(tmp_path / "out"), "--fit-method", "abc")
    message = _one_sentence(result)
    assert message.startswith("--fit-method 'abc' is not a DIPY TensorModel fit method; choose")
    assert "WLS" in message and "NLLS" in message
    assert not (tmp_path / "out").exists()


def test_out_equal_to_the_hcp_root_is_refused(hcp, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = _cli("--hcp-root", str(hcp), "--out", str(tmp_path / "." / "hcp"))
    assert _one_sentence(result) == (
        f"--out {tmp_path / 'hcp'} is the HCP root itself; write the preprocessed dataset to "
        "another folder."
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_out_below_a_file_is_refused_before_any_fit(hcp, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _cli("--hcp-root", str(hcp), "--out", str(blocker / "out"))
    assert _one_sentence(result) == (
        f"--out {blocker / 'out'} is not writable: {blocker} is not a folder."
    )
    assert blocker.read_text() == "not a folder"


def test_full_out_is_refused_before_any_fit(hcp, tmp_path):
    out = tmp_path / "out"
    result = _cli("--hcp-root", str(hcp), "--out", str(out), file_size_limit=0)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # (Under a zero file-size limit joblib, imported by DIPY, also warns that it cannot make
    # semaphores; the run's own output is the one sentence at the end.)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --out {out} is not writable: File too large."]
    assert result.stderr.strip().endswith(errors[0])
    assert not out.exists(), "no subject may be started"


def test_disk_full_mid_run_keeps_earlier_outputs(hcp, tmp_path):
    out = tmp_path / "out"
    assert _cli("--hcp-root", str(hcp), "--out", str(out), "--subjects", "synth000").returncode == 0
    finished = _snapshot(out / "synth000")
    # synth001's first output (dt_hr, ~150 kB gzipped) cannot be written past 20 kB.
    result = _cli("--hcp-root", str(hcp), "--out", str(out), file_size_limit=20_000)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    failure = result.stderr.strip().splitlines()[-1]
    assert failure == (
        f"  synth001: {out / 'synth001' / 'dt_hr.nii.gz'} cannot be written (File too large); "
        "the subject is left incomplete (no record) and other subjects are untouched."
    )
    assert "synth000: skipped" in result.stderr
    assert _snapshot(out / "synth000") == finished
    assert list((out / "synth001").iterdir()) == [], "no record, no temporary, no partial file"


def _truncate(path: Path) -> None:
    payload = path.read_bytes()
    path.unlink()  # a hard link to the shared fixture: never write through it
    path.write_bytes(payload[: len(payload) // 2])


def _lie_about_size(path: Path) -> None:
    """A real, tiny NIfTI whose header claims 2000 x 2000 x 2000 voxels per volume."""
    header = nib.load(path).header.copy()
    volumes = header.get_data_shape()[3]
    header.set_data_shape((2000, 2000, 2000, volumes))
    header.set_data_offset(352)
    path.unlink()
    with gzip.open(path, "wb") as stream:
        stream.write(header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes())


def test_bad_subjects_in_one_run_each_get_one_sentence(hcp, tmp_path):
    out = tmp_path / "out"
    for subject_id in ("truncated_mask", "huge_header"):
        shutil.copytree(hcp / "synth001", hcp / subject_id, copy_function=os.link)
    _truncate(hcp / "truncated_mask" / DIFFUSION_SUBDIR / "nodif_brain_mask.nii.gz")
    _lie_about_size(hcp / "huge_header" / DIFFUSION_SUBDIR / "data.nii.gz")
    assert nib.load(hcp / "huge_header" / DIFFUSION_SUBDIR / "data.nii.gz").shape[:3] == (2000,) * 3
    (hcp / "loop").symlink_to(hcp / "loop")
    result = _cli("--hcp-root", str(hcp), "--out", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    listing = result.stderr.split("3 subject(s) failed:\n")[1].strip().splitlines()
    failures = dict(line.strip().split(": ", 1) for line in listing)
    mask = hcp / "truncated_mask" / DIFFUSION_SUBDIR / "nodif_brain_mask.nii.gz"
    assert failures["truncated_mask"].startswith(f"{mask} cannot be read: ")
    data = hcp / "huge_header" / DIFFUSION_SUBDIR / "data.nii.gz"
    assert failures["huge_header"].startswith(
        f"{data} has shape (2000, 2000, 2000, 288): reading 108 volume(s) of it needs "
    )
    assert "GB of memory but only" in failures["huge_header"]
    assert failures["loop"] == f"{hcp / 'loop'} is a symlink loop."
    assert all(message.endswith(".") for message in failures.values())
    for subject_id in ("synth000", "synth001"):
        assert (out / subject_id / RECORD_NAME).is_file()
    for subject_id in failures:
        assert not (out / subject_id).exists()


def test_symlink_loop_as_hcp_root(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = _cli("--hcp-root", str(loop), "--out", str(tmp_path / "out"))
    assert _one_sentence(result) == f"{loop} is a symlink loop."


def test_rerun_with_other_settings_is_refused(hcp, tmp_path):
    out = tmp_path / "out"
    preprocess_hcp(hcp, out, ["synth000"], PreprocessingOptions(), progress=False)
    finished = _snapshot(out / "synth000")
    for setting, recorded in [
        (["--factor", "3"], "--factor 2 (this run: 3)"),
        (["--bmax", "2500", "--fit-method", "OLS"], "--bmax 1500.0 (this run: 2500.0), "
         "--fit-method WLS (this run: OLS)"),
    ]:  # fmt: skip
        result = _cli("--hcp-root", str(hcp), "--out", str(out), *setting)
        assert _one_sentence(result) == (
            f"{out / 'synth000' / RECORD_NAME} records other settings than this run's, "
            f"{recorded}: use another --out, or --overwrite to redo the subject."
        )
        assert _snapshot(out / "synth000") == finished
        assert not (out / "synth001").exists(), "refused before any subject"
    # The same settings, the fit method in another case, are the same settings.
    same = _cli(
        "--hcp-root", str(hcp), "--out", str(out), "--subjects", "synth000", "--fit-method", "wls"
    )
    assert same.returncode == 0 and "synth000: skipped" in same.stderr


def test_second_run_waits_for_the_subject_lock(hcp, tmp_path):
    """A real process finds the subject locked (as a first run holds it), waits, then makes it."""
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".synth000.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        command = [sys.executable, "-m", "preprocessing", "hcp", "--no-progress"]
        command += ["--hcp-root", str(hcp), "--out", str(out), "--subjects", "synth000"]
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        time.sleep(8)  # enough to read, fit and write this subject several times over
        assert process.poll() is None, "the run must wait while the subject is locked"
        assert not (out / "synth000").exists()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "synth000: another process is making it; waiting for it" in stderr
    assert "synth000: done" in stderr
    assert (out / "synth000" / RECORD_NAME).is_file()


@pytest.mark.slow
def test_two_runs_on_one_out_share_the_work_and_lose_nothing(hcp, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "preprocessing", "hcp", "--no-progress"]
    command += ["--hcp-root", str(hcp), "--out", str(out), "--fit-workers", "1"]
    runs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    stderr = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], stderr
    for subject_id in ("synth000", "synth001"):
        done = sum(f"{subject_id}: done" in text for text in stderr)
        skipped = sum(f"{subject_id}: skipped" in text for text in stderr)
        assert (done, skipped) == (1, 1), stderr
        names = sorted(p.name for p in (out / subject_id).iterdir())
        assert names == sorted([*OUTPUT_NAMES, RECORD_NAME]), "no temporaries left behind"
    clean = tmp_path / "clean"
    preprocess_hcp(hcp, clean, options=PreprocessingOptions(), progress=False)
    for subject_id in ("synth000", "synth001"):
        for name in OUTPUT_NAMES:
            assert (out / subject_id / name).read_bytes() == (
                clean / subject_id / name
            ).read_bytes()


def test_only_temporaries_of_ended_processes_are_removed(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    try:
        live_tmp = tmp_path / f".dt_hr.nii.gz.{alive.pid}.k3j2h1.tmp.nii.gz"
        dead_tmp = tmp_path / f".dt_hr.nii.gz.{ended.pid}.a8b7c6.tmp.nii.gz"
        for path in (live_tmp, dead_tmp):
            path.write_bytes(b"partial")
        (tmp_path / "dt_lr.nii.gz").write_bytes(b"kept")
        assert remove_stale_temporaries(tmp_path) == [dead_tmp]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_tmp.name, "dt_lr.nii.gz"])
    finally:
        alive.kill()
        alive.wait()


def test_atomic_write_is_complete_durable_and_has_umask_permissions(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    umask = os.umask(0o027)
    try:
        target = write_text(tmp_path / "record.json", '{"a": 1}\n')
    finally:
        os.umask(umask)
    assert target.read_text() == '{"a": 1}\n'
    # io reads the umask once at import: the test process's usual one.
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p for p in tmp_path.iterdir()] == [target], "no temporary left"
    assert len(synced) == 2
    assert Path(synced[0]).name.startswith(f".record.json.{os.getpid()}.")  # the temporary file
    assert synced[1] == str(tmp_path)  # then the folder, after the rename
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "record.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == '{"a": 1}\n' and [p for p in tmp_path.iterdir()] == [target]
