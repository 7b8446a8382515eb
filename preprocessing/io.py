"""On-disk conventions of monai-iqt: tensor element order, atomic writes, input errors.

Every NIfTI or JSON file the project writes goes through :func:`save_nifti` or
:func:`write_json`, so a crash never leaves a truncated file under its final name.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

#: Order of the 6 unique diffusion tensor elements along the last (NIfTI) or channel (torch)
#: axis: DIPY's lower-triangular order (``dipy.reconst.dti.lower_triangular``). Units mm^2/s.
TENSOR_ELEMENTS: tuple[str, ...] = ("Dxx", "Dxy", "Dyy", "Dxz", "Dyz", "Dzz")


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()


class InputError(ValueError):
    """Bad user input: the message is one sentence naming the file and the problem."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on error.

    The one way this project writes files: a crash never leaves a truncated file under the final
    name, and an existing file stays intact until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep ".nii.gz" so nibabel compresses
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_nifti(
    path: str | os.PathLike,
    data: np.ndarray,
    affine: np.ndarray,
    dtype: type | np.dtype | None = None,
) -> Path:
    """Write ``data`` as a NIfTI file atomically (temporary name in the same folder, renamed)."""
    array = np.asarray(data if dtype is None else data.astype(dtype, copy=False))
    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(array.dtype)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON atomically."""
    return write_text(path, json.dumps(payload, indent=2, default=_jsonable) + "\n")


def load_nifti(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI image (header; data stay on disk); one sentence if it cannot be read."""
    try:
        return nib.load(path)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise InputError(f"{path} cannot be read as NIfTI ({error}).") from error


def read_nifti(path: str | os.PathLike, dtype: type | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The whole image as an array and its affine; one sentence if unreadable or truncated."""
    image = load_nifti(path)
    try:
        data = np.asarray(image.dataobj, dtype=dtype)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise InputError(f"{path} cannot be read: {error}.") from error
    return data, image.affine


def check_finite(path: str | os.PathLike, data: np.ndarray) -> None:
    """One sentence naming ``path`` if ``data`` holds NaN or infinite values."""
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        raise InputError(f"{path} contains {bad} NaN or infinite values.")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
