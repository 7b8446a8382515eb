"""Does the predicted uncertainty flag what training never saw? Lesions against their twins.

``python -m preprocessing synthetic --anatomy mni152 --lesion`` writes ``synth<i>_lesion``: the
subject ``synth<i>`` with a white-matter lesion (``ground_truth/lesion_mask``; oedema-like by
default, ``--lesion-md-factor`` and ``--lesion-anisotropy-factor`` set how unlike healthy
tissue it is) and identical everywhere else. Both are preprocessed; this command super-resolves
each pair with an uncertainty model and compares, inside the lesion, the mean predicted
standard deviation and the mean error with the same voxels of the lesion-free twin. It also
prints the cubic B-spline's errors there and the fraction of elements within 2σ, and draws the
two sigma maps of the first pair.

    python -m monai_iqt.benchmark lesion --dataset_dir PRE --raw_dir RAW \
        --subjects synth006 synth007 --model_path models/model.pt \
        --normalisation_path models/normalisation.json --mc_samples 8 --figure lesion_sigma.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from monai_iqt import figures
from monai_iqt.data.subjects import inspect_subject, load_subject
from monai_iqt.evaluation import BASELINE_NAMES, predict_subject
from monai_iqt.inferers import WholeBrainInferer, make_inferer
from monai_iqt.metrics import RMSE_UNIT, coverage, voxel_rms
from preprocessing import cli
from preprocessing.errors import InputError
from preprocessing.io import read_nifti

LESION_MASK = Path("ground_truth") / "lesion_mask.nii.gz"
COLUMNS = (
    "subject",
    "lesion voxels",
    "σ twin",
    "σ lesion",
    "σ ratio",
    "error twin",
    "error lesion",
    "error ratio",
    "cubic error twin",
    "cubic error lesion",
    "within 2σ twin",
    "within 2σ lesion",
)


def check_twins(dataset_dir: Path, raw_dir: Path, subjects: list[str]) -> None:
    """Every pair's preprocessed subjects and lesion mask, before any inference."""
    for subject in subjects:
        for name in (subject, f"{subject}_lesion"):
            inspect_subject(dataset_dir / name)
        mask = raw_dir / f"{subject}_lesion" / LESION_MASK
        if not mask.is_file():
            raise InputError(
                f"{mask} is missing: --raw_dir must hold the lesion twin written by "
                "`python -m preprocessing synthetic --anatomy mni152 --lesion`."
            )


def compare_twins(
    inferer: WholeBrainInferer, dataset_dir: Path, raw_dir: Path, subject: str
) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """One row of the table for ``subject`` and ``<subject>_lesion``; also both sigma maps
    (HR, per-voxel RMS over the 6 elements) and the HR affine, for the figure."""
    lesion_id = f"{subject}_lesion"
    lesion_hr = read_nifti(raw_dir / lesion_id / LESION_MASK)[0] > 0
    row: dict = {"subject": subject}
    sigmas = {}
    for name, suffix in ((subject, "twin"), (lesion_id, "lesion")):
        data = load_subject(dataset_dir / name)
        predictions = predict_subject(data, {"model": inferer}, ["cubic"])
        model, cubic = predictions["model"], predictions[BASELINE_NAMES["cubic"]]
        inside = lesion_hr[tuple(slice(0, n) for n in data.mask_hr.shape)] & data.mask_hr
        sigmas[name] = voxel_rms(model.std)
        error = model.mean - data.dt_hr
        row["lesion voxels"] = int(inside.sum())
        row[f"σ {suffix}"] = float(sigmas[name][inside].mean()) / RMSE_UNIT
        row[f"error {suffix}"] = float(voxel_rms(error)[inside].mean()) / RMSE_UNIT
        row[f"within 2σ {suffix}"] = coverage(error, model.std, 2.0, inside)
        cubic_error = voxel_rms(cubic.mean - data.dt_hr)
        row[f"cubic error {suffix}"] = float(cubic_error[inside].mean()) / RMSE_UNIT
    row["σ ratio"] = row["σ lesion"] / row["σ twin"]
    row["error ratio"] = row["error lesion"] / row["error twin"]
    return row, sigmas, data.header.hr_affine


def table(rows: list[dict]) -> str:
    """Markdown: one row per twin pair, then the mean of every column over the pairs."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    means = {"subject": "mean"} | {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS[1:]}
    for row in [*rows, means] if len(rows) > 1 else rows:
        cells = [row["subject"], f"{row['lesion voxels']:.0f}"]
        cells += [f"{row[c]:.2f}" for c in COLUMNS[2:10]]
        cells += [f"{row[c]:.3f}" for c in COLUMNS[10:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m monai_iqt.benchmark lesion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset_dir", required=True, help="preprocessed subjects")
    parser.add_argument("--raw_dir", required=True, help="the synthetic HCP root (lesion masks)")
    parser.add_argument(
        "--subjects", required=True, nargs="+", help="lesion-free subjects; <id>_lesion too"
    )
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--normalisation_path", required=True)
    parser.add_argument("--mc_samples", type=int, default=1)
    parser.add_argument("--figure", help="PNG of the first pair's sigma maps through its lesion")
    args = parser.parse_args(argv)

    try:
        inferer = make_inferer(
            args.model_path, args.normalisation_path, device="cpu", mc_samples=args.mc_samples
        )
        if not inferer.gives_std:
            raise InputError(
                f"{args.model_path} predicts no uncertainty (no variance head, no dropout)."
            )
        check_twins(Path(args.dataset_dir), Path(args.raw_dir), args.subjects)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = []
    for index, subject in enumerate(args.subjects):
        row, sigmas, affine = compare_twins(
            inferer, Path(args.dataset_dir), Path(args.raw_dir), subject
        )
        rows.append(row)
        if index == 0 and args.figure:
            lesion_hr = read_nifti(Path(args.raw_dir) / f"{subject}_lesion" / LESION_MASK)[0]
            z = int(np.argmax(lesion_hr.sum(axis=(0, 1))))
            figures.uncertainty_figure(
                *sigmas.values(),
                z,
                affine,
                Path(args.figure),
                f"predicted σ: {subject} (left) and with a lesion (right), "
                f"σ ratio {row['σ ratio']:.2f}",
                names=("σ, lesion-free", "σ, with lesion"),
            )
            print(f"wrote {args.figure}")
    print("inside each lesion (HR brain voxels); σ and error (prediction - truth): mean per-voxel")
    print("RMS over the 6 elements in 1e-5 mm^2/s; ratios: lesion / lesion-free twin, same voxels")
    print(table(rows))
    return 0
