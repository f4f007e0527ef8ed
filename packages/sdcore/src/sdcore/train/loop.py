"""The training loop every method trains through.

``train(method, options)`` validates the whole configuration before loading anything, loads the
model, lets the method prepare it, builds the data plan and caches, then runs optimizer steps
through ``accelerate`` (mixed precision, multi-process) with checkpoints, samples, logs and
exact resume. Methods only provide what differs (:mod:`sdcore.train.method`).

Decisions worth knowing:

- Length: ``--max-steps`` and ``--epochs`` may both be given (training stops at whichever comes
  first); with neither, one epoch is trained.
- Gradient accumulation: an optimizer step consumes ``gradient_accumulation`` micro-batches (the
  last step of an epoch may consume fewer) and each micro-batch loss is divided by the number of
  micro-batches in its step, so batch 2 x 1 and batch 1 x 2 give the same update.
- Multi-process (``accelerate launch``): each process takes every N-th micro-batch of the epoch
  plan; gradients of the trainable parameters are averaged across processes before clipping.
  No DDP wrapper is used, so any method's parameters (UNet, text encoder, embeddings) just work.
- Noise, timesteps, flips and caption variants are seeded per sample (see :mod:`.data`), so
  resuming, batching and the process count never change what a sample sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, PluginError, SdcoreError
from .method import Batch, Conditioning, SaveInfo, StepContext, TrainingMethod
from .options import TrainOptions, apply_model_defaults
from .save_fallback import SaveTargetError, guarded, rescue

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle
    from .data import SampleRef, TrainData
    from .sample_prompts import SamplePrompt

log = logging.getLogger("sdcore.train")


#: options that change the data order, the samples or the schedule: changing them on resume is
#: allowed but warned about (the result no longer equals an uninterrupted run)
_RESUME_SENSITIVE = (
    "data",
    "reg_data",
    "batch_size",
    "gradient_accumulation",
    "seed",
    "lr",
    "lr_scheduler",
    "optimizer",
    "optimizer_args",
    "resolution",
    "flip",
    "shuffle_caption",
    "caption_variants",
)


class TrainingDivergedError(SdcoreError):
    """The loss became NaN or infinite; the last good state was kept."""


@dataclass
class TrainResult:
    output: Path
    steps: int
    epochs: int
    losses: list[float] = field(default_factory=list)
    state_dir: Path = Path()
    last_state: Path | None = None
    #: False on the other processes of a multi-process run (only the main one prints and saves)
    main_process: bool = True


# --------------------------------------------------------------------------------------------
# validation (before any model loads)


def validate_options(options: TrainOptions, method: TrainingMethod | None = None) -> None:
    """Raise :class:`ConfigError` for missing or contradictory options (all of them, one line
    each: :class:`~.preflight.PreflightError`), before anything heavy runs."""
    from .preflight import PreflightError, option_problems

    problems = option_problems(options, method)
    if problems:
        raise PreflightError(problems)


def total_steps_for(options: TrainOptions, data: TrainData) -> tuple[int, int | None]:
    """(optimizer steps to run, epoch limit or None)."""
    accum = options.gradient_accumulation
    epochs = options.epochs
    if options.max_steps is None and epochs is None:
        epochs = 1
    if epochs is None:
        return int(options.max_steps or 0), None
    steps = sum(math.ceil(len(data.epoch_plan(e)) / accum) for e in range(epochs))
    if options.max_steps is not None:
        steps = min(steps, options.max_steps)
    return steps, epochs


# --------------------------------------------------------------------------------------------
# paths


def output_paths(method: TrainingMethod, options: TrainOptions) -> tuple[Path, Path]:
    """(final result path, state root folder ``<result stem>-state`` beside it)."""
    out = Path(method.resolve_output(Path(options.output).expanduser()))
    return out, out.parent / f"{_stem_and_suffix(out)[0]}-state"


def _stem_and_suffix(path: Path) -> tuple[str, str]:
    """``lora.safetensors`` -> (``lora``, ``.safetensors``); a folder name keeps its whole name."""
    if path.suffix and not path.is_dir() and len(path.suffix) <= 13:
        return path.name[: -len(path.suffix)], path.suffix
    return path.name, ""


def intermediate_path(final: Path, *, step: int | None = None, epoch: int | None = None) -> Path:
    """kohya's names: ``lora.safetensors`` -> ``lora-000002.safetensors`` (epoch 2, six digits) or
    ``lora-step00000100.safetensors`` (step 100, eight digits)."""
    stem, ext = _stem_and_suffix(final)
    tag = f"-{epoch:06d}" if epoch is not None else f"-step{step:08d}"
    return final.parent / f"{stem}{tag}{ext}"


# --------------------------------------------------------------------------------------------
# model loading


def load_bundle(options: TrainOptions, plugin_manager: Any = None) -> ModelBundle:
    """Load ``options.model`` (any source ``load_model`` reads; ``tiny:<family>`` for tests and demos)."""
    from ..models.load import load_model

    pm = plugin_manager if hasattr(plugin_manager, "registrations") else None
    return load_model(options.model, pm=pm)


def _dtype_of(precision: str) -> torch.dtype:
    import torch

    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


# --------------------------------------------------------------------------------------------
# the session


class TrainSession:
    """One training run. ``train()`` is ``TrainSession(...).run()``; tests and the contract suite
    use the pieces (``setup``, ``fixed_loss``) directly."""

    def __init__(
        self,
        method: TrainingMethod,
        options: TrainOptions | None = None,
        *,
        bundle: ModelBundle | None = None,
        plugin_manager: Any = None,
    ) -> None:
        self.method = method
        self.options = options if options is not None else method.options
        # Any: None until setup() loads it, then always a ModelBundle
        self.bundle: Any = bundle
        self.plugin_manager = plugin_manager
        self.losses: list[float] = []
        self.saved_results: list[Path] = []
        self.latent_cache: Any = None
        self.text_cache: Any = None
        self.last_state: Path | None = None
        self._prefetcher: _Prefetcher | None = None
        self._mask_cache: dict[tuple[int, bool], Any] = {}
        self._setup_done = False

    # -- helpers -------------------------------------------------------------------------------
    def _hook(self, name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook; an exception from a plugin becomes a PluginError naming it
        (KeyboardInterrupt and our own errors pass through unchanged)."""
        if self.plugin_manager is None:
            return
        caller = getattr(self.plugin_manager.hook, name)
        try:
            caller(**kwargs)
        except SdcoreError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {_culprit(caller, exc)!r} failed in {name}: {exc}") from exc

    def say(self, message: str) -> None:
        """Print ``message`` on the main process (``--no-progress`` hides only the bar, not this)."""
        log.debug(message)
        if self.is_main:
            print(message, file=sys.stderr)

    @property
    def is_main(self) -> bool:
        acc = getattr(self, "accelerator", None)
        return True if acc is None else bool(acc.is_main_process)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate, load, prepare, build data, caches, optimizer; restore a state when resuming."""
        import torch
        from accelerate import Accelerator

        o = self.options
        from .preflight import preflight_for_run  # every check before any model loads; all problems at once

        # --resolution 0: the model's native size, peeked from its header; where only loading tells,
        # the pre-flight plans with 512 and the size is set once the model is loaded
        native_known = apply_model_defaults(o, self.bundle)
        planned = o if native_known else dataclasses.replace(o, resolution=512)
        self.preflight = preflight_for_run(
            self.method, planned, bundle=self.bundle, plugin_manager=self.plugin_manager, say=self.say
        )
        if not native_known:
            self.bundle = load_bundle(o, self.plugin_manager)
            apply_model_defaults(o, self.bundle)
        self.output, self.state_root = output_paths(self.method, o)

        log_with = None
        if o.log_dir:
            try:
                import tensorboard  # noqa: F401

                log_with = "tensorboard"
            except ImportError:
                log.warning("--log-dir given but tensorboard is not installed: not logging")
        with contextlib.suppress(Exception):  # a previous run in this process fixed another precision
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        try:
            self.accelerator = Accelerator(
                mixed_precision=o.mixed_precision,
                log_with=log_with,
                project_dir=o.log_dir,
            )
        except ValueError as exc:
            raise ConfigError(f"--mixed-precision {o.mixed_precision}: {exc}") from exc
        acc = self.accelerator
        self.device = acc.device

        self._build_data()
        if self.total_steps < 1:
            raise ConfigError("nothing to train: the run has 0 steps (check --max-steps/--epochs and the dataset)")
        if self.is_main:  # shown with --no-progress too: it lists skipped files
            per_epoch = len(self.data.epoch_plan(0))
            print(self.data.index.summary(), file=sys.stderr)
            print(
                f"{per_epoch} batches of up to {o.batch_size} per epoch"
                + (f" per process ({acc.num_processes} processes)" if acc.num_processes > 1 else "")
                + f", gradient accumulation {o.gradient_accumulation}: {self.total_steps} optimizer steps"
                + (f" over {self.max_epochs} epochs" if self.max_epochs else ""),
                file=sys.stderr,
            )

        if self.bundle is None:
            self.bundle = load_bundle(o, self.plugin_manager)
        bundle = self.bundle

        torch.manual_seed(o.seed)  # method weight init is seeded
        sources = (o.data, o.reg_data)
        groups = self.method.prepare(bundle)
        if (o.data, o.reg_data) != sources:
            # the method changed the dataset in prepare (DreamBooth adds generated class images)
            self._build_data()
        params = [p for g in groups for p in g["params"]]
        if not any(p.requires_grad for p in params):
            raise ConfigError(f"method {self.method.name!r} returned no trainable parameters")
        self.param_groups = groups
        self.params = [p for p in params if p.requires_grad]
        self._place_model()

        if o.gradient_checkpointing:
            # also when the UNet is frozen: gradients still flow through it to LoRA/TI parameters
            bundle.unet.enable_gradient_checkpointing()
            if not self.method.text_encoder_frozen:
                for te in bundle.text_encoders:
                    if hasattr(te, "gradient_checkpointing_enable"):
                        te.gradient_checkpointing_enable()

        self._build_caches()

        from .optim import create_optimizer, create_scheduler

        optimizer = create_optimizer(o.optimizer, groups, lr=o.lr, args=o.optimizer_args)
        self.optimizer = (
            acc.prepare_optimizer(optimizer) if hasattr(acc, "prepare_optimizer") else acc.prepare(optimizer)
        )
        lr_lambda = self.method.lr_lambda()
        if lr_lambda is not None:  # the method's own schedule (TI's A1111 "rate:step" schedule)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        else:
            self.scheduler = create_scheduler(
                o.lr_scheduler,
                optimizer,
                total_steps=self.total_steps,
                warmup_steps=o.lr_warmup_steps,
                power=o.lr_power,
            )
        from .state import TrainPosition

        self.position = TrainPosition()
        if o.resume:
            self._restore(o.resume)
        if log_with:
            acc.init_trackers(f"sdcore-{self.method.name or 'train'}", config=_flat_config(o))
        self._setup_done = True

    def _build_data(self) -> None:
        """Index the dataset (without the method's auxiliary files), shard it, count the steps."""
        from .data import build_train_data

        acc = self.accelerator
        self.data = build_train_data(
            self.options,
            balance_class=bool(getattr(self.method, "balance_class", True)),
            rank=acc.process_index,
            world_size=acc.num_processes,
            auxiliary=self.method.is_auxiliary_file,
        )
        self.total_steps, self.max_epochs = total_steps_for(self.options, self.data)

    def _place_model(self) -> None:
        """Frozen weights to the compute dtype (under mixed precision), trainable ones fp32."""
        import torch

        bundle = self.bundle
        assert bundle is not None
        weight_dtype = _dtype_of(self.options.mixed_precision)
        cast_frozen = bool(getattr(self.method, "cast_frozen_weights", True))
        trainable = {id(p) for p in self.params}
        for name, module in bundle.components().items():
            module.to(self.device)
            module_trains = False
            for p in module.parameters():
                if id(p) in trainable:
                    module_trains = True
                    if p.dtype != torch.float32:
                        p.data = p.data.float()
                elif not cast_frozen:
                    continue
                elif p.dtype != weight_dtype and not (name == "vae" and weight_dtype == torch.float16):
                    # the VAE stays fp32 under fp16: SD/SDXL VAEs overflow in fp16 (NaN latents)
                    p.data = p.data.to(weight_dtype)
            module.train(module_trains)
        # method-owned parameters outside the bundle's modules (e.g. separate embeddings)
        for p in self.params:
            if p.device != self.device:
                p.data = p.data.to(self.device)

    def _build_caches(self) -> None:
        o = self.options
        from .cache import LatentCache, TextCache
        from .progress import progress_bar

        if o.cache_latents:
            self.latent_cache = LatentCache(
                self.bundle,
                self.data.entries,
                self.data.assignments,
                seed=o.seed,
                to_disk=o.cache_latents_to_disk,
                cache_dir=getattr(o, "cache_dir", None),
            )
            wanted = self.data.needed_latents()
            bar = progress_bar(
                total=len({w[0] for w in wanted}),
                desc="caching latents",
                enabled=o.progress and self.is_main,
                unit="image",
                leave=False,
            )
            with bar:
                if self.latent_cache.to_disk and self.accelerator.num_processes > 1:
                    # the main process encodes and writes the files; the others then read them
                    if self.is_main:
                        self.latent_cache.fill(wanted, is_main=True, progress=bar)
                    self.accelerator.wait_for_everyone()
                    if not self.is_main:
                        self.latent_cache.fill(wanted, is_main=False, progress=bar)
                else:
                    self.latent_cache.fill(wanted, is_main=self.is_main, progress=bar)
            if self.latent_cache.encoded or self.latent_cache.reused:
                self.say(f"latents: {self.latent_cache.encoded} encoded, {self.latent_cache.reused} reused from disk")
            if self.device.type != "cpu" and not self.method.needs_pixels:
                self.bundle.vae.to("cpu")  # frees accelerator memory; samples move it back
        if o.cache_text_encoder_outputs and self.method.text_encoder_frozen:
            self.text_cache = TextCache(
                self.bundle,
                self.method,
                self.data.entries,
                seed=o.seed,
                variants=o.caption_variants,
                dtype=_dtype_of(o.mixed_precision),
            )
            with self.accelerator.autocast():
                self.text_cache.fill()
            if self.device.type != "cpu":
                for te in self.bundle.text_encoders:
                    te.to("cpu")

    def _restore(self, resume: str) -> None:
        from .state import load_state, read_position, resolve_resume

        folder = resolve_resume(resume, self.state_root)
        position, record = read_position(folder)
        if record.get("method") not in (None, self.method.name):
            raise ConfigError(
                f"--resume {folder}: the state is from method {record.get('method')!r}, not {self.method.name!r}"
            )
        trainable = load_state(
            folder, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.accelerator.scaler
        )
        self.method.load_trainable_state_dict({k: v.to(self.device) for k, v in trainable.items()})
        saved = record.get("options") or {}
        current = asdict(self.options)
        changed = [k for k in _RESUME_SENSITIVE if k in saved and saved[k] != current.get(k)]
        if changed:
            log.warning(
                "resuming with changed %s: the run continues but will not match an uninterrupted one",
                ", ".join(f"{k} ({saved[k]!r} -> {current.get(k)!r})" for k in changed),
            )
            self.say("warning: resuming with changed " + ", ".join(changed))
        self.position = position
        self.losses = [float(x) for x in record.get("losses", [])][: position.step]
        self.say(f"resumed from {folder} at step {position.step} (epoch {position.epoch + 1}, batch {position.batch})")

    # -- batches -------------------------------------------------------------------------------
    def make_batch(self, refs: list[SampleRef], *, with_conditioning: bool = True) -> Batch:
        """Latents (scaled), captions and SDXL sizes for the samples ``refs``."""
        import random

        import torch

        from .cache import encode_pixels
        from .data import make_caption

        data, bundle = self.data, self.bundle
        assert bundle is not None
        latents: list[Any] = []
        captions, originals, crops, targets, pixels_list, is_class, weights = [], [], [], [], [], [], []
        to_encode: list[tuple[int, Any, int]] = []  # (slot, pixels, seed) when latents are not cached
        for ref in refs:
            entry, assignment = data.entries[ref.entry], data.assignments[ref.entry]
            flipped = data.flip_of(ref)
            pixels = None
            if self.latent_cache is not None:
                latent, original, crop = self.latent_cache.get(ref.entry, flipped)
                latents.append(latent)
            else:
                array, original, crop = self._pixels(ref.entry, flipped)
                pixels = torch.from_numpy(array)
                to_encode.append((len(latents), pixels, self.latent_cache_seed(ref.entry, flipped)))
                latents.append(None)
            if self.method.needs_pixels:
                if pixels is None:
                    array, _, _ = self._pixels(ref.entry, flipped)
                    pixels = torch.from_numpy(array)
                pixels_list.append(pixels)
            if self.text_cache is not None:
                captions.append(self.text_cache.choose(ref.entry, ref.seed(self.options.seed, "caption")))
            else:
                captions.append(make_caption(self.method, entry, random.Random(ref.seed(self.options.seed, "caption"))))
            originals.append(tuple(original))
            crops.append(tuple(crop))
            w, h = assignment.bucket
            targets.append((h, w))
            is_class.append(entry.is_class)
            weights.append(float(self.options.prior_loss_weight) if entry.is_class else 1.0)
        if to_encode:
            encoded = encode_pixels(bundle, torch.stack([p for _, p, _ in to_encode]), [s for _, _, s in to_encode])
            for (slot, _, _), latent in zip(to_encode, encoded, strict=True):
                latents[slot] = latent
        latent_batch = torch.stack(latents).to(self.device) * bundle.vae_scaling_factor
        batch = Batch(
            latents=latent_batch,
            captions=captions,
            is_class=torch.tensor(is_class, device=self.device),
            loss_weights=torch.tensor(weights, device=self.device),
            original_sizes=originals,
            crop_coords=crops,
            target_sizes=targets,
            pixels=torch.stack(pixels_list).to(self.device) if self.method.needs_pixels else None,
            extra={"refs": refs},
        )
        batch.masks = self._loss_masks(refs, latent_batch.shape[-2:])
        if self.text_cache is not None and with_conditioning:
            batch.conditioning = self.text_cache.batch(captions).to(self.device)
        return batch

    def _loss_masks(self, refs: list[SampleRef], latent_size: Any) -> Any:
        """``[B, 1, h, w]`` loss weights from the method (cached per image and flip), or ``None``."""
        import torch

        size = (int(latent_size[0]), int(latent_size[1]))
        masks = []
        for ref in refs:
            flipped = self.data.flip_of(ref)
            key = (ref.entry, flipped)
            if key not in self._mask_cache:
                entry, assignment = self.data.entries[ref.entry], self.data.assignments[ref.entry]
                self._mask_cache[key] = self.method.loss_mask(entry, assignment, flipped=flipped, latent_size=size)
            masks.append(self._mask_cache[key])
        if all(mask is None for mask in masks):
            return None
        ones = torch.ones(1, *size)
        return torch.stack([ones if mask is None else mask.reshape(1, *size).float() for mask in masks]).to(self.device)

    def _pixels(self, entry: int, flipped: bool) -> tuple[Any, Any, Any]:
        from .data import load_pixels

        prefetcher = self._prefetcher
        if prefetcher is not None:
            found = prefetcher.take((entry, flipped))
            if found is not None:
                return found
        return load_pixels(self.data.entries[entry], self.data.assignments[entry], flip=flipped)

    def _prefetch(self, refs_groups: list[list[SampleRef]]) -> None:
        """Start decoding the images of the coming micro-batches in background threads."""
        prefetcher = self._prefetcher
        if prefetcher is None:
            return
        from .data import load_pixels

        for refs in refs_groups:
            for ref in refs:
                flipped = self.data.flip_of(ref)
                entry, assignment = self.data.entries[ref.entry], self.data.assignments[ref.entry]
                prefetcher.submit((ref.entry, flipped), load_pixels, entry, assignment, flip=flipped)

    def latent_cache_seed(self, entry: int, flipped: bool) -> int:
        from .cache import latent_seed

        return latent_seed(self.options.seed, self.data.entries[entry], flipped)

    # -- the objective -------------------------------------------------------------------------
    def conditioning_for(self, batch: Batch) -> Conditioning:
        if batch.conditioning is not None:
            return batch.conditioning
        return self.method.encode(self.bundle, batch.captions)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, batch: Batch) -> torch.Tensor:
        from ..models.text import sdxl_time_ids

        bundle = self.bundle
        assert bundle is not None
        kwargs: dict[str, Any] = {}
        if bundle.is_sdxl:
            time_ids = sdxl_time_ids(batch.original_sizes, batch.crop_coords, batch.target_sizes, device=noisy.device)
            pooled = cond.pooled
            if pooled is None:
                raise SdcoreError("SDXL conditioning without pooled text embeddings")
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(noisy.device), "time_ids": time_ids}
        hidden = cond.hidden_states.to(noisy.device)
        return bundle.unet(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]

    def sample_loss(self, batch: Batch, noise: torch.Tensor, timesteps: torch.Tensor, step: int) -> torch.Tensor:
        """Per-sample weighted loss ``[B]`` for given noise and timesteps."""
        import torch

        from .noise import min_snr_weights, training_target

        bundle = self.bundle
        assert bundle is not None
        scheduler = bundle.noise_scheduler
        latents = batch.latents.float()
        noise = noise.to(latents.device)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = training_target(scheduler, latents, noise, timesteps)
        cond = self.conditioning_for(batch)

        def predict(conditioning: Conditioning) -> torch.Tensor:
            return self.predict(noisy, timesteps, conditioning, batch)

        ctx = StepContext(
            bundle=bundle,
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

    def micro_batch_loss(self, refs: list[SampleRef], step: int) -> torch.Tensor:
        from .noise import sample_noise

        batch = self.make_batch(refs)
        keys = [ref.seed(self.options.seed, "noise") for ref in refs]
        noise, timesteps = sample_noise(
            keys,
            batch.latents.shape[1:],
            noise_offset=self.options.noise_offset,
            num_timesteps=self.bundle.noise_scheduler.config.num_train_timesteps,  # type: ignore[union-attr]
        )
        return self.sample_loss(batch, noise, timesteps, step).mean()

    def fixed_loss(self, *, count: int = 4, timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)) -> float:
        """Mean loss over the first ``count`` images at fixed noise and timesteps (no flips, no
        caption randomness): the contract's measure of learning."""
        import random

        import torch

        from .data import SampleRef
        from .noise import sample_noise

        total, n = 0.0, 0
        with torch.no_grad(), self.accelerator.autocast():
            for entry in range(min(count, len(self.data.entries))):
                ref = SampleRef(entry, 0, -1)
                batch = self.make_batch([ref], with_conditioning=False)
                caption = self.data.entries[entry].caption
                batch.captions = [self.method.caption_for(caption, is_class=False, rng=random.Random(0))]
                batch.conditioning = None
                for t in timesteps:
                    noise, _ = sample_noise([entry * 1000 + t], batch.latents.shape[1:])
                    loss = self.sample_loss(batch, noise, torch.tensor([t]), 0)
                    total += float(loss.mean())
                    n += 1
        return total / max(n, 1)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from .events import TrainEventContext

        if not self._setup_done:
            self.setup()
        o = self.options
        self._started = time.time()
        self.context = TrainEventContext(
            method_name=self.method.name,
            options=o,
            output=self.output,
            state_dir=self.state_root,
            total_steps=self.total_steps,
            step=self.position.step,
            epoch=self.position.epoch,
            bundle=self.bundle,
            method=self.method,
            session=self,
        )
        restore_sigterm = _sigterm_as_interrupt()
        try:
            self._hook("sdcore_before_train", context=self.context)
            self._loop()
            result = self._finish()
        except KeyboardInterrupt as exc:
            self._save_on_error(exc, "interrupted")
            raise
        except TrainingDivergedError as exc:
            self._error_hook(exc)
            raise
        except SaveTargetError as exc:  # a save failed (permissions, disk full): rescue the result, one line
            self._error_hook(exc)
            raise rescue(self, exc) from exc
        except Exception as exc:
            self._save_on_error(exc, "error")
            raise
        finally:
            restore_sigterm()
            if o.log_dir and getattr(self.accelerator, "trackers", None):
                with contextlib.suppress(Exception):
                    self.accelerator.end_training()
        self._hook("sdcore_after_train", context=self.context, result=result)
        return result

    def _save_on_error(self, exc: BaseException, why: str) -> None:
        if self._setup_done and self.position.step > 0 and self.options.save_state:
            try:
                folder = self.save_state()
                message = f"{why}: resumable state saved in {folder} (continue with --resume latest)"
                # the CLI prints the interruption once, with this folder (KeyboardInterrupt carries it)
                if why == "interrupted":
                    log.info(message)
                else:
                    self.say(message)
                with contextlib.suppress(AttributeError, TypeError):
                    exc.sdcore_state = folder  # type: ignore[attr-defined]
            except Exception as save_exc:  # never hide the original error
                log.error("could not save the training state: %s", save_exc)
        self._error_hook(exc)

    def _error_hook(self, exc: BaseException) -> None:
        try:
            self._hook("sdcore_on_train_error", context=self.context, error=exc)
        except Exception as hook_exc:  # the original error is what the user must see
            log.error("%s", hook_exc)

    def _loop(self) -> None:
        import torch

        from .progress import progress_bar

        o, acc = self.options, self.accelerator
        accum = o.gradient_accumulation
        pos = self.position
        bar = progress_bar(
            total=self.total_steps,
            initial=pos.step,
            enabled=o.progress and self.is_main,
            desc=self.method.name or "train",
        )
        recent: list[float] = []
        if self.latent_cache is None or self.method.needs_pixels:
            self._prefetcher = _Prefetcher()
        try:
            while pos.step < self.total_steps and (self.max_epochs is None or pos.epoch < self.max_epochs):
                plan = self.data.epoch_plan(pos.epoch)
                if pos.batch >= len(plan):
                    if not plan:
                        raise ConfigError("an epoch has no batches (dataset empty for this process)")
                    self._end_epoch()
                    continue
                group = plan[pos.batch : pos.batch + accum]
                self._prefetch(plan[pos.batch + len(group) : pos.batch + len(group) + accum])
                step_loss, bad_loss = 0.0, None
                for refs in group:
                    with acc.autocast():
                        loss = self.micro_batch_loss(refs, pos.step)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        bad_loss = value  # stop below, after every process agrees (no deadlock)
                        break
                    acc.backward(loss / len(group))
                    step_loss += value / len(group)
                step_loss, any_bad = self._sync_step(step_loss, bad_loss is not None)
                if any_bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    self._diverged(bad_loss if bad_loss is not None else float("nan"))
                self._reduce_gradients()
                if acc.scaler is not None:
                    acc.unscale_gradients()
                if o.max_grad_norm > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
                    if acc.scaler is None and not torch.isfinite(norm):
                        self.optimizer.zero_grad(set_to_none=True)
                        self._diverged(float(norm), what="gradient norm")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                pos.batch += len(group)
                self.losses.append(step_loss)
                recent = ([*recent, step_loss])[-20:]
                lr = float(self.scheduler.get_last_lr()[0])
                self.method.on_step_end(self.bundle, pos.step)
                logs = {"loss": step_loss, "loss_avg": sum(recent) / len(recent), "lr": lr, "epoch": pos.epoch + 1}
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss_avg']:.4f}", lr=f"{lr:.2e}", epoch=pos.epoch + 1, refresh=False)
                if o.log_dir:
                    acc.log({"train/loss": step_loss, "train/lr": lr}, step=pos.step)
                if pos.batch >= len(plan):
                    self._end_epoch()
                if o.save_every and pos.step % o.save_every == 0 and pos.step < self.total_steps:
                    self.save_checkpoint(step=pos.step)
                if o.sample_every and pos.step % o.sample_every == 0:
                    self.render_samples(f"step{pos.step:08d}")
                # last, so an interrupt raised by a hook never skips this step's saves
                self.context.step, self.context.epoch = pos.step, pos.epoch
                self._hook("sdcore_on_train_step", context=self.context, step=pos.step, logs=logs)
        finally:
            bar.close()
            if self._prefetcher is not None:
                self._prefetcher.close()
                self._prefetcher = None

    def _end_epoch(self) -> None:
        pos, o = self.position, self.options
        pos.epoch += 1
        pos.batch = 0
        last = pos.step >= self.total_steps or (self.max_epochs is not None and pos.epoch >= self.max_epochs)
        if o.save_every_epochs and pos.epoch % o.save_every_epochs == 0 and not last:
            self.save_checkpoint(epoch=pos.epoch)
        if o.sample_every_epochs and pos.epoch % o.sample_every_epochs == 0 and not last:
            self.render_samples(f"epoch{pos.epoch:06d}")

    def _diverged(self, value: float, what: str = "loss") -> None:
        folder = None
        if self.position.step > 0:
            with contextlib.suppress(Exception):
                folder = self.save_state()
        where = f"; the last good state (step {self.position.step}) is in {folder}" if folder else ""
        raise TrainingDivergedError(
            f"{what} became {value} at step {self.position.step + 1}{where}. Lower --lr, use --mixed-precision bf16 "
            "instead of fp16, or check the data"
        )

    def _sync_step(self, loss: float, bad: bool) -> tuple[float, bool]:
        """Mean loss over processes and whether any process saw a non-finite loss."""
        acc = self.accelerator
        if acc.num_processes <= 1:
            return loss, bad
        import torch

        stats = torch.tensor([0.0 if bad else loss, 1.0 if bad else 0.0], device=self.device)
        stats = acc.reduce(stats, reduction="sum")
        return float(stats[0]) / acc.num_processes, bool(stats[1] > 0)

    def _reduce_gradients(self) -> None:
        acc = self.accelerator
        if acc.num_processes <= 1:
            return
        import torch

        params = [p for p in self.params if p.requires_grad]  # a method may freeze some mid-run
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        flat = acc.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n

    # -- saving --------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        import json

        o, pos = self.options, self.position
        entries = self.data.entries
        dirs: dict[str, dict[str, int]] = {}
        tags: dict[str, dict[str, int]] = {}
        from ..data.captions import tag_frequencies

        for entry in entries:
            name = Path(entry.subset.image_dir).name
            d = dirs.setdefault(name, {"n_repeats": entry.repeats, "img_count": 0})
            d["img_count"] += 1
        for name in dirs:
            tags[name] = tag_frequencies(e.caption for e in entries if Path(e.subset.image_dir).name == name)
        bundle = self.bundle
        assert bundle is not None
        meta = {
            "sdcore_method": self.method.name,
            "sdcore_base_model": str(o.model),
            "sdcore_family": bundle.family,
            "ss_training_started_at": str(int(getattr(self, "_started", time.time()))),
            "ss_training_finished_at": str(int(time.time())),
            "ss_steps": str(pos.step),
            "ss_epoch": str(pos.epoch),
            "ss_max_train_steps": str(self.total_steps),
            "ss_learning_rate": str(o.lr),
            "ss_lr_scheduler": o.lr_scheduler,
            "ss_lr_warmup_steps": str(o.lr_warmup_steps),
            "ss_optimizer": o.optimizer + (f"({o.optimizer_args})" if o.optimizer_args else ""),
            "ss_batch_size_per_device": str(o.batch_size),
            "ss_gradient_accumulation_steps": str(o.gradient_accumulation),
            "ss_mixed_precision": o.mixed_precision,
            "ss_seed": str(o.seed),
            "ss_clip_skip": str(o.clip_skip),
            "ss_resolution": f"({o.resolution}, {o.resolution})",
            "ss_noise_offset": str(o.noise_offset),
            "ss_min_snr_gamma": str(o.min_snr_gamma),
            "ss_num_train_images": str(sum(e.repeats for e in entries if not e.is_class)),
            "ss_num_reg_images": str(sum(e.repeats for e in entries if e.is_class)),
            "ss_cache_latents": str(o.cache_latents),
            "ss_shuffle_caption": str(o.shuffle_caption),
            "ss_keep_tokens": str(o.keep_tokens),
            "ss_flip_aug": str(o.flip),
            "ss_v2": str(bundle.family == "sd2"),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_tag_frequency": json.dumps(tags),
        }
        return meta

    @guarded
    def save_checkpoint(self, *, step: int | None = None, epoch: int | None = None) -> None:
        """An intermediate result plus (when enabled) a resumable state, with retention."""
        o = self.options
        if self.is_main:
            path = intermediate_path(self.output, step=step, epoch=epoch)
            saved = self.method.save(
                self.bundle,
                SaveInfo(
                    path=path, step=self.position.step, epoch=self.position.epoch, metadata=self.metadata(), final=False
                ),
            )
            self.saved_results.append(Path(saved))
            if o.save_limit:
                while len(self.saved_results) > o.save_limit:
                    _remove(self.saved_results.pop(0))
        if o.save_state:
            self.save_state()

    @guarded
    def save_state(self) -> Path:
        from .state import prune_states, save_state

        self.accelerator.wait_for_everyone()
        folder = self.state_root / f"step-{self.position.step:08d}"
        if self.is_main:
            folder = save_state(
                self.state_root,
                self.position,
                trainable=self.method.trainable_state_dict(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
                scaler=self.accelerator.scaler,
                extra={
                    "method": self.method.name,
                    "losses": self.losses,
                    "total_steps": self.total_steps,
                    "options": asdict(self.options),
                    "world_size": self.accelerator.num_processes,
                },
            )
            if self.options.keep_states > 0:
                prune_states(self.state_root, self.options.keep_states)
        self.accelerator.wait_for_everyone()
        self.last_state = folder
        return folder

    def _finish(self) -> TrainResult:
        o = self.options
        if o.sample_prompts and not (o.sample_every and self.position.step % o.sample_every == 0):
            self.render_samples("final")
        if o.save_state:
            self.save_state()
        output = self.output
        if self.is_main:
            output = Path(
                guarded(self.method.save)(
                    self.bundle,
                    SaveInfo(
                        path=self.output,
                        step=self.position.step,
                        epoch=self.position.epoch,
                        metadata=self.metadata(),
                        final=True,
                    ),
                )
            )
            log.info(f"saved {output}")  # the caller reports it (the CLI prints one "saved" line)
        self.accelerator.wait_for_everyone()
        return TrainResult(
            main_process=self.is_main,
            output=output,
            steps=self.position.step,
            epochs=self.position.epoch,
            losses=list(self.losses),
            state_dir=self.state_root,
            last_state=self.last_state,
        )

    # -- samples -------------------------------------------------------------------------------
    def sample_prompt_list(self) -> list[SamplePrompt]:
        from .sample_prompts import read_sample_prompts

        prompts = read_sample_prompts(self.options.sample_prompts or "")
        for ignored in sorted({option for p in prompts for option in p.ignored}):
            log.warning("sample prompts: option %s is not used by sdcore (left out of the prompt)", ignored)
        return prompts

    def render_samples(self, tag: str) -> Path | None:
        """Render the sample prompts into ``<output stem>-samples/<tag>.png`` (a grid)."""
        if not self.is_main:
            return None
        try:
            from ..generate.pipeline import generate_images
        except ImportError:
            log.warning("sample images need sdcore.generate.pipeline, which is not available")
            return None
        import torch

        prompts = self.sample_prompt_list()
        if not prompts:
            return None
        self.say(f"rendering {len(prompts)} sample image(s), {self.options.sample_steps} steps each ...")
        bundle = self.bundle
        assert bundle is not None
        moved = []
        for module in [bundle.vae, *bundle.text_encoders]:
            if next(module.parameters()).device != self.device:
                module.to(self.device)
                moved.append(module)
        from .sample_prompts import generation_arguments, generation_calls

        o = self.options
        defaults = {"steps": o.sample_steps, "width": o.resolution, "height": o.resolution, "sampler": o.sample_sampler}
        images = []
        calls = generation_calls(prompts, o.seed)
        try:
            with torch.no_grad(), self.method.sampling(bundle) as extra:
                for group, seed in calls:
                    arguments = generation_arguments(group, defaults, extra)
                    images += generate_images(
                        bundle, [p.prompt for p in group], seed=seed, clip_skip=o.clip_skip, **arguments
                    )
        finally:
            for module in moved:
                module.to("cpu")
        folder = self.state_root.parent / f"{self.state_root.name[: -len('-state')]}-samples"
        path = folder / f"{tag}.png"
        from .sample_info import sample_infotexts

        _write_grid(images, path, sample_infotexts(self, calls, defaults, images, extra))
        return path


class _Prefetcher:
    """Decodes the next micro-batches' images in threads while the current step runs (only when
    images are read every step: no latent cache, or a method that needs pixels). Loading is a pure
    function of the image, so prefetching never changes results."""

    def __init__(self, workers: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdcore-prefetch")
        self.futures: dict[Any, Any] = {}

    def submit(self, key: Any, fn: Any, *args: Any, **kwargs: Any) -> None:
        if key not in self.futures:
            self.futures[key] = self.pool.submit(fn, *args, **kwargs)

    def take(self, key: Any) -> Any:
        future = self.futures.pop(key, None)
        return None if future is None else future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.futures.clear()


def _sigterm_as_interrupt() -> Any:
    """Turn SIGTERM (a scheduler preempting the job, ``kill``) into KeyboardInterrupt while
    training, so it saves a resumable state too. Returns the function restoring the old handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _culprit(caller: Any, exc: BaseException) -> str:
    """The name of the plugin whose hook implementation raised ``exc`` (from the traceback)."""
    codes = {}
    with contextlib.suppress(Exception):
        for impl in caller.get_hookimpls():
            codes[getattr(impl.function, "__code__", None)] = impl.plugin_name
    tb = exc.__traceback__
    found = "unknown"
    while tb is not None:
        if tb.tb_frame.f_code in codes:
            found = codes[tb.tb_frame.f_code]
        tb = tb.tb_next
    return found


def _write_grid(images: list[Any], path: Path, infotexts: list[str] | None = None) -> None:
    from PIL import Image

    from ..io import atomic_path
    from .sample_info import grid_pnginfo

    cols = min(4, len(images))
    rows = -(-len(images) // cols)
    w = max(i.width for i in images)
    h = max(i.height for i in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * w, (k // cols) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=grid_pnginfo(infotexts or []))


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _flat_config(options: TrainOptions) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(options).items()}


def train(
    method: TrainingMethod,
    options: TrainOptions | None = None,
    *,
    bundle: ModelBundle | None = None,
    plugin_manager: Any = None,
) -> TrainResult:
    """Train ``method`` with ``options`` (default: ``method.options``) and return where the result is.

    ``bundle`` skips model loading (the method still prepares it). ``plugin_manager`` (a pluggy
    manager with sdcore's hookspecs) receives the lifecycle hooks. Raises :class:`ConfigError`
    before loading anything when the configuration is contradictory; Ctrl-C saves a resumable
    state and re-raises; a NaN/inf loss stops with :class:`TrainingDivergedError`.
    """
    return TrainSession(method, options, bundle=bundle, plugin_manager=plugin_manager).run()
