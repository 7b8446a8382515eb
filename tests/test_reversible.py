"""The memory-efficient reversible engine against plain autograd (the oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monai_iqt.engine import inversion_error
from monai_iqt.engine.memory import SavedTensorTracker, parameter_storages
from monai_iqt.networks import ESPCN_RN, RevBlock


def _pair(num_blocks: int, dtype: torch.dtype, seed: int = 0) -> tuple[ESPCN_RN, ESPCN_RN]:
    torch.manual_seed(seed)
    plain = ESPCN_RN(num_blocks, memory_efficient=False).to(dtype)
    efficient = ESPCN_RN(num_blocks, memory_efficient=True).to(dtype)
    efficient.load_state_dict(plain.state_dict())
    return plain, efficient


def _batch(dtype: torch.dtype, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, 11, 11, 11, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, 6, 14, 14, 14, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _gradients(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Input gradient then every parameter gradient of an MSE loss, via plain loss.backward()."""
    net.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    nn.functional.mse_loss(net(x), y).backward()
    return [x.grad, *(p.grad for p in net.parameters())]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _randomise_running_stats(net: nn.Module) -> None:
    generator = torch.Generator().manual_seed(2)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm3d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)


@pytest.mark.parametrize("training", [True, False])
def test_float64_gradients_equal_plain_autograd(training: bool) -> None:
    plain, efficient = _pair(2, torch.float64)
    if not training:
        _randomise_running_stats(plain)
        efficient.load_state_dict(plain.state_dict())
    plain.train(training)
    efficient.train(training)
    x, y = _batch(torch.float64)
    expected = _gradients(plain, x, y)
    got = _gradients(efficient, x, y)
    assert len(got) == len(list(plain.parameters())) + 1
    for index, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g is not None and e is not None, index
        assert torch.linalg.vector_norm(e) > 0, index
        assert _relative(g, e) <= 1e-10, (index, _relative(g, e))


def test_engine_records_one_node_per_stack_and_plain_path_without_grad() -> None:
    _, efficient = _pair(1, torch.float32)
    x, _ = _batch(torch.float32, batch=2)
    nodes, todo = [], [efficient(x).grad_fn]
    while todo:
        node = todo.pop()
        if node is not None:
            nodes.append(type(node).__name__)
            todo += [next_node for next_node, _ in node.next_functions]
    assert nodes.count("_ReversibleSegmentFunctionBackward") == 3
    assert not any("BatchNorm" in name for name in nodes)  # no block graph kept in forward
    with torch.no_grad():
        assert efficient(x).grad_fn is None


@pytest.mark.parametrize("num_blocks", [4, pytest.param(16, marks=pytest.mark.slow)])
def test_float32_gradient_error_at_most_1p5_plain(num_blocks: int) -> None:
    """Against a float64 reference of the same weights and batch (train mode)."""
    reference, _ = _pair(num_blocks, torch.float64)
    plain, efficient = _pair(num_blocks, torch.float32)
    x, y = _batch(torch.float64, batch=4)
    expected = torch.cat([g.flatten() for g in _gradients(reference, x, y)])
    errors = {}
    for name, net in (("plain", plain), ("efficient", efficient)):
        got = torch.cat([g.flatten() for g in _gradients(net, x.float(), y.float())])
        errors[name] = _relative(got.double(), expected)
    assert errors["plain"] > 0
    assert errors["efficient"] <= 1.5 * errors["plain"], errors


def test_running_statistics_updated_once_per_training_step() -> None:
    plain, efficient = _pair(2, torch.float64)
    x, y = _batch(torch.float64)
    _gradients(plain, x, y)
    _gradients(efficient, x, y)
    for (key, p), e in zip(
        plain.state_dict().items(), efficient.state_dict().values(), strict=True
    ):
        if "num_batches_tracked" in key:
            assert int(p) == int(e) == 1, key
        elif "running" in key:
            torch.testing.assert_close(e, p, rtol=1e-12, atol=0, msg=key)
    moved = plain.stacks[2][1].g.norm2.running_mean
    assert torch.linalg.vector_norm(moved) > 0  # the statistics really moved


@pytest.mark.parametrize(("training", "num_blocks"), [(False, 64), (True, 32)])
def test_inverse_of_deep_stack_float32(training: bool, num_blocks: int) -> None:
    """Eval mode (non-trivial running statistics) at 64 blocks; train mode, whose batch
    statistics amplify rounding more, at 32 blocks (the docstring of the engine gives 64)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(RevBlock(50) for _ in range(num_blocks)).train(training)
    if not training:
        _randomise_running_stats(blocks)
    x = torch.randn(2, 50, 9, 9, 9)
    error = inversion_error(list(blocks), x)
    assert 0 < error <= 1e-5, error
    assert all(int(b.f.norm1.num_batches_tracked) == 0 for b in blocks)


def _saved_peak(num_blocks: int, memory_efficient: bool) -> int:
    torch.manual_seed(0)
    net = ESPCN_RN(num_blocks, memory_efficient=memory_efficient)
    x, y = _batch(torch.float32, batch=2)
    tracker = SavedTensorTracker(exclude=parameter_storages(net))
    with tracker:
        nn.functional.mse_loss(net(x), y).backward()
    assert tracker.current == 0  # everything saved was released after backward
    return tracker.peak


def test_autograd_held_bytes_flat_in_depth_only_when_memory_efficient() -> None:
    efficient = [_saved_peak(n, True) for n in (1, 2, 4)]
    plain = [_saved_peak(n, False) for n in (1, 2, 4)]
    assert 0 < efficient[0] <= efficient[1]  # N=1 keeps no second-block half (see engine)
    assert efficient[2] == efficient[1], efficient
    per_block = plain[1] - plain[0]
    assert per_block > 0 and plain[2] - plain[1] == 2 * per_block, plain
    assert efficient[2] < 0.2 * plain[2]
