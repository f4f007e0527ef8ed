"""Phrase lists of the BLIP+CLIP captioner (``--mediums FILE`` ...) read as every caption file does."""

from __future__ import annotations

import codecs

import pytest
from sdcore.errors import ConfigError
from sdplugin_taggers.caption import load_list


@pytest.mark.parametrize(
    "data",
    [
        b"oil painting\r\nwatercolor\r\n\r\noil painting\r\n",
        codecs.BOM_UTF8 + b"oil painting\nwatercolor\n",
        codecs.BOM_UTF16_LE + "oil painting\r\nwatercolor\r\n".encode("utf-16-le"),
    ],
    ids=["utf8-crlf-duplicate", "utf8-bom", "utf16-notepad"],
)
def test_phrase_lists_from_notepad_read_as_written(tmp_path, data):
    path = tmp_path / "mediums.txt"
    path.write_bytes(data)
    assert load_list(path) == ["oil painting", "watercolor"]


def test_a_code_page_list_names_the_byte_and_the_fix(tmp_path):
    path = tmp_path / "mediums.txt"
    path.write_bytes("café art\n".encode("cp1252"))
    with pytest.raises(ConfigError, match=r"phrase list is not UTF-8 \(byte 0xE9.*save it as UTF-8"):
        load_list(path)


def test_a_missing_list_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read phrase list"):
        load_list(tmp_path / "nope.txt")
