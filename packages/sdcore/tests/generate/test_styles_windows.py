"""An A1111 ``styles.csv`` saved by Excel on Windows: UTF-8 with a BOM, "Unicode Text" UTF-16, ";" as the column
separator (Excel's CSV in locales with a decimal comma), or the Windows code page. A1111 reads the file with
``open(encoding="utf-8-sig")`` and a comma ``csv.DictReader``: the first works there, the others stop it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.generate.styles import read_styles

ROWS = 'name,prompt,negative_prompt\r\ncafé,"{prompt}, café au lait",blurry\r\n'


@pytest.mark.parametrize(
    "raw",
    [
        b"\xef\xbb\xbf" + ROWS.encode(),
        ROWS.encode("utf-16"),
        'name;prompt;negative_prompt\r\ncafé;"{prompt}, café au lait";blurry\r\n'.encode(),
    ],
)
def test_excel_styles_read(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes(raw)
    style = read_styles(path)["café"]
    assert (style.prompt, style.negative_prompt) == ("{prompt}, café au lait", "blurry")


def test_cp1252_styles_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes(ROWS.encode("cp1252"))
    with pytest.raises(ConfigError, match=r"styles file is not UTF-8 \(byte 0xE9.*save it as UTF-8"):
        read_styles(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_styles(tmp_path / "missing.csv")


def test_utf16_styles_without_bom_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_bytes(ROWS.encode("utf-16-le"))  # "Unicode Text" without its BOM
    with pytest.raises(ConfigError, match=r"styles file looks like UTF-16 LE without a BOM .*save it as UTF-8"):
        read_styles(path)


def test_comma_styles_whose_prompts_hold_semicolons_stay_comma_separated(tmp_path: Path) -> None:
    """The ';' reading is chosen by the header row only: a prompt with ';' in a comma file does not switch it."""
    path = tmp_path / "styles.csv"
    path.write_bytes(b'name,prompt,negative_prompt\r\nmoody,"{prompt}; dark; rain",bright;sunny\r\n')
    styles = read_styles(path)
    assert styles["moody"].prompt == "{prompt}; dark; rain"
    assert styles["moody"].negative_prompt == "bright;sunny"
