"""Caption writing modes: an existing caption is only ever replaced by ``overwrite``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdcore.errors import ConfigError
from sdplugin_taggers.writer import CaptionWriter, caption_path, jsonl_output, merge_tags


def test_caption_path_and_ext() -> None:
    assert caption_path("/d/photo.png") == Path("/d/photo.txt")
    assert caption_path("/d/photo.png", "caption") == Path("/d/photo.caption")
    with pytest.raises(ConfigError):
        caption_path("/d/photo.png", "")
    with pytest.raises(ConfigError):
        CaptionWriter("replace")
    with pytest.raises(ConfigError, match="overwrite the images"):
        CaptionWriter("overwrite", ext="PNG")


def test_merge_dedupes_by_normalized_tag() -> None:
    existing = ["mytrigger", "long_hair", "smile"]
    new = ["1girl", "long hair", "Smile", "blue eyes"]
    assert merge_tags(existing, new, "append") == ["mytrigger", "long_hair", "smile", "1girl", "blue eyes"]
    assert merge_tags(existing, new, "prepend") == ["1girl", "long hair", "Smile", "blue eyes", "mytrigger"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("skip", "old tag, long hair\n"),
        ("overwrite", "1girl, long hair\n"),
        ("append", "old tag, long hair, 1girl\n"),
        ("prepend", "1girl, long hair, old tag\n"),
    ],
)
def test_modes_on_existing_caption(tmp_path: Path, mode: str, expected: str) -> None:
    image = tmp_path / "x.png"
    (tmp_path / "x.txt").write_text("old tag, long hair\n", encoding="utf-8")
    writer = CaptionWriter(mode)
    assert writer.skips(image) is (mode == "skip")
    writer.write(image, ["1girl", "long hair"])
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == expected


@pytest.mark.parametrize("mode", ["skip", "overwrite", "append", "prepend"])
def test_modes_without_existing_caption_write(tmp_path: Path, mode: str) -> None:
    writer = CaptionWriter(mode, ext=".caption")
    assert writer.write(tmp_path / "y.jpg", ["a", "b"]) == "written"
    assert (tmp_path / "y.caption").read_text(encoding="utf-8") == "a, b\n"
    assert writer.counts["written"] == 1


def test_unreadable_existing_caption_is_never_destroyed(tmp_path: Path) -> None:
    target = tmp_path / "z.txt"
    # not UTF-8 and no BOM (a BOM FF FE now reads as UTF-16: Notepad's "Unicode", read since it is unambiguous)
    target.write_bytes(b"\xfe\x00binary\x80")
    for mode in ("append", "prepend"):
        writer = CaptionWriter(mode)
        assert writer.write(tmp_path / "z.png", ["1girl"]) == "kept"
        assert target.read_bytes() == b"\xfe\x00binary\x80"
        # its NUL byte makes it binary (UTF-8 would accept the NUL and stop at 0x80)
        assert "holds NUL bytes (the first at 1): a binary file, not text; left as is" in writer.problems[0]


@pytest.mark.parametrize("mode", ["overwrite", "append", "prepend"])
def test_a_read_only_caption_is_kept_and_the_others_written(tmp_path: Path, mode: str) -> None:
    guarded = tmp_path / "a.txt"
    guarded.write_text("hand written\n", encoding="utf-8")
    guarded.chmod(0o444)
    writer = CaptionWriter(mode)
    assert writer.write(tmp_path / "a.png", ["1girl"]) == "kept"
    assert writer.write(tmp_path / "b.png", ["1girl"]) == "written"
    assert guarded.read_text(encoding="utf-8") == "hand written\n"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "1girl\n"
    assert writer.counts["kept"] == 1 and writer.counts["written"] == 1
    assert writer.problems == [
        f"{guarded} is read-only (mode -r--r--r--): left as it is; make it writable (chmod u+w) to replace it"
    ]


def test_failed_write_keeps_old_caption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    target = tmp_path / "w.txt"
    target.write_text("precious\n", encoding="utf-8")

    def boom(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(Exception, match="No space left"):
        CaptionWriter("overwrite").write(tmp_path / "w.png", ["new"])
    assert target.read_text(encoding="utf-8") == "precious\n"
    assert [p.name for p in tmp_path.iterdir()] == ["w.txt"]


def test_jsonl_output_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "tags.jsonl"
    with jsonl_output(out) as writer:
        assert writer is not None
        writer.write({"image_path": "a.png", "caption": "x"})
        assert not out.exists()  # appears only when complete
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"image_path": "a.png", "caption": "x"}
    ]


@pytest.mark.parametrize("content", [b"", b"\r\n", b"\xef\xbb\xbf", b"  \n\n"])
def test_skip_mode_fills_an_empty_caption_file(tmp_path: Path, content: bytes) -> None:
    # `sdcore data check` lists an empty caption file as a problem (training falls back to the
    # folder's class tokens); the tagger's default mode must fill it, not leave it empty as
    # "caption exists". Only blank files count as empty: a BOM, spaces and line ends carry no tag.
    image = tmp_path / "e.jpg"
    (tmp_path / "e.txt").write_bytes(content)
    writer = CaptionWriter("skip")
    assert writer.skips(image) is False
    assert writer.write(image, ["1girl", "solo"]) == "written"
    assert (tmp_path / "e.txt").read_text(encoding="utf-8") == "1girl, solo\n"


def test_skip_mode_keeps_a_non_blank_or_unreadable_caption(tmp_path: Path) -> None:
    for name, content in (("a", b"\xef\xbb\xbfmytag\r\n"), ("b", b"\xff\xfe\x00binary\x80")):
        (tmp_path / f"{name}.txt").write_bytes(content)
        writer = CaptionWriter("skip")
        assert writer.skips(tmp_path / f"{name}.png") is True
        assert writer.write(tmp_path / f"{name}.png", ["new"]) == "skipped"
        assert (tmp_path / f"{name}.txt").read_bytes() == content
