"""Memory-efficient backward for stacks of reversible blocks (Gomez et al. 2017, Algorithm 1).

A :class:`ReversibleSegment` is "optional ESPCN convolution + ReLU (+ dropout), then a stack of
reversible blocks". :func:`run_segment` runs it through one ``torch.autograd.Function`` that
builds no graph in forward and keeps the segment's input and output (the paper's Fig. 3 caches
A^0, A^1, A^2: each segment's input is the previous segment's output, the same storage, and
the first segment's input is the network input, which the caller holds anyway) plus one
half-width tensor, the second block's input half x_b (see "Accuracy" below).

In backward each block, last to first, rebuilds its input from its output *while* building its
graph: ``z = y_a``; ``G(z)`` is evaluated once with grad, giving both ``x_b = y_b - G(z)`` and
G's graph, which is back-propagated and freed; then ``F(x_b)`` once with grad, giving
``x_a = z - F(x_b)`` and F's graph. Every F and G is evaluated twice per training step
(forward, and once in backward), never three times, and at most one F or G graph is alive.
The first block uses its exact input, not a rebuilt one: the network input (first segment) or
``dropout(relu(conv(A)))`` recomputed from the cached A (later segments, same dropout mask),
which the ESPCN convolution's backward needs anyway; that 1^3 or 3^3 convolution is the only
recomputation outside the blocks.

Accuracy: the ESPCN's ReLU outputs entering a stack are sparse (some channels are >95 % exact
zeros at initialisation), and train-mode BatchNorm divides such near-constant channels by their
tiny batch standard deviation, so rounding in a rebuilt x_b near the stack input is amplified.
Keeping the exact x_b of the second block (half a stack width per stack, independent of N)
brings the gradient error back to plain autograd's (the bundle's ``docs/performance.md`` gives
the measured errors).

Mixed precision: forward records the autocast state (device types "cpu" and "cuda": enabled,
dtype, cache) and backward rebuilds under the same state, as ``torch.utils.checkpoint`` does, so
each F and G is recomputed in the precision forward used. The residual stream (the halves, the
stored Y, the reconstruction x_b = y_b - G(z), x_a = z - F(x_b)) keeps the dtype of the segment
input, float32 under autocast, even where F and G return bfloat16 or float16: a stream rounded
to 8 mantissa bits would make the inverse drift (``tests/test_amp.py`` compares the gradient
error with plain autograd's under CPU bfloat16; ``docs/performance.md`` gives the figures).

Dropout: the masks F, G and the stack input drew in forward are replayed in backward. Forward
saves the random state once per segment (``torch.get_rng_state``, plus the CUDA state for CUDA
inputs, as ``torch.utils.checkpoint``'s ``preserve_rng_state`` does); backward redraws all the
segment's masks from it, in forward order, under ``torch.random.fork_rng``, and sets them on the
layers while it rebuilds (:class:`~monai_iqt.engine.dropout.DropoutReplay`). Kept between
forward and backward: one 5056-byte CPU random state per segment (three per network) whatever
N; in backward, transiently, the segment's 2N (+ 1) boolean masks of B x C entries each.

BatchNorm running statistics are updated once per training forward: the rebuild runs with
``track_running_stats`` switched off (:func:`running_stats_frozen`), so BatchNorm still
normalises with the batch statistics but leaves its buffers alone.

Inversion error: rebuilding is exact in exact arithmetic; in float32 each block adds rounding of
about 1e-7 relative, amplified by the Lipschitz constants of F and G, so the error of
``inverse(forward(x))`` grows with depth. Measured on freshly initialised 50-channel blocks
(9^3, relative L2): eval mode (running statistics) 3.8e-7 at 64 blocks; train mode (batch
statistics, which rescale near-constant channels) 8e-7, 2e-6, 6e-6, 2.3e-5 at 8, 16, 32, 64
blocks, roughly N^1.7. ``tests/test_reversible.py`` holds eval mode at 64 blocks and train mode
at 32 blocks within 1e-5. Deeper stacks, or trained weights with larger gains, drift further.
To check a model: :func:`inversion_error` on a real batch, and one batch's gradients against
``memory_efficient=False`` (or a float64 copy); if the drift matters, use fewer blocks per stack
or train in float64.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from monai_iqt.engine.dropout import DropoutReplay


@contextmanager
def running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, training-mode BatchNorm in ``module`` uses batch statistics but does not
    update its running statistics (nor ``num_batches_tracked``)."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


#: Device types whose autocast state the engine records in forward and restores in backward.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


@dataclass(frozen=True)
class AutocastState:
    """The autocast settings in force when a segment ran forward (as ``torch.utils.checkpoint``
    records them), so that backward rebuilds F and G in the same precision."""

    enabled: tuple[bool, ...]
    dtypes: tuple[torch.dtype, ...]
    cache_enabled: bool

    @classmethod
    def current(cls) -> AutocastState:
        return cls(
            tuple(torch.is_autocast_enabled(device) for device in AUTOCAST_DEVICE_TYPES),
            tuple(torch.get_autocast_dtype(device) for device in AUTOCAST_DEVICE_TYPES),
            torch.is_autocast_cache_enabled(),
        )

    @contextmanager
    def restored(self) -> Iterator[None]:
        with ExitStack() as stack:
            for device, enabled, dtype in zip(
                AUTOCAST_DEVICE_TYPES, self.enabled, self.dtypes, strict=True
            ):
                if enabled or torch.is_autocast_enabled(device):
                    stack.enter_context(
                        torch.autocast(
                            device, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled
                        )
                    )
            yield


class ReversibleSegment(nn.Module):
    """View of "optional convolution + ReLU (+ dropout), then reversible blocks" for
    :func:`run_segment`.

    Holds references to modules owned elsewhere (it is not registered as a submodule by
    the networks, so it adds no state-dict keys). Every block must provide ``f`` and ``g``
    modules acting on half of the channels, as :class:`monai_iqt.networks.RevBlock` does.
    Dropout inside the segment must be :class:`~monai_iqt.engine.dropout.ChannelDropout3d`,
    registered in the order it is called (the engine replays the masks in that order).

    ``stream_dtype`` is the dtype of the residual stream through the blocks (default: the
    blocks' parameter dtype); F, G and the convolution compute in their parameters' dtype (or
    autocast's), so a wider stream (float64 for float32 blocks) makes the sums, and hence the
    inverse, exact without changing the convolutions' arithmetic.
    """

    def __init__(
        self,
        conv: nn.Module | None,
        blocks: Sequence[nn.Module],
        dropout: nn.Module | None = None,
        stream_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.dropout = dropout
        self.blocks = nn.ModuleList(blocks)
        self.stream_dtype = stream_dtype

    def stack_input(self, x: torch.Tensor) -> torch.Tensor:
        """``dropout(relu(conv(x)))``, or ``x`` without a convolution, in the stream's dtype."""
        h = x
        if self.conv is not None:
            h = torch.relu(residual(self.conv, x))
            if self.dropout is not None:
                h = self.dropout(h)
        stream_dtype = self.stream_dtype or _parameter_dtype(self.blocks, h.dtype)
        return h.to(stream_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain (autograd-recorded or no-grad) run of the segment."""
        return run_blocks(self.blocks, self.stack_input(x))


def split_halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel halves (views) of a (B, C, ...) tensor; C must be even."""
    half = x.shape[1] // 2
    return x[:, :half], x[:, half:]


def forward_halves(
    block: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reversible block on channel halves: z = x_a + F(x_b); y_b = x_b + G(z); y_a = z.

    The sums keep the dtype of the halves (the stream), also under autocast where F and G
    return bfloat16 or float16: rounding the stream to low precision would make the inverse
    drift. Where the dtypes agree the additions are in place on F's and G's fresh outputs (no
    convolution saves its output), which is safe under autograd and saves two allocations.
    """
    z = residual_add(residual(block.f, x_b), x_a)
    y_b = residual_add(residual(block.g, z), x_b)
    return z, y_b


def _parameter_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    parameter = next(module.parameters(), None)
    return fallback if parameter is None else parameter.dtype


def residual(function: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``function(x)`` computed in the dtype of ``function``'s parameters (or autocast's): the
    stream ``x`` may be wider."""
    return function(x.to(_parameter_dtype(function, x.dtype)))


def residual_add(update: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """``stream + update`` in ``stream``'s dtype, in place on ``update`` when the dtypes agree."""
    if update.dtype == stream.dtype:
        return update.add_(stream)
    return stream + update.to(stream.dtype)


def inverse_halves(
    block: nn.Module, y_a: torch.Tensor, y_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`forward_halves`: x_b = y_b - G(y_a); x_a = y_a - F(x_b), in the
    dtype of Y (float32 under autocast)."""
    x_b = y_b - residual(block.g, y_a).to(y_b.dtype)
    x_a = y_a - residual(block.f, x_b).to(y_a.dtype)
    return x_a, x_b


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Plain (autograd-recorded or no-grad) run of a block stack on a full-channel tensor."""
    if len(blocks) == 0:
        return x
    x_a, x_b = split_halves(x)
    for block in blocks:
        x_a, x_b = forward_halves(block, x_a, x_b)
    return torch.cat((x_a, x_b), dim=1)


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _grad(
    output: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    grad_output: torch.Tensor,
) -> Sequence[torch.Tensor]:
    return torch.autograd.grad(output, inputs, grad_output) if inputs else ()


class _ReversibleSegmentFunction(torch.autograd.Function):
    """Keeps the segment's input and output only; rebuilds activations in backward."""

    @staticmethod
    def forward(ctx, segment: ReversibleSegment, x: torch.Tensor, *params: torch.Tensor):
        ctx.segment = segment
        ctx.params = params
        ctx.autocast = AutocastState.current()
        ctx.dropout = DropoutReplay(segment, x)  # before anything in the segment draws
        blocks = segment.blocks
        x_a, x_b = forward_halves(blocks[0], *split_halves(segment.stack_input(x)))
        second_block_x_b = x_b if len(blocks) > 1 else None  # see the module docstring
        for block in blocks[1:]:
            x_a, x_b = forward_halves(block, x_a, x_b)
        y = torch.cat((x_a, x_b), dim=1)
        ctx.save_for_backward(x, y, second_block_x_b)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, y, second_block_x_b = ctx.saved_tensors
        segment: ReversibleSegment = ctx.segment
        grads: dict[int, torch.Tensor] = {}
        blocks = list(segment.blocks)
        y_a, y_b = split_halves(y)
        gy_a, gy_b = split_halves(grad_y)
        need_x_grad = ctx.needs_input_grad[1]
        with (
            torch.enable_grad(),
            ctx.autocast.restored(),
            ctx.dropout.replayed(),
            running_stats_frozen(segment),
        ):
            for index in range(len(blocks) - 1, 0, -1):
                exact_x_b = second_block_x_b if index == 1 else None
                y_a, y_b, gy_a, gy_b = _block_backward(
                    blocks[index], y_a, y_b, gy_a, gy_b, grads, exact_x_b=exact_x_b
                )
            # First block: use the exact stack input instead of a rebuilt one.
            conv_input = x.detach().requires_grad_(need_x_grad)
            h = segment.stack_input(conv_input)
            _, x_b = split_halves(h.detach())
            need_h_grad = segment.conv is not None or need_x_grad
            gx_a, gx_b = _block_backward(
                blocks[0],
                y_a,
                y_b,
                gy_a,
                gy_b,
                grads,
                exact_x_b=x_b,
                need_x_b_grad=need_h_grad,
                need_x_a=False,
            )[2:]
            grad_x = None
            if need_h_grad:
                grad_h = torch.cat((gx_a, gx_b), dim=1)
                del gx_a, gx_b
                if segment.conv is None:
                    grad_x = grad_h.to(x.dtype)
                else:
                    conv_params = _trainable(segment.conv)
                    inputs = ([conv_input] if need_x_grad else []) + conv_params
                    conv_grads = list(_grad(h, inputs, grad_h))
                    if need_x_grad:
                        grad_x = conv_grads.pop(0)
                    grads.update(zip(map(id, conv_params), conv_grads, strict=True))
        return (None, grad_x, *(grads.get(id(p)) for p in ctx.params))


def _block_backward(
    block: nn.Module,
    y_a: torch.Tensor,
    y_b: torch.Tensor,
    gy_a: torch.Tensor,
    gy_b: torch.Tensor,
    grads: dict[int, torch.Tensor],
    exact_x_b: torch.Tensor | None = None,
    need_x_b_grad: bool = True,
    need_x_a: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1 for one block: returns its rebuilt input (x_a, x_b) and their gradients.

    G's graph is built, used and freed before F's is built, so at most half a block's graph
    is alive. A known ``exact_x_b`` replaces the rebuilt x_b; x_a is None unless ``need_x_a``.
    """
    z = y_a.detach().requires_grad_()
    g_params = _trainable(block.g)
    g_out = residual(block.g, z)
    x_b = exact_x_b if exact_x_b is not None else y_b - g_out.detach().to(y_b.dtype)
    gz, *g_grads = torch.autograd.grad(g_out, [z, *g_params], gy_b.to(g_out.dtype))
    del g_out
    grads.update(zip(map(id, g_params), g_grads, strict=True))
    gz = gz.add_(gy_a)

    x_b = x_b.detach().requires_grad_(need_x_b_grad)
    f_params = _trainable(block.f)
    f_out = residual(block.f, x_b)
    x_a = z.detach() - f_out.detach().to(z.dtype) if need_x_a else None
    f_grads = list(_grad(f_out, ([x_b] if need_x_b_grad else []) + f_params, gz.to(f_out.dtype)))
    del f_out
    gx_b = f_grads.pop(0).add_(gy_b) if need_x_b_grad else None
    grads.update(zip(map(id, f_params), f_grads, strict=True))
    return x_a, x_b.detach(), gz, gx_b


def run_segment(segment: ReversibleSegment, x: torch.Tensor) -> torch.Tensor:
    """Run ``segment`` on ``x`` with the memory-efficient backward (needs at least one block)."""
    if len(segment.blocks) == 0:
        raise ValueError("a reversible segment needs at least one block")
    params = tuple(segment.parameters())
    return _ReversibleSegmentFunction.apply(segment, x, *params)


def inversion_error(blocks: Sequence[nn.Module], x: torch.Tensor) -> float:
    """Relative L2 error of ``inverse(forward(x))`` for a block stack (no running-stat updates)."""
    with torch.no_grad(), running_stats_frozen(nn.ModuleList(blocks)):
        x_a, x_b = split_halves(x)
        for block in blocks:
            x_a, x_b = forward_halves(block, x_a, x_b)
        for block in reversed(blocks):
            x_a, x_b = inverse_halves(block, x_a, x_b)
        rebuilt = torch.cat((x_a, x_b), dim=1)
        return float(torch.linalg.vector_norm(rebuilt - x) / torch.linalg.vector_norm(x))
