"""Reversible blocks and ESPCN-RN-N, the ESPCN deepened by stacks of reversible blocks.

ESPCN-RN-N (Blumberg et al., MICCAI 2018, "Deeper Image Quality Transfer") inserts a stack of N
reversible blocks (Gomez et al., NIPS 2017) before each of the ESPCN's three convolutions. The
network runs either with plain autograd (``memory_efficient=False``, the paper's "Naive") or
with the reversible engine of :mod:`monai_iqt.engine.reversible`, which keeps only the stack
outputs and rebuilds activations in backward; both share one state dict and give the same
predictions and gradients.

Receptive field (for patch-wise inference): each block's F and G hold one zero-padded 3^3
convolution, so every block widens the dependence by 2 LR voxels per side; with three stacks an
output voxel depends on ``halo = 2 + 6 N`` LR voxels on each side of its input voxel (ESPCN
alone: 2). Only the ESPCN's own convolutions are valid, so the output LR grid is still
``valid_shrink = 2`` voxels smaller per side than the input (11^3 -> 7^3 -> 14^3 HR for r=2);
the zero padding inside the blocks makes voxels within ``halo`` of a patch border differ from a
whole-volume pass.
"""

from __future__ import annotations

import torch
from torch import nn

from monai_iqt.engine.dropout import ChannelDropout3d
from monai_iqt.engine.reversible import (
    ReversibleSegment,
    inverse_halves,
    residual_add,
    run_segment,
    running_stats_frozen,
)
from monai_iqt.networks.espcn import (
    ESPCN,
    HIDDEN_CHANNELS,
    VALID_SHRINK,
    check_network_input,
    describe_shape,
)
from monai_iqt.networks.initialisation import he_initialise

#: Residual-stream dtype of the input stack (6 channels, 3 per half). With He-initialised
#: blocks a float32 stream there makes the inverse drift (memory-efficient gradient error 2.6x
#: plain autograd's at N=16, batch 4); float64 sums of the float32 F and G outputs are exact,
#: which brings it to 1.0x, for 6 x 8 bytes per LR voxel and batch element.
INPUT_STACK_STREAM_DTYPE = torch.float64


def receptive_halo(num_blocks: int) -> int:
    """LR voxels on each side an ESPCN-RN-N output voxel depends on: 2 + 6 N (ESPCN: 2)."""
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    return VALID_SHRINK + 6 * num_blocks


class ResidualBottleneck(nn.Module):
    """Pre-activation bottleneck residual function (He et al. 2016), the F and G of a RevBlock:
    BN-ReLU-Conv1^3-BN-ReLU-[Dropout]-Conv3^3 (zero padding 1)-BN-ReLU-Conv1^3, same spatial
    size.

    Args:
        channels: input and output channels.
        hidden_channels: channels of the two inner convolutions (default ``channels``).
        dropout_rate: channel-wise 3D dropout after the middle ReLU; 0 adds no layer.
    """

    def __init__(
        self, channels: int, hidden_channels: int | None = None, dropout_rate: float = 0.0
    ) -> None:
        super().__init__()
        hidden = channels if hidden_channels is None else hidden_channels
        self.norm1 = nn.BatchNorm3d(channels)
        self.conv1 = nn.Conv3d(channels, hidden, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm3d(hidden)
        self.dropout = ChannelDropout3d(hidden, dropout_rate) if dropout_rate > 0 else None
        self.conv2 = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm3d(hidden)
        self.conv3 = nn.Conv3d(hidden, channels, kernel_size=1)

    def parameter_dtype(self) -> torch.dtype:
        """The dtype this function computes in: its first parameter's, as
        :func:`~monai_iqt.engine.reversible.residual` reads it."""
        return self.norm1.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs act on fresh BatchNorm outputs, which BatchNorm's backward never reads.
        x = self.conv1(torch.relu_(self.norm1(x)))
        x = torch.relu_(self.norm2(x))
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.conv2(x)
        return self.conv3(torch.relu_(self.norm3(x)))


class RevBlock(nn.Module):
    """Reversible residual block (Gomez et al. 2017; Fig. 1 of the paper).

    X = [x_a, x_b] split by channels; z = x_a + F(x_b); y_b = x_b + G(z); y_a = z;
    Y = [y_a, y_b]. :meth:`inverse` recovers X from Y exactly up to rounding.

    Args:
        channels: channels of X and Y; must be even (split into two halves).
        hidden_channels: inner width of F and G (default ``channels // 2``).
        dropout_rate: channel-wise 3D dropout inside F and G (see :class:`ResidualBottleneck`).
    """

    def __init__(
        self, channels: int, hidden_channels: int | None = None, dropout_rate: float = 0.0
    ) -> None:
        super().__init__()
        if channels < 2 or channels % 2:
            raise ValueError(
                f"a reversible block splits channels into two halves: channels must be even "
                f"and >= 2, got {channels}"
            )
        self.channels = channels
        half = channels // 2
        self.f = ResidualBottleneck(half, hidden_channels, dropout_rate)
        self.g = ResidualBottleneck(half, hidden_channels, dropout_rate)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.channels:
            raise ValueError(
                f"RevBlock expects a 5D (batch, {self.channels}, x, y, z) tensor, "
                f"got shape {describe_shape(x)}"
            )

    def forward_halves(
        self, x_a: torch.Tensor, x_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z = x_a + F(x_b); y_b = x_b + G(z), in the stream dtype of the halves: the engine's
        :func:`~monai_iqt.engine.reversible.forward_halves` in a form TorchScript compiles."""
        z = residual_add(self.f(x_b.to(self.f.parameter_dtype())), x_a)
        y_b = residual_add(self.g(z.to(self.g.parameter_dtype())), x_b)
        return z, y_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        half = self.channels // 2
        return torch.cat(self.forward_halves(x[:, :half], x[:, half:]), dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """X from Y = forward(X); never updates BatchNorm running statistics."""
        self._check(y)
        half = self.channels // 2
        with running_stats_frozen(self):
            return torch.cat(inverse_halves(self, y[:, :half], y[:, half:]), dim=1)


class ESPCN_RN(ESPCN):  # noqa: N801 - the paper's name
    """ESPCN-RN-N: the 3D ESPCN with a stack of ``num_blocks`` reversible blocks before each of
    its three convolutions (Blumberg et al. 2018, Fig. 3a). ``num_blocks=0`` is the ESPCN.

    The state dict holds ``conv1.*``, ``conv2.*``, ``conv3.*`` (and ``conv3_log_var.*`` with
    ``predict_variance``) as :class:`ESPCN`, and ``stacks.{0,1,2}.{i}.{f,g}.*``; it is the same
    in both modes and whatever the dropout rate, so weights trained in one load into the other.

    Uncertainty: ``predict_variance`` adds the log-variance head of :class:`ESPCN` (output
    (B, 2C, ...), see :func:`~monai_iqt.networks.espcn.split_mean_log_var`); ``dropout_rate``
    adds channel-wise 3D dropout after the ESPCN's hidden ReLUs and after the middle ReLU of
    every F and G. In memory-efficient mode backward replays the forward's dropout masks from
    one random state saved per stack (:mod:`monai_iqt.engine.reversible`), so both modes give
    the same gradients for the same seed.

    ``memory_efficient=True`` uses the reversible engine whenever autograd records (grad enabled
    and an input or parameter requires grad), in train and in eval mode; inference under
    ``torch.no_grad()`` takes the plain path. ``loss.backward()`` works unchanged.

    Precision: the input stack's residual stream is float64 (:data:`INPUT_STACK_STREAM_DTYPE`;
    its F and G still compute in float32), which keeps the memory-efficient gradients as
    accurate as plain autograd's at depth; the other stacks' streams have the parameters' dtype
    (float32 also under autocast, see :mod:`monai_iqt.engine.reversible`).

    Receptive field: an output voxel depends on :attr:`halo` = 2 + 6 N LR voxels on each side
    (the blocks' 3^3 convolutions are zero-padded); the output LR grid is
    :attr:`valid_shrink` = 2 voxels smaller on each side than the input.

    Args:
        num_blocks: N, reversible blocks per stack (>= 0).
        memory_efficient: rebuild activations in backward instead of storing them.
        in_channels: input channels (6 tensor elements).
        upscale_factor: r (>= 1).
        predict_variance: also output a bounded per-voxel log-variance.
        dropout_rate: channel-wise 3D dropout rate in [0, 1); 0 adds no dropout layer.
        init: "he" (the paper's: He-normal fan_in weights of every convolution, the blocks'
            included, zero biases; BatchNorm weight 1, bias 0), "icnr" (He, with ICNR for the
            sub-pixel heads) or "default" (PyTorch's); see :class:`ESPCN`.
        detach_variance: train the log-variance head without shaping the shared layers; see
            :class:`ESPCN`.
    """

    def __init__(
        self,
        num_blocks: int,
        memory_efficient: bool = False,
        in_channels: int = 6,
        upscale_factor: int = 2,
        predict_variance: bool = False,
        dropout_rate: float = 0.0,
        init: str = "he",
        detach_variance: bool = False,
    ) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        if num_blocks > 0 and in_channels % 2:
            raise ValueError(
                f"reversible blocks split channels into two halves: in_channels must be even, "
                f"got {in_channels}"
            )
        super().__init__(
            in_channels=in_channels,
            upscale_factor=upscale_factor,
            predict_variance=predict_variance,
            dropout_rate=dropout_rate,
            init=init,
            detach_variance=detach_variance,
        )
        self.num_blocks = num_blocks
        self.memory_efficient = memory_efficient
        self.input_stream_dtype = INPUT_STACK_STREAM_DTYPE
        widths = (in_channels, *HIDDEN_CHANNELS)
        self.stacks = nn.ModuleList(
            nn.ModuleList(
                RevBlock(width, dropout_rate=self.dropout_rate) for _ in range(num_blocks)
            )
            for width in widths
        )
        if init != "default":
            he_initialise(self.stacks)

    @property
    def halo(self) -> int:
        """LR voxels on each side of an output voxel that it depends on: 2 + 6 N."""
        return receptive_halo(self.num_blocks)

    def segments(self) -> tuple[ReversibleSegment, ...]:
        """The three "(ESPCN convolution + ReLU + dropout,) reversible stack" views the forward
        runs.

        Built from the current modules at every call (a few microseconds), so a swapped module
        (``net.conv1 = fused_conv``, quantisation) is what both execution modes run. The views
        are not submodules and add no state-dict keys.
        """
        convs = (None, self.conv1, self.conv2)
        dropouts = (None, self.dropout1, self.dropout2)
        streams = (INPUT_STACK_STREAM_DTYPE if self.num_blocks else None, None, None)
        return tuple(
            ReversibleSegment(conv, stack, dropout, stream)
            for conv, stack, dropout, stream in zip(
                convs, self.stacks, dropouts, streams, strict=True
            )
        )

    def _records_autograd(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )

    @torch.jit.unused
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden features: through :meth:`segments`, with the reversible engine when
        memory-efficient and autograd records, else plainly."""
        efficient = self.memory_efficient and self.num_blocks > 0 and self._records_autograd(x)
        a = x
        for segment in self.segments():
            a = run_segment(segment, a) if efficient else segment(a)
        return a

    def scripted_features(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`features` on the plain path, written out for TorchScript (which cannot build
        the segment views or run the engine's autograd Function): the same convolutions,
        dropout and residual-stream dtypes, hence the same predictions."""
        a = x
        for index, stack in enumerate(self.stacks):
            if index == 1:
                a = torch.relu(self.conv1(a.to(self.conv1.weight.dtype)))
                if self.dropout1 is not None:
                    a = self.dropout1(a)
            elif index == 2:
                a = torch.relu(self.conv2(a.to(self.conv2.weight.dtype)))
                if self.dropout2 is not None:
                    a = self.dropout2(a)
            x_a, x_b = a, a
            for position, block in enumerate(stack):
                if position == 0:
                    # the stream dtype: float64 into the input stack, else the blocks'
                    stream = self.input_stream_dtype if index == 0 else block.f.parameter_dtype()
                    half = a.shape[1] // 2
                    x_a, x_b = a[:, :half].to(stream), a[:, half:].to(stream)
                x_a, x_b = block.forward_halves(x_a, x_b)
            if self.num_blocks > 0:
                a = torch.cat((x_a, x_b), dim=1)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_network_input(x, self.in_channels, self.min_input_size)
        if torch.jit.is_scripting():
            return self.head(self.scripted_features(x))
        return self.head(self.features(x))
