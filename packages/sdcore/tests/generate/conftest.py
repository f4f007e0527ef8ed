"""Shared tiny models for the generation tests (built once per session: they are read-only here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests (exif_bytes)

os.environ.setdefault("SDCORE_CACHE_DIR", "/tmp/sdcore-cache-tests")


@pytest.fixture(scope="session")
def tiny_bundles():
    from sdcore.models.tiny import create_tiny_bundle

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = create_tiny_bundle(family)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def loaded_tiny():
    """``tiny:<family>`` through the model loader, built on first use and kept for one test module (the
    flow-family tests install hooks and schedulers on them)."""
    from sdcore.models.load import load_model

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = load_model(f"tiny:{family}")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def sd1(tiny_bundles):
    return tiny_bundles("sd1")


@pytest.fixture(scope="session")
def sd2(tiny_bundles):
    return tiny_bundles("sd2")


@pytest.fixture(scope="session")
def sdxl(tiny_bundles):
    return tiny_bundles("sdxl")


@pytest.fixture
def lora_cli(sd1, monkeypatch):
    """Run ``sdcore generate`` on the session's tiny SD1 with the LoRA plugin (the loader is tested elsewhere)."""
    import types

    from click.testing import CliRunner
    from lora_plugin import lora_pm
    from sdcore.builtin import generate_command
    from sdcore.builtin.generate_command import generate

    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: sd1)

    def run(*args):
        return CliRunner().invoke(
            generate, ["-m", "tiny:sd1", "--device", "cpu", *args], obj=types.SimpleNamespace(pm=lora_pm())
        )

    return run
