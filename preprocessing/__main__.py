"""Command line of the DIPY stage: ``python -m preprocessing {hcp,synthetic} ...``.

Exit codes: 0 success, 2 bad input (one sentence per failed subject, listed at the end),
1 an unexpected error in some subject.
"""

from __future__ import annotations

import argparse
import logging
import sys

from preprocessing import cli, mni152, mni152_anatomy
from preprocessing.errors import EXIT_BAD_INPUT, InputError
from preprocessing.hcp import preprocess_hcp
from preprocessing.hcp_settings import PreprocessingOptions
from preprocessing.synthetic import DEFAULT_SHAPE, VOXEL_SIZE_MM, write_synthetic_subjects
from preprocessing.tensor_fit import B0_THRESHOLD, DEFAULT_BMAX, FIT_METHODS

log = logging.getLogger("preprocessing")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m preprocessing",
        description="HCP diffusion data to paired LR/HR DTI volumes (DIPY); synthetic subjects.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    hcp = commands.add_parser("hcp", help="preprocess subjects in HCP layout")
    hcp.add_argument("--hcp-root", required=True, help="folder of <id>/T1w/Diffusion/ subjects")
    hcp.add_argument("--out", required=True, help="output folder; one <id>/ sub-folder per subject")
    hcp.add_argument("--subjects", nargs="+", help="subject ids (default: all under --hcp-root)")
    hcp.add_argument("--factor", type=int, default=2, help="downsampling factor r (default 2)")
    hcp.add_argument("--bmax", type=float, default=DEFAULT_BMAX, help="fit volumes with b <= bmax")
    hcp.add_argument("--b0-threshold", type=float, default=B0_THRESHOLD, help="b below it is b0")
    hcp.add_argument(
        "--fit-method", default="WLS", help=f"DIPY TensorModel fit method: {', '.join(FIT_METHODS)}"
    )
    hcp.add_argument(
        "--lr-mask",
        default="hr-blocks",
        help="LR brain mask: hr-blocks (default, the paper's: half of the HR block in the HR "
        "mask) or lr-data (DIPY median_otsu on the LR mean b0, as inference on a new scan)",
    )
    hcp.add_argument("--workers", type=int, default=1, help="subjects processed in parallel")
    hcp.add_argument(
        "--fit-workers",
        type=int,
        default=None,
        help="threads fitting each subject's tensors (default: the cores divided among --workers)",
    )
    hcp.add_argument("--overwrite", action="store_true", help="redo complete subjects")
    hcp.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    synthetic = commands.add_parser(
        "synthetic",
        help="write synthetic subjects in HCP layout",
        description=(
            "Synthetic subjects synth<index> with known tensors (ground_truth/dt_hr.nii.gz): "
            "--anatomy geometric (default; an ellipsoidal head, fast, for tests) or mni152 "
            "(brain-realistic, from the MNI152 templates inside nilearn: pip install -e .[demo])."
        ),
    )
    synthetic.add_argument("--out", required=True, help="output folder (an HCP root)")
    synthetic.add_argument("--count", type=int, help="number of subjects to write (required)")
    synthetic.add_argument(
        "--start", type=int, default=0, help="index of the first subject (default 0: synth000)"
    )
    synthetic.add_argument("--seed", type=int, required=True, help="random seed")
    synthetic.add_argument(
        "--anatomy", choices=("geometric", "mni152"), default="geometric", help="phantom kind"
    )
    synthetic.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help=f"geometric HR grid (default {' '.join(map(str, DEFAULT_SHAPE))})",
    )
    synthetic.add_argument(
        "--voxel-size",
        type=float,
        metavar="MM",
        help=f"mni152: voxel size keeping HCP's field of view (default {VOXEL_SIZE_MM})",
    )
    synthetic.add_argument(
        "--slab",
        type=int,
        nargs=2,
        metavar=("Z0", "Z1"),
        help="mni152: keep axial slices Z0 <= z < Z1 of the grid only (quick runs)",
    )
    synthetic.add_argument(
        "--lesion",
        action="store_true",
        help="mni152: add an oedema-like white-matter lesion (subjects synth<index>_lesion)",
    )
    synthetic.add_argument(
        "--lesion-md-factor",
        type=float,
        metavar="F",
        help=f"with --lesion: the lesion's mean diffusivity over the tissue's "
        f"(default {mni152.Lesion.md_factor})",
    )
    synthetic.add_argument(
        "--lesion-anisotropy-factor",
        type=float,
        metavar="F",
        help=f"with --lesion: its anisotropic part over the tissue's, 0 to the MD factor "
        f"(default {mni152.Lesion.anisotropy_factor})",
    )
    synthetic.add_argument(
        "--snr", type=float, default=30.0, help="b0 white-matter SNR of the Rician noise; inf: none"
    )
    synthetic.add_argument("--subjects", nargs="+", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.command == "synthetic":
            return _synthetic(args)
        return _hcp(args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _synthetic(args: argparse.Namespace) -> int:
    # Every setting is checked before anything is written.
    if args.subjects is not None:
        raise InputError(
            "--subjects is not an option of `synthetic` (elsewhere it lists subject ids); "
            "give the number of subjects to write with --count N."
        )
    if args.count is None or args.count < 1:
        raise InputError(f"--count (the number of subjects) must be at least 1, got {args.count}.")
    if args.start < 0:
        raise InputError(f"--start must be at least 0, got {args.start}.")
    if args.snr <= 0:
        raise InputError(f"--snr must be positive (inf for noise-free data), got {args.snr}.")
    lesion = _lesion(args)
    if args.anatomy == "geometric":
        if args.voxel_size is not None or args.slab is not None or lesion is not None:
            raise InputError("--voxel-size, --slab and --lesion apply to --anatomy mni152 only.")
        shape = tuple(args.shape or DEFAULT_SHAPE)
        if min(shape) < 8:
            raise InputError(f"--shape must be at least 8 voxels per axis, got {list(shape)}.")
        paths = write_synthetic_subjects(
            args.out, args.count, args.seed, shape, args.snr, start=args.start
        )
    else:
        if args.shape is not None:
            raise InputError(
                "--shape applies to --anatomy geometric; the mni152 grid is HCP's field of view, "
                "set by --voxel-size and --slab."
            )
        voxel_size = VOXEL_SIZE_MM if args.voxel_size is None else args.voxel_size
        grid = mni152.hcp_grid(voxel_size, args.slab)
        mni152_anatomy.check_nilearn()
        paths = mni152.write_mni152_subjects(
            args.out, args.count, args.seed, grid, args.snr, lesion, start=args.start
        )
    log.info("%d synthetic subjects written under %s", len(paths), args.out)
    return 0


def _lesion(args: argparse.Namespace) -> mni152.Lesion | None:
    """The lesion the options ask for, checked; None without --lesion."""
    factors = {
        "md_factor": args.lesion_md_factor,
        "anisotropy_factor": args.lesion_anisotropy_factor,
    }
    given = {name: value for name, value in factors.items() if value is not None}
    if not args.lesion:
        if given:
            raise InputError("--lesion-md-factor and --lesion-anisotropy-factor need --lesion.")
        return None
    lesion = mni152.Lesion(**given)
    lesion.check()
    return lesion


def _hcp(args: argparse.Namespace) -> int:
    # Every setting, subject id and --out is checked by preprocess_hcp before any data are read.
    options = PreprocessingOptions(
        args.factor, args.bmax, args.b0_threshold, args.fit_method, args.lr_mask
    )
    summary = preprocess_hcp(
        args.hcp_root,
        args.out,
        args.subjects,
        options,
        args.workers,
        args.overwrite,
        progress=not args.no_progress,
        fit_workers=args.fit_workers,
    )
    log.info(
        "%d done, %d skipped, %d failed",
        len(summary.done),
        len(summary.skipped),
        len(summary.failed),
    )
    if summary.failed:
        print(f"{len(summary.failed)} subject(s) failed:", file=sys.stderr)
        for subject_id, message in sorted(summary.failed.items()):
            print(f"  {subject_id}: {message}", file=sys.stderr)
        return 1 if any(m.startswith("unexpected ") for m in summary.failed.values()) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
