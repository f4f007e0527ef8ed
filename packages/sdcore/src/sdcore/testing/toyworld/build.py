"""Train the toy world's base model from scratch: ``python -m sdcore.testing.toyworld build``.

Two stages, both deterministic for a seed, a torch version and a thread count:

1. the VAE (an SD1 ``AutoencoderKL`` with three levels, 4x downsampling: 32 px -> 8x8x4 latents)
   learns to reconstruct *varied* images: every shape the renderer knows (the world's and the new
   ones) in any RGB colour on plain, coloured or gradient backgrounds, several objects, noise. So
   it can represent colours and shapes the world lacks, which methods are then asked to teach.
   Its ``scaling_factor`` is set so world latents have unit variance.
2. the UNet (``UNet2DConditionModel``, SD1 block layout) and the text encoder (``CLIPTextModel``
   with CLIP's BPE vocabulary, trained jointly from scratch) learn the world: epsilon
   prediction on SD1's DDPM schedule, world captions with 10 % dropped for classifier-free guidance.

The result is a diffusers folder (fp16 safetensors) that sdcore loads as ``toyworld:``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .world import ALL_COLOURS, ALL_SHAPES, BACKGROUND, IMAGE_SIZE, render, shape_mask, world_scenes

TEXT_WIDTH = 32

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 4,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 1,  # one group: per-channel norms would erase colour (a grey VAE)
    "sample_size": IMAGE_SIZE,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": TEXT_WIDTH * 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": TEXT_WIDTH,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


def varied_image(rng: random.Random, size: int = IMAGE_SIZE) -> np.ndarray:
    """A random picture for VAE training (HxWx3 float32 in 0..255): one to three shapes of any kind
    the renderer knows, in named colours (jittered) or any RGB colour, on the world's background,
    a plain colour or a gradient."""
    kind = rng.random()
    canvas: np.ndarray[Any, Any]
    if kind < 0.7:
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = np.asarray(BACKGROUND, dtype=np.float32)
    elif kind < 0.85:
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[:] = np.asarray([rng.uniform(0, 255) for _ in "rgb"], dtype=np.float32)
    else:
        a = np.asarray([rng.uniform(0, 255) for _ in "rgb"], dtype=np.float32)
        b = np.asarray([rng.uniform(0, 255) for _ in "rgb"], dtype=np.float32)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp2d = np.broadcast_to(ramp[None, :] if rng.random() < 0.5 else ramp[:, None], (size, size))
        canvas = a + (b - a) * ramp2d[..., None]
    palette = list(ALL_COLOURS.values())
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        side = rng.randint(8, size - 8)
        alpha = np.zeros((size, size), dtype=np.float32)
        left, top = rng.randint(-2, size - side + 2), rng.randint(-2, size - side + 2)
        coverage = shape_mask(rng.choice(ALL_SHAPES), side)
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, size), min(left + side, size)
        alpha[y0:y1, x0:x1] = coverage[y0 - top : y1 - top, x0 - left : x1 - left]
        if rng.random() < 0.6:
            colour = np.asarray(rng.choice(palette), dtype=np.float32) + [rng.uniform(-25, 25) for _ in "rgb"]
        else:
            colour = np.asarray([rng.uniform(0, 255) for _ in "rgb"], dtype=np.float32)
        canvas = canvas * (1 - alpha[..., None]) + colour.clip(0, 255) * alpha[..., None]
    return canvas.astype(np.float32)


def _to_tensor(images: list[np.ndarray]) -> Any:
    import torch

    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(
    *, steps: int, seed: int, batch_size: int = 16, lr: float = 2e-3, log: Callable[[str], None] = print
) -> Any:
    """Stage 1: an AutoencoderKL trained on :func:`varied_image` pictures."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae: Any = AutoencoderKL(**VAE_CONFIG)
    with torch.no_grad():  # start with a small posterior std: early latents are not drowned in noise
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = -8.0
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps, max(steps // 20, 1))
        batch = _to_tensor([varied_image(rng) for _ in range(batch_size)])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        rec = (decoded - batch).abs().mean() + (decoded - batch).pow(2).mean()
        loss = rec + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"vae  step {step + 1:5d}/{steps}  reconstruction {float(rec.detach()):.4f}  ({time.time() - started:.0f} s)"
            )
    vae.eval()
    return vae


def train_denoiser(
    vae: Any,
    *,
    steps: int,
    seed: int,
    images: int = 4096,
    batch_size: int = 32,
    lr: float = 2e-3,
    caption_dropout: float = 0.1,
    log: Callable[[str], None] = print,
) -> Any:
    """Stage 2: UNet + text encoder on world images; returns the finished :class:`ModelBundle`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ...models.bundle import ModelBundle
    from ...models.text import encode_prompts
    from ...models.tiny import noise_scheduler_config
    from ...models.tokenizer import bundled_clip_tokenizer

    torch.manual_seed(seed + 1)
    scenes = world_scenes(images, seed=seed + 2)
    pixels = _to_tensor([np.asarray(render(scene), dtype=np.float32) for scene in scenes])
    with torch.no_grad():
        raw = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    latents = raw * vae.config.scaling_factor
    captions = [scene.caption for scene in scenes]
    unet: Any = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder: Any = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    scheduler: Any = DDPMScheduler(**noise_scheduler_config("epsilon"))
    bundle = ModelBundle(
        family="sd1",
        prediction_type="epsilon",
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[bundled_clip_tokenizer()],
        noise_scheduler=scheduler,
        source="toyworld:",
        source_format="toyworld",
    )
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod
    rng = random.Random(seed + 3)
    generator = torch.Generator().manual_seed(seed + 4)
    started = time.time()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps, max(steps // 20, 1))
        index = torch.tensor([rng.randrange(len(scenes)) for _ in range(batch_size)])
        texts = ["" if rng.random() < caption_dropout else captions[int(i)] for i in index]
        unique = sorted(set(texts))
        encoded = encode_prompts(bundle, unique).hidden_states
        hidden = encoded[torch.tensor([unique.index(t) for t in texts])]
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(noisy, t, hidden).sample
        loss = (pred - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1:5d}/{steps}  loss {running:.4f}  ({time.time() - started:.0f} s)")
    unet.eval()
    text_encoder.eval()
    return bundle


def build(
    out: str | Path,
    *,
    vae_steps: int = 800,
    unet_steps: int = 1200,
    seed: int = 0,
    threads: int = 1,
    images: int = 4096,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the base model and write it to ``out`` as a diffusers folder (fp16 safetensors)."""
    import torch

    from ...models.save import write_diffusers

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        vae = train_vae(steps=vae_steps, seed=seed, log=log)
        bundle = train_denoiser(vae, steps=unet_steps, seed=seed, images=images, log=log)
    finally:
        torch.set_num_threads(previous)
    metadata = {"toyworld.build": f"seed={seed} vae_steps={vae_steps} unet_steps={unet_steps} threads={threads}"}
    return write_diffusers(bundle, out, dtype="fp16", metadata=metadata)


def weight_difference(folder: str | Path, reference: str | Path) -> dict[str, float]:
    """Largest absolute difference between the weights of two diffusers folders, per component
    (``unet``, ``vae``, ``text_encoder``); ``inf`` where the tensor names or shapes differ. CLIP text
    keys compare with and without the ``text_model.`` level (both layouts load)."""
    from safetensors.numpy import load_file

    result: dict[str, float] = {}
    for component in ("unet", "vae", "text_encoder"):
        ours: dict[str, Any] = {}
        theirs: dict[str, Any] = {}
        for root, into in ((Path(folder), ours), (Path(reference), theirs)):
            for file in sorted((root / component).glob("*.safetensors")):
                # CLIP text weights are written with or without transformers' "text_model." level
                into.update({k.removeprefix("text_model."): v for k, v in load_file(str(file)).items()})
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            result[component] = math.inf
            continue
        result[component] = max(
            (float(np.abs(ours[k].astype(np.float32) - theirs[k].astype(np.float32)).max()) for k in ours),
            default=0.0,
        )
    return result
