"""Metrics and baselines against hand computations on small hand-made volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from monai_iqt.maps import tensor_maps
from monai_iqt.metrics import interior_mask, interpolate_lr, region_rmse


def hand_lr_volume(shape=(5, 4, 6), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1e-3, 2e-3, size=shape + (6,))


def lr_coordinate(i: int, r: int) -> float:
    """HR index i -> LR coordinate: the LR voxel centre is the centre of its HR block."""
    return (i - (r - 1) / 2) / r


def trilinear_by_hand(dt_lr: np.ndarray, hr_shape, r: int) -> np.ndarray:
    out = np.zeros(tuple(hr_shape) + (6,))
    for index in itertools.product(*[range(n) for n in hr_shape]):
        value = np.zeros(6)
        corners = []
        for axis, i in enumerate(index):
            x = min(max(lr_coordinate(i, r), 0.0), dt_lr.shape[axis] - 1)  # edge value beyond
            low = min(int(np.floor(x)), dt_lr.shape[axis] - 2)
            corners.append(((low, 1 - (x - low)), (low + 1, x - low)))
        for (a, wa), (b, wb), (c, wc) in itertools.product(*corners):
            value += wa * wb * wc * dt_lr[a, b, c]
        out[index] = value
    return out


def cubic_bspline_by_hand(dt_lr: np.ndarray, hr_shape, r: int, extension: int = 24) -> np.ndarray:
    """Cubic B-spline interpolation written from its definition, separably.

    The signal is extended by its edge values (``extension`` voxels each side), the spline
    coefficients c solve sum_k c_k beta3(j - k) = f_j, and values are sum_k c_k beta3(x - k).
    """

    def beta3(t):
        t = np.abs(t)
        return np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))

    signal = np.pad(dt_lr, [(extension, extension)] * 3 + [(0, 0)], mode="edge")
    for axis in range(3):
        n = signal.shape[axis]
        grid = np.arange(n)
        system = beta3(grid[:, None] - grid[None, :])
        signal = np.moveaxis(np.tensordot(np.linalg.inv(system), signal, axes=(1, axis)), 0, axis)
    coefficients = signal
    for axis in range(3):
        n = coefficients.shape[axis]
        x = np.array([lr_coordinate(i, r) for i in range(hr_shape[axis])]) + extension
        weights = beta3(x[:, None] - np.arange(n)[None, :])
        coefficients = np.moveaxis(np.tensordot(weights, coefficients, axes=(1, axis)), 0, axis)
    return coefficients


@pytest.mark.parametrize("r", [2, 3])
def test_nearest_baseline_repeats_each_lr_voxel_over_its_block(r):
    dt_lr = hand_lr_volume()
    hr_shape = tuple(r * s for s in dt_lr.shape[:3])
    result = interpolate_lr(dt_lr, r, "nearest")
    for index in itertools.product(*[range(n) for n in hr_shape]):
        lr_index = tuple(i // r for i in index)
        np.testing.assert_allclose(result[index], dt_lr[lr_index], rtol=1e-6)


def test_trilinear_baseline_matches_hand_computation():
    dt_lr = hand_lr_volume()
    hr_shape = tuple(2 * s for s in dt_lr.shape[:3])
    np.testing.assert_allclose(
        interpolate_lr(dt_lr, 2, "trilinear"),
        trilinear_by_hand(dt_lr, hr_shape, 2),
        rtol=1e-5,
        atol=1e-10,
    )


@pytest.mark.parametrize("r", [2, 3])
def test_cubic_baseline_matches_bspline_from_its_definition(r):
    dt_lr = hand_lr_volume(shape=(6, 5, 7), seed=1)
    hr_shape = tuple(r * s for s in dt_lr.shape[:3])
    expected = cubic_bspline_by_hand(dt_lr, hr_shape, r)
    result = interpolate_lr(dt_lr, r, "cubic")
    assert result.shape == hr_shape + (6,)
    # float32 output of a float64 computation that agrees with the oracle to 1e-14 relative
    assert np.abs(result - expected).max() < 1e-6 * np.abs(expected).max()
    if r == 3:  # it interpolates: an HR voxel centred on an LR centre (offset 1) holds the data
        np.testing.assert_allclose(result[1::3, 1::3, 1::3], dt_lr, rtol=1e-5)


def test_interior_is_the_radius_neighbourhood_inside_the_lr_mask():
    rng = np.random.default_rng(2)
    mask_lr = np.zeros((9, 8, 10), bool)
    mask_lr[1:8, 1:8, 1:9] = rng.uniform(size=(7, 7, 8)) > 0.1
    mask_hr = np.repeat(np.repeat(np.repeat(mask_lr, 2, 0), 2, 1), 2, 2)
    mask_hr[0::3] = False  # HR brain need not follow LR blocks
    for radius in (1, 2):
        interior = interior_mask(mask_lr, mask_hr, 2, radius)
        for index in itertools.product(*[range(n) for n in mask_hr.shape]):
            j = [i // 2 for i in index]
            window = mask_lr[
                max(j[0] - radius, 0) : j[0] + radius + 1,
                max(j[1] - radius, 0) : j[1] + radius + 1,
                max(j[2] - radius, 0) : j[2] + radius + 1,
            ]
            fits = all(j[a] - radius >= 0 and j[a] + radius < mask_lr.shape[a] for a in range(3))
            expected = mask_hr[index] and fits and window.all()
            assert interior[index] == expected, (radius, index)


def test_region_rmse_by_hand():
    truth = np.zeros((2, 2, 1, 6))
    prediction = truth.copy()
    prediction[0, 0, 0] = 3e-5  # interior voxel: error 3e-5 on each of 6 elements
    prediction[1, 0, 0, 0] = 6e-5  # exterior voxel: one element off by 6e-5
    prediction[1, 1, 0] = 1.0  # outside the brain: ignored
    brain = np.array([[[True], [False]], [[True], [False]]])
    interior = np.array([[[True], [False]], [[False], [False]]])
    result = region_rmse(prediction, truth, brain, interior)
    assert result["interior"] == pytest.approx(3.0)
    assert result["exterior"] == pytest.approx(np.sqrt(36 / 6))
    assert result["total"] == pytest.approx(np.sqrt((6 * 9 + 36) / 12))


def test_maps_against_eigenvalues_by_hand():
    # tensor with eigenvalues (1.7, 0.3, 0.2) e-3 along a rotated frame
    angle = 0.4
    frame = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    tensor = frame @ np.diag([1.7e-3, 0.3e-3, 0.2e-3]) @ frame.T
    dt = np.zeros((2, 1, 1, 6))
    dt[0, 0, 0] = [
        tensor[0, 0],
        tensor[0, 1],
        tensor[1, 1],
        tensor[0, 2],
        tensor[1, 2],
        tensor[2, 2],
    ]
    maps = tensor_maps(dt)
    evals = np.array([1.7, 0.3, 0.2])
    fa = np.sqrt(0.5 * ((1.7 - 0.3) ** 2 + (0.3 - 0.2) ** 2 + (0.2 - 1.7) ** 2) / (evals**2).sum())
    assert maps["md"][0, 0, 0] == pytest.approx((1.7e-3 + 0.3e-3 + 0.2e-3) / 3, rel=1e-5)
    assert maps["fa"][0, 0, 0] == pytest.approx(fa, rel=1e-5)
    np.testing.assert_allclose(maps["colour_fa"][0, 0, 0], fa * np.abs(frame[:, 0]), rtol=1e-5)
    assert maps["md"][1, 0, 0] == 0 and maps["fa"][1, 0, 0] == 0  # background stays zero
