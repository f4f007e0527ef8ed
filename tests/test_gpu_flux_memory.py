"""benchmarks/gpu_flux_memory.py, the GPU check of issue 19: its arguments and a tiny CPU dry run
(the GPU run itself needs a lent GPU; see the script's docstring)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_flux_memory

    return gpu_flux_memory


def test_arguments_default_to_the_issue_check_and_bad_values_are_refused(capsys):
    script = _script()
    args = script.parse_args([])
    assert (args.size, args.device, args.mixed_precision, args.fp8, args.checkpointing) == (
        "flux",
        "cuda",
        "bf16",
        True,
        True,
    )
    assert script.variant_of(args) == "fp8+checkpointing"
    assert script.variant_of(script.parse_args(["--no-fp8", "--no-checkpointing"])) == "plain"
    for bad in (["--steps", "0"], ["--blocks-to-swap", "-1"], ["--size", "huge"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_flux_size_plan_only_counts_flux_dev_shapes():
    """The estimate for FLUX.1's shape, from a meta-device model (no weights): fp8 halves the weights."""
    script = _script()
    fp8 = script.run(script.parse_args(["--plan-only"]))
    bf16 = script.run(script.parse_args(["--plan-only", "--no-fp8"]))
    assert fp8["estimate_line"].startswith("estimated peak memory: ")
    # FLUX.1-dev's transformer: 11.9 B parameters, nearly all in Linear weights; fp8 saves one byte each
    assert 11_000 < bf16["estimate_mb"] - fp8["estimate_mb"] < 11_500
    assert fp8["estimate_mb"] < 0.6 * bf16["estimate_mb"]


def test_tiny_cpu_dry_run_trains_and_prints_the_estimate():
    script = str(ROOT / "benchmarks" / "gpu_flux_memory.py")
    options = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--blocks-to-swap", "2", "--json"]
    out = subprocess.run(
        [sys.executable, script, *options],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "tiny fp8+checkpointing swap=2: estimated peak memory:" in out.stdout
    assert "step 2: loss" in out.stdout and "cpu dry run" in out.stdout
