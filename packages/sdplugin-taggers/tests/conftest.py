"""Shared fixtures: tiny WD models and small images, all built in tmp folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from wdmodels import make_wd_model, save_image


@pytest.fixture
def wd_v3(tmp_path: Path) -> Path:
    return make_wd_model(tmp_path / "wd-v3")


@pytest.fixture
def wd_v2(tmp_path: Path) -> Path:
    return make_wd_model(tmp_path / "wd-v2", v2=True)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    save_image(folder / "a.png", (10, 20, 30))
    save_image(folder / "b.jpg", (200, 100, 50))
    save_image(folder / "c.webp", (0, 255, 0))
    return folder
