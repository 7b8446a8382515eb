"""Dispatch ``python -m monai_iqt.benchmark <name> [options]`` to ``monai_iqt.benchmark.<name>``."""

import importlib
import sys

BENCHMARKS = ("memory", "inference")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in BENCHMARKS:
        print(
            f"usage: python -m monai_iqt.benchmark {{{','.join(BENCHMARKS)}}} [options]",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"monai_iqt.benchmark.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
