"""Interrupted runs: a crash mid-subject leaves no record, no truncated NIfTI; a rerun finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.hcp import preprocess_hcp
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.layout import OUTPUT_NAMES, RECORD_NAME
from preprocessing.synthetic import write_synthetic_subject


def _command(hcp_root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "preprocessing", "hcp", "--hcp-root", str(hcp_root)] + [
        "--out",
        str(out),
        "--no-progress",
    ]


def _assert_complete_niftis_only(folder: Path) -> None:
    """Every NIfTI under a final name loads in full (a truncated gzip would raise)."""
    for name in OUTPUT_NAMES:
        if (folder / name).is_file():
            assert np.isfinite(nib.load(folder / name).get_fdata()).all()


@pytest.fixture(scope="module")
def two_subjects(tmp_path_factory):
    """``a_small`` (16 x 18 x 16) is processed first, then ``b_medium`` (32 x 40 x 32)."""
    root = tmp_path_factory.mktemp("interrupt") / "hcp"
    write_synthetic_subject(root, "a_small", seed=1, shape=(16, 18, 16), snr=None)
    write_synthetic_subject(root, "b_medium", seed=2, shape=(32, 40, 32), snr=None)
    return root


@pytest.mark.slow
def test_sigkill_while_writing_then_rerun(two_subjects, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(_command(two_subjects, out), stderr=subprocess.DEVNULL)
    target = out / "b_medium"
    deadline = time.monotonic() + 120
    # Kill as soon as b_medium's first temporary output file appears: mid-write, mid-subject.
    while process.poll() is None and time.monotonic() < deadline:
        if target.is_dir() and any(p.name.startswith(".") for p in target.iterdir()):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the kill must land while b_medium is written"
    assert (out / "a_small" / RECORD_NAME).is_file()
    assert not (target / RECORD_NAME).exists()
    _assert_complete_niftis_only(target)
    record_time = (out / "a_small" / RECORD_NAME).stat().st_mtime_ns

    rerun = subprocess.run(_command(two_subjects, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "a_small: skipped" in rerun.stderr and "b_medium: done" in rerun.stderr
    assert (out / "a_small" / RECORD_NAME).stat().st_mtime_ns == record_time
    assert sorted(p.name for p in target.iterdir()) == sorted([*OUTPUT_NAMES, RECORD_NAME])
    # The finished subject equals an uninterrupted run, byte for byte.
    clean = tmp_path / "clean"
    preprocess_hcp(two_subjects, clean, ["b_medium"], PreprocessingOptions(), progress=False)
    for name in OUTPUT_NAMES:
        assert (target / name).read_bytes() == (clean / "b_medium" / name).read_bytes(), name


def test_crash_mid_subject_leaves_no_record_and_rerun_finishes(two_subjects, tmp_path):
    """A write failure after some outputs exist: here the last output name is a folder."""
    out = tmp_path / "out"
    blocker = out / "b_medium" / "mask_lr.nii.gz"
    blocker.mkdir(parents=True)
    summary = preprocess_hcp(two_subjects, out, progress=False)
    assert summary.done == ["a_small"]
    assert summary.failed["b_medium"] == (
        f"{blocker} cannot be written (Is a directory); the subject is left incomplete "
        "(no record) and other subjects are untouched."
    )
    assert not (out / "b_medium" / RECORD_NAME).exists()
    assert not [p for p in (out / "b_medium").iterdir() if p.name.startswith(".")]
    _assert_complete_niftis_only(out / "b_medium")
    assert (out / "b_medium" / "dt_hr.nii.gz").is_file()  # the crash came after some writes

    blocker.rmdir()
    summary = preprocess_hcp(two_subjects, out, progress=False)
    assert summary.skipped == ["a_small"] and summary.done == ["b_medium"]
    assert (out / "b_medium" / RECORD_NAME).is_file()
    _assert_complete_niftis_only(out / "b_medium")


def test_overwrite_redoes_complete_subjects(two_subjects, tmp_path):
    out = tmp_path / "out"
    preprocess_hcp(two_subjects, out, ["a_small"], progress=False)
    first = (out / "a_small" / RECORD_NAME).stat().st_mtime_ns
    assert preprocess_hcp(two_subjects, out, ["a_small"], progress=False).skipped == ["a_small"]
    assert (out / "a_small" / RECORD_NAME).stat().st_mtime_ns == first
    summary = preprocess_hcp(two_subjects, out, ["a_small"], overwrite=True, progress=False)
    assert summary.done == ["a_small"]
    assert (out / "a_small" / RECORD_NAME).stat().st_mtime_ns > first
