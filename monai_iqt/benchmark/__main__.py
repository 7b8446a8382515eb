"""Dispatch ``python -m monai_iqt.benchmark <name> [options]`` to ``monai_iqt.benchmark.<name>``."""

import importlib
import sys

from preprocessing.cli import nearest

BENCHMARKS = {
    "memory": "memory and time of one training step, ESPCN vs ESPCN-RN-N, both modes (Fig. 6)",
    "inference": "whole-brain inference: sliding windows, whole volume, 11^3 patch stitching",
    "step": "CPU training-step speed: eager, torch.compile, channels_last_3d",
    "lesion": "predicted uncertainty over a synthetic lesion against its lesion-free twin",
}
USAGE = f"usage: python -m monai_iqt.benchmark {{{','.join(BENCHMARKS)}}} [options]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nbenchmarks (each takes --help):")
        for name, summary in BENCHMARKS.items():
            print(f"  {name:<10} {summary}")
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        print(USAGE, file=sys.stderr)
        if argv:
            match = nearest(argv[0], BENCHMARKS)
            hint = f"; the nearest benchmark is {match}" if match else ""
            print(f"error: unknown benchmark {argv[0]}{hint}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"monai_iqt.benchmark.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
