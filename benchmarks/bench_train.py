"""LoRA training: sdcore against a diffusers + peft loop and against the frozen-base lower bound.

Three runs per size, each in a fresh interpreter (so peak RSS is its own), same model weights,
images, captions, rank, targets, precision and batch:

- ``ours``: ``sdcore train lora`` through the runtime (latents and text-encoder outputs cached);
- ``reference``: a LoRA loop written the way diffusers' ``train_text_to_image_lora.py`` does it:
  peft adapters on the UNet, every step loads the image, encodes it with the VAE and the caption
  with the text encoder, then UNet forward/backward and an AdamW step;
- ``lower bound``: the frozen UNet's forward + backward on precomputed latents and embeddings with
  no adapter at all (gradients flow to the input), the cost any adapter method pays at least.

Reported: median optimizer-step time (after warm-up) and the wall time of a 10-epoch run,
with ratios ours / reference and ours / lower bound.

    python -m benchmarks train [--sizes tiny,mid,sd15] [--epochs 10] [--images 8]
    python -m benchmarks train -- --device cuda --mixed-precision bf16 --sizes sd15_512,sdxl   # on a GPU

On a GPU the frozen weights of all three runs are cast to the training precision (what the runtime
and the diffusers example both do), the reference runs under autocast, every timed step ends with
``torch.cuda.synchronize()``, and each run also reports ``torch.cuda.max_memory_allocated``; ours
reports the memory plan's estimate beside it. ``sd15_512`` and ``sdxl`` are the real SD1.5 and SDXL
architectures (sdcore's stored configs) with random weights, at 512 and 1024 px.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, run_isolated, write_json

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
SIZES: dict[str, dict[str, Any]] = {
    # resolution, and how the UNet/TE/VAE are built
    "tiny": {"resolution": 64, "unet": "tiny", "rank": 4},
    "mid": {"resolution": 128, "unet": "mid", "rank": 8},
    "sd15": {"resolution": 256, "unet": "sd15", "rank": 16},
    "sd15_512": {"resolution": 512, "unet": "sd15", "rank": 16},
    "sdxl": {"resolution": 1024, "unet": "sdxl", "rank": 16},
}
#: sizes whose run is 2 epochs (and at most 6 timed steps) to keep a CPU run under 10 minutes
LARGE_SIZES = ("sd15", "sd15_512", "sdxl")


# --- model and data (identical for every run: built from a seed) ---------------------------------
def build_bundle(size: str, device: str = "cpu") -> Any:
    """The size's bundle with seeded random weights. On a GPU the large modules are made there
    (seconds, not minutes); the scheduler and tokenizers stay on the CPU as a loaded model's do."""
    import torch
    from sdcore.models.tiny import create_tiny_bundle

    family = "sdxl" if SIZES[size]["unet"] == "sdxl" else "sd1"
    bundle = create_tiny_bundle(family, seed=0)  # tokenizers, scheduler and family metadata
    if size == "tiny":
        return bundle
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, encoders = _real_size_modules(family) if size != "mid" else _mid_modules(bundle)
    bundle.unet = unet.eval()
    bundle.vae = vae.eval()
    bundle.text_encoders = [encoder.eval() for encoder in encoders]
    return bundle


def _real_size_modules(family: str) -> tuple[Any, Any, list[Any]]:
    """SD1.5's or SDXL's UNet, VAE and CLIP encoders at their real shapes (sdcore's stored configs)."""
    import json
    from importlib import resources

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sdcore.models.load import config_fields
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = json.loads((resources.files("sdcore.models") / "configs" / f"{family}.json").read_text())
    unet = UNet2DConditionModel(**config_fields(configs["unet"]))
    vae = AutoencoderKL(**config_fields(configs["vae"]))
    encoders = []
    for config in configs["text_encoders"]:
        cls = CLIPTextModelWithProjection if config["_class_name"] == "CLIPTextModelWithProjection" else CLIPTextModel
        encoders.append(cls(CLIPTextConfig(**config_fields(config))))
    return unet, vae, encoders


def _mid_modules(bundle: Any) -> tuple[Any, Any, list[Any]]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=1,
        cross_attention_dim=256,
        attention_head_dim=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    return unet, bundle.vae, [CLIPTextModel(text)]


def make_data(root: Path, size: str, images: int) -> Path:
    from sdcore.testing.datasets import make_tiny_dataset

    return make_tiny_dataset(root / "data", n=images, size=SIZES[size]["resolution"], repeats=1)


# --- the three runs (each executed in its own process by main) -----------------------------------
def _sync(device: str) -> None:
    """Wait for the GPU's queued work, so a wall-clock stamp means the step is done."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _gpu_peak(device: str, result: dict[str, Any]) -> dict[str, Any]:
    if device.startswith("cuda"):
        import torch

        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_ours(
    size: str, steps: str, epochs: str, images: str, device: str = "cpu", precision: str = "no"
) -> dict[str, Any]:
    import sdcore
    import torch
    from sdcore.plugins import get_plugin_manager
    from sdcore.train.loop import train
    from sdcore.train.preflight import memory_plan
    from sdplugin_lora.method import LoraMethod, LoraOptions

    cfg = SIZES[size]
    stamps: list[float] = []

    class Timer:
        @sdcore.hookimpl
        def sdcore_on_train_step(self, step: int) -> None:
            _sync(device)
            stamps.append(time.perf_counter())

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), size, int(images))
        bundle = build_bundle(size, device)
        if device.startswith("cuda"):  # made on the GPU for speed; a real run loads its weights on the CPU
            for module in (bundle.unet, bundle.vae, *bundle.text_encoders):
                module.to("cpu")
            torch.cuda.empty_cache()
        pm = get_plugin_manager(builtins=False, entrypoints=False, extra=[Timer()])
        common = dict(
            model="tiny:sd1",  # placeholder: the bundle passed to train() is used
            data=str(data),
            resolution=cfg["resolution"],
            batch_size=1,
            lr=1e-4,
            seed=0,
            rank=cfg["rank"],
            alpha=cfg["rank"],
            progress=False,
            min_bucket_reso=64,
            max_bucket_reso=2048,
            cache_latents=True,
            cache_text_encoder_outputs=True,
            save_dtype="fp32",
            mixed_precision=precision,
        )
        options = LoraOptions(output=str(Path(tmp) / "steps.safetensors"), max_steps=int(steps), **common)
        method = LoraMethod(options)
        if device.startswith("cuda"):
            plan = memory_plan(method, options, bundle=bundle, device="cuda")
            result["estimate_mb"] = plan.estimate.total / 2**20
            result["estimate_line"] = plan.estimate.line()
            torch.cuda.reset_peak_memory_stats()
        train(method, bundle=bundle, plugin_manager=pm)
        _gpu_peak(device, result)
        deltas = [b - a for a, b in itertools.pairwise(stamps)][2:]
        result["step_s"] = statistics.median(deltas)
        del bundle, pm, method
        gc.collect()  # one model alive at a time, as in the reference run
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        options = LoraOptions(output=str(Path(tmp) / "epochs.safetensors"), epochs=int(epochs), **common)
        fresh = build_bundle(size, device)  # built before the clock starts: the reference's setup is not timed either
        start = time.perf_counter()
        train(LoraMethod(options), bundle=fresh)
        _sync(device)
        result["run_s"] = time.perf_counter() - start
    return result


def _sdxl_conditioning(bundle: Any, ids: list[Any], resolution: int) -> tuple[Any, dict[str, Any]]:
    """SDXL's UNet input from both encoders: penultimate hidden states side by side, CLIP-G's pooled
    projection and the size/crop ids, as diffusers' SDXL LoRA example builds them."""
    import torch

    hidden = []
    pooled = None
    for encoder, token_ids in zip(bundle.text_encoders, ids, strict=True):
        out = encoder(token_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # the projected pooled output of the last (CLIP-G) encoder
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=ids[0].device)
    return torch.cat(hidden, dim=-1), {"text_embeds": pooled, "time_ids": time_ids.to(hidden[0].dtype)}


def _reference_setup(size: str, tmp: Path, images: int, device: str, precision: str) -> tuple[Any, ...]:
    import torch
    from peft import LoraConfig

    bundle = build_bundle(size, device)
    data = make_data(tmp, size, images)
    unet, vae = bundle.unet, bundle.vae
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    for module in (unet, vae, *bundle.text_encoders):
        module.requires_grad_(False)
        module.to(weight_dtype)  # the diffusers example casts the frozen models to the weight dtype
    rank = SIZES[size]["rank"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()  # trainable LoRA weights stay fp32, as in the example
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    files = sorted((data / "1_sks").glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    return bundle, unet, vae, optimizer, files, captions, weight_dtype


def run_reference(
    size: str, steps: str, epochs: str, images: str, device: str = "cpu", precision: str = "no"
) -> dict[str, Any]:
    """The diffusers example's loop: no latent or text cache; data read and transformed every step."""
    import contextlib

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    torch.manual_seed(0)
    sdxl = SIZES[size]["unet"] == "sdxl"
    resolution = SIZES[size]["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        bundle, unet, vae, optimizer, files, captions, weight_dtype = _reference_setup(
            size, Path(tmp), int(images), device, precision
        )
        scheduler = bundle.noise_scheduler
        if device.startswith("cuda"):  # the steps' peak: frozen weights resident in their training dtype
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        autocast = (
            torch.autocast(device.split(":")[0], dtype=weight_dtype)
            if weight_dtype != torch.float32
            else contextlib.nullcontext()
        )

        def step(index: int) -> None:
            pixels = np.asarray(Image.open(files[index % len(files)]).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            pixels_t = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device, weight_dtype)
            caption = captions[index % len(files)]
            ids = [
                tok(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(
                    device
                )
                for tok in bundle.tokenizers
            ]
            with autocast:
                latents = vae.encode(pixels_t).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), device=device)
                noisy = scheduler.add_noise(latents, noise, t)
                if sdxl:
                    hidden, added = _sdxl_conditioning(bundle, ids, resolution)
                    pred = unet(noisy, t, hidden, added_cond_kwargs=added).sample
                else:
                    pred = unet(noisy, t, bundle.text_encoders[0](ids[0])[0]).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            _sync(device)

        times = []
        for i in range(int(steps)):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        step_s = statistics.median(times[2:])
        start = time.perf_counter()
        for i in range(int(epochs) * len(files)):
            step(i)
        run_s = time.perf_counter() - start
    return _gpu_peak(device, {"step_s": step_s, "run_s": run_s})


def run_lower_bound(
    size: str, steps: str, epochs: str, images: str, device: str = "cpu", precision: str = "no"
) -> dict[str, Any]:
    """Frozen UNet forward + backward (to the input) on precomputed tensors: no adapter, no optimizer."""
    import torch

    cfg = SIZES[size]
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    bundle = build_bundle(size, device)
    unet = bundle.unet.requires_grad_(False).to(weight_dtype)
    widths = [encoder.config.hidden_size for encoder in bundle.text_encoders]
    del bundle  # the floor keeps only the UNet on the device
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    side = cfg["resolution"] // 8
    torch.manual_seed(0)
    latents = torch.randn(1, 4, side, side, device=device, dtype=weight_dtype)
    hidden = torch.randn(1, 77, sum(widths), device=device, dtype=weight_dtype)
    added = None
    if cfg["unet"] == "sdxl":
        res = cfg["resolution"]
        added = {
            "text_embeds": torch.randn(1, widths[-1], device=device, dtype=weight_dtype),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=weight_dtype),
        }
    timestep = torch.tensor([500], device=device)
    times = []
    for _ in range(int(steps)):
        start = time.perf_counter()
        x = latents.clone().requires_grad_(True)
        pred = unet(x, timestep, hidden, added_cond_kwargs=added).sample
        pred.float().pow(2).mean().backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return _gpu_peak(device, {"step_s": statistics.median(times[2:]), "run_s": None})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks train")
    parser.add_argument("--sizes", default="tiny,mid", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=12, help="steps timed for the per-step median")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    args = parser.parse_args(argv or [])
    results: dict[str, Any] = {}
    rows = []
    for size in args.sizes.split(","):
        large_on_cpu = size in LARGE_SIZES and args.device == "cpu"
        steps = min(args.steps, 6) if large_on_cpu else args.steps
        epochs = min(args.epochs, 2) if size in LARGE_SIZES else args.epochs
        run_args = (size, str(steps), str(epochs), str(args.images), args.device, args.mixed_precision)
        ours = run_isolated("benchmarks.bench_train", "run_ours", *run_args)
        ref = run_isolated("benchmarks.bench_train", "run_reference", *run_args)
        low = run_isolated("benchmarks.bench_train", "run_lower_bound", *run_args)
        results[size] = {"ours": ours, "reference": ref, "lower_bound": low, "epochs": epochs, "images": args.images}
        memory = (
            f"{ours['peak_rss_mb']:.0f}/{ref['peak_rss_mb']:.0f}"
            if "cuda_peak_mb" not in ours
            else f"{ours['cuda_peak_mb']:.0f}/{ref['cuda_peak_mb']:.0f} (est {ours['estimate_mb']:.0f})"
        )
        rows.append(
            (
                size,
                f"{ours['step_s'] * 1000:.1f}",
                f"{ref['step_s'] * 1000:.1f}",
                f"{low['step_s'] * 1000:.1f}",
                f"{ours['step_s'] / ref['step_s']:.2f}x",
                f"{ours['step_s'] / low['step_s']:.2f}x",
                f"{ours['run_s']:.1f}",
                f"{ref['run_s']:.1f}",
                f"{ours['run_s'] / ref['run_s']:.2f}x",
                memory,
            )
        )
        print(f"{size}: {json.dumps(results[size])}", flush=True)
    where = "GPU" if args.device.startswith("cuda") else "CPU"
    print_table(
        f"LoRA training, {where}, precision {args.mixed_precision} "
        "(step = median ms per optimizer step; run = seconds for the epochs)",
        rows,
        (
            "size",
            "ours ms",
            "peft ms",
            "floor ms",
            "ours/peft",
            "ours/floor",
            "ours run s",
            "peft run s",
            "run ratio",
            "peak MB ours/peft" + (" (cuda)" if where == "GPU" else " (RSS)"),
        ),
    )
    print("goals: step <= 1.0x peft and <= 1.10x floor; 10-epoch run <= 0.67x peft; peak memory no higher")
    write_json("train" if where == "CPU" else "train_gpu", {"args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
