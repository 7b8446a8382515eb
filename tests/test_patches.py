"""Patch pairs from preprocessed subjects: geometry, seeding, split, statistics and bad input.

Subjects are hand-made NIfTIs whose LR tensor is the exact r^3 block mean of the HR tensor, so
every LR/HR patch pair can be checked against that relation independently of the cropping code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_iqt.data import NormalisationStats, build_patch_data, valid_patch_starts
from preprocessing.errors import InputError
from preprocessing.geometry import lr_affine_from_hr
from preprocessing.io import save_nifti, write_json

FACTOR = 2
HR_SHAPE = (32, 36, 30)
HR_AFFINE = np.diag([1.25, 1.25, 1.25, 1.0])
HR_AFFINE[:3, 3] = (-15.0, -17.0, -16.0)


def block_mean(volume: np.ndarray, r: int) -> np.ndarray:
    """Mean over r^3 blocks of the last three axes of a channel-first volume."""
    c, x, y, z = volume.shape
    return volume.reshape(c, x // r, r, y // r, r, z // r, r).mean(axis=(2, 4, 6))


def write_subject(
    root: Path,
    name: str,
    seed: int,
    channels: int = 6,
    factor: int = FACTOR,
    hr_shape: tuple[int, int, int] = HR_SHAPE,
) -> Path:
    """A subject folder like ``python -m preprocessing hcp`` writes (tensors in mm^2/s)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in hr_shape], indexing="ij"))
    mask_hr = (grid**2).sum(axis=0) < 0.8
    smooth = np.stack([np.sin((c + 1) * grid[c % 3] + rng.uniform(0, 3)) for c in range(channels)])
    dt_hr = (1e-3 * (1.5 + smooth) * mask_hr).astype(np.float32)
    dt_lr = block_mean(dt_hr, factor).astype(np.float32)
    folder = root / name
    save_nifti(folder / "dt_hr.nii.gz", np.moveaxis(dt_hr, 0, -1), HR_AFFINE)
    save_nifti(
        folder / "dt_lr.nii.gz", np.moveaxis(dt_lr, 0, -1), lr_affine_from_hr(HR_AFFINE, factor)
    )
    save_nifti(folder / "mask_hr.nii.gz", mask_hr.astype(np.uint8), HR_AFFINE)
    mask_lr = block_mean(mask_hr[None].astype(np.float32), factor)[0] >= 0.5
    save_nifti(
        folder / "mask_lr.nii.gz", mask_lr.astype(np.uint8), lr_affine_from_hr(HR_AFFINE, factor)
    )
    write_json(folder / "preprocessing.json", {"factor": factor})
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patches")
    for index, name in enumerate(("subjA", "subjB")):
        write_subject(root, name, seed=index)
    return root


def raw_pairs(data, split: str):
    dataset = data.train_dataset if split == "train" else data.val_dataset
    return [(loc, *data.patch_pairs.crop(loc)) for loc in dataset.data]


def test_patch_pairs_follow_the_lr_hr_relation(dataset: Path) -> None:
    data = build_patch_data(dataset, patches_per_subject=40, seed=3)
    assert (data.upscale_factor, data.lr_patch_size, data.hr_patch_size) == (2, 11, 14)
    assert data.lr_voxel_size_mm == pytest.approx([2.5, 2.5, 2.5])
    volumes = {}
    for loc, image, label in raw_pairs(data, "train") + raw_pairs(data, "val"):
        assert image.shape == (6, 11, 11, 11) and label.shape == (6, 14, 14, 14)
        # Oracle: the LR volume is the r^3 block mean of the HR volume, so the target block must
        # average back to the central 7^3 LR voxels the network's valid output covers.
        np.testing.assert_allclose(
            block_mean(label.numpy(), 2), image[:, 2:-2, 2:-2, 2:-2], rtol=1e-5, atol=1e-9
        )
        name = data.subjects[loc.subject]
        if name not in volumes:
            import nibabel as nib

            volumes[name] = np.asarray(nib.load(dataset / name / "mask_hr.nii.gz").dataobj)
        centre = [2 * (s + 2) + 7 for s in loc.start]
        assert volumes[name][tuple(centre)] == 1, "HR target centre outside the brain mask"


def test_sampling_is_seeded_split_80_20_and_per_subject(dataset: Path) -> None:
    a = build_patch_data(dataset, patches_per_subject=40, seed=3)
    b = build_patch_data(dataset, patches_per_subject=40, seed=3)
    c = build_patch_data(dataset, patches_per_subject=40, seed=4)
    only_b = build_patch_data(dataset, subjects=["subjB"], patches_per_subject=40, seed=3)
    assert a.train_dataset.data == b.train_dataset.data and a.val_dataset.data == b.val_dataset.data
    assert a.train_dataset.data != c.train_dataset.data
    assert (len(a.train_dataset), len(a.val_dataset)) == (64, 16)
    for subject in (0, 1):
        train = {loc.start for loc in a.train_dataset.data if loc.subject == subject}
        val = {loc.start for loc in a.val_dataset.data if loc.subject == subject}
        assert (len(train), len(val)) == (32, 8) and not train & val
    # A subject's patches do not depend on which other subjects are used.
    b_starts = [loc.start for loc in a.train_dataset.data if loc.subject == 1]
    assert [loc.start for loc in only_b.train_dataset.data] == b_starts


def test_validation_subjects_replace_the_patch_split(dataset: Path) -> None:
    data = build_patch_data(
        dataset, subjects=["subjA"], validation_subjects=["subjB"], patches_per_subject=40, seed=3
    )
    assert (data.subjects, data.validation_subjects) == (["subjA"], ["subjB"])
    # every patch of the training subject trains; the validation subject gives 40 x 0.2
    assert {loc.subject for loc in data.train_dataset.data} == {0}
    assert {loc.subject for loc in data.val_dataset.data} == {1}
    assert (len(data.train_dataset), len(data.val_dataset)) == (40, 8)
    split = build_patch_data(dataset, subjects=["subjA"], patches_per_subject=40, seed=3)
    all_a = {loc.start for loc in split.train_dataset.data + split.val_dataset.data}
    assert {loc.start for loc in data.train_dataset.data} == all_a
    extra = data.model_extra()
    assert extra["training_subjects"] == ["subjA"] and extra["validation_subjects"] == ["subjB"]
    # subjects None: every subject but the validation subjects trains
    rest = build_patch_data(dataset, validation_subjects=["subjB"], patches_per_subject=40, seed=3)
    assert rest.subjects == ["subjA"] and rest.train_dataset.data == data.train_dataset.data
    with pytest.raises(InputError, match="subject subjA is both a training and a validation"):
        build_patch_data(dataset, validation_subjects=["subjA"], subjects=["subjA", "subjB"])


def test_cached_patches_are_the_patches(dataset: Path) -> None:
    plain = build_patch_data(dataset, patches_per_subject=20, seed=3)
    cached = build_patch_data(dataset, patches_per_subject=20, seed=3, cache_patches=True)
    for a, b in (
        (plain.train_dataset, cached.train_dataset),
        (plain.val_dataset, cached.val_dataset),
    ):
        assert len(a) == len(b) and a.data == b.data
        for index in (0, len(a) - 1):
            for key in ("image", "label"):
                torch.testing.assert_close(a[index][key], b[index][key], equal_nan=True)


def test_shared_target_scale_weighs_every_element_in_mm2_per_s_alike(dataset: Path) -> None:
    per_channel = build_patch_data(dataset, patches_per_subject=40, seed=3, target_region="patch")
    shared = build_patch_data(
        dataset, patches_per_subject=40, seed=3, target_scale="shared", target_region="patch"
    )
    stds = np.asarray(per_channel.stats.target_std)
    assert np.ptp(stds) > 0  # the subjects' channels differ in spread, so the test can fail
    # Oracle: one scale, the root mean square of the per-channel stds; means and inputs kept.
    np.testing.assert_allclose(shared.stats.target_std, [np.sqrt(np.mean(stds**2))] * 6)
    assert shared.stats.target_mean == per_channel.stats.target_mean
    assert shared.stats.input_std == per_channel.stats.input_std
    label = shared.train_dataset[0]["label"].double()
    _, _, raw = raw_pairs(shared, "train")[0]
    restored = shared.stats.denormalise_output(label[None])[0]
    # float32 normalised labels: about 1e-7 of the scale per value, so atol is 1e-5 of the scale
    scale = shared.stats.target_std[0]
    np.testing.assert_allclose(restored, raw.double(), rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(InputError, match="target_scale must be one of channel, shared"):
        build_patch_data(dataset, patches_per_subject=40, target_scale="physical")


def test_brain_target_region_leaves_only_non_brain_voxels_without_target(dataset: Path) -> None:
    whole = build_patch_data(dataset, patches_per_subject=40, seed=3, target_region="patch")
    brain = build_patch_data(dataset, patches_per_subject=40, seed=3, target_region="brain")
    # the same patches and input statistics; the target's statistics are the brain's
    assert brain.train_dataset.data == whole.train_dataset.data
    assert (brain.stats.input_mean, brain.stats.input_std) == (
        whole.stats.input_mean,
        whole.stats.input_std,
    )
    import nibabel as nib

    masks = [
        np.asarray(nib.load(dataset / n / "mask_hr.nii.gz").dataobj) > 0 for n in whole.subjects
    ]
    partial = 0
    for index, loc in enumerate(brain.train_dataset.data):
        label = brain.train_dataset[index]["label"]
        # Oracle: mask_hr cropped at the target block's HR start 2 (s + 2), read from the file.
        hx, hy, hz = (2 * (s + 2) for s in loc.start)
        inside = masks[loc.subject][hx : hx + 14, hy : hy + 14, hz : hz + 14]
        assert torch.equal(
            torch.isnan(label), torch.from_numpy(~inside)[None].expand(6, -1, -1, -1)
        )
        in_mm2_s = brain.stats.denormalise_output(label[None])[0]
        expected = whole.stats.denormalise_output(whole.train_dataset[index]["label"][None])[0]
        torch.testing.assert_close(in_mm2_s[:, inside], expected[:, inside])
        partial += int(not inside.all())
    assert partial > 0, "no block crosses the brain's edge, so the test could not fail"
    with pytest.raises(InputError, match="target_region must be one of patch, brain"):
        build_patch_data(dataset, patches_per_subject=40, target_region="mask")


def test_normalisation_statistics_come_from_training_patches(dataset: Path) -> None:
    data = build_patch_data(dataset, patches_per_subject=40, seed=3, target_region="patch")
    pairs = raw_pairs(data, "train")
    # Oracle: numpy's mean and unbiased std of every training patch value, channel by channel.
    oracle = {}
    for key, index in (("input", 1), ("target", 2)):
        values = np.stack([p[index].numpy() for p in pairs]).astype(np.float64)
        by_channel = np.moveaxis(values, 1, 0).reshape(6, -1)
        oracle[f"{key}_mean"] = by_channel.mean(axis=1)
        oracle[f"{key}_std"] = by_channel.std(axis=1, ddof=1)
    for field, expected in oracle.items():
        np.testing.assert_allclose(getattr(data.stats, field), expected, rtol=1e-9)
    item = data.train_dataset[0]
    _, image, label = pairs[0]
    mean, std = (oracle[f"input_{m}"][:, None, None, None] for m in ("mean", "std"))
    np.testing.assert_allclose(
        item["image"].double(), (image.double().numpy() - mean) / std, atol=1e-5
    )
    t_mean, t_std = (oracle[f"target_{m}"][:, None, None, None] for m in ("mean", "std"))
    np.testing.assert_allclose(
        item["label"].double(), (label.double().numpy() - t_mean) / t_std, atol=1e-5
    )
    # The in-memory form gives the same statistics as the chunked one.
    in_memory = NormalisationStats.from_samples(
        torch.stack([p[1] for p in pairs]), torch.stack([p[2] for p in pairs])
    )
    np.testing.assert_allclose(in_memory.target_std, oracle["target_std"], rtol=1e-9)
    extra = data.model_extra()
    assert extra["tensor_elements"] == ["Dxx", "Dxy", "Dyy", "Dxz", "Dyz", "Dzz"]
    assert extra["upscale_factor"] == 2 and extra["lr_patch_size"] == 11


@pytest.mark.parametrize("target_scale", ["channel", "shared"])
def test_brain_target_region_takes_target_statistics_from_brain_voxels(
    dataset: Path, target_scale: str
) -> None:
    """Oracle from the NIfTI files: each training block of dt_hr.nii.gz, its mask_hr.nii.gz
    voxels only, numpy's mean and unbiased std; the input's statistics stay whole patches'."""
    import nibabel as nib

    data = build_patch_data(
        dataset, patches_per_subject=40, seed=3, target_region="brain", target_scale=target_scale
    )
    dt_hr, masks, dt_lr = (
        [np.asarray(nib.load(dataset / n / f"{name}.nii.gz").dataobj) for n in data.subjects]
        for name in ("dt_hr", "mask_hr", "dt_lr")
    )
    targets, inputs = [], []
    for loc in data.train_dataset.data:
        hr = tuple(slice(2 * (s + 2), 2 * (s + 2) + 14) for s in loc.start)
        targets.append(dt_hr[loc.subject][hr][masks[loc.subject][hr] > 0])
        inputs.append(dt_lr[loc.subject][tuple(slice(s, s + 11) for s in loc.start)].reshape(-1, 6))
    brain_values = np.concatenate(targets).astype(np.float64)
    patch_values = np.concatenate(inputs).astype(np.float64)
    assert len(brain_values) < 14**3 * len(targets), "every block all brain: could not fail"
    target_std = brain_values.std(axis=0, ddof=1)
    if target_scale == "shared":
        target_std = np.full(6, np.sqrt(np.mean(target_std**2)))
    np.testing.assert_allclose(data.stats.target_mean, brain_values.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(data.stats.target_std, target_std, rtol=1e-9)
    np.testing.assert_allclose(data.stats.input_mean, patch_values.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(data.stats.input_std, patch_values.std(axis=0, ddof=1), rtol=1e-9)
    # the scored (brain) labels, normalised with these statistics, have mean 0 and std 1
    labels = torch.stack([data.train_dataset[i]["label"] for i in range(len(targets))])
    scored = labels.transpose(0, 1).reshape(6, -1).double()
    scored = scored[:, ~torch.isnan(scored[0])]
    if target_scale == "channel":
        np.testing.assert_allclose(scored.mean(dim=1), 0, atol=1e-5)
        np.testing.assert_allclose(scored.std(dim=1), 1, atol=1e-5)


def test_valid_starts_match_a_brute_force_scan() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 26, 22)) > 0.7
    starts = {tuple(s) for s in valid_patch_starts(mask, (15, 13, 11), 7, 2)}
    brute = set()
    for x in range(15 - 7 + 1):
        for y in range(13 - 7 + 1):
            for z in range(11 - 7 + 1):
                if mask[2 * (x + 2) + 3, 2 * (y + 2) + 3, 2 * (z + 2) + 3]:
                    brute.add((x, y, z))
    assert starts == brute and starts


def test_preprocessed_fixture_subjects_give_patches(preprocessed_root: Path) -> None:
    data = build_patch_data(preprocessed_root, patches_per_subject=10, seed=0)
    assert data.subjects == ["synth000", "synth001", "synth002"]
    assert (len(data.train_dataset), len(data.val_dataset)) == (24, 6)
    item = data.val_dataset[0]
    assert torch.isfinite(item["image"]).all() and item["label"].shape == (6, 14, 14, 14)


# ---- bad input: one sentence naming the file and the problem --------------------------------


def test_missing_dataset_dir_says_which_command_makes_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"does not exist: run `python -m preprocessing hcp"):
        build_patch_data(tmp_path / "demo" / "preprocessed")


def test_dataset_dir_without_subjects(tmp_path: Path) -> None:
    (tmp_path / "empty" / "half_done").mkdir(parents=True)
    with pytest.raises(InputError, match=r"holds no preprocessed subject"):
        build_patch_data(tmp_path / "empty")


def test_unknown_subject(dataset: Path) -> None:
    with pytest.raises(InputError, match=r"subject nobody is not a complete preprocessed subject"):
        build_patch_data(dataset, subjects=["subjA", "nobody"])


def test_numeric_subject_ids_name_folders(tmp_path: Path) -> None:
    """``--subjects 100307`` reaches the config as an int: it names the folder ``100307``."""
    write_subject(tmp_path, "100307", 0)
    write_subject(tmp_path, "100408", 1)
    data = build_patch_data(tmp_path, subjects=[100408], patches_per_subject=5)
    assert data.subjects == ["100408"]
    assert build_patch_data(tmp_path, subjects=100307, patches_per_subject=5).subjects == ["100307"]


def test_a_subject_without_six_tensor_elements(tmp_path: Path) -> None:
    write_subject(tmp_path, "six", 0)
    write_subject(tmp_path, "four", 1, channels=4)
    with pytest.raises(
        InputError, match=r"four/dt_lr.nii.gz has shape .*expected .*\(X, Y, Z, 6\)"
    ):
        build_patch_data(tmp_path, patches_per_subject=5)


def test_subjects_with_different_factors(tmp_path: Path) -> None:
    write_subject(tmp_path, "r2", 0)
    write_subject(tmp_path, "r3", 1, factor=3, hr_shape=(33, 36, 33))
    with pytest.raises(InputError, match=r"subjects r2 and r3 have different upscale factors"):
        build_patch_data(tmp_path, patches_per_subject=5)


def test_too_few_valid_patches(dataset: Path) -> None:
    with pytest.raises(InputError, match=r"subject subjA .* has only \d+ 11\^3 patch positions"):
        build_patch_data(dataset, patches_per_subject=100000)


def test_nan_in_a_tensor_volume(tmp_path: Path, dataset: Path) -> None:
    shutil.copytree(dataset, tmp_path / "data")
    import nibabel as nib

    path = tmp_path / "data" / "subjB" / "dt_lr.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    data[3, 3, 3, 0] = np.nan
    save_nifti(path, data, image.affine)
    with pytest.raises(InputError, match=r"subjB/dt_lr.nii.gz contains 1 NaN"):
        build_patch_data(tmp_path / "data", patches_per_subject=5)


def test_hr_shape_not_factor_times_lr(tmp_path: Path, dataset: Path) -> None:
    shutil.copytree(dataset, tmp_path / "data")
    (tmp_path / "data" / "subjA" / "preprocessing.json").write_text(json.dumps({"factor": 3}))
    with pytest.raises(InputError, match=r"subjA/dt_hr.nii.gz has spatial shape .* not 3 x"):
        build_patch_data(tmp_path / "data", patches_per_subject=5)


def test_truncated_volume_is_one_sentence_naming_it(
    preprocessed_root: Path, tmp_path: Path
) -> None:
    """A cut-off dt_hr.nii.gz (e.g. a copy interrupted mid-way) is reported, not a traceback."""
    import shutil

    subject = sorted(p for p in preprocessed_root.iterdir() if p.is_dir())[0]
    copy = tmp_path / "dataset" / subject.name
    shutil.copytree(subject, copy)
    dt_hr = copy / "dt_hr.nii.gz"
    dt_hr.write_bytes(dt_hr.read_bytes()[: dt_hr.stat().st_size // 2])
    with pytest.raises(InputError) as raised:
        build_patch_data(tmp_path / "dataset", patches_per_subject=10, seed=0)
    message = str(raised.value)
    assert str(dt_hr) in message and "cannot be read" in message and "\n" not in message
