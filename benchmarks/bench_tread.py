"""TREAD token routing (``--tread-route``): a LoRA training step with and without routes, side by side.

TREAD's point is speed: inside a route's span of transformer blocks only the kept share of the image
tokens is computed, so a step should cost about ``1 - ratio x (span / blocks) x (image share of the
work)`` of the plain one, and the activations saved for backward shrink the same way. This builds a
FLUX.1- or SD3-shaped transformer (diffusers' classes, seeded random weights), puts sdcore's own LoRA on
it (``sdplugin_lora``: kohya's default targets, every Linear of the blocks), and times forward +
backward + AdamW step without routing and with each ``--routes`` entry (installed the way the runtime
installs ``--tread-route``: :class:`sdcore.train.token_routing.TokenRouting`, reseeded every step).

The variants run interleaved (plain, route 1, route 2, plain, ...) on the same weights, LoRA and inputs,
so a load change on a shared machine hits all of them alike; the figure is the median of ``--steps``
after ``--warmup`` rounds. Per row: step ms, routed / plain, the activations saved for backward (MiB,
counted through ``torch.autograd.graph.saved_tensors_hooks``: exact, and the same on every device) and
the step's peak memory above what was resident before it (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the process's peak RSS, reset through ``/proc/self/clear_refs``, after ``malloc_trim``: allocator
caching makes it a rough figure). Sanity, before any optimizer step: every route's first loss is
finite, and a ratio-0 route over the same span (every token kept, in order) gives the plain loss
bit for bit (printed as ``ratio-0 == plain``).

    python -m benchmarks tread [-- --sizes flux_mid,sd3_mid --routes 0.5:2:-2 0.25:2:-2 --steps 5]
    python -m benchmarks tread -- --device cuda --dtype bf16 --sizes flux_dev --steps 3   # on a GPU

Sizes: ``*_small`` and ``*_mid`` are CPU-sized (128 and 256 px images: 64 and 256 image tokens);
``flux_dev`` (FLUX.1-dev's transformer at 1024 px, 4608 image tokens, 512 T5 tokens) and
``sd3_medium`` (SD3-medium's at 1024 px) are for a GPU: a CPU run refuses them unless ``--allow-large``.
A route's ``START:END`` are block indexes over the family's block lists (FLUX.1: double then single
blocks); several routes in one row are joined with ``+`` (``0.5:2:8+0.5:10:-2``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

from .common import SDPA_CHOICES, print_table, set_sdpa, write_json

#: transformer sizes: the family, diffusers config overrides on sdcore's tiny config (FLUX.1: the released
#: config for ``flux_dev``), image side in pixels, text tokens, LoRA rank, and whether it is GPU-sized
SIZES: dict[str, dict[str, Any]] = {
    "flux_small": {
        "family": "flux",
        "config": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 8},
        "resolution": 128,
        "text": 32,
        "rank": 8,
    },
    "flux_mid": {
        "family": "flux",
        "config": {"num_layers": 3, "num_single_layers": 6, "attention_head_dim": 32, "num_attention_heads": 8},
        "resolution": 256,
        "text": 64,
        "rank": 8,
    },
    "flux_large": {
        "family": "flux",
        "config": {"num_layers": 4, "num_single_layers": 8, "attention_head_dim": 64, "num_attention_heads": 8},
        "resolution": 256,
        "text": 64,
        "rank": 8,
    },
    "flux_dev": {"family": "flux", "config": "released", "resolution": 1024, "text": 512, "rank": 16, "gpu": True},
    "sd3_small": {
        "family": "sd3",
        "config": {"num_layers": 6, "attention_head_dim": 32, "num_attention_heads": 8, "caption_projection_dim": 256},
        "resolution": 128,
        "text": 32,
        "rank": 8,
    },
    "sd3_mid": {
        "family": "sd3",
        "config": {"num_layers": 8, "attention_head_dim": 32, "num_attention_heads": 8, "caption_projection_dim": 256},
        "resolution": 256,
        "text": 64,
        "rank": 8,
    },
    "sd3_large": {
        "family": "sd3",
        "config": {"num_layers": 12, "attention_head_dim": 64, "num_attention_heads": 8, "caption_projection_dim": 512},
        "resolution": 256,
        "text": 64,
        "rank": 8,
    },
    # SD3-medium's transformer (stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json)
    "sd3_medium": {
        "family": "sd3",
        "config": {
            "sample_size": 128,
            "num_layers": 24,
            "attention_head_dim": 64,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "caption_projection_dim": 1536,
            "pooled_projection_dim": 2048,
            "pos_embed_max_size": 192,
        },
        "resolution": 1024,
        "text": 333,  # 77 CLIP + 256 T5 tokens
        "rank": 16,
        "gpu": True,
    },
}
#: SimpleTuner's recommended route (half the image tokens from block 2 to the second-to-last) and a conservative one
DEFAULT_ROUTES = ("0.5:2:-2", "0.25:2:-2")
SEED = 0


def transformer_config(size: str) -> dict[str, Any]:
    """The diffusers config of a :data:`SIZES` entry: sdcore's tiny config of the family with the size's overrides."""
    spec = SIZES[size]
    if spec["family"] == "flux":
        from sdcore.models.flux.tiny import transformer_config as flux_config

        if spec["config"] == "released":
            return flux_config("dev", tiny=False)
        head = spec["config"]["attention_head_dim"]
        third = head // 4 // 2 * 2  # FLUX.1's split of a head's rotary dims (16, 56, 56 of 128), every part even
        rope = [third, (head - third) // 2, head - third - (head - third) // 2]
        return {**flux_config("dev"), **spec["config"], "axes_dims_rope": rope}
    from sdcore.models.sd3.tiny import tiny_transformer_config

    side = spec["resolution"] // 8 // 2  # latent side in patches
    base = {**tiny_transformer_config("sd3"), "sample_size": spec["resolution"] // 8, "pos_embed_max_size": side}
    return {**base, **spec["config"]}


def family_of(size: str) -> Any:
    """The sdcore family (:class:`~sdcore.models.family.ModelFamily`) of a :data:`SIZES` entry."""
    from sdcore.models.family import get_family

    return get_family(SIZES[size]["family"])


def route_problems(size: str, variants: list[str]) -> list[str]:
    """The runtime's pre-flight messages for routes this size's block count cannot take (from its config alone)."""
    from sdcore.train.token_routing import block_count, resolve_routes

    blocks = block_count(family_of(size), transformer_config(size))
    return [p for v in variants for p in resolve_routes(parse_variant(v), blocks or 0, size)[1]]


def build(size: str, device: str, dtype: Any) -> tuple[Any, Any]:
    """(transformer, family spec) with seeded random weights. GPU sizes are made on the device in ``dtype`` (no
    full-size fp32 copy anywhere); the others on the CPU (the same weights on every device), then moved."""
    import torch

    spec = SIZES[size]
    family = family_of(size)
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls: Any = FluxTransformer2DModel if spec["family"] == "flux" else SD3Transformer2DModel
    torch.manual_seed(SEED)
    if spec.get("gpu"):
        with torch.device("meta"):
            model = cls(**transformer_config(size))
        model.to(dtype).to_empty(device=device)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0, 0.02)
    else:
        model = cls(**transformer_config(size)).to(device)
        if dtype != torch.float32:
            model.to(dtype)
    return model.requires_grad_(False).eval(), family


def lora(model: Any, family: Any, rank: int, device: str) -> Any:
    """sdcore's LoRA on the transformer (kohya's default DiT targets), attached, trainable, fp32."""
    import torch
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    index = ModuleIndex.build_dit(family.name, model, [], prefixes=dict(family.lora_prefixes) or None)
    torch.manual_seed(SEED + 1)
    network = LoraNetwork.create(index.select(unet=True, text_encoder=False), rank=rank, alpha=rank / 2)
    generator = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():  # off the zero init of lora_up, so the adapters change the output from the first step
        for param in network.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    return network.to(device).train().attach()


def inputs(size: str, model: Any, batch: int, device: str, dtype: Any) -> tuple[dict[str, Any], Any]:
    """(the transformer's keyword arguments, the loss target), drawn on the CPU from a fixed seed."""
    import torch

    spec = SIZES[size]
    config = model.config
    g = torch.Generator().manual_seed(SEED + 3)
    text = torch.randn(batch, spec["text"], config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=g)
    latent = spec["resolution"] // 8
    if spec["family"] == "flux":
        side = latent // 2  # FLUX.1 packs 2x2 latent pixels into a token
        ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"), -1
        ).reshape(-1, 3)
        latents = torch.randn(batch, side * side, config.in_channels, generator=g)
        kwargs: dict[str, Any] = {
            "hidden_states": latents,
            "timestep": torch.full((batch,), 0.6),
            "guidance": torch.full((batch,), 3.5),
            "img_ids": ids,
            "txt_ids": torch.zeros(spec["text"], 3),
        }
    else:
        latents = torch.randn(batch, config.in_channels, latent, latent, generator=g)
        kwargs = {"hidden_states": latents, "timestep": torch.full((batch,), 600.0)}
    kwargs.update(encoder_hidden_states=text, pooled_projections=pooled)
    target = torch.randn(latents.shape, generator=g).to(device)
    cast = ("hidden_states", "encoder_hidden_states", "pooled_projections")  # in the weights' dtype; ids, times fp32
    moved = {k: v.to(device, dtype) if k in cast else v.to(device) for k, v in kwargs.items()}
    return {**moved, "return_dict": False}, target


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Stepper:
    """One model, LoRA, optimizer and inputs; each call a training step under one variant's routes (or none)."""

    def __init__(self, size: str, device: str, dtype_name: str, batch: int) -> None:
        import torch

        self.device = device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        self.model, self.family = build(size, device, self.dtype)
        self.network = lora(self.model, self.family, SIZES[size]["rank"], device)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=1e-4)
        self.kwargs, self.target = inputs(size, self.model, batch, device, self.dtype)
        self.lists = tuple(block.attribute for block in self.family.block_lists)
        self.steps = 0

    @contextlib.contextmanager
    def routed(self, routes: list[Any] | None) -> Any:
        """The routes installed for the ``with`` block (the runtime's :class:`TokenRouting`), reseeded as a step."""
        if not routes:
            yield None
            return
        from sdcore.train.token_routing import TokenRouter, TokenRouting

        routing = TokenRouting(self.model, routes, self.family.token_routing, self.lists, TokenRouter(SEED))
        routing.new_step(SEED, self.steps, 0)
        try:
            yield routing
        finally:
            routing.remove()

    def loss(self) -> Any:
        import torch

        autocast = (
            torch.autocast(torch.device(self.device).type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.model(**self.kwargs)[0]
        return torch.nn.functional.mse_loss(out.float(), self.target)

    def first_loss(self, routes: list[Any] | None) -> float:
        """The loss of a training forward (gradients on: routing active) at the current weights, no step."""
        with self.routed(routes):
            return float(self.loss().detach())

    def step(self, routes: list[Any] | None) -> float:
        with self.routed(routes):
            loss = self.loss()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            _sync(self.device)
        self.steps += 1
        return float(loss.detach())

    def memory(self, routes: list[Any] | None) -> tuple[float, float | None]:
        """(MiB saved for backward, MiB of the step's peak above what was resident before it, None if unknown)."""
        import torch

        saved: dict[Any, int] = {}
        weights = {p.untyped_storage().data_ptr() for p in [*self.model.parameters(), *self.network.parameters()]}

        def pack(t: Any) -> Any:  # each storage once; the weights (saved by every matmul) are not activations
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                saved[(storage.data_ptr(), t.device)] = storage.nbytes()
            return t

        cuda = self.device.startswith("cuda")
        before: int | None
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _reset_peak_rss()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step(routes)
        peak: float | None = None
        if cuda and before is not None:
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        elif before is not None:
            peak = (_status_kib("VmHWM") - before) / 1024
        return sum(saved.values()) / 2**20, peak


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if match is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(match.group(1))


def _reset_peak_rss() -> int | None:
    """Hand freed heap back (``malloc_trim``), reset the peak RSS to the current one; that RSS in KiB (None:
    not Linux, or the kernel refused)."""
    try:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return None


def parse_variant(text: str) -> list[Any]:
    """``"0.5:2:8+0.5:10:-2"`` -> its routes (``parse_route``'s errors for a bad one)."""
    from sdcore.train.token_routing import parse_route

    return [parse_route(part) for part in text.split("+")]


def measure(
    size: str, variants: list[str], steps: int, warmup: int, device: str, dtype: str, batch: int
) -> dict[str, Any]:
    from sdcore.train.block_swap import swappable_blocks
    from sdcore.train.token_routing import Route

    stepper = Stepper(size, device, dtype, batch)
    blocks = len(swappable_blocks(stepper.model, stepper.lists))
    routes = {v: parse_variant(v) for v in variants}
    # sanity at the initial weights: the plain loss, each route's, and a ratio-0 route over the first one's spans
    plain_loss = stepper.first_loss(None)
    zero = [Route(0.0, r.start, r.end) for r in routes[variants[0]]] if variants else []
    zero_loss = stepper.first_loss(zero) if zero else plain_loss
    first = {v: stepper.first_loss(routes[v]) for v in variants}
    # timing: plain and every variant in turn, `warmup` rounds, then `steps`
    names = ["plain", *variants]
    times: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + steps):
        for name in names:
            start = time.perf_counter()
            losses[name].append(stepper.step(routes.get(name)))
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    memory = {name: stepper.memory(routes.get(name)) for name in names}
    plain_s = statistics.median(times["plain"])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append(
            {
                "variant": name,
                "step_s": median,
                "step_times": times[name],
                "ratio": median / plain_s,
                "saved_mb": memory[name][0],
                "peak_mb": memory[name][1],
                "first_loss": plain_loss if name == "plain" else first[name],
                "finite": all(
                    math.isfinite(x) for x in [plain_loss if name == "plain" else first[name], *losses[name]]
                ),
            }
        )
    image_tokens = (
        stepper.kwargs["hidden_states"].shape[1]
        if SIZES[size]["family"] == "flux"
        else ((SIZES[size]["resolution"] // 16) ** 2)
    )
    return {
        "size": size,
        "blocks": blocks,
        "image_tokens": image_tokens,
        "text_tokens": SIZES[size]["text"],
        "lora_parameters": sum(p.numel() for p in stepper.network.parameters()),
        "plain_loss": plain_loss,
        "ratio0_loss": zero_loss,
        "ratio0_equal": zero_loss == plain_loss,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tread", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="flux_mid,sd3_mid", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--routes", nargs="+", default=list(DEFAULT_ROUTES), help="RATIO:START:END each (join with +)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every variant first")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="the frozen weights (autocast)"
    )
    parser.add_argument("--sdpa", default="default", choices=SDPA_CHOICES, help="torch's attention kernels")
    parser.add_argument("--allow-large", action="store_true", help="build a GPU size on the CPU anyway")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    large = [s for s in sizes if SIZES[s].get("gpu")]
    if large and not args.device.startswith("cuda") and not args.allow_large:
        raise SystemExit(f"{', '.join(large)} is GPU-sized: run it with --device cuda (or --allow-large)")
    from sdcore.errors import ConfigError

    try:  # a malformed route fails here, before any model is built
        for variant in args.routes:
            parse_variant(variant)
        problems = [p for size in sizes for p in route_problems(size, args.routes)]
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    if problems:
        raise SystemExit("; ".join(problems))
    set_sdpa(args.sdpa)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    table: list[tuple[str, ...]] = []
    for size in sizes:
        r = measure(size, args.routes, args.steps, args.warmup, args.device, args.dtype, args.batch)
        results.append(r)
        for row in r["rows"]:
            peak = "-" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
            table.append(
                (
                    size,
                    row["variant"],
                    f"{row['step_s'] * 1000:.0f}",
                    f"{row['ratio']:.2f}x",
                    f"{row['saved_mb']:.0f}",
                    peak,
                    f"{row['first_loss']:.6f}",
                    "yes" if row["finite"] else "NO",
                )
            )
        print(
            f"{size}: {r['blocks']} blocks, {r['image_tokens']} image + {r['text_tokens']} text tokens; "
            f"ratio-0 == plain: {'yes' if r['ratio0_equal'] else 'NO'} ({r['ratio0_loss']!r} vs {r['plain_loss']!r})",
            flush=True,
        )
    header = ("size", "route", "step ms", "routed/plain", "saved MiB", "peak MiB", "first loss", "finite")
    title = f"LoRA step (fwd+bwd+AdamW), median of {args.steps}, batch {args.batch}, {args.device} {args.dtype}"
    print_table(title, table, header)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    payload = {"args": vars(args), "results": results}
    write_json("tread", payload)
    return payload


if __name__ == "__main__":
    main()
