"""DTI fitting with DIPY's TensorModel on in-memory arrays, in bounded memory, on several cores.

The fit runs over the masked voxels in chunks, so a 1.25 mm HCP brain (about a million
voxels, ~100 volumes) never needs DIPY's float64 working copies of the whole brain at once.
Chunks are fitted by a pool of threads: DIPY's WLS fit spends its time in NumPy's batched
``pinv``/``eigh``, which release the GIL, so threads use the cores without copying the DWI into
other processes (DIPY 1.12's TensorModel.fit has no parallel engine of its own).

Frame: the tensors are in the frame of ``bvecs``. Given the directions of
:func:`preprocessing.gradients.read_gradient_table` (with the image's affine), that is the
image's voxel axes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, common_fit_methods, from_lower_triangular

from preprocessing.errors import InputError
from preprocessing.gradients import B0_THRESHOLD, DEFAULT_BMAX

log = logging.getLogger(__name__)

__all__ = [
    "B0_THRESHOLD",
    "DEFAULT_BMAX",
    "FIT_METHODS",
    "check_fit_method",
    "count_non_positive_definite",
    "default_fit_workers",
    "fit_dti",
    "make_tensor_model",
    "reuse_freed_memory",
]

#: Voxels per DIPY call: ~100 volumes x 2000 voxels x 7 x 8 bytes = 12 MB per pinv temporary,
#: small enough for malloc to reuse (see :func:`reuse_freed_memory`).
CHUNK_VOXELS = 2_000

#: glibc mallopt parameters: blocks up to 32 MB come from the heap (not a fresh mapping each),
#: and up to 128 MB of freed heap is kept for reuse instead of being returned at once.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 128 << 20))
_malloc_tuned = False


def reuse_freed_memory() -> None:
    """Let glibc's malloc reuse freed memory for the fit's per-chunk temporaries (Linux only).

    By default every temporary of a few MB is mapped, zeroed by the kernel and unmapped again;
    with two fitting threads that system time rivals the fit itself (``python -m
    preprocessing.benchmark`` measures the whole preprocessing). Process-wide, once.
    """
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return
    _malloc_tuned = True
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): keep its defaults
        return
    for parameter, value in _MALLOC_SETTINGS:
        mallopt(parameter, value)


#: DIPY TensorModel fit methods usable without extra arguments (IRLS needs a ``fit_type``).
FIT_METHODS: tuple[str, ...] = tuple(name for name in common_fit_methods if name != "IRLS")


def check_fit_method(fit_method: str) -> str:
    """The DIPY fit method name in upper case; one sentence (InputError) if DIPY has no such."""
    name = str(fit_method).upper()
    if name not in FIT_METHODS:
        raise InputError(
            f"--fit-method {fit_method!r} is not a DIPY TensorModel fit method; choose one of "
            f"{', '.join(FIT_METHODS)}."
        )
    return name


def default_fit_workers(processes: int = 1) -> int:
    """Fit threads per process so that ``processes`` processes together use each core once."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, processes))


def make_tensor_model(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    b0_threshold: float = B0_THRESHOLD,
    fit_method: str = "WLS",
) -> TensorModel:
    """DIPY TensorModel for FSL-style ``bvals`` (N,) and ``bvecs`` (N, 3); b < threshold is b0."""
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64).copy()
    bvecs[bvals < b0_threshold] = 0.0  # DIPY treats these as b0 whatever their direction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DIPY warns about b0_threshold > 50 (HCP b0 is b=5)
        gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
    return TensorModel(gtab, fit_method=fit_method)


def fit_dti(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    b0_threshold: float = B0_THRESHOLD,
    fit_method: str = "WLS",
    workers: int = 1,
) -> np.ndarray:
    """Fit a diffusion tensor per voxel and return it as an (X, Y, Z, 6) float32 volume.

    Args:
        dwi: diffusion-weighted signal (X, Y, Z, N), any real dtype.
        bvals: b-values (N,) in s/mm^2.
        bvecs: unit gradient directions (N, 3) in voxel axes (FSL convention); b0 rows ignored.
        mask: voxels to fit (X, Y, Z); all voxels when None. Tensors are zero outside it.
        b0_threshold: volumes with b below it are b0 (HCP b0 volumes have b=5).
        fit_method: DIPY fit method, "WLS" (default) or "OLS", "NLLS", "RESTORE", ...
        workers: threads fitting chunks of voxels at once (the result does not depend on it).

    Returns:
        Tensor elements in mm^2/s in DIPY lower-triangular order (``TENSOR_ELEMENTS``).
    """
    dwi = np.asarray(dwi)
    if dwi.ndim != 4:
        raise ValueError(f"dwi must be 4D (X, Y, Z, N), got shape {dwi.shape}")
    if mask is None:
        mask = np.ones(dwi.shape[:3], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != dwi.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from dwi shape {dwi.shape[:3]}")
    model = make_tensor_model(bvals, bvecs, b0_threshold, fit_method)
    reuse_freed_memory()
    tensors = np.zeros(dwi.shape[:3] + (6,), dtype=np.float32)
    # Fancy indexing by coordinates works on any memory layout (e.g. a volume-major array
    # seen through a transpose) without copying the whole DWI.
    coordinates = np.nonzero(mask)

    def fit_chunk(start: int) -> None:
        chunk = tuple(axis[start : start + CHUNK_VOXELS] for axis in coordinates)
        signal = dwi[chunk].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tensors[chunk] = model.fit(signal).lower_triangular()

    starts = range(0, coordinates[0].size, CHUNK_VOXELS)
    # Each voxel's problem is tiny (N x 7): BLAS threads would only compete with ours.
    with _single_threaded_blas():
        if workers <= 1 or len(starts) <= 1:
            for start in starts:
                fit_chunk(start)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(fit_chunk, starts):  # re-raises a chunk's error
                    pass
    return tensors


def _single_threaded_blas():
    """BLAS/OpenMP limited to one thread while our threads share the cores (no oversubscription)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS keeps its own setting
        from contextlib import nullcontext

        return nullcontext()
    return threadpool_limits(limits=1)


def count_non_positive_definite(tensors: np.ndarray, mask: np.ndarray) -> int:
    """Number of voxels in ``mask`` whose tensor has an eigenvalue <= 0."""
    inside = np.asarray(tensors)[np.asarray(mask, dtype=bool)].astype(np.float64)
    if inside.size == 0:
        return 0
    smallest = np.linalg.eigvalsh(from_lower_triangular(inside))[:, 0]
    return int(np.count_nonzero(smallest <= 0))
