"""Brain-realistic synthetic subjects built from the MNI152 tissue templates shipped in nilearn.

Each subject is the ICBM152 2009 template brain under a per-subject smooth random deformation:
an affine part (each axis 0.87-1.0 times the template's, which is larger than most brains;
rotation up to 5 degrees; shift up to 4 mm) and a displacement of a few low-frequency sine modes
(wavelengths 80-160 mm, up to 2 mm each). Every HR voxel holds a partial-volume mixture of grey
matter (isotropic 0.8e-3 mm^2/s), CSF (the brain outline minus GM and WM: ventricles, sulci;
isotropic 3.0e-3 mm^2/s) and white matter, a mixture of analytic fibre populations with crossing
fibres where tracts overlap (:mod:`preprocessing.mni152_anatomy`, which holds the templates, the
deformation and the tract models). Mixed voxels hold the volume-weighted mean tensor, as in the
geometric phantom. This module assembles a subject from that anatomy on a grid and writes it.

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
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from preprocessing.errors import InputError
from preprocessing.io import save_nifti, write_json
from preprocessing.mni152_anatomy import (
    Deformation,
    Grid,
    apply_affine,
    grid_world_coordinates,
    template_maps,
    template_smoothing_mm,
    tissue_fractions,
    translation,
    white_matter_tensors,
)
from preprocessing.synthetic import (
    CSF_DIFFUSIVITY,
    GM_DIFFUSIVITY,
    HCP_SHAPE,
    KURTOSIS,
    S0,
    VOXEL_SIZE_MM,
    Phantom,
    hcp_like_affine,
    isotropic_tensors,
    write_phantom,
)

log = logging.getLogger(__name__)

MIN_GRID_VOXELS = 8
#: Noisy DWI values are rounded to multiples of this (signal units), like a scanner's storage.
SIGNAL_QUANTUM = 1.0 / 16.0
#: Voxels of zero signal kept around the brain mask in data.nii.gz (HCP masks with a dilated mask).
DATA_MARGIN_VOXELS = 2

LESION_RADIUS_MM = (5.0, 8.0)
LESION_TAPER_MM = 2.0
LESION_STREAM = 1  # the lesion's random stream: default_rng([seed, index, LESION_STREAM])


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
        affine = affine @ translation(0, 0, z0)
        shape = (shape[0], shape[1], z1 - z0)
    return Grid(shape, affine, float(voxel_size))


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
    maps, template_affine = template_maps(template_smoothing_mm(grid.voxel_size))

    world = grid_world_coordinates(grid)
    template = deformation.to_template(world.reshape(-1, 3))
    template_voxels = apply_affine(np.linalg.inv(template_affine), template).T
    sampled = [
        ndimage.map_coordinates(m, template_voxels, order=1, cval=0.0, prefilter=False)
        .reshape(grid.shape)
        .astype(np.float32)
        for m in maps
    ]
    fractions, occupancy = tissue_fractions(*sampled)
    brain_mask = occupancy >= 0.5
    tissue = occupancy > 0
    gm, wm, csf = (fractions[..., c] for c in range(3))

    wm_voxels = wm > 0
    wm_tensors = white_matter_tensors(
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
    centre_mm = apply_affine(grid.affine, centre[None].astype(float))[0]
    return weight, {"centre_mm": [round(float(c), 3) for c in centre_mm], "radius_mm": radius}
