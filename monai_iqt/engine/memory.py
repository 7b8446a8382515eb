"""Measuring what autograd holds: bytes of the tensors saved for backward, live and peak.

The reversible engine's claim is about these bytes (activations kept for backward), so the tests
and ``python -m monai_iqt.benchmark memory`` count them the same way, with
``torch.autograd.graph.saved_tensors_hooks``, over unique storages and without the parameters
(they are the model, not activations).
"""

from __future__ import annotations

import torch
from torch import nn


class SavedTensorTracker:
    """Counts bytes of unique storages held by autograd's saved tensors, live and peak.

    Use as a context manager around forward and backward. Storages in ``exclude`` (e.g. the
    parameters, :func:`parameter_storages`) are not counted. Tensors saved while building graphs
    inside a backward pass are seen as well (the hooks are thread-local state that autograd
    carries into backward). Tensors a custom ``autograd.Function`` keeps as plain ``ctx``
    attributes are not seen.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = exclude or set()
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [nbytes, holders]
        self.current = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> object:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or storage.nbytes() == 0:
            return tensor
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Held(self, key, tensor)

    @staticmethod
    def _unpack(packed: object) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._refs[key]

    def __enter__(self) -> SavedTensorTracker:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor and its tracker; releases its count when autograd drops it."""

    __slots__ = ("tracker", "key", "tensor")

    def __init__(self, tracker: SavedTensorTracker, key: int, tensor: torch.Tensor) -> None:
        self.tracker, self.key, self.tensor = tracker, key, tensor

    def __del__(self) -> None:
        self.tracker._release(self.key)


def parameter_storages(model: nn.Module) -> set[int]:
    """Storage pointers of ``model``'s parameters, to exclude from a :class:`SavedTensorTracker`."""
    return {p.untyped_storage().data_ptr() for p in model.parameters()}
