"""Noise, timesteps, targets and loss weights of the denoising objective.

Noise and timesteps are drawn per *sample* from a generator seeded by the sample's identity
(seed, epoch, image, occurrence) rather than from one global stream. The same image in the same
epoch therefore gets the same noise whatever the batch size, gradient accumulation, number of
processes or resume point, which is what makes accumulation-equivalence, multi-GPU and exact resume
hold by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts (stable across processes and Python runs)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(
    keys: Sequence[int],
    shape: Sequence[int],
    *,
    noise_offset: float = 0.0,
    num_timesteps: int = 1000,
    min_timestep: int = 0,
    max_timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise ``[B, *shape]`` (plus the offset term) and integer timesteps ``[B]`` on CPU."""
    import torch

    high = num_timesteps if max_timestep is None else max_timestep
    noises, steps = [], []
    for key in keys:
        gen = torch.Generator().manual_seed(int(key))
        noises.append(seeded_noise(gen, shape, noise_offset))
        steps.append(int(torch.randint(min_timestep, high, (1,), generator=gen)))
    return torch.stack(noises), torch.tensor(steps, dtype=torch.long)


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target: the noise (epsilon) or the velocity (v-prediction)."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction!r}")


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch_float32())[timesteps]
    return alphas / (1.0 - alphas)


def torch_float32() -> Any:
    import torch

    return torch.float32


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, g)/SNR for eps, min(SNR, g)/(SNR+1) for v."""
    import torch

    ratio = snr(scheduler, timesteps)
    clipped = torch.minimum(ratio, torch.full_like(ratio, float(gamma)))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (ratio + 1.0)
    return clipped / ratio


def seeded_noise(gen: torch.Generator, shape: Sequence[int], noise_offset: float = 0.0) -> torch.Tensor:
    """One sample's noise from its own generator, plus the offset term when asked.

    kohya/crosslabs' offset adds a per-(sample, channel) constant that shifts the mean brightness.
    Every objective draws its noise here, so the same key gives the same noise whatever the family.
    """
    import torch

    noise = torch.randn(tuple(shape), generator=gen)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=gen)
    return noise
