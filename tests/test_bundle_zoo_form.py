"""The bundle's files in the MONAI model zoo's form: metadata against the zoo's schema, a data
format for every network output, and ``large_files.yml`` against the weights present.

``tests/data/meta_schema_20240725.json`` is the schema ``metadata.json`` names, as published by
Project-MONAI (MONAI-extra-test-data release 0.8.1, mirrored verbatim at
https://project-monai.github.io/schema/meta_schema_20240725.json, Apache-2.0), kept here so the
check needs no network: MONAI's ``verify_metadata`` downloads a schema only when the file it is
given is absent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from monai.apps.utils import HashCheckError, check_hash, download_url
from monai.bundle import ConfigParser

from monai_iqt.networks import ESPCN_RN
from monai_iqt.weights import network_settings

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "iqt_espcn_rn"
SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"
METADATA = BUNDLE / "configs" / "metadata.json"

#: Each shipped model folder and the metadata key describing its network's inputs and outputs.
MODEL_FORMATS = {
    "models": "network_data_format",
    "models/espcn_rn2": "network_data_format",
    "models/uncertainty": "uncertainty_data_format",
}


def _metadata() -> dict:
    return json.loads(METADATA.read_text())


def test_metadata_names_the_schema_kept_here():
    assert _metadata()["schema"].endswith("/" + SCHEMA.name)


def test_metadata_passes_monai_verify_metadata_against_the_zoo_schema():
    done = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(METADATA),
         "--filepath", str(SCHEMA)],
        capture_output=True, text=True, timeout=300, cwd=BUNDLE,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metadata is verified with no error" in done.stdout + done.stderr


def test_the_schema_refuses_metadata_it_should():
    """The schema check is not vacuous: a missing required key, a data format without outputs
    and a tensor without its channel count are each refused."""
    schema = json.loads(SCHEMA.read_text())
    metadata = _metadata()
    jsonschema.validate(metadata, schema)
    broken = []
    for key in ("required_packages_version", "network_data_format"):
        bad = copy.deepcopy(metadata)
        del bad[key]
        broken.append(bad)
    bad = copy.deepcopy(metadata)
    del bad["uncertainty_data_format"]["outputs"]
    broken.append(bad)
    bad = copy.deepcopy(metadata)
    del bad["network_data_format"]["post_processed_outputs"]["dt_hr_std"]["num_channels"]
    broken.append(bad)
    for bad in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("folder", list(MODEL_FORMATS))
def test_each_shipped_network_produces_what_its_data_format_says(folder):
    """The network each model folder's ``normalisation.json`` builds (as ``network_def`` does)
    takes the described input and returns the described channels and shape, for n = 3."""
    fmt = _metadata()[MODEL_FORMATS[folder]]
    (image,) = fmt["inputs"].values()
    (pred,) = fmt["outputs"].values()
    settings = network_settings(str(BUNDLE / folder / "normalisation.json"))
    network = ESPCN_RN(**settings).eval()
    n = 3
    shape = [eval(str(s), {"n": n}) for s in image["spatial_shape"]]  # "4+n" -> 7
    with torch.no_grad():
        out = network(torch.zeros(1, image["num_channels"], *shape))
    assert out.shape[1] == pred["num_channels"] == len(pred["channel_def"])
    assert list(out.shape[2:]) == [eval(str(s), {"n": n}) for s in pred["spatial_shape"]]
    assert out.dtype == getattr(torch, pred["dtype"])
    # what inference writes: the denormalised mean, and a standard deviation when predicted
    post = fmt["post_processed_outputs"]
    assert post["dt_hr"]["num_channels"] == post["dt_hr_std"]["num_channels"] == 6


# ------------------------------------------------------------------------- large files


def _large_files() -> list[dict]:
    parser = ConfigParser()  # as the zoo's ci/utils.py download_large_files reads it
    parser.read_config(str(BUNDLE / "large_files.yml"))
    return parser.get()["large_files"]


def test_large_files_lists_every_weight_file_with_its_sha256():
    entries = _large_files()
    listed = {entry["path"] for entry in entries}
    present = {
        str(path.relative_to(BUNDLE))
        for suffix in ("*.pt", "*.ts")
        for path in (BUNDLE / "models").rglob(suffix)
    }
    assert present and listed == present
    for entry in entries:
        path = BUNDLE / entry["path"]
        assert entry["hash_type"] == "sha256"
        assert entry["url"].startswith("https://") and entry["url"].endswith(".pt")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["hash_val"]
        assert check_hash(str(path), entry["hash_val"], entry["hash_type"])  # MONAI's check
        # the weights' own record agrees (an independent copy of the hash, written at training)
        stats = json.loads((path.parent / "normalisation.json").read_text())
        assert stats["extra"]["weights_sha256"] == entry["hash_val"]


def test_the_zoo_download_step_keeps_the_files_present(tmp_path):
    """What the zoo's CI does with each entry (``download_url(..., fuzzy=True)``) succeeds
    without the network, because each listed file is present with the listed hash; a file whose
    hash differs is refused rather than kept."""
    for entry in _large_files():
        download_url(
            url=entry["url"],
            filepath=str(BUNDLE / entry["path"]),
            hash_val=entry["hash_val"],
            hash_type=entry["hash_type"],
            fuzzy=True,
        )
    wrong = tmp_path / "model.pt"
    wrong.write_bytes(b"not the weights")
    entry = _large_files()[0]
    with pytest.raises(HashCheckError, match="sha256 hash check of existing file failed"):
        download_url(
            url=entry["url"],
            filepath=str(wrong),
            hash_val=entry["hash_val"],
            hash_type=entry["hash_type"],
        )


def test_the_bundle_carries_its_licences():
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    text = (BUNDLE / "docs" / "data_license.txt").read_text()
    for named in ("MNI", "nilearn", "Human Connectome Project", "Data Use Terms"):
        assert named in text
    assert sum(1 for _ in (BUNDLE / "docs" / "README.md").open()) <= 200
