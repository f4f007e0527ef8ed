"""``sdcore train apt``: DreamArtist (contrastive positive/negative prompt tuning).

Two ordinary TI embeddings train together: ``name`` (the positive) and ``name-neg``. For each
sample the UNet predicts noise once with the positive prompt and once with the same prompt where
the name is replaced by ``name-neg``; the loss compares the CFG combination
``eps_neg + scale * (eps_pos - eps_neg)`` with the target. Options mirror the DreamArtist
extension (defaults from its UI): an L1 reconstruction loss on the VAE-decoded predicted x0,
attention-mask weighting, EMA of the vectors, and an optional "good image" classifier whose score
replaces the loss (as in DreamArtist). The results are two A1111 ``.pt`` files.

Unlike DreamArtist, v-prediction models are supported (the combination is linear, so it applies
to a v prediction the same way) and the cfg curve is never ``eval``-ed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sdcore.errors import ConfigError
from sdcore.options import option
from sdcore.train.method import Capabilities, SaveInfo, StepContext
from sdcore.train.options import TrainOptions
from sdplugin_ti.method import TIMethod, TIOptions, TrainedEmbedding
from sdplugin_ti.templates import load_template, pick_line, render

from .guidance import GuidanceSchedule, parse_guidance
from .masks import mask_path_for

if TYPE_CHECKING:
    import torch
    from sdcore.models.bundle import ModelBundle

NEG_SUFFIX = "-neg"


@dataclass
class APTOptions(TIOptions):
    """DreamArtist options on top of TI's (defaults from the DreamArtist extension's UI)."""

    lr: float = option(
        3e-3,
        "Learning rate of the positive embedding (DreamArtist default 0.003).",
        group="training",
        minimum=0,
        above_minimum=True,
    )
    vectors: int = option(3, "Vectors of the positive embedding.", group="ti", minimum=1)
    template: str = option(
        "subject",
        "Prompt template (DreamArtist default subject; training without filewords is advised).",
        group="ti",
        resume_sensitive=True,
    )
    neg_vectors: int = option(6, "Vectors of the negative embedding <name>-neg.", group="apt", minimum=1)
    neg_init_text: str = option("*", "Init text of the negative embedding.", group="apt")
    neg_lr_weight: float = option(
        1.0, "The negative embedding's lr is lr * this.", group="apt", minimum=0, above_minimum=True
    )
    cfg_scale: str = option(
        "3.0",
        "Training CFG scale: '3', 'low-high' or 'low-high:ln|cos|cos2' over timesteps.",
        group="apt",
        resume_sensitive=True,
    )
    positive_filewords_only: bool = option(
        False,
        "The negative prompt uses the template without [filewords] (same line of the '_filewords'-less file).",
        group="apt",
    )
    reconstruction: bool = option(
        False, "Add an L1 loss between the VAE-decoded predicted x0 and the image (heavy).", group="apt"
    )
    rec_loss_weight: float = option(1.0, "Weight of the reconstruction loss.", group="apt", minimum=0)
    ema_pos: float = option(
        1.0,
        "EMA decay of the positive vectors (1 = off; DreamArtist suggests 0.97). Not the runtime's --ema, which "
        "averages for saves and samples only; this one replaces the live vectors.",
        group="apt",
        minimum=0,
        maximum=1,
    )
    ema_neg: float = option(1.0, "EMA decay of the negative vectors (1 = off).", group="apt", minimum=0, maximum=1)
    ema_replace_every: int = option(25, "Replace the live vectors by their EMA every N steps.", group="apt", minimum=1)
    discriminator: str = option(
        "",
        "ConvNeXt 'good image' classifier weights (.safetensors or .pt); when set its score REPLACES the "
        "diffusion loss, as in DreamArtist.",
        group="apt",
        path=True,
    )
    discriminator_size: int = option(384, "Input size of the classifier (pixels).", group="apt", minimum=1)
    attention_masks: bool = option(
        True, "Weight the loss with <image>_att.png maps found beside the images (DreamArtist).", group="apt"
    )


class APTMethod(TIMethod[APTOptions]):
    """DreamArtist: a positive and a negative embedding trained through a CFG-combined loss."""

    name: ClassVar[str] = "apt"
    start_from_result: ClassVar[str | None] = None  # --init-weights would restore the positive vectors only
    options_class: ClassVar[type[TrainOptions]] = APTOptions
    output_suffix: ClassVar[str] = ".pt"
    resume_shape_options: ClassVar[tuple[str, ...]] = ("vectors", "neg_vectors")

    def __init__(self, options: APTOptions) -> None:
        super().__init__(options)
        self.guidance: GuidanceSchedule | None = None
        self._negatives: dict[str, str] = {}
        self._ema: dict[str, torch.Tensor] = {}
        self._discriminator: Any = None

    def capabilities(self) -> Capabilities:
        # pixels only when the reconstruction loss needs them
        return replace(super().capabilities(), needs_pixels=bool(self.options.reconstruction))

    @property
    def neg_name(self) -> str:
        return self.options.name + NEG_SUFFIX

    def trained_embeddings(self) -> list[TrainedEmbedding]:
        o = self.options
        return [
            TrainedEmbedding(o.name, o.init_text, o.vectors),
            TrainedEmbedding(self.neg_name, o.neg_init_text, o.neg_vectors),
        ]

    def final_files(self) -> list[Path]:
        """The positive ``.pt`` and its ``-neg.pt`` beside it (:meth:`save`)."""
        (positive,) = super().final_files()
        return [positive, positive.parent / f"{positive.stem}{NEG_SUFFIX}.pt"]

    # --- setup -------------------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        o = self.options
        self.guidance = parse_guidance(o.cfg_scale)
        if o.neg_lr_weight <= 0:
            raise ConfigError("--neg-lr-weight must be positive")
        for flag, value in (("--ema-pos", o.ema_pos), ("--ema-neg", o.ema_neg)):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{flag} must be in (0, 1], got {value}")
        if o.ema_replace_every < 1:
            raise ConfigError("--ema-replace-every must be at least 1")
        if o.rec_loss_weight < 0:
            raise ConfigError("--rec-loss-weight must be >= 0")
        if o.discriminator and not Path(o.discriminator).is_file():
            raise ConfigError(f"--discriminator {o.discriminator}: no such file")
        if o.positive_filewords_only:
            self._negative_template_lines()

    def family_problems(self, family: str) -> list[str]:
        """TI's checks, and the options that decode the predicted clean image (``--reconstruction``,
        ``--discriminator``): DreamArtist's x0 formula is the DDPM one (``alphas_cumprod``), which a
        flow-matching model (SD3, Flux) has no schedule for."""
        from sdcore.errors import SdcoreError
        from sdcore.models.family import get_family

        problems = super().family_problems(family)
        try:
            objective = get_family(family).objective
        except SdcoreError:
            return problems  # the pre-flight reports an unknown family itself
        o = self.options
        decoding = [
            flag for flag, on in (("--reconstruction", o.reconstruction), ("--discriminator", o.discriminator)) if on
        ]
        if decoding and objective != "ddpm":
            problems.append(
                f"{' and '.join(decoding)}: DreamArtist decodes the predicted x0 with a DDPM (epsilon/v) schedule; "
                f"this {family} model is {objective}"
            )
        return problems

    def prepare(self, bundle: ModelBundle) -> list[dict[str, Any]]:
        import torch

        problems = self.family_problems(bundle.family)
        if problems:
            raise ConfigError("; ".join(problems))
        super().prepare(bundle)
        assert self.handle is not None
        # DreamArtist adds N(0, 1e-3) noise to a fresh "-neg" embedding so it does not start as a copy
        generator = torch.Generator().manual_seed(int(self.options.seed))
        with torch.no_grad():
            for table in self.handle.tables[self.neg_name].values():
                table.add_(torch.randn(table.shape, generator=generator).to(table) * 1e-3)
        if self.options.discriminator:
            from .discriminator import load_discriminator

            self._discriminator = load_discriminator(self.options.discriminator).to(bundle.device).eval()
            self._discriminator.requires_grad_(False)
        self._reset_ema()
        return self.param_groups()

    def param_groups(self) -> list[dict[str, Any]]:
        """The positive and the negative vectors, the negative at ``lr * neg_lr_weight``.

        Unlike TI (A1111 sets weight decay 0), the groups leave weight decay to the optimizer:
        DreamArtist builds ``torch.optim.AdamW`` without one, so it trains with AdamW's default
        0.01, which ``--optimizer adamw`` gives here too (and ``--optimizer-args weight_decay=...``
        can change).
        """
        assert self.handle is not None
        o = self.options
        positive = list(self.handle.tables[o.name].values())
        negative = list(self.handle.tables[self.neg_name].values())
        return [
            {"params": positive, "name": "positive"},
            {"params": negative, "name": "negative", "lr": o.lr * o.neg_lr_weight},
        ]

    # --- prompts -------------------------------------------------------------------------------------
    def _negative_template_lines(self) -> tuple[str, ...]:
        template = self.options.template
        base = template[:-4] if template.endswith(".txt") else template
        plain = base.replace("_filewords", "")
        if plain == base:
            raise ConfigError(f"--positive-filewords-only needs a '*_filewords' template, not {template!r}")
        suffix = ".txt" if template.endswith(".txt") else ""
        return load_template(plain + suffix)

    def is_auxiliary_file(self, path: Path) -> bool:
        """``*_att.png`` attention maps live beside the images but are never trained on."""
        from .masks import is_mask_file

        return is_mask_file(path)

    def dataset_notes(self, index: Any) -> list[str]:
        """With ``--tread-route`` and attention maps: which tokens the routing never drops (the runtime force-keeps
        the tokens a method's loss map weighs more than a tenth above a sample without one, :func:`sdcore.train.batches`'
        ``routing_keep_masks``)."""
        notes = super().dataset_notes(index)
        o = self.options
        if o.tread_route and o.attention_masks and any(mask_path_for(e.path) for e in index.instance_entries):
            notes.append(
                "--tread-route with attention maps (<image>_att.png): the image tokens a map weighs above normal "
                "(brighter than grey 130 of 255 on average over the token) are never dropped; mid-grey and darker ones route "
                "as an image without a map"
            )
        return notes

    def loss_mask(self, entry: Any, assignment: Any, *, flipped: bool, latent_size: tuple[int, int]) -> Any:
        """DreamArtist's loss weights (0..5) from ``<image>_att.*``, cropped and flipped like the image.
        Per pixel, so ``--tread-route`` never drops the tokens it weighs clearly above 1 (a sample without a map,
        :data:`sdcore.train.token_routing.METHOD_MAP_KEEP_ABOVE`)."""
        if not self.options.attention_masks:
            return None
        import dataclasses

        import torch
        from sdcore.train.data import load_pixels

        from .masks import intensity

        path = mask_path_for(entry.path)
        if path is None:
            return None
        array, _, _ = load_pixels(dataclasses.replace(entry, path=path), assignment, flip=flipped)
        grey = (torch.from_numpy(array).float().mean(0) + 1.0) * 127.5  # [-1, 1] RGB -> 0..255 grey
        weights = intensity(grey)[None, None]
        return torch.nn.functional.adaptive_avg_pool2d(weights, latent_size)[0]

    def caption_for(self, caption: str, *, is_class: bool, rng: Any) -> str:
        if is_class:
            return caption
        o = self.options
        lines = load_template(o.template)
        line = pick_line(lines, rng)
        positive = render(line, o.name, caption)
        if o.positive_filewords_only:
            negative_lines = self._negative_template_lines()
            negative = render(negative_lines[lines.index(line) % len(negative_lines)], self.neg_name, "")
        else:
            negative = render(line, self.neg_name, caption)
        if len(self._negatives) > 4096:
            self._negatives.clear()
        self._negatives[positive] = negative
        return positive

    def negative_caption(self, positive: str) -> str:
        """The negative prompt for a training prompt: the same line with ``name`` -> ``name-neg``."""
        known = self._negatives.get(positive)
        if known is not None:
            return known
        from sdplugin_ti.apply import expand_prompt

        return expand_prompt(positive, {self.options.name: [self.neg_name]})

    # --- loss --------------------------------------------------------------------------------------------
    def compute_loss(self, ctx: StepContext) -> torch.Tensor:
        import torch.nn.functional as F

        if self.guidance is None:
            self.guidance = parse_guidance(self.options.cfg_scale)
        bundle = ctx.bundle
        eps_pos = ctx.predict(ctx.conditioning).float()
        if self.guidance.disabled:
            combined = eps_pos
        else:
            negative = self.encode(bundle, [self.negative_caption(c) for c in ctx.batch.captions])
            eps_neg = ctx.predict(negative).float()
            steps = int(bundle.noise_scheduler.config.num_train_timesteps)
            scale = self.guidance.scale(ctx.timesteps, steps).to(eps_pos.device).view(-1, *([1] * (eps_pos.ndim - 1)))
            combined = eps_neg + scale * (eps_pos - eps_neg)
        if self._discriminator is not None:
            image = self.decode_predicted(ctx, combined)
            return 1.0 - self._discriminator.score(image, size=self.options.discriminator_size)
        loss = F.mse_loss(combined, ctx.target.float(), reduction="none")
        if ctx.batch.masks is not None:
            loss = loss * ctx.batch.masks.to(loss)
        loss = loss.mean(dim=tuple(range(1, loss.ndim)))
        if self.options.reconstruction:
            pixels = ctx.batch.pixels
            if pixels is None:
                raise ConfigError(
                    "the reconstruction loss needs pixels: the runtime gave none (use --no-cache-latents)"
                )
            image = self.decode_predicted(ctx, combined)
            pixels = pixels.to(image)
            if pixels.shape[-2:] != image.shape[-2:]:
                pixels = F.interpolate(pixels, size=image.shape[-2:], mode="bilinear", align_corners=False)
            rec = (image - pixels).abs().mean(dim=(1, 2, 3))
            loss = loss + self.options.rec_loss_weight * rec
        return loss

    def decode_predicted(self, ctx: StepContext, prediction: torch.Tensor) -> torch.Tensor:
        """Predicted clean image in [-1, 1], decoded with gradients (for reconstruction/classifier)."""
        bundle = ctx.bundle
        alphas = bundle.noise_scheduler.alphas_cumprod.to(ctx.noisy_latents.device)[ctx.timesteps].float()
        alphas = alphas.view(-1, *([1] * (prediction.ndim - 1)))
        noisy = ctx.noisy_latents.float()
        if bundle.is_v_prediction:
            x0 = alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
        else:
            x0 = (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()
        vae = bundle.vae
        dtype = next(vae.parameters()).dtype
        return vae.decode((x0 / bundle.vae_scaling_factor).to(dtype)).sample.float()

    # --- EMA -----------------------------------------------------------------------------------------------
    def _ema_decay(self, name: str) -> float:
        o = self.options
        return o.ema_neg if name == self.neg_name else o.ema_pos

    def _reset_ema(self) -> None:
        assert self.handle is not None
        self._ema = {
            f"{name}/{key}": t.detach().clone()
            for name, per in self.handle.tables.items()
            for key, t in per.items()
            if self._ema_decay(name) < 1.0
        }

    def on_step_end(self, bundle: ModelBundle, step: int) -> None:
        import torch

        super().on_step_end(bundle, step)
        if not self._ema or self.handle is None:
            return
        with torch.no_grad():
            for name, per in self.handle.tables.items():
                decay = self._ema_decay(name)
                for key, table in per.items():
                    ema_key = f"{name}/{key}"
                    if ema_key not in self._ema:
                        continue
                    self._ema[ema_key].mul_(decay).add_(table.detach(), alpha=1 - decay)
                    if step % self.options.ema_replace_every == 0:
                        table.copy_(self._ema[ema_key])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().trainable_state_dict()
        state.update({f"ema/{k}": v.detach().float().cpu().clone() for k, v in self._ema.items()})
        return state

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_trainable_state_dict({k: v for k, v in state.items() if not k.startswith("ema/")})
        for key, value in state.items():
            if key.startswith("ema/") and key[4:] in self._ema:
                self._ema[key[4:]].copy_(value.to(self._ema[key[4:]]))

    # --- files -----------------------------------------------------------------------------------------------
    def result_files(self, path: str | Path) -> list[Path]:
        path = Path(path)
        return [path, path.with_name(f"{path.stem}{NEG_SUFFIX}{path.suffix}")]

    def saved_files(self, path: Path) -> list[Path]:
        """The positive file and its ``-neg`` pair, each with its ``--format`` copy."""
        each = super().saved_files  # bound here: a bare super() inside the comprehension has no class cell
        return [f for p in self.result_files(path) for f in each(p)]

    def save(self, bundle: ModelBundle, info: SaveInfo) -> Path:
        folder = self.output_dir(info)
        o = self.options
        positive = self.current_embedding(o.name, info.step)
        negative = self.current_embedding(self.neg_name, info.step)
        for emb in (positive, negative):
            emb.metadata.update({k: str(v) for k, v in info.metadata.items()})
            emb.metadata["apt.cfg_scale"] = o.cfg_scale
        if info.final:
            output = Path(self.options.output) if self.options.output else None
            if output is not None and output.suffix.lower() == ".pt":
                folder, stem = output.parent, output.stem
            else:
                stem = o.name
            self.write(negative, folder, f"{stem}{NEG_SUFFIX}")
            return self.write(positive, folder, stem)
        # DreamArtist's intermediate pair: X-STEP.pt and X-STEP-neg.pt storing those names
        folder = folder / "embeddings"
        positive.name = f"{o.name}-{info.step}"
        negative.name = f"{positive.name}{NEG_SUFFIX}"
        self.write(negative, folder, negative.name)
        return self.write(positive, folder, positive.name)

    def sampling(self, bundle: ModelBundle) -> Any:
        """Samples use ``name-neg`` as the negative prompt, as DreamArtist's previews do."""
        import contextlib

        parent = super().sampling(bundle)

        @contextlib.contextmanager
        def with_negative() -> Any:
            with parent as extra:
                if extra:
                    extra = {**extra, "negative_prompt": self.neg_name}
                    if self.guidance is not None:
                        extra["cfg"] = self.guidance.high
                yield extra

        return with_negative()


__all__ = ["APTMethod", "APTOptions"]
