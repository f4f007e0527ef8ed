"""benchmarks/bench_tread.py (``python -m benchmarks tread``): a short CPU run of the smallest sizes (the routed
step saves activations, a ratio-0 route gives the plain loss), the refusals before any model is built, and the
GPU sizes' on-device construction. The timings themselves are the benchmark's to report, not asserted here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_tread

    return bench_tread


@pytest.mark.parametrize("size", ["flux_small", "sd3_small"])
def test_a_short_cpu_run_routes_saves_activations_and_ratio_zero_is_the_plain_loss(size):
    bench = _bench()
    result = bench.measure(size, ["0.5:2:-2"], steps=1, warmup=0, device="cpu", dtype="fp32", batch=1)
    plain, routed = result["rows"]
    assert (plain["variant"], routed["variant"]) == ("plain", "0.5:2:-2")
    assert result["blocks"] == 6 and result["image_tokens"] == 64
    assert result["ratio0_equal"] and result["ratio0_loss"] == result["plain_loss"]
    assert plain["finite"] and routed["finite"] and math.isfinite(routed["first_loss"])
    assert routed["first_loss"] != plain["first_loss"]  # half the image tokens skipped blocks 2-4
    # blocks 2-4 of 6 see 32 of 64 image tokens: fewer activations kept for backward, but not none
    assert 0.5 * plain["saved_mb"] < routed["saved_mb"] < 0.95 * plain["saved_mb"]
    assert routed["step_s"] > 0 and routed["ratio"] == routed["step_s"] / plain["step_s"]


def test_gpu_sizes_and_bad_routes_are_refused_before_a_model_is_built(monkeypatch):
    bench = _bench()

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(bench, "Stepper", no_model)
    with pytest.raises(SystemExit, match="flux_dev is GPU-sized"):
        bench.main(["--sizes", "flux_dev"])
    with pytest.raises(SystemExit, match="flux_small has 6 transformer blocks"):
        bench.main(["--sizes", "flux_small", "--routes", "0.5:2:8"])
    with pytest.raises(SystemExit, match="write RATIO:START:END"):
        bench.main(["--sizes", "flux_small", "--routes", "0.5:2"])
    with pytest.raises(SystemExit, match="unknown size"):
        bench.main(["--sizes", "flux_huge"])


def test_a_gpu_size_is_made_on_the_device_in_the_compute_dtype(monkeypatch):
    """flux_dev's path (meta, then empty weights on the device, drawn there) on a small config and the CPU."""
    import torch

    bench = _bench()
    monkeypatch.setitem(bench.SIZES, "flux_gpu_like", {**bench.SIZES["flux_small"], "gpu": True})
    model, family = bench.build("flux_gpu_like", "cpu", torch.bfloat16)
    params = list(model.parameters())
    assert family.name == "flux" and {p.device.type for p in params} == {"cpu"}
    assert {p.dtype for p in params} == {torch.bfloat16} and not any(p.requires_grad for p in params)
    weight = model.transformer_blocks[0].attn.to_q.weight.float()
    assert abs(float(weight.std()) - 0.02) < 0.002
