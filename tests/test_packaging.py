"""Every package ships a PEP 561 ``py.typed`` marker, so a downstream ``mypy`` reads sdcore's annotations."""

from __future__ import annotations

from pathlib import Path

import pytest
from hatchling.builders.sdist import SdistBuilder
from hatchling.builders.wheel import WheelBuilder

ROOT = Path(__file__).parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def test_every_package_is_checked():
    names = {p.name for p in PACKAGES}
    assert {"sdcore", "sdplugin-lora", "sdplugin-ti", "sdplugin-taggers", "_template"} <= names


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_wheel_and_sdist_carry_py_typed(package):
    # the file lists hatchling builds the wheel and sdist from (no build: milliseconds)
    wheel = {f.distribution_path for f in WheelBuilder(str(package)).recurse_included_files()}
    sdist = {f.distribution_path for f in SdistBuilder(str(package)).recurse_included_files()}
    imports = {path.split("/")[0] for path in wheel if path.endswith(".py") and "/" in path}
    assert imports, f"{package.name}: the wheel holds no package"
    for name in imports:
        assert f"{name}/py.typed" in wheel, f"{package.name}: the wheel lacks {name}/py.typed"
        assert f"src/{name}/py.typed" in sdist, f"{package.name}: the sdist lacks src/{name}/py.typed"
