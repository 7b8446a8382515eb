"""The anatomy of the MNI152 phantom: templates, tissue fractions and white-matter fibres.

The ICBM152 2009 grey-matter and white-matter probability maps and the skull-stripped T1 outline
ship inside the ``nilearn`` package (nothing is downloaded). A subject is the template under a
smooth random :class:`Deformation` (subject world -> template world, mm), sampled on a
:class:`Grid`. White matter is a mixture of fibre populations, each a cylindrically symmetric
tensor with FA 0.6-0.8 along its fibre direction: the corpus callosum (left-right at the
midline, arching upwards laterally), the corticospinal tracts (fanning up from the brainstem
through the internal capsule), the superior longitudinal and inferior fronto-occipital fasciculi
and the cingulum (anterior-posterior), and, elsewhere, fibres along the gradient of the smoothed
white-matter map (into the gyri). Where two tract models overlap (the centrum semiovale, the
cingulum over the callosum) a voxel mixes two populations: crossing fibres. Tract models are
analytic, in MNI millimetres; their directions are carried into the subject by the affine part
of the deformation, then into the image's voxel axes (LAS), the frame tensors are stored in.
:mod:`preprocessing.mni152` assembles these into a subject and writes it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from preprocessing.errors import InputError
from preprocessing.synthetic import cylinder_tensors

NILEARN_HINT = "install the demo extra: pip install -e .[demo]"

#: Fibre populations: (axial, radial) diffusivity in mm^2/s; FA 0.78, 0.73, 0.68, 0.71, 0.61.
FIBRES: dict[str, tuple[float, float]] = {
    "callosal": (1.75e-3, 0.33e-3),
    "corticospinal": (1.65e-3, 0.38e-3),
    "association": (1.55e-3, 0.42e-3),
    "cingulum": (1.60e-3, 0.40e-3),
    "gyral": (1.45e-3, 0.48e-3),
}
#: Membership of the gyral (fallback) population: tract models outweigh it where present.
GYRAL_MEMBERSHIP = 0.25

# Mid-sagittal corpus callosum of the ICBM152 2009 WM map: height (z, mm) of its centre at y.
_CALLOSUM_Y = np.array([-46.0, -40, -35, -30, -25, -15, 0, 10, 15, 20, 25, 30, 36])
_CALLOSUM_Z = np.array([10.0, 14, 17, 21, 23, 24, 22.5, 22, 18.5, 12, 7.5, 5, 4])


@dataclass(frozen=True)
class Grid:
    """An HR voxel grid: its shape, LAS affine and isotropic voxel size (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    voxel_size: float


@dataclass(frozen=True)
class Deformation:
    """Subject world -> template world (mm): ``c + A (p - c) + shift + sum of sine modes``."""

    centre: np.ndarray  # (3,)
    linear: np.ndarray  # (3, 3) A
    shift: np.ndarray  # (3,)
    wavevectors: np.ndarray  # (3, K, 3) rad/mm, per displacement component
    phases: np.ndarray  # (3, K)
    amplitudes: np.ndarray  # (3, K) mm

    @classmethod
    def random(cls, rng: np.random.Generator, modes: int = 4) -> Deformation:
        """A subject's deformation drawn from ``rng`` (the draws' order is the phantom's stream)."""
        scale = rng.uniform(1.0, 1.15, 3)  # subject brains 0.87-1.0 x the MNI152 one
        angles = np.deg2rad(rng.uniform(-5, 5, 3))
        shift = rng.uniform(-4, 4, 3)
        directions = rng.standard_normal((3, modes, 3))
        directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
        wavelengths = rng.uniform(80, 160, (3, modes, 1))
        phases = rng.uniform(0, 2 * np.pi, (3, modes))
        amplitudes = rng.uniform(-2, 2, (3, modes))
        linear = np.diag(scale) @ _rotation(angles)
        centre = np.array([0.0, -18.0, 15.0])  # near the middle of the MNI brain
        return cls(centre, linear, shift, 2 * np.pi * directions / wavelengths, phases, amplitudes)

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Template (MNI) coordinates (n, 3) of subject world points (n, 3), in mm."""
        points = np.asarray(points, dtype=np.float64)
        mapped = (points - self.centre) @ self.linear.T + self.centre + self.shift
        for axis in range(3):
            for wave, phase, amplitude in zip(
                self.wavevectors[axis], self.phases[axis], self.amplitudes[axis], strict=True
            ):
                mapped[:, axis] += amplitude * np.sin(points @ wave + phase)
        return mapped


def subject_to_voxel_directions(grid: Grid, deformation: Deformation) -> np.ndarray:
    """3x3 matrix taking template-space fibre directions to the subject's voxel axes.

    A direction t in the template is J^-1 t in the subject (J the deformation's affine part),
    then M^-1 of that in voxel axes (M the grid affine's linear part); normalise afterwards.
    """
    return np.linalg.inv(grid.affine[:3, :3]) @ np.linalg.inv(deformation.linear)


# --- tissue ----------------------------------------------------------------------------------


def check_nilearn() -> None:
    """One sentence (InputError) when nilearn, which ships the templates, is not installed."""
    try:
        import nilearn.datasets  # noqa: F401
    except ImportError as error:
        raise InputError(
            f"the mni152 anatomy needs nilearn, which is not installed: {NILEARN_HINT}."
        ) from error


def load_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's packaged ICBM152 2009 maps (GM, WM, T1 brain; 1 mm, scaled to [0, 1]), affine."""
    check_nilearn()
    from nilearn.datasets import (
        load_mni152_gm_template,
        load_mni152_template,
        load_mni152_wm_template,
    )

    images = [load_mni152_gm_template(), load_mni152_wm_template(), load_mni152_template()]
    gm, wm, t1 = (image.get_fdata(dtype=np.float32) for image in images)
    return gm, wm, t1, np.asarray(images[0].affine, dtype=np.float64)


@functools.lru_cache(maxsize=2)
def template_maps(smoothing_mm: float) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(GM, WM, brain outline) float32 maps, smoothed for the target voxel size, and affine."""
    gm, wm, t1, affine = load_templates()
    outline = ndimage.binary_fill_holes(t1 > 0.05).astype(np.float32)
    maps = (gm, wm, np.maximum(outline, np.minimum(gm + wm, 1.0)))
    if smoothing_mm > 0:
        maps = tuple(ndimage.gaussian_filter(m, smoothing_mm) for m in maps)
    return maps, affine


def template_smoothing_mm(voxel_size: float) -> float:
    """Gaussian sigma that averages the 1 mm template over a voxel (box-equivalent variance)."""
    sigma = math.sqrt(max(voxel_size**2 - 1.0, 0.0) / 12.0)
    return round(sigma, 3) if sigma >= 0.25 else 0.0


def tissue_fractions(
    gm: np.ndarray, wm: np.ndarray, outline: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """GM, WM, CSF fractions (summing to 1 where there is tissue) and the occupancy."""
    gm, wm = np.clip(gm, 0, 1), np.clip(wm, 0, 1)
    occupancy = np.clip(np.maximum(outline, gm + wm), 0, 1)
    csf = np.clip(occupancy - gm - wm, 0, None)
    total = gm + wm + csf
    safe = np.where(total > 1e-6, total, 1.0)
    fractions = np.stack([gm, wm, csf], axis=-1) / safe[..., None]
    fractions[total <= 1e-6] = 0
    occupancy = np.where(total > 1e-6, occupancy, 0.0)
    return fractions.astype(np.float32), occupancy.astype(np.float32)


# --- white matter ----------------------------------------------------------------------------


def white_matter_tensors(
    grid: Grid,
    deformation: Deformation,
    template_points: np.ndarray,
    wm: np.ndarray,
    fibre_scale: np.ndarray,
) -> np.ndarray:
    """(n, 6) tensors of the voxels where ``wm > 0``: a mixture of fibre populations."""
    memberships, directions = _tract_models(template_points)
    to_voxel = subject_to_voxel_directions(grid, deformation)
    directions = directions @ to_voxel.T
    gyral = _gyral_directions(grid, wm)
    memberships = np.concatenate([memberships, np.full((len(gyral), 1), GYRAL_MEMBERSHIP)], 1)
    directions = np.concatenate([directions, gyral[:, None, :]], axis=1)
    directions /= np.maximum(np.linalg.norm(directions, axis=-1, keepdims=True), 1e-12)
    weights = memberships**2
    weights /= weights.sum(axis=1, keepdims=True)
    tensors = np.zeros((len(gyral), 6))
    for k, (axial, radial) in enumerate(FIBRES.values()):
        axial, radial = axial * fibre_scale[0], radial * fibre_scale[1]
        tensors += weights[:, k : k + 1] * cylinder_tensors(directions[:, k], axial, radial)
    return tensors


def _tract_models(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Memberships (n, 4) and template-space directions (n, 4, 3) of the analytic tracts.

    Order: callosal, corticospinal, association (SLF or IFOF, the nearer), cingulum; the
    coordinates are MNI mm (x right, y anterior, z superior).
    """
    x, y, z = points.T
    side = np.where(x >= 0, 1.0, -1.0)
    ones, zeros = np.ones_like(x), np.zeros_like(x)

    # Corpus callosum: left-right sheets z = z_mid(y) + x^2 / 80 (arching up laterally).
    z_mid = np.interp(y, _CALLOSUM_Y, _CALLOSUM_Z)
    width = 3.0 + 0.1 * np.abs(x)
    callosal = (
        np.exp(-0.5 * ((z - z_mid - x**2 / 80) / width) ** 2)
        * _step(42 - np.abs(x), 4)
        * _step(y + 46, 3)
        * _step(36 - y, 3)
    )
    callosal_dir = np.stack([ones, zeros, x / 40], axis=1)

    # Corticospinal: a fan from a focus in the lower brainstem, one per hemisphere.
    v = points - np.stack([side * 10, -28 * ones, -55 * ones], axis=1)
    up = np.maximum(v[:, 2], 1e-3)
    corticospinal = (
        np.exp(-0.5 * ((side * v[:, 0] / up - 0.2) / 0.15) ** 2)
        * np.exp(-0.5 * ((v[:, 1] / up - 0.12) / 0.2) ** 2)
        * _step(v[:, 2] - 10, 4)
        * _step(side * x - 8, 2)
    )

    # Association: SLF (x = +-38, z = 30) and IFOF (a segment through the temporal stem).
    slf = (
        np.exp(-0.5 * ((x - side * 38) ** 2 + (z - 30) ** 2) / 7.0**2)
        * _step(y + 60, 5)
        * _step(30 - y, 5)
    )
    start = np.stack([side * 34, -90 * ones, 0 * ones], axis=1)
    axis = np.array([-4.0, 120.0, -10.0])
    length = np.linalg.norm(axis)
    axis_unit = axis / length
    mirrored = np.stack([side * axis_unit[0], axis_unit[1] * ones, axis_unit[2] * ones], 1)
    along = np.sum((points - start) * mirrored, axis=1)
    nearest = start + np.clip(along, 0, length)[:, None] * mirrored
    ifof = (
        np.exp(-0.5 * np.sum((points - nearest) ** 2, axis=1) / 6.0**2)
        * _step(along + 5, 4)
        * _step(length + 5 - along, 4)
    )
    association = np.maximum(slf, ifof)
    association_dir = np.where((slf >= ifof)[:, None], [[0.0, 1.0, 0.0]], mirrored)

    # Cingulum: anterior-posterior over the callosum, following its arch.
    slope = np.interp(y + 1, _CALLOSUM_Y, _CALLOSUM_Z) - np.interp(y - 1, _CALLOSUM_Y, _CALLOSUM_Z)
    cingulum = (
        np.exp(-0.5 * ((x - side * 8) ** 2 + (z - z_mid - 9) ** 2) / 3.0**2)
        * _step(y + 45, 3)
        * _step(32 - y, 3)
    )
    cingulum_dir = np.stack([zeros, ones, slope / 2], axis=1)

    memberships = np.stack([callosal, corticospinal, association, cingulum], axis=1)
    directions = np.stack([callosal_dir, v, association_dir, cingulum_dir], axis=1)
    return memberships, directions


def _gyral_directions(grid: Grid, wm: np.ndarray) -> np.ndarray:
    """Voxel-axis unit directions (n, 3) along the smoothed WM map's gradient where wm > 0."""
    smooth = ndimage.gaussian_filter(wm.astype(np.float32), 2.0 / grid.voxel_size)
    inside = wm > 0
    gradient = np.stack([g[inside] for g in np.gradient(smooth)], axis=1)
    norm = np.linalg.norm(gradient, axis=1, keepdims=True)
    fallback = np.array([[0.0, 0.0, 1.0]])
    return np.where(norm > 1e-6, gradient / np.maximum(norm, 1e-12), fallback)


# --- geometry helpers ------------------------------------------------------------------------


def grid_world_coordinates(grid: Grid) -> np.ndarray:
    """World coordinates (X, Y, Z, 3) in mm of every voxel centre of ``grid``."""
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    return apply_affine(grid.affine, indices.reshape(-1, 3).astype(np.float64)).reshape(
        grid.shape + (3,)
    )


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World points (n, 3) of voxel points (n, 3) under a 4x4 ``affine`` (or its inverse)."""
    return points @ affine[:3, :3].T + affine[:3, 3]


def translation(x: float, y: float, z: float) -> np.ndarray:
    """4x4 affine translating by (x, y, z)."""
    matrix = np.eye(4)
    matrix[:3, 3] = [x, y, z]
    return matrix


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z by ``angles`` (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _step(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Logistic 0 -> 1 across a boundary (positive = inside)."""
    return 0.5 * (1 + np.tanh(signed_distance / (2 * width)))
