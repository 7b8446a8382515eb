"""Memory and time of one training step: ESPCN vs ESPCN-RN-N, plain vs memory-efficient (Fig. 6).

``python -m monai_iqt.benchmark memory [--device cpu|cuda] [--amp] [--dropout-rate P]
[--json FILE] [--quick]``

Prints the paper's Fig. 6 table (ESPCN, ESPCN-RN4, ESPCN-RN4-Naive; 11^3 LR patches, batch 12,
one Adam step) and a depth sweep N in {0, 1, 2, 4, 8, 16, 32} in both modes, then the ratios
against their targets (memory-efficient saved bytes flat in N, ratio to plain, step time).

Memory:
- *saved*: peak bytes held by autograd over forward and backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` over unique storages, parameters excluded (they
  are the model, not activations). This is the figure the reversible engine changes.
- *RSS*: peak resident set size of a fresh subprocess per configuration that builds the model
  and runs warm-up + measured steps, with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors go
  back to the OS and RSS follows live tensors. It is printed as the step's peak RSS above the
  RSS before the first step; it includes gradients, Adam state and the CPU convolution scratch
  buffers (oneDNN), which are the same in both modes and dominate at small depth.
- on CUDA also ``torch.cuda.max_memory_allocated`` over one step.

``--amp``: forward under ``torch.autocast`` on the device (bfloat16 on CPU, float16 on CUDA),
loss in float32, no gradient scaler (a float16 training run adds one: one multiply of the loss
and one unscale of the gradients, which changes neither memory nor time materially).

Time: median and min of several steps after warm-up, all configurations of a row group measured
alternately in one run (the machine is shared; absolute times are noisy, ratios are not).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from monai_iqt.engine.memory import SavedTensorTracker, parameter_storages
from monai_iqt.networks import ESPCN_RN
from monai_iqt.networks.espcn import HIDDEN_CHANNELS
from preprocessing import cli

PATCH = 11
BATCH = 12
DEPTHS = (0, 1, 2, 4, 8, 16, 32)
QUICK_DEPTHS = (0, 2, 4, 8)
MB = 1e6

TARGET_MEMORY_RATIO_N4 = 0.20
TARGET_FLATNESS_N32_VS_N2 = 1.10
TARGET_TIME_RATIO_N8 = 1.35


@dataclass
class Config:
    name: str
    num_blocks: int
    memory_efficient: bool
    dropout_rate: float = 0.0


@dataclass
class Result:
    name: str
    num_blocks: int
    memory_efficient: bool
    saved_peak_mb: float = 0.0
    saved_end_of_forward_mb: float = 0.0
    rss_step_mb: float | None = None
    cuda_peak_mb: float | None = None
    times_s: list[float] = field(default_factory=list)
    cpu_times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    @property
    def min_s(self) -> float:
        return min(self.times_s) if self.times_s else float("nan")

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else float("nan")


def make_batch(
    device: torch.device, batch: int = BATCH, patch: int = PATCH, upscale_factor: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = (patch - 4) * upscale_factor
    x = torch.randn(batch, 6, patch, patch, patch, generator=generator)
    y = torch.randn(batch, 6, out, out, out, generator=generator)
    return x.to(device), y.to(device)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype of ``--amp``: bfloat16 on CPU, float16 on CUDA."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def build(config: Config, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ESPCN_RN(
        config.num_blocks,
        memory_efficient=config.memory_efficient,
        dropout_rate=config.dropout_rate,
    ).to(device)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1e-4)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    after_forward: Callable[[], None] | None = None,
    amp: bool = False,
) -> None:
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast_dtype(x.device), enabled=amp):
        prediction = model(x)
    loss = nn.functional.mse_loss(prediction.float(), y)
    if after_forward is not None:
        after_forward()
    loss.backward()
    optimizer.step()


def measure_saved(model: nn.Module, optimizer, x, y, amp: bool = False) -> tuple[float, float]:
    """(peak, end-of-forward) MB held by autograd's saved tensors over one training step."""
    tracker = SavedTensorTracker(exclude=parameter_storages(model))
    end_of_forward = []
    with tracker:
        train_step(model, optimizer, x, y, lambda: end_of_forward.append(tracker.current), amp=amp)
    return tracker.peak / MB, end_of_forward[0] / MB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    runs: list[tuple[Result, nn.Module, torch.optim.Optimizer]],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    warmup: int,
    amp: bool = False,
) -> None:
    """Time one step of each model in turn, ``steps`` rounds after ``warmup`` rounds."""
    device = x.device
    for round_index in range(warmup + steps):
        for result, model, optimizer in runs:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, optimizer, x, y, amp=amp)
            _sync(device)
            if round_index >= warmup:
                result.times_s.append(time.perf_counter() - start)
                result.cpu_times_s.append(time.process_time() - start_cpu)


def rss_child(
    num_blocks: int,
    memory_efficient: bool,
    steps: int,
    amp: bool = False,
    dropout_rate: float = 0.0,
) -> float:
    """In this (fresh) process: peak RSS of training steps above the RSS before them, in MB."""
    device = torch.device("cpu")
    model, optimizer = build(Config("", num_blocks, memory_efficient, dropout_rate), device)
    x, y = make_batch(device)
    before = _rss_bytes("VmRSS")
    _reset_peak_rss()
    for _ in range(steps):
        train_step(model, optimizer, x, y, amp=amp)
    return (_rss_bytes("VmHWM") - before) / MB


def _rss_bytes(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_rss(config: Config, steps: int = 2, amp: bool = False) -> float | None:
    """Peak step RSS (MB) of a fresh process, or None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = (
        "import torch, sys; torch.set_num_threads(2);"
        "from monai_iqt.benchmark.memory import rss_child;"
        f"print(rss_child({config.num_blocks}, {config.memory_efficient}, {steps}, {amp}, "
        f"{config.dropout_rate}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip().splitlines()[-1])


@contextmanager
def _cuda_peak(result: Result, device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield
    torch.cuda.synchronize(device)
    result.cuda_peak_mb = (torch.cuda.max_memory_allocated(device) - before) / MB


def run_group(
    configs: list[Config],
    device: torch.device,
    steps: int,
    warmup: int,
    rss: bool,
    amp: bool = False,
) -> list[Result]:
    """Memory of each configuration, then alternating times of all of them."""
    x, y = make_batch(device)
    runs = []
    for config in configs:
        result = Result(config.name, config.num_blocks, config.memory_efficient)
        model, optimizer = build(config, device)
        train_step(model, optimizer, x, y, amp=amp)  # lazy initialisation (Adam state, oneDNN)
        with _cuda_peak(result, device):
            result.saved_peak_mb, result.saved_end_of_forward_mb = measure_saved(
                model, optimizer, x, y, amp=amp
            )
        if rss and device.type == "cpu":
            result.rss_step_mb = measure_rss(config, amp=amp)
        runs.append((result, model, optimizer))
    time_alternating(runs, x, y, steps=steps, warmup=warmup, amp=amp)
    return [result for result, _, _ in runs]


def _activation_mb(channels: int, spatial: int, batch: int = BATCH) -> float:
    return channels * batch * spatial**3 * 4 / MB


def block_graph_mb(channels: int, spatial: int, batch: int = BATCH) -> float:
    """Analytic float32 bytes autograd saves for one block of ``channels`` (F and G together):
    per F (or G) its input, three ReLU outputs and two convolution outputs read by BatchNorm,
    each C/2 wide (inner width C/2): 6 x C/2."""
    return 2 * _activation_mb(6 * (channels // 2), spatial, batch)


def engine_extra_mb(channels: int, spatial: int, batch: int = BATCH) -> float:
    """Analytic peak of the engine over the ESPCN for the widest stack: one F or G graph (half
    of :func:`block_graph_mb`) plus the stack input recomputed for the first block (C)."""
    return block_graph_mb(channels, spatial, batch) / 2 + _activation_mb(channels, spatial, batch)


def _row(result: Result) -> str:
    rss = "-" if result.rss_step_mb is None else f"{result.rss_step_mb:8.1f}"
    cuda = "" if result.cuda_peak_mb is None else f" {result.cuda_peak_mb:9.1f}"
    mode = "memory-efficient" if result.memory_efficient else "plain"
    return (
        f"{result.name:<18} {result.num_blocks:>3} {mode:<17} {result.saved_end_of_forward_mb:9.1f}"
        f" {result.saved_peak_mb:9.1f} {rss:>8}{cuda} {result.median_s:8.3f} {result.min_s:8.3f}"
        f" {result.median_cpu_s:8.3f}"
    )


HEADER = (
    f"{'model':<18} {'N':>3} {'mode':<17} {'fwd-saved':>9} {'peak-saved':>9} {'RSS-step':>8}"
    " {cuda}" + f"{'median s':>8} {'min s':>8} {'cpu s':>8}"
)


def _summary(result: Result) -> dict:
    return asdict(result) | {"median_s": result.median_s, "min_s": result.min_s}


def _print_table(title: str, results: list[Result], device: torch.device) -> None:
    print(f"\n{title}", flush=True)
    cuda = "cuda-peak " if device.type == "cuda" else ""
    print(HEADER.replace("{cuda}", cuda) + "   (memory MB; cpu s = median process CPU time)")
    for result in results:
        print(_row(result))


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m monai_iqt.benchmark memory", description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--amp",
        action="store_true",
        help="forward under autocast: bfloat16 on cpu, float16 on cuda",
    )
    parser.add_argument(
        "--dropout-rate",
        type=float,
        default=0.0,
        help="channel-wise dropout rate of every network (default 0: no dropout layers)",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="N in {0,2,4,8}, fewer steps")
    parser.add_argument(
        "--depths", type=int, nargs="+", help="N of the depth sweep (default 0 1 2 4 8 16 32)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if not 0 <= args.dropout_rate < 1:
        print(f"--dropout-rate must be in [0, 1), got {args.dropout_rate}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rate = args.dropout_rate
    steps = args.steps or (5 if args.quick else 7)
    depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
    if min(depths) < 0:
        print(f"--depths must be >= 0, got {depths}", file=sys.stderr)
        return 2
    rss = not args.no_rss

    precision = f"autocast {autocast_dtype(device)}" if args.amp else "float32"
    print(
        f"batch {BATCH}, LR patch {PATCH}^3, one Adam step, device {device}, {precision}, "
        f"dropout rate {rate}, {args.threads} threads, {steps} timed steps"
    )
    fig6 = run_group(
        [
            Config("ESPCN", 0, False, rate),
            Config("ESPCN-RN4", 4, True, rate),
            Config("ESPCN-RN4-Naive", 4, False, rate),
        ],
        device,
        steps=steps,
        warmup=2,
        rss=rss,
        amp=args.amp,
    )
    _print_table("Fig. 6: ESPCN vs ESPCN-RN4 (memory-efficient) vs ESPCN-RN4-Naive", fig6, device)
    espcn, rn4, naive = fig6
    width, spatial = HIDDEN_CHANNELS[1], PATCH - 2
    # A0, and the second-block halves (the input stack's in float64, its stream dtype)
    kept = (
        2 * _activation_mb(3, PATCH) + _activation_mb(25 + 50, spatial) + _activation_mb(6, PATCH)
    )
    print(
        f"ESPCN-RN4 - ESPCN peak saved: {rn4.saved_peak_mb - espcn.saved_peak_mb:.1f} MB. "
        f"Analytic: one {width}-channel block's rebuilt graph (F+G) "
        f"{block_graph_mb(width, spatial):.1f} MB; this engine holds at most one F or G graph "
        f"plus the stack input, {engine_extra_mb(width, spatial):.1f} MB, plus A0 and the kept "
        f"second-block halves, {kept:.1f} MB, minus the loss's saved tensors after its backward."
    )

    _print_table("Depth sweep (plain and memory-efficient timed alternately per N)", [], device)
    sweep: list[Result] = []
    for depth in depths:
        name = f"ESPCN-RN{depth}" if depth else "ESPCN"
        configs = [Config(name, depth, False, rate)]
        if depth:
            configs.append(Config(name, depth, True, rate))
        for result in run_group(configs, device, steps=steps, warmup=1, rss=rss, amp=args.amp):
            print(_row(result), flush=True)
            sweep.append(result)

    by_key = {(r.num_blocks, r.memory_efficient): r for r in sweep}
    ratios = {
        "memory_efficient_over_plain_saved_N4": (
            rn4.saved_peak_mb / naive.saved_peak_mb,
            TARGET_MEMORY_RATIO_N4,
        ),
        "time_memory_efficient_over_plain_N4": (rn4.median_s / naive.median_s, None),
        "cpu_time_memory_efficient_over_plain_N4": (rn4.median_cpu_s / naive.median_cpu_s, None),
    }
    if (8, True) in by_key:
        me8, plain8 = by_key[(8, True)], by_key[(8, False)]
        ratios["time_memory_efficient_over_plain_N8_median"] = (
            me8.median_s / plain8.median_s,
            TARGET_TIME_RATIO_N8,
        )
        ratios["time_memory_efficient_over_plain_N8_min"] = (me8.min_s / plain8.min_s, None)
        ratios["cpu_time_memory_efficient_over_plain_N8"] = (
            me8.median_cpu_s / plain8.median_cpu_s,
            None,
        )
    if (32, True) in by_key and (2, True) in by_key:
        ratios["saved_memory_efficient_N32_over_N2"] = (
            by_key[(32, True)].saved_peak_mb / by_key[(2, True)].saved_peak_mb,
            TARGET_FLATNESS_N32_VS_N2,
        )
    print("\nRatios (target: at most)")
    for name, (value, target) in ratios.items():
        verdict = (
            ""
            if target is None
            else f"  target <= {target:.2f}: " + ("met" if value <= target else "NOT MET")
        )
        print(f"  {name:<46} {value:6.3f}{verdict}")

    if args.json:
        from preprocessing.io import write_json

        payload = {
            "device": str(device),
            "amp": str(autocast_dtype(device)) if args.amp else None,
            "dropout_rate": rate,
            "batch": BATCH,
            "patch": PATCH,
            "fig6": [_summary(r) for r in fig6],
            "sweep": [_summary(r) for r in sweep],
            "ratios": {name: value for name, (value, _) in ratios.items()},
        }
        write_json(args.json, payload)
    return 0
