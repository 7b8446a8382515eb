"""On-disk conventions of monai-iqt: tensor element order, atomic writes, NIfTI reading.

Every NIfTI or JSON file the project writes goes through :func:`save_nifti` or
:func:`write_json`, so a crash never leaves a truncated file under its final name.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.openers import Opener
from nibabel.volumeutils import apply_read_scaling

from preprocessing.errors import InputError

#: Order of the 6 unique diffusion tensor elements along the last (NIfTI) or channel (torch)
#: axis: DIPY's lower-triangular order (``dipy.reconst.dti.lower_triangular``). Units mm^2/s;
#: x, y, z are the image's voxel axes (see ``preprocessing.gradients`` for the bvecs frame).
TENSOR_ELEMENTS: tuple[str, ...] = ("Dxx", "Dxy", "Dyy", "Dxz", "Dyz", "Dzz")


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _current_umask()


#: Temporary names are ``.<name>.<pid>.<random>.tmp<suffixes>``: unique per process, and the pid
#: tells which temporaries a dead process left behind (see :func:`remove_stale_temporaries`).
_TMP_MARK = ".tmp"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success, delete it on error.

    The one way this project writes files: a crash never leaves a truncated file under the final
    name, and an existing file stays intact until the new one is complete. The temporary file is
    fsynced before the rename and the folder after it, so a power loss leaves either the old or
    the new file, complete. Files get the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep ".nii.gz" so nibabel compresses
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}.", suffix=f"{_TMP_MARK}{suffix}", dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp_name)
        _fsync_path(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def _fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete temporaries of :func:`atomic_path` in ``folder`` whose writing process has ended.

    Temporaries of live processes (another run writing here) are left alone.
    """
    removed = []
    for candidate in Path(folder).glob(f".*{_TMP_MARK}*"):
        pid = _writer_pid(candidate.name)
        if pid is not None and pid != os.getpid() and _process_alive(pid):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _writer_pid(name: str) -> int | None:
    """The pid in ``.<name>.<pid>.<random>.tmp<suffixes>`` (None for other names)."""
    parts = name.split(".")
    for index in range(len(parts) - 1, 2, -1):
        if parts[index] == _TMP_MARK[1:] and parts[index - 2].isdigit():
            return int(parts[index - 2])
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def check_writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Prove ``folder`` can be made and written before any compute, without creating it.

    One byte is written, fsynced and removed in the nearest folder that exists, so a read-only,
    full or missing-parent location is one sentence (InputError) instead of a late failure.
    """
    folder = Path(folder)
    existing = folder.absolute()
    try:
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        os.stat(existing)
    except OSError as error:
        raise InputError(f"{what} {folder} is not usable: {describe_os_error(error)}.") from error
    if not existing.is_dir():
        raise InputError(f"{what} {folder} is not writable: {existing} is not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as error:
        raise InputError(f"{what} {folder} is not writable: {describe_os_error(error)}.") from error
    return folder


def describe_os_error(error: OSError) -> str:
    """A short reason for an OSError ("No space left on device", "is a symlink loop", ...)."""
    if error.errno == errno.ELOOP:
        return "it is a symlink loop"
    return (error.strerror or str(error)).rstrip(".")


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


def available_memory_bytes() -> int:
    """Memory this process can still take without swapping: the kernel's MemAvailable (or the
    free pages where /proc/meminfo is absent), capped by a cgroup (container) limit if any."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            available = min(available, int(limit) - int(used))
    except OSError:
        pass
    return max(int(available), 0)


def check_fits_in_memory(
    image: nib.Nifti1Image,
    path: str | os.PathLike,
    volumes: int | None = None,
    bytes_per_value: int = 4,
    working_bytes: int = 0,
) -> int:
    """One sentence (InputError) before reading, when ``image``'s header claims more data than fits.

    Needed: ``volumes`` (default all) volumes of the header's spatial shape at ``bytes_per_value``
    (float32: 4) plus ``working_bytes`` (the caller's other arrays), against
    :func:`available_memory_bytes`. Returns the bytes needed.
    """
    shape = tuple(int(n) for n in image.shape)
    spatial = shape[:3]
    count = volumes if volumes is not None else (int(np.prod(shape[3:])) if len(shape) > 3 else 1)
    needed = int(np.prod(spatial, dtype=np.float64) * count * bytes_per_value) + int(working_bytes)
    available = available_memory_bytes()
    if needed > available:
        raise InputError(
            f"{path} has shape {shape}: reading {count} volume(s) of it needs "
            f"{needed / 1e9:.1f} GB of memory but only {available / 1e9:.1f} GB are available."
        )
    return needed


def read_volumes(
    path_or_image: str | os.PathLike | nib.Nifti1Image,
    indices: Sequence[int] | np.ndarray,
    dtype: type | np.dtype = np.float32,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Volumes ``indices`` of a 4D NIfTI as an (X, Y, Z, len(indices)) array, read one at a time.

    Each volume is read through nibabel's dataobj (scaling such as ``scl_slope`` applied) with
    the file kept open, in increasing file order, so a gzipped series is decompressed once and
    never held whole: memory is the output plus one volume. ``transform`` (e.g. a crop) is applied
    to each volume before it is stored. The result is a transposed view of volume-major storage.
    NaN/inf values, a truncated or unreadable file: one sentence naming the file and volume.
    """
    (stack,) = stack_volumes(path_or_image, indices, [transform or _identity], dtype)
    return np.moveaxis(stack, 0, -1)


def _identity(volume: np.ndarray) -> np.ndarray:
    return volume


def iter_volumes(
    path_or_image: str | os.PathLike | nib.Nifti1Image,
    indices: Sequence[int] | np.ndarray,
    dtype: type | np.dtype = np.float32,
) -> Iterator[tuple[int, np.ndarray]]:
    """(position in ``indices``, volume) pairs of a 4D NIfTI, read in increasing file order.

    A file-backed image is streamed from its start in one pass: a reader thread decompresses
    volume after volume (zlib releases the GIL) while the caller works on the previous one, with
    at most a few volumes in flight. Scaling (``scl_slope``/``scl_inter``) is applied as nibabel
    does. Volumes are checked for NaN/inf; a truncated or unreadable file is one sentence.
    """
    image, path = path_or_image, getattr(path_or_image, "get_filename", lambda: None)()
    if not isinstance(image, nib.spatialimages.SpatialImage) or path is not None:
        path = path_or_image if path is None else path
        image = load_nifti(path)
    else:
        path = "the image"
    if len(image.shape) != 4:
        raise InputError(f"{path} has shape {tuple(image.shape)}, but a 4D series is needed.")
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    proxy = image.dataobj
    streamed = isinstance(proxy, nib.arrayproxy.ArrayProxy) and path != "the image"
    volumes = _stream_volumes(path, proxy, indices[order]) if streamed else None
    try:
        for position in order:
            index = int(indices[position])
            if volumes is None:
                raw = image.dataobj[..., index]
            else:
                raw = next(volumes)
            volume = np.asarray(raw, dtype=dtype)
            if not np.isfinite(volume).all():
                raise InputError(f"{path} volume {index} contains NaN or inf values.")
            yield int(position), volume
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise InputError(f"{path} cannot be read: {error}.") from error
    finally:
        if volumes is not None:
            volumes.close()


def _stream_volumes(
    path: str | os.PathLike, proxy: nib.arrayproxy.ArrayProxy, indices: np.ndarray
) -> Iterator[np.ndarray]:
    """Scaled volumes ``indices`` (increasing) of a NIfTI file, decompressed by a reader thread."""
    spatial = tuple(int(n) for n in proxy.shape[:3])
    raw_dtype = np.dtype(proxy.dtype)
    volume_bytes = int(np.prod(spatial)) * raw_dtype.itemsize
    wanted = set(int(i) for i in indices)
    last = int(indices[-1]) if len(indices) else -1
    handoff: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            with Opener(path) as stream:
                stream.seek(proxy.offset)
                skipped = bytearray(volume_bytes)
                for index in range(last + 1):
                    buffer = bytearray(volume_bytes) if index in wanted else skipped
                    got = stream.readinto(buffer)
                    if got != volume_bytes:
                        raise EOFError(
                            f"volume {index} ends after {got} of its {volume_bytes} bytes"
                        )
                    if index in wanted and not put(buffer):
                        return
        except BaseException as error:  # handed to the caller's thread
            put(error)

    reader = threading.Thread(target=read, name="nifti-reader", daemon=True)
    reader.start()
    try:
        for _ in range(len(indices)):
            item = handoff.get()
            if isinstance(item, BaseException):
                raise item
            volume = np.frombuffer(item, dtype=raw_dtype).reshape(spatial, order=proxy.order)
            yield apply_read_scaling(volume, proxy.slope, proxy.inter)
    finally:
        stop.set()
        reader.join()


def stack_volumes(
    path_or_image: str | os.PathLike | nib.Nifti1Image,
    indices: Sequence[int] | np.ndarray,
    transforms: Sequence[Callable[[np.ndarray], np.ndarray]],
    dtype: type | np.dtype = np.float32,
) -> list[np.ndarray]:
    """One volume-major (len(indices), ...) array per transform of each volume, in one pass.

    E.g. the cropped HR volume and its LR block mean, from one decompression of the file.
    """
    count = len(indices)
    if count == 0:
        raise ValueError("no volume indices given")
    outputs: list[np.ndarray | None] = [None] * len(transforms)
    for position, volume in iter_volumes(path_or_image, indices, dtype):
        for k, transform in enumerate(transforms):
            result = transform(volume)
            if outputs[k] is None:
                outputs[k] = np.empty((count,) + result.shape, dtype=result.dtype)
            outputs[k][position] = result
    return outputs  # type: ignore[return-value]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
