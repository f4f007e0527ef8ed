"""Prompt and template files saved by Notepad: read through the captions' one decoding rule
(:func:`sdcore.data.captions.read_caption_text`), so a UTF-8 BOM does not become part of the first prompt, UTF-16 is
read, and a cp1252 file is one clear error instead of a UnicodeDecodeError or a prompt starting with U+FEFF."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdcore.train.sample_prompts import read_sample_prompts
from sdcore.train.templates import template_text

LINES = "café portrait --n blurry\r\na red car\r\n"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_sample_prompt_file_from_notepad(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(LINES.encode(encoding))
    prompts = read_sample_prompts(str(path))
    assert [p.prompt for p in prompts] == ["café portrait", "a red car"]
    assert prompts[0].negative == "blurry"


def test_sample_prompt_file_in_cp1252_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(LINES.encode("cp1252"))
    with pytest.raises(ConfigError, match=r"prompt file is not UTF-8 \(byte 0xE9 .*'é' in Windows-1252"):
        read_sample_prompts(str(path))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_template_file_from_notepad(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "mine.txt"
    path.write_bytes("a photo of [name], [filewords]\r\n".encode(encoding))
    _, text = template_text(str(path), package="sdplugin_ti", builtin=())
    assert text.splitlines() == ["a photo of [name], [filewords]"]


def test_template_file_in_cp1252_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_bytes("a café photo of [name]\r\n".encode("cp1252"))
    with pytest.raises(ConfigError, match="template is not UTF-8"):
        template_text(str(path), package="sdplugin_ti", builtin=())


@pytest.mark.parametrize(("encoding", "name"), [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_prompt_and_template_files_in_utf16_without_bom_are_one_clear_error(
    tmp_path: Path, encoding: str, name: str
) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(LINES.encode(encoding))
    with pytest.raises(ConfigError, match=f"prompt file looks like {name} without a BOM .*save it as UTF-8"):
        read_sample_prompts(str(path))
    with pytest.raises(ConfigError, match=f"template looks like {name} without a BOM"):
        template_text(str(path), package="sdplugin_ti", builtin=())
