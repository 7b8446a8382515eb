"""Transitional re-exports for callers not yet moved to the split modules.

Inference lives in :mod:`monai_iqt.inferers` (windows, the MONAI inferer, ``make_inferer``),
:mod:`monai_iqt.inputs`, :mod:`monai_iqt.outputs`, :mod:`monai_iqt.weights` and
:mod:`monai_iqt.bundle` (``run_inference`` and the bundle entry). ``REPO_ROOT``/``BUNDLE_ROOT``
remain only until ``configs/train.json`` uses ``"bundle_root": "."``; this module then goes.
"""

from pathlib import Path

from monai_iqt.bundle import run_inference
from monai_iqt.inferers import DEFAULT_ROI_SIZE, WholeBrainInferer, default_device, make_inferer
from monai_iqt.inputs import inference_region, load_input
from monai_iqt.outputs import check_writable as check_output_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundles" / "iqt_espcn_rn"

__all__ = [
    "BUNDLE_ROOT",
    "DEFAULT_ROI_SIZE",
    "REPO_ROOT",
    "WholeBrainInferer",
    "check_output_dir",
    "default_device",
    "inference_region",
    "load_input",
    "make_inferer",
    "run_inference",
]
