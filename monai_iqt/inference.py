"""Whole-brain sliding-window inference: LR tensor image in, HR tensor image and its maps out.

Windows go through MONAI's :func:`~monai.inferers.sliding_window_inference`; each window's
prediction is kept only where it equals what one pass of the network over the whole (padded)
volume gives. An output voxel of ESPCN-RN-N depends on ``halo = 2 + 6 N`` LR voxels on each side
(the reversible blocks' 3^3 convolutions are zero-padded), so a window's outermost ``halo``
voxels are wrong unless that side of the window is the side of the volume. The predictor
returns the prediction times a 0/1 weight plus the weight itself as a 7th channel; MONAI sums
both over the windows and the ratio is the weighted average of exact predictions only. Windows
are sized to tile the volume with exactly the overlap the halo needs; each runs the network only
on its brain's bounding box plus the halo, and windows without brain are not computed. The
result is the whole-volume pass, not the paper's 11^3 patch stitching.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.maps import tensor_maps
from monai_iqt.metrics import upsample_nearest
from monai_iqt.networks.espcn import VALID_SHRINK
from preprocessing.geometry import hr_affine_from_lr
from preprocessing.hcp import read_gradient_table
from preprocessing.io import InputError, load_nifti, save_nifti
from preprocessing.tensor_fit import DEFAULT_BMAX, fit_dti

log = logging.getLogger(__name__)

#: Largest window side in LR voxels. 96^3 LR voxels hold an HCP brain at 2.5 mm (72 x 87 x 72)
#: in one window; the ESPCN's activations for it take about 0.35 GB per layer. Smaller windows
#: bound memory further (each window costs 2 * halo voxels of overlap per axis).
DEFAULT_ROI_SIZE = 96

#: Relative difference between input and training voxel sizes above which inference warns.
VOXEL_SIZE_TOLERANCE = 0.2

#: The repository (editable install) and the bundle inside it; the bundle configs resolve
#: their default paths from these, so the commands work from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundles" / "iqt_espcn_rn"

#: Names of the files written per subject.
OUTPUT_NAMES = {
    "dt_hr": "dt_hr.nii.gz",
    "md": "md.nii.gz",
    "fa": "fa.nii.gz",
    "colour_fa": "colour_fa.nii.gz",
}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def network_halo(network: torch.nn.Module) -> int:
    """LR voxels on each side an output voxel depends on (``network.halo``; 2 for the ESPCN)."""
    return int(getattr(network, "halo", VALID_SHRINK))


def plan_windows(
    padded_shape: Sequence[int], max_window: Sequence[int] | int, halo: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Window size and MONAI ``overlap`` per axis so windows tile with exactly ``2 * halo`` overlap.

    Each window is at most ``max_window`` LR voxels (the whole axis if it fits) and is shrunk
    so that the windows along an axis share the work evenly.
    """
    if isinstance(max_window, int):
        max_window = (max_window,) * 3
    roi, overlap = [], []
    for size, limit in zip(padded_shape, max_window, strict=True):
        if limit <= 0 or size <= limit:
            roi.append(int(size))
            overlap.append(0.0)
            continue
        if limit <= 2 * halo:
            raise ValueError(
                f"windows of {limit} LR voxels leave no exact output for a network whose output "
                f"depends on {halo} voxels each side; use windows larger than {2 * halo}"
            )
        count = math.ceil((size - 2 * halo) / (limit - 2 * halo))
        window = math.ceil((size - 2 * halo) / count) + 2 * halo
        roi.append(window)
        # MONAI's scan interval is int(window * (1 - overlap)): make it window - 2 * halo.
        overlap.append((2 * halo - 0.5) / window)
    return tuple(roi), tuple(overlap)


class HaloWeightedPredictor:
    """Window predictor for MONAI that keeps only the halo-free part of each window's output.

    Input windows have 7 channels: the 6 normalised tensor elements and a brain indicator.
    Output windows (r times larger) have 7 channels: the normalised prediction times a 0/1
    weight, and the weight. A window runs the network only on the bounding box of its brain
    voxels plus the halo; windows without brain in their exact region are not computed.
    Crops of equal shape within one MONAI batch (``sw_batch_size``) share a network call.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        halo: int,
        padded_shape: Sequence[int],
        upscale_factor: int,
        output_transform=None,
    ) -> None:
        self.network = network
        self.output_transform = output_transform or (lambda y: y)
        self.halo = halo
        self.padded_shape = tuple(padded_shape)
        self.upscale_factor = upscale_factor
        self.windows_computed = 0
        self.windows_skipped = 0
        self.voxels_computed = 0

    def _exact_range(self, start: int, stop: int, window: slice, size: int) -> tuple[int, int]:
        """Exact outputs of a network pass over window-relative range [start, stop).

        A side is exact from ``VALID_SHRINK`` voxels in when it is the padded volume's own side
        (the whole-volume pass sees the same zero padding there), else from ``halo`` voxels in.
        """
        at_low = start == 0 and window.start == 0
        at_high = stop == window.stop - window.start and window.stop == size
        return (
            start + (VALID_SHRINK if at_low else self.halo),
            stop - (VALID_SHRINK if at_high else self.halo),
        )

    def _crop(self, brain: torch.Tensor, window: Sequence[slice]) -> tuple[slice, ...] | None:
        """Window-relative LR crop to run: brain bounding box (in the exact region) plus halo."""
        spans = [
            self._exact_range(0, w.stop - w.start, w, size)
            for w, size in zip(window, self.padded_shape, strict=True)
        ]
        inside = brain[tuple(slice(low, high) for low, high in spans)] > 0
        profiles = [inside.any(dim=d).any(dim=e) for d, e in ((2, 1), (2, 0), (1, 0))]
        if not bool(profiles[0].any()):
            return None
        occupied = [torch.nonzero(p)[:, 0] for p in profiles]
        first = [int(o[0]) for o in occupied]
        last = [int(o[-1]) + 1 for o in occupied]
        return tuple(
            slice(max(0, low + a - self.halo), min(w.stop - w.start, low + b + self.halo))
            for (low, _), a, b, w in zip(spans, first, last, window, strict=True)
        )

    def __call__(self, windows: torch.Tensor, coordinates: list) -> torch.Tensor:
        r = self.upscale_factor
        batch, _, *shape = windows.shape
        out = windows.new_zeros((batch, 7, *(r * s for s in shape)))
        groups: dict[tuple[int, ...], list[tuple[int, tuple[slice, ...]]]] = {}
        for b in range(batch):
            crop = self._crop(windows[b, 6], coordinates[b][2:])
            if crop is None:
                self.windows_skipped += 1
                continue
            groups.setdefault(tuple(c.stop - c.start for c in crop), []).append((b, crop))
        for crop_shape, members in groups.items():
            inputs = torch.stack([windows[(b, slice(0, 6), *crop)] for b, crop in members])
            prediction = self.output_transform(self.network(inputs))
            self.windows_computed += len(members)
            self.voxels_computed += len(members) * math.prod(crop_shape)
            for index, (b, crop) in enumerate(members):
                window = coordinates[b][2:]
                target, source = [], []
                for c, w, size in zip(crop, window, self.padded_shape, strict=True):
                    low, high = self._exact_range(c.start, c.stop, w, size)
                    # the prediction covers LR positions [c.start + 2, c.stop - 2) of the window
                    offset = c.start + VALID_SHRINK
                    target.append(slice(r * low, r * high))
                    source.append(slice(r * (low - offset), r * (high - offset)))
                out[(b, slice(0, 6), *target)] = prediction[(index, slice(None), *source)]
                out[(b, 6, *target)] = 1.0
        return out


class WholeBrainInferer:
    """Turn an LR tensor volume (X, Y, Z, 6) in mm^2/s into the HR one (rX, rY, rZ, 6).

    Args:
        network: trained ESPCN / ESPCN-RN-N (any module with ``halo`` and valid convolutions).
        stats: normalisation statistics saved with the weights.
        upscale_factor: r, as in training.
        roi_size: largest window in LR voxels (int or 3 ints; <= 0 means the whole axis).
        sw_batch_size: windows MONAI hands over at once; their brain crops of equal shape
            share one network call (whole-brain windows on a GPU).
        device: where the network runs (CUDA when present by default); the volume stays on CPU.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        stats: NormalisationStats,
        upscale_factor: int = 2,
        roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
        sw_batch_size: int = 1,
        device: torch.device | str | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.network = network.to(self.device).eval()
        self.stats = stats
        self.upscale_factor = int(upscale_factor)
        self.roi_size = roi_size
        self.sw_batch_size = int(sw_batch_size)
        self.halo = network_halo(network)
        self.last_predictor: HaloWeightedPredictor | None = None

    def _dtype(self) -> torch.dtype:
        parameter = next(self.network.parameters(), None)
        return parameter.dtype if parameter is not None else torch.float32

    def _padded_input(self, dt_lr: np.ndarray, brain_lr: np.ndarray) -> torch.Tensor:
        """(1, 7, X+4, Y+4, Z+4): normalised tensor (0 mm^2/s beyond the field of view) + brain."""
        dt = torch.as_tensor(np.moveaxis(np.asarray(dt_lr), -1, 0)[None], dtype=self._dtype())
        brain = torch.as_tensor(np.asarray(brain_lr, dtype=bool)[None, None], dtype=dt.dtype)
        pad = (VALID_SHRINK,) * 6  # zero mm^2/s (background) beyond the field of view, no brain
        dt = self.stats.normalise_input(torch.nn.functional.pad(dt, pad))
        return torch.cat([dt, torch.nn.functional.pad(brain, pad)], dim=1)

    def _finish(self, hr: torch.Tensor, brain_lr: np.ndarray) -> np.ndarray:
        """(1, 6, rX, rY, rZ) in mm^2/s -> (rX, rY, rZ, 6) float32, zero outside the brain."""
        brain_hr = torch.from_numpy(upsample_nearest(np.asarray(brain_lr), self.upscale_factor))
        hr = hr[0].float().cpu() * brain_hr.to(torch.float32)
        return np.moveaxis(hr.numpy(), 0, -1)

    @torch.no_grad()
    def __call__(self, dt_lr: np.ndarray, brain_lr: np.ndarray | None = None) -> np.ndarray:
        """Sliding-window HR prediction; zero outside the brain region ``brain_lr`` (LR grid).

        Without ``brain_lr`` every voxel with a non-zero tensor counts as brain.
        """
        brain_lr = _brain_or_nonzero(dt_lr, brain_lr)
        padded = self._padded_input(dt_lr, brain_lr)
        roi, overlap = plan_windows(padded.shape[2:], self.roi_size, self.halo)
        predictor = HaloWeightedPredictor(
            self.network,
            self.halo,
            padded.shape[2:],
            self.upscale_factor,
            output_transform=self.stats.denormalise_output,
        )
        self.last_predictor = predictor
        summed = sliding_window_inference(
            padded,
            roi_size=roi,
            sw_batch_size=self.sw_batch_size,
            predictor=predictor,
            overlap=overlap,
            mode="constant",
            sw_device=self.device,
            device=torch.device("cpu"),
            with_coord=True,
        )
        r = self.upscale_factor
        crop = (slice(None), slice(None)) + (slice(r * VALID_SHRINK, -r * VALID_SHRINK),) * 3
        summed = summed[crop]
        # weighted mean of exact predictions; no weight means no brain nearby, hence 0
        hr = summed[:, :6] / summed[:, 6:7].clamp_min(1e-12)
        log.debug(
            "windows computed %d, skipped %d", predictor.windows_computed, predictor.windows_skipped
        )
        return self._finish(hr, brain_lr)

    @torch.no_grad()
    def whole_volume(self, dt_lr: np.ndarray, brain_lr: np.ndarray | None = None) -> np.ndarray:
        """One pass of the network over the whole padded volume (the reference for the windows)."""
        brain_lr = _brain_or_nonzero(dt_lr, brain_lr)
        padded = self._padded_input(dt_lr, brain_lr)[:, :6].to(self.device)
        return self._finish(self.stats.denormalise_output(self.network(padded)).cpu(), brain_lr)


def _brain_or_nonzero(dt_lr: np.ndarray, brain_lr: np.ndarray | None) -> np.ndarray:
    if brain_lr is None:
        return np.any(np.asarray(dt_lr) != 0, axis=-1)
    return np.asarray(brain_lr, dtype=bool)


def inference_region(mask_lr: np.ndarray) -> np.ndarray:
    """LR voxels to predict: the LR mask grown by one voxel, so partial-brain blocks are covered."""
    cube = np.ones((3, 3, 3), dtype=bool)
    return ndimage.binary_dilation(np.asarray(mask_lr, dtype=bool), structure=cube)


# --------------------------------------------------------------------------- bundle model


def load_network(
    model_path: str | os.PathLike,
    stats: NormalisationStats,
    device: torch.device | str | None = None,
    memory_efficient: bool = False,
) -> torch.nn.Module:
    """ESPCN_RN with the depth and upscale factor recorded in ``stats.extra``, weights loaded."""
    from monai_iqt.networks import ESPCN_RN

    model_path = Path(model_path)
    if not model_path.is_file():
        raise InputError(f"{model_path} does not exist: train the bundle or give --model_path")
    network = ESPCN_RN(
        num_blocks=int(stats.extra.get("num_blocks", 0)),
        memory_efficient=memory_efficient,
        upscale_factor=int(stats.extra.get("upscale_factor", 2)),
    )
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        for key in ("network", "model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        network.load_state_dict(state)
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, UnpicklingError) as error:
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise InputError(
            f"{model_path} is not an ESPCN-RN{network.num_blocks} state dict matching its "
            f"normalisation statistics ({reason})"
        ) from error
    return network.to(device if device is not None else default_device()).eval()


def bundle_window(roi_size: Sequence[int] | int, halo: int) -> tuple[int, ...]:
    """Windows of at least ``4 * halo`` LR voxels, so at least half of each axis is kept.

    ESPCN-RN-N discards ``2 + 6 N`` voxels on each inner side of a window (N = 4: 26), so a
    small window would be mostly halo; the bundle then enlarges the window (one whole-volume
    window for an HCP-size ESPCN-RN4 input) and says so.
    """
    sizes = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(int(s) for s in roi_size)
    enlarged = tuple(s if s <= 0 else max(s, 4 * halo) for s in sizes)
    if enlarged != sizes:
        log.info(
            "windows enlarged from %s to %s LR voxels (network halo %d)", sizes, enlarged, halo
        )
    return enlarged


def make_inferer(
    model_path: str | os.PathLike,
    normalisation_path: str | os.PathLike,
    roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
) -> WholeBrainInferer:
    """The bundle's inferer: weights and normalisation statistics from ``models/``."""
    normalisation_path = Path(normalisation_path)
    if not normalisation_path.is_file():
        raise InputError(
            f"{normalisation_path} does not exist: it is written beside the trained weights"
        )
    try:
        stats = NormalisationStats.load(normalisation_path)
    except (ValueError, TypeError, KeyError) as error:
        raise InputError(
            f"{normalisation_path} is not a normalisation statistics file ({error})"
        ) from error
    network = load_network(model_path, stats, device)
    roi_size = bundle_window(roi_size, network_halo(network))
    return WholeBrainInferer(
        network,
        stats,
        upscale_factor=int(stats.extra.get("upscale_factor", 2)),
        roi_size=roi_size,
        sw_batch_size=sw_batch_size,
        device=device,
    )


# --------------------------------------------------------------------------- inputs


@dataclass
class InferenceInput:
    """One validated LR input: tensor volume (X, Y, Z, 6) in mm^2/s, its affine and brain mask."""

    name: str
    dt_lr: np.ndarray
    affine: np.ndarray
    mask_lr: np.ndarray | None
    source: Path


def _load_image(path: Path, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(f"{path} does not exist ({what})")
    return load_nifti(path)


def _check_finite(path: Path, data: np.ndarray) -> None:
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"{path} contains {bad} NaN or infinite values")


def _load_mask(mask_path: Path, shape: tuple[int, ...], image_path: Path) -> np.ndarray:
    mask_image = _load_image(mask_path, "brain mask")
    if tuple(mask_image.shape[:3]) != tuple(shape) or mask_image.ndim != 3:
        raise InputError(
            f"mask {mask_path} has shape {tuple(mask_image.shape)} but {image_path} has spatial "
            f"shape {tuple(shape)}"
        )
    mask = np.asarray(mask_image.dataobj) > 0
    if not mask.any():
        raise InputError(f"mask {mask_path} is empty")
    return mask


def _find_gradients(path: Path) -> tuple[Path | None, Path | None]:
    """FSL gradient files beside a DWI: ``bvals``/``bvecs`` (HCP) or ``<stem>.bval``/``.bvec``."""
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    found = []
    for names in (
        ("bvals", f"{stem}.bval", f"{stem}.bvals"),
        ("bvecs", f"{stem}.bvec", f"{stem}.bvecs"),
    ):
        found.append(next((path.parent / n for n in names if (path.parent / n).is_file()), None))
    return found[0], found[1]


def load_input(
    path: str | os.PathLike,
    mask: str | os.PathLike | None = None,
    bvals: str | os.PathLike | None = None,
    bvecs: str | os.PathLike | None = None,
    name: str | None = None,
    bmax: float = DEFAULT_BMAX,
) -> InferenceInput:
    """Validate and load an LR tensor NIfTI, or a DWI NIfTI whose tensor is fitted with DIPY.

    A 4D image with 6 volumes and no ``bvals``/``bvecs`` is a tensor image; any other 4D image
    is a DWI and needs its FSL ``bvals`` and ``bvecs`` (given, or beside it); its tensor is
    fitted (DIPY WLS) on the volumes with b <= ``bmax`` (b0 and the b=1000 shell, as in
    preprocessing), inside ``mask`` when given.
    """
    path = Path(path)
    image = _load_image(path, "LR input")
    name = name or path.name.removesuffix(".gz").removesuffix(".nii")
    if image.ndim != 4:
        raise InputError(
            f"{path} has shape {tuple(image.shape)}: expected a 4D image (X, Y, Z, 6 tensor "
            "elements) or a 4D DWI"
        )
    mask_lr = _load_mask(Path(mask), image.shape[:3], path) if mask is not None else None
    is_dwi = bvals is not None or bvecs is not None or image.shape[3] != 6
    if not is_dwi:
        dt = np.asarray(image.dataobj, dtype=np.float32)
        _check_finite(path, dt)
        return InferenceInput(name, dt, image.affine, mask_lr, path)
    found_bvals, found_bvecs = _find_gradients(path)
    bvals_path = Path(bvals) if bvals is not None else found_bvals
    bvecs_path = Path(bvecs) if bvecs is not None else found_bvecs
    if (
        bvals_path is None
        or bvecs_path is None
        or not bvals_path.is_file()
        or not bvecs_path.is_file()
    ):
        missing = " and ".join(
            what
            for what, p in (("bvals", bvals_path), ("bvecs", bvecs_path))
            if p is None or not p.is_file()
        )
        raise InputError(
            f"{path} has {image.shape[3]} volumes, so it is not a 6-element tensor image; as a DWI "
            f"it needs its {missing} (give --bvals/--bvecs; none found beside it)"
        )
    values, vectors = read_gradient_table(bvals_path, bvecs_path, path, image.shape[3], bmax=bmax)
    selected = np.flatnonzero(values <= bmax)  # b0 and the b=1000 shell, as in preprocessing
    # one sequential read (slicing volume by volume re-decompresses a .gz file each time)
    dwi = np.asarray(image.dataobj)[..., selected].astype(np.float32)
    _check_finite(path, dwi)
    log.info("fitting DTI on the DWI input (%d volumes)", selected.size)
    tensor = fit_dti(dwi, values[selected], vectors[selected], mask=mask_lr)
    return InferenceInput(name, tensor, image.affine, mask_lr, path)


def discover_inputs(folder: Path) -> list[Path]:
    """Subject folders holding ``dt_lr.nii.gz`` (the preprocessed layout), sorted."""
    return sorted(p.parent for p in folder.glob("*/dt_lr.nii.gz"))


def check_output_dir(output_dir: str | os.PathLike) -> Path:
    """Prove ``output_dir`` can be made and written, before any compute, without creating it.

    A probe file is written (and removed) in the nearest folder that already exists.
    """
    output_dir = Path(output_dir)
    existing = output_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"output folder {output_dir} is not writable: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise InputError(
            f"output folder {output_dir} is not writable: {error.strerror or error}"
        ) from error
    return output_dir


def warn_voxel_size(affine: np.ndarray, stats: NormalisationStats, path: Path) -> None:
    """Warn when the input's voxel size is far from the LR voxel size the model was trained on."""
    trained = stats.extra.get("lr_voxel_size_mm")
    if trained is None:
        return
    trained = np.broadcast_to(np.asarray(trained, dtype=float), (3,))
    actual = np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))
    if np.any(np.abs(actual - trained) > VOXEL_SIZE_TOLERANCE * trained):
        log.warning(
            "%s has voxels of %s mm but the model was trained on LR voxels of %s mm; "
            "predictions at another resolution are not validated",
            path,
            "x".join(f"{v:.3g}" for v in actual),
            "x".join(f"{v:.3g}" for v in trained),
        )


# --------------------------------------------------------------------------- run


def write_prediction(output_dir: Path, dt_hr: np.ndarray, hr_affine: np.ndarray) -> dict[str, Path]:
    """Write the HR tensor and its MD, FA and colour-FA maps atomically; return the paths."""
    maps = tensor_maps(dt_hr)
    paths = {"dt_hr": save_nifti(output_dir / OUTPUT_NAMES["dt_hr"], dt_hr, hr_affine, np.float32)}
    for key in ("md", "fa", "colour_fa"):
        paths[key] = save_nifti(output_dir / OUTPUT_NAMES[key], maps[key], hr_affine, np.float32)
    return paths


def predict_and_write(
    inferer: WholeBrainInferer, item: InferenceInput, output_dir: Path
) -> dict[str, Path]:
    """Super-resolve one validated input and write its files into ``output_dir``."""
    region = inference_region(item.mask_lr) if item.mask_lr is not None else None
    dt_hr = inferer(item.dt_lr, region)
    hr_affine = hr_affine_from_lr(item.affine, inferer.upscale_factor)
    paths = write_prediction(output_dir, dt_hr, hr_affine)
    log.info("%s -> %s", item.source, output_dir)
    return paths


def run_inference(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_path: str | os.PathLike,
    normalisation_path: str | os.PathLike,
    mask: str | os.PathLike | None = None,
    bvals: str | os.PathLike | None = None,
    bvecs: str | os.PathLike | None = None,
    roi_size: Sequence[int] | int = DEFAULT_ROI_SIZE,
    sw_batch_size: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, Path]]:
    """Validate every input and the output folder, then predict and write each subject.

    ``input`` is an LR tensor NIfTI (optional ``mask``), a DWI NIfTI with ``bvals``/``bvecs``,
    or a folder of subject folders each holding ``dt_lr.nii.gz`` (and ``mask_lr.nii.gz``).
    Returns the written paths per subject name.
    """
    if input is None or str(input) in ("", "None"):
        raise InputError(
            "no input given: pass --input PATH (an LR tensor NIfTI, a DWI or a folder)"
        )
    source = Path(input)
    if source.is_dir():
        folders = discover_inputs(source)
        if not folders:
            raise InputError(f"{source} holds no subject folder with a dt_lr.nii.gz")
        targets = {folder.name: Path(output_dir) / folder.name for folder in folders}
    else:
        targets = {source.name.removesuffix(".gz").removesuffix(".nii"): Path(output_dir)}
    for target in targets.values():
        check_output_dir(target)
    if source.is_dir():
        items = []
        for folder in folders:
            subject_mask = folder / "mask_lr.nii.gz"
            mask_path = subject_mask if subject_mask.is_file() else None
            items.append(load_input(folder / "dt_lr.nii.gz", mask_path, name=folder.name))
    else:
        items = [load_input(source, mask, bvals, bvecs)]
    inferer = make_inferer(model_path, normalisation_path, roi_size, sw_batch_size, device)
    for item in items:
        warn_voxel_size(item.affine, inferer.stats, item.source)
    return {item.name: predict_and_write(inferer, item, targets[item.name]) for item in items}


def bundle_inference(**kwargs) -> dict[str, dict[str, Path]]:
    """The bundle's ``inference``: :func:`run_inference`; bad input exits with code 2."""
    try:
        return run_inference(**kwargs)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
