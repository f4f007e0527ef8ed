"""Class images' captions from Windows: the captions' one decoding rule decides whether an image's caption is the
class prompt (a UTF-8 BOM is not part of it); a cp1252 caption is a clear error, not a UnicodeDecodeError."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sdcore.errors import ConfigError
from sdplugin_dreambooth.class_images import existing_class_images


def _image(folder: Path, name: str, caption: bytes) -> Path:
    path = folder / f"{name}.png"
    Image.new("RGB", (8, 8)).save(path)
    path.with_suffix(".txt").write_bytes(caption)
    return path


def test_bom_and_utf16_captions_match_the_prompt(tmp_path: Path) -> None:
    a = _image(tmp_path, "a", "photo of a café\r\n".encode("utf-8-sig"))
    b = _image(tmp_path, "b", "photo of a café".encode("utf-16"))
    _image(tmp_path, "c", b"photo of a dog")
    assert existing_class_images(tmp_path, "photo of a café") == [a, b]


def test_cp1252_caption_is_a_clear_error(tmp_path: Path) -> None:
    _image(tmp_path, "a", "photo of a café".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"class images: .*a\.txt: caption file is not UTF-8 \(byte 0xE9"):
        existing_class_images(tmp_path, "photo of a café")
