"""A 1,000-image folder tags with a progress bar and without memory growth."""

from __future__ import annotations

import io
import os
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from PIL import Image
from sdplugin_taggers.labeling import label_folder
from sdplugin_taggers.wd14 import WD14Tagger
from sdplugin_taggers.writer import CaptionWriter


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_thousand_images_bounded_memory(wd_v3: Path, tmp_path: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(1000):
        Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, 90)).save(folder / f"{i:04d}.jpg", quality=80)
    tagger = WD14Tagger(wd_v3, providers="cpu", batch_size=16, workers=2)

    warm = tmp_path / "warm"
    warm.mkdir()
    for i in range(100):
        (warm / f"{i}.jpg").write_bytes((folder / f"{i:04d}.jpg").read_bytes())
    label_folder(tagger, warm, writer=CaptionWriter("overwrite"), progress=False)

    before = rss_bytes()
    bar = io.StringIO()
    start = time.perf_counter()
    with redirect_stderr(bar):
        summary = label_folder(
            tagger, folder, writer=CaptionWriter("overwrite"), progress=True, json_path=tmp_path / "t.jsonl"
        )
    elapsed = time.perf_counter() - start
    growth = rss_bytes() - before

    assert summary.tagged == 1000 and summary.unreadable == 0
    assert summary.frequency["1girl"] == 1000
    assert len(list(folder.glob("*.txt"))) == 1000
    assert "1000/1000" in bar.getvalue()
    assert growth < 25 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert elapsed < 20, f"took {elapsed:.1f}s"
