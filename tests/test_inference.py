"""Sliding-window inference: no seams, HR geometry, DWI input, folders and bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tiny_bundle import MEAN, STD, randomise_batch_norm, write_tiny_models

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.inference import inference, run_inference
from monai_iqt.inferers import WholeBrainInferer, plan_windows
from monai_iqt.inputs import inference_region, load_input
from monai_iqt.networks import ESPCN_RN, VALID_SHRINK, fixed_dropout_masks
from monai_iqt.weights import load_model
from preprocessing.errors import InputError
from preprocessing.io import save_nifti
from preprocessing.synthetic import write_synthetic_subject

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = REPO / "bundles" / "iqt_espcn_rn" / "configs" / "inference.json"


def random_tensors(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape + (6,)) * np.asarray(STD) + np.asarray(MEAN)
    return values.astype(np.float32)


def relative_max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def oblique_affine() -> np.ndarray:
    """2.5 mm LR voxels, rotated about z and shifted: geometry mistakes cannot cancel out."""
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.5, 2.5, 2.5])
    affine[:3, 3] = [-31.0, 12.5, -7.25]
    return affine


# ------------------------------------------------------------------------- no seams


@pytest.mark.parametrize(
    ("num_blocks", "lr_shape", "roi"),
    [(0, (23, 19, 17), 12), (1, (20, 17, 17), 30)],
    ids=["ESPCN", "ESPCN-RN1"],
)
def test_stitched_windows_equal_one_whole_volume_pass(num_blocks, lr_shape, roi):
    torch.manual_seed(num_blocks)
    network = ESPCN_RN(num_blocks)
    randomise_batch_norm(network)
    inferer = WholeBrainInferer(network, NormalisationStats(MEAN, STD, MEAN, STD), 2, roi, 2, "cpu")
    padded = tuple(s + 2 * network.halo for s in lr_shape)
    window = plan_windows(padded, roi, network.halo)
    assert any(p % w for p, w in zip(padded, window, strict=True)), "volume must not tile exactly"
    dt = random_tensors(lr_shape)

    stitched = inferer(dt)
    whole = inferer.whole_volume(dt)

    assert stitched.shape == (2 * lr_shape[0], 2 * lr_shape[1], 2 * lr_shape[2], 6)
    assert inferer.last_counts.windows_computed >= 8
    assert relative_max_error(stitched, whole) < 1e-5


def test_a_brain_cut_by_the_field_of_view_continues_beyond_it():
    """The LR edge repeats beyond the field of view: predicting a slab equals predicting a
    volume whose first and last slices are repeated, at the slab's own voxels."""
    torch.manual_seed(2)
    network = ESPCN_RN(0)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    inferer = WholeBrainInferer(network, stats, 2, 64, 1, "cpu")
    slab = random_tensors((12, 10, 9), seed=5)  # brain everywhere: cut on all six faces
    # Oracle: the edge repeated by hand (numpy), two LR voxels, the ESPCN's halo.
    extended = np.pad(slab, ((2, 2), (2, 2), (2, 2), (0, 0)), mode="edge")
    expected = inferer.whole_volume(extended)[4:-4, 4:-4, 4:-4]
    actual = inferer.whole_volume(slab)
    assert relative_max_error(actual, expected) < 1e-5
    # Control: zero background beyond the edge predicts the outer slices differently.
    zeros = np.pad(slab, ((2, 2), (2, 2), (2, 2), (0, 0)))
    assert relative_max_error(actual, inferer.whole_volume(zeros)[4:-4, 4:-4, 4:-4]) > 1e-2


def _ball_cut_by_the_field_of_view(shape: tuple[int, int, int]) -> np.ndarray:
    """A brain ball centred near the low corner: cut by three faces, background at the others."""
    grid = np.meshgrid(*[np.arange(n) - 0.2 * n for n in shape], indexing="ij")
    return sum((g / (0.6 * n)) ** 2 for g, n in zip(grid, shape, strict=True)) <= 1.0


@pytest.mark.parametrize(
    ("num_blocks", "shape", "roi"),
    [(0, (14, 12, 11), 9), (2, (8, 7, 6), (32, 0, 0))],  # N = 2: two windows along x
    ids=["N0", "N2"],
)
def test_prediction_of_a_cut_brain_equals_that_of_the_volume_extended_by_its_edge(
    num_blocks, shape, roi
):
    """Each network's own halo of repeated edge voxels: on the original voxels, the prediction
    on a volume whose brain touches the field of view equals the prediction on the same volume
    extended beforehand by (halo + 2) repeated edge voxels, in windows as in one pass."""
    torch.manual_seed(10 + num_blocks)
    network = ESPCN_RN(num_blocks)
    randomise_batch_norm(network, seed=3)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    inferer = WholeBrainInferer(network, stats, 2, roi, 2, "cpu")
    brain = _ball_cut_by_the_field_of_view(shape)
    assert brain[0].any() and brain[:, 0].any() and brain[:, :, 0].any() and not brain[-1].any()
    dt = random_tensors(shape, seed=11) * brain[..., None]
    k = network.halo + 2
    pad = ((k, k), (k, k), (k, k))
    extended_dt = np.pad(dt, (*pad, (0, 0)), mode="edge")  # the oracle: numpy's edge mode
    extended_brain = np.pad(brain, pad)  # where to predict: the same brain voxels
    inside = (slice(2 * k, -2 * k),) * 3

    windows = inferer(dt, brain)
    assert inferer.last_counts.windows_computed >= 2
    expected = inferer(extended_dt, extended_brain)[inside]

    assert windows.shape == (*(2 * n for n in shape), 6)
    assert relative_max_error(windows, expected) < 1e-5
    assert relative_max_error(inferer.whole_volume(dt, brain), expected) < 1e-5
    if num_blocks:  # control: the ESPCN's padding of 2 voxels lets the blocks' zeros in
        short = WholeBrainInferer(network, stats, 2, roi, 2, "cpu")
        short.halo = VALID_SHRINK
        assert relative_max_error(short.whole_volume(dt, brain), expected) > 1e-3


def test_reversible_blocks_need_their_halo():
    """Control: windows that ignore the reversible blocks' halo do leave seams."""
    torch.manual_seed(1)
    network = ESPCN_RN(1)
    randomise_batch_norm(network)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    dt = random_tensors((17, 15, 13), seed=3)
    whole = WholeBrainInferer(network, stats, 2, 14, 2, "cpu").whole_volume(dt)

    class PlainESPCNHalo(torch.nn.Module):  # the same network, claiming the ESPCN's halo
        halo = 2

        def __init__(self) -> None:
            super().__init__()
            self.inner = network

        def forward(self, x):
            return self.inner(x)

    pretending = WholeBrainInferer(PlainESPCNHalo(), stats, 2, 14, 2, "cpu")
    assert relative_max_error(pretending(dt), whole) > 1e-3


@pytest.mark.parametrize(
    ("num_blocks", "shape", "roi", "radius"),
    [(0, (30, 26, 22), 10, 0.6), (1, (28, 24, 22), 40, 0.35)],
    ids=["ESPCN", "ESPCN-RN1"],
)
def test_windows_are_cropped_to_the_brain_and_output_is_masked(num_blocks, shape, roi, radius):
    torch.manual_seed(2)
    network = ESPCN_RN(num_blocks)
    randomise_batch_norm(network)
    inferer = WholeBrainInferer(network, NormalisationStats(MEAN, STD, MEAN, STD), 2, roi, 3, "cpu")
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum((g / radius) ** 2 for g in grid) <= 1.0
    dt = random_tensors(shape, seed=4) * brain[..., None]

    stitched = inferer(dt, brain)
    whole = inferer.whole_volume(dt, brain)

    predictor = inferer.last_counts
    if num_blocks == 0:  # many windows, those outside the brain skipped
        assert predictor.windows_computed >= 8 and predictor.windows_skipped > 0
    # brain bounding boxes: fewer voxels than the windows MONAI handed over
    assert predictor.voxels_computed < predictor.windows_computed * np.prod(
        plan_windows([s + 2 * network.halo for s in shape], roi, network.halo)
    )
    brain_hr = np.repeat(np.repeat(np.repeat(brain, 2, 0), 2, 1), 2, 2)
    assert np.all(stitched[~brain_hr] == 0)
    assert np.all(np.any(stitched[brain_hr] != 0, axis=-1))
    assert relative_max_error(stitched, whole) < 1e-5


# ------------------------------------------------------------------------- bundle command


@pytest.mark.slow
def test_bundle_inference_writes_hr_tensor_and_maps_with_hr_geometry(tmp_path):
    model_path, normalisation_path = write_tiny_models(tmp_path / "models", num_blocks=0)
    lr_shape = (14, 12, 10)
    affine = oblique_affine()
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in lr_shape], indexing="ij")
    mask = sum((g / 0.8) ** 2 for g in grid) <= 1.0
    dt_lr = random_tensors(lr_shape, seed=5) * mask[..., None]
    save_nifti(tmp_path / "scan.nii.gz", dt_lr, affine, np.float32)
    save_nifti(tmp_path / "scan_mask.nii.gz", mask, affine, np.uint8)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(INFERENCE_CONFIG),
        "--input", str(tmp_path / "scan.nii.gz"), "--mask", str(tmp_path / "scan_mask.nii.gz"),
        "--output_dir", str(out), "--model_path", str(model_path),
        "--normalisation_path", str(normalisation_path), "--roi_size", "10",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    image = nib.load(out / "dt_hr.nii.gz")
    assert image.shape == (28, 24, 20, 6)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (1.25, 1.25, 1.25), rtol=1e-6)
    hr_affine = image.affine
    # every LR voxel centre is the mean of its 2x2x2 HR block's centres
    for lr_index in [(0, 0, 0), (13, 11, 9), (5, 7, 2)]:
        block = [
            hr_affine @ np.array([2 * lr_index[0] + a, 2 * lr_index[1] + b, 2 * lr_index[2] + c, 1])
            for a in (0, 1)
            for b in (0, 1)
            for c in (0, 1)
        ]
        np.testing.assert_allclose(
            np.mean(block, axis=0), affine @ np.array([*lr_index, 1.0]), atol=1e-9
        )

    # the prediction is one whole-volume pass of the bundle's network over the brain region
    network, stats = load_model(model_path, normalisation_path, "cpu")
    expected = WholeBrainInferer(network, stats, 2, 64, 1, "cpu").whole_volume(
        dt_lr, inference_region(mask)
    )
    dt_hr = np.asarray(image.dataobj)
    assert relative_max_error(dt_hr, expected) < 1e-5

    # maps against an independent eigen-decomposition of the written tensor
    brain = np.any(dt_hr != 0, axis=-1)
    d = dt_hr[brain].astype(np.float64)
    matrices = np.stack(
        [d[:, [0, 1, 3]], d[:, [1, 2, 4]], d[:, [3, 4, 5]]], axis=1
    )  # rows of the symmetric tensor in (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz) order
    evals, evecs = np.linalg.eigh(matrices)
    md = np.asarray(nib.load(out / "md.nii.gz").dataobj)
    fa = np.asarray(nib.load(out / "fa.nii.gz").dataobj)
    rgb = np.asarray(nib.load(out / "colour_fa.nii.gz").dataobj)
    assert md.shape == fa.shape == (28, 24, 20) and rgb.shape == (28, 24, 20, 3)
    positive = np.all(evals > 0, axis=1)  # DIPY clips negative eigenvalues to 0
    np.testing.assert_allclose(
        md[brain][positive], (d[:, 0] + d[:, 2] + d[:, 5])[positive] / 3, rtol=1e-4, atol=1e-9
    )
    np.testing.assert_allclose(md[brain], np.clip(evals, 0, None).mean(axis=1), atol=1e-9)
    mean = evals.mean(axis=1, keepdims=True)
    fa_expected = np.sqrt(1.5 * ((evals - mean) ** 2).sum(1) / (evals**2).sum(1))
    np.testing.assert_allclose(fa[brain][positive], fa_expected[positive], atol=1e-4)
    principal = np.abs(evecs[:, :, -1])
    rgb_expected = np.clip(fa_expected[:, None] * principal, 0, 1)
    np.testing.assert_allclose(rgb[brain][positive], rgb_expected[positive], atol=1e-3)


def test_bundle_entry_prints_one_sentence_and_exits_2(tmp_path, capsys):
    save_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(SystemExit) as raised:
        inference(
            input=tmp_path / "scan.nii.gz",
            output_dir=tmp_path / "out",
            network=None,  # inputs are checked before the network is used
            inferer=None,
            writer=None,
            model_path=tmp_path / "none.pt",
            normalisation_path=tmp_path / "none.json",
        )
    assert raised.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "expected a 4D image" in stderr
    assert stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_models(tmp_path_factory.mktemp("models"), num_blocks=0)


def test_dwi_input_is_fitted_on_the_b1000_shell(tmp_path, tiny_models):
    """A noise-free synthetic DWI: the fitted tensor matches the phantom's within 1%."""
    subject = write_synthetic_subject(tmp_path / "hcp", "s0", seed=7, shape=(12, 14, 12), snr=None)
    diffusion = subject / "T1w" / "Diffusion"
    mask_path = diffusion / "nodif_brain_mask.nii.gz"
    item = load_input(diffusion / "data.nii.gz", mask_path)  # bvals/bvecs found beside it
    truth = np.asarray(nib.load(subject / "ground_truth" / "dt_hr.nii.gz").dataobj)
    mask = np.asarray(nib.load(mask_path).dataobj) > 0
    error = np.linalg.norm(item.dt_lr[mask] - truth[mask], axis=1)
    assert np.all(error <= 0.01 * np.linalg.norm(truth[mask], axis=1))

    written = run_inference(
        diffusion / "data.nii.gz",
        tmp_path / "out",
        *tiny_models,
        mask=mask_path,
        device="cpu",
        voxel_size_mismatch="allow",  # the phantom's 1.25 mm grid, as a DWI to fit
    )
    assert nib.load(written["data"]["dt_hr"]).shape == (24, 28, 24, 6)


def test_folder_of_subjects(preprocessed_root, tmp_path, tiny_models):
    written = run_inference(preprocessed_root, tmp_path / "out", *tiny_models, device="cpu")
    assert sorted(written) == ["synth000", "synth001", "synth002"]
    for name, paths in written.items():
        assert paths["dt_hr"] == tmp_path / "out" / name / "dt_hr.nii.gz"
        lr = nib.load(preprocessed_root / name / "dt_lr.nii.gz")
        hr = nib.load(paths["dt_hr"])
        assert hr.shape == tuple(2 * s for s in lr.shape[:3]) + (6,)
        # outside the LR mask grown by one voxel, the output is background
        region = inference_region(
            np.asarray(nib.load(preprocessed_root / name / "mask_lr.nii.gz").dataobj)
        )
        outside = ~np.repeat(np.repeat(np.repeat(region, 2, 0), 2, 1), 2, 2)
        assert np.all(np.asarray(hr.dataobj)[outside] == 0)


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[dict, str]]:
    good = random_tensors((10, 10, 10))
    eye = np.eye(4) * 2.5
    eye[3, 3] = 1
    save_nifti(tmp_path / "three_d.nii.gz", good[..., 0], eye)
    save_nifti(tmp_path / "five.nii.gz", good[..., :5], eye)
    with_nan = good.copy()
    with_nan[3, 4, 5, 2] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", with_nan, eye)
    save_nifti(tmp_path / "good.nii.gz", good, eye)
    save_nifti(tmp_path / "mask9.nii.gz", np.ones((9, 10, 10), np.uint8), eye)
    dwi = np.abs(random_tensors((10, 10, 10)))[..., [0, 1, 2, 3, 4, 5, 0]]
    save_nifti(tmp_path / "dwi.nii.gz", dwi, eye)
    (tmp_path / "dwi.bval").write_text("0 1000 1000 1000 1000 1000 1000\n")
    (tmp_path / "a_file").write_text("not a folder\n")
    out = tmp_path / "out"
    return {
        "3D": ({"input": tmp_path / "three_d.nii.gz"}, "expected a 4D image"),
        "5 channels": ({"input": tmp_path / "five.nii.gz"}, "not a 6-element tensor image"),
        "NaN": ({"input": tmp_path / "nan.nii.gz"}, "NaN"),
        "mask shape": (
            {"input": tmp_path / "good.nii.gz", "mask": tmp_path / "mask9.nii.gz"},
            "has shape (9, 10, 10) but",
        ),
        "missing bvecs": (
            {"input": tmp_path / "dwi.nii.gz", "bvals": tmp_path / "dwi.bval"},
            "needs its bvecs",
        ),
        "unwritable output": (
            {"input": tmp_path / "good.nii.gz", "output_dir": tmp_path / "a_file" / "out"},
            "is not writable",
        ),
        "missing input": ({"input": tmp_path / "absent.nii.gz"}, "does not exist"),
    } | {"_out": ({"output_dir": out}, "")}


def test_bad_input_fails_with_one_sentence_before_loading_the_model(tmp_path):
    cases = _bad_input_cases(tmp_path)
    defaults = cases.pop("_out")[0]
    for name, (arguments, expected) in cases.items():
        kwargs = {
            **defaults,
            "model_path": tmp_path / "no_model.pt",  # never reached: inputs are checked first
            "normalisation_path": tmp_path / "no_stats.json",
            **arguments,
        }
        with pytest.raises(InputError) as raised:
            run_inference(**kwargs)
        message = str(raised.value)
        assert expected in message, (name, message)
        assert str(kwargs["input"].name) in message or name == "unwritable output", (name, message)
        assert "\n" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_dwi_with_non_unit_bvecs_fails_with_one_sentence_naming_the_bvecs(tmp_path):
    """The DWI path shares preprocessing's gradient checks (read_gradient_table)."""
    eye = np.diag([2.5, 2.5, 2.5, 1.0])
    dwi = np.abs(random_tensors((10, 10, 10)))[..., [0, 1, 2, 3, 4, 5, 0]]
    save_nifti(tmp_path / "dwi.nii.gz", dwi, eye)
    (tmp_path / "dwi.bval").write_text("0 1000 1000 1000 1000 1000 1000\n")
    directions = np.array(
        [[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]]
    )
    np.savetxt(tmp_path / "dwi.bvec", directions.T.astype(float))
    with pytest.raises(InputError) as raised:
        run_inference(
            tmp_path / "dwi.nii.gz",
            tmp_path / "out",
            tmp_path / "no_model.pt",
            tmp_path / "no_stats.json",
            device="cpu",
        )
    message = str(raised.value)
    assert "dwi.bvec" in message and "unit vectors" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_model_files_that_do_not_match_fail_with_one_sentence(tmp_path, tiny_models):
    """Wrong depth, a corrupt model.pt and a malformed normalisation.json name the file."""
    model_path, stats_path = tiny_models
    save_nifti(tmp_path / "dt.nii.gz", random_tensors((9, 9, 9)), np.diag([2.5, 2.5, 2.5, 1.0]))
    deeper = NormalisationStats.load(stats_path)
    deeper.extra["num_blocks"] = 1
    deeper.save(tmp_path / "deeper.json")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "broken.json").write_text("{ not json")
    cases = {
        "wrong depth": (model_path, tmp_path / "deeper.json", "model.pt"),
        "corrupt weights": (tmp_path / "corrupt.pt", stats_path, "corrupt.pt"),
        "malformed statistics": (model_path, tmp_path / "broken.json", "broken.json"),
    }
    for name, (weights, stats, named_file) in cases.items():
        with pytest.raises(InputError) as raised:
            run_inference(tmp_path / "dt.nii.gz", tmp_path / "out", weights, stats, device="cpu")
        message = str(raised.value)
        assert named_file in message and "\n" not in message, (name, message)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------------- patch stitching


def test_patch_stitching_equals_the_whole_volume_for_the_espcn():
    """Valid convolutions only: the paper's 11^3 patches give the whole-volume output."""
    torch.manual_seed(5)
    network = ESPCN_RN(0)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    shape = (24, 19, 27)  # not multiples of the 7^3 patch output
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = sum(g**2 for g in grid) <= 0.3  # patches in the corners have no brain
    dt = random_tensors(shape, seed=6) * brain[..., None]
    inferer = WholeBrainInferer(network, stats, 2, device="cpu", inference_mode="patches")

    patches = inferer(dt, brain)

    assert inferer.last_counts.windows_computed >= 8 and inferer.last_counts.windows_skipped > 0
    assert relative_max_error(patches, inferer.whole_volume(dt, brain)) < 1e-5


def test_patch_stitching_for_espcn_rn2_is_the_network_on_each_11_cube():
    """With reversible blocks each patch is zero-padded inside, as in training: the stitched
    output differs from the whole-volume pass and equals the network run on one 11^3 patch."""
    torch.manual_seed(6)
    network = ESPCN_RN(2)
    randomise_batch_norm(network, seed=2)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    dt = random_tensors((16, 16, 16), seed=7)  # padded 20: patches at 0, 7 and 9 per axis
    inferer = WholeBrainInferer(network, stats, 2, device="cpu", inference_mode="patches")

    patches = inferer(dt)

    assert relative_max_error(patches, inferer.whole_volume(dt)) > 1e-3
    padded = inferer._padded_input(dt, VALID_SHRINK)  # edge-padded, normalised: the input
    with torch.no_grad():
        by_hand = stats.denormalise_output(network.eval()(padded[:, :, :11, :11, :11]))
    by_hand = np.moveaxis(by_hand[0].numpy(), 0, -1)  # the 7^3 LR (14^3 HR) outputs of the cube
    assert relative_max_error(patches[:14, :14, :14], by_hand) < 1e-5


# ------------------------------------------------------------------------- uncertainty


def test_predictive_std_is_exact_in_windows_and_combines_both_uncertainties():
    """ESPCN-RN1 with a variance head and dropout, 3 MC samples: windows give the whole-volume
    mean and std; the std is sqrt(mean intrinsic variance + variance of the samples' means)."""
    torch.manual_seed(8)
    network = ESPCN_RN(1, predict_variance=True, dropout_rate=0.3)
    randomise_batch_norm(network, seed=8)
    stats = NormalisationStats(MEAN, STD, MEAN, STD)
    dt = random_tensors((16, 15, 15), seed=9)
    inferer = WholeBrainInferer(network, stats, 2, 30, 2, "cpu", mc_samples=3, seed=4)

    mean, std = inferer.predict_with_std(dt)
    whole_mean, whole_std = inferer.predict_with_std(dt, whole_volume=True)

    assert inferer.last_counts.windows_computed >= 8
    assert relative_max_error(mean, whole_mean) < 1e-5
    assert relative_max_error(std, whole_std) < 1e-5
    # by hand, on the whole volume: three fixed-mask samples of the network
    padded = inferer._padded_input(dt, network.halo)  # edge-padded by the network's halo
    cut = (slice(None), slice(None)) + (slice(2 * (network.halo - 2), -2 * (network.halo - 2)),) * 3
    std_mm = torch.tensor(STD).view(1, 6, 1, 1, 1)
    means, variances = [], []
    with torch.no_grad():
        for k in range(3):
            with fixed_dropout_masks(network, 4 + k):
                prediction = network(padded)[cut]
            means.append(stats.denormalise_output(prediction[:, :6]))
            variances.append(torch.exp(prediction[:, 6:]) * std_mm**2)
    expected = torch.sqrt(torch.stack(variances).mean(0) + torch.stack(means).var(0, False))
    expected = np.moveaxis(expected[0].numpy(), 0, -1)
    assert relative_max_error(whole_std, expected) < 1e-4
    expected_mean = np.moveaxis(torch.stack(means).mean(0)[0].numpy(), 0, -1)
    assert relative_max_error(whole_mean, expected_mean) < 1e-5
    assert float(torch.stack(means).var(0).max()) > 0  # the dropout samples differ


def test_uncertainty_outputs_and_settings(tmp_path):
    variance_models = write_tiny_models(
        tmp_path / "variance", predict_variance=True, dropout_rate=0.2
    )
    plain_models = write_tiny_models(tmp_path / "plain")
    dt = random_tensors((9, 9, 9), seed=10)
    save_nifti(tmp_path / "dt.nii.gz", dt, np.diag([2.5, 2.5, 2.5, 1.0]))
    written = run_inference(
        tmp_path / "dt.nii.gz", tmp_path / "out", *variance_models, device="cpu", mc_samples=2
    )["dt"]
    std = np.asarray(nib.load(written["dt_hr_std"]).dataobj)
    assert std.shape == (18, 18, 18, 6) and np.all(std > 0)
    for key in ("md_std", "fa_std"):
        values = np.asarray(nib.load(written[key]).dataobj)
        assert values.shape == (18, 18, 18) and np.all(np.isfinite(values)) and values.max() > 0
    # a later run without uncertainty removes the earlier run's std files (its own)
    run_inference(tmp_path / "dt.nii.gz", tmp_path / "out", *plain_models, device="cpu")
    assert not (tmp_path / "out" / "dt_hr_std.nii.gz").exists()

    cases = {
        "mc_samples 0": ({"mc_samples": 0}, plain_models, "mc_samples 0 must be an integer"),
        "variance asked": (
            {"predict_variance": True},
            plain_models,
            "records predict_variance false",
        ),
        "no dropout": ({"mc_samples": 4}, plain_models, "records dropout_rate 0"),
    }
    for name, (settings, models, expected) in cases.items():
        with pytest.raises(InputError) as raised:
            run_inference(tmp_path / "dt.nii.gz", tmp_path / name, *models, **settings)
        assert expected in str(raised.value) and "\n" not in str(raised.value), name
        assert not (tmp_path / name).exists()
