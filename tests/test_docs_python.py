"""docs/training.md "Using sdcore from Python": the example runs as written, as an application's script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _example() -> str:
    doc = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = doc.split("## Using sdcore from Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_python_example_runs_and_reports_progress(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(_example(), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    # stdout holds only what the app printed: its progress lines, the LoRA's ranks, nothing from sdcore
    assert [re.fullmatch(r"lora (\d)/4 loss \d+\.\d{4}", line)[1] for line in lines[:4]] == ["1", "2", "3", "4"]
    assert re.fullmatch(r"\{4: \d+\}", lines[4])
    assert [line.split()[1] for line in lines[5:]] == [f"{n}/20" for n in range(1, 21)]
    assert (tmp_path / "loras" / "mine.safetensors").is_file() and (tmp_path / "embeddings" / "mychar.pt").is_file()
