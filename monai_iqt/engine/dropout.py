"""Channel-wise 3D dropout whose masks can be replayed (memory-efficient backward) or fixed
(Monte Carlo dropout inference).

:class:`ChannelDropout3d` has :class:`torch.nn.Dropout3d`'s semantics: in training mode each
(sample, channel) is zeroed with probability ``p`` and the survivors are scaled by 1 / (1 - p);
in eval mode it is the identity. Unlike ``Dropout3d`` it draws its keep-mask apart from applying
it (:meth:`ChannelDropout3d.draw_mask`, a function of the random state, the batch size and the
device only), so that:

- the reversible engine saves the random state once per segment in forward and, in backward,
  redraws every mask of the segment in forward order from that state and sets them on the layers
  before rebuilding: F and G see exactly the forward's masks, with one saved random state per
  segment whatever the depth (see :mod:`monai_iqt.engine.reversible`);
- :func:`fixed_dropout_masks` sets one mask per layer, shared by every batch element and every
  call, which turns one Monte Carlo dropout sample into a deterministic convolutional network
  (so sliding-window inference stays exact per sample).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real

import torch
from torch import nn


def check_dropout_rate(dropout_rate: float) -> float:
    """``dropout_rate`` as a float, or a one-sentence ``ValueError`` unless it lies in [0, 1)."""
    if (
        not isinstance(dropout_rate, Real)
        or isinstance(dropout_rate, bool)
        or not 0 <= dropout_rate < 1
    ):
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
    return float(dropout_rate)


class ChannelDropout3d(nn.Module):
    """Channel-wise 3D dropout (``torch.nn.Dropout3d`` semantics) with replayable masks.

    Args:
        channels: channels of the (B, C, X, Y, Z) input.
        p: probability of zeroing a channel, in (0, 1).

    ``mask`` (bool, broadcastable to (B, C, 1, 1, 1)), when set, is applied in training and in
    eval mode instead of a random draw; the engine and :func:`fixed_dropout_masks` set it.
    """

    mask: torch.Tensor | None  # declared for TorchScript, which cannot infer it from None

    def __init__(self, channels: int, p: float) -> None:
        super().__init__()
        check_dropout_rate(p)
        self.channels = channels
        self.p = float(p)
        self.mask: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, p={self.p}"

    def draws_mask(self) -> bool:
        """True when the next call draws a random mask (training mode, no mask set)."""
        return self.training and self.mask is None and self.p > 0

    def draw_mask(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Keep-mask (batch, C, 1, 1, 1), True with probability 1 - p; it consumes the random
        state of ``device`` (or ``generator``) and depends on nothing else."""
        draws = torch.rand((batch, self.channels, 1, 1, 1), device=device, generator=generator)
        return draws >= self.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.mask
        if keep is None:
            if not self.draws_mask():
                return x
            return self.scaled(x, self.draw_mask(x.shape[0], x.device))
        return self.scaled(x, keep)

    def scaled(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` with the channels ``keep`` drops zeroed and the others scaled by 1 / (1 - p)."""
        return x * (keep.to(device=x.device, dtype=x.dtype) / (1 - self.p))


def dropout_layers(module: nn.Module) -> list[ChannelDropout3d]:
    """The :class:`ChannelDropout3d` layers of ``module`` in registration order (fixed for a
    given architecture; within a reversible segment it is the order of the calls, which the
    engine's replay relies on)."""
    return [m for m in module.modules() if isinstance(m, ChannelDropout3d)]


@contextmanager
def fixed_dropout_masks(network: nn.Module, seed: int) -> Iterator[None]:
    """Within the block, every dropout layer of ``network`` applies one fixed channel mask,
    in eval mode too (Monte Carlo dropout inference).

    One mask per layer, shape (1, C, 1, 1, 1), is drawn from a ``torch.Generator`` seeded with
    ``seed``, in the layers' order: the same for every batch element and every call, so the
    network is one deterministic sample (patch-wise or sliding-window inference stays exact) and
    the same seed gives the same sample. BatchNorm is left as it is (use eval mode for
    inference). The previous masks (usually none) are restored on exit. A network without
    dropout layers is left unchanged.
    """
    generator = torch.Generator().manual_seed(seed)
    layers = dropout_layers(network)
    previous = [layer.mask for layer in layers]
    try:
        for layer in layers:
            layer.mask = layer.draw_mask(1, torch.device("cpu"), generator=generator)
        yield
    finally:
        for layer, mask in zip(layers, previous, strict=True):
            layer.mask = mask


class DropoutReplay:
    """Records, before a forward pass of ``module``, what its backward needs to rebuild the
    forward with the same dropout masks: the random state (CPU, and CUDA for CUDA inputs) and
    which layers will draw a mask; the masks already set (e.g. fixed ones) are kept by reference.

    ``replayed()`` redraws the masks in forward order from that state, under
    ``torch.random.fork_rng`` (the caller's random state is left untouched, as
    ``torch.utils.checkpoint`` does), and sets them on the layers for the rebuild. Held: one
    random state (5 KB on CPU) per record, whatever the depth.
    """

    def __init__(self, module: nn.Module, x: torch.Tensor) -> None:
        layers = dropout_layers(module)
        self.drawing = [layer for layer in layers if layer.draws_mask()]
        self.held = [(layer, layer.mask) for layer in layers if layer.mask is not None]
        self.device = x.device
        self.batch = x.shape[0]
        on_cuda = x.device.type == "cuda"
        self.cpu_state = torch.get_rng_state() if self.drawing else None
        self.cuda_state = torch.cuda.get_rng_state(x.device) if self.drawing and on_cuda else None

    def __bool__(self) -> bool:
        return bool(self.drawing or self.held)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        masks = list(self.held)
        if self.drawing:
            devices = [self.device] if self.cuda_state is not None else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(self.cpu_state)
                if self.cuda_state is not None:
                    torch.cuda.set_rng_state(self.cuda_state, self.device)
                masks += [
                    (layer, layer.draw_mask(self.batch, self.device)) for layer in self.drawing
                ]
        previous = [layer.mask for layer, _ in masks]
        try:
            for layer, mask in masks:
                layer.mask = mask
            yield
        finally:
            for (layer, _), mask in zip(masks, previous, strict=True):
                layer.mask = mask
