"""Weight initialisation of the ESPCN family: He (the paper's), ICNR for the sub-pixel
convolution, or PyTorch's default.

He et al. (ICCV 2015, "Delving deep into rectifiers") draw each convolution weight from
N(0, 2 / fan_in), fan_in = input channels x kernel volume (their forward-propagation case,
eq. 10), which keeps the activation variance constant through ReLU layers; biases start at
zero. Deeper IQT (Blumberg et al. 2018) trains ESPCN and ESPCN-RN-N with it.

ICNR (Aitken et al. 2017, "Checkerboard artifact free sub-pixel convolution") gives the r^3
sub-pixel kernels of each output channel one He-drawn kernel, so that the first pixel shuffle is
a nearest-neighbour upsampling of a He-initialised convolution: no checkerboard at the start.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

import torch
from monai.networks.utils import icnr_init
from torch import nn

#: Accepted values of the networks' ``init`` argument.
INITS = ("he", "icnr", "default")

he_normal_ = partial(nn.init.kaiming_normal_, mode="fan_in", nonlinearity="relu")


def check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")


@torch.no_grad()
def he_initialise(module: nn.Module) -> None:
    """He-normal (fan_in, ReLU gain) weights and zero biases for every convolution in ``module``;
    BatchNorm keeps PyTorch's weight 1, bias 0."""
    for conv in module.modules():
        if isinstance(conv, nn.Conv3d):
            he_normal_(conv.weight)
            if conv.bias is not None:
                conv.bias.zero_()


@torch.no_grad()
def initialise(
    module: nn.Module, init: str, subpixel_convs: Iterable[nn.Conv3d], upscale_factor: int
) -> None:
    """Apply ``init`` ("he", "icnr" or "default") to the convolutions of ``module``.

    ``subpixel_convs`` are the convolutions whose output is pixel-shuffled by ``upscale_factor``:
    "icnr" initialises them with :func:`monai.networks.utils.icnr_init` (He-normal kernels, each
    repeated for the r^3 sub-pixel positions) and every other convolution as "he"; "default"
    leaves PyTorch's initialisation.
    """
    check_init(init)
    if init == "default":
        return
    he_initialise(module)
    if init == "icnr":
        for conv in subpixel_convs:
            icnr_init(conv, upscale_factor, init=he_normal_)
            if conv.bias is not None:
                conv.bias.zero_()
