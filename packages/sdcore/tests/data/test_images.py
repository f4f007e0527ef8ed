from __future__ import annotations

import numpy as np
import pytest
from sdcore.data.images import ImageError, open_image_rgb, probe_image, verify_image
from sdcore.errors import DataError


def test_cmyk_jpeg_becomes_rgb_red(tmp_path, make):
    path = tmp_path / "cmyk.jpg"
    make.cmyk_jpeg(path)
    image = open_image_rgb(path)
    assert image.mode == "RGB"
    r, g, b = np.asarray(image, dtype=np.int32).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path, make):
    path = tmp_path / "sixteen.png"
    make.png16(path)
    pixels = np.asarray(open_image_rgb(path))
    assert pixels.shape == (16, 48, 3)
    assert (pixels[:, :16] == 255).all()
    assert (abs(pixels[:, 16:32].astype(int) - 128) <= 1).all()
    assert (pixels[:, 32:] == 0).all()


def test_palette_transparency_composited_on_white(tmp_path, make):
    path = tmp_path / "palette.png"
    make.palette_png(path)
    pixels = np.asarray(open_image_rgb(path))
    assert (pixels[:, :16] == 255).all(), "transparent area must become white"
    assert (pixels[:, 16:] == (255, 0, 0)).all()


def test_rgba_and_la_composited_on_white(tmp_path):
    from PIL import Image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.paste((0, 0, 255, 255), (4, 0, 8, 8))
    rgba.save(tmp_path / "a.png")
    pixels = np.asarray(open_image_rgb(tmp_path / "a.png"))
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == (0, 0, 255)).all()
    Image.new("LA", (4, 4), (0, 128)).save(tmp_path / "la.png")  # black at half opacity -> mid gray
    assert abs(int(np.asarray(open_image_rgb(tmp_path / "la.png"))[0, 0, 0]) - 127) <= 2


def test_exif_orientation_applied_to_size_and_pixels(tmp_path, make):
    path = tmp_path / "rotated.jpg"
    make.rotated_jpeg(path)  # stored 80x40, left red / right blue, orientation 6
    assert probe_image(path) == (40, 80)
    image = open_image_rgb(path)
    assert image.size == (40, 80)
    pixels = np.asarray(image, dtype=np.int32)
    top, bottom = pixels[:30].mean(axis=(0, 1)), pixels[50:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60, "rotated 90 deg clockwise: stored left (red) is on top"
    assert bottom[2] > 200 and bottom[0] < 60


def test_grayscale_and_bilevel(tmp_path):
    from PIL import Image

    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    assert (np.asarray(open_image_rgb(tmp_path / "g.png")) == 77).all()
    assert (np.asarray(open_image_rgb(tmp_path / "b.png")) == 255).all()


@pytest.mark.parametrize(
    "builder, reason",
    [
        ("truncated_jpeg", "damaged"),
        ("truncated_png", "damaged"),
        ("corrupt_png", "damaged"),
        ("bomb", "decompression bomb"),
        ("text_as_image", "not an image"),
    ],
)
def test_broken_files_raise_image_error_with_reason(tmp_path, make, builder, reason):
    path = tmp_path / ("x.jpg" if "jpeg" in builder or "text" in builder else "x.png")
    getattr(make, builder)(path)
    with pytest.raises(ImageError, match=reason) as info:
        open_image_rgb(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DataError)
    with pytest.raises(ImageError, match=reason):
        verify_image(path)


def test_probe_reads_header_only_but_verify_catches_truncation(tmp_path, make):
    path = tmp_path / "t.jpg"
    make.truncated_jpeg(path)
    assert probe_image(path) == (64, 64)  # the header is intact
    with pytest.raises(ImageError):
        verify_image(path)


def test_bomb_is_refused_without_decoding(tmp_path, make):
    path = tmp_path / "bomb.png"
    make.bomb(path, 9_000, 9_000)  # 81 MP: above our limit, below Pillow's own bomb threshold
    with pytest.raises(ImageError, match="decompression bomb"):
        probe_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        probe_image(tmp_path / "nope.png")
