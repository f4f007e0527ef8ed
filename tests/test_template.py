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


def test_template_plugin_passes_its_own_tests(tmp_path):
    """The plugin the template makes passes its tests as created: registration and the method contract
    (config round trip, one step, learning, save -> load, exact resume, determinism), so a new plugin
    starts from a method that works and tests that can fail."""
    packages = tmp_path / "packages"
    shutil.copytree(ROOT / "packages" / "_template", packages / "_template")
    target = _new_plugin_module().create("demo_method", "Demo from the template", packages)
    readme = (target / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("# sdplugin-demo_method\n\nDemo from the template\n")
    assert "new_plugin.py" not in readme and "<!--" not in readme
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "sdcore.testing", "tests"],
        cwd=target,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "7 passed" in done.stdout, done.stdout[-3000:]
