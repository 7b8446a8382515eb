"""Benchmark whole-brain inference: sliding windows, one whole-volume pass, 11^3 patch stitching.

``python -m monai_iqt.benchmark inference [--shape 72 87 72] [--num-blocks 0] [--roi-size 96]
[--repeats 3] [--device cpu|cuda]`` builds an HCP-size LR tensor volume with an ellipsoidal
brain, runs the three methods alternately (``--repeats`` rounds, so the machine's load hits
them alike) and prints median seconds, the ratios, LR/HR voxels per second, the largest
difference to the whole-volume pass, and each method's peak RSS measured in a fresh process.
``--dwi [--dwi-shape 145 174 145]`` instead writes an HCP-size int16 DWI (288 volumes) and
prints the peak RSS of its whole inference (volume-by-volume read, DTI fit, super-resolution,
writing) in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_iqt import defaults
from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.inferers import HaloExactInferer, WholeBrainInferer
from monai_iqt.networks import ESPCN_RN
from monai_iqt.weights import file_sha256
from preprocessing import cli

METHODS = ("whole_volume", "sliding_window", "patches_11")


def brain_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LR tensor volume (X, Y, Z, 6) in mm^2/s with an ellipsoidal brain (about 1/3 of the FOV)."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1, 1, n) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    brain = (x / 0.85) ** 2 + (y / 0.85) ** 2 + (z / 0.85) ** 2 <= 1.0
    dt = np.zeros(shape + (6,), dtype=np.float32)
    dt[..., [0, 2, 5]] = 0.7e-3
    dt += rng.normal(0, 0.1e-3, dt.shape).astype(np.float32)
    dt[~brain] = 0
    return dt, brain


def make_inferer(
    num_blocks: int, roi_size: int, sw_batch_size: int, device: str
) -> WholeBrainInferer:
    """An untrained network (speed does not depend on the weights) with plausible statistics."""
    torch.manual_seed(0)
    mean, std = [2e-4, 0, 2e-4, 0, 0, 2e-4], [3e-4] * 6
    stats = NormalisationStats(mean, std, mean, std)
    return WholeBrainInferer(ESPCN_RN(num_blocks), stats, 2, roi_size, sw_batch_size, device)


def run_method(
    name: str, inferer: WholeBrainInferer, dt: np.ndarray, brain: np.ndarray
) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    if name == "whole_volume":
        result = inferer.whole_volume(dt, brain)
    elif name == "sliding_window":
        result = inferer(dt, brain)
    else:
        patches = WholeBrainInferer(
            inferer.network,
            inferer.stats,
            inferer.upscale_factor,
            device=inferer.device,
            inferer=HaloExactInferer(inference_mode="patches"),
        )
        result = patches(dt, brain)
    return time.perf_counter() - start, result


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ru_maxrss would keep the forking parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fresh_process_rss(name: str, args: argparse.Namespace) -> float:
    """Peak RSS of one run of ``name`` in a new interpreter (imports included)."""
    command = [
        sys.executable, "-m", "monai_iqt.benchmark", "inference", "--only", name,
        "--shape", *map(str, args.shape), "--num-blocks", str(args.num_blocks),
        "--roi-size", str(args.roi_size), "--sw-batch-size", str(args.sw_batch_size),
        "--device", args.device,
    ]  # fmt: skip
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_rss_mb"]


def write_hcp_size_dwi(folder: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """An int16 DWI of ``shape`` with HCP's 288 volumes (18 b0, 90 each at b = 1000, 2000,
    3000 s/mm^2), an isotropic-tensor signal in an ellipsoidal brain, and its bvals/bvecs."""
    rng = np.random.default_rng(seed)
    bvals = np.concatenate([np.full(18, 5.0), np.repeat([1000.0, 2000.0, 3000.0], 90)])
    bvecs = rng.standard_normal((288, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvecs[:18] = 0
    np.savetxt(folder / "bvals", bvals[None], fmt="%g")
    np.savetxt(folder / "bvecs", bvecs.T, fmt="%.6f")
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    brain = sum(g**2 for g in grid) <= 0.7
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((*shape, 288))
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    header.set_qform(affine, 1)
    header.set_sform(affine, 1)
    path = folder / "data.nii"
    with open(path, "wb") as stream:  # volume by volume: the benchmark's own memory stays low
        header.write_to(stream)
        stream.write(b"\0" * (int(header.get_data_offset()) - stream.tell()))
        for b in bvals:
            volume = 1000.0 * np.exp(-b * 0.7e-3) * brain + rng.normal(0, 10, shape)
            stream.write(np.clip(volume, 0, None).astype("<i2").tobytes(order="F"))
    return path


def dwi_peak_rss(args: argparse.Namespace) -> None:
    """Peak RSS of DWI inference (fit, super-resolve, write) in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="iqt-dwi-bench-") as tmp:
        folder = Path(tmp)
        data = write_hcp_size_dwi(folder, tuple(args.dwi_shape))
        model_path, stats_path = folder / "model.pt", folder / "normalisation.json"
        torch.manual_seed(0)
        torch.save(ESPCN_RN(args.num_blocks).state_dict(), model_path)
        mean, std = [7e-4, 0, 7e-4, 0, 0, 7e-4], [3e-4] * 6
        extra = {"num_blocks": args.num_blocks, "weights_sha256": file_sha256(model_path)}
        NormalisationStats(mean, std, mean, std, extra).save(stats_path)
        code = (
            "from monai_iqt.inference import run_inference; from monai_iqt.benchmark.inference "
            "import peak_rss_mb; import time, json; t = time.perf_counter(); "
            f"run_inference({str(data)!r}, {str(folder / 'out')!r}, {str(model_path)!r}, "
            f"{str(stats_path)!r}, roi_size={args.roi_size}, device={args.device!r}); "
            "print(json.dumps({'seconds': time.perf_counter() - t, 'peak_rss_mb': peak_rss_mb()}))"
        )
        environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=environment
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
    shape = "x".join(map(str, args.dwi_shape))
    print(
        f"# DWI inference (fresh process, MALLOC_MMAP_THRESHOLD_=65536): int16 {shape}x288 "
        f"(fit on the 108 volumes with b <= 1500), ESPCN-RN{args.num_blocks} untrained, "
        f"HR {'x'.join(str(2 * s) for s in args.dwi_shape)}x6 written with maps"
    )
    print(f"{'method':<16} {'seconds':>9} {'peak RSS MB':>12}")
    print(f"{'dwi_inference':<16} {result['seconds']:9.1f} {result['peak_rss_mb']:12.0f}")
    print(f"peak RSS = {result['peak_rss_mb'] / 1024:.2f} GB (target <= 3 GB)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog="python -m monai_iqt.benchmark inference", description=__doc__)
    parser.add_argument("--shape", type=int, nargs=3, default=(72, 87, 72), help="LR volume")
    parser.add_argument("--num-blocks", type=int, default=0, help="N of ESPCN-RN-N (0: ESPCN)")
    parser.add_argument(
        "--roi-size", type=int, default=defaults.ROI_SIZE, help="largest window (LR voxels)"
    )
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=METHODS, help="run one method once, print peak RSS")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS runs")
    parser.add_argument(
        "--dwi", action="store_true", help="only the DWI row: peak RSS of DWI inference"
    )
    parser.add_argument(
        "--dwi-shape", type=int, nargs=3, default=(145, 174, 145), help="DWI grid (HCP size)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dwi:
        dwi_peak_rss(args)
        return 0
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
        for name in METHODS if round_index % 2 == 0 else METHODS[::-1]:
            seconds, results[name] = run_method(name, inferer, dt, brain)
            times[name].append(seconds)
    rss = {} if args.no_rss else {name: fresh_process_rss(name, args) for name in METHODS}

    median = {name: statistics.median(values) for name, values in times.items()}
    reference = results["whole_volume"]
    scale = float(np.abs(reference).max())
    lr_voxels = int(np.prod(shape))
    hr_voxels = lr_voxels * inferer.upscale_factor**3
    predictor = inferer.last_counts
    label = "ESPCN" if args.num_blocks == 0 else f"ESPCN-RN{args.num_blocks}"
    size = "x".join(map(str, shape))
    print(
        f"# {label}, LR {size}x6 -> HR {'x'.join(str(2 * s) for s in shape)}x6, brain "
        f"{brain.mean():.0%} of the FOV, device {args.device}, torch threads "
        f"{torch.get_num_threads()}, {args.repeats} alternating rounds"
    )
    print(
        f"# sliding window: windows <= {args.roi_size}^3 LR voxels, sw_batch_size "
        f"{args.sw_batch_size}, {predictor.windows_computed} windows computed, "
        f"{predictor.windows_skipped} skipped (no brain), {predictor.voxels_computed} LR voxels "
        f"through the network (whole volume: {np.prod([s + 2 * inferer.halo for s in shape])})"
    )
    print(
        f"{'method':<16} {'median s':>9} {'min s':>8} {'LR vox/s':>10} {'HR vox/s':>10} "
        f"{'max rel diff':>13} {'peak RSS MB':>12}"
    )
    for name in METHODS:
        difference = float(np.abs(results[name] - reference).max()) / scale
        rss_text = f"{rss[name]:12.0f}" if name in rss else f"{'-':>12}"
        print(
            f"{name:<16} {median[name]:9.2f} {min(times[name]):8.2f} "
            f"{lr_voxels / median[name]:10.3g} {hr_voxels / median[name]:10.3g} "
            f"{difference:13.2e} {rss_text}"
        )
    sliding_over_whole = median["sliding_window"] / median["whole_volume"]
    patches_over_sliding = median["patches_11"] / median["sliding_window"]
    print(f"sliding_window / whole_volume = {sliding_over_whole:.2f} (target <= 1.3)")
    print(f"patches_11 / sliding_window   = {patches_over_sliding:.2f} (target >= 5)")
    return 0
