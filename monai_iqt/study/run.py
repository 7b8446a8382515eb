"""The whole depth study: every cell, the tables after each, then Fig. 6 and the figures.

:func:`run_study` checks the plan (:mod:`monai_iqt.study.plan`) before anything is written,
evaluates the interpolation baselines on the test subjects, trains and evaluates every
(depth, training-set size, seed) cell in turn (:mod:`monai_iqt.study.cell`) rewriting the tables
after each (:mod:`monai_iqt.study.report`), measures autograd's saved bytes and the step time
against N in both execution modes (``memory_time.json``), and draws ``rmse_vs_depth.png`` and
``memory_time_vs_depth.png`` (:mod:`monai_iqt.figures`). :func:`bundle_study` is the bundle's
entry (``study.json``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_iqt import defaults, evaluation, figures
from monai_iqt.study.cell import evaluate_models, log_cell, read_cell_record, run_cell
from monai_iqt.study.plan import (
    STUDY_RECORD,
    Cell,
    StudyPlan,
    check_inferer_options,
    check_same_training,
    check_settings,
    config_value,
    jsonable,
    unforwarded_settings,
)
from monai_iqt.study.report import (
    CUBIC,
    cubic_means,
    depth_series,
    metrics_rows,
    write_tables,
)
from preprocessing.errors import InputError, exit_on_bad_input
from preprocessing.io import write_json

#: The study's one logger (its log lines keep the name they always had).
log = logging.getLogger("monai_iqt.study")

BASELINES = ("nearest", "trilinear", "cubic")


def run_study(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    test_subjects: Any,
    train_subjects: Any = None,
    depths: Any = (0, 2, 4, 6, 8),
    tvs_sizes: Any = (8, 16, 32),
    train_config: str | os.PathLike = "configs/train.json",
    cell_overrides: Mapping[str, Any] | None = None,
    device: str | None = None,
    interior_radius: int = defaults.INTERIOR_RADIUS,
    inferer_options: Mapping[str, Any] | None = None,
    memory_batch_size: int = defaults.MEMORY_BATCH_SIZE,
    memory_steps: int = defaults.MEMORY_STEPS,
    validation_subjects: Any = None,
    seeds: Any = (0,),
) -> dict[str, Any]:
    """Train and evaluate every (depth, training-set size, seed) cell; write the outputs.

    Args:
        dataset_dir: preprocessed subjects.
        output_dir: the study folder (``cells/``, tables, figures).
        test_subjects: held-out subjects every model is evaluated on (reported, never used
            for a choice).
        train_subjects: ordered training subjects; a cell of size k uses the first k
            (default: every subject of ``dataset_dir`` that is neither validation nor test).
        depths, tvs_sizes: the grid (reversible blocks per stack, training-set sizes).
        train_config: the training bundle config each cell runs.
        cell_overrides: settings passed to every cell's training command.
        device: where evaluation and the memory/time measurement run.
        interior_radius: the metrics' interior definition (LR voxels).
        inferer_options: extra arguments of ``monai_iqt.inferers.make_inferer``.
        memory_batch_size, memory_steps: the Fig. 6 measurement's batch and timed steps.
        validation_subjects: subjects every cell validates on (early stopping, restart
            selection); none: each training subject's ``validation_fraction`` of patches.
        seeds: every cell is trained once per seed (its restarts use seed .. seed + K - 1).

    Returns ``{"rows": metrics rows, "cells": cell records, "files": {name: path}}``.
    Bad settings raise InputError before anything is written.
    """
    cell_overrides = dict(cell_overrides or {})
    if not Path(train_config).is_file():
        raise InputError(f"train_config {train_config} does not exist.")
    splits, depths, tvs_sizes, seeds = check_settings(
        dataset_dir,
        output_dir,
        train_subjects,
        test_subjects,
        depths,
        tvs_sizes,
        cell_overrides,
        validation_subjects,
        seeds,
        config_value(train_config, "num_restarts", 1),
    )
    check_inferer_options(inferer_options or {}, cell_overrides)
    for key in unforwarded_settings(train_config, cell_overrides):
        log.warning("training setting %s is not in cell_overrides: cells keep its default", key)
    plan = StudyPlan(
        dataset_dir=Path(dataset_dir),
        out=Path(output_dir),
        splits=splits,
        settings=jsonable(cell_overrides),
        train_config=Path(train_config),
        device=device,
        evaluation=jsonable(
            {
                "test_subjects": splits.test,
                "interior_radius": int(interior_radius),
                "inferer_options": dict(inferer_options or {}),
            }
        ),
    )
    cells = [Cell(depth, tvs, seed) for tvs in tvs_sizes for depth in depths for seed in seeds]
    finished = {}
    for cell in cells:  # before anything is written: refuse records made with other settings
        record = read_cell_record(plan.cell_dir(cell))
        if record is not None:
            check_same_training(plan.cell_dir(cell), record["training"], plan.training(cell))
            finished[cell] = record
    write_json(
        plan.out / STUDY_RECORD,
        {
            "train_subjects": splits.train,
            "validation_subjects": splits.validation,
            "test_subjects": splits.test,
            "depths": depths,
            "tvs_sizes": tvs_sizes,
            "seeds": seeds,
            "cell_settings": plan.settings,
            "evaluation": plan.evaluation,
        },
    )
    log.info(
        "study: %d cells (depths %s, TVS %s, seeds %s); training subjects %s, validation %s, "
        "test %s",
        len(cells),
        depths,
        tvs_sizes,
        seeds,
        ", ".join(splits.train),
        ", ".join(splits.validation) if splits.validation else "a fraction of training patches",
        ", ".join(splits.test),
    )
    start = time.perf_counter()
    baseline_rows = evaluate_models(dataset_dir, splits.test, {}, BASELINES, interior_radius)
    baseline_seconds = round(time.perf_counter() - start, 1)
    records: list[dict[str, Any]] = []
    for number, cell in enumerate(cells, 1):
        record = run_cell(plan, cell, finished.get(cell))
        records.append(record)
        log_cell(number, len(cells), cell, record)
        write_tables(plan, baseline_rows, records, baseline_seconds)
    start = time.perf_counter()
    memory = measure_memory_time(depths, device, memory_batch_size, memory_steps)
    memory_seconds = round(time.perf_counter() - start, 1)
    log.info("memory and step time per depth measured in %.0f s", memory_seconds)
    files = write_tables(plan, baseline_rows, records, baseline_seconds, memory_seconds)
    rows = metrics_rows(baseline_rows, records)
    files["memory_time_json"] = write_json(plan.out / "memory_time.json", memory)
    files["rmse_vs_depth"] = figures.rmse_vs_depth_figure(
        depth_series(rows), cubic_means(rows), CUBIC, plan.out / "rmse_vs_depth.png"
    )
    files["memory_time_vs_depth"] = figures.memory_time_figure(
        memory, plan.out / "memory_time_vs_depth.png"
    )
    log.info("study written to %s", ", ".join(str(p) for p in files.values()))
    return {"rows": rows, "cells": records, "files": files}


def measure_memory_time(
    depths: Sequence[int], device: str | None, batch_size: int = 2, steps: int = 3
) -> list[dict[str, Any]]:
    """Peak bytes saved by autograd and the median time of one Adam step, per depth and mode
    (the memory benchmark's measures; 11^3 LR patches, a small batch so it takes seconds)."""
    from monai_iqt.benchmark import memory

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = memory.make_batch(device, batch=int(batch_size))
    results = []
    for depth in sorted(depths):
        runs = []
        for memory_efficient in (False, True):
            config = memory.Config(evaluation.model_label(depth), depth, memory_efficient)
            result = memory.Result(config.name, depth, memory_efficient)
            model, optimizer = memory.build(config, device)
            memory.train_step(model, optimizer, x, y)  # lazy initialisation
            result.saved_peak_mb, _ = memory.measure_saved(model, optimizer, x, y)
            runs.append((result, model, optimizer))
        memory.time_alternating(runs, x, y, steps=int(steps), warmup=1)
        for result, _, _ in runs:
            results.append(
                {
                    "depth": depth,
                    "memory_efficient": result.memory_efficient,
                    "saved_peak_bytes": int(round(result.saved_peak_mb * memory.MB)),
                    "median_step_seconds": result.median_s,
                    "batch_size": int(batch_size),
                    "device": str(device),
                }
            )
    return results


@exit_on_bad_input
def bundle_study(**kwargs: Any) -> dict[str, Any]:
    """The bundle's ``run`` entry of ``study.json``: :func:`run_study`, bad input as exit 2."""
    return run_study(**kwargs)
