"""Synthetic HCP-like subjects: a geometric diffusion phantom, and the acquisition, signal model,
noise and writer (``write_phantom``) that the MNI152-based phantom (``preprocessing.mni152``)
shares.

Each subject (different per seed and index) is an ellipsoidal head around an ellipsoidal
brain: an outer CSF layer, a wavy cortical grey-matter shell, two CSF ventricles, and white
matter made of smoothly curving fibre bundles (quadratic Bezier tubes; two of them cross a
callosum-like arc) over a weakly anisotropic radial background. Tissue and bundle boundaries
are smooth (about one voxel wide), and mixed voxels get the weighted mean tensor, so every
voxel holds exactly one tensor.

Acquisition (HCP-like, 288 volumes): one b0 (b=5, zero bvec) every 16 volumes, then 90
directions at each of b=1000, 2000 and 3000 (bvals jittered by up to 10 as in HCP), shells
interleaved. Signal model:

* b <= 1500: the tensor model ``S = S0 exp(-b g'Dg)``, so a DTI fit on b <= 1500 of a
  noise-free subject returns the ground truth tensor (up to float32 rounding);
* b > 1500: a kurtosis-like deviation (gamma-distribution model
  ``S = S0 (1 + b g'Dg K / 3) ** (-3 / K)``, K = 1.0 WM, 0.7 GM, 0 CSF), so including the
  higher shells biases a DTI fit: shell selection matters.

Rician noise: ``|S + sigma (n1 + i n2)|`` with ``sigma = S0_WM / snr``; ``snr=None`` (CLI:
``--snr inf``) writes noise-free data. Everything is drawn from ``numpy.random.default_rng
([seed, index])``, so the same seed gives byte-identical files.

Files per subject, HCP layout: ``<id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs,
nodif_brain_mask.nii.gz}`` and ``<id>/ground_truth/dt_hr.nii.gz`` (noise-free tensor,
(X, Y, Z, 6) float32 mm^2/s in ``TENSOR_ELEMENTS`` order, zero outside the brain mask).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener
from scipy.spatial import cKDTree

from preprocessing.io import atomic_path, save_nifti, write_text

log = logging.getLogger(__name__)

#: Default HR shape: small enough for CI and the CPU demo (LR 24 x 28 x 24 at factor 2).
DEFAULT_SHAPE: tuple[int, int, int] = (48, 56, 48)
#: HCP-size volume (T1w/Diffusion space, 1.25 mm).
HCP_SHAPE: tuple[int, int, int] = (145, 174, 145)
VOXEL_SIZE_MM = 1.25
B0_BVAL = 5.0
SHELLS: tuple[float, ...] = (1000.0, 2000.0, 3000.0)
DIRECTIONS_PER_SHELL = 90
VOLUMES_PER_B0 = 16  # one b0 then 15 diffusion-weighted volumes: 18 b0 in 288 volumes
#: b-values above this follow the kurtosis-like model instead of the pure tensor model.
TENSOR_MODEL_BMAX = 1500.0

# Tissue properties: S0 (arbitrary units, T2-weighted), diffusivities in mm^2/s, kurtosis K.
S0 = {"wm": 1000.0, "gm": 1300.0, "csf": 2500.0, "scalp": 700.0}
KURTOSIS = {"wm": 1.0, "gm": 0.7, "csf": 0.0, "scalp": 0.5}
WM_AXIAL, WM_RADIAL = 1.7e-3, 0.3e-3  # fibre bundles
WM_BACKGROUND_AXIAL, WM_BACKGROUND_RADIAL = 1.1e-3, 0.6e-3
GM_DIFFUSIVITY, CSF_DIFFUSIVITY, SCALP_DIFFUSIVITY = 0.8e-3, 3.0e-3, 1.0e-3


@dataclass(frozen=True)
class Acquisition:
    """FSL-style gradient scheme: ``bvals`` (N,), unit ``bvecs`` (N, 3), zero rows for b0."""

    bvals: np.ndarray
    bvecs: np.ndarray


def hcp_like_acquisition() -> Acquisition:
    """The fixed 288-volume scheme shared by all synthetic subjects (see module docstring)."""
    rng = np.random.default_rng(2013)  # fixed: the scanner protocol, not the subject
    shells = []
    for shell in SHELLS:
        directions = _half_sphere_directions(DIRECTIONS_PER_SHELL) @ _random_rotation(rng).T
        directions *= np.where(directions[:, 2:3] < 0, -1.0, 1.0)  # keep one hemisphere
        jitter = rng.choice([-10.0, -5.0, 0.0, 5.0, 10.0], size=DIRECTIONS_PER_SHELL)
        shells.append((shell + jitter, directions))
    weighted = [
        (shells[i % 3][0][i // 3], shells[i % 3][1][i // 3])
        for i in range(DIRECTIONS_PER_SHELL * len(SHELLS))
    ]
    bvals, bvecs = [], []
    per_block = VOLUMES_PER_B0 - 1
    for block in range(len(weighted) // per_block):
        bvals.append(B0_BVAL)
        bvecs.append(np.zeros(3))
        for bval, direction in weighted[block * per_block : (block + 1) * per_block]:
            bvals.append(bval)
            bvecs.append(direction)
    return Acquisition(np.array(bvals), np.array(bvecs))


#: World point (mm) at the centre of every synthetic grid.
GRID_CENTRE_MM: tuple[float, float, float] = (0.5, -8.0, 10.0)


def hcp_like_affine(shape: tuple[int, int, int], voxel_size: float = VOXEL_SIZE_MM) -> np.ndarray:
    """HCP-style LAS affine (x flipped, ``voxel_size`` mm) centred on ``GRID_CENTRE_MM``."""
    affine = np.diag([-voxel_size, voxel_size, voxel_size, 1.0])
    affine[:3, 3] = np.array([1.0, -1.0, -1.0]) * (np.array(shape) - 1) / 2 * voxel_size
    affine[:3, 3] += GRID_CENTRE_MM
    return affine


@dataclass
class Phantom:
    """Noise-free ground truth: per-voxel tensor (X, Y, Z, 6), S0, kurtosis and brain mask."""

    tensors: np.ndarray  # float32, lower-triangular order, mm^2/s, everywhere in the head
    s0: np.ndarray  # float32
    kurtosis: np.ndarray  # float32
    brain_mask: np.ndarray  # uint8


def make_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> Phantom:
    """Draw one brain-like phantom on a ``shape`` grid of 1.25 mm voxels."""
    shape = tuple(int(size) for size in shape)
    half = np.array(shape) * VOXEL_SIZE_MM / 2
    coords = [(np.arange(n) - (n - 1) / 2) * VOXEL_SIZE_MM for n in shape]
    x, y, z = np.meshgrid(*coords, indexing="ij", sparse=True)
    edge = 0.6 * VOXEL_SIZE_MM  # width of smooth tissue boundaries, mm

    centre = half * rng.uniform(-0.03, 0.03, 3)
    brain_axes = half * 0.8 * rng.uniform(0.93, 1.03, 3)
    head_axes = np.minimum(brain_axes * 1.12, half * 0.97)
    xc, yc, zc = x - centre[0], y - centre[1], z - centre[2]
    radius = np.sqrt(
        (xc / brain_axes[0]) ** 2 + (yc / brain_axes[1]) ** 2 + (zc / brain_axes[2]) ** 2
    )
    head_radius = np.sqrt(
        (xc / head_axes[0]) ** 2 + (yc / head_axes[1]) ** 2 + (zc / head_axes[2]) ** 2
    )
    mean_axis = brain_axes.mean()
    depth = (1 - radius) * mean_axis  # approx. distance inside the brain surface, mm
    # Gyri-like undulation of the grey/white boundary.
    azimuth = np.arctan2(yc, xc)
    elevation = np.arctan2(zc, np.sqrt(xc**2 + yc**2))
    k1, k2 = rng.integers(5, 9, 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    wiggle = (
        1.2 * VOXEL_SIZE_MM * np.sin(k1 * azimuth + phase[0]) * np.sin(k2 * elevation + phase[1])
    )
    csf_layer = rng.uniform(0.8, 1.2) * VOXEL_SIZE_MM
    gm_layer = rng.uniform(2.0, 2.8) * VOXEL_SIZE_MM

    in_head = _smooth_step((1 - head_radius) * head_axes.mean(), edge)
    in_brain = _smooth_step(depth, edge)
    below_csf = _smooth_step(depth - csf_layer, edge)
    in_core = _smooth_step(depth - csf_layer - gm_layer + wiggle, edge)
    in_ventricle = _ventricles(xc, yc, zc, brain_axes, edge, rng)

    weights = {
        "csf": (in_brain - below_csf) + in_core * in_ventricle,
        "gm": below_csf - in_core,
        "wm": in_core * (1 - in_ventricle),
        "scalp": in_head - in_brain,
    }
    weights = {name: np.clip(np.broadcast_to(w, shape), 0, None) for name, w in weights.items()}
    tissue_total = sum(weights.values())
    safe_total = np.where(tissue_total > 1e-6, tissue_total, 1.0)

    tensors = np.zeros(shape + (6,), dtype=np.float64)
    tensors += isotropic_tensors(weights["gm"] * GM_DIFFUSIVITY)
    tensors += isotropic_tensors(weights["csf"] * CSF_DIFFUSIVITY)
    tensors += isotropic_tensors(weights["scalp"] * SCALP_DIFFUSIVITY)
    wm_voxels = weights["wm"] > 1e-4
    tensors[wm_voxels] += weights["wm"][wm_voxels, None] * _white_matter_tensors(
        np.stack(np.nonzero(wm_voxels), axis=1), shape, centre, brain_axes, rng
    )
    tensors /= safe_total[..., None]
    tensors[tissue_total <= 1e-6] = 0.0
    s0 = sum(weights[name] * S0[name] for name in weights)
    kurtosis = sum(weights[name] * KURTOSIS[name] for name in weights) / safe_total
    return Phantom(
        tensors=tensors.astype(np.float32),
        s0=np.asarray(s0, dtype=np.float32),
        kurtosis=np.asarray(kurtosis, dtype=np.float32),
        brain_mask=(np.broadcast_to(in_brain, shape) >= 0.5).astype(np.uint8),
    )


def signal_volume(phantom: Phantom, bval: float, bvec: np.ndarray) -> np.ndarray:
    """Noise-free signal of one volume (float64); see the module docstring for the model."""
    g = np.asarray(bvec, dtype=np.float64)
    d = phantom.tensors
    apparent = (
        g[0] ** 2 * d[..., 0]
        + 2 * g[0] * g[1] * d[..., 1]
        + g[1] ** 2 * d[..., 2]
        + 2 * g[0] * g[2] * d[..., 3]
        + 2 * g[1] * g[2] * d[..., 4]
        + g[2] ** 2 * d[..., 5]
    ).astype(np.float64)
    s0 = phantom.s0.astype(np.float64)
    if bval <= TENSOR_MODEL_BMAX:
        return s0 * np.exp(-bval * apparent)
    k = np.maximum(phantom.kurtosis.astype(np.float64), 1e-6)
    return s0 * (1 + bval * apparent * k / 3) ** (-3 / k)


def write_synthetic_subject(
    root: str | os.PathLike,
    subject_id: str,
    seed: int,
    index: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    snr: float | None = 30.0,
) -> Path:
    """Write one geometric subject in HCP layout under ``root``; returns its folder.

    ``snr`` is the b0 white-matter SNR of the Rician noise; None or inf writes noise-free data.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    shape = tuple(int(size) for size in shape)
    if min(shape) < 8:
        raise ValueError(f"synthetic subjects need at least 8 voxels per axis, got {shape}")
    phantom = make_phantom(shape, rng)
    subject_dir = Path(root) / subject_id
    write_phantom(subject_dir, phantom, hcp_like_affine(shape), rng, snr)
    log.info(
        "synthetic subject %s written to %s (shape %s, snr %s)", subject_id, subject_dir, shape, snr
    )
    return subject_dir


def write_synthetic_subjects(
    out: str | os.PathLike,
    count: int,
    seed: int,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    snr: float | None = 30.0,
    start: int = 0,
) -> list[Path]:
    """Write ``count`` geometric subjects ``synth<start>``, ... (3 digits) under ``out``."""
    return [
        write_synthetic_subject(out, f"synth{index:03d}", seed, index, shape, snr)
        for index in range(int(start), int(start) + int(count))
    ]


def write_phantom(
    subject_dir: str | os.PathLike,
    phantom: Phantom,
    affine: np.ndarray,
    rng: np.random.Generator,
    snr: float | None,
    data_mask: np.ndarray | None = None,
    quantum: float | None = None,
) -> None:
    """Write a phantom's DWI (HCP acquisition, Rician noise from ``rng``) and ground truth.

    ``data_mask`` (bool, the grid's shape): signal and noise only there, zero elsewhere, as
    in HCP's masked ``data.nii.gz``; None fills the whole grid. ``quantum``: stored values are
    rounded to multiples of it, like a scanner's finite precision; it makes noisy data compress
    about three times faster. The DWI is generated and compressed one volume at a time, so an
    HCP-size subject needs about 1 GB of memory, not the 4 GB of its float32 data.
    """
    subject_dir = Path(subject_dir)
    diffusion_dir = subject_dir / "T1w" / "Diffusion"
    shape = phantom.brain_mask.shape
    acquisition = hcp_like_acquisition()
    sigma = None if snr is None or not np.isfinite(snr) else S0["wm"] / float(snr)
    inside = phantom if data_mask is None else _voxels_of(phantom, data_mask)
    noise_shape = shape if data_mask is None else (int(np.count_nonzero(data_mask)),)

    def volumes():
        for bval, bvec in zip(acquisition.bvals, acquisition.bvecs, strict=True):
            signal = signal_volume(inside, bval, bvec)
            if sigma is not None:
                real = signal + sigma * rng.standard_normal(noise_shape)
                imaginary = sigma * rng.standard_normal(noise_shape)
                signal = np.sqrt(real**2 + imaginary**2)
            if quantum is not None:
                signal = np.round(signal / quantum) * quantum
            if data_mask is None:
                yield signal.astype(np.float32)
            else:
                volume = np.zeros(shape, dtype=np.float32)
                volume[data_mask] = signal
                yield volume

    _save_nifti_volumes(
        diffusion_dir / "data.nii.gz", shape, len(acquisition.bvals), affine, volumes()
    )
    write_text(diffusion_dir / "bvals", " ".join(f"{b:g}" for b in acquisition.bvals) + "\n")
    bvec_rows = [" ".join(f"{v:.6f}" for v in row) for row in acquisition.bvecs.T]
    write_text(diffusion_dir / "bvecs", "\n".join(bvec_rows) + "\n")
    save_nifti(diffusion_dir / "nodif_brain_mask.nii.gz", phantom.brain_mask, affine, np.uint8)
    ground_truth = phantom.tensors * phantom.brain_mask[..., None]
    save_nifti(subject_dir / "ground_truth" / "dt_hr.nii.gz", ground_truth, affine, np.float32)


# --- helpers -------------------------------------------------------------------------------


def _voxels_of(phantom: Phantom, mask: np.ndarray) -> Phantom:
    """The phantom's voxels inside ``mask`` as flat arrays (signal_volume works on any shape)."""
    return Phantom(
        phantom.tensors[mask], phantom.s0[mask], phantom.kurtosis[mask], phantom.brain_mask[mask]
    )


def _smooth_step(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Logistic 0 -> 1 across a boundary (positive distance = inside)."""
    return 0.5 * (1 + np.tanh(signed_distance / (2 * width)))


def isotropic_tensors(diffusivity: np.ndarray) -> np.ndarray:
    tensor = np.zeros(np.shape(diffusivity) + (6,))
    tensor[..., 0] = tensor[..., 2] = tensor[..., 5] = diffusivity
    return tensor


def cylinder_tensors(directions: np.ndarray, axial: float, radial: float) -> np.ndarray:
    """Lower-triangular tensors radial*I + (axial - radial) t t' for unit rows t."""
    t = directions
    outer = np.stack(
        [
            t[:, 0] ** 2,
            t[:, 0] * t[:, 1],
            t[:, 1] ** 2,
            t[:, 0] * t[:, 2],
            t[:, 1] * t[:, 2],
            t[:, 2] ** 2,
        ],
        axis=1,
    )
    return isotropic_tensors(np.full(len(t), radial)) + (axial - radial) * outer


def _ventricles(xc, yc, zc, brain_axes, edge, rng) -> np.ndarray:
    """Two lateral-ventricle-like ellipsoids (smooth membership in [0, 1])."""
    membership = 0.0
    axes = brain_axes * np.array([0.09, 0.32, 0.12]) * rng.uniform(0.85, 1.15, 3)
    offset = brain_axes * np.array([0.17, rng.uniform(-0.05, 0.05), rng.uniform(0.0, 0.12)])
    for side in (-1.0, 1.0):
        radius = np.sqrt(
            ((xc - side * offset[0]) / axes[0]) ** 2
            + ((yc - offset[1]) / axes[1]) ** 2
            + ((zc - offset[2]) / axes[2]) ** 2
        )
        membership = np.maximum(membership, _smooth_step((1 - radius) * axes.min(), edge))
    return membership


def _white_matter_tensors(voxels, shape, centre, brain_axes, rng) -> np.ndarray:
    """Tensors (n, 6) of WM voxels: bundles blended over a radial background."""
    points = (voxels - (np.array(shape) - 1) / 2) * VOXEL_SIZE_MM - centre
    radial = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-9)
    background = cylinder_tensors(radial, WM_BACKGROUND_AXIAL, WM_BACKGROUND_RADIAL)
    bundle_tensors, bundle_weights = [], []
    for control in _bundle_control_points(brain_axes, rng):
        t = np.linspace(0, 1, 400)[:, None]
        curve = (1 - t) ** 2 * control[0] + 2 * (1 - t) * t * control[1] + t**2 * control[2]
        tangent = 2 * (1 - t) * (control[1] - control[0]) + 2 * t * (control[2] - control[1])
        tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
        distance, nearest = cKDTree(curve).query(points)
        bundle_radius = brain_axes.min() * rng.uniform(0.11, 0.16)
        bundle_weights.append(_smooth_step(bundle_radius - distance, 0.6 * VOXEL_SIZE_MM))
        bundle_tensors.append(cylinder_tensors(tangent[nearest], WM_AXIAL, WM_RADIAL))
    weights = np.stack(bundle_weights, axis=1)
    total = weights.sum(axis=1, keepdims=True)
    weights = weights / np.maximum(total, 1.0)  # crossings: mean of the crossing bundles
    tensors = (1 - weights.sum(axis=1, keepdims=True)) * background
    for index, bundle in enumerate(bundle_tensors):
        tensors += weights[:, index : index + 1] * bundle
    return tensors


def _bundle_control_points(brain_axes, rng) -> list[np.ndarray]:
    """Quadratic Bezier control points (3, 3) in mm for each bundle; bundles 1-2 cross bundle 0."""
    a = brain_axes

    def jitter(scale=0.06):
        return rng.uniform(-scale, scale, 3)

    y0, z0 = rng.uniform(-0.15, 0.15), rng.uniform(0.05, 0.2)
    callosal = np.array([[-0.62, y0, z0], [0.0, y0, z0 + 0.45], [0.62, y0, z0]]) + jitter()
    bundles = [callosal]
    for t_cross in (rng.uniform(0.22, 0.35), rng.uniform(0.65, 0.78)):  # left and right
        cross = (1 - t_cross) ** 2 * callosal[0] + 2 * (1 - t_cross) * t_cross * callosal[1]
        cross += t_cross**2 * callosal[2]
        bottom = cross + np.array([rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.15), -0.75])
        top = cross + np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.15, 0.15), 0.45])
        middle = 2 * cross - 0.5 * (bottom + top)  # the curve passes through `cross` at t=0.5
        bundles.append(np.array([bottom, middle, top]))
    for side in (-1.0, 1.0):  # cingulum-like anterior-posterior arcs
        x0, z1 = side * rng.uniform(0.25, 0.4), rng.uniform(-0.25, 0.05)
        bundles.append(
            np.array([[x0, -0.62, z1], [x0, 0.0, z1 + rng.uniform(0.2, 0.4)], [x0, 0.62, z1]])
            + jitter()
        )
    return [control * a for control in bundles]


def _half_sphere_directions(count: int) -> np.ndarray:
    """Fibonacci-spiral unit vectors on the upper half sphere, well spread."""
    index = np.arange(count) + 0.5
    z = 1 - index / count
    phi = index * np.pi * (3 - np.sqrt(5))
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _save_nifti_volumes(path: Path, shape, count: int, affine, volumes) -> None:
    """Stream ``count`` float32 3D volumes into one 4D NIfTI atomically, one volume in memory."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape) + (count,))
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm", "sec")
    header.set_data_offset(352)  # 348-byte header + 4-byte empty extension flag
    with atomic_path(path) as tmp:
        # nibabel's deterministic gzip (no name/mtime); one thread compresses volume k while
        # the caller's generator computes volume k + 1 (zlib releases the GIL).
        with Opener(str(tmp), "wb") as stream, ThreadPoolExecutor(max_workers=1) as writer:
            header.write_to(stream)
            written, pending = 0, None
            for volume in volumes:
                chunk = np.asarray(volume, dtype="<f4").tobytes(order="F")
                if pending is not None:
                    pending.result()
                pending = writer.submit(stream.write, chunk)
                written += 1
            if pending is not None:
                pending.result()
        if written != count:
            raise ValueError(f"expected {count} volumes for {path}, got {written}")
