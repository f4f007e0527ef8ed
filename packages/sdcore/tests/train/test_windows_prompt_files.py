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


COMMAND = (
    "accelerate launch train_dreambooth_lora.py --instance_data_dir=dog --instance_prompt='a sks dog' \\\r\n"
    "  --validation_prompt='a sks dog in a bucket' --output_dir=out\r\n"
)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
@pytest.mark.parametrize("name", ["train.txt", "train"])
def test_diffusers_command_in_a_txt_file_still_gives_its_validation_prompt(
    tmp_path: Path, encoding: str, name: str
) -> None:
    """A .txt (or no-suffix) file is decoded as a prompt file first (an undecodable one is named a prompt file);
    a decodable one that runs a diffusers script is still read as that command, not as a prompt line."""
    path = tmp_path / name
    path.write_bytes(COMMAND.encode(encoding))
    assert [p.prompt for p in read_sample_prompts(str(path))] == ["a sks dog in a bucket"]


def test_undecodable_command_files_name_what_they_were_read_as(tmp_path: Path) -> None:
    """An undecodable .txt is reported as a prompt file (what --sample-prompts takes it for); a .sh stays a command
    file, as before: one ConfigError each, nothing read in silence."""
    raw = COMMAND.encode("utf-16-le")  # no BOM
    txt, sh = tmp_path / "train.txt", tmp_path / "train.sh"
    txt.write_bytes(raw)
    sh.write_bytes(raw)
    with pytest.raises(ConfigError) as info:
        read_sample_prompts(str(txt))
    assert str(info.value).startswith(f"--sample-prompts {txt}: prompt file looks like UTF-16 LE without a BOM")
    with pytest.raises(ConfigError) as info:
        read_sample_prompts(str(sh))
    assert str(info.value).startswith(f"{sh}: command file looks like UTF-16 LE without a BOM")
