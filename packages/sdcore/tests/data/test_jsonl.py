"""A diffusers JSONL dataset (:mod:`sdcore.data.jsonl`) read as diffusers' scripts read it:
``datasets.load_dataset("json", data_files=...)`` (examples/flux-control/train_control_lora_flux.py L634), which
parses JSON Lines with pyarrow's ``read_json``: records separated by ``\\n`` only, a leading UTF-8 BOM tolerated
(huggingface/datasets#8241: "PyArrow's read_json tolerates the BOM")."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from sdcore.data.jsonl import jsonl_rows


def _files(root: Path, n: int) -> list[dict[str, str]]:
    (root / "img").mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / "img" / f"t{i}.png")
        Image.new("RGB", (8, 8), (0, 40 * i, 0)).save(root / "img" / f"c{i}.png")
        rows.append({"image": f"img/t{i}.png", "conditioning_image": f"img/c{i}.png", "text": f"caption {i}"})
    return rows


def test_a_jsonl_saved_with_a_utf8_bom_reads_every_row(tmp_path):
    """Windows editors (Notepad, Excel exports) write UTF-8 with a BOM; the first row is a row like the others."""
    rows = _files(tmp_path, 2)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    found, problems = jsonl_rows(path)
    assert problems == []
    assert [(r.line, r.image.name, r.control.name, r.caption) for r in found] == [
        (1, "t0.png", "c0.png", "caption 0"),
        (2, "t1.png", "c1.png", "caption 1"),
    ]


def test_unicode_line_separators_inside_a_caption_do_not_split_its_row(tmp_path):
    """JSON strings may hold U+2028/U+2029/U+0085 unescaped (``json.dumps(..., ensure_ascii=False)`` writes them
    so); JSON Lines separates records by ``\\n`` only (``\\r\\n`` too), so the row stays whole and keeps its caption
    and the rows after it their line numbers."""
    rows = _files(tmp_path, 3)
    rows[0]["text"] = "a line\u2028separator"
    rows[1]["text"] = "next\u0085line and\u2029paragraph"
    path = tmp_path / "train.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode("utf-8"))
    found, problems = jsonl_rows(path)
    assert problems == []
    assert [(r.line, r.caption) for r in found] == [
        (1, "a line\u2028separator"),
        (2, "next\u0085line and\u2029paragraph"),
        (3, "caption 2"),
    ]


def test_a_caption_list_is_its_longest_for_the_control_scripts_and_kept_whole_in_an_imagefolder(tmp_path):
    """flux-control's train_control_lora_flux.py takes ``max(captions, key=len)``; the text_to_image scripts'
    imagefolder (no control column) draw ``random.choice(caption)`` at each use, so the row keeps the list."""
    rows = _files(tmp_path, 2)
    rows[0]["text"] = ["short", "the longest one", "mid one"]
    rows[1]["text"] = ["only"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    control, _ = jsonl_rows(path)
    assert [(r.caption, r.captions) for r in control] == [("the longest one", ()), ("only", ())]
    folder, _ = jsonl_rows(path, ("image", "", "text"))
    assert [(r.caption, r.captions) for r in folder] == [
        ("short", ("short", "the longest one", "mid one")),
        ("only", ()),  # one caption: nothing to draw
    ]
