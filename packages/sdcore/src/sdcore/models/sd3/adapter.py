"""The SD3/SD3.5 family's behaviour: detect and read its files, build the tiny model, encode prompts, predict.

Prompt encoding is diffusers' ``StableDiffusion3Pipeline.encode_prompt``, step for step: CLIP-L and
CLIP-G run on 77 tokens and give their penultimate hidden states (``clip_skip`` goes further back),
concatenated along channels and zero-padded to T5's width; T5 runs on ``t5_max_length`` tokens
(256 by default; no attention mask, as diffusers runs it); the sequence is CLIP's 77 tokens then T5's.
The pooled vector is CLIP-L's projected pooled output (identity projection in SD3) then CLIP-G's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from . import T5_MAX_LENGTH

if TYPE_CHECKING:
    import torch

    from ...train.method import Conditioning
    from ..bundle import ModelBundle

CLIP_MAX_LENGTH = 77


def _device(module: Any) -> Any:
    return next(module.parameters()).device


def clip_embeds(
    tokenizer: Any, encoder: Any, prompts: list[str], *, clip_skip: int | None = None, attention_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [B, 77, C], projected pooled [B, P]); ``clip_skip`` counted as diffusers' SD3 pipeline
    does: ``None`` is the penultimate layer, ``n`` the layer ``-(n + 2)``. ``attention_mask``: the encoder
    gets the tokenizer's padding mask (kohya's ``--apply_lg_attn_mask``): the padding positions then attend
    to the caption's tokens only; the outputs are not zeroed (kohya's neither)."""
    tokens = tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")
    device = _device(encoder)
    mask = tokens.attention_mask.to(device) if attention_mask else None
    out = encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    if -layer > len(out.hidden_states):
        from ...errors import ConfigError

        raise ConfigError(f"--clip-skip too large: the text encoder has only {len(out.hidden_states) - 1} layers")
    from ..token_embeddings import replace_output_rows

    # OneTrainer's output embeddings replace the hidden states read (StableDiffusion3Model.encode_text)
    return replace_output_rows(encoder, tokens.input_ids, out.hidden_states[layer]), out[0]


def _joined(clip: tuple[torch.Tensor, torch.Tensor], cached: Conditioning) -> Conditioning:
    """SD3's conditioning: the 77 CLIP tokens (CLIP-L and CLIP-G side by side, zero-padded to T5's width), then
    T5's tokens (``cached.hidden_states``, in CLIP's dtype), and the two pooled vectors side by side."""
    import torch
    import torch.nn.functional as F

    from ...train.method import Conditioning

    clip_hidden, pooled = clip
    t5_hidden = cached.hidden_states
    if clip_hidden.shape[-1] > t5_hidden.shape[-1]:
        from ...errors import ModelFormatError

        raise ModelFormatError(
            f"SD3 text encoders do not fit: CLIP-L + CLIP-G width {clip_hidden.shape[-1]} exceeds T5's "
            f"{t5_hidden.shape[-1]}"
        )
    clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
    hidden = torch.cat([clip_hidden, t5_hidden.to(device=clip_hidden.device, dtype=clip_hidden.dtype)], dim=-2)
    return Conditioning(hidden, pooled)


class Sd3Adapter:
    """:class:`~sdcore.models.family.FamilyAdapter` of ``sd3`` (SD3 medium, SD3.5 large/medium)."""

    #: ``_class_name`` of the diffusers folders the core's writer makes of this family
    diffusers_pipeline = "StableDiffusion3Pipeline"
    #: no guidance input; ``--guidance-scale`` is ignored without a note, as before
    guidance_input = None

    def release(self, bundle: ModelBundle) -> str | None:
        """``model info``'s variant line: SD3 medium, SD3.5 large or SD3.5 medium, from the MMDiT's config."""
        from .detect import release_label

        return release_label(bundle.denoiser.config)

    def detect_single_file(self, keys: Collection[str]) -> bool:
        from .detect import is_sd3_file

        return is_sd3_file(keys)

    def load_single_file(self, path: str | os.PathLike[str], **options: Any) -> ModelBundle:
        from .load import read_sd3_single_file

        return read_sd3_single_file(path, **options)

    def create_tiny(self, *, seed: int = 0, variant: str = "sd3", **_: Any) -> ModelBundle:
        """The tiny SD3 model; ``variant`` ``sd3.5-large``/``sd3.5-medium`` adds QK norm / dual attention."""
        from .tiny import create_tiny_sd3

        return create_tiny_sd3(seed=seed, variant=variant)

    def read_layout(self, path: str | os.PathLike[str], **parts: Any) -> Any:
        """The :class:`~sdcore.models.layout.ModelLayout` of an SD3 single file from its header; what the file
        lacks comes from the ``parts`` given separately (``clip_l=``, ``vae=``... files or folders, their
        headers and configs); without them there is no complete layout."""
        from ..layout import LayoutUnavailableError, ModelLayout
        from .load import ENCODER_SLOTS, part_config, sd3_file_configs

        configs, missing, per_weight = sd3_file_configs(path)
        slots = {name: index for index, (name, _kind, _prefix) in enumerate(ENCODER_SLOTS)}
        lacking = []
        for name in missing:
            config = part_config(name, parts[name]) if parts.get(name) is not None else None
            if config is None:
                lacking.append(name)
            elif name == "vae":
                configs["vae"] = config
            else:
                configs["text_encoders"][slots[name]] = config
        if lacking:
            raise LayoutUnavailableError(f"{path}: {', '.join(lacking)} not in the file (given separately)")
        return ModelLayout(str(path), "sd3", "flow-matching", configs, "single-file", per_weight)

    def part_slots(self, path: str | os.PathLike[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(separate parts an SD3 single file takes, parts its header shows it lacks); a diffusers folder has
        its parts and takes none (as :func:`~.load.read_sd3_diffusers`)."""
        from pathlib import Path

        from .load import PART_OPTIONS, sd3_file_configs

        if Path(path).is_dir():
            return (), ()
        _configs, missing, _per_weight = sd3_file_configs(path)
        return PART_OPTIONS, tuple(missing)

    def clip_widths(self, path: str | os.PathLike[str]) -> tuple[dict[str, int], int | None]:
        """(hidden width of CLIP-L and CLIP-G as the file expects them, the two together) from its header: a
        CLIP the file holds says its own; the MMDiT's pooled input (``pooled_projection_dim``) is both CLIPs'
        pooled vectors side by side (768 + 1280 = 2048; the tiny model's 32 + 64), so with one CLIP held the
        other is the rest. A separate "Module N" CLIP file is told CLIP-L or CLIP-G by it
        (:func:`~sdcore.models.parts.clip_kind`); a folder has its own CLIPs: ``({}, None)``."""
        from pathlib import Path

        from .load import ENCODER_SLOTS, sd3_file_configs

        if Path(path).is_dir():
            return {}, None
        configs, _missing, _per_weight = sd3_file_configs(path)
        clips = [name for name, kind, _prefix in ENCODER_SLOTS if kind.startswith("clip")]
        encoders = zip(ENCODER_SLOTS, configs["text_encoders"], strict=True)
        widths = {name: int(te["hidden_size"]) for (name, _k, _p), te in encoders if name in clips and te is not None}
        pooled = configs["transformer"].get("pooled_projection_dim")
        total = int(pooled) if pooled else None
        if total and len(widths) == 1:
            width, other = next(iter(widths.values())), next(c for c in clips if c not in widths)
            widths[other] = total - width
        return widths, total

    def save(
        self, bundle: ModelBundle, path: str | os.PathLike[str], *, format: str = "single-file", **options: Any
    ) -> Any:
        """``bundle.save``: ``single-file`` is SAI's layout (ComfyUI, Forge, diffusers' ``from_single_file``),
        ``diffusers`` a ``StableDiffusion3Pipeline`` folder."""
        from ...errors import SdcoreError
        from .save import write_sd3_diffusers, write_sd3_single_file

        if format == "single-file":
            return write_sd3_single_file(bundle, path, **options)
        if format == "diffusers":
            return write_sd3_diffusers(bundle, path, **options)
        raise SdcoreError(f"unknown model format {format!r} for SD3; use single-file or diffusers")

    def generate(self, bundle: ModelBundle, prompts: list[str], negatives: list[str], **settings: Any) -> list[Any]:
        """``sdcore generate``: ``StableDiffusion3Pipeline`` with a flow-matching sampler (see :mod:`.generate`)."""
        from .generate import generate_sd3

        return generate_sd3(bundle, prompts, negatives, **settings)

    def flow_scheduler_for(self, bundle: ModelBundle, sampler: str, *, img2img: bool = False) -> Any:
        """The scheduler ``sdcore generate`` builds for ``sampler`` (a one-line ConfigError for a sampler the
        family's pipeline cannot run); the X/Y/Z plot asks it for every cell before the first renders."""
        from .generate import flow_scheduler_for

        return flow_scheduler_for(bundle, sampler, img2img=img2img)

    def detect_diffusers(self, index: dict[str, Any]) -> bool:
        """A ``StableDiffusion3Pipeline`` (or img2img/inpaint sibling) folder."""
        return str(index.get("_class_name", "")).startswith("StableDiffusion3")

    def load_diffusers(self, folder: str | os.PathLike[str], **options: Any) -> ModelBundle:
        from .load import read_sd3_diffusers

        return read_sd3_diffusers(folder, **options)

    def encode_prompts(
        self,
        bundle: ModelBundle,
        prompts: list[str],
        *,
        clip_skip: int | None = None,
        t5_max_length: int | None = None,
        t5_attention_mask: bool = False,
        lg_attention_mask: bool = False,
        **_: Any,
    ) -> Conditioning:
        """``clip_skip`` as sdcore counts it everywhere (A1111's: 1 = the family's own layer, here the
        penultimate, as SD3 was trained; 2 = one layer further back); ``t5_max_length``: T5 tokens
        (default 256, diffusers' ``max_sequence_length``); ``t5_attention_mask`` masks T5's padding
        inside the T5 encoder (SD3 and diffusers do not); ``lg_attention_mask`` masks CLIP-L's and
        CLIP-G's padding inside those encoders (kohya's ``--apply_lg_attn_mask``; diffusers does not)."""
        prompts = list(prompts)
        clip = self._clip_part(bundle, prompts, clip_skip=clip_skip, lg_attention_mask=lg_attention_mask)
        cached = self.encode_cached_part(
            bundle, prompts, t5_max_length=t5_max_length, t5_attention_mask=t5_attention_mask
        )
        return _joined(clip, cached)

    def encode_cached_part(
        self,
        bundle: ModelBundle,
        prompts: list[str],
        *,
        t5_max_length: int | None = None,
        t5_attention_mask: bool = False,
        **_: Any,
    ) -> Conditioning:
        """T5's part of :meth:`encode_prompts` alone (the family's ``partial_text_cache``): its sequence as
        ``hidden_states``, in T5's output dtype, no pooled vector; what a run training CLIP-L/G caches (and, for
        its sample renders, :class:`~sdcore.generate.conditioning_memo.PartMemo` keeps)."""
        from ...generate.conditioning_memo import active_part_memo

        memo = active_part_memo()
        if memo is not None:
            key = ("sd3", tuple(prompts), t5_max_length, t5_attention_mask)
            return memo.encode(key, lambda: self._t5_part(bundle, prompts, t5_max_length, t5_attention_mask))
        return self._t5_part(bundle, prompts, t5_max_length, t5_attention_mask)

    def _t5_part(
        self, bundle: ModelBundle, prompts: list[str], t5_max_length: int | None, t5_attention_mask: bool
    ) -> Conditioning:
        from ...train.method import Conditioning
        from ..t5 import encode_t5

        t5, tok_t5 = bundle.text_encoders[2], bundle.tokenizers[2]
        t5_hidden, _mask = encode_t5(
            t5, tok_t5, list(prompts), max_length=t5_max_length or T5_MAX_LENGTH, attention_mask=t5_attention_mask
        )
        return Conditioning(t5_hidden)

    def complete_encoding(
        self,
        bundle: ModelBundle,
        prompts: list[str],
        cached: Conditioning,
        *,
        clip_skip: int | None = None,
        lg_attention_mask: bool = False,
        **_: Any,
    ) -> Conditioning:
        """:meth:`encode_prompts`' result from T5's ``cached`` part (:meth:`encode_cached_part` of the same
        prompts) and CLIP-L's and CLIP-G's outputs, computed now (they train while T5's outputs are cached)."""
        clip = self._clip_part(bundle, list(prompts), clip_skip=clip_skip, lg_attention_mask=lg_attention_mask)
        return _joined(clip, cached)

    def _clip_part(
        self, bundle: ModelBundle, prompts: list[str], *, clip_skip: int | None, lg_attention_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(CLIP-L and CLIP-G hidden states side by side [B, 77, L + G], their pooled vectors side by side)."""
        import torch

        clip_l, clip_g = bundle.text_encoders[0], bundle.text_encoders[1]
        tok_l, tok_g = bundle.tokenizers[0], bundle.tokenizers[1]
        skip = None if clip_skip is None or clip_skip <= 1 else clip_skip - 1  # diffusers' count
        hidden_l, pooled_l = clip_embeds(tok_l, clip_l, prompts, clip_skip=skip, attention_mask=lg_attention_mask)
        hidden_g, pooled_g = clip_embeds(tok_g, clip_g, prompts, clip_skip=skip, attention_mask=lg_attention_mask)
        clip_hidden = torch.cat([hidden_l, hidden_g.to(hidden_l.device)], dim=-1)
        return clip_hidden, torch.cat([pooled_l, pooled_g.to(pooled_l.device)], dim=-1)

    def sample_draws(
        self, bundle: ModelBundle, options: Any, batch: Any, count: int
    ) -> list[Callable[[int, Any], None]]:
        """What the step draws per sample for kohya's SD3 options, after the sample's noise and timestep
        (``NoiseSettings.after_draws``), recorded in ``batch.extra``: the dropped text encoders
        (:mod:`sdcore.train.encoder_dropout`), then the positional-embedding crop (:mod:`.pos_embed`).
        Empty when neither option is on, so nothing more is drawn."""
        from ...train.encoder_dropout import DROPPED_KEY, EncoderDropout
        from .pos_embed import CROPS_KEY, installed

        hooks: list[Callable[[int, Any], None]] = []
        dropout = EncoderDropout.from_options(options)
        if dropout is not None:
            drops, record_drops = dropout.recorder(count)
            batch.extra[DROPPED_KEY] = drops
            hooks.append(record_drops)
        rate = options.pos_emb_random_crop_rate
        pos_embed = installed(getattr(bundle, "transformer", None)) if rate > 0 else None
        if pos_embed is not None:
            patch = pos_embed.patch_size
            h, w = (int(side) // patch for side in batch.latents.shape[-2:])
            crops: list[tuple[int, int] | None] = [None] * count
            batch.extra[CROPS_KEY] = crops

            def record_crop(index: int, gen: Any) -> None:
                crops[index] = pos_embed.draw_crop(h, w, rate, gen)

            hooks.append(record_crop)
        return hooks

    def drop_text_encoders(
        self, bundle: ModelBundle, conditioning: Conditioning, dropped: list[frozenset[str]]
    ) -> Conditioning:
        """kohya's per-encoder caption dropout: sample ``i``'s parts made by the encoders in ``dropped[i]``
        (``clip_l``, ``clip_g``, ``t5``) become zeros: CLIP-L's channels of the 77 CLIP tokens and its
        part of the pooled vector, CLIP-G's likewise, T5's tokens. Out of place (a cached conditioning
        is shared between steps); a zeroed part passes no gradient, as kohya's skipped encoder."""
        import torch

        from ...train.method import Conditioning

        clip_l, clip_g, _t5 = bundle.text_encoders
        width_l, width_g = int(clip_l.config.hidden_size), int(clip_g.config.hidden_size)
        pooled_l = int(getattr(clip_l.config, "projection_dim", width_l))
        hidden, pooled = conditioning.hidden_states, conditioning.pooled
        keep_hidden = torch.ones(hidden.shape, dtype=torch.bool, device=hidden.device)
        keep_pooled = None if pooled is None else torch.ones(pooled.shape, dtype=torch.bool, device=pooled.device)
        for i, names in enumerate(dropped):
            if "clip_l" in names:
                keep_hidden[i, :CLIP_MAX_LENGTH, :width_l] = False
                if keep_pooled is not None:
                    keep_pooled[i, :pooled_l] = False
            if "clip_g" in names:
                keep_hidden[i, :CLIP_MAX_LENGTH, width_l : width_l + width_g] = False
                if keep_pooled is not None:
                    keep_pooled[i, pooled_l:] = False
            if "t5" in names:
                keep_hidden[i, CLIP_MAX_LENGTH:] = False
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        new_pooled = None
        if pooled is not None and keep_pooled is not None:
            new_pooled = torch.where(keep_pooled, pooled, torch.zeros((), dtype=pooled.dtype, device=pooled.device))
        return Conditioning(torch.where(keep_hidden, hidden, zero), new_pooled, dict(conditioning.extra))

    def predict(
        self,
        bundle: ModelBundle,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        **options: Any,
    ) -> torch.Tensor:
        """The MMDiT's velocity prediction; ``timesteps`` are sigma * 1000 as diffusers' pipelines pass them.
        A training ``batch=`` may carry per-sample positional-embedding crops (kohya's
        ``--pos_emb_random_crop_rate``, :mod:`.pos_embed`)."""
        from .pos_embed import CROPS_KEY, crops_applied

        transformer = bundle.transformer
        batch = noisy_latents.shape[0]
        timestep = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps
        training_batch = options.get("batch")
        crops = training_batch.extra.get(CROPS_KEY) if training_batch is not None else None
        with crops_applied(transformer, crops):
            return transformer(
                hidden_states=noisy_latents,
                timestep=timestep,
                encoder_hidden_states=conditioning.hidden_states,
                pooled_projections=conditioning.pooled,
                return_dict=False,
            )[0]
