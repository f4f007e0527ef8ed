"""A damaged ``.pt``/``.ckpt`` says what it is: its size, that it is damaged, cut short or no torch file, and
torch's words with their type. A junk file said "not a readable torch file (1785425525)", a bare KeyError's key."""

from __future__ import annotations

import pytest
import torch
from sdcore.errors import ModelFormatError
from sdcore.models.safe_pickle import load_pickle


def _files(tmp_path):
    torch.save({"a": torch.zeros(3)}, tmp_path / "zip.pt")
    torch.save({"a": torch.zeros(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    whole, legacy = (tmp_path / "zip.pt").read_bytes(), (tmp_path / "legacy.pt").read_bytes()
    return {
        "half-zip.pt": (whole[: len(whole) // 2], "RuntimeError: PytorchStreamReader failed reading zip archive: "
                        "failed finding central directory)"),
        "cut-legacy.pt": (legacy[:-20], "RuntimeError: unexpected EOF, expected 8 more bytes)"),
        "junk.pt": (b"\x80\x02junkjunkjunk", "KeyError: 1785425525)"),
        "one-byte.pt": (b"\x80", "IndexError: index out of range)"),
    }  # fmt: skip


def test_a_damaged_torch_file_says_its_size_and_what_torch_said(tmp_path):
    for name, (data, said) in _files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ModelFormatError) as info:
            load_pickle(path)
        message = str(info.value)
        assert message == (
            f"{path}: not a readable torch file ({len(data):,} bytes; damaged, cut short or not a torch file; "
            f"torch said {said}"
        ), message
        assert "\n" not in message and "high likelihood" not in message  # miniz's further sentences cut
