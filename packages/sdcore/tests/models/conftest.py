"""Tiny models of every family, built once per session and saved as diffusers folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_bundles():
    from sdcore.models.tiny import create_tiny_bundle

    return {family: create_tiny_bundle(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_folders(tiny_bundles, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {family: bundle.save(root / family, format="diffusers") for family, bundle in tiny_bundles.items()}


@pytest.fixture(scope="session")
def tiny_files(tiny_folders, tmp_path_factory) -> dict[str, Path]:
    """diffusers folder -> our loader -> our single-file writer."""
    from sdcore.models.load import load_model

    root = tmp_path_factory.mktemp("files")
    return {family: load_model(folder).save(root / f"{family}.safetensors") for family, folder in tiny_folders.items()}


def _assert_modules_equal(left, right) -> None:
    import torch

    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="session")
def assert_modules_equal():
    """Every tensor of two modules has the same name, dtype and value."""
    return _assert_modules_equal
