"""Learning quality on the toy world: sdcore's LoRA and LoCon next to a plain diffusers + peft loop.

Every run starts from the shipped base model (``toyworld:``) and learns the same new object (a
purple ring named ``sks``: 8 pictures, caption ``sks``) with the same rank, steps, learning rate,
batch size and seed. For each it prints:

- concept score: the share of N fixed-seed samples of the prompt ``sks`` whose main object the
  toy world's scorer reads as a purple ring (the base model scores 0);
- preservation: colour-and-shape accuracy on world prompts after training, relative to the base;
- training seconds.

The anchor is what diffusers' LoRA training script does: ``unet.add_adapter(LoraConfig(...))`` on
the attention projections (``to_q to_k to_v to_out.0``), AdamW, epsilon MSE on the same latents.

    python -m benchmarks quality [-- --steps 150 --lr 2e-3 --rank 8 --n 16 --seeds 1]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import print_table, write_json


def _train_sdcore(data: Path, out: Path, *, conv_rank: int, args: argparse.Namespace, seed: int) -> tuple[Any, float]:
    from sdcore.testing.contract import concept_options, toyworld_bundle
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod

    overrides = {"data": str(data), "max_steps": args.steps, "lr": args.lr, "rank": args.rank, "alpha": float(args.rank),
                 "conv_rank": conv_rank, "conv_alpha": float(conv_rank or 1), "seed": seed, "cache_latents": True}  # fmt: skip
    options = concept_options(LoraMethod, out, overrides)
    bundle = toyworld_bundle()
    started = time.perf_counter()
    train(LoraMethod(options), bundle=bundle)
    return bundle, time.perf_counter() - started


def _train_peft(data: Path, *, args: argparse.Namespace, seed: int) -> tuple[Any, float]:
    import numpy as np
    import torch
    from peft import LoraConfig
    from PIL import Image
    from sdcore.models.text import encode_prompts
    from sdcore.testing.contract import toyworld_bundle

    bundle = toyworld_bundle()
    started = time.perf_counter()
    torch.manual_seed(seed)
    unet, vae = bundle.unet, bundle.vae
    for module in bundle.components().values():
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    folder = next(data.glob("*_sks"))
    pixels = [
        np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in sorted(folder.glob("*.png"))
    ]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
        hidden = encode_prompts(bundle, ["sks"]).hidden_states
    scheduler = bundle.noise_scheduler
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in range(args.steps):
        index = torch.tensor([rng.randrange(len(latents)) for _ in range(4)])
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = torch.nn.functional.mse_loss(unet(noisy, t, hidden.expand(len(index), -1, -1)).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    return bundle, time.perf_counter() - started


def _scores(bundle: Any, args: argparse.Namespace) -> tuple[float, float]:
    from sdcore.testing.toyworld import evaluate
    from sdcore.testing.toyworld.concepts import NEW_OBJECT, concept_score_of

    concept = concept_score_of(bundle, NEW_OBJECT, n=args.n)
    world = evaluate.measure(bundle, args.world, seed=1000).colour_and_shape
    return concept, world


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks quality")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--n", type=int, default=16, help="samples for the concept score")
    parser.add_argument("--world", type=int, default=24, help="world prompts for preservation")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per method")
    args = parser.parse_args(argv)
    import torch
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld.concepts import NEW_OBJECT

    torch.set_num_threads(1)
    _, base_world = _scores(toyworld_bundle(), args)
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        NEW_OBJECT.write_dataset(data, count=8)
        for seed in range(args.seeds):
            runs = {
                "sdcore LoRA": lambda s=seed: _train_sdcore(
                    data, Path(tmp) / f"lora{s}", conv_rank=0, args=args, seed=s
                ),
                "sdcore LoCon": lambda s=seed: _train_sdcore(
                    data, Path(tmp) / f"locon{s}", conv_rank=args.rank, args=args, seed=s
                ),
                "diffusers + peft LoRA (anchor)": lambda s=seed: _train_peft(data, args=args, seed=s),
            }
            for name, run in runs.items():
                bundle, seconds = run()
                concept, world = _scores(bundle, args)
                results.setdefault(name, []).append((concept, world / max(base_world, 1e-9), seconds))
    rows = []
    for name, values in results.items():
        concept = sum(v[0] for v in values) / len(values)
        keep = sum(v[1] for v in values) / len(values)
        seconds = sum(v[2] for v in values) / len(values)
        rows.append((name, f"{concept:.2f}", f"{keep:.2f}", f"{seconds:.1f}"))
    title = (
        f"toy world, new object (purple ring 'sks', 8 images): rank {args.rank}, {args.steps} steps, lr {args.lr}, "
        f"batch 4, {args.seeds} seed(s); concept N={args.n}, preservation N={args.world} (base {base_world:.2f})"
    )
    print_table(title, rows, ("method", "concept score", "preservation", "train s"))
    payload = {"args": vars(args), "base_world": base_world, "results": results}
    write_json("quality", payload)
    return payload


if __name__ == "__main__":
    main()
