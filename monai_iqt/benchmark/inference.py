"""Benchmark whole-brain inference: sliding windows vs one whole-volume pass vs 11^3 patch stitching.

``python -m monai_iqt.benchmark inference [--shape 72 87 72] [--num-blocks 0] [--roi-size 64]
[--repeats 3] [--device cpu|cuda]`` builds an HCP-size LR tensor volume with an ellipsoidal
brain, runs the three methods alternately (``--repeats`` rounds, so the machine's load hits
them alike) and prints median seconds, the ratios, LR/HR voxels per second, the largest
difference to the whole-volume pass, and each method's peak RSS measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.inference import VALID_SHRINK, WholeBrainInferer
from monai_iqt.networks import ESPCN_RN

METHODS = ("whole_volume", "sliding_window", "patches_11")


def brain_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LR tensor volume (X, Y, Z, 6) in mm^2/s with an ellipsoidal brain filling most of the FOV."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    brain = (x / 0.85) ** 2 + (y / 0.85) ** 2 + (z / 0.85) ** 2 <= 1.0
    dt = np.zeros(shape + (6,), dtype=np.float32)
    dt[..., [0, 2, 5]] = 0.7e-3
    dt += rng.normal(0, 0.1e-3, dt.shape).astype(np.float32)
    dt[~brain] = 0
    return dt, brain


def make_inferer(num_blocks: int, roi_size: int, sw_batch_size: int, device: str):
    torch.manual_seed(0)
    network = ESPCN_RN(num_blocks)
    stats = NormalisationStats(
        [2e-4, 0, 2e-4, 0, 0, 2e-4], [3e-4] * 6, [2e-4, 0, 2e-4, 0, 0, 2e-4], [3e-4] * 6
    )
    return WholeBrainInferer(network, stats, 2, roi_size, sw_batch_size, device)


@torch.no_grad()
def stitch_patches(
    inferer: WholeBrainInferer, dt_lr: np.ndarray, brain: np.ndarray, size: int = 11
) -> np.ndarray:
    """The paper's patch regression: 11^3 LR patches one by one, each giving (size-4)^3 LR outputs."""
    r, out = inferer.upscale_factor, size - 2 * VALID_SHRINK
    padded = inferer._padded_input(dt_lr, brain)  # (1, 7, X+4, Y+4, Z+4), brain in channel 6
    shape = dt_lr.shape[:3]
    # pad the far side so every tile is complete (background, no brain)
    extra = [(-s) % out for s in shape]
    padded = torch.nn.functional.pad(padded, (0, extra[2], 0, extra[1], 0, extra[0]))
    background = inferer.stats.normalise_input(torch.zeros(1, 6, 1, 1, 1, dtype=padded.dtype))
    tail = torch.ones_like(padded[:, :1])
    tail[:, :, : shape[0] + 4, : shape[1] + 4, : shape[2] + 4] = 0
    padded[:, :6] = padded[:, :6] * (1 - tail) + background * tail
    hr = torch.zeros((1, 6, *(r * (s + e) for s, e in zip(shape, extra, strict=True))))
    device = inferer.device
    for i in range(0, shape[0], out):
        for j in range(0, shape[1], out):
            for k in range(0, shape[2], out):
                patch = padded[:, :, i : i + size, j : j + size, k : k + size]
                if not patch[0, 6, 2:-2, 2:-2, 2:-2].any():
                    continue
                y = inferer.network(patch[:, :6].to(device)).cpu()
                hr[:, :, r * i : r * (i + out), r * j : r * (j + out), r * k : r * (k + out)] = y
    hr = hr[:, :, : r * shape[0], : r * shape[1], : r * shape[2]]
    return inferer._finish(hr, brain)


def run_method(
    name: str, inferer: WholeBrainInferer, dt: np.ndarray, brain: np.ndarray
) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    if name == "whole_volume":
        result = inferer.whole_volume(dt, brain)
    elif name == "sliding_window":
        result = inferer(dt, brain)
    else:
        result = stitch_patches(inferer, dt, brain)
    return time.perf_counter() - start, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_iqt.benchmark inference", description=__doc__
    )
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(72, 87, 72), help="LR volume (HCP: 72 87 72)"
    )
    parser.add_argument("--num-blocks", type=int, default=0, help="N of ESPCN-RN-N (0: ESPCN)")
    parser.add_argument(
        "--roi-size", type=int, default=64, help="largest sliding window (LR voxels)"
    )
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--only", choices=METHODS, help="run one method once and print its peak RSS (JSON)"
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS runs")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    dt, brain = brain_volume(shape)
    inferer = make_inferer(args.num_blocks, args.roi_size, args.sw_batch_size, args.device)
    if args.only:
        seconds, _ = run_method(args.only, inferer, dt, brain)
        print(json.dumps({"method": args.only, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}))
        return 0

    times: dict[str, list[float]] = {m: [] for m in METHODS}
    results: dict[str, np.ndarray] = {}
    run_method("sliding_window", inferer, dt, brain)  # warm-up (allocator, oneDNN kernels)
    for round_index in range(args.repeats):
        order = METHODS if round_index % 2 == 0 else METHODS[::-1]
        for name in order:
            seconds, results[name] = run_method(name, inferer, dt, brain)
            times[name].append(seconds)
    rss = {}
    if not args.no_rss:
        for name in METHODS:
            command = [
                sys.executable,
                "-m",
                "monai_iqt.benchmark",
                "inference",
                "--only",
                name,
                "--shape",
                *map(str, shape),
                "--num-blocks",
                str(args.num_blocks),
                "--roi-size",
                str(args.roi_size),
                "--sw-batch-size",
                str(args.sw_batch_size),
                "--device",
                args.device,
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rss[name] = json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]

    median = {name: statistics.median(values) for name, values in times.items()}
    reference = results["whole_volume"]
    scale = float(np.abs(reference).max())
    lr_voxels = int(np.prod(shape))
    hr_voxels = lr_voxels * inferer.upscale_factor**3
    predictor = inferer.last_predictor
    label = "ESPCN" if args.num_blocks == 0 else f"ESPCN-RN{args.num_blocks}"
    print(
        f"# inference benchmark: {label}, LR volume {'x'.join(map(str, shape))}x6 -> HR "
        f"{'x'.join(str(2 * s) for s in shape)}x6, brain {brain.mean():.0%} of the FOV, "
        f"device {args.device}, torch threads {torch.get_num_threads()}, {args.repeats} alternating rounds"
    )
    print(
        f"# sliding window: max {args.roi_size}^3 LR voxels, sw_batch_size {args.sw_batch_size}, "
        f"{predictor.windows_computed} windows computed, {predictor.windows_skipped} skipped (no brain)"
    )
    print(
        f"{'method':<16} {'median s':>9} {'min s':>8} {'LR vox/s':>10} {'HR vox/s':>10} "
        f"{'max rel diff':>13} {'peak RSS MB':>12}"
    )
    for name in METHODS:
        difference = float(np.abs(results[name] - reference).max()) / scale
        rss_text = f"{rss[name]:12.0f}" if name in rss else f"{'-':>12}"
        print(
            f"{name:<16} {median[name]:9.2f} {min(times[name]):8.2f} {lr_voxels / median[name]:10.3g} "
            f"{hr_voxels / median[name]:10.3g} {difference:13.2e} {rss_text}"
        )
    sliding_over_whole = median["sliding_window"] / median["whole_volume"]
    patches_over_sliding = median["patches_11"] / median["sliding_window"]
    print(f"sliding_window / whole_volume = {sliding_over_whole:.2f} (target <= 1.3)")
    print(f"patches_11 / sliding_window   = {patches_over_sliding:.2f} (target >= 5)")
    return 0
