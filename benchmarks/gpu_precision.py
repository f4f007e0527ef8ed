"""The CUDA precision paths of the runtime, on tiny models: what only a GPU can run.

The CPU test suite cannot reach fp16 (accelerate's GradScaler needs CUDA), bitsandbytes' 8-bit AdamW
(CUDA kernels), float8 base weights on a GPU, or block swap between a real device and the host. This
script trains the same tiny LoRA under each path through the runtime (``sdcore.train.loop.train``,
the code ``sdcore train`` runs) and checks what can fail:

- every loss is finite and the trained LoRA is finite and moved off its zero ``up`` init;
- bf16, fp16 (GradScaler) and 8-bit AdamW land near the fp32 run (relative difference of the LoRA's
  dense change, printed; checked loosely: < 0.5, since 20 steps of different rounding diverge);
- tiny Flux with ``--fp8-base`` trains; ``--blocks-to-swap 1`` gives the unswapped run's LoRA (on a
  GPU to 1e-5 rather than bit for bit: cuBLAS may pick other kernels for other memory layouts);
- a DreamBooth full fine-tune in bf16 trains finite weights.

    python benchmarks/gpu_precision.py [--json OUT.json]

Each check is independent: one failing prints its error and the rest still run; the exit code is
the number of failed checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _lora_runs(tmp: Path, data: Path, model: str, name: str, **overrides: Any) -> dict[str, Any]:
    """Train a rank-4 LoRA for 20 steps; its losses and its modules' dense changes."""
    import torch
    from sdcore.train.loop import train
    from sdplugin_lora.format import read_lora
    from sdplugin_lora.method import LoraMethod, LoraOptions

    options = LoraOptions(
        model=model,
        data=str(data),
        output=str(tmp / f"{name}.safetensors"),
        resolution=64,
        batch_size=2,
        lr=1e-3,
        seed=0,
        rank=4,
        alpha=4,
        max_steps=20,
        progress=False,
        save_state=False,
        save_dtype="fp32",
        **overrides,
    )
    start = time.perf_counter()
    result = train(LoraMethod(options))
    seconds = time.perf_counter() - start
    modules = read_lora(options.output).modules
    deltas = {key: (m.up.float().flatten(1) @ m.down.float().flatten(1)) for key, m in modules.items()}
    finite = all(torch.isfinite(d).all() for d in deltas.values())
    moved = max(float(m.up.abs().max()) for m in modules.values())
    return {
        "losses": result.losses,
        "deltas": deltas,
        "seconds": seconds,
        "finite": bool(finite) and all(map(_finite, result.losses)),
        "moved": moved,
    }


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _relative(a: dict[str, Any], b: dict[str, Any]) -> float:
    import torch

    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    den = sum(float(a[k].square().sum()) for k in a)
    return float(torch.tensor(num / max(den, 1e-30)).sqrt())


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "first_loss": run["losses"][0],
        "last_loss": run["losses"][-1],
        "seconds": round(run["seconds"], 2),
        "finite": run["finite"],
        "max_up": run["moved"],
    }


def check_sd1_precisions(tmp: Path, data: Path) -> dict[str, Any]:
    import importlib.util

    runs = {"fp32": {"mixed_precision": "no"}, "bf16": {"mixed_precision": "bf16"}, "fp16": {"mixed_precision": "fp16"}}
    if importlib.util.find_spec("bitsandbytes"):
        runs["bf16+adamw8bit"] = {"mixed_precision": "bf16", "optimizer": "adamw8bit"}
        runs["fp16+adamw8bit"] = {"mixed_precision": "fp16", "optimizer": "adamw8bit"}
    done = {name: _lora_runs(tmp, data, "tiny:sd1", name, **extra) for name, extra in runs.items()}
    out: dict[str, Any] = {"bitsandbytes": "bf16+adamw8bit" in runs}
    for name, run in done.items():
        out[name] = _summary(run)
        if name != "fp32":
            out[name]["relative_to_fp32"] = _relative(done["fp32"]["deltas"], run["deltas"])
        assert run["finite"], f"{name}: non-finite loss or weights"
        assert run["moved"] > 0, f"{name}: the LoRA did not train"
        if name != "fp32":
            assert out[name]["relative_to_fp32"] < 0.5, f"{name}: {out[name]['relative_to_fp32']:.3f} from fp32"
    return out


def check_flux_memory_options(tmp: Path, data: Path) -> dict[str, Any]:
    base = {"mixed_precision": "bf16", "gradient_checkpointing": True}
    plain = _lora_runs(tmp, data, "tiny:flux", "flux-plain", **base)
    fp8 = _lora_runs(tmp, data, "tiny:flux", "flux-fp8", fp8_base=True, **base)
    swap = _lora_runs(tmp, data, "tiny:flux", "flux-swap", blocks_to_swap=1, **base)
    worst = max(float((plain["deltas"][k] - swap["deltas"][k]).abs().max()) for k in plain["deltas"])
    out = {
        "plain": _summary(plain),
        "fp8": _summary(fp8) | {"relative_to_plain": _relative(plain["deltas"], fp8["deltas"])},
        "swap": _summary(swap) | {"max_abs_diff_to_plain": worst},
    }
    for name, run in (("plain", plain), ("fp8", fp8), ("swap", swap)):
        assert run["finite"] and run["moved"] > 0, f"flux {name}: did not train finite weights"
    assert worst <= 1e-5, f"block swap differs from the plain run by {worst:.2e}"
    return out


def check_dreambooth_bf16(tmp: Path, data: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file
    from sdcore.train.loop import train
    from sdplugin_dreambooth.method import DreamBoothMethod
    from sdplugin_dreambooth.options import DreamBoothOptions

    options = DreamBoothOptions(
        model="tiny:sd1",
        data=str(data),
        output=str(tmp / "db.safetensors"),
        resolution=64,
        batch_size=2,
        lr=1e-4,
        seed=0,
        max_steps=10,
        progress=False,
        save_state=False,
        mixed_precision="bf16",
    )
    result = train(DreamBoothMethod(options))
    weights = load_file(options.output)
    assert all(map(_finite, result.losses)), "non-finite loss"
    assert all(torch.isfinite(t.float()).all() for t in weights.values()), "non-finite weights"
    return {"losses": [result.losses[0], result.losses[-1]], "tensors": len(weights)}


CHECKS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {
    "sd1_precisions": check_sd1_precisions,
    "flux_memory_options": check_flux_memory_options,
    "dreambooth_bf16": check_dreambooth_bf16,
}


def main(argv: list[str] | None = None) -> int:
    import torch
    from sdcore.testing.datasets import make_tiny_dataset

    from benchmarks.common import SDPA_CHOICES, set_sdpa

    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_precision.py", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"of {', '.join(CHECKS)}")
    parser.add_argument("--sdpa", default="default", choices=SDPA_CHOICES, help="attention kernels torch may use")
    args = parser.parse_args(argv)
    set_sdpa(args.sdpa)
    report: dict[str, Any] = {"cuda": torch.cuda.is_available(), "sdpa": args.sdpa}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_tiny_dataset(tmp / "data", n=4, size=64)
        for name in args.only.split(","):
            start = time.perf_counter()
            try:
                report[name] = {"ok": True, **CHECKS[name](tmp, data)}
            except Exception as exc:  # a report of every check, not the first failure
                failed += 1
                report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            report[name]["check_seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name}: {json.dumps({k: v for k, v in report[name].items() if k != 'trace'})}", flush=True)
            if not report[name]["ok"]:
                print(report[name]["trace"], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
