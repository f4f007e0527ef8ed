"""packages/_template produces a plugin that installs, registers and shows up."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _new_plugin_module():
    spec = importlib.util.spec_from_file_location("new_plugin", ROOT / "scripts" / "new_plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_template_makes_a_working_plugin(tmp_path):
    packages = tmp_path / "packages"
    shutil.copytree(ROOT / "packages" / "_template", packages / "_template")
    target = _new_plugin_module().create("demo_method", "Demo from the template", packages)
    assert not list(target.rglob("*NAME*"))
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(target),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "SDCORE_STRICT_PLUGINS": "1"}
    listing = subprocess.run(
        [sys.executable, "-m", "sdcore", "train", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    assert "demo_method" in listing.stdout and "Demo from the template" in listing.stdout
