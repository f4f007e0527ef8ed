"""Which attention kernels train Flux-shaped attention correctly on this GPU.

On the H200 (torch 2.11 + cu130, 2026-11-30) the FLUX.1-size LoRA step died in backward with a CUDA
illegal memory access, and tiny Flux trained through the runtime got a NaN gradient norm at step 1,
while SD1.5 and SDXL trained. torch 2.11 is the first release whose bundled cuDNN makes its SDPA
kernels the default on Hopper, and those have open backward bugs. This probe runs attention forward
+ backward at Flux's shapes under each kernel choice, each in its own process (a CUDA fault poisons
the process), then a one-double-one-single-block Flux at full width with gradient checkpointing.

    python benchmarks/gpu_sdpa_probe.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: (batch, heads, tokens, head dim): FLUX.1 at 1024 px (4096 image + 512 text tokens); tiny Flux's heads
#: (batch 2, heads, 16 image + 512 T5 tokens, head dim) of the runtime's tiny Flux at 64 px
SHAPES = {"flux-1024": (1, 24, 4608, 128), "tiny-528": (2, 2, 528, 16)}
BACKENDS = ("default", "cudnn", "flash", "efficient")


def attention_case(shape: str, backend: str) -> dict[str, Any]:
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    b, h, n, d = SHAPES[shape.removesuffix("-strided")]
    # diffusers' Flux attention hands SDPA transposed [batch, tokens, heads, dim] tensors: both layouts
    strided = shape.endswith("-strided")
    dims = (b, n, h, d) if strided else (b, h, n, d)
    q, k, v = (torch.randn(*dims, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    chosen = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    context = sdpa_kernel(chosen[backend]) if backend in chosen else contextlib.nullcontext()
    with context:
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if strided else (q, k, v)
        out = F.scaled_dot_product_attention(*args)
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    grads = [t.grad for t in (q, k, v)]
    return {
        "finite": all(bool(torch.isfinite(g).all()) for g in grads if g is not None),
        "grad_q_norm": float(grads[0].float().norm()) if grads[0] is not None else None,
    }


def model_case(sdpa: str) -> dict[str, Any]:
    import torch
    from diffusers import FluxTransformer2DModel

    from benchmarks.common import set_sdpa

    set_sdpa(sdpa)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ).to(torch.bfloat16)
    model.enable_gradient_checkpointing()
    model.train()
    side = 64
    ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"), -1
    ).reshape(-1, 3)
    x = torch.randn(1, side * side, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(
            hidden_states=x,
            encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda"),
            pooled_projections=torch.randn(1, 768, device="cuda"),
            timestep=torch.tensor([0.5], device="cuda"),
            guidance=torch.tensor([3.5], device="cuda"),
            img_ids=ids.cuda(),
            txt_ids=torch.zeros(512, 3, device="cuda"),
            return_dict=False,
        )[0]
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    return {"finite": bool(torch.isfinite(x.grad).all()), "grad_norm": float(x.grad.norm())}


def _isolated(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--case", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT="):
            return json.loads(line[7:])
    error = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
    return {"finite": False, "error": (error[-1] if error else proc.stderr[-300:]).strip()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_sdpa_probe.py")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.case:  # one case, in this (child) process
        kind, *rest = args.case
        result = attention_case(*rest) if kind == "attention" else model_case(*rest)
        print("RESULT=" + json.dumps(result), flush=True)
        return result
    report: dict[str, Any] = {}
    for shape in (*SHAPES, *(f"{name}-strided" for name in SHAPES)):
        for backend in BACKENDS:
            report[f"attention {shape} {backend}"] = _isolated("attention", shape, backend)
            print(f"attention {shape} {backend}: {report[f'attention {shape} {backend}']}", flush=True)
    for sdpa in ("default", "no-cudnn"):
        report[f"flux blocks {sdpa}"] = _isolated("model", sdpa)
        print(f"flux blocks (1 double + 1 single, full width) sdpa={sdpa}: {report[f'flux blocks {sdpa}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
