"""BIDS datasets in, a BIDS-derivatives tree out.

Input: a BIDS dataset root (it holds ``dataset_description.json``), or one subject or session
folder of one. Every ``sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` is found with pybids' ``BIDSLayout``,
and its ``.bval``/``.bvec`` with ``get_bval``/``get_bvec`` (which follow BIDS's inheritance
principle: a gradient file may sit at any level above the DWI). BIDS bvecs are FSL's (relative
to the image axes, x negated for a positive-determinant affine), as the project reads them.

Output names follow the diffusion-derivatives proposal (BEP016, not yet merged into BIDS), e.g.
``sub-01_ses-1_space-orig_model-tensor_param-diffusivity_res-hr_dwimap.nii.gz`` for the tensor,
whose six volumes are D11, D12, D13, D22, D23, D33 (``tensor_conventions.BIDS_ORDER``), with
``param-md``, ``param-fa``, ``param-colfa`` for the maps; the DWI's entities (sub, ses, acq,
dir, run, ...) are kept.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.errors import InputError
from preprocessing.io import write_json

log = logging.getLogger(__name__)

DESCRIPTION = "dataset_description.json"

#: BIDS version the derivatives' ``dataset_description.json`` declares.
BIDS_VERSION = "1.10.0"

#: Entities of a DWI's name kept in its outputs' names, in BIDS's order.
KEPT_ENTITIES = (
    ("subject", "sub"),
    ("session", "ses"),
    ("acquisition", "acq"),
    ("reconstruction", "rec"),
    ("direction", "dir"),
    ("run", "run"),
    ("part", "part"),
)

#: Output role -> the part of its BIDS-derivatives name after the DWI's entities.
ROLE_SUFFIXES = {
    "dt_hr": "space-orig_model-tensor_param-diffusivity_res-hr_dwimap.nii.gz",
    "dt_hr_std": "space-orig_model-tensor_param-diffusivity_res-hr_desc-std_dwimap.nii.gz",
    "md": "space-orig_model-tensor_param-md_res-hr_dwimap.nii.gz",
    "fa": "space-orig_model-tensor_param-fa_res-hr_dwimap.nii.gz",
    "colour_fa": "space-orig_model-tensor_param-colfa_res-hr_dwimap.nii.gz",
    "md_std": "space-orig_model-tensor_param-md_res-hr_desc-std_dwimap.nii.gz",
    "fa_std": "space-orig_model-tensor_param-fa_res-hr_desc-std_dwimap.nii.gz",
    "mask_hr": "space-orig_res-hr_desc-brain_mask.nii.gz",
}


@dataclass
class BidsDwi:
    """One DWI of a BIDS dataset: its files, its entities, and what is wrong with it if any."""

    path: Path
    bval: Path | None
    bvec: Path | None
    entities: dict = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        """``sub-01[_ses-1][_acq-x][_dir-AP][_run-1]``: the DWI's name without ``_dwi``."""
        return "_".join(
            f"{short}-{self.entities[key]}" for key, short in KEPT_ENTITIES if key in self.entities
        )

    @property
    def folder(self) -> Path:
        """``sub-01[/ses-1]/dwi``: where its outputs go below the derivatives root."""
        parts = [f"sub-{self.entities['subject']}"]
        if "session" in self.entities:
            parts.append(f"ses-{self.entities['session']}")
        return Path(*parts, "dwi")

    def output_names(self) -> dict[str, str]:
        """Each output role's file name."""
        return {role: f"{self.prefix}_{suffix}" for role, suffix in ROLE_SUFFIXES.items()}

    @property
    def record_name(self) -> str:
        """The inference record of this DWI's outputs (one per DWI: runs share a folder)."""
        return f"{self.prefix}_desc-iqt_inference.json"


def dataset_root(path: Path) -> Path | None:
    """The BIDS dataset ``path`` is (or is a subject or session folder of), or None."""
    path = Path(path).absolute()
    if (path / DESCRIPTION).is_file():
        return path
    if path.name.startswith("sub-") and (path.parent / DESCRIPTION).is_file():
        return path.parent
    if (
        path.name.startswith("ses-")
        and path.parent.name.startswith("sub-")
        and (path.parent.parent / DESCRIPTION).is_file()
    ):
        return path.parent.parent
    return None


def _layout(root: Path):
    try:
        from bids import BIDSLayout
    except ImportError as error:
        raise InputError(
            f"{root} is a BIDS dataset, and reading one needs pybids: pip install "
            "'monai-iqt[bids]' (or pip install pybids)."
        ) from error
    try:
        return BIDSLayout(str(root), validate=False)
    except Exception as error:  # pybids' own errors (a broken dataset_description.json ...)
        raise InputError(f"{root} cannot be read as a BIDS dataset ({error}).") from error


def find_dwis(path: Path) -> list[BidsDwi]:
    """Every DWI of the dataset, subject or session folder ``path``, with its gradient files.

    A DWI whose ``.bval`` or ``.bvec`` is missing is returned with None there (the caller names
    it and goes on with the others). None found at all is one sentence.
    """
    path = Path(path).absolute()
    root = dataset_root(path)
    if root is None:
        raise InputError(f"{path} is not a BIDS dataset (no {DESCRIPTION} at or above it).")
    layout = _layout(root)
    filters = {}
    if path.name.startswith("sub-"):
        filters["subject"] = path.name.removeprefix("sub-")
    elif path.name.startswith("ses-"):
        filters["subject"] = path.parent.name.removeprefix("sub-")
        filters["session"] = path.name.removeprefix("ses-")
    files = layout.get(suffix="dwi", extension=[".nii.gz", ".nii"], **filters)
    if not files:
        raise InputError(f"{path} holds no sub-*/[ses-*/]dwi/*_dwi.nii[.gz] (BIDS DWI).")
    dwis = []
    for found in sorted(files, key=lambda f: f.path):
        dwis.append(
            BidsDwi(
                Path(found.path),
                _nearest(layout.get_bval, found.path),
                _nearest(layout.get_bvec, found.path),
                {key: str(value) for key, value in found.get_entities().items()},
            )
        )
    log.info("%s: %d BIDS DWI(s) found with pybids", path, len(dwis))
    return dwis


def _nearest(getter, path: str) -> Path | None:
    try:
        found = getter(path)
    except (IndexError, ValueError):  # pybids raises IndexError when there is none
        return None
    return Path(found) if found else None


def missing_gradients(dwi: BidsDwi) -> str | None:
    """One sentence if the DWI lacks its ``.bval`` or ``.bvec``, else None."""
    missing = [what for what, p in ((".bval", dwi.bval), (".bvec", dwi.bvec)) if p is None]
    if not missing:
        return None
    return (
        f"{dwi.path} has no {' and no '.join(missing)} (BIDS needs both beside the DWI or at a "
        "level above it)."
    )


def check_derivatives_root(output_dir: Path) -> None:
    """Refuse an output folder whose ``dataset_description.json`` another tool wrote."""
    path = Path(output_dir) / DESCRIPTION
    if not path.exists():
        return
    try:
        generated = json.loads(path.read_text()).get("GeneratedBy") or [{}]
        ours = generated[0].get("Name") == "monai-iqt"
    except (OSError, ValueError, AttributeError, TypeError, IndexError):
        ours = False
    if not ours:
        raise InputError(
            f"{path} exists and was not written by monai-iqt (its GeneratedBy says otherwise): "
            "the output folder is another dataset; choose another --output_dir."
        )


def write_dataset_description(output_dir: Path, source: Path) -> Path:
    """The derivatives' ``dataset_description.json`` (``GeneratedBy`` this tool)."""
    try:
        version = importlib.metadata.version("monai-iqt")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    description = {
        "Name": "monai-iqt: super-resolved diffusion tensors (Image Quality Transfer)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "monai-iqt",
                "Version": version,
                "Description": "DTI fitted with DIPY on each DWI, then super-resolved x2 by an "
                "ESPCN(-RN) network; names follow the diffusion-derivatives proposal BEP016.",
            }
        ],
        "SourceDatasets": [{"URL": Path(source).absolute().as_uri()}],
    }
    path = Path(output_dir) / DESCRIPTION
    write_json(path, description)
    return path
