"""docs/writing-a-plugin.md: the page shows the example's files verbatim, and the example works."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "sdplugin-hello"


def test_doc_shows_the_example_files_verbatim():
    doc = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    blocks = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```\n", doc, flags=re.S)
    assert {path for path, _ in blocks} == {
        "pyproject.toml",
        "src/sdplugin_hello/plugin.py",
        "src/sdplugin_hello/method.py",
        "tests/conftest.py",
        "tests/test_hello.py",
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
    assert "hello" in train_help.stdout and "trains only the UNet's output layer" in train_help.stdout
    greeting = sdcore("hello", "you")
    assert greeting.stdout.strip() == "hello you"
    method_help = sdcore("train", "hello", "--help")
    assert method_help.returncode == 0, method_help.stderr
    assert "--bias-scale" in method_help.stdout and "--max-steps" in method_help.stdout
    # the example's family_problems: a model without a UNet is a pre-flight line (exit 2), not prepare's traceback
    from sdcore.testing.datasets import make_tiny_dataset

    make_tiny_dataset(tmp_path / "data")
    for family in ("sd3",):  # flux: the same line, a second model (7 s) for nothing more
        refused = sdcore(
            "train", "hello", "--model", f"tiny:{family}", "--data", str(tmp_path / "data"),
            "--output", str(tmp_path / "out.safetensors"), "--max-steps", "1", "--no-progress",
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert (
            refused.stderr.strip().splitlines()[-1]
            == f"Error: hello trains a UNet's output layer; a {family} model has none"
        )
        assert "Traceback" not in refused.stderr and not (tmp_path / "out.safetensors").exists()


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


def page_commands(doc: str) -> list[tuple[str, list[str]]]:
    """The page's shell commands in order (``$ `` lines of its console blocks), each with the output
    lines the page shows under it."""
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", doc, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif line.strip() and steps:
                steps[-1][1].append(line)
    return steps


@pytest.mark.slow
def test_page_commands_work_in_a_fresh_venv(tmp_path):
    """Follow docs/writing-a-plugin.md literally: a new virtual environment, sdcore and the example
    installed as the page says (no other packages of this checkout), the CLI, a short training run,
    and the example's own tests (its contract suite) with pytest."""
    doc = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    steps = page_commands(doc)
    commands = [command for command, _ in steps]
    assert commands[:4] == [
        "python -m venv .venv",
        ". .venv/bin/activate",
        "pip install -c constraints.txt -e packages/sdcore",
        "pip install -c constraints.txt -e docs/examples/sdplugin-hello",
    ]
    assert any(c.startswith("pytest docs/examples/sdplugin-hello") for c in commands)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "packages").symlink_to(ROOT / "packages")
    (checkout / "constraints.txt").symlink_to(ROOT / "constraints.txt")
    shutil.copytree(
        EXAMPLE,
        checkout / "docs" / "examples" / "sdplugin-hello",
        ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"),
    )
    script = ["set -e"]
    for index, command in enumerate(commands):
        script += [f"echo '@@@ step {index}'", command]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=checkout, capture_output=True, text=True, env=env, timeout=1500
    )
    outputs = result.stdout.split("@@@ step ")[1:]
    failed = len(outputs) - 1
    assert result.returncode == 0, f"`{commands[failed]}` failed:\n{outputs[-1][-3000:]}\n{result.stderr[-3000:]}"
    assert len(outputs) == len(commands)
    for (command, expected), output in zip(steps, outputs, strict=True):
        for line in expected:
            assert line in output, f"`{command}` did not print {line!r}:\n{output}"
    venv_python = checkout / ".venv" / "bin" / "python"
    probe = subprocess.run(
        [str(venv_python), "-c", "import sdcore, sdplugin_hello; print(sdcore.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).resolve().is_relative_to((ROOT / "packages" / "sdcore").resolve())
    assert (checkout / "hello.safetensors").is_file()
    assert " passed" in outputs[-1] and " failed" not in outputs[-1]
