"""The Chroma family adapter: T5-only prompt encoding with Chroma's mask, FLUX.1's packing, the transformer call.

What one denoising step gets, as kohya's ``flux_train_network.py --model_type chroma`` and diffusers'
``ChromaPipeline`` make it (the packing, ids and timestep scale are FLUX.1's, reused from
:mod:`sdcore.models.flux.adapter`):

- prompts: T5's last hidden state, padded to 512 tokens, with T5's attention mask given to the encoder
  (kohya requires ``--apply_t5_attn_mask`` for Chroma; the pipeline always passes it);
- the joint attention hides T5's padding as keys except the first padding token after the prompt
  (kohya's ``attn_padding=1``: ``length + 1`` text tokens; the pipeline's ``index <= length``). sdcore
  passes that mask as booleans, so it really masks (the pipeline's own float mask is added to the scores);
- no pooled vector and no guidance input: the approximator sees guidance 0 (diffusers hard-codes it;
  kohya documents ``--guidance_scale 0.0`` for Chroma), so ``guidance=`` is ignored.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError, ModelFormatError
from ..flux.adapter import T5_MASK

if TYPE_CHECKING:
    import torch

    from ...train.method import Conditioning
    from ..bundle import ModelBundle

#: padding tokens after the prompt that stay visible in the joint attention (kohya's ``attn_padding``)
ATTN_PADDING = 1


def chroma_text_mask(tokenizer_mask: torch.Tensor) -> torch.Tensor:
    """T5's tokenizer mask [B, L] -> the transformer's text mask: the prompt's tokens and the first
    :data:`ATTN_PADDING` padding tokens after it (clipped to L), as booleans."""
    import torch

    lengths = tokenizer_mask.sum(dim=1, keepdim=True)
    index = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None, :]
    return index < lengths + ATTN_PADDING


def _require(bundle: ModelBundle, what: str) -> None:
    from .load import PART_OPTIONS

    present = {"text_encoder": bool(bundle.text_encoders), "vae": bundle.vae is not None}
    if not present[what]:
        option = PART_OPTIONS[what]
        raise ModelFormatError(
            f"{bundle.source}: this Chroma model has no {what}; give it with {option}=<file or folder> "
            f"(--{option.replace('_', '-')} on the command line)"
        )


def require_complete(bundle: ModelBundle) -> None:
    """Every part generation needs (T5, VAE), or the error naming the option that supplies it."""
    for part in ("text_encoder", "vae"):
        _require(bundle, part)


class ChromaAdapter:
    """:class:`~sdcore.models.family.FamilyAdapter` of the ``chroma`` family."""

    #: ``_class_name`` of the diffusers folders the core's writer makes of this family
    diffusers_pipeline = "ChromaPipeline"
    default_sampler = "euler"
    #: ``sdcore generate`` warns that ``--clip-skip`` changes nothing here: T5 alone encodes the prompt: there is no CLIP to skip layers of
    clip_skip_ignored = True
    #: real CFG with a negative prompt (no distilled guidance): ChromaPipeline's default scale
    default_cfg = 5.0
    #: ``--guidance-scale`` is ignored without a note (the approximator gets 0; kohya's docs ask for 0.0)
    guidance_input = None

    def enable_gradient_checkpointing(self, bundle: ModelBundle, gradient_checkpointing_func: Any = None) -> None:
        """diffusers' checkpointing with the attention mask kept in the single blocks (:mod:`.checkpointing`);
        ``gradient_checkpointing_func``: ``--cpu-offload-checkpointing``'s, else torch's checkpoint."""
        from .checkpointing import enable_masked_checkpointing

        enable_masked_checkpointing(bundle.denoiser, gradient_checkpointing_func)

    def __repr__(self) -> str:
        return "ChromaAdapter()"

    def require_complete(self, bundle: ModelBundle) -> None:
        require_complete(bundle)

    # --- model I/O ---------------------------------------------------------------------------
    def detect_single_file(self, keys: Collection[str]) -> bool:
        from .load import is_chroma_file

        return is_chroma_file(keys)

    def load_single_file(self, path: Any, **options: Any) -> ModelBundle:
        from .load import read_chroma_single_file

        return read_chroma_single_file(path, **options)

    def read_layout(self, path: Any, **parts: Any) -> Any:
        from .load import read_chroma_layout

        return read_chroma_layout(path, **parts)

    def part_slots(self, path: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
        from .load import chroma_part_slots

        return chroma_part_slots(path)

    def save(self, bundle: ModelBundle, path: Any, *, format: str | None = None, dtype: Any = None,
             prune: bool = True, metadata: dict[str, str] | None = None) -> Any:  # fmt: skip
        """``single-file``: a ComfyUI checkpoint (transformer, T5, VAE as the bundle has them); ``bfl``: the
        transformer alone as lodestones release it; ``diffusers``: a folder ``ChromaPipeline`` reads."""
        from ...errors import SdcoreError
        from ..flux.save import write_flux_single_file
        from ..save import write_diffusers

        if format in ("single-file", "bfl"):
            layout = "bfl" if format == "bfl" else "comfy"
            return write_flux_single_file(bundle, path, dtype=dtype, metadata=metadata, layout=layout)
        if format == "diffusers":
            return write_diffusers(bundle, path, dtype=dtype, prune=prune, metadata=metadata)
        raise SdcoreError(f"unknown model format {format!r} for Chroma; use single-file, bfl or diffusers")

    def generate(self, bundle: ModelBundle, prompts: list[str], negatives: list[str], *, sampler: str = "euler",
                 image: Any = None, **settings: Any) -> list[Any]:  # fmt: skip
        """``sdcore generate``: diffusers' ``ChromaPipeline`` (``ChromaImg2ImgPipeline`` with an init image)."""
        from .generate import build_chroma_pipeline, run_chroma

        pipe = build_chroma_pipeline(bundle, img2img=image is not None, sampler=sampler)
        pipe.set_progress_bar_config(disable=True)
        return run_chroma(pipe, bundle, prompts, negatives, image=image, sampler=sampler, **settings)

    def flow_scheduler_for(self, bundle: ModelBundle, sampler: str, *, img2img: bool = False) -> Any:
        """The scheduler ``sdcore generate`` builds for ``sampler`` (a one-line ConfigError for a sampler the
        family's pipeline cannot run); the X/Y/Z plot asks it for every cell before the first renders."""
        from .generate import flow_scheduler_for

        return flow_scheduler_for(bundle, sampler, img2img=img2img)

    def detect_diffusers(self, index: dict[str, Any]) -> bool:
        from .load import is_chroma_index

        return is_chroma_index(index)

    def load_diffusers(self, folder: Any, **options: Any) -> ModelBundle:
        from .load import read_chroma_diffusers

        return read_chroma_diffusers(folder, **options)

    def create_tiny(self, *, seed: int = 0, variant: str | None = None, **options: Any) -> ModelBundle:
        """The tiny Chroma (one release shape: there are no variants)."""
        from .load import make_bundle
        from .tiny import create_tiny_parts

        if variant is not None:
            raise ConfigError(f"Chroma has no variant {variant!r}")
        return make_bundle(create_tiny_parts(seed=seed), source="tiny:chroma", source_format="tiny")

    # --- conditioning and prediction -----------------------------------------------------------
    def t5_max_length(self, bundle: ModelBundle) -> int:
        from .tiny import T5_MAX_LENGTH

        return T5_MAX_LENGTH

    def encode_prompts(
        self, bundle: ModelBundle, prompts: list[str], *, t5_max_length: int | None = None, **options: Any
    ) -> Conditioning:
        """T5's sequence with the mask given to the encoder, and the transformer's text mask in
        ``extra[T5_MASK]`` (``t5_max_length``: kohya's ``--t5xxl_max_token_length``, default 512). The mask
        is applied whatever ``t5_attention_mask`` says: Chroma was trained with it (kohya asserts it)."""
        from ...train.method import Conditioning
        from ..t5 import encode_t5, load_t5_tokenizer

        _require(bundle, "text_encoder")
        t5, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
        if tokenizer is None:
            load_t5_tokenizer(vocab_size=t5.config.vocab_size)  # raises the message naming the option
        length = t5_max_length or self.t5_max_length(bundle)
        hidden, mask = encode_t5(t5, tokenizer, prompts, max_length=length, attention_mask=True)
        return Conditioning(hidden_states=hidden.to(dtype=t5.dtype), pooled=None,
                            extra={T5_MASK: chroma_text_mask(mask)})  # fmt: skip

    def predict(
        self,
        bundle: ModelBundle,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        conditioning: Conditioning,
        **options: Any,
    ) -> torch.Tensor:
        """The transformer's velocity for ``noisy_latents`` [B, 16, H, W] at ``timesteps`` (sigma * 1000)."""
        import torch

        from ...dtypes import compute_dtype
        from ..flux.adapter import image_ids, pack_latents, text_ids, unpack_latents

        transformer = bundle.transformer
        batch, _, height, width = noisy_latents.shape
        device, dtype = noisy_latents.device, compute_dtype(transformer)
        packed = pack_latents(noisy_latents).to(dtype)
        hidden = conditioning.hidden_states.to(device=device, dtype=dtype)
        step = torch.as_tensor(timesteps, device=device).reshape(-1).expand(batch).to(dtype) / 1000
        if T5_MASK in conditioning.extra:
            text = conditioning.extra[T5_MASK].to(device=device, dtype=torch.bool)
        else:  # conditioning built elsewhere without a mask: every token visible
            text = torch.ones(batch, hidden.shape[1], device=device, dtype=torch.bool)
        if text.shape != (batch, hidden.shape[1]):
            raise ConfigError(f"Chroma text mask {tuple(text.shape)} does not fit {batch} x {hidden.shape[1]} tokens")
        image = torch.ones(batch, packed.shape[1], device=device, dtype=torch.bool)
        out = transformer(
            hidden_states=packed,
            timestep=step,
            encoder_hidden_states=hidden,
            txt_ids=text_ids(hidden.shape[1], device=device, dtype=dtype),
            img_ids=image_ids(height, width, device=device, dtype=dtype),
            attention_mask=torch.cat([text, image], dim=1),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)
