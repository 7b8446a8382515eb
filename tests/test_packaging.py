"""The bundle installs from what its ``metadata.json`` declares: the wheel built from
``pyproject.toml`` is the package the metadata names, every runtime requirement of the wheel is
declared there at a version the requirement accepts, and every module the configs import comes
from the wheel or from a declared package (nothing from the repository)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPOSITORY = Path(__file__).resolve().parents[1]
BUNDLE = REPOSITORY / "bundles" / "iqt_espcn_rn"
#: metadata.json keys of the packages the model zoo's CI installs besides required_packages_version
VERSION_KEYS = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}


def declared_versions() -> dict[str, str]:
    """{canonical distribution name: version} as the zoo's CI reads metadata.json
    (ci/get_bundle_requirements.py pins each as ``name==version``)."""
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    versions = {name: metadata[key] for name, key in VERSION_KEYS.items()}
    versions.update(metadata["required_packages_version"])
    assert "optional_packages_version" not in metadata  # MONAI maps it to the key above
    return {canonicalize_name(name): version for name, version in versions.items()}


@pytest.fixture(scope="module")
def wheel_metadata(tmp_path_factory) -> dict[str, list[str]]:
    """METADATA and top-level packages of a wheel built from a copy of the sources (no build
    files left in the tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    for package in ("monai_iqt", "preprocessing"):
        shutil.copytree(
            REPOSITORY / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    # an isolated build, as `python -m build` makes it: pyproject.toml's build-system decides
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        message = Parser().parsestr(archive.read(name).decode())
        tops = {
            n.split("/")[0] for n in archive.namelist() if not n.split("/")[0].endswith("-info")
        }
    return {
        "Name": [message["Name"]],
        "Version": [message["Version"]],
        "Requires-Dist": message.get_all("Requires-Dist") or [],
        "packages": sorted(tops),
    }


def test_metadata_names_the_wheel_at_its_version(wheel_metadata) -> None:
    declared = declared_versions()
    (name,) = wheel_metadata["Name"]
    assert declared[canonicalize_name(name)] == wheel_metadata["Version"][0]
    assert wheel_metadata["packages"] == ["monai_iqt", "preprocessing"]


def test_every_runtime_requirement_is_declared_at_a_version_it_accepts(wheel_metadata) -> None:
    declared = declared_versions()
    runtime = [Requirement(text) for text in wheel_metadata["Requires-Dist"]]
    runtime = [r for r in runtime if r.marker is None or r.marker.evaluate({"extra": ""})]
    assert {"torch", "monai", "numpy", "dipy"} <= {canonicalize_name(r.name) for r in runtime}
    for requirement in runtime:
        name = canonicalize_name(requirement.name)
        assert name in declared, f"{name} is required by the wheel but not in metadata.json"
        assert requirement.specifier.contains(declared[name], prereleases=True), (
            f"metadata.json declares {name} {declared[name]}, the wheel needs {requirement}"
        )


def test_declared_versions_are_exact_releases() -> None:
    """The zoo's CI writes ``name==version``: a range such as '>=1.9' would break its install."""
    for name, version in declared_versions().items():
        assert re.fullmatch(r"\d+(\.\d+)*", version), (name, version)


def test_every_config_import_comes_from_the_wheel_or_a_declared_package(wheel_metadata) -> None:
    declared = set(declared_versions())
    distributions = packages_distributions()
    for config in sorted((BUNDLE / "configs").glob("*.json")):
        for module in re.findall(r"\$import ([A-Za-z_][\w.]*)", config.read_text()):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in wheel_metadata["packages"]:
                continue
            providers = {canonicalize_name(d) for d in distributions.get(top, [])}
            assert providers & declared, f"{config.name} imports {module}, not declared"
