"""The step: noise and timesteps, the prediction, the loss terms, and one optimizer step.

- :class:`Objective` turns a batch into a per-sample loss: noise it at the sampled timesteps, get
  the conditioning (cached or from the method), predict with the UNet (SDXL size conditioning
  included), compare with the training target (epsilon or v) unless the method computes its own
  loss, apply loss masks, min-SNR weights and per-sample (prior-preservation) weights.
- :func:`optimizer_step` runs one optimizer step over an accumulation group of micro-batches:
  each micro-batch loss is divided by the group size, backward runs through the prepared model
  (DDP all-reduces on the last micro-batch only), every process agrees on whether a loss was
  NaN/inf before anything is applied, gradients are clipped, then optimizer and schedule step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SdcoreError
from .method import Batch, Conditioning, StepContext, TrainingMethod
from .options import TrainOptions

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from .batches import BatchMaker
    from .data import SampleRef
    from .placement import Placement


class Objective:
    """The denoising objective of one run (the method may replace the loss)."""

    def __init__(self, bundle: ModelBundle, method: TrainingMethod[Any], options: TrainOptions) -> None:
        self.bundle = bundle
        self.method = method
        self.options = options

    def conditioning_for(self, batch: Batch) -> Conditioning:
        if batch.conditioning is not None:
            return batch.conditioning
        return self.method.encode(self.bundle, batch.captions)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, batch: Batch) -> torch.Tensor:
        from ..models.text import sdxl_time_ids

        bundle = self.bundle
        kwargs: dict[str, Any] = {}
        if bundle.is_sdxl:
            time_ids = sdxl_time_ids(batch.original_sizes, batch.crop_coords, batch.target_sizes, device=noisy.device)
            pooled = cond.pooled
            if pooled is None:
                raise SdcoreError("SDXL conditioning without pooled text embeddings")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(noisy.device), "time_ids": time_ids}
        hidden = cond.hidden_states.to(noisy.device)
        return bundle.unet(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]  # type: ignore[no-any-return]

    def sample_loss(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        """Per-sample weighted loss ``[B]`` for given noise and timesteps."""
        import torch

        from .noise import min_snr_weights, training_target

        scheduler = self.bundle.noise_scheduler
        latents = batch.latents.float()
        noise = noise.to(latents.device)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
        cond = self.conditioning_for(batch)

        def predict(conditioning: Conditioning) -> torch.Tensor:
            return self.predict(noisy, timesteps, conditioning, batch)

        ctx = StepContext(
            bundle=self.bundle,
            batch=batch,
            noisy_latents=noisy,
            noise=noise,
            timesteps=timesteps,
            target=target,
            step=step,
            conditioning=cond,
            predict=predict,
        )
        loss = self.method.compute_loss(ctx)
        if loss is None:
            pred = predict(cond)
            loss = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
            if batch.masks is not None:
                loss = loss * batch.masks
            loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        loss = loss.float()
        if self.options.min_snr_gamma:
            loss = loss * min_snr_weights(scheduler, timesteps, self.options.min_snr_gamma).to(loss.device)
        return loss * batch.loss_weights.to(loss.device)

    def noise_for(self, refs: list[SampleRef], batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Seeded noise and timesteps for the samples ``refs`` (see :mod:`.data`)."""
        from .noise import sample_noise

        keys = [ref.seed(self.options.seed, "noise") for ref in refs]
        return sample_noise(
            keys,
            batch.latents.shape[1:],
            noise_offset=self.options.noise_offset,
            num_timesteps=int(self.bundle.noise_scheduler.config["num_train_timesteps"]),
        )

    def micro_batch_loss(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        """The scalar loss of one micro-batch: the forward of the prepared model."""
        return self.sample_loss(batch, noise, timesteps, step).mean()

    def fixed_loss(
        self,
        batches: BatchMaker,
        accelerator: Any,
        *,
        count: int = 4,
        timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    ) -> float:
        """Mean loss over the first ``count`` images at fixed noise and timesteps (no flips, no
        caption randomness): the contract's measure of learning."""
        import random

        import torch

        from .data import SampleRef
        from .noise import sample_noise

        total, n = 0.0, 0
        entries = batches.data.entries
        with torch.no_grad(), accelerator.autocast():
            for entry in range(min(count, len(entries))):
                batch = batches.make_batch([SampleRef(entry, 0, -1)], with_conditioning=False)
                batch.captions = [self.method.caption_for(entries[entry].caption, is_class=False, rng=random.Random(0))]
                batch.conditioning = None
                for t in timesteps:
                    noise, _ = sample_noise([entry * 1000 + t], batch.latents.shape[1:])
                    loss = self.sample_loss(batch, noise, torch.tensor([t]), 0)
                    total += float(loss.mean())
                    n += 1
        return total / max(n, 1)


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step: the loss averaged over micro-batches and processes, or the
    non-finite value (loss or gradient norm) that stopped it."""

    loss: float
    bad_value: float | None = None
    bad_what: str = "loss"


def optimizer_step(
    group: list[list[SampleRef]],
    *,
    step: int,
    batches: BatchMaker,
    objective: Objective,
    placement: Placement,
    max_grad_norm: float,
    on_bad: Callable[[StepOutcome], None],
) -> StepOutcome:
    """Accumulate ``group`` (micro-batches of sample refs) into one optimizer step.

    ``on_bad`` is called (every process, gradients cleared) when any process saw a non-finite
    loss, or the gradient norm is non-finite without a grad scaler; it is expected to raise.
    """
    import torch

    acc, model = placement.accelerator, placement.model
    step_loss, bad = 0.0, None
    for k, refs in enumerate(group):
        batch = batches.make_batch(refs)
        noise, timesteps = objective.noise_for(refs, batch)
        with placement.no_sync(sync=k == len(group) - 1), acc.autocast():
            loss = model(batch, noise, timesteps, step)
            value = float(loss.detach())
            if not math.isfinite(value):
                bad = value  # still run backward: every process must join the gradient all-reduce
            if loss.requires_grad:  # a method's constant (NaN) loss has no graph
                acc.backward(loss / len(group))
        step_loss += value / len(group)
    step_loss, any_bad = _agree(acc, step_loss, bad is not None)
    if any_bad:
        placement.optimizer.zero_grad(set_to_none=True)
        on_bad(StepOutcome(step_loss, bad if bad is not None else float("nan")))
    if max_grad_norm > 0:
        norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm)
        if acc.scaler is None and norm is not None and not torch.isfinite(torch.as_tensor(norm)):
            placement.optimizer.zero_grad(set_to_none=True)
            on_bad(StepOutcome(step_loss, float(norm), "gradient norm"))
    elif acc.scaler is not None:
        acc.unscale_gradients()
    placement.optimizer.step()
    placement.scheduler.step()
    placement.optimizer.zero_grad(set_to_none=True)
    return StepOutcome(step_loss)


def _agree(acc: Any, loss: float, bad: bool) -> tuple[float, bool]:
    """Mean loss over processes and whether any process saw a non-finite loss."""
    if acc.num_processes <= 1:
        return loss, bad
    import torch

    stats = torch.tensor([0.0 if bad else loss, 1.0 if bad else 0.0], device=acc.device)
    stats = acc.reduce(stats, reduction="sum")
    return float(stats[0]) / acc.num_processes, bool(stats[1] > 0)
