"""benchmarks/bench_generate.py (``python -m benchmarks generate``): a 2-step run of the tiny model gives sdcore's
and diffusers' images the same pixels (the same schedule, seed and prompt embeddings), a LoRA that changes the
picture on both sides the same way, and the refusals come before any model is built. The timings themselves are
the benchmark's to report, not asserted here."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_generate

    return bench_generate


def test_max_pixel_diff_is_the_largest_channel_difference():
    from PIL import Image

    bench = _bench()
    a = Image.new("RGB", (4, 4), (10, 200, 30))
    b = a.copy()
    b.putpixel((3, 1), (13, 190, 30))
    assert bench.max_pixel_diff(a, a) == 0
    assert bench.max_pixel_diff(a, b) == 10
    assert bench.max_pixel_diff(Image.new("L", (2, 2), 0), Image.new("L", (2, 2), 255)) == 255


def test_a_tiny_two_step_run_gives_diffusers_pixels_with_and_without_the_lora(tmp_path):
    bench = _bench()
    args = argparse.Namespace(steps=2, cfg=7.0, seed=3, repeat=1, session_images=2)
    result = bench.measure("tiny", "dpm++2m", args, tmp_path)
    assert (result["size"], result["sampler"], result["side"]) == ("tiny", "dpm++2m", 64)
    assert set(result["seconds"]) == {"sdcore", "diffusers", "sdcore lora", "diffusers lora (load+fuse per image)",
                                      "diffusers lora (fused once)", "sdcore lora, 2 images kept",
                                      "sdcore lora, 2 images fresh each"}  # fmt: skip
    assert result["session_images"] == 2 and result["max_pixel_diff_kept"] == 0  # kept: the same pixels
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert result["ratio"] == result["seconds"]["sdcore"] / result["seconds"]["diffusers"]
    assert result["max_pixel_diff"] <= 1  # float rounding at most
    assert result["lora_effect"] > 20  # the random LoRA changes the picture ...
    assert result["max_pixel_diff_lora"] <= 1  # ... and both sides agree on it
    assert (tmp_path / "bench-tiny" / "model_index.json").is_file()
    assert (tmp_path / "Lora" / "benchlora-tiny.safetensors").is_file()


def test_the_cli_commands_name_the_same_settings(tmp_path):
    bench = _bench()
    args = argparse.Namespace(steps=7, cfg=5.5, seed=11)
    commands = bench.cli_commands(tmp_path / "model", "dpm++2m", args, 64, tmp_path)
    ours, theirs = commands["sdcore generate"], commands["python -c diffusers"]
    assert ours[1:3] == ["generate", bench.PROMPT]
    for flag, value in (("--steps", "7"), ("--cfg", "5.5"), ("--seed", "11"), ("--size", "64x64"),
                        ("--sampler", "dpm++2m"), ("-m", str(tmp_path / "model")), ("-n", bench.NEGATIVE)):  # fmt: skip
        assert ours[ours.index(flag) + 1] == value
    assert theirs[3:] == [str(tmp_path / "model"), "DPMSolverMultistepScheduler",
                          "{'algorithm_type': 'dpmsolver++', 'solver_order': 2}", "7", "5.5", "11", "64",
                          str(tmp_path / "diffusers.png")]  # fmt: skip


def test_unknown_sizes_and_samplers_are_refused_before_a_model_is_built(monkeypatch):
    bench = _bench()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench, "prepare", no_model)
    with pytest.raises(SystemExit, match="unknown size huge; choose from tiny, mid"):
        bench.main(["--sizes", "tiny,huge"])
    with pytest.raises(SystemExit, match="unknown sampler 'warp'"):
        bench.main(["--samplers", "euler,warp"])
