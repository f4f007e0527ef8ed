"""docs/writing-a-plugin.md: the page shows the example's files verbatim, and the example works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "sdplugin-hello"


def test_doc_shows_the_example_files_verbatim():
    doc = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```\n", doc, flags=re.S)
    assert {path for path, _ in blocks} == {
        "pyproject.toml",
        "src/sdplugin_hello/plugin.py",
        "src/sdplugin_hello/method.py",
    }
    for path, body in blocks:
        assert body == (EXAMPLE / path).read_text(), f"docs/writing-a-plugin.md is out of date for {path}"
    plugin_lines = (EXAMPLE / "src/sdplugin_hello/plugin.py").read_text().count("\n")
    assert plugin_lines <= 35


def test_example_installs_and_shows_up(tmp_path):
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "SDCORE_STRICT_PLUGINS": "1"}

    def sdcore(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sdcore", *args], capture_output=True, text=True, env=env, timeout=300
        )

    plugins = sdcore("plugins")
    assert plugins.returncode == 0, plugins.stderr
    assert "hello  (sdplugin-hello 0.1.0)" in plugins.stdout and "methods: hello" in plugins.stdout
    train_help = sdcore("train", "--help")
    assert "hello" in train_help.stdout and "trains only the UNet's output bias" in train_help.stdout
    greeting = sdcore("hello", "you")
    assert greeting.stdout.strip() == "hello you"
    method_help = sdcore("train", "hello", "--help")
    assert method_help.returncode == 0, method_help.stderr
    assert "--bias-scale" in method_help.stdout and "--max-steps" in method_help.stdout


def test_broken_plugin_does_not_break_help(tmp_path):
    site = tmp_path / "site"
    dist = site / "sdplugin_broken-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sdplugin-broken\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[sdcore]\nbroken = sdplugin_broken_mod\n")
    (site / "sdplugin_broken_mod.py").write_text("raise ImportError('this plugin is broken')\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    help_result = subprocess.run(
        [sys.executable, "-m", "sdcore", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert help_result.returncode == 0 and "plugins" in help_result.stdout
    listing = subprocess.run(
        [sys.executable, "-m", "sdcore", "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert "broken (sdplugin-broken): ImportError: this plugin is broken" in listing.stdout
