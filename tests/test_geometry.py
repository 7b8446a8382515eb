"""The grid functions of ``preprocessing.geometry``, each tested directly on RAS, LAS and oblique
affines against an oracle that does not use them: world positions of voxel centres from
nibabel's ``apply_affine``, and blocks cut out by plain slicing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel.affines import apply_affine, from_matvec

from preprocessing.geometry import (
    block_any,
    block_mean,
    crop_to_multiple,
    crop_volume,
    downsample_mask,
    hr_affine_from_lr,
    hr_block,
    hr_blocks,
    hr_to_lr_coordinates,
    lr_affine_from_hr,
    lr_to_hr_index_matrix,
    repeat_blocks,
    voxel_sizes,
)


def _rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


#: HR voxel-to-world affines: RAS (positive diagonal), LAS (HCP's, x flipped) and an oblique,
#: anisotropic one; each with its HR voxel sizes.
HR_AFFINES = {
    "RAS": (from_matvec(np.diag([1.25, 1.25, 1.25]), [-90.0, -126.0, -72.0]), [1.25] * 3),
    "LAS": (from_matvec(np.diag([-1.25, 1.25, 1.25]), [90.0, -126.0, -72.0]), [1.25] * 3),
    "oblique": (
        from_matvec(_rotation((0.3, -0.2, 0.5)) @ np.diag([1.0, 1.5, 2.0]), [10.0, -4.0, 7.5]),
        [1.0, 1.5, 2.0],
    ),
}
FACTORS = (2, 3)


def _centres(affine: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """World position of every voxel centre, shape (X, Y, Z, 3)."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return apply_affine(affine, grid)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", sorted(HR_AFFINES))
def test_lr_voxel_centre_is_the_centre_of_its_hr_block(name, factor):
    hr_affine, sizes = HR_AFFINES[name]
    lr_shape = (3, 4, 2)
    hr_world = _centres(hr_affine, tuple(factor * n for n in lr_shape))
    lr_world = _centres(lr_affine_from_hr(hr_affine, factor), lr_shape)
    for i, j, k in itertools.product(*map(range, lr_shape)):
        block = hr_world[factor * i : factor * (i + 1), factor * j : factor * (j + 1)]
        block = block[:, :, factor * k : factor * (k + 1)]
        np.testing.assert_allclose(lr_world[i, j, k], block.mean(axis=(0, 1, 2)), atol=1e-9)
    np.testing.assert_allclose(voxel_sizes(hr_affine), sizes, atol=1e-12)
    np.testing.assert_allclose(
        voxel_sizes(lr_affine_from_hr(hr_affine, factor)), np.multiply(sizes, factor), atol=1e-12
    )


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", sorted(HR_AFFINES))
def test_hr_affine_from_lr_inverts_lr_affine_from_hr(name, factor):
    hr_affine, _ = HR_AFFINES[name]
    np.testing.assert_allclose(
        hr_affine_from_lr(lr_affine_from_hr(hr_affine, factor), factor), hr_affine, atol=1e-12
    )
    # The index map is the affine's voxel part: LR index j lands on HR index r j + (r - 1) / 2.
    lr_index = np.array([2.0, 0.0, 5.0])
    hr_index = apply_affine(lr_to_hr_index_matrix(factor), lr_index)
    np.testing.assert_allclose(hr_index, factor * lr_index + (factor - 1) / 2)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", sorted(HR_AFFINES))
def test_hr_to_lr_coordinates_is_the_lr_index_of_the_same_world_point(name, factor):
    hr_affine, _ = HR_AFFINES[name]
    hr_indices = np.array([[0, 0, 0], [1, 4, 2], [5, 3, 7]], dtype=float)
    world = apply_affine(hr_affine, hr_indices)
    expected = apply_affine(np.linalg.inv(lr_affine_from_hr(hr_affine, factor)), world)
    np.testing.assert_allclose(hr_to_lr_coordinates(hr_indices, factor), expected, atol=1e-9)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("name", sorted(HR_AFFINES))
def test_hr_block_of_an_lr_cube_covers_the_same_world_region(name, factor):
    """The HR block's voxel centres average to the LR cube's: the same region on both grids."""
    hr_affine, _ = HR_AFFINES[name]
    start, size = (1, 2, 0), 3
    hr_world = _centres(hr_affine, (factor * 6, factor * 7, factor * 5))
    lr_world = _centres(lr_affine_from_hr(hr_affine, factor), (6, 7, 5))
    block = hr_block(start, size, factor)
    assert all(s.stop - s.start == factor * size for s in block)
    cube = tuple(slice(s, s + size) for s in start)
    np.testing.assert_allclose(
        hr_world[block].mean(axis=(0, 1, 2)), lr_world[cube].mean(axis=(0, 1, 2)), atol=1e-9
    )


def test_crop_drops_trailing_voxels_only():
    volume = np.arange(5 * 7 * 3 * 2).reshape(5, 7, 3, 2)
    assert crop_to_multiple(volume.shape, 2) == (4, 6, 2)
    np.testing.assert_array_equal(crop_volume(volume, 2), volume[:4, :6, :2])
    assert crop_to_multiple((9, 8, 7), 3) == (9, 6, 6)
    with pytest.raises(ValueError, match="whole number"):
        crop_to_multiple((4, 4, 4), 0)


@pytest.mark.parametrize("factor", FACTORS)
def test_hr_blocks_places_each_hr_voxel_in_its_lr_voxel(factor):
    rng = np.random.default_rng(1)
    volume = rng.random((3 * factor + 1, 2 * factor, 2 * factor + 1, 2))
    blocks = hr_blocks(volume, factor)
    assert blocks.shape == (3, factor, 2, factor, 2, factor, 2)
    for i, a, j, b, k, c in itertools.product(
        range(3), range(factor), range(2), range(factor), range(2), range(factor)
    ):
        np.testing.assert_array_equal(
            blocks[i, a, j, b, k, c], volume[factor * i + a, factor * j + b, factor * k + c]
        )


def test_block_any_is_any_voxel_of_the_block():
    rng = np.random.default_rng(2)
    mask = rng.random((7, 6, 4)) > 0.9
    expected = np.zeros((3, 3, 2), dtype=bool)
    for i, j, k in itertools.product(range(3), range(3), range(2)):
        expected[i, j, k] = mask[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2].any()
    np.testing.assert_array_equal(block_any(mask, 2), expected)


@pytest.mark.parametrize("factor", FACTORS)
def test_repeat_blocks_is_the_inverse_of_block_mean_on_block_constant_volumes(factor):
    rng = np.random.default_rng(3)
    lr = rng.random((3, 2, 4, 6)).astype(np.float32)
    hr = repeat_blocks(lr, factor)
    assert hr.shape == (3 * factor, 2 * factor, 4 * factor, 6)
    np.testing.assert_array_equal(hr[factor * 2 + factor - 1, factor, 0], lr[2, 1, 0])
    np.testing.assert_allclose(block_mean(hr, factor), lr, rtol=1e-6)
    inside = lr[..., 0] > 0.5
    np.testing.assert_array_equal(block_any(repeat_blocks(inside, factor), factor), inside)


def test_block_mean_matches_hand_computed_array():
    volume = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
    # Block (0,0,0) holds x in {0,1}, y in {0,1}, z in {0,1}: values 8x + 2y + z.
    expected = np.array(
        [
            [[np.mean([0, 1, 2, 3, 8, 9, 10, 11])], [np.mean([4, 5, 6, 7, 12, 13, 14, 15])]],
            [
                [np.mean([16, 17, 18, 19, 24, 25, 26, 27])],
                [np.mean([20, 21, 22, 23, 28, 29, 30, 31])],
            ],
        ]
    )
    np.testing.assert_array_equal(block_mean(volume, 2), expected)


def test_block_mean_of_odd_volume_drops_trailing_voxels():
    rng = np.random.default_rng(0)
    volume = rng.random((5, 7, 3, 2)).astype(np.float32)
    result = block_mean(volume, 2)
    assert result.shape == (2, 3, 1, 2)
    for i, j, k in itertools.product(range(2), range(3), range(1)):
        block = volume[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, 2 * k : 2 * k + 2]
        np.testing.assert_allclose(result[i, j, k], block.mean(axis=(0, 1, 2)), rtol=1e-6)


def test_block_mean_factor_three():
    volume = np.zeros((6, 3, 3), dtype=np.float32)
    volume[3:] = 27.0
    np.testing.assert_array_equal(block_mean(volume, 3)[:, 0, 0], [0.0, 27.0])


def test_lr_mask_is_at_least_half_of_the_block():
    mask = np.zeros((4, 2, 2), dtype=np.uint8)
    mask[0:2].reshape(-1)[:4] = 1  # block 0: exactly 4 of 8 voxels
    mask[2:4].reshape(-1)[:3] = 1  # block 1: 3 of 8 voxels
    assert mask[0:2].sum() == 4 and mask[2:4].sum() == 3
    lr = downsample_mask(mask, 2)
    assert lr.dtype == np.uint8
    np.testing.assert_array_equal(lr[:, 0, 0], [1, 0])
