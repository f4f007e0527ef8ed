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


@pytest.mark.parametrize(
    ("raw", "name", "offsets"),
    [
        ("cat, 1girl\r\n".encode("utf-16-le"), "UTF-16 LE", "odd"),  # c 00 a 00 t 00 ...
        # 00 c 00 a ... (日 本 hold no NUL); not UTF-8 (0xE9), once called a Windows code page
        ("café, 日本\n".encode("utf-16-be"), "UTF-16 BE", "even"),
    ],
)
def test_utf16_without_bom_is_refused_not_trained_as_nul_text(
    tmp_path: Path, raw: bytes, name: str, offsets: str
) -> None:
    if name == "UTF-16 LE":  # ASCII in UTF-16 is valid UTF-8 (NUL is a valid byte): it trained 'c\x00a\x00t\x00...'
        assert raw.decode("utf-8").startswith("c\x00a\x00t\x00")
    image = _image(tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_caption(image)
    assert str(info.value) == (
        f"{tmp_path / 'x.txt'}: caption file looks like {name} without a BOM (its NUL bytes all at {offsets} offsets): "
        f"save it as UTF-8 (Notepad: Save as, Encoding UTF-8; iconv -f {name.replace(' ', '')} -t UTF-8)"
    )


@pytest.mark.parametrize(
    ("raw", "first"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 8),  # an image saved as .txt
        (b"a red\x00car", 5),  # one NUL, even length 9: odd, so no UTF-16 either way
        ("cat\0".encode("utf-16-le"), 1),  # NULs at 1, 3, 5 and 6, 7: not all odd
        (b"\x00\x01\x00\x02", 0),  # even offsets, but U+0001 and U+0002 are not text
    ],
)
def test_other_nul_bytes_are_a_binary_file(tmp_path: Path, raw: bytes, first: int) -> None:
    path = tmp_path / "x.caption"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_caption_text(path, "caption file")
    assert str(info.value) == f"{path}: caption file holds NUL bytes (the first at {first}): a binary file, not text"


@pytest.mark.parametrize(
    ("text", "codec", "name", "side"),
    [
        # 一 (U+4E00) is 00 4E in LE: a NUL on an even offset among the ASCII ones on odd offsets (was "binary")
        ("1girl, 一人, 笑顔\r\n", "utf-16-le", "UTF-16 LE", "mostly at odd"),
        ("1girl, 一人, 笑顔\r\n", "utf-16-be", "UTF-16 BE", "mostly at even"),
        # the shortest files: one to three characters
        ("a", "utf-16-le", "UTF-16 LE", "all at odd"),
        ("a", "utf-16-be", "UTF-16 BE", "all at even"),
        ("ok", "utf-16-le", "UTF-16 LE", "all at odd"),
        ("é!\n", "utf-16-be", "UTF-16 BE", "all at even"),
    ],
)
def test_utf16_without_bom_named_with_cjk_and_in_short_files(
    tmp_path: Path, text: str, codec: str, name: str, side: str
) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(text.encode(codec))
    with pytest.raises(DataError) as info:
        read_caption_text(path)
    assert f"caption file looks like {name} without a BOM (its NUL bytes {side} offsets)" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "first"),
    [
        (b"\x00", 0),  # one byte
        (b"a\x00b", 1),  # odd length: no UTF-16
        (b"\x01\x00", 1),  # LE U+0001: a control; BE: its NUL is on the low-byte side
        (b"\x00\x00", 0),  # U+0000 either way
        (b"\x00\x01\x00\x02", 0),  # ĀȀ in LE, but both NULs on LE's low-byte side; U+0001 U+0002 in BE
        (b"a\x00b\x00\x3d\xd8", 1),  # LE: ends in a lone surrogate (D83D) that does not decode
        (b"\x00\x4ea\x00", 0),  # one NUL on each side: 一a in LE, N愀 in BE, no evidence either way
    ],
)
def test_short_files_with_nul_bytes_are_binary_not_utf16(tmp_path: Path, raw: bytes, first: int) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_caption_text(path)
    assert str(info.value) == f"{path}: caption file holds NUL bytes (the first at {first}): a binary file, not text"


@pytest.mark.parametrize("codec", ["utf-32", "utf-32-be"])
def test_utf32_is_named_not_called_binary(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "x.txt"
    raw = "cat".encode(codec)
    path.write_bytes(raw if codec == "utf-32" else b"\x00\x00\xfe\xff" + raw)  # Python's "utf-32": LE with a BOM
    with pytest.raises(DataError) as info:
        read_caption_text(path)
    assert str(info.value) == (
        f"{path}: caption file is UTF-32 (its BOM says so): save it as UTF-8 (Notepad: Save as, Encoding UTF-8)"
    )


def test_utf8_text_without_nul_is_read_whatever_its_script(tmp_path: Path) -> None:
    """No UTF-8 text holds a NUL byte (every byte of a multi-byte character is >= 0x80): nothing legitimate is
    refused, however many characters it has."""
    text = "1girl, 一人, 笑顔, ĀȀ, café, emoji 🙂\tx\r\n" * 20000  # ~1 MB
    path = tmp_path / "x.txt"
    path.write_bytes(text.encode("utf-8"))
    assert read_caption_text(path) == text


def test_utf16_with_bom_holding_u0000_is_binary(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_bytes("a\0b".encode("utf-16"))
    with pytest.raises(DataError, match=r"holds NUL characters \(U\+0000\): a binary file, not text"):
        read_caption_text(path)


def test_data_check_lists_utf16_without_bom_and_binary_captions(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner
    from sdcore.builtin.data_commands import data_group

    data = tmp_path / "data"
    data.mkdir()
    for name in ("good", "le", "bin"):
        _image(data / f"{name}.png")
    (data / "good.txt").write_text("a red square", encoding="utf-8")
    (data / "le.txt").write_bytes("a red square".encode("utf-16-le"))
    (data / "bin.txt").write_bytes(b"\x00\x01\x02\x03")
    args = ["check", str(data), "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "64"]
    result = CliRunner().invoke(data_group, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 1
    assert sorted((s["path"], s["reason"].split(": ")[1]) for s in report["skipped"]) == [
        ("bin.png", "caption file holds NUL bytes (the first at 0)"),
        ("le.png", "caption file looks like UTF-16 LE without a BOM (its NUL bytes all at odd offsets)"),
    ]
    text = CliRunner().invoke(data_group, args)
    assert text.exit_code == 0 and "Traceback" not in text.output
    assert "skipped files (2)" in text.output and "le.txt: caption file looks like UTF-16 LE" in text.output
