"""The installed CLI with every first-party plugin: listing, laziness, isolation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FIRST_PARTY = {
    "lora": "sdplugin-lora",
    "ti": "sdplugin-ti",
    "hn": "sdplugin-hn",
    "dreambooth": "sdplugin-dreambooth",
    "apt": "sdplugin-apt",
    "aesthetic": "sdplugin-aesthetic",
    "taggers": "sdplugin-taggers",
}

_PROBE = """
import sys
from sdcore.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "onnxruntime", "safetensors", "numpy") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(
    "args", [["--help"], ["train", "--help"], ["tag", "--help"], ["plugins"], ["data", "preprocess", "--help"]]
)
def test_listing_commands_import_no_heavy_library(args):
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    heavy = result.stderr.strip().splitlines()[-1]
    assert heavy == "HEAVY=", f"`sdcore {' '.join(args)}` imported {heavy}"


def test_all_first_party_plugins_are_listed():
    result = subprocess.run(
        [sys.executable, "-m", "sdcore", "plugins", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    found = {p["name"]: p["distribution"] for p in data["plugins"]}
    assert found == {**found, **FIRST_PARTY}, found
    assert data["errors"] == []


def test_train_and_tag_help_list_every_registration():
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    train_help = subprocess.run(
        [sys.executable, "-m", "sdcore", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    for name in {spec.name for spec in pm.methods().values()}:
        assert name in train_help.stdout
    tag_help = subprocess.run(
        [sys.executable, "-m", "sdcore", "tag", "--help"], capture_output=True, text=True, timeout=120
    )
    for name in {spec.name for spec in pm.taggers().values()}:
        assert name in tag_help.stdout


def test_train_help_lists_the_method_aliases():
    """`sdcore train db` etc. work; `train --help` says so next to each method."""
    train_help = subprocess.run(
        [sys.executable, "-m", "sdcore", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    text = " ".join(train_help.stdout.split())
    for alias in ("db", "dreamartist", "textual-inversion", "hypernetwork"):
        assert alias in text, alias
    assert "aliases: textual-inversion" in text or "aliases: embedding, textual-inversion" in text


def test_no_name_conflicts_between_first_party_plugins():
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    # each of these raises PluginError on a clash
    pm.methods(), pm.taggers(), pm.prompt_networks(), pm.model_formats()
    assert pm.load_errors == []
