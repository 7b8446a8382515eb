"""Brain-realistic synthetic subjects built from the MNI152 tissue templates shipped in nilearn.

Each subject is the ICBM152 2009 template brain (grey-matter and white-matter probability maps
and the skull-stripped T1 outline, all inside the ``nilearn`` package: nothing is downloaded)
under a per-subject smooth random deformation: an affine part (each axis 0.87-1.0 times the
template's, which is larger than most brains; rotation up to 5 degrees; shift up to 4 mm) and a
displacement of a few low-frequency sine modes (wavelengths 80-160 mm, up to 2 mm each). Every
HR voxel holds a partial-volume mixture:

* grey matter, isotropic 0.8e-3 mm^2/s; CSF (the brain outline minus GM and WM: ventricles,
  sulci), isotropic 3.0e-3 mm^2/s;
* white matter, a mixture of fibre populations, each a cylindrically symmetric tensor with FA
  0.6-0.8 along its fibre direction: the corpus callosum (left-right at the midline, arching
  upwards laterally), the corticospinal tracts (fanning up from the brainstem through the
  internal capsule), the superior longitudinal and inferior fronto-occipital fasciculi and the
  cingulum (anterior-posterior), and, elsewhere, fibres along the gradient of the smoothed
  white-matter map (into the gyri). Where two tract models overlap (the centrum semiovale, the
  cingulum over the callosum) a voxel mixes two populations: crossing fibres.

Tract models are analytic, in MNI millimetres; their directions are carried into the subject by
the affine part of the deformation, then into the image's voxel axes (LAS), the frame tensors
are stored in. Mixed voxels hold the volume-weighted mean tensor, as in the geometric phantom.

The grid is HCP's (145 x 174 x 145 at 1.25 mm, LAS, ``synthetic.hcp_like_affine``); a coarser
``voxel_size`` keeps the field of view, and ``slab`` keeps axial slices ``[z0, z1)`` only.
Signal, acquisition and Rician noise are the geometric generator's (``synthetic.write_phantom``).
As in HCP's ``T1w/Diffusion/data.nii.gz``, the DWI is zero outside the brain mask dilated by
two voxels; noisy data are stored to 1/16 of a signal unit (the noise sigma is 33 units at
SNR 30). An optional lesion (``lesion=Lesion()``) is vasogenic-oedema-like white matter in a
ball of 5-8 mm radius centred in deep white matter: by default MD x 1.8, the anisotropic part
halved, S0 x 1.25 (``Lesion``'s factors set how far it departs from healthy tissue).
It is drawn from its own random stream, so a subject with and without the lesion is the same
subject (same deformation, same noise) everywhere outside ``ground_truth/lesion_mask.nii.gz``.

Files per subject: the HCP layout of the geometric generator plus ``ground_truth/phantom.json``
(the settings and the lesion's centre and radius) and, with a lesion, ``lesion_mask.nii.gz``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from preprocessing.io import InputError, save_nifti, write_json
from preprocessing.synthetic import (
    CSF_DIFFUSIVITY,
    GM_DIFFUSIVITY,
    HCP_SHAPE,
    KURTOSIS,
    S0,
    VOXEL_SIZE_MM,
    Phantom,
    cylinder_tensors,
    hcp_like_affine,
    isotropic_tensors,
    write_phantom,
)

log = logging.getLogger(__name__)

NILEARN_HINT = "install the demo extra: pip install -e .[demo]"
MIN_GRID_VOXELS = 8
#: Noisy DWI values are rounded to multiples of this (signal units), like a scanner's storage.
SIGNAL_QUANTUM = 1.0 / 16.0
#: Voxels of zero signal kept around the brain mask in data.nii.gz (HCP masks with a dilated mask).
DATA_MARGIN_VOXELS = 2

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

LESION_RADIUS_MM = (5.0, 8.0)
LESION_TAPER_MM = 2.0
LESION_STREAM = 1  # the lesion's random stream: default_rng([seed, index, LESION_STREAM])

# Mid-sagittal corpus callosum of the ICBM152 2009 WM map: height (z, mm) of its centre at y.
_CALLOSUM_Y = np.array([-46.0, -40, -35, -30, -25, -15, 0, 10, 15, 20, 25, 30, 36])
_CALLOSUM_Z = np.array([10.0, 14, 17, 21, 23, 24, 22.5, 22, 18.5, 12, 7.5, 5, 4])


@dataclass(frozen=True)
class Lesion:
    """How a lesion alters the white-matter tensors it covers: the mean diffusivity times
    ``md_factor``, the anisotropic part (tensor minus its mean) times ``anisotropy_factor``, and
    the b=0 signal times ``s0_factor``. The defaults are vasogenic oedema's."""

    md_factor: float = 1.8
    anisotropy_factor: float = 0.5
    s0_factor: float = 1.25

    def check(self) -> None:
        """Refuse factors that would not give positive-definite tensors and signal."""
        if not all(0 < f < math.inf for f in (self.md_factor, self.s0_factor)):
            raise InputError(
                f"the lesion's MD and S0 factors must be positive and finite, got "
                f"{self.md_factor} and {self.s0_factor}."
            )
        if not 0 <= self.anisotropy_factor <= self.md_factor:
            # eigenvalues f*md + a*(l - md) stay positive for every l > 0 when 0 <= a <= f
            raise InputError(
                f"the lesion's anisotropy factor must lie between 0 and its MD factor "
                f"({self.md_factor}) for the tensors to stay positive definite, got "
                f"{self.anisotropy_factor}."
            )

    def alter(self, tensors: np.ndarray) -> np.ndarray:
        """The lesion's tensors (n, 6) in place of healthy ``tensors`` (n, 6)."""
        md = (tensors[:, 0] + tensors[:, 2] + tensors[:, 5]) / 3
        isotropic = isotropic_tensors(md)
        return self.md_factor * isotropic + self.anisotropy_factor * (tensors - isotropic)


@dataclass(frozen=True)
class Grid:
    """An HR voxel grid: its shape, LAS affine and isotropic voxel size (mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    voxel_size: float


def hcp_grid(voxel_size: float = VOXEL_SIZE_MM, slab: tuple[int, int] | None = None) -> Grid:
    """HCP's field of view at ``voxel_size`` mm; ``slab`` keeps axial slices ``[z0, z1)``.

    Raises InputError (one sentence) for a non-positive or too coarse voxel size or a slab
    outside the grid.
    """
    if not math.isfinite(voxel_size) or voxel_size <= 0:
        raise InputError(f"--voxel-size must be a positive number of mm, got {voxel_size:g}.")
    shape = tuple(math.ceil(n * VOXEL_SIZE_MM / voxel_size - 1e-9) for n in HCP_SHAPE)
    if min(shape) < MIN_GRID_VOXELS:
        raise InputError(
            f"--voxel-size {voxel_size:g} mm leaves fewer than {MIN_GRID_VOXELS} voxels per axis "
            f"(grid {shape}); use at most {VOXEL_SIZE_MM * min(HCP_SHAPE) / MIN_GRID_VOXELS:g} mm."
        )
    affine = hcp_like_affine(shape, voxel_size)
    if slab is not None:
        z0, z1 = (int(z) for z in slab)
        if not (0 <= z0 < z1 <= shape[2]) or z1 - z0 < MIN_GRID_VOXELS:
            raise InputError(
                f"--slab {z0} {z1} must satisfy 0 <= Z0 < Z1 <= {shape[2]} (the grid's axial "
                f"slices at {voxel_size:g} mm) with at least {MIN_GRID_VOXELS} slices."
            )
        affine = affine @ _translation(0, 0, z0)
        shape = (shape[0], shape[1], z1 - z0)
    return Grid(shape, affine, float(voxel_size))


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


@dataclass
class BrainPhantom:
    """An MNI152-based subject: the tensor phantom plus what made it (for checks and figures)."""

    phantom: Phantom  # tensors, s0, kurtosis, brain_mask on the grid
    grid: Grid
    fractions: np.ndarray  # (X, Y, Z, 3) float32 GM, WM, CSF; sum 1 where occupancy > 0
    occupancy: np.ndarray  # (X, Y, Z) float32: the share of the voxel inside the brain outline
    data_mask: np.ndarray  # bool: voxels with signal in data.nii.gz
    deformation: Deformation
    lesion_mask: np.ndarray | None  # uint8, voxels the lesion altered
    lesion: dict | None  # centre_mm (world), radius_mm and the Lesion's factors


def make_mni152_phantom(
    grid: Grid, seed: int, index: int = 0, lesion: Lesion | None = None
) -> tuple[BrainPhantom, np.random.Generator]:
    """Draw subject ``index`` of ``seed`` on ``grid``; returns it and the generator for noise."""
    rng = np.random.default_rng([int(seed), int(index)])
    deformation = Deformation.random(rng)
    fibre_scale = rng.uniform(0.95, 1.05, 2)  # per-subject axial / radial diffusivity
    maps, template_affine = _template_maps(_template_smoothing_mm(grid.voxel_size))

    world = _grid_world_coordinates(grid)
    template = deformation.to_template(world.reshape(-1, 3))
    template_voxels = _apply(np.linalg.inv(template_affine), template).T
    sampled = [
        ndimage.map_coordinates(m, template_voxels, order=1, cval=0.0, prefilter=False)
        .reshape(grid.shape)
        .astype(np.float32)
        for m in maps
    ]
    fractions, occupancy = _tissue_fractions(*sampled)
    brain_mask = occupancy >= 0.5
    tissue = occupancy > 0
    gm, wm, csf = (fractions[..., c] for c in range(3))

    wm_voxels = wm > 0
    wm_tensors = _white_matter_tensors(
        grid, deformation, template.reshape(grid.shape + (3,))[wm_voxels], wm, fibre_scale
    )
    wm_s0 = np.full(len(wm_tensors), S0["wm"])

    lesion_mask, lesion_info = None, None
    if lesion is not None:
        lesion.check()
        lesion_rng = np.random.default_rng([int(seed), int(index), LESION_STREAM])
        weight, lesion_info = _lesion_weight(grid, wm, brain_mask, lesion_rng)
        w = weight[wm_voxels]
        wm_tensors = (1 - w)[:, None] * wm_tensors + w[:, None] * lesion.alter(wm_tensors)
        wm_s0 = wm_s0 * (1 + (lesion.s0_factor - 1) * w)
        lesion_info |= dataclasses.asdict(lesion)
        lesion_mask = ((weight > 0) & wm_voxels).astype(np.uint8)

    tensors = np.zeros(grid.shape + (6,), dtype=np.float32)
    tensors[tissue] = isotropic_tensors(gm[tissue] * GM_DIFFUSIVITY + csf[tissue] * CSF_DIFFUSIVITY)
    tensors[wm_voxels] += wm[wm_voxels, None] * wm_tensors
    s0 = occupancy * (gm * S0["gm"] + csf * S0["csf"])
    s0[wm_voxels] += occupancy[wm_voxels] * wm[wm_voxels] * wm_s0
    kurtosis = gm * KURTOSIS["gm"] + wm * KURTOSIS["wm"] + csf * KURTOSIS["csf"]
    data_mask = ndimage.binary_dilation(
        brain_mask, ndimage.generate_binary_structure(3, 3), iterations=DATA_MARGIN_VOXELS
    )
    phantom = Phantom(
        tensors=tensors,
        s0=s0.astype(np.float32),
        kurtosis=kurtosis.astype(np.float32),
        brain_mask=brain_mask.astype(np.uint8),
    )
    brain = BrainPhantom(
        phantom, grid, fractions, occupancy, data_mask, deformation, lesion_mask, lesion_info
    )
    return brain, rng


def write_mni152_subject(
    root: str | os.PathLike,
    subject_id: str,
    seed: int,
    index: int = 0,
    grid: Grid | None = None,
    snr: float | None = 30.0,
    lesion: Lesion | None = None,
) -> Path:
    """Write one MNI152-based subject in HCP layout under ``root``; returns its folder."""
    grid = grid or hcp_grid()
    brain, rng = make_mni152_phantom(grid, seed, index, lesion)
    subject_dir = Path(root) / subject_id
    noisy = snr is not None and np.isfinite(snr)
    write_phantom(
        subject_dir,
        brain.phantom,
        grid.affine,
        rng,
        snr,
        data_mask=brain.data_mask,
        quantum=SIGNAL_QUANTUM if noisy else None,
    )
    ground_truth = subject_dir / "ground_truth"
    if brain.lesion_mask is not None:
        save_nifti(ground_truth / "lesion_mask.nii.gz", brain.lesion_mask, grid.affine, np.uint8)
    write_json(
        ground_truth / "phantom.json",
        {
            "anatomy": "mni152",
            "seed": int(seed),
            "index": int(index),
            "voxel_size_mm": grid.voxel_size,
            "shape": list(grid.shape),
            "snr": float(snr) if noisy else None,
            "lesion": brain.lesion,
        },
    )
    log.info("MNI152 subject %s written to %s (grid %s)", subject_id, subject_dir, grid.shape)
    return subject_dir


def write_mni152_subjects(
    out: str | os.PathLike,
    count: int,
    seed: int,
    grid: Grid | None = None,
    snr: float | None = 30.0,
    lesion: Lesion | None = None,
    start: int = 0,
) -> list[Path]:
    """Write ``count`` subjects ``synth<start>``, ... (``_lesion`` appended with a lesion)."""
    suffix = "" if lesion is None else "_lesion"
    return [
        write_mni152_subject(out, f"synth{index:03d}{suffix}", seed, index, grid, snr, lesion)
        for index in range(int(start), int(start) + int(count))
    ]


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
def _template_maps(smoothing_mm: float) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(GM, WM, brain outline) float32 maps, smoothed for the target voxel size, and affine."""
    gm, wm, t1, affine = load_templates()
    outline = ndimage.binary_fill_holes(t1 > 0.05).astype(np.float32)
    maps = (gm, wm, np.maximum(outline, np.minimum(gm + wm, 1.0)))
    if smoothing_mm > 0:
        maps = tuple(ndimage.gaussian_filter(m, smoothing_mm) for m in maps)
    return maps, affine


def _template_smoothing_mm(voxel_size: float) -> float:
    """Gaussian sigma that averages the 1 mm template over a voxel (box-equivalent variance)."""
    sigma = math.sqrt(max(voxel_size**2 - 1.0, 0.0) / 12.0)
    return round(sigma, 3) if sigma >= 0.25 else 0.0


def _tissue_fractions(
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


def _white_matter_tensors(
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


# --- lesion ----------------------------------------------------------------------------------


def _lesion_weight(
    grid: Grid, wm: np.ndarray, brain_mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, dict]:
    """A ball (weight 1, cosine taper to 0 at its radius) centred in deep white matter."""
    radius = float(rng.uniform(*LESION_RADIUS_MM))
    depth = ndimage.distance_transform_edt(wm >= 0.5, sampling=grid.voxel_size)
    if depth.max() <= 0:
        raise InputError("the grid holds no white matter to place a lesion in; widen the slab.")
    candidates = np.flatnonzero(depth >= min(0.6 * radius, depth.max()))
    centre = np.array(np.unravel_index(candidates[rng.integers(len(candidates))], grid.shape))
    offsets = [
        (np.arange(n) - c) * grid.voxel_size for n, c in zip(grid.shape, centre, strict=True)
    ]
    distance = np.sqrt(sum(o**2 for o in np.meshgrid(*offsets, indexing="ij", sparse=True)))
    core = radius - LESION_TAPER_MM
    taper = 0.5 * (1 + np.cos(np.pi * np.clip((distance - core) / LESION_TAPER_MM, 0, 1)))
    weight = np.where(distance < radius, taper, 0.0) * brain_mask
    centre_mm = _apply(grid.affine, centre[None].astype(float))[0]
    return weight, {"centre_mm": [round(float(c), 3) for c in centre_mm], "radius_mm": radius}


# --- geometry helpers ------------------------------------------------------------------------


def _grid_world_coordinates(grid: Grid) -> np.ndarray:
    """World coordinates (X, Y, Z, 3) in mm of every voxel centre of ``grid``."""
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    return _apply(grid.affine, indices.reshape(-1, 3).astype(np.float64)).reshape(grid.shape + (3,))


def _apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def _translation(x: float, y: float, z: float) -> np.ndarray:
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
