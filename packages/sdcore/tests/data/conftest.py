"""Builders for messy image files: every kind of trouble real datasets contain."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def noise_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_truncated_jpeg(path: Path) -> None:
    buffer = io.BytesIO()
    noise_image(64, 64, seed=1).save(buffer, "JPEG", quality=95)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2])


def write_truncated_png(path: Path) -> None:
    buffer = io.BytesIO()
    noise_image(64, 64, seed=9).save(buffer, "PNG")
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3])


def write_corrupt_png(path: Path) -> None:
    buffer = io.BytesIO()
    noise_image(64, 64, seed=2).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 4
    for k in range(start + 20, start + 60):  # scramble compressed pixel data inside IDAT
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))


def write_cmyk_jpeg(path: Path) -> None:
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, "JPEG", quality=95)  # pure red in CMYK


def write_16bit_png(path: Path) -> None:
    values = np.zeros((16, 48), dtype=np.uint16)
    values[:, :16] = 65535
    values[:, 16:32] = 32896  # 128 * 257
    Image.fromarray(values).save(path, "PNG")


def write_palette_png_with_transparency(path: Path) -> None:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.paste(1, (16, 0, 32, 32))  # right half: palette index 1 (red); left half index 0 (transparent)
    image.save(path, "PNG", transparency=0)


def write_exif_rotated_jpeg(path: Path) -> None:
    """Stored 80x40: left half red, right half blue; EXIF orientation 6 (display rotated 90 deg clockwise)."""
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)


def write_decompression_bomb(path: Path, width: int = 100_000, height: int = 100_000) -> None:
    """A small PNG whose header declares a gigantic size (IHDR patched, CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 0).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 4 + 13])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def write_text_as_image(path: Path) -> None:
    path.write_text("this is not an image\n", encoding="utf-8")


@pytest.fixture
def messy_dataset(tmp_path: Path) -> dict:
    """A kohya folder with good images and every kind of problem; returns the root and expectations.

    root/
      5_sks dog/   good.png (+caption), nocap.png (class tokens), empty.png (empty caption),
                   cmyk.jpg, rotated.jpg, sixteen.png, palette.png, tiny.png (10x10),
                   truncated.jpg, corrupt.png, bomb.png, fake.jpg (text), notes.xyz (unknown file)
      direct.png   (images directly in root: 1 repeat, no class tokens -> missing caption)
      misc/        (folder without N_ prefix -> reported, ignored)
    """
    root = tmp_path / "messy"
    concept = root / "5_sks dog"
    concept.mkdir(parents=True)
    noise_image(64, 48, seed=3).save(concept / "good.png")
    (concept / "good.txt").write_text("sks dog, sitting, grass\n", encoding="utf-8")
    noise_image(64, 64, seed=4).save(concept / "nocap.png")
    noise_image(64, 64, seed=5).save(concept / "empty.png")
    (concept / "empty.txt").write_text("  \n", encoding="utf-8")
    write_cmyk_jpeg(concept / "cmyk.jpg")
    write_exif_rotated_jpeg(concept / "rotated.jpg")
    write_16bit_png(concept / "sixteen.png")
    write_palette_png_with_transparency(concept / "palette.png")
    noise_image(10, 10, seed=6).save(concept / "tiny.png")
    write_truncated_jpeg(concept / "truncated.jpg")
    write_corrupt_png(concept / "corrupt.png")
    write_decompression_bomb(concept / "bomb.png")
    write_text_as_image(concept / "fake.jpg")
    (concept / "notes.xyz").write_text("?", encoding="utf-8")
    noise_image(64, 64, seed=7).save(root / "direct.png")
    (root / "misc").mkdir()
    noise_image(64, 64, seed=8).save(root / "misc" / "ignored.png")
    return {
        "root": root,
        "concept": concept,
        "usable": {
            "good.png",
            "nocap.png",
            "empty.png",
            "cmyk.jpg",
            "rotated.jpg",
            "sixteen.png",
            "palette.png",
            "tiny.png",
            "direct.png",
        },
        "skipped": {"truncated.jpg", "corrupt.png", "bomb.png", "fake.jpg", "notes.xyz", "misc"},
    }


@pytest.fixture
def make():
    """The builders above (tests run with --import-mode=importlib, so conftest is not importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        noise=noise_image,
        truncated_jpeg=write_truncated_jpeg,
        corrupt_png=write_corrupt_png,
        truncated_png=write_truncated_png,
        cmyk_jpeg=write_cmyk_jpeg,
        png16=write_16bit_png,
        palette_png=write_palette_png_with_transparency,
        rotated_jpeg=write_exif_rotated_jpeg,
        bomb=write_decompression_bomb,
        text_as_image=write_text_as_image,
    )
