"""Uncertainty in the network: the log-variance head, dropout replayed by the reversible engine,
fixed Monte Carlo dropout masks, and the losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from monai_iqt.engine.memory import SavedTensorTracker, parameter_storages
from monai_iqt.losses import GaussianNLLLoss, build_loss
from monai_iqt.networks import (
    ESPCN,
    ESPCN_RN,
    LOG_VAR_BOUND,
    ChannelDropout3d,
    fixed_dropout_masks,
    split_mean_log_var,
)

BUNDLE_WEIGHTS = Path(__file__).resolve().parents[1] / "bundles/iqt_espcn_rn/models/model.pt"


def _batch(dtype: torch.dtype, batch: int = 3, side: int = 11) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 6, side, side, side, generator=generator, dtype=torch.float64)
    out = (side - 4) * 2
    y = torch.randn(batch, 6, out, out, out, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def test_variance_head_shapes_bound_and_split() -> None:
    torch.manual_seed(0)
    net = ESPCN_RN(1, predict_variance=True)
    assert net.predict_variance and net.dropout_rate == 0.0
    assert "conv3_log_var.weight" in net.state_dict()
    with torch.no_grad():
        net.conv3_log_var.weight.mul_(1e4)  # a wild head: the log-variance stays bounded
        out = net(_batch(torch.float32)[0])
    assert out.shape == (3, 12, 14, 14, 14)
    mean, log_var = split_mean_log_var(out)
    assert torch.equal(mean, out[:, :6]) and torch.equal(log_var, out[:, 6:])
    assert log_var.abs().max() <= LOG_VAR_BOUND and log_var.abs().max() > 9
    assert torch.isfinite(torch.exp(-log_var)).all()
    plain_mean, none = split_mean_log_var(mean)
    assert plain_mean is mean and none is None
    with pytest.raises(ValueError, match="6 \\(mean\\) or 12"):
        split_mean_log_var(out[:, :7])


def test_old_weights_load_without_variance_or_dropout() -> None:
    state = torch.load(BUNDLE_WEIGHTS, weights_only=True)
    num_blocks = len({key.split(".")[2] for key in state if key.startswith("stacks.0.")})
    for dropout_rate in (0.0, 0.3):
        net = ESPCN_RN(num_blocks, predict_variance=False, dropout_rate=dropout_rate)
        net.load_state_dict(state, strict=True)
    assert not any(isinstance(m, ChannelDropout3d) for m in ESPCN_RN(2).modules())
    assert (
        len([m for m in ESPCN_RN(2, dropout_rate=0.1).modules() if isinstance(m, ChannelDropout3d)])
        == 2 + 3 * 2 * 2
    )


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.3", True])
def test_bad_dropout_rate(rate: object) -> None:
    with pytest.raises(ValueError, match=r"dropout_rate must be a number in \[0, 1\)"):
        ESPCN_RN(1, dropout_rate=rate)


def _gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> list:
    """Input gradient then every parameter gradient, the same seed set before the forward."""
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    pred = net(x)
    loss = GaussianNLLLoss()(pred, y) if pred.shape[1] == 12 else nn.functional.mse_loss(pred, y)
    loss.backward()
    return [pred.detach(), x.grad, *(p.grad for p in net.parameters())]


@pytest.mark.parametrize("predict_variance", [False, True])
def test_float64_gradients_with_dropout_equal_plain_autograd(predict_variance: bool) -> None:
    torch.manual_seed(0)
    settings = {"predict_variance": predict_variance, "dropout_rate": 0.3}
    plain = ESPCN_RN(2, memory_efficient=False, **settings).double().train()
    efficient = ESPCN_RN(2, memory_efficient=True, **settings).double().train()
    efficient.load_state_dict(plain.state_dict())
    x, y = _batch(torch.float64)
    expected = _gradients(plain, x, y, seed=5)
    got = _gradients(efficient, x, y, seed=5)
    after_efficient = torch.rand(3)
    assert len(got) == len(list(plain.parameters())) + 2
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g is not None and e is not None, index
        error = torch.linalg.vector_norm(g - e) / torch.linalg.vector_norm(e)
        assert error <= 1e-10, (index, float(error))
    _gradients(plain, x, y, seed=5)  # backward left the caller's random state alone
    torch.testing.assert_close(after_efficient, torch.rand(3), rtol=0, atol=0)
    # dropout really acted: another seed, other masks, other outputs and gradients
    other = _gradients(plain, x, y, seed=6)
    assert not torch.allclose(other[0], expected[0])
    assert not torch.allclose(other[2], expected[2])


def _saved_peak(num_blocks: int) -> int:
    torch.manual_seed(0)
    net = ESPCN_RN(num_blocks, memory_efficient=True, dropout_rate=0.3)
    x, y = _batch(torch.float32, batch=2)
    tracker = SavedTensorTracker(exclude=parameter_storages(net))
    with tracker:
        nn.functional.mse_loss(net(x), y).backward()
    assert tracker.current == 0
    return tracker.peak


def test_memory_flat_in_depth_with_dropout() -> None:
    """Autograd-held bytes at N=32 within 10 % of N=2 (memory-efficient, dropout on; measured
    4.39 MB at both). Besides, the engine keeps one 5056-byte CPU random state per stack."""
    shallow, deep = _saved_peak(2), _saved_peak(32)
    assert deep <= 1.10 * shallow, (shallow, deep)


def _mc_sample(net: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    with torch.no_grad(), fixed_dropout_masks(net, seed):
        return net(x)


def test_fixed_dropout_masks_are_one_deterministic_network() -> None:
    torch.manual_seed(0)
    net = ESPCN_RN(1, dropout_rate=0.5).double().eval()  # float64: equalities to rounding
    halo, r = net.halo, net.upscale_factor  # 8 LR voxels
    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(1, 6, 40, 5, 5, generator=generator, dtype=torch.float64)
    crops = (0, 30), (10, 40)  # LR x ranges of two overlapping crops
    outputs = [_mc_sample(net, volume[:, :, a:b], seed=7) for a, b in crops]
    # LR input voxels i in [18, 21] are at least halo away from both crops' x borders
    first, last = crops[1][0] + halo, crops[0][1] - 1 - halo
    pieces = []
    for (start, _), out in zip(crops, outputs, strict=True):
        lr = slice(first - start - 2, last - start - 2 + 1)  # output LR index = input index - 2
        pieces.append(out[:, :, lr.start * r : lr.stop * r])
    assert pieces[0].shape[2] == 4 * r
    torch.testing.assert_close(pieces[0], pieces[1], rtol=1e-10, atol=1e-12)
    # one mask for every batch element: a batch of the two crops equals the two single calls
    batch = torch.cat([volume[:, :, :30], volume[:, :, 10:]])
    exact = {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(_mc_sample(net, batch, seed=7), torch.cat(outputs), **exact)
    assert torch.equal(_mc_sample(net, volume[:, :, :30], seed=7), outputs[0])
    assert not torch.allclose(_mc_sample(net, volume[:, :, :30], seed=8), outputs[0])
    # outside the context eval mode has no dropout: the network without dropout layers
    no_dropout = ESPCN_RN(1).double().eval()
    no_dropout.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net(volume), no_dropout(volume), rtol=0, atol=0)
        assert not torch.allclose(_mc_sample(net, volume, seed=7), no_dropout(volume))
    assert all(m.mask is None for m in net.modules() if isinstance(m, ChannelDropout3d))


def test_espcn_dropout_and_variance() -> None:
    torch.manual_seed(0)
    net = ESPCN(predict_variance=True, dropout_rate=0.5).train()
    x, _ = _batch(torch.float32, batch=2)
    torch.manual_seed(1)
    first = net(x)
    torch.manual_seed(1)
    assert torch.equal(net(x), first)
    assert not torch.equal(net(x), first)
    assert first.shape == (2, 12, 14, 14, 14)


def test_gaussian_nll_loss_against_torch_and_rmse_on_the_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 12, 4, 4, 4, generator=generator)
    target = torch.randn(2, 6, 4, 4, 4, generator=generator)
    mean, log_var = pred[:, :6], pred[:, 6:]
    expected = nn.functional.gaussian_nll_loss(mean, target, log_var.exp(), eps=0)
    torch.testing.assert_close(build_loss("gaussian_nll")(pred, target), expected)
    # at the bound, float32 stays finite
    extreme = torch.cat([mean, torch.full_like(log_var, -LOG_VAR_BOUND)], dim=1)
    assert torch.isfinite(GaussianNLLLoss()(extreme, target + 1e3))
    rmse = torch.sqrt(nn.functional.mse_loss(mean, target))
    torch.testing.assert_close(build_loss("rmse")(pred, target), rmse)
    torch.testing.assert_close(build_loss("rmse")(mean, target), rmse)
    with pytest.raises(ValueError, match="needs a prediction with 12 channels"):
        build_loss("gaussian_nll")(mean, target)
    with pytest.raises(ValueError, match="one of rmse, gaussian_nll, rmse_nll, got 'l1'"):
        build_loss("l1")
    assert math.isclose(float(expected), float(GaussianNLLLoss()(pred, target)), rel_tol=1e-6)


def test_rmse_nll_gives_the_mean_the_rmse_gradient_and_the_variance_the_nll_gradient() -> None:
    torch.manual_seed(0)
    mean = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64)
    build_loss("rmse_nll")(torch.cat((mean, log_var), 1), target).backward()
    rmse_mean = mean.detach().clone().requires_grad_()
    build_loss("rmse")(rmse_mean, target).backward()
    nll_log_var = log_var.detach().clone().requires_grad_()
    build_loss("gaussian_nll")(torch.cat((mean.detach(), nll_log_var), 1), target).backward()
    torch.testing.assert_close(mean.grad, rmse_mean.grad)
    torch.testing.assert_close(log_var.grad, nll_log_var.grad)
    with pytest.raises(ValueError, match="needs a prediction with 12 channels"):
        build_loss("rmse_nll")(mean, target)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["plain", "memory-efficient"])
def test_detached_variance_head_leaves_the_shared_layers_to_the_mean(memory_efficient) -> None:
    x, y = _batch(torch.float64, batch=2)
    torch.manual_seed(3)
    shared = ESPCN_RN(1, memory_efficient, predict_variance=True).double().train()
    detached = ESPCN_RN(1, memory_efficient, predict_variance=True, detach_variance=True)
    detached.double().train().load_state_dict(shared.state_dict())
    torch.testing.assert_close(detached(x), shared(x))  # the same network at inference
    # Oracle: the RMSE of the mean alone, through the network that shares its features.
    build_loss("rmse")(shared(x), y).backward()
    build_loss("rmse_nll")(detached(x), y).backward()
    for name, parameter in detached.named_parameters():
        reference = dict(shared.named_parameters())[name].grad
        if name.startswith("conv3_log_var"):
            assert not reference.any() and parameter.grad.abs().sum() > 0
        else:
            torch.testing.assert_close(parameter.grad, reference, msg=name)
