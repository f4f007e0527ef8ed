"""The GPU check of issue 19: a FLUX.1-size LoRA step with gradient checkpointing and fp8 base
weights, its peak memory (``torch.cuda.max_memory_allocated``) against the memory plan's estimate;
``--base-weights-dtype nf4|int8`` makes the same check for the packed formats (whose layers
dequantise their weight per op, so their step time against fp8's is the other figure to read).

Nothing is downloaded: the transformer is diffusers' ``FluxTransformer2DModel`` with FLUX.1-dev's
shape (hidden 3072, 19 double + 38 single blocks, guidance embedding) and random weights, made on
the GPU in bf16 (the fp8/nf4/int8 conversion then runs there too). A rank-16 LoRA on every block Linear
trains in fp32 with AdamW under bf16 autocast, on 1024 px latents (4096 image tokens) and 512 T5
tokens, batch 1; the memory options are applied by the runtime's own code
(:class:`sdcore.train.memory_options.MemorySetup` and ``place_model``). The peak counter is reset
after setup, when the weights and the LoRA are resident, so the steps' peak covers weights, LoRA,
optimizer state and activations, which is what the estimate covers; the setup's own peak (the
bf16 -> stored-format conversion) is reported beside it. One call, a few minutes on an H100/H200:

    python benchmarks/gpu_flux_memory.py                       # fp8 base + gradient checkpointing
    python benchmarks/gpu_flux_memory.py --blocks-to-swap 20   # also block swap
    python benchmarks/gpu_flux_memory.py --base-weights-dtype nf4 --steps 2   # QLoRA's 4-bit base
    python benchmarks/gpu_flux_memory.py --no-fp8 --steps 2    # bf16 base (= --base-weights-dtype none)
    python benchmarks/gpu_flux_memory.py --size tiny --device cpu   # the CPU-side check (tests)
    python benchmarks/gpu_flux_memory.py --plan-only           # the estimate alone (no GPU needed)
    python benchmarks/gpu_flux_memory.py --size stack --no-fp8 --steps 2 --compare-offload
        # 12 FLUX.1 blocks at 1024 px: plain checkpointing, then --cpu-offload-checkpointing (one process)

It prints one line per step, the weights as stored against the plan's weight part, and a final
``peak ... estimate ... ratio`` line naming the storage and the mean step time after the first
(and JSON with ``--json``); the goal is a ratio within 0.75-1.25.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sdcore.train.options import BASE_WEIGHTS_DTYPES

    from benchmarks.bench_memory import FLUX_SIZES
    from benchmarks.common import SDPA_CHOICES

    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_flux_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="flux", choices=tuple(FLUX_SIZES), help="flux = FLUX.1's shape")
    parser.add_argument("--steps", type=int, default=3, help="LoRA steps to run (peak over all of them)")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a tiny dry run)")
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "fp16", "bf16"))
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument(
        "--base-weights-dtype",
        default="fp8",
        choices=BASE_WEIGHTS_DTYPES,
        help="how the frozen transformer weights are stored (none: the compute dtype), as the runtime's option",
    )
    storage.add_argument(
        "--no-fp8",
        dest="base_weights_dtype",
        action="store_const",
        const="none",
        help="the compute dtype's base weights (= --base-weights-dtype none; the first session's spelling)",
    )
    parser.add_argument(
        "--no-checkpointing", dest="checkpointing", action="store_false", help="without gradient checkpointing"
    )
    parser.add_argument("--blocks-to-swap", type=int, default=0, help="also keep N blocks' weights on the CPU")
    parser.add_argument(
        "--cpu-offload-checkpointing", action="store_true", help="checkpointed block inputs in host memory"
    )
    parser.add_argument(
        "--compare-offload",
        action="store_true",
        help="run plain checkpointing, then --cpu-offload-checkpointing, and compare peaks, plans and losses",
    )
    parser.add_argument("--plan-only", action="store_true", help="print the estimate only (no weights, no GPU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    parser.add_argument(
        "--sdpa", default="no-cudnn", choices=SDPA_CHOICES, help="attention kernels torch may use (as the runtime)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.blocks_to_swap < 0:
        parser.error("--blocks-to-swap must be 0 or more")
    if (args.cpu_offload_checkpointing or args.compare_offload) and (args.blocks_to_swap or not args.checkpointing):
        parser.error("--cpu-offload-checkpointing is gradient checkpointing, and not with --blocks-to-swap")
    return args


def variant_of(args: argparse.Namespace) -> str:
    """The :class:`benchmarks.bench_memory.FluxLoraStep` variant: the storage, then checkpointing."""
    storage = args.base_weights_dtype
    parts = [name for name, on in ((storage, storage != "none"), ("checkpointing", args.checkpointing)) if on]
    return "+".join(parts) or "plain"


def stored_mb(step: Any) -> float:
    """MiB of the transformer's weights as stored (parameters and buffers: nf4/int8 codes and their
    maxima are buffers) plus the LoRA factors: what the plan's weight part counts when nothing is swapped."""
    tensors = [*step.model.parameters(), *step.model.buffers(), *step.factors]
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from benchmarks.bench_memory import FluxLoraStep
    from benchmarks.common import set_sdpa

    set_sdpa(args.sdpa)
    cuda = args.device.startswith("cuda")
    if cuda and not args.plan_only:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device here: run with --device cpu --size tiny, or --plan-only")
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step = FluxLoraStep(
        args.size,
        variant_of(args),
        args.device,
        mixed_precision=args.mixed_precision,
        blocks_to_swap=args.blocks_to_swap,
        plan_only=args.plan_only,
        cpu_offload_checkpointing=args.cpu_offload_checkpointing,
    )
    estimate = step.estimate("cuda" if cuda else "cpu")
    result: dict[str, Any] = {
        "size": args.size,
        "variant": variant_of(args),
        "base_weights_dtype": args.base_weights_dtype,
        "blocks_to_swap": args.blocks_to_swap,
        "cpu_offload_checkpointing": args.cpu_offload_checkpointing,
        "mixed_precision": args.mixed_precision,
        "device": args.device,
        "sdpa": args.sdpa,
        "estimate_line": estimate.line(),
        "estimate_mb": estimate.total / MIB,  # on a GPU: no runtime part
        "estimate_weights_mb": estimate.weights / MIB,
        "estimate_activations_mb": estimate.activations / MIB,
        "estimate_host_mb": estimate.host / MIB,
    }
    print(f"{args.size} {variant_of(args)} swap={args.blocks_to_swap}: {estimate.line()}", flush=True)
    if args.plan_only:
        return result
    result["setup_seconds"] = time.perf_counter() - start
    if not args.blocks_to_swap:  # swapped blocks live in CPU memory; the plan then counts two in flight
        result["stored_weights_mb"] = stored_mb(step)
        print(
            f"weights as stored ({args.base_weights_dtype} base + fp32 LoRA): {result['stored_weights_mb']:,.1f} MiB, "
            f"plan {result['estimate_weights_mb']:,.1f} MiB",
            flush=True,
        )
    if cuda:  # the steps' peak: weights, LoRA and optimizer are resident, the construction's transients are not
        result["setup_peak_mb"] = torch.cuda.max_memory_allocated() / MIB
        result["resident_after_setup_mb"] = torch.cuda.memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()
    losses, seconds = [], []
    for index in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step.step())  # float(loss) waits for the device: the time is the step's
        seconds.append(time.perf_counter() - t0)
        print(f"step {index + 1}: loss {losses[-1]:.4f} ({seconds[-1]:.2f} s)", flush=True)
    result["losses"] = losses
    result["step_seconds"] = seconds
    # the first step pays kernel selection and allocator growth: the steady figure is the mean of the rest
    steady = seconds[1:] or seconds
    result["steady_step_seconds"] = sum(steady) / len(steady)
    timing = f"{args.base_weights_dtype} base, {result['steady_step_seconds']:.2f} s/step after the first"
    if cuda:
        peak = torch.cuda.max_memory_allocated() / MIB
        result["peak_mb"] = peak
        result["device_name"] = torch.cuda.get_device_name()
        result["ratio"] = result["estimate_mb"] / peak
        print(
            f"peak {peak:,.0f} MiB (torch.cuda.max_memory_allocated), estimate {result['estimate_mb']:,.0f} MiB, "
            f"estimate/peak {result['ratio']:.2f} on {result['device_name']} ({timing})"
        )
    else:
        print(f"cpu dry run ({timing}): the GPU peak is measured with --device cuda")
    return result


def compare_offload(args: argparse.Namespace) -> dict[str, Any]:
    """Plain checkpointing, then ``--cpu-offload-checkpointing`` on the same weights, inputs and LoRA (each
    run reseeds): the peak should drop by about what the plan moves to the host (its activation part's
    difference), and the losses should be equal (the offload copies exactly, the random state included)."""
    import gc

    import torch

    plain = run(argparse.Namespace(**{**vars(args), "cpu_offload_checkpointing": False}))
    gc.collect()
    if args.device.startswith("cuda") and not args.plan_only:
        torch.cuda.empty_cache()
    offloaded = run(argparse.Namespace(**{**vars(args), "cpu_offload_checkpointing": True}))
    result = {"plain": plain, "offloaded": offloaded}
    planned = plain["estimate_mb"] - offloaded["estimate_mb"]
    line = f"offload: plan -{planned:,.0f} MiB on the device, {offloaded['estimate_host_mb']:,.0f} MiB in host memory"
    if "peak_mb" in plain and "peak_mb" in offloaded:
        saved = plain["peak_mb"] - offloaded["peak_mb"]
        result["peak_saved_mb"], result["planned_saving_mb"] = saved, planned
        line += f"; measured peak -{saved:,.0f} MiB (measured/planned {saved / planned if planned else 0:.2f})"
    if "losses" in plain:
        result["losses_equal"] = plain["losses"] == offloaded["losses"]
        steady = f"{plain['steady_step_seconds']:.2f} -> {offloaded['steady_step_seconds']:.2f} s/step"
        line += f"; losses equal: {result['losses_equal']}; {steady}"
    print(line, flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = compare_offload(args) if args.compare_offload else run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
