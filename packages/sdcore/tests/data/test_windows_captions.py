"""Caption files saved by Windows Notepad, read by every reader of captions through the one decoding rule
(``sdcore.data.captions.read_caption_text``): training, ``data check``, ``data preprocess --captions copy`` and
the taggers' ``append``/``prepend``.

Notepad's encodings, written here byte for byte: "UTF-16 LE" (and "UTF-16 BE") with a BOM, "UTF-8 with BOM",
and ANSI (cp1252 on western Windows: ``café`` ends with the byte 0xE9). kohya reads captions with
``open(encoding="utf-8")``: a UTF-16 caption and a cp1252 one both stop it with UnicodeDecodeError. A BOM names
UTF-16 without doubt, so sdcore reads it; a code page is a guess, so it is refused, saying what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sdcore.data.captions import read_caption, read_caption_text
from sdcore.errors import DataError


def _image(path: Path) -> Path:
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path, format="PNG")
    return path


@pytest.mark.parametrize(
    "raw",
    [
        "café, 1girl\r\nsecond line\r\n".encode("utf-16"),  # Notepad "UTF-16 LE": BOM FF FE
        b"\xfe\xff" + "café, 1girl\r\n".encode("utf-16-be"),  # Notepad "UTF-16 BE"
        b"\xef\xbb\xbf" + "café, 1girl\r\n".encode(),  # Notepad "UTF-8 with BOM"
        b"\r\n\r\ncaf\xc3\xa9, 1girl\r\n",  # leading blank lines, CRLF
        b"caf\xc3\xa9, 1girl\rsecond\r",  # classic Mac line ends (a lone CR)
    ],
)
def test_notepad_encodings_read_as_the_same_caption(tmp_path: Path, raw: bytes) -> None:
    image = _image(tmp_path / "x.PNG")
    (tmp_path / "x.txt").write_bytes(raw)
    assert read_caption(image) == "café, 1girl"


def test_cp1252_caption_is_refused_naming_the_byte_and_the_fix(tmp_path: Path) -> None:
    image = _image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("café, smile".encode("cp1252"))
    with pytest.raises(DataError) as info:
        read_caption(image)
    message = str(info.value)
    assert "x.txt" in message
    assert "0xE9 at 3" in message and "'é' in Windows-1252" in message
    assert "save it as UTF-8" in message


def test_broken_utf16_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(b"\xff\xfe" + b"a\x00\x00\xd8")  # a lone high surrogate
    with pytest.raises(DataError, match="UTF-16 BOM but is not UTF-16"):
        read_caption_text(path)


def test_preprocess_copy_reads_utf16_and_reports_cp1252(tmp_path: Path) -> None:
    from sdcore.data.preprocess import PreprocessOptions, preprocess

    src, dst = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    _image(src / "a.png")
    (src / "a.txt").write_bytes("naïve, hat".encode("utf-16"))
    _image(src / "b.png")
    (src / "b.txt").write_bytes("café".encode("cp1252"))
    report = preprocess(src, dst, PreprocessOptions(width=64, height=64, captions="copy"))
    assert (dst / "00000-0-a.txt").read_text(encoding="utf-8") == "naïve, hat"
    assert not list(dst.glob("*-b.*"))  # not copied as 'caf\ufffd'
    assert [(p.name, "0xE9" in why) for p, why in report.unreadable] == [("b.png", True)]
    # ignoring existing captions, the image is processed whatever its caption's encoding
    again = preprocess(src, tmp_path / "out2", PreprocessOptions(width=64, height=64, captions="ignore"))
    assert again.unreadable == [] and len(again.images_written) == 2


def test_tagger_append_merges_into_a_utf16_caption(tmp_path: Path) -> None:
    from sdplugin_taggers.writer import CaptionWriter

    image = _image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes("mychar, café".encode("utf-16"))
    writer = CaptionWriter("append")
    assert writer.write(image, ["smile"]) == "written"
    assert (tmp_path / "x.txt").read_text(encoding="utf-8").strip() == "mychar, café, smile"
    (tmp_path / "x.txt").write_bytes(b"caf\xe9")
    assert writer.write(image, ["smile"]) == "kept"
    assert "0xE9" in writer.problems[-1] and (tmp_path / "x.txt").read_bytes() == b"caf\xe9"
