"""Ways to make a CPU training step faster: eager, ``torch.compile`` and ``channels_last_3d``.

``python -m monai_iqt.benchmark step [--depths 0 2] [--threads 1] [--steps 10]``

More steps in the same minutes is one of the accuracy options for CPU budgets. Each variant
trains the plain (naive) network on one batch of 12 random 11³ LR patches with Adam; the
variants of one depth are timed alternately in one run (this machine is shared: the ratios are
what to compare). ``torch.compile``'s first step, which compiles, is reported apart and left out
of the median.
"""

from __future__ import annotations

import time

import torch

from monai_iqt.benchmark.memory import Result, make_batch, time_alternating, train_step
from monai_iqt.networks import ESPCN_RN
from preprocessing import cli

VARIANTS = ("eager", "compile", "channels_last_3d")


def build(variant: str, num_blocks: int, device: torch.device):
    """The plain network and its optimiser in one of :data:`VARIANTS`."""
    torch.manual_seed(0)
    model = ESPCN_RN(num_blocks, memory_efficient=False).to(device).train()
    if variant == "channels_last_3d":  # weights channels-last: convolutions follow them
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    if variant == "compile":
        model = torch.compile(model)
    return model, optimizer


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m monai_iqt.benchmark step", description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    x, y = make_batch(device)
    print(f"# one Adam step, batch 12 of 11^3 LR patches, plain mode, torch {torch.__version__}")
    print(f"# {args.threads} thread(s), {args.steps} alternating rounds after 2 warm-up rounds")
    print(f"{'model':<12}{'variant':<18}{'first step s':>13}{'median s':>10}{'/ eager':>9}")
    for depth in args.depths:
        runs, first = [], {}
        for variant in VARIANTS:
            model, optimizer = build(variant, depth, device)
            start = time.perf_counter()
            train_step(model, optimizer, x, y)
            first[variant] = time.perf_counter() - start
            runs.append((Result(variant, depth, False), model, optimizer))
        time_alternating(runs, x, y, args.steps, warmup=2)
        eager = runs[0][0].median_s
        for result, _, _ in runs:
            name = "ESPCN" if depth == 0 else f"ESPCN-RN{depth}"
            print(
                f"{name:<12}{result.name:<18}{first[result.name]:>13.2f}{result.median_s:>10.4f}"
                f"{result.median_s / eager:>9.2f}"
            )
    return 0
