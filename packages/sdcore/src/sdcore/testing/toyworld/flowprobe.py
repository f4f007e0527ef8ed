"""Can a tiny flow-matching transformer learn the toy world in a CI budget? The measurement behind
the contract suite's choice of a loss-based check for SD3/Flux (``python -m sdcore.testing.toyworld
flow-probe``).

The most favourable case for a flow toy base: the shipped base model's trained VAE (4 channels, 8x8
latents) and text encoder are reused, frozen, and only an MMDiT denoiser (diffusers'
``SD3Transformer2DModel``, the tiny SD3 sizes but 4 input channels and the text encoder's width)
trains, with the flow-matching objective (logit-normal sigmas, velocity target ``eps - x``, 10 %
captions dropped) at the SD1 build's batch size and learning rate. It is then sampled with an Euler
flow sampler and classifier-free guidance on world prompts and scored like the SD1 base. A real flow
toy base would also need a 16-channel VAE and the family's text encoders, so it costs more than this.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .evaluate import CFG, Accuracy, accuracy, world_prompts
from .scorer import read_image
from .world import render, world_captions, world_scenes


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What one probe run trained and how well the result draws the world."""

    steps: int
    seconds: float
    parameters: int
    final_loss: float
    accuracy: Accuracy

    def __str__(self) -> str:
        return (
            f"{self.steps} steps in {self.seconds:.0f} s ({1000 * self.seconds / max(self.steps, 1):.0f} ms/step), "
            f"{self.parameters} parameters, loss {self.final_loss:.4f}: {self.accuracy}"
        )


def probe(
    *,
    steps: int = 2000,
    images: int = 4096,
    heads: int = 2,
    layers: int = 2,
    patch_size: int = 2,
    batch_size: int = 32,
    lr: float = 2e-3,
    n: int = 32,
    sample_steps: int = 20,
    seed: int = 0,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> ProbeResult:
    """Train the probe's MMDiT ``steps`` steps on the latents of ``images`` world pictures and measure it
    on ``n`` world prompts (``sample_steps`` Euler steps, the world's CFG)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from ...models.load import load_model
    from ...models.text import encode_prompts
    from .build import _cosine, _to_tensor

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = load_model("toyworld:")
        vae, text_encoder = base.vae, base.text_encoders[0]
        scenes = world_scenes(images, seed=seed + 2)
        pixels = _to_tensor([np.asarray(render(scene), dtype=np.float32) for scene in scenes])
        captions = [*sorted(set(world_captions())), ""]
        empty = len(captions) - 1
        with torch.no_grad():
            latents = torch.cat([vae.encode(c).latent_dist.mean for c in pixels.split(256)]).float()
            latents = latents * vae.config.scaling_factor
            hidden = encode_prompts(base, captions).hidden_states.float()
            ids = base.tokenizers[0](captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
            pooled = text_encoder(ids).pooler_output.float()
        index = {caption: i for i, caption in enumerate(captions)}
        labels = torch.tensor([index[scene.caption] for scene in scenes])
        width = int(hidden.shape[-1])
        torch.manual_seed(seed + 1)
        model: Any = SD3Transformer2DModel(
            sample_size=latents.shape[-1],
            patch_size=patch_size,
            in_channels=latents.shape[1],
            out_channels=latents.shape[1],
            num_layers=layers,
            attention_head_dim=8,
            num_attention_heads=heads,
            joint_attention_dim=width,
            caption_projection_dim=8 * heads,
            pooled_projection_dim=width,
            pos_embed_max_size=latents.shape[-1] // patch_size,
        )
        parameters = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        rng = random.Random(seed + 3)
        gen = torch.Generator().manual_seed(seed + 4)
        started, running = time.time(), 0.0
        model.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * _cosine(step, steps, max(steps // 20, 1))
            picked = torch.tensor([rng.randrange(len(scenes)) for _ in range(batch_size)])
            dropped = torch.rand(batch_size, generator=gen) < 0.1
            cond = torch.where(dropped, torch.full((batch_size,), empty), labels[picked])
            x0 = latents[picked]
            noise = torch.randn(x0.shape, generator=gen)
            sigma = torch.sigmoid(torch.randn(batch_size, generator=gen)).view(-1, 1, 1, 1)
            noisy = (1 - sigma) * x0 + sigma * noise
            pred = model(
                hidden_states=noisy,
                encoder_hidden_states=hidden[cond],
                pooled_projections=pooled[cond],
                timestep=sigma.view(-1) * 1000,
            ).sample
            loss = (pred - (noise - x0)).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running = float(loss.detach()) if step == 0 else 0.98 * running + 0.02 * float(loss.detach())
            if step % 200 == 0 or step == steps - 1:
                log(f"flow probe step {step + 1:5d}/{steps}  loss {running:.4f}  ({time.time() - started:.0f} s)")
        seconds = time.time() - started
        model.eval()
        prompts = world_prompts(n)
        samples: list[Any] = []
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                x = torch.randn((1, *latents.shape[1:]), generator=torch.Generator().manual_seed(1000 + i))
                sigmas = torch.linspace(1.0, 0.0, sample_steps + 1)
                pair = torch.tensor([empty, index[prompt]])
                for k in range(sample_steps):
                    velocity = model(
                        hidden_states=torch.cat([x, x]),
                        encoder_hidden_states=hidden[pair],
                        pooled_projections=pooled[pair],
                        timestep=torch.full((2,), float(sigmas[k]) * 1000),
                    ).sample
                    guided = velocity[:1] + CFG * (velocity[1:] - velocity[:1])
                    x = x + (sigmas[k + 1] - sigmas[k]) * guided
                decoded = vae.decode(x / vae.config.scaling_factor).sample[0]
                samples.append(((decoded.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
        measured = accuracy(prompts, [read_image(image) for image in samples])
    finally:
        torch.set_num_threads(previous)
    return ProbeResult(steps, seconds, parameters, running, measured)
