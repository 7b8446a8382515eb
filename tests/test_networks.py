"""ESPCN, RevBlock and ESPCN-RN-N: shapes, receptive field, state dicts, bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch

from monai_iqt.networks import ESPCN, ESPCN_RN, VALID_SHRINK, RevBlock, receptive_halo


@pytest.mark.parametrize("upscale_factor", [2, 3])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_patch_shapes(upscale_factor: int, memory_efficient: bool) -> None:
    x = torch.randn(2, 6, 11, 11, 11, requires_grad=True)
    for net in (
        ESPCN(upscale_factor=upscale_factor),
        ESPCN_RN(1, memory_efficient=memory_efficient, upscale_factor=upscale_factor),
    ):
        out = net(x)
        side = (11 - 2 * VALID_SHRINK) * upscale_factor
        assert out.shape == (2, 6, side, side, side)
        out.sum().backward()  # the shape holds for the backward too
        assert x.grad.shape == x.shape


def test_espcn_is_espcn_rn0() -> None:
    espcn = ESPCN()
    rn0 = ESPCN_RN(0)
    assert list(rn0.state_dict()) == list(espcn.state_dict())
    rn0.load_state_dict(espcn.state_dict())
    x = torch.randn(1, 6, 11, 11, 11)
    torch.testing.assert_close(rn0(x), espcn(x), rtol=0, atol=0)


def test_state_dict_interchange() -> None:
    torch.manual_seed(0)
    plain = ESPCN_RN(2, memory_efficient=False)
    efficient = ESPCN_RN(2, memory_efficient=True)
    assert list(plain.state_dict()) == list(efficient.state_dict())
    assert any(key.startswith("stacks.2.1.g.") for key in plain.state_dict())
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 11, 11, 11)
    plain.eval()
    efficient.eval()
    with torch.no_grad():
        torch.testing.assert_close(efficient(x), plain(x), rtol=0, atol=0)


def _support_along_x(grad: torch.Tensor) -> tuple[int, int]:
    nonzero = grad.abs().sum(dim=(0, 1, 3, 4)).nonzero().flatten()
    return int(nonzero.min()), int(nonzero.max())


@pytest.mark.parametrize("num_blocks", [0, 1])
def test_halo_is_the_receptive_field(num_blocks: int) -> None:
    """The gradient of one output voxel's HR block is non-zero exactly on +-halo LR voxels."""
    torch.manual_seed(0)
    net = ESPCN_RN(num_blocks).double().eval()
    for module in net.modules():  # non-trivial running statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    halo = receptive_halo(num_blocks)
    assert net.halo == halo == 2 + 6 * num_blocks
    side = 2 * halo + 5
    x = torch.randn(1, 6, side, side, side, dtype=torch.float64, requires_grad=True)
    out = net(x)
    lr_index = side // 2 - VALID_SHRINK  # output LR voxel whose centre is input voxel side // 2
    r = net.upscale_factor
    hr_block = slice(lr_index * r, (lr_index + 1) * r)
    out[:, :, hr_block, hr_block, hr_block].sum().backward()
    assert _support_along_x(x.grad) == (side // 2 - halo, side // 2 + halo)


def test_revblock_inverse_and_bad_channels() -> None:
    torch.manual_seed(0)
    block = RevBlock(8).double()
    x = torch.randn(2, 8, 5, 5, 5, dtype=torch.float64)
    y = block(x)
    assert not torch.allclose(y, x)
    before = block.f.norm1.num_batches_tracked.clone()
    torch.testing.assert_close(block.inverse(y), x, rtol=1e-12, atol=1e-12)
    assert torch.equal(block.f.norm1.num_batches_tracked, before)  # inverse updates no stats
    with pytest.raises(ValueError, match="channels must be even"):
        RevBlock(5)
    with pytest.raises(ValueError, match="5D"):
        block(torch.randn(2, 8, 5, 5))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 0"):
        ESPCN_RN(-1)
    with pytest.raises(ValueError, match="upscale_factor must be an integer >= 1"):
        ESPCN_RN(2, upscale_factor=0)
    with pytest.raises(ValueError, match="upscale_factor must be an integer >= 1"):
        ESPCN(upscale_factor=0)
    with pytest.raises(ValueError, match="in_channels must be even"):
        ESPCN_RN(2, in_channels=5)
    ESPCN_RN(0, in_channels=5)  # no split without blocks: any channel count works
    net = ESPCN_RN(1, memory_efficient=True)
    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(6, 11, 11, 11))
    with pytest.raises(ValueError, match="6 input channels"):
        net(torch.randn(1, 4, 11, 11, 11))
    with pytest.raises(ValueError, match="at least 5 LR voxels"):
        net(torch.randn(1, 6, 4, 11, 11))


def test_swapped_module_runs_in_both_modes() -> None:
    """A module replaced after construction is the one both execution modes run."""
    torch.manual_seed(0)
    plain = ESPCN_RN(1, memory_efficient=False)
    efficient = ESPCN_RN(1, memory_efficient=True)
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 11, 11, 11)
    before = efficient(x).detach()  # grad enabled: the memory-efficient path
    new_conv = torch.nn.Conv3d(6, 50, kernel_size=3)
    plain.conv1 = new_conv
    efficient.conv1 = copy.deepcopy(new_conv)
    outputs = []
    for net in (plain, efficient):
        x_grad = x.clone().requires_grad_()
        out = net(x_grad)
        out.square().mean().backward()
        outputs.append((out.detach(), x_grad.grad, net.conv1.weight.grad))
    assert not torch.allclose(outputs[1][0], before)
    for got, expected in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _std_within_sampling(weight: torch.Tensor, expected_std: float) -> bool:
    weight = weight.detach().double()
    tolerance = 5 / (2 * weight.numel()) ** 0.5  # 5 sampling standard errors of a std
    return abs(float(weight.std()) / expected_std - 1) <= tolerance


def test_he_initialisation_is_the_default() -> None:
    """Every convolution N(0, 2 / fan_in) (He et al. 2015, the paper's), biases zero."""
    torch.manual_seed(0)
    net = ESPCN_RN(1)
    convs = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d)}
    assert len(convs) == 3 + 3 * 2 * 3
    for name, conv in convs.items():
        weight = conv.weight.detach()
        fan_in = weight[0].numel()  # input channels x kernel volume
        assert _std_within_sampling(weight, (2 / fan_in) ** 0.5), name
        assert abs(float(weight.mean())) <= 5 * (2 / fan_in / weight.numel()) ** 0.5, name
        assert conv.bias is None or not conv.bias.any(), name
    pytorch_default = ESPCN_RN(1, init="default").conv1.weight  # uniform, std sqrt(1/(3 fan_in))
    assert _std_within_sampling(pytorch_default, (1 / (3 * 6 * 27)) ** 0.5)


def test_icnr_gives_identical_sub_pixel_kernels() -> None:
    torch.manual_seed(0)
    r = 2
    for net in (ESPCN(init="icnr"), ESPCN_RN(1, init="icnr")):
        kernels = net.conv3.weight.detach().reshape(6, r**3, -1)  # pixelshuffle's channel order
        assert torch.equal(kernels, kernels[:, :1].expand_as(kernels))
        assert not torch.equal(kernels[0, 0], kernels[1, 0])
        # one constant LR input gives r^3 equal HR voxels in every block
        out = net(torch.ones(1, 6, 5, 5, 5)).detach()
        assert out.shape == (1, 6, 2, 2, 2)
        torch.testing.assert_close(out, out[:, :, :1, :1, :1].expand_as(out), rtol=0, atol=0)
    he = ESPCN().conv3.weight.detach().reshape(6, r**3, -1)
    assert not torch.equal(he[:, 0], he[:, 1])


def test_bad_init() -> None:
    with pytest.raises(ValueError, match="init must be one of he, icnr, default"):
        ESPCN_RN(1, init="xavier")
