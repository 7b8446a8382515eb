"""Does the predicted uncertainty flag what training never saw? A lesion against its twin.

``python -m preprocessing synthetic --anatomy mni152 --lesion`` writes ``synth<i>_lesion``: the
subject ``synth<i>`` with an oedema-like white-matter lesion (``ground_truth/lesion_mask``) and
identical everywhere else. Both are preprocessed; this command super-resolves both with an
uncertainty model and compares the mean predicted standard deviation inside the lesion with
the same voxels of the lesion-free twin, and the error there, and draws the two sigma maps.

    python -m monai_iqt.benchmark lesion --dataset_dir PRE --raw_dir RAW --subject synth006 \
        --model_path models/model.pt --normalisation_path models/normalisation.json \
        --mc_samples 8 --figure lesion_sigma.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from monai_iqt import figures
from monai_iqt.data.subjects import load_subject
from monai_iqt.evaluation import lr_brain_region
from monai_iqt.inferers import make_inferer
from preprocessing.io import read_nifti

LESION_MASK = Path("ground_truth") / "lesion_mask.nii.gz"


def voxel_rms(volume: np.ndarray) -> np.ndarray:
    """Per-voxel RMS over the 6 tensor elements."""
    return np.sqrt(np.mean(np.square(volume), axis=-1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monai_iqt.benchmark lesion", description=__doc__
    )
    parser.add_argument("--dataset_dir", required=True, help="preprocessed subjects")
    parser.add_argument("--raw_dir", required=True, help="the synthetic HCP root (lesion masks)")
    parser.add_argument("--subject", required=True, help="lesion-free subject; <id>_lesion too")
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--normalisation_path", required=True)
    parser.add_argument("--mc_samples", type=int, default=1)
    parser.add_argument("--figure", help="PNG of both sigma maps through the lesion centre")
    args = parser.parse_args(argv)

    inferer = make_inferer(
        args.model_path, args.normalisation_path, device="cpu", mc_samples=args.mc_samples
    )
    if not inferer.gives_std:
        parser.error(f"{args.model_path} predicts no uncertainty (no variance head, no dropout)")
    lesion_id = f"{args.subject}_lesion"
    lesion_hr = read_nifti(Path(args.raw_dir) / lesion_id / LESION_MASK)[0] > 0
    results, sigmas = {}, {}
    for name in (args.subject, lesion_id):
        subject = load_subject(Path(args.dataset_dir) / name)
        region = lr_brain_region(subject.mask_hr, subject.upscale_factor)
        mean, std = inferer.predict_with_std(subject.dt_lr, region)
        lesion = lesion_hr[tuple(slice(0, n) for n in subject.mask_hr.shape)] & subject.mask_hr
        sigma = voxel_rms(std)
        error = voxel_rms(mean - subject.dt_hr)
        sigmas[name] = sigma
        results[name] = {
            "sigma_lesion": float(sigma[lesion].mean()),
            "error_lesion": float(error[lesion].mean()),
            "sigma_brain": float(sigma[subject.mask_hr].mean()),
            "voxels": int(lesion.sum()),
        }
        affine = subject.header.hr_affine
    clean, lesioned = results[args.subject], results[lesion_id]
    print(f"lesion voxels (HR, in the brain mask): {lesioned['voxels']}")
    print("| subject | mean σ in lesion | mean |error| in lesion | mean σ in brain |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['sigma_lesion'] / 1e-5:.2f} | {row['error_lesion'] / 1e-5:.2f} "
            f"| {row['sigma_brain'] / 1e-5:.2f} |"
        )
    ratio = lesioned["sigma_lesion"] / clean["sigma_lesion"]
    print(f"σ ratio in the lesion (lesion / lesion-free twin): {ratio:.2f}  (units 1e-5 mm^2/s)")
    if args.figure:
        z = int(np.argmax(lesion_hr.sum(axis=(0, 1))))
        figures.uncertainty_figure(
            sigmas[args.subject],
            sigmas[lesion_id],
            z,
            affine,
            Path(args.figure),
            f"predicted σ: {args.subject} (left) and with a lesion (right), σ ratio {ratio:.2f}",
            names=("σ, lesion-free", "σ, with lesion"),
        )
        print(f"wrote {args.figure}")
    return 0
