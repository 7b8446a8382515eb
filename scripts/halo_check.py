"""Check a model's field-of-view handling on a real bundle run: the prediction on an LR volume
must equal, on its own voxels, the prediction on the same volume first extended by
(halo + 2) repeated edge voxels on every side (affine shifted accordingly).

    python scripts/halo_check.py SUBJECT_DIR OUT_DIR [--model_dir MODEL_DIR]

MODEL_DIR holds ``model.pt`` and ``normalisation.json`` (default: the shipped ESPCN-RN2).

SUBJECT_DIR holds ``dt_lr.nii.gz`` and ``mask_lr.nii.gz`` (a preprocessed subject). Prints the
largest absolute difference in mm^2/s; 0 means the padding never reaches a predicted voxel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "iqt_espcn_rn"


def extend(image: nib.Nifti1Image, voxels: int, target: Path) -> None:
    """Write ``image`` extended by ``voxels`` repeated edge voxels per side, affine shifted."""
    data = np.asarray(image.dataobj)
    pad = ((voxels, voxels),) * 3 + ((0, 0),) * (data.ndim - 3)
    shift = np.eye(4)
    shift[:3, 3] = -voxels
    nib.save(nib.Nifti1Image(np.pad(data, pad, mode="edge"), image.affine @ shift), target)


def infer(folder: Path, model_dir: Path, target: Path) -> nib.Nifti1Image:
    """The bundle's inference config on ``folder``'s LR tensor image and mask."""
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file",
         str(BUNDLE / "configs" / "inference.json"), "--bundle_root", str(BUNDLE),
         "--model_path", str(model_dir / "model.pt"),
         "--normalisation_path", str(model_dir / "normalisation.json"),
         "--input", str(folder / "dt_lr.nii.gz"), "--mask", str(folder / "mask_lr.nii.gz"),
         "--output_dir", str(target)],
        check=True,
    )  # fmt: skip
    return nib.load(target / "dt_hr.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subject_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--model_dir", type=Path, default=BUNDLE / "models" / "espcn_rn2")
    args = parser.parse_args()
    settings = json.loads((args.model_dir / "normalisation.json").read_text())["extra"]
    r, halo = int(settings["upscale_factor"]), 2 + 6 * int(settings["num_blocks"])
    k = halo + 2
    extended = args.out_dir / "extended_input"
    extended.mkdir(parents=True, exist_ok=True)
    for name in ("dt_lr.nii.gz", "mask_lr.nii.gz"):
        extend(nib.load(args.subject_dir / name), k, extended / name)
    original = infer(args.subject_dir, args.model_dir, args.out_dir / "original")
    wide = infer(extended, args.model_dir, args.out_dir / "extended")
    crop = (slice(r * k, -r * k),) * 3
    a, b = np.asarray(original.dataobj), np.asarray(wide.dataobj)[crop]
    shift = np.eye(4)
    shift[:3, 3] = r * k
    assert np.allclose(wide.affine @ shift, original.affine), "HR affines disagree after the crop"
    print(
        f"{args.subject_dir.name}: halo {halo}, extended by {k} LR voxels; max |difference| "
        f"{np.abs(a - b).max():.3e} mm^2/s (max |prediction| {np.abs(a).max():.3e})"
    )


if __name__ == "__main__":
    main()
