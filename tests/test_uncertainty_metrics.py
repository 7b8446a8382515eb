"""Uncertainty metrics against synthetic oracles: errors drawn from N(0, sigma^2), sigma known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from monai_iqt.metrics import (
    calibration_curve,
    coverage,
    spearman_sigma_error,
    uncertainty_metrics,
    voxel_rms,
)

SHAPE = (24, 20, 16)


def brain_mask() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    return (grid**2).sum(axis=0) < 0.8


def heteroscedastic_sigma(rng: np.random.Generator) -> np.ndarray:
    """Sigma varying over voxels by a factor of about 20 (and a little between elements)."""
    per_voxel = np.exp(rng.uniform(np.log(1e-5), np.log(2e-4), SHAPE))
    return per_voxel[..., None] * rng.uniform(0.8, 1.2, SHAPE + (6,))


def test_calibrated_gaussian_errors_cover_68_and_95_percent():
    rng = np.random.default_rng(0)
    mask = brain_mask()
    sigma = heteroscedastic_sigma(rng)
    error = rng.normal(0.0, sigma)
    error[~mask] = 1.0  # outside the brain: must not count
    n = 6 * mask.sum()
    # binomial standard error of a coverage fraction is below 0.003 here; allow 4 of them
    tolerance = 4 * np.sqrt(0.25 / n)
    assert coverage(error, sigma, 1.0, mask) == pytest.approx(0.6827, abs=tolerance)
    assert coverage(error, sigma, 2.0, mask) == pytest.approx(0.9545, abs=tolerance)
    assert (
        coverage(error, sigma, 1.0) < 0.6827 - tolerance
    )  # the background does count without mask
    expected, observed = calibration_curve(error, sigma, mask)
    np.testing.assert_allclose(observed, expected, atol=tolerance)
    # over-confident sigma (half the true one) covers what k = 0.5 covers: 0.383
    assert coverage(error, sigma / 2, 1.0, mask) == pytest.approx(0.3829, abs=tolerance)


def test_coverage_counts_elements_by_hand():
    error = np.zeros((2, 1, 1, 6))
    sigma = np.ones((2, 1, 1, 6))
    error[0, 0, 0] = [0.5, 1.0, 1.5, -0.9, -1.1, 3.0]  # |e| <= 1: 3 of 6; <= 2: 5 of 6
    mask = np.array([True, False]).reshape(2, 1, 1)
    assert coverage(error, sigma, 1.0, mask) == pytest.approx(3 / 6)
    assert coverage(error, sigma, 2.0, mask) == pytest.approx(5 / 6)
    assert coverage(error, sigma, 1.0) == pytest.approx((3 + 6) / 12)


def test_sigma_that_tracks_the_error_ranks_it():
    rng = np.random.default_rng(1)
    mask = brain_mask()
    sigma = heteroscedastic_sigma(rng)
    error = rng.normal(0.0, sigma)
    rho = spearman_sigma_error(sigma, error, mask)
    # Oracle: scipy's Spearman of the per-voxel RMS values, computed here independently
    predicted = np.sqrt((sigma**2).mean(axis=-1))[mask]
    actual = np.sqrt((error**2).mean(axis=-1))[mask]
    assert rho == pytest.approx(stats.spearmanr(predicted, actual).statistic, abs=1e-12)
    assert rho > 0.4
    metrics = uncertainty_metrics(error, sigma, mask)
    assert set(metrics) == {"coverage_1sigma", "coverage_2sigma", "spearman_sigma_error"}
    assert metrics["spearman_sigma_error"] == rho


def test_sigma_unrelated_to_the_error_ranks_nothing():
    rng = np.random.default_rng(2)
    mask = brain_mask()
    error = rng.normal(0.0, 5e-5, SHAPE + (6,))  # homoscedastic errors
    unrelated = heteroscedastic_sigma(rng)  # varies, but not with the error
    assert abs(spearman_sigma_error(unrelated, error, mask)) < 0.05
    constant = np.full(SHAPE + (6,), 5e-5)  # a constant sigma ranks nothing: undefined
    assert np.isnan(spearman_sigma_error(constant, error, mask))
    assert coverage(error, constant, 1.0, mask) == pytest.approx(0.6827, abs=0.02)


def test_voxel_rms_by_hand():
    volume = np.array([3.0, 4.0, 0.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 6)
    assert voxel_rms(volume)[0, 0, 0] == pytest.approx(np.sqrt(25 / 6))
