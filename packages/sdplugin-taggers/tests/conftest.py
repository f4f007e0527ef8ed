"""Shared fixtures: tiny WD models and small images, all built in tmp folders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from wdmodels import make_wd_model


@pytest.fixture
def wd_v3(tmp_path: Path) -> Path:
    return make_wd_model(tmp_path / "wd-v3")


@pytest.fixture
def wd_v2(tmp_path: Path) -> Path:
    return make_wd_model(tmp_path / "wd-v2", v2=True)


def save_image(path: Path, color=(0, 0, 0), size=(16, 16), mode="RGB") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    save_image(folder / "a.png", (10, 20, 30))
    save_image(folder / "b.jpg", (200, 100, 50))
    save_image(folder / "c.webp", (0, 255, 0))
    return folder
