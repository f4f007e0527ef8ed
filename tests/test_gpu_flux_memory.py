"""benchmarks/gpu_flux_memory.py, the GPU check of issue 19 (and of ``--base-weights-dtype nf4|int8``):
its arguments, the FLUX.1-shape plan per storage, tiny CPU dry runs, and benchmarks/gpu_session.sh's
check table (the GPU runs themselves need a lent GPU; see the scripts' docstrings)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SESSION = ROOT / "benchmarks" / "gpu_session.sh"


@pytest.fixture(autouse=True)
def _torch_attention_kernels_restored():
    """The script sets torch's process-wide SDPA kernel switches (``--sdpa``, default ``no-cudnn``) as a
    GPU job should; in the test process they go back afterwards, so later tests see torch's defaults."""
    torch = pytest.importorskip("torch")
    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    yield
    cuda.enable_cudnn_sdp(before[0])
    cuda.enable_flash_sdp(before[1])
    cuda.enable_mem_efficient_sdp(before[2])


def _script():
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_flux_memory

    return gpu_flux_memory


def test_arguments_default_to_the_issue_check_and_bad_values_are_refused(capsys):
    script = _script()
    args = script.parse_args([])
    assert (args.size, args.device, args.mixed_precision, args.base_weights_dtype, args.checkpointing) == (
        "flux",
        "cuda",
        "bf16",
        "fp8",
        True,
    )
    assert script.variant_of(args) == "fp8+checkpointing"
    assert script.variant_of(script.parse_args(["--no-fp8", "--no-checkpointing"])) == "plain"
    for bad in (["--steps", "0"], ["--blocks-to-swap", "-1"], ["--size", "huge"], ["--base-weights-dtype", "int4"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_base_weights_dtype_names_the_variant_and_no_fp8_is_none():
    script = _script()
    from benchmarks.bench_memory import variant_storage

    for storage in ("none", "fp8", "nf4", "int8"):
        args = script.parse_args(["--base-weights-dtype", storage])
        assert args.base_weights_dtype == storage
        variant = script.variant_of(args)
        assert variant == ("checkpointing" if storage == "none" else f"{storage}+checkpointing")
        assert variant_storage(variant) == storage  # what FluxLoraStep hands to TrainOptions
    assert script.parse_args(["--no-fp8"]).base_weights_dtype == "none"
    with pytest.raises(SystemExit):  # one storage: the two spellings together are refused
        script.parse_args(["--no-fp8", "--base-weights-dtype", "nf4"])


def test_flux_size_plan_only_counts_flux_dev_shapes_per_storage():
    """The estimate for FLUX.1's shape from a meta-device model (no weights): the weight part per
    storage follows sdcore.dtypes' bytes per element (bf16 2, fp8 1, nf4 0.5 + 4/64, int8 1 + 4 per row)."""
    import torch
    from diffusers import FluxTransformer2DModel

    script = _script()
    from benchmarks.bench_memory import flux_config

    plans = {
        storage: script.run(script.parse_args(["--plan-only", "--base-weights-dtype", storage]))
        for storage in ("none", "fp8", "nf4", "int8")
    }
    assert plans["fp8"]["estimate_line"].startswith("estimated peak memory: ")
    weights = {storage: plan["estimate_weights_mb"] for storage, plan in plans.items()}
    assert weights["nf4"] < weights["fp8"] < weights["int8"] < weights["none"]
    # FLUX.1-dev's transformer: 11.9 B parameters, nearly all in Linear weights; fp8 saves one byte each
    with torch.device("meta"):
        linears = [m for m in FluxTransformer2DModel(**flux_config("flux")).modules() if isinstance(m, torch.nn.Linear)]
    elements_mb = sum(m.in_features * m.out_features for m in linears) / 2**20
    assert 11_000 < elements_mb < 11_500
    assert weights["none"] - weights["fp8"] == pytest.approx(elements_mb, rel=1e-9)
    assert plans["fp8"]["estimate_mb"] < 0.6 * plans["none"]["estimate_mb"]
    # nf4 stores 0.5 + 4/64 bytes where fp8 stores 1: 0.4375 bytes less per element
    assert weights["fp8"] - weights["nf4"] == pytest.approx(0.4375 * elements_mb, rel=1e-9)
    # int8 adds one fp32 maximum per output row
    rows = sum(m.out_features for m in linears)
    assert weights["int8"] - weights["fp8"] == pytest.approx(4 * rows / 2**20, rel=1e-9)
    for storage in ("fp8", "nf4", "int8"):  # only the weights differ between the storages
        assert plans[storage]["estimate_mb"] - weights[storage] == pytest.approx(
            plans["none"]["estimate_mb"] - weights["none"], rel=1e-9
        )


@pytest.mark.parametrize("storage", ["nf4", "int8"])
def test_tiny_cpu_dry_run_with_a_packed_base_prints_estimate_and_stored_weights(storage, capsys):
    """In this process (the subprocess path is the test below): the packed model trains a step, and
    its parameters and buffers as converted match the plan's weight part."""
    script = _script()
    result = script.main(
        ["--size", "tiny", "--device", "cpu", "--base-weights-dtype", storage, "--steps", "1", "--sdpa", "default"]
    )
    out = capsys.readouterr().out
    assert f"tiny {storage}+checkpointing swap=0: estimated peak memory:" in out
    assert f"weights as stored ({storage} base + fp32 LoRA): " in out and "step 1: loss" in out
    assert f"cpu dry run ({storage} base," in out
    # nf4 pads each layer to a multiple of 64 elements; the plan counts the formula
    assert result["stored_weights_mb"] == pytest.approx(result["estimate_weights_mb"], rel=1e-3)
    assert len(result["losses"]) == 1 and math.isfinite(result["losses"][0])


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
    assert "step 2: loss" in out.stdout and "cpu dry run (fp8 base," in out.stdout


def test_tiny_cpu_compare_offload_runs_both_and_the_losses_agree(capsys):
    """--compare-offload: plain checkpointing, then --cpu-offload-checkpointing, in one process; on the CPU the
    plan moves nothing (host and device are one memory) and the losses are equal."""
    script = _script()
    result = script.main(["--size", "tiny", "--device", "cpu", "--steps", "2", "--no-fp8", "--compare-offload"])
    out = capsys.readouterr().out
    assert result["losses_equal"] is True and len(result["plain"]["losses"]) == 2
    assert result["offloaded"]["cpu_offload_checkpointing"] and not result["plain"]["cpu_offload_checkpointing"]
    assert "offload: plan -0 MiB on the device, 0 MiB in host memory; losses equal: True" in out
    stack = script.main(["--size", "stack", "--no-fp8", "--plan-only", "--compare-offload"])
    assert stack["offloaded"]["estimate_host_mb"] > 0
    moved = stack["plain"]["estimate_activations_mb"] - stack["offloaded"]["estimate_activations_mb"]
    assert 0 < moved < stack["offloaded"]["estimate_host_mb"]  # the device keeps two block inputs of them
    with pytest.raises(SystemExit):
        script.parse_args(["--cpu-offload-checkpointing", "--blocks-to-swap", "2"])


def _session_table() -> tuple[list[str], dict[str, int], dict[str, str]]:
    text = SESSION.read_text()
    defaults = re.search(r"checks=\$\{\*:-([^}]*)\}", text)
    limits = re.search(r"declare -A limit=\(([^)]*)\)", text)
    assert defaults and limits
    limit = {name: int(value) for name, value in re.findall(r"\[(\w+)\]=(\d+)", limits[1])}
    commands = dict(re.findall(r"^ +(\w+)\) echo \"([^\"]+)\" ;;$", text, re.MULTILINE))
    return defaults[1].split(), limit, commands


def test_gpu_session_orders_the_checks_and_gives_each_a_limit_and_a_command():
    names, limit, commands = _session_table()
    assert names[:5] == ["flux_fp8", "flux_offload", "flux_nf4", "sample_cache", "flux_int8"]
    assert limit["flux_offload"] <= 40 and "--size stack" in commands["flux_offload"]
    assert "--compare-offload" in commands["flux_offload"]
    assert len(set(names)) == len(names)
    for name in names:
        assert 30 <= limit[name] <= 200, name  # the loop skips a check with under 30 s left
        assert commands[name].startswith("python3 "), name
    assert "--base-weights-dtype nf4 --steps 2" in commands["flux_nf4"]
    assert "--base-weights-dtype int8 --steps 2" in commands["flux_int8"]
    assert "--device cuda" in commands["sample_cache"] and "--dtype bf16" in commands["sample_cache"]
    # the first four fit the default budget when each takes about half its cap (the estimate in the script)
    budget = int(re.search(r"budget=\$\{1:-(\d+)\}", SESSION.read_text())[1])  # type: ignore[index]
    assert 400 <= budget <= 460
    assert sum(limit[n] for n in names[:4]) / 2 < budget


def test_gpu_session_commands_parse_here(monkeypatch):
    """Each default check's command line parses with the scripts' own argument parsers (nothing runs)."""
    names, _, commands = _session_table()
    script = _script()
    from benchmarks import bench_sample_cache

    class Parsed(Exception):
        pass

    def measure(*args):  # the first measurement's arguments, then stop
        raise Parsed(args)

    monkeypatch.setattr(bench_sample_cache, "measure", measure)
    from benchmarks import bench_tread

    monkeypatch.setattr(bench_tread, "measure", measure)
    for name in names:
        words = commands[name].replace("$sdpa", "no-cudnn").replace("$out", "/tmp").split()
        if words[1] == "benchmarks/gpu_flux_memory.py":
            script.parse_args(words[2:])
        elif words[1:4] == ["-m", "benchmarks", "sample_cache"]:
            assert words[4] == "--"
            with pytest.raises(Parsed) as parsed:
                bench_sample_cache.main(words[5:])
            size, _algo, steps, _repeat, device, dtype = parsed.value.args[0]
            assert (size, steps, device, dtype) == ("sd15_512", 20, "cuda", "bf16")
        elif words[1:4] == ["-m", "benchmarks", "tread"]:
            assert words[4] == "--"
            with pytest.raises(Parsed) as parsed:
                bench_tread.main(words[5:])
            size, routes, steps, _warmup, device, dtype, _batch = parsed.value.args[0]
            assert (size, steps, device, dtype) == ("flux_dev", 3, "cuda", "bf16")
            assert routes == ["0.5:2:-2", "0.25:2:-2"]


def test_sample_cache_network_builds_where_the_unet_is():
    """The session's sample_cache check builds the UNet on the GPU: DoRA's magnitude is made there
    from the base weight, and the CPU-drawn noise has to follow it (the meta device stands in for CUDA)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_sample_cache import _network
    from benchmarks.bench_train import build_bundle

    bundle = build_bundle("tiny")
    bundle.unet.to("meta")
    network = _network(bundle, "dora", 4, "meta")
    assert {p.device.type for p in network.parameters()} == {"meta"}
    assert any(name.endswith("dora_scale") for name, _ in network.named_parameters())


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_session_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(SESSION)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
