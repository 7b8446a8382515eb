"""TorchScript: ``torch.jit.script`` compiles every network configuration, and the scripted
network predicts what the eager one does (the model zoo exports by scripting)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from monai_iqt.networks import ESPCN, ESPCN_RN

CASES = {
    "espcn": lambda: ESPCN(),
    "espcn-variance-dropout": lambda: ESPCN(predict_variance=True, dropout_rate=0.3),
    "rn0": lambda: ESPCN_RN(0),
    "rn2": lambda: ESPCN_RN(2),
    "rn4-memory-efficient": lambda: ESPCN_RN(4, memory_efficient=True),
    "rn2-memory-efficient-variance-dropout": lambda: ESPCN_RN(
        2, memory_efficient=True, predict_variance=True, dropout_rate=0.3, detach_variance=True
    ),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@functools.cache
def scripted_pair(case: str) -> tuple[torch.nn.Module, torch.jit.ScriptModule]:
    """An eager network and a scripted copy (its own parameters and BatchNorm buffers), made
    once per case: scripting takes about a second."""
    torch.manual_seed(0)
    eager = CASES[case]()
    return eager, torch.jit.script(copy.deepcopy(eager))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scripted_equals_eager_in_eval_mode(case: str) -> None:
    eager, scripted = scripted_pair(case)
    eager.eval()
    scripted.eval()
    x = torch.randn(2, 6, 7, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = eager(x), scripted(x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= 1e-6


@pytest.mark.parametrize(
    "case", ["rn2-memory-efficient-variance-dropout", "espcn-variance-dropout"]
)
def test_scripted_equals_eager_in_training_mode_with_the_same_dropout_masks(case: str) -> None:
    """Training mode: batch statistics and random dropout masks; the eager memory-efficient
    network runs its reversible engine here (grad enabled), the scripted one the plain path."""
    eager, scripted = scripted_pair(case)
    x = torch.randn(2, 6, 7, 6, 5, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected = eager.train()(x.clone().requires_grad_())
    torch.manual_seed(5)
    actual = scripted.train()(x.clone().requires_grad_())
    assert relative_error(actual.detach(), expected.detach()) <= 1e-6
    torch.manual_seed(6)
    other_masks = scripted(x)
    assert relative_error(other_masks.detach(), expected.detach()) > 1e-2  # dropout is live


def test_scripted_network_refuses_a_wrong_input_in_one_sentence() -> None:
    scripted = torch.jit.script(ESPCN_RN(1))
    with pytest.raises(torch.jit.Error, match="expected 6 input channels, got shape"):
        scripted(torch.randn(1, 4, 7, 7, 7))
    with pytest.raises(torch.jit.Error, match=r"at least 5 LR voxels.*\(1, 6, 4, 7, 7\)"):
        scripted(torch.randn(1, 6, 4, 7, 7))
