"""In-process checks of the training handlers: atomic checkpoints, RNG state, NaN guard, the
validation metric of a variance-predicting network."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EarlyStopping
from ignite.metrics import RootMeanSquaredError

from monai_iqt.losses import build_loss
from monai_iqt.training import (
    FixedNameSaver,
    RandomStates,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    TrainingHistory,
    flat_pred_label,
    negative_metric,
)


class Counter:
    """A checkpointable object whose save can be made to fail mid-write."""

    def __init__(self) -> None:
        self.value = 0
        self.fail = False

    def state_dict(self) -> dict:
        if self.fail:
            return {"value": self.value, "unpicklable": lambda: None}  # torch.save raises
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


def test_a_failed_save_keeps_the_previous_last_checkpoint(tmp_path: Path) -> None:
    counter = Counter()
    engine = Engine(lambda engine, batch: None)
    saver = Checkpoint(
        {"counter": counter, "engine": engine},
        FixedNameSaver("checkpoint_last.pt", tmp_path),
        n_saved=1,
    )
    engine.add_event_handler(Events.EPOCH_COMPLETED, saver)

    @engine.on(Events.EPOCH_STARTED)
    def advance(engine: Engine) -> None:
        counter.value = engine.state.epoch
        counter.fail = engine.state.epoch == 3

    with pytest.raises(Exception):  # noqa: B017 - pickling error type depends on torch
        engine.run([0], max_epochs=3)
    last = tmp_path / "checkpoint_last.pt"
    state = torch.load(last, weights_only=True)
    assert state["counter"]["value"] == 2 and state["engine"]["iteration"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pt"]  # no temp left


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save({"random_states": RandomStates().state_dict()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    RandomStates().load_state_dict(
        torch.load(tmp_path / "rng.pt", weights_only=True)["random_states"]
    )
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_non_finite_loss_stops_before_the_epoch_completes_naming_where() -> None:
    losses = iter([1.0, 0.5, 0.7, float("nan"), 0.1, 0.1])
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses))})
    guard = StopOnNonFiniteLoss("run/checkpoint_last.pt")
    guard.attach(engine)
    completed = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: completed.append(e.state.epoch))
    engine.run([0, 1, 2], max_epochs=2)
    assert completed == [1], "the diverged epoch completed (its checkpoint would be saved)"
    assert engine.state.iteration == 4
    assert isinstance(guard.error, TrainingDiverged)
    message = str(guard.error)
    assert "loss became nan at epoch 2, iteration 1 of 3 (global iteration 4)" in message
    assert "run/checkpoint_last.pt is kept" in message


def test_early_stopping_on_rising_rmse_and_its_state_resumes(tmp_path: Path) -> None:
    scores = iter([0.9, 0.8, 0.85, 0.84, 0.83, 0.5])  # best at epoch 2, then 3 epochs worse
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def score(engine: Engine) -> None:
        engine.state.metrics["val_rmse"] = next(scores)

    stopper = EarlyStopping(patience=3, score_function=negative_metric("val_rmse"), trainer=trainer)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, stopper)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0]))
    trainer.run([0], max_epochs=10)
    assert trainer.state.epoch == 5  # stopped after 3 epochs without improving on 0.8
    assert (stopper.counter, stopper.best_score) == (3, -0.8)

    # Its state goes through a weights-only checkpoint (what resume reads) unchanged.
    torch.save({"early_stopping": stopper.state_dict()}, tmp_path / "last.pt")
    fresh = EarlyStopping(3, negative_metric("val_rmse"), Engine(lambda engine, batch: None))
    fresh.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["early_stopping"])
    assert (fresh.counter, fresh.best_score) == (3, -0.8)


def test_history_with_validation_every_second_epoch_records_nan_between() -> None:
    """``val_interval`` 2: MONAI's ValidationHandler runs the evaluator after epochs 2 and 4;
    the history gives those epochs their own validation RMSE and the others NaN (not the
    previous epoch's value), and the best epoch is one that was validated."""
    from monai.engines import SupervisedEvaluator
    from monai.handlers import ValidationHandler

    network = torch.nn.Conv3d(1, 1, 1)
    data = [{"image": torch.ones(1, 1, 2, 2, 2), "label": torch.zeros(1, 1, 2, 2, 2)}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=network,
        key_val_metric={"val_rmse": RootMeanSquaredError(output_transform=flat_pred_label)},
        decollate=False,
    )
    trainer = Engine(lambda engine, batch: network.weight.data.add_(1.0))  # changes the RMSE
    ValidationHandler(validator=evaluator, interval=2, epoch_level=True).attach(trainer)
    history = TrainingHistory(torch.optim.SGD(network.parameters(), lr=0.1), evaluator)
    history.attach(trainer)
    trainer.run([0], max_epochs=4)
    rmse = [e["val_rmse"] for e in history.epochs]
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3, 4]
    assert np.isnan(rmse[0]) and np.isnan(rmse[2])
    assert np.isfinite(rmse[1]) and np.isfinite(rmse[3]) and rmse[1] != rmse[3]
    assert history.best()["epoch"] in (2, 4)


def test_validation_rmse_scores_only_the_mean_channels() -> None:
    label = torch.randn(2, 6, 3, 3, 3)
    mean = label + 0.5
    log_var = torch.full_like(label, 100.0)  # would dominate any RMSE that included it
    pred, target = flat_pred_label({"pred": torch.cat([mean, log_var], dim=1), "label": label})
    assert torch.sqrt(torch.mean((pred - target) ** 2)).item() == pytest.approx(0.5)
    pred, target = flat_pred_label({"pred": mean, "label": label})  # no variance: all channels
    assert pred.numel() == label.numel()


@pytest.mark.parametrize("name", ["rmse", "gaussian_nll", "rmse_nll"])
def test_losses_and_validation_skip_voxels_without_target(name: str) -> None:
    generator = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 12, 4, 4, 4, dtype=torch.float64, generator=generator)
    pred.requires_grad_()
    target = torch.randn(2, 6, 4, 4, 4, dtype=torch.float64, generator=generator)
    brain = torch.rand(2, 1, 4, 4, 4, generator=generator) < 0.6  # ~40 % of voxels without target
    marked = target.masked_fill(~brain, float("nan"))

    # Oracle: the same loss of the brain voxels alone, gathered into a flat (1, 6, K) batch.
    def brain_only(volume: torch.Tensor) -> torch.Tensor:
        return volume.movedim(1, -1)[brain[:, 0]].T[None]

    expected = build_loss(name)(brain_only(pred), brain_only(target))
    loss = build_loss(name)(pred, marked)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert (pred.grad[:, :6].movedim(1, -1)[~brain[:, 0]] == 0).all()
    assert (pred.grad[:, :6].movedim(1, -1)[brain[:, 0]] != 0).any()
    # Validation scores the mean channels of the same voxels, none of the log-variance ones.
    scored_pred, scored_label = flat_pred_label({"pred": pred.detach(), "label": marked})
    has_target = brain.expand_as(target)
    torch.testing.assert_close(scored_label, target[has_target])
    torch.testing.assert_close(scored_pred, pred.detach()[:, :6][has_target])


@pytest.mark.parametrize("terminal", [True, False])
def test_config_decisions_choose_handlers_by_terminal_and_writer_rank(
    terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules train.json delegates to ``monai_iqt.training.wiring``: writers only on the rank
    writing files, the progress bar and per-iteration lines only on a terminal."""
    from monai_iqt.losses import detached_variance
    from monai_iqt.training import wiring

    monkeypatch.setattr(wiring, "on_terminal", lambda: terminal)  # where wiring looks it up
    sync, handlers, history, writers, bar = ["sync"], ["lr", "validation"], "history", ["w"], ["b"]
    expected = ["sync", "lr", "validation", "history", "w"] + (["b"] if terminal else [])
    assert wiring.trainer_handlers(sync, handlers, history, writers, bar, True) == expected
    assert wiring.trainer_handlers(sync, handlers, history, writers, bar, False) == expected[:4]
    assert wiring.evaluator_handlers(["e"], ["w"], True) == ["e", "w"]
    assert wiring.evaluator_handlers(["e"], ["w"], False) == ["e"]
    log_filter = wiring.stats_iteration_log(3)
    if terminal:
        assert [log_filter(None, i) for i in range(1, 7)] == [False, False, True] * 2
    else:
        assert log_filter is False
    assert wiring.checked_subjects(None) is None
    assert wiring.checked_subjects(["synth001", "synth000"]) == ["synth001", "synth000"]
    assert [detached_variance(name) for name in ("rmse", "gaussian_nll", "rmse_nll")] == [
        False,
        False,
        True,
    ]
