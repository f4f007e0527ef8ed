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
}


# --- model and data (identical for every run: built from a seed) ---------------------------------
def build_bundle(size: str) -> Any:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sdcore.models.tiny import create_tiny_bundle
    from transformers import CLIPTextConfig, CLIPTextModel

    bundle = create_tiny_bundle("sd1", seed=0)
    if size == "tiny":
        return bundle
    torch.manual_seed(0)
    if size == "mid":
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
        vae = bundle.vae
    else:  # the real SD1.5 architecture with random weights
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            sample_size=64,
        )
        text = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    bundle.unet = unet.eval()
    bundle.vae = vae.eval()
    bundle.text_encoders = [CLIPTextModel(text).eval()]
    return bundle


def make_data(root: Path, size: str, images: int) -> Path:
    from sdcore.testing.datasets import make_tiny_dataset

    return make_tiny_dataset(root / "data", n=images, size=SIZES[size]["resolution"], repeats=1)


# --- the three runs (each executed in its own process by main) -----------------------------------
def run_ours(size: str, steps: str, epochs: str, images: str) -> dict[str, Any]:
    import sdcore
    from sdcore.plugins import get_plugin_manager
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod, LoraOptions

    cfg = SIZES[size]
    stamps: list[float] = []

    class Timer:
        @sdcore.hookimpl
        def sdcore_on_train_step(self, step: int) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), size, int(images))
        bundle = build_bundle(size)
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
            max_bucket_reso=1024,
            cache_latents=True,
            cache_text_encoder_outputs=True,
            save_dtype="fp32",
        )
        options = LoraOptions(output=str(Path(tmp) / "steps.safetensors"), max_steps=int(steps), **common)
        train(LoraMethod(options), bundle=bundle, plugin_manager=pm)
        deltas = [b - a for a, b in itertools.pairwise(stamps)][2:]
        step_s = statistics.median(deltas)
        del bundle, pm
        gc.collect()  # one model alive at a time, as in the reference run
        options = LoraOptions(output=str(Path(tmp) / "epochs.safetensors"), epochs=int(epochs), **common)
        fresh = build_bundle(size)  # built before the clock starts: the reference's setup is not timed either
        start = time.perf_counter()
        train(LoraMethod(options), bundle=fresh)
        run_s = time.perf_counter() - start
    return {"step_s": step_s, "run_s": run_s}


def _reference_setup(size: str, tmp: Path, images: int) -> tuple[Any, ...]:
    import torch
    from peft import LoraConfig

    bundle = build_bundle(size)
    data = make_data(tmp, size, images)
    unet, vae, te, tok = bundle.unet, bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0]
    for module in (unet, vae, te):
        module.requires_grad_(False)
    rank = SIZES[size]["rank"]
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    files = sorted((data / "1_sks").glob("*.png"))
    captions = [f.with_suffix(".txt").read_text() for f in files]
    return bundle, unet, vae, te, tok, optimizer, files, captions


def run_reference(size: str, steps: str, epochs: str, images: str) -> dict[str, Any]:
    """The diffusers example's loop: no latent or text cache; data read and transformed every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        bundle, unet, vae, te, tok, optimizer, files, captions = _reference_setup(size, Path(tmp), int(images))
        scheduler = bundle.noise_scheduler

        def step(index: int) -> None:
            pixels = np.asarray(Image.open(files[index % len(files)]).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            pixels_t = torch.from_numpy(pixels).permute(2, 0, 1)[None]
            ids = tok(
                captions[index % len(files)], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            latents = vae.encode(pixels_t).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
            noisy = scheduler.add_noise(latents, noise, t)
            hidden = te(ids)[0]
            pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

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
    return {"step_s": step_s, "run_s": run_s}


def run_lower_bound(size: str, steps: str, epochs: str, images: str) -> dict[str, Any]:
    """Frozen UNet forward + backward (to the input) on precomputed tensors: no adapter, no optimizer."""
    import torch

    cfg = SIZES[size]
    bundle = build_bundle(size)
    unet = bundle.unet.requires_grad_(False)
    side = cfg["resolution"] // 8
    hidden_width = bundle.text_encoders[0].config.hidden_size
    torch.manual_seed(0)
    latents = torch.randn(1, 4, side, side)
    hidden = torch.randn(1, 77, hidden_width)
    times = []
    for _ in range(int(steps)):
        start = time.perf_counter()
        x = latents.clone().requires_grad_(True)
        pred = unet(x, torch.tensor([500]), hidden).sample
        pred.float().pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[2:]), "run_s": None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks train")
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--steps", type=int, default=12, help="steps timed for the per-step median")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args(argv or [])
    results: dict[str, Any] = {}
    rows = []
    for size in args.sizes.split(","):
        steps = args.steps if size != "sd15" else min(args.steps, 6)
        epochs = args.epochs if size != "sd15" else min(args.epochs, 2)
        run_args = (size, str(steps), str(epochs), str(args.images))
        ours = run_isolated("benchmarks.bench_train", "run_ours", *run_args)
        ref = run_isolated("benchmarks.bench_train", "run_reference", *run_args)
        low = run_isolated("benchmarks.bench_train", "run_lower_bound", *run_args)
        results[size] = {"ours": ours, "reference": ref, "lower_bound": low, "epochs": epochs, "images": args.images}
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
                f"{ours['peak_rss_mb']:.0f}/{ref['peak_rss_mb']:.0f}",
            )
        )
    print_table(
        "LoRA training, CPU (step = median ms per optimizer step; run = seconds for the epochs)",
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
            "peak RSS MB ours/peft",
        ),
    )
    print("goals: step <= 1.0x peft and <= 1.10x floor; 10-epoch run <= 0.67x peft; peak memory no higher")
    write_json("train", {"args": vars(args), "results": results})
    return results


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
