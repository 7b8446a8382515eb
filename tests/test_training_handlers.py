"""In-process checks of the training handlers: atomic checkpoints, RNG state, NaN guard, flags."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from monai_iqt.training import (
    AtomicCheckpointSaver,
    RandomStates,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    as_bool,
)
from preprocessing.io import InputError


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
    saver = AtomicCheckpointSaver(
        save_dir=str(tmp_path),
        save_dict={"counter": counter, "engine": engine},
        save_interval=1,
        n_saved=1,
        last_filename="checkpoint_last.pt",
    )
    saver.attach(engine)

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


def test_non_finite_loss_names_epoch_and_iteration() -> None:
    losses = iter([1.0, 0.5, 0.7, float("nan"), 0.1])
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses))})
    StopOnNonFiniteLoss("run/checkpoint_last.pt").attach(engine)
    with pytest.raises(TrainingDiverged) as raised:
        engine.run([0, 1, 2], max_epochs=2)
    message = str(raised.value)
    assert "loss became nan at epoch 2, iteration 1 of 3 (global iteration 4)" in message
    assert "run/checkpoint_last.pt is kept" in message


def test_command_line_flags() -> None:
    assert as_bool("false") is False and as_bool("True") is True and as_bool(False) is False
    with pytest.raises(InputError, match="expected true or false"):
        as_bool("maybe")


def test_early_stopping_on_rising_rmse_and_its_state_resumes() -> None:
    from monai_iqt.training import ResumableEarlyStopHandler, negative_metric

    scores = iter([0.9, 0.8, 0.85, 0.84, 0.83, 0.5])  # best at epoch 2, then 3 epochs worse
    trainer = Engine(lambda engine, batch: None)
    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def score(engine: Engine) -> None:
        engine.state.metrics["val_rmse"] = next(scores)

    stopper = ResumableEarlyStopHandler(
        patience=3, score_function=negative_metric("val_rmse"), trainer=trainer
    )
    stopper.attach(evaluator)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: evaluator.run([0]))
    trainer.run([0], max_epochs=10)
    assert trainer.state.epoch == 5  # stopped after 3 epochs without improving on 0.8
    assert stopper.state_dict() == {"counter": 3, "best_score": -0.8}

    fresh = ResumableEarlyStopHandler(
        patience=3,
        score_function=negative_metric("val_rmse"),
        trainer=Engine(lambda engine, batch: None),
    )
    fresh.load_state_dict({"counter": 2, "best_score": -0.8})
    assert fresh.state_dict() == {"counter": 2, "best_score": -0.8}
