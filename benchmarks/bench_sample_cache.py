"""Sample images with weight-rebuilding adapters: each module's change cached vs rebuilt every forward.

While a LoHa/LoKr/BOFT/DoRA... network renders ``--sample-prompts`` every denoising step runs the
UNet (twice with CFG: a batch of 2), and every adapted layer rebuilds its ``ΔW`` from its factors
in each of those forwards. ``LoraMethod.sampling()`` (which the runtime enters for sample images and
the validation loss) now computes each change once (``LoraNetwork.cached_changes``). This times
``--steps`` denoising forwards (batch 2) of the same network both ways, under ``no_grad`` in eval
mode, a fresh cache per timed run (so the cached figure includes building the changes at the first
step), checks that the outputs are equal, and prints cached / rebuilt.

    python -m benchmarks sample_cache [-- --sizes tiny,mid --algos loha,lokr,boft,dora --steps 20]
    python -m benchmarks sample_cache -- --device cuda --sizes sd15_512 --dtype bf16   # on a GPU

The UNets are ``bench_train``'s sizes (tiny: the tests' SD1 UNet at 64 px; mid: a 64-256 channel
SD1-shaped UNet at 128 px; sd15/sd15_512/sdxl: the real architectures), adapters on every Linear and
conv LoCon-style (rank = conv rank = the size's rank).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from .bench_train import SIZES, build_bundle
from .common import print_table, time_call, write_json

DEFAULT_ALGOS = ("loha", "lokr", "boft", "dora")


def _network(bundle: Any, algo: str, rank: int, device: str) -> Any:
    import torch
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    index = ModuleIndex.from_bundle(bundle)
    targets = index.select(unet=True, text_encoder=False, conv=True)
    torch.manual_seed(0)
    network = LoraNetwork.create(targets, rank=rank, alpha=rank / 2, conv_rank=rank, conv_alpha=rank / 2, algo=algo)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the identity init (LoHa's w2_a, BOFT's blocks start at zero)
        for name, param in network.named_parameters():
            # drawn on the CPU (the same values on every device), then moved: DoRA's magnitude is
            # made from the base weight, so on a GPU run it is already there
            noise = torch.randn(param.shape, generator=generator).to(param.device)
            param.copy_(param * (1 + 0.1 * noise) if name.endswith("dora_scale") else param + 0.02 * noise)
    return network.to(device).eval().attach()


def _inputs(bundle: Any, size: str, device: str, dtype: Any) -> tuple[Any, ...]:
    import torch

    generator = torch.Generator().manual_seed(2)
    unet = bundle.unet
    side = SIZES[size]["resolution"] // 8
    latents = torch.randn(2, 4, side, side, generator=generator).to(device, dtype)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    kwargs: dict[str, Any] = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        res = float(SIZES[size]["resolution"])
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[res, res, 0.0, 0.0, res, res]] * 2, device=device, dtype=dtype),
        }
    return latents, hidden, kwargs


def _denoise(bundle: Any, inputs: tuple[Any, ...], steps: int, device: str) -> Any:
    """``steps`` UNet forwards at descending timesteps, each output fed back (a sampler's shape)."""
    import torch

    latents, hidden, kwargs = inputs
    with torch.no_grad():
        for t in torch.linspace(999, 0, steps).long():
            out = bundle.unet(latents, t.to(device), encoder_hidden_states=hidden, **kwargs).sample
            latents = latents - 0.05 * out
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return latents


def measure(size: str, algo: str, steps: int, repeat: int, device: str, dtype_name: str) -> dict[str, Any]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    bundle = build_bundle(size, device)
    if dtype != torch.float32:
        bundle.unet.to(device, dtype)
    network = _network(bundle, algo, SIZES[size]["rank"], device)
    inputs = _inputs(bundle, size, device, dtype)
    plain, _ = time_call(lambda: _denoise(bundle, inputs, steps, device), repeat=repeat)
    stats: dict[str, Any] = {}

    def cached() -> Any:
        with network.cached_changes() as cache:
            out = _denoise(bundle, inputs, steps, device)
            stats.update(modules=len(cache), mb=cache.nbytes / 2**20, refused=cache.refused)
        return out

    fast, _ = time_call(cached, repeat=repeat)
    diff = float((_denoise(bundle, inputs, steps, device) - cached()).abs().max())
    cached_modules = stats["modules"] + stats["refused"]
    return {
        "size": size,
        "algo": algo,
        "modules": len(network),
        "cached_modules": cached_modules,
        "cache_mb": round(stats["mb"], 2),
        "rebuilt_s": plain,
        "cached_s": fast,
        "ratio": fast / plain,
        "max_abs_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sample_cache", description=__doc__)
    parser.add_argument("--sizes", default="tiny,mid", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS))
    parser.add_argument("--steps", type=int, default=20, help="denoising forwards (batch 2: CFG) per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median), after one warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the UNet's weights")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows, results = [], []
    for size in args.sizes.split(","):
        for algo in args.algos.split(","):
            r = measure(size, algo, args.steps, args.repeat, args.device, args.dtype)
            results.append(r)
            rows.append(
                (
                    size,
                    algo,
                    f"{r['cached_modules']}/{r['modules']}",
                    f"{r['cache_mb']:.1f}",
                    f"{r['rebuilt_s'] * 1000:.0f}",
                    f"{r['cached_s'] * 1000:.0f}",
                    f"{r['ratio']:.2f}x",
                    f"{r['max_abs_diff']:.1e}",
                )
            )
    header = ("size", "algo", "cached", "cache MB", "rebuilt ms", "cached ms", "cached/rebuilt", "max |diff|")
    print_table(f"{args.steps} denoising forwards (batch 2), {args.device} {args.dtype}", rows, header)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    payload = {"args": vars(args), "results": results}
    write_json("sample_cache", payload)
    return payload


if __name__ == "__main__":
    main()
