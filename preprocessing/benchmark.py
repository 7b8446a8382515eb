"""HCP-size preprocessing benchmark: wall time, CPU time and peak RSS of one subject.

Writes a synthetic 145 x 174 x 145 x 288 float32 subject (about 4 GB of DWI, gzipped) unless
``--workdir`` already holds one, then runs ``python -m preprocessing hcp`` on it in a fresh
process and reports that process's wall time, user/system CPU time and peak RSS (from
``wait4``), against the budget: <= 60 s and <= 3 GB on 2 cores. Exit code 1 if over budget.

    python -m preprocessing.benchmark [--workdir DIR] [--seed 0] [--fit-workers N]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from preprocessing import cli
from preprocessing.hcp_inputs import DIFFUSION_SUBDIR
from preprocessing.layout import RECORD_NAME
from preprocessing.synthetic import HCP_SHAPE, write_synthetic_subject
from preprocessing.tensor_fit import default_fit_workers

WALL_BUDGET_SECONDS = 60.0
RSS_BUDGET_BYTES = 3 * 1024**3
SUBJECT_ID = "hcpsize000"


def run_preprocessing(
    hcp_root: Path, out: Path, fit_workers: int | None = None
) -> dict[str, float]:
    """Run the CLI on ``hcp_root`` in a fresh process; wall/user/sys seconds and peak RSS bytes."""
    command = [sys.executable, "-m", "preprocessing", "hcp", "--hcp-root", str(hcp_root)]
    command += ["--out", str(out), "--overwrite", "--no-progress"]
    if fit_workers is not None:
        command += ["--fit-workers", str(fit_workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        raise SystemExit(f"preprocessing failed with exit code {exit_code}")
    return {
        "wall_s": wall,
        "user_cpu_s": usage.ru_utime,
        "system_cpu_s": usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports kilobytes
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m preprocessing.benchmark", description=__doc__)
    parser.add_argument("--workdir", help="keep/reuse the HCP-size subject here (default: temp)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-workers", type=int, help="passed on (default: one per core)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="iqt-preproc-bench-") as scratch:
        workdir = Path(args.workdir) if args.workdir else Path(scratch)
        hcp_root, out = workdir / "hcp", workdir / "out"
        data = hcp_root / SUBJECT_ID / DIFFUSION_SUBDIR / "data.nii.gz"
        if data.is_file():
            print(f"reusing {data}")
        else:
            started = time.perf_counter()
            write_synthetic_subject(hcp_root, SUBJECT_ID, args.seed, 0, HCP_SHAPE, snr=30.0)
            print(
                f"wrote {data} ({data.stat().st_size / 1e9:.2f} GB gzipped) in "
                f"{time.perf_counter() - started:.0f} s"
            )
        result = run_preprocessing(hcp_root, out, args.fit_workers)
        record = (out / SUBJECT_ID / RECORD_NAME).read_text()
    within = (
        result["wall_s"] <= WALL_BUDGET_SECONDS and result["peak_rss_bytes"] <= RSS_BUDGET_BYTES
    )
    print(f"subject shape        {HCP_SHAPE} x 288 float32 ({_uncompressed_gb():.2f} GB)")
    print(f"wall time            {result['wall_s']:8.1f} s   (budget {WALL_BUDGET_SECONDS:.0f} s)")
    print(f"user CPU time        {result['user_cpu_s']:8.1f} s")
    print(f"system CPU time      {result['system_cpu_s']:8.1f} s")
    budget_gb = RSS_BUDGET_BYTES / 1024**3
    print(
        f"peak RSS             {result['peak_rss_bytes'] / 1024**3:8.2f} GB  "
        f"(budget {budget_gb:.0f} GB)"
    )
    print(f"fit threads          {args.fit_workers or default_fit_workers(1)}")
    print(f"os.cpu_count()       {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print("record seconds       " + _field(record, '"seconds"'))
    print("WITHIN BUDGET" if within else "OVER BUDGET")
    return 0 if within else 1


def _uncompressed_gb() -> float:
    x, y, z = HCP_SHAPE
    return x * y * z * 288 * 4 / 1e9


def _field(text: str, key: str) -> str:
    line = next((line for line in text.splitlines() if line.strip().startswith(key)), "")
    return line.split(":", 1)[-1].strip().rstrip(",")


if __name__ == "__main__":
    sys.exit(main())
