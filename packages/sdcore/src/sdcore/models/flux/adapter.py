"""The Flux.1 family adapter: prompt encoding, 2x2 latent packing and the transformer call.

Everything here reproduces what diffusers' ``FluxPipeline`` does for one denoising step, so a model
trained through sdcore and sampled by diffusers (or ComfyUI) sees the same inputs:

- prompts: CLIP-L's *pooled* output (77 tokens) -> ``pooled_projections``; T5's last hidden state
  (padded to ``max_length`` tokens, no attention mask unless asked) -> ``encoder_hidden_states``;
  text position ids are zeros;
- latents [B, 16, H, W] are cut into 2x2 patches -> [B, H/2 * W/2, 64]; each patch's position id is
  (0, row, column);
- the transformer gets ``timestep / 1000`` (sdcore's timesteps are sigma * 1000 as the pipelines'),
  and, with ``t5_attention_mask=True`` at encoding, a joint-attention mask hiding T5's padding tokens,
  and, for dev models, the guidance value (kohya's ``--guidance_scale``; 1.0 by default for
  training as kohya's examples use), unless training bypasses the guidance embedding
  (:func:`guidance_bypassed`, ai-toolkit's ``bypass_guidance_embedding`` for Flex.1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, ModelFormatError

if TYPE_CHECKING:
    import torch

    from ...train.method import Conditioning
    from ..bundle import ModelBundle

#: guidance passed to a dev model's guidance embedding when none is given
DEFAULT_GUIDANCE = 1.0
#: ``Conditioning.extra`` key of the T5 attention mask (present when prompts were encoded with
#: ``t5_attention_mask=True``, kohya's ``--apply_t5_attn_mask``): predict then masks T5 padding as keys
T5_MASK = "t5_attention_mask"


def joint_attention_mask(text_mask: torch.Tensor, image_tokens: int, device: Any) -> dict[str, Any]:
    """The transformer's ``joint_attention_kwargs`` hiding T5's padding (``text_mask`` [B, L], 1 = a real token)
    as keys in every joint attention, every one of the ``image_tokens`` visible: kohya's ``txt_attention_mask``
    with ``--apply_t5_attn_mask``, in training and in its sample images alike."""
    import torch

    text = text_mask.to(device=device, dtype=torch.bool)
    image = torch.ones(text.shape[0], image_tokens, device=device, dtype=torch.bool)
    return {"attention_mask": torch.cat([text, image], dim=1)[:, None, None, :]}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: 2x2 patches in row-major order, channels (c, dy, dx)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ConfigError(f"Flux needs even latent sides (image sides divisible by 16), got {h}x{w} latents")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, dim = packed.shape
    x = packed.reshape(b, height // 2, width // 2, dim // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, dim // 4, height, width)


def image_ids(height: int, width: int, *, device: Any = None, dtype: Any = None) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of the packed patches: (0, row, column)."""
    import torch

    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def text_ids(length: int, *, device: Any = None, dtype: Any = None) -> torch.Tensor:
    import torch

    return torch.zeros(length, 3, device=device, dtype=dtype)


def bypassed_embedding(embedder: Any, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The time/text embedding of a guidance-embedding Flux without its guidance term: the timestep's
    sinusoidal projection through ``timestep_embedder``, plus ``text_embedder`` of the pooled CLIP-L output
    (diffusers' ``CombinedTimestepGuidanceTextProjEmbeddings`` with ``guidance_embedder``'s summand left out)."""
    projected = embedder.time_proj(timestep)
    return embedder.timestep_embedder(projected.to(dtype=pooled.dtype)) + embedder.text_embedder(pooled)


@contextlib.contextmanager
def guidance_bypassed(transformer: Any) -> Iterator[None]:
    """Inside the block the transformer's ``time_text_embed`` (called without a guidance value) computes
    :func:`bypassed_embedding`, so the guidance embedder takes no part and gets no gradient. Why: Ostris'
    Flex.1 examples require it ("you must bypass the guidance embedder during training"; ai-toolkit's
    ``bypass_guidance_embedding``); sampling, outside the block, keeps the guidance."""
    embedder = transformer.time_text_embed
    if not hasattr(embedder, "guidance_embedder"):
        raise ConfigError(
            "--bypass-guidance-embedding: this FLUX.1 has no guidance embedding (schnell); the option is for "
            "guidance-distilled models (dev, Flex.1)"
        )

    def forward(timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return bypassed_embedding(embedder, timestep, pooled)

    embedder.forward = forward  # the instance attribute shadows the class's forward for this call only
    try:
        yield
    finally:
        del embedder.forward


def _require(bundle: ModelBundle, what: str) -> None:
    from .load import PART_OPTIONS

    present = {"text_encoder": len(bundle.text_encoders) > 0, "text_encoder_2": len(bundle.text_encoders) > 1,
               "vae": bundle.vae is not None}  # fmt: skip
    if not present[what]:
        option = PART_OPTIONS[what]
        raise ModelFormatError(
            f"{bundle.source}: this Flux model has no {what}; give it with {option}=<file or folder> "
            f"(--{option.replace('_', '-')} on the command line)"
        )


def require_complete(bundle: ModelBundle) -> None:
    """Every part generation needs (CLIP-L, T5, VAE), or the error naming the option that supplies it."""
    for part in ("text_encoder", "text_encoder_2", "vae"):
        _require(bundle, part)


def _joined(cached: Conditioning, pooled: torch.Tensor) -> Conditioning:
    """The Flux conditioning of T5's part (``hidden_states``, the mask in ``extra``) and CLIP-L's pooled vector."""
    from ...train.method import Conditioning

    return Conditioning(hidden_states=cached.hidden_states, pooled=pooled, extra=dict(cached.extra))


class FluxAdapter:
    """:class:`~sdcore.models.family.FamilyAdapter` of the ``flux`` family (dev and schnell)."""

    #: ``_class_name`` of the diffusers folders the core's writer makes of this family
    diffusers_pipeline = "FluxPipeline"
    #: ``sdcore generate``'s sampler when none is given (and what the PNG's parameters record)
    default_sampler = "euler"
    #: ``sdcore generate`` warns that ``--clip-skip`` changes nothing here: its CLIP-L gives only the pooled vector, which takes the last layer whatever the skip (Forge's too)
    clip_skip_ignored = True
    #: ``cfg`` is the guidance dev embeds, not CFG: the PNG's parameters write it as Forge's "Distilled CFG
    #: Scale" and ``--true-cfg-scale`` as "CFG scale"
    distilled_guidance = True
    #: that guidance when none is given: 3.5, FLUX.1 dev's reference value (Forge's, ComfyUI's FluxGuidance
    #: and kohya's sample default)
    default_cfg = 3.5
    #: training passes ``--guidance-scale`` to dev's guidance embedding (a schnell file has none: no note either)
    guidance_input = True

    def __repr__(self) -> str:
        return "FluxAdapter()"

    def release(self, bundle: ModelBundle) -> str | None:
        """``model info``'s variant line: dev (guidance embedding), schnell, Kontext, or a FLUX.1 Tools
        release sdcore cannot run (see :mod:`sdcore.models.flux.variants`)."""
        from .variants import bundle_variant, describe

        return describe(bundle_variant(bundle)) if bundle.transformer is not None else None

    def require_complete(self, bundle: ModelBundle) -> None:
        """Before generation reads the VAE: a release sdcore generates with, and every part (or the error
        naming the option that supplies it)."""
        from .variants import require_supported

        # Fill without a mask and Depth/Canny without a control image: generate_images says so once it knows
        require_supported(bundle, "generate with", given=("mask", "control image"))
        require_complete(bundle)

    # --- model I/O ---------------------------------------------------------------------------
    def detect_single_file(self, keys: Collection[str]) -> bool:
        from .load import is_flux_file

        return is_flux_file(keys)

    def load_single_file(self, path: Any, **options: Any) -> ModelBundle:
        from .load import read_flux_single_file

        return read_flux_single_file(path, **options)

    def read_layout(self, path: Any, **parts: Any) -> Any:
        """Configs of a Flux single file from its header, and of the parts given separately (the pre-flight's
        memory plan)."""
        from .load import read_flux_layout

        return read_flux_layout(path, **parts)

    def part_slots(self, path: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(separate parts a Flux model takes, parts its file or folder lacks), from headers only."""
        from .load import flux_part_slots

        return flux_part_slots(path)

    def save(self, bundle: ModelBundle, path: Any, *, format: str | None = None, dtype: Any = None,
             prune: bool = True, metadata: dict[str, str] | None = None) -> Any:  # fmt: skip
        """``single-file``: a ComfyUI checkpoint (everything the bundle has); ``bfl``: the transformer
        alone in BFL keys; ``diffusers``: a folder ``FluxPipeline.from_pretrained`` reads."""
        from ...errors import SdcoreError
        from ..save import write_diffusers
        from .save import write_flux_single_file

        if format in ("single-file", "bfl"):
            layout = "bfl" if format == "bfl" else "comfy"
            return write_flux_single_file(bundle, path, dtype=dtype, metadata=metadata, layout=layout)
        if format == "diffusers":
            return write_diffusers(bundle, path, dtype=dtype, prune=prune, metadata=metadata)
        raise SdcoreError(f"unknown model format {format!r} for Flux; use single-file, bfl or diffusers")

    def generate(self, bundle: ModelBundle, prompts: list[str], negatives: list[str], *, sampler: str = "euler",
                 image: Any = None, reference: Any = None, **settings: Any) -> list[Any]:  # fmt: skip
        """``sdcore generate``: diffusers' ``FluxPipeline`` (``FluxImg2ImgPipeline`` with an init image, with a
        mask too, ``FluxFillPipeline`` for FLUX.1 Fill's mask, a ``FluxPipeline`` on FLUX.1 Fill's given image
        conditioning (its training samples), ``FluxKontextPipeline`` with a ``reference`` image,
        ``FluxControlPipeline`` with a ``control`` image) over the bundle's modules; see
        :mod:`sdcore.models.flux.generate`."""
        from .generate import build_flux_pipeline, run_flux
        from .variants import bundle_variant

        # FLUX.1 Fill's FluxFillPipeline; a mask on the others inpaints on FluxImg2ImgPipeline
        fill = settings.get("inpaint") is not None and bundle_variant(bundle) == "fill"
        control = settings.get("control") is not None  # FLUX.1 Depth/Canny's FluxControlPipeline
        conditioned = settings.get("conditioning_image") is not None  # Fill's txt2img on its own conditioning
        pipe = build_flux_pipeline(bundle, img2img=image is not None, sampler=sampler, kontext=reference is not None,
                                   fill=fill, control=control, conditioned=conditioned)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        return run_flux(pipe, bundle, prompts, negatives, image=image, sampler=sampler, reference=reference,
                        **settings)  # fmt: skip

    def flow_scheduler_for(self, bundle: ModelBundle, sampler: str, *, img2img: bool = False) -> Any:
        """The scheduler ``sdcore generate`` builds for ``sampler`` (a one-line ConfigError for a sampler the
        family's pipeline cannot run); the X/Y/Z plot asks it for every cell before the first renders."""
        from .generate import flow_scheduler_for

        return flow_scheduler_for(bundle, sampler, img2img=img2img)

    def detect_diffusers(self, index: dict[str, Any]) -> bool:
        """A diffusers folder's ``model_index.json`` of a Flux pipeline."""
        from .load import is_flux_index

        return is_flux_index(index)

    def load_diffusers(self, folder: Any, **options: Any) -> ModelBundle:
        from .load import read_flux_diffusers

        return read_flux_diffusers(folder, **options)

    def create_tiny(self, *, variant: str = "dev", seed: int = 0, **options: Any) -> ModelBundle:
        """The tiny Flux.1 ``variant``: ``dev`` with guidance embedding, ``schnell``, ``kontext`` (dev's
        weights, its metadata naming ``FluxKontextPipeline`` as a Kontext folder's does, so ``model info`` says
        Kontext and a diffusers save writes that ``_class_name``), ``fill`` (FLUX.1 Fill [dev]'s layout: ``img_in``
        384 wide, so a user without the real download can try ``--mask`` inpainting and inpainting training on
        it), or ``depth``/``canny`` (FLUX.1 Depth/Canny [dev]'s layout: ``img_in`` 128 wide); the tools' layouts
        are dev's parts with a wider transformer seeded ``seed``."""
        from .load import make_bundle
        from .tiny import create_tiny_parts
        from .variants import PIPELINE_METADATA_KEY

        names = {"kontext": "FluxKontextPipeline", "fill": "FluxFillPipeline", "depth": "FluxControlPipeline",
                 "canny": "FluxControlPipeline"}  # fmt: skip
        metadata = {PIPELINE_METADATA_KEY: names[variant]} if variant in names else None
        try:
            parts = create_tiny_parts("dev" if variant in names else variant, seed=seed)
        except ValueError as exc:
            raise ConfigError(f"{exc} (or kontext, fill, depth, canny)") from None
        if variant in ("fill", "depth", "canny"):
            import torch
            from diffusers import FluxTransformer2DModel

            from .variants import TOOL_INPUTS

            config = {k: v for k, v in parts["transformer"].config.items() if not k.startswith("_")}
            tool = "fill" if variant == "fill" else "control"
            config.update(in_channels=next(w for w, v in TOOL_INPUTS.items() if v == tool), out_channels=64)
            state = torch.random.get_rng_state()
            try:
                torch.manual_seed(seed)
                parts["transformer"] = FluxTransformer2DModel.from_config(config).eval()
            finally:
                torch.random.set_rng_state(state)
        name = "flux" if variant == "dev" else f"flux-{variant}"
        return make_bundle(parts, source=f"tiny:{name}", source_format="tiny", metadata=metadata)

    def diffusers_pipeline_of(self, bundle: ModelBundle) -> str:
        """The ``_class_name`` a diffusers save of ``bundle`` writes: the release's own pipeline where its source
        named one (a Kontext folder: ``FluxKontextPipeline``), ``FluxFillPipeline`` for a Fill transformer (a
        trained Fill stays Fill), else :attr:`diffusers_pipeline`."""
        from .variants import PIPELINE_METADATA_KEY, bundle_variant

        named = (bundle.metadata or {}).get(PIPELINE_METADATA_KEY)
        if named:
            return named
        return "FluxFillPipeline" if bundle_variant(bundle) == "fill" else self.diffusers_pipeline

    # --- conditioning and prediction -----------------------------------------------------------
    def t5_max_length(self, bundle: ModelBundle) -> int:
        """T5 tokens per prompt: 512 for dev models, 256 for schnell (their pipelines' defaults)."""
        from .tiny import T5_MAX_LENGTH

        return T5_MAX_LENGTH["dev" if bundle.transformer.config.guidance_embeds else "schnell"]

    def encode_prompts(
        self,
        bundle: ModelBundle,
        prompts: list[str],
        *,
        t5_max_length: int | None = None,
        t5_attention_mask: bool = False,
        control: bool = False,
        **options: Any,
    ) -> Conditioning:
        """CLIP-L pooled output and the T5 sequence, as ``FluxPipeline.encode_prompt`` (``t5_max_length``:
        T5 tokens, default :meth:`t5_max_length`, kohya's ``--t5xxl_max_token_length``;
        ``t5_attention_mask``: mask T5's padding, kohya's ``--apply_t5_attn_mask``; ``control``: a control image
        comes with the call, ``sdcore generate --control-image``, so FLUX.1 Depth/Canny encode as dev does)."""
        # CLIP-L first, as always (a trained CLIP's LoRA dropout draws before T5 runs)
        pooled = self._clip_pooled(bundle, prompts, control=control)
        cached = self.encode_cached_part(bundle, prompts, t5_max_length=t5_max_length,
                                         t5_attention_mask=t5_attention_mask, control=control)  # fmt: skip
        return _joined(cached, pooled)

    def encode_cached_part(
        self,
        bundle: ModelBundle,
        prompts: list[str],
        *,
        t5_max_length: int | None = None,
        t5_attention_mask: bool = False,
        control: bool = False,
        **options: Any,
    ) -> Conditioning:
        """T5's part of :meth:`encode_prompts` alone (the family's ``partial_text_cache``): its sequence as
        ``hidden_states`` (and its mask in ``extra``), no pooled vector; what a run training CLIP-L caches (and,
        for its sample renders, :class:`~sdcore.generate.conditioning_memo.PartMemo` keeps)."""
        from ...generate.conditioning_memo import active_part_memo

        memo = active_part_memo()
        if memo is not None:
            key = ("flux", tuple(prompts), t5_max_length, t5_attention_mask, control)
            return memo.encode(key, lambda: self._t5_part(bundle, prompts, t5_max_length, t5_attention_mask, control))
        return self._t5_part(bundle, prompts, t5_max_length, t5_attention_mask, control)

    def _t5_part(
        self, bundle: ModelBundle, prompts: list[str], t5_max_length: int | None, t5_attention_mask: bool, control: bool
    ) -> Conditioning:
        from ...train.method import Conditioning
        from ..t5 import encode_t5
        from .variants import require_supported

        # before caching: Depth/Canny train nowhere and generate with a control image only; Fill's text encoding is
        # dev's (its mask comes with the image)
        require_supported(bundle, "train or generate with", given=("mask", "control image") if control else ("mask",))
        _require(bundle, "text_encoder")
        _require(bundle, "text_encoder_2")
        t5, t5_tok = bundle.text_encoders[1], bundle.tokenizers[1]
        if t5_tok is None:
            from ..t5 import load_t5_tokenizer

            load_t5_tokenizer(vocab_size=t5.config.vocab_size)  # raises the message naming the option
        length = t5_max_length or self.t5_max_length(bundle)
        hidden, mask = encode_t5(t5, t5_tok, prompts, max_length=length, attention_mask=t5_attention_mask)
        extra = {T5_MASK: mask} if t5_attention_mask else {}
        return Conditioning(hidden_states=hidden.to(dtype=t5.dtype), pooled=None, extra=extra)

    def complete_encoding(
        self, bundle: ModelBundle, prompts: list[str], cached: Conditioning, **options: Any
    ) -> Conditioning:
        """:meth:`encode_prompts`' result from T5's ``cached`` part (:meth:`encode_cached_part` of the same
        prompts) and CLIP-L's pooled output, computed now (CLIP-L trains while T5's outputs are cached)."""
        return _joined(cached, self._clip_pooled(bundle, prompts, control=bool(options.get("control"))))

    def _clip_pooled(self, bundle: ModelBundle, prompts: list[str], *, control: bool = False) -> torch.Tensor:
        """CLIP-L's pooled output of ``prompts`` (77 tokens), in CLIP-L's dtype."""
        from .variants import require_supported

        require_supported(bundle, "train or generate with", given=("mask", "control image") if control else ("mask",))
        _require(bundle, "text_encoder")
        _require(bundle, "text_encoder_2")
        clip, clip_tok = bundle.text_encoders[0], bundle.tokenizers[0]
        device = next(clip.parameters()).device
        tokens = clip_tok(list(prompts), padding="max_length", max_length=clip_tok.model_max_length,
                          truncation=True, return_tensors="pt")  # fmt: skip
        pooled = clip(tokens.input_ids.to(device), output_hidden_states=False).pooler_output
        return pooled.to(dtype=clip.dtype)  # type: ignore[no-any-return]

    def predict(
        self,
        bundle: ModelBundle,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        *,
        guidance: float | torch.Tensor | None = None,
        bypass_guidance_embedding: bool = False,
        reference_latents: torch.Tensor | None = None,
        inpainting: tuple[torch.Tensor, torch.Tensor] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """The transformer's velocity for ``noisy_latents`` [B, 16, H, W] at ``timesteps`` (sigma * 1000);
        ``bypass_guidance_embedding`` (training only): without the guidance term (:func:`guidance_bypassed`);
        ``reference_latents`` [B or 1, 16, h, w]: FLUX.1 Kontext's clean reference images, as extra tokens
        whose output is dropped (:mod:`sdcore.models.flux.kontext`); on a transformer whose ``img_in`` takes the
        control image too (dev widened for a control LoRA, :func:`join_control`) the control images' latents,
        joined on the channels instead; ``inpainting``: FLUX.1 Fill's
        ``(mask [B, 64, h, w], masked-image latents [B, 16, h, w])``, packed after the noisy latents as
        ``FluxFillPipeline`` joins them (``[noisy, masked latents, mask]`` per token)."""
        import torch

        from ...dtypes import compute_dtype
        from .variants import bundle_variant, require_supported

        if inpainting is None:
            require_supported(bundle, "train or generate with")  # not a shape error inside img_in
        transformer = bundle.transformer
        if conditioning.pooled is None:
            raise ConfigError("Flux conditioning without the pooled CLIP-L embedding")
        batch, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, compute_dtype(transformer)  # not fp8 storage (--fp8-base)
        packed = pack_latents(noisy_latents).to(dtype)
        if inpainting is not None:
            from .variants import require_fill

            require_fill(bundle)
            mask, masked = inpainting
            extra = torch.cat([masked.to(noisy_latents), mask.to(noisy_latents)], dim=1)
            packed = torch.cat([packed, pack_latents(extra).to(dtype)], dim=2)
        hidden = conditioning.hidden_states.to(device=device, dtype=dtype)
        step = torch.as_tensor(timesteps, device=device).reshape(-1).expand(batch).to(dtype) / 1000
        value = None
        if transformer.config.guidance_embeds and not bypass_guidance_embedding:
            given = DEFAULT_GUIDANCE if guidance is None else guidance
            value = torch.as_tensor(given, device=device, dtype=torch.float32).reshape(-1).expand(batch)
        ids = image_ids(height, width, device=device, dtype=dtype)
        target_tokens = packed.shape[1]
        if reference_latents is not None and bundle_variant(bundle) == "control":
            from .control import join_control

            packed = join_control(packed, reference_latents)
        elif reference_latents is not None:
            from .kontext import join_reference

            packed, ids = join_reference(packed, ids, reference_latents)
        kwargs: dict[str, Any] = {}
        if T5_MASK in conditioning.extra:  # padding tokens masked as keys in every joint attention
            kwargs["joint_attention_kwargs"] = joint_attention_mask(
                conditioning.extra[T5_MASK], packed.shape[1], device
            )
        bypass = guidance_bypassed(transformer) if bypass_guidance_embedding else contextlib.nullcontext()
        with bypass:
            out = transformer(
                hidden_states=packed,
                timestep=step,
                guidance=value,
                pooled_projections=conditioning.pooled.to(device=device, dtype=dtype),
                encoder_hidden_states=hidden,
                txt_ids=text_ids(hidden.shape[1], device=device, dtype=dtype),
                img_ids=ids,
                return_dict=False,
                **kwargs,
            )[0]
        return unpack_latents(out[:, :target_tokens], height, width)
