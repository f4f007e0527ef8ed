"""Noise, timesteps, targets and loss weights of the denoising objective.

Noise and timesteps are drawn per *sample* from a generator seeded by the sample's identity
(seed, epoch, image, occurrence) rather than from one global stream. The same image in the same
epoch therefore gets the same noise whatever the batch size, gradient accumulation, number of
processes or resume point, which is what makes accumulation-equivalence, multi-GPU and exact resume
hold by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    noise, steps, _ = draw_noise(
        keys,
        shape,
        NoiseSettings(noise_offset=noise_offset),
        integer_timesteps(num_timesteps, min_timestep, max_timestep),
    )
    return noise, steps


def integer_timesteps(
    num_timesteps: int, min_timestep: int | None = None, max_timestep: int | None = None
) -> Callable[[torch.Generator], torch.Tensor]:
    """A DDPM timestep draw: an integer uniform in ``[min, max)`` (kohya's ``get_timesteps``; the
    defaults are ``[0, num_timesteps)``), one ``randint`` from the sample's generator."""
    import torch

    low = 0 if min_timestep is None else int(min_timestep)
    high = num_timesteps if max_timestep is None else int(max_timestep)

    def draw(gen: torch.Generator) -> torch.Tensor:
        return torch.randint(low, high, (1,), generator=gen)

    return draw


@dataclass(frozen=True)
class NoiseSettings:
    """How a sample's noise is shaped (kohya's names in brackets; all off by default).

    - ``noise_offset`` (noise_offset): adds ``offset * N(0, 1)`` per (sample, channel).
    - ``offset_random_strength`` (noise_offset_random_strength): the offset becomes ``U(0, 1) * offset``.
    - ``adaptive_noise_scale`` (adaptive_noise_scale): the offset becomes
      ``max(0, offset + scale * |mean of the latent's channel|)``, per channel (kohya's ``apply_noise_offset``).
    - ``multires_iterations`` / ``multires_discount`` (multires_noise_iterations / _discount): pyramid
      noise, see :func:`pyramid_noise`.
    - ``ip_noise_gamma`` / ``ip_random_strength`` (ip_noise_gamma / _random_strength): input
      perturbation (Ning et al. 2023): the *noisy input* is made with ``noise + gamma * N(0, 1)``
      (``gamma`` times ``U(0, 1)`` with the random strength) while the target keeps ``noise``.
    """

    noise_offset: float = 0.0
    offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_random_strength: bool = False
    #: called with (sample index, the sample's generator) after all of that sample's draws above, for a
    #: runtime part that draws more per sample from the same generator (SD3's per-encoder caption
    #: dropout, :mod:`.encoder_dropout`); None: nothing more is drawn, so existing runs are unchanged
    after_draws: Callable[[int, torch.Generator], None] | None = None

    @classmethod
    def from_options(cls, options: Any) -> NoiseSettings:
        return cls(
            noise_offset=options.noise_offset,
            offset_random_strength=options.noise_offset_random_strength,
            adaptive_noise_scale=options.adaptive_noise_scale,
            multires_iterations=options.multires_noise_iterations or 0,
            multires_discount=options.multires_noise_discount,
            ip_noise_gamma=options.ip_noise_gamma or 0.0,
            ip_random_strength=options.ip_noise_gamma_random_strength,
        )


def draw_noise(
    keys: Sequence[int],
    shape: Sequence[int],
    settings: NoiseSettings,
    draw_timestep: Callable[[torch.Generator], torch.Tensor],
    latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-sample noise ``[B, *shape]``, timesteps ``[B]`` and, with input perturbation, the noise
    the noisy input is made with (else None); on the CPU.

    Each sample's generator draws, in this order: the noise, the offset direction (with an offset),
    the timestep, then the draws of the newer options (offset strength, pyramid noise, perturbation
    strength and noise), then whatever ``settings.after_draws`` draws. The newer draws come last so that with them off every run draws exactly
    what it drew before they existed (recorded histories stay bit-identical). ``latents`` (``[B,
    *shape]``) are needed by ``adaptive_noise_scale`` only.

    kohya draws the random strengths once per *batch*; here each sample draws its own from its
    generator (same distribution per sample), which keeps batch-size/accumulation invariance.
    """
    import torch

    noises, steps, inputs = [], [], []
    for index, key in enumerate(keys):
        gen = torch.Generator().manual_seed(int(key))
        noise = torch.randn(tuple(shape), generator=gen)
        direction = torch.randn((shape[0], 1, 1), generator=gen) if settings.noise_offset else None
        steps.append(draw_timestep(gen).reshape(1))
        if direction is not None:
            offset: Any = settings.noise_offset
            if settings.offset_random_strength:
                offset = torch.rand(1, generator=gen) * offset
            if settings.adaptive_noise_scale is not None:
                if latents is None:
                    raise ValueError("adaptive_noise_scale needs the latents")
                mean = latents[index].detach().float().cpu().mean(dim=(-2, -1), keepdim=True).abs()
                offset = torch.clamp(offset + settings.adaptive_noise_scale * mean, min=0.0)
            noise = noise + offset * direction
        if settings.multires_iterations:
            noise = pyramid_noise(noise, gen, settings.multires_iterations, settings.multires_discount)
        noises.append(noise)
        if settings.ip_noise_gamma:
            strength: Any = settings.ip_noise_gamma
            if settings.ip_random_strength:
                strength = torch.rand(1, generator=gen) * strength
            inputs.append(noise + strength * torch.randn(tuple(shape), generator=gen))
        if settings.after_draws is not None:
            settings.after_draws(index, gen)
    perturbed = torch.stack(inputs) if inputs else None
    return torch.stack(noises), torch.cat(steps), perturbed


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's multires ("pyramid") noise for one sample ``[C, H, W]``.

    Iteration ``i`` draws a factor ``r`` uniform in ``[2, 4)``, adds ``discount**i`` times N(0, 1)
    noise of size ``(max(1, int(H / r**i)), max(1, int(W / r**i)))`` upsampled bilinearly to
    ``(H, W)``, and stops after a level with a side of 1; the sum is divided by its standard deviation.

    Differences from kohya's ``pyramid_noise_like``, both for batch-size invariance: kohya draws
    ``r`` once per level for the whole batch (from Python's ``random``) and divides by the standard
    deviation of the whole batch; here each sample draws its own factors and noises from its own
    generator and is divided by its own standard deviation. The distribution of each sample's
    factors and noises is the same; the normalisation differs only by the batch's spread of
    standard deviations (identical at batch size 1).
    """
    import torch

    channels, height, width = noise.shape[-3], noise.shape[-2], noise.shape[-1]
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        h, w = max(1, int(height / (r**i))), max(1, int(width / (r**i)))
        level = torch.randn((1, channels, h, w), generator=gen)
        up = torch.nn.functional.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)
        out = out + up[0] * discount**i
        if h == 1 or w == 1:
            break
    return out / out.std()


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero SNR (Lin et al. 2023, "Common Diffusion Noise
    Schedules and Sample Steps are Flawed", algorithm 1; kohya's ``--zero_terminal_snr``).

    ``sqrt(alpha_bar)`` is shifted so its last value is 0 and scaled so its first value is kept;
    the last beta becomes 1, so ``alpha_bar`` at the last step is exactly 0 (pure noise input).
    """
    import torch

    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alphas_bar = root**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def zero_terminal_snr_scheduler(scheduler: Any) -> Any:
    """A shallow copy of a DDPM scheduler whose betas/alphas/alphas_cumprod follow
    :func:`zero_terminal_snr_betas` (its ``add_noise``/``get_velocity`` then use them). The
    original is left as is: kohya computes the SNR that min-SNR (and its other SNR weights) use
    before fixing the betas, which keeps those weights finite at the last step (SNR 0 there)."""
    import copy

    import torch

    fixed = copy.copy(scheduler)
    betas = zero_terminal_snr_betas(scheduler.betas.to(torch.float32))
    fixed.betas = betas
    fixed.alphas = 1.0 - betas
    fixed.alphas_cumprod = torch.cumprod(fixed.alphas, dim=0)
    return fixed


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
