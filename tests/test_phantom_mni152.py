"""The brain-realistic MNI152 phantom: anatomy, tensors, physics, lesion, grid and command line.

Everything runs on a 2.5 mm grid (HCP's field of view) or a slab of it, so the module takes
seconds. Oracles are independent of the generator: DIPY's eigen-decomposition and tensor fit,
the corpus callosum's and internal capsule's known place in MNI space, nibabel's axis codes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import (
    TensorModel,
    decompose_tensor,
    fractional_anisotropy,
    from_lower_triangular,
    lower_triangular,
    mean_diffusivity,
)
from scipy import ndimage

from preprocessing.__main__ import main
from preprocessing.mni152 import (
    Lesion,
    hcp_grid,
    make_mni152_phantom,
    write_mni152_subject,
)
from preprocessing.synthetic import GRID_CENTRE_MM, HCP_SHAPE

VOXEL_MM = 2.5
SLAB = (34, 46)  # world z -5 .. 35 mm at 2.5 mm: internal capsule, ventricles, callosum
SEED = 3


@pytest.fixture(scope="module")
def brain():
    return make_mni152_phantom(hcp_grid(VOXEL_MM), SEED, 0)[0]


@pytest.fixture(scope="module")
def eigen(brain):
    """DIPY eigenvalues and eigenvectors of the ground-truth tensors (voxel axes)."""
    return decompose_tensor(from_lower_triangular(brain.phantom.tensors.astype(np.float64)))


@pytest.fixture(scope="module")
def template_coordinates(brain):
    """MNI coordinates (X, Y, Z, 3) of every voxel, through the subject's deformation."""
    grid = brain.grid
    index = np.stack(np.meshgrid(*map(np.arange, grid.shape), indexing="ij"), -1).reshape(-1, 3)
    world = nib.affines.apply_affine(grid.affine, index)
    return brain.deformation.to_template(world).reshape(grid.shape + (3,))


@pytest.fixture(scope="module")
def slab_subjects(tmp_path_factory):
    """Slab subjects: noise-free; SNR 30 without and with the lesion (same seed and index)."""
    root = tmp_path_factory.mktemp("mni152")
    grid = hcp_grid(VOXEL_MM, SLAB)
    return {
        "clean": write_mni152_subject(root, "clean", SEED, 1, grid, snr=None),
        "noisy": write_mni152_subject(root, "noisy", SEED, 1, grid, snr=30.0),
        "lesion": write_mni152_subject(root, "lesion", SEED, 1, grid, snr=30.0, lesion=Lesion()),
        "cyst": write_mni152_subject(root, "cyst", SEED, 1, grid, None, Lesion(3.5, 0.0)),
    }


def _load(subject, *parts):
    return nib.load(subject.joinpath(*parts))


def test_tissue_fractions_sum_to_one_inside_the_head(brain):
    fractions, occupancy = brain.fractions, brain.occupancy
    head = occupancy > 0
    assert np.all((fractions >= 0) & (fractions <= 1)) and np.all(occupancy <= 1)
    np.testing.assert_allclose(fractions[head].sum(-1), 1.0, atol=1e-5)
    assert np.all(fractions[~head] == 0) and np.all(brain.phantom.tensors[~head] == 0)
    mask = brain.phantom.brain_mask.astype(bool)
    assert np.array_equal(mask, occupancy >= 0.5)
    litres = {
        name: (fractions[..., c] * occupancy)[mask].sum() * VOXEL_MM**3 / 1e6
        for c, name in enumerate(("gm", "wm", "csf"))
    }
    # An adult brain, a little larger than most (the template's blurred GM): GM > WM > CSF.
    assert 1.1 < sum(litres.values()) < 2.0
    assert litres["gm"] > litres["wm"] > litres["csf"] > 0.05


def test_ground_truth_tensors_are_positive_definite_in_mm2_per_s(brain, eigen):
    evals, _ = eigen
    mask = brain.phantom.brain_mask.astype(bool)
    assert evals[mask].min() > 1e-4 and evals[mask].max() <= 3.0e-3 + 1e-9
    md = mean_diffusivity(evals)
    pure = {name: (brain.fractions[..., c] > 0.99) & mask for c, name in enumerate("gwc")}
    assert pure["c"].sum() > 20 and pure["g"].sum() > 20
    np.testing.assert_allclose(md[pure["c"]], 3.0e-3, rtol=0.01)  # CSF: free water at 37 C
    np.testing.assert_allclose(md[pure["g"]], 0.8e-3, rtol=0.03)
    assert np.all(fractional_anisotropy(evals)[pure["c"] | pure["g"]] < 0.05)


def test_single_fibre_white_matter_has_fa_0_6_to_0_8(brain, eigen):
    evals, _ = eigen
    mask = brain.phantom.brain_mask.astype(bool)
    pure_wm = (brain.fractions[..., 1] > 0.99) & mask
    prolate = (evals[..., 1] - evals[..., 2]) < 0.05 * (evals[..., 0] - evals[..., 2])
    fa = fractional_anisotropy(evals)[pure_wm & prolate]
    assert len(fa) > 500
    low, median, high = np.percentile(fa, [5, 50, 95])
    assert 0.5 < low and 0.55 < median < 0.8 and high < 0.82, (low, median, high)


def test_corpus_callosum_runs_left_right_at_the_midline(brain, eigen, template_coordinates):
    _, evecs = eigen
    x, y, z = np.moveaxis(template_coordinates, -1, 0)
    wm = brain.fractions[..., 1] > 0.8
    callosum = wm & (np.abs(x) < 4) & (y > -25) & (y < 10) & (z > 18) & (z < 28)
    assert callosum.sum() >= 20
    principal = evecs[..., :, 0][callosum]  # voxel axes; LAS: axis 0 is left-right
    assert np.mean(np.abs(principal[:, 0]) > 0.9) > 0.9
    # The internal capsule, by contrast, runs superior-inferior (voxel axis 2).
    capsule = wm & (np.abs(np.abs(x) - 22) < 4) & (y > -20) & (y < -5) & (z > 0) & (z < 10)
    assert capsule.sum() >= 20
    assert np.mean(np.abs(evecs[..., :, 0][capsule][:, 2]) > 0.8) > 0.8
    # Above it the corona radiata fans out: up and to the right in the right hemisphere, which
    # in LAS voxel axes (axis 0 points left) makes the axis-0 and axis-2 components opposite.
    for side in (1, -1):
        corona = wm & (np.abs(side * x - 30) < 5) & (y > -25) & (y < -5) & (z > 38) & (z < 50)
        principal = evecs[..., :, 0][corona]
        assert corona.sum() >= 10
        assert np.mean(side * principal[:, 0] * principal[:, 2] < 0) > 0.8, side


def test_crossing_fibres_exist(brain, eigen):
    """Two fibre populations average to a planar tensor (lambda2 near lambda1), one does not."""
    evals, _ = eigen
    pure_wm = (brain.fractions[..., 1] > 0.99) & brain.phantom.brain_mask.astype(bool)
    planar = (evals[..., 1] - evals[..., 2]) > 0.4 * (evals[..., 0] - evals[..., 2])
    assert (pure_wm & planar).sum() > 0.05 * pure_wm.sum()


def test_noise_free_signal_refits_to_ground_truth_with_dipy(slab_subjects):
    subject = slab_subjects["clean"]
    diffusion = subject / "T1w" / "Diffusion"
    data = _load(diffusion, "data.nii.gz").get_fdata(dtype=np.float32)
    mask = _load(diffusion, "nodif_brain_mask.nii.gz").get_fdata() > 0
    bvals, bvecs = np.loadtxt(diffusion / "bvals"), np.loadtxt(diffusion / "bvecs").T
    keep = bvals <= 1500
    gtab = gradient_table(bvals[keep], bvecs=bvecs[keep], b0_threshold=100)
    fitted = TensorModel(gtab, fit_method="WLS").fit(data[..., keep], mask=mask).lower_triangular()
    truth = _load(subject, "ground_truth", "dt_hr.nii.gz").get_fdata()
    error = np.linalg.norm(fitted[mask] - truth[mask], axis=-1) / np.linalg.norm(
        truth[mask], axis=-1
    )
    assert mask.sum() > 5000 and error.max() < 0.01, error.max()
    assert np.all(truth[~mask] == 0)
    # HCP-like masked data: signal in the brain, exact zeros beyond two voxels from it.
    far = ndimage.distance_transform_cdt(~mask, metric="chessboard") > 2
    assert np.all(data[mask, 0] > 0) and far.mean() > 0.3 and np.all(data[far] == 0)


def test_seeds_and_indices_give_different_subjects(brain):
    grid = hcp_grid(VOXEL_MM)
    again = make_mni152_phantom(grid, SEED, 0)[0]
    assert np.array_equal(again.phantom.tensors, brain.phantom.tensors)
    mask = brain.phantom.brain_mask.astype(bool)
    for seed, index in ((SEED + 1, 0), (SEED, 1)):
        other = make_mni152_phantom(grid, seed, index)[0].phantom.brain_mask.astype(bool)
        dice = 2 * (mask & other).sum() / (mask.sum() + other.sum())
        assert 0.7 < dice < 0.97, (seed, index, dice)


def test_lesion_changes_md_inside_its_mask_only(slab_subjects):
    plain, lesioned = slab_subjects["noisy"], slab_subjects["lesion"]
    lesion = _load(lesioned, "ground_truth", "lesion_mask.nii.gz")
    assert lesion.get_data_dtype() == np.uint8
    inside = lesion.get_fdata() > 0
    brain = _load(plain, "T1w", "Diffusion", "nodif_brain_mask.nii.gz").get_fdata() > 0
    assert 5 < inside.sum() and np.all(brain[inside])
    assert not (plain / "ground_truth" / "lesion_mask.nii.gz").exists()

    def md(subject):
        tensors = _load(subject, "ground_truth", "dt_hr.nii.gz").get_fdata()
        return mean_diffusivity(np.linalg.eigvalsh(from_lower_triangular(tensors)))

    before, after = md(plain), md(lesioned)
    assert np.array_equal(before[~inside], after[~inside])
    ratio = after[inside] / before[inside]
    assert np.all(ratio > 1) and Lesion.md_factor - 0.1 < ratio.max() <= Lesion.md_factor + 1e-4
    # Same subject and the same noise everywhere else: a lesion-free twin to compare with.
    data_plain = _load(plain, "T1w", "Diffusion", "data.nii.gz").get_fdata(dtype=np.float32)
    data_lesion = _load(lesioned, "T1w", "Diffusion", "data.nii.gz").get_fdata(dtype=np.float32)
    assert np.array_equal(data_plain[~inside], data_lesion[~inside])
    assert not np.array_equal(data_plain[inside], data_lesion[inside])
    record = json.loads((lesioned / "ground_truth" / "phantom.json").read_text())
    assert 5 <= record["lesion"]["radius_mm"] <= 8 and record["anatomy"] == "mni152"
    assert record["lesion"]["md_factor"] == Lesion.md_factor


def test_lesion_factors_set_its_tensors(slab_subjects):
    """Eigenvalues l become f * MD + a * (l - MD); an isotropic cyst (MD x 3.5) in the phantom."""
    rng = np.random.default_rng(0)
    healthy = np.sort(rng.uniform(0.2e-3, 1.8e-3, (50, 3)), axis=1)
    rotations = np.linalg.qr(rng.normal(size=(50, 3, 3)))[0]
    matrices = rotations @ (healthy[:, :, None] * np.swapaxes(rotations, 1, 2))
    tensors = lower_triangular(matrices)
    md = healthy.mean(axis=1, keepdims=True)
    for lesion in (Lesion(), Lesion(3.5, 0.0), Lesion(2.0, 2.0)):
        altered = np.linalg.eigvalsh(from_lower_triangular(lesion.alter(tensors)))
        expected = lesion.md_factor * md + lesion.anisotropy_factor * (healthy - md)
        np.testing.assert_allclose(altered, expected, rtol=1e-9, atol=1e-15)

    clean, cyst = slab_subjects["clean"], slab_subjects["cyst"]
    inside = _load(cyst, "ground_truth", "lesion_mask.nii.gz").get_fdata() > 0

    def md_of(subject):
        tensors = _load(subject, "ground_truth", "dt_hr.nii.gz").get_fdata()[inside]
        return mean_diffusivity(np.linalg.eigvalsh(from_lower_triangular(tensors)))

    ratio = md_of(cyst) / md_of(clean)
    assert np.all(ratio > 1) and 3.0 < ratio.max() <= 3.5 + 1e-4
    record = json.loads((cyst / "ground_truth" / "phantom.json").read_text())
    assert record["lesion"] | {"centre_mm": 0, "radius_mm": 0} == {
        "centre_mm": 0, "radius_mm": 0, "md_factor": 3.5, "anisotropy_factor": 0.0,
        "s0_factor": Lesion.s0_factor,
    }  # fmt: skip


def test_grid_is_hcp_las_with_the_requested_voxels(slab_subjects):
    full = hcp_grid()
    assert full.shape == HCP_SHAPE
    assert nib.aff2axcodes(full.affine) == ("L", "A", "S")
    np.testing.assert_allclose(np.diag(full.affine)[:3], [-1.25, 1.25, 1.25])
    centre = nib.affines.apply_affine(full.affine, (np.array(HCP_SHAPE) - 1) / 2)
    np.testing.assert_allclose(centre, GRID_CENTRE_MM)
    coarse = hcp_grid(VOXEL_MM)
    assert coarse.shape == (73, 87, 73)  # the same field of view (181 x 218 x 181 mm)
    image = _load(slab_subjects["noisy"], "T1w", "Diffusion", "data.nii.gz")
    assert image.shape == (73, 87, SLAB[1] - SLAB[0], 288)
    assert nib.aff2axcodes(image.affine) == ("L", "A", "S")
    np.testing.assert_allclose(image.header.get_zooms()[:3], [VOXEL_MM] * 3)
    np.testing.assert_allclose(
        image.affine[:3, 3], coarse.affine[:3, :3] @ [0, 0, SLAB[0]] + coarse.affine[:3, 3]
    )
    for name in ("nodif_brain_mask.nii.gz",):
        np.testing.assert_array_equal(
            _load(slab_subjects["noisy"], "T1w", "Diffusion", name).affine, image.affine
        )


def test_command_line_writes_subjects_without_downloading(tmp_path):
    """A real process: subject synth002 (--start 2), nothing fetched into nilearn's data dirs."""
    home, nilearn_data = tmp_path / "home", tmp_path / "nilearn_data"
    home.mkdir(), nilearn_data.mkdir()
    env = dict(os.environ, HOME=str(home), NILEARN_DATA=str(nilearn_data), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "preprocessing", "synthetic", "--anatomy", "mni152"]
    command += ["--out", str(tmp_path / "hcp"), "--count", "1", "--start", "2", "--seed", "5"]
    command += ["--voxel-size", "2.5", "--slab", "36", "44", "--lesion"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    subject = tmp_path / "hcp" / "synth002_lesion"
    assert sorted(p.name for p in (subject / "T1w" / "Diffusion").iterdir()) == [
        "bvals",
        "bvecs",
        "data.nii.gz",
        "nodif_brain_mask.nii.gz",
    ]
    assert (subject / "ground_truth" / "lesion_mask.nii.gz").is_file()
    assert list(nilearn_data.iterdir()) == [] and list(home.rglob("*")) == []


def _run(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stderr.getvalue()


@pytest.mark.parametrize(
    "options, problem",
    [
        (["--anatomy", "mni152", "--voxel-size", "0"], "--voxel-size must be a positive"),
        (["--anatomy", "mni152", "--voxel-size", "-2"], "--voxel-size must be a positive"),
        (["--anatomy", "mni152", "--voxel-size", "30"], "fewer than 8 voxels"),
        (["--anatomy", "mni152", "--slab", "0", "200"], "--slab 0 200 must satisfy"),
        (["--anatomy", "mni152", "--slab", "20", "24"], "at least 8 slices"),
        (["--anatomy", "mni152", "--shape", "16", "16", "16"], "--shape applies to"),
        (["--lesion"], "apply to --anatomy mni152 only"),
        (["--anatomy", "mni152", "--lesion-md-factor", "2"], "need --lesion"),
        (["--anatomy", "mni152", "--lesion", "--lesion-md-factor", "0"], "must be positive"),
        (["--anatomy", "mni152", "--lesion", "--lesion-md-factor", "inf"], "must be positive"),
        (
            ["--anatomy", "mni152", "--lesion", "--lesion-anisotropy-factor", "2"],
            "between 0 and its MD factor (1.8)",
        ),
        (["--voxel-size", "2"], "apply to --anatomy mni152 only"),
    ],
)
def test_bad_options_are_one_sentence_and_exit_2(tmp_path, options, problem):
    out = tmp_path / "out"
    code, stderr = _run(["synthetic", "--out", str(out), "--count", "1", "--seed", "0", *options])
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert problem in stderr, stderr
    assert not out.exists()


def test_subjects_count_is_pointed_to_count(tmp_path):
    code, stderr = _run(
        ["synthetic", "--out", str(tmp_path / "o"), "--subjects", "3", "--seed", "0"]
    )
    assert code == 2 and "--count N" in stderr and stderr.count("\n") == 1
    code, stderr = _run(["synthetic", "--out", str(tmp_path / "o"), "--seed", "0"])
    assert code == 2 and "--count" in stderr and not (tmp_path / "o").exists()


def test_missing_nilearn_names_the_demo_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    out = tmp_path / "out"
    argv = ["synthetic", "--anatomy", "mni152", "--out", str(out), "--count", "1", "--seed", "0"]
    code, stderr = _run(argv)
    assert code == 2 and "pip install -e .[demo]" in stderr and stderr.count("\n") == 1
    assert not out.exists()
