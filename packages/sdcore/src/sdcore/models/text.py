"""Prompt -> UNet conditioning, the way A1111 and kohya do it, for training and generation alike.

Training and sampling must encode prompts identically, otherwise a LoRA learns one conditioning
and is judged on another. The rules (see docs/research ``lora.md`` §4.1 and ``ti_hn_apt_aesthetic.md``):

- a prompt is tokenized without special tokens and cut into chunks of 75 tokens; each chunk becomes
  ``BOS + 75 tokens + EOS`` padded to 77 with the tokenizer's pad token (EOS for OpenAI CLIP, ``!``
  for OpenCLIP), and the chunks' hidden states are concatenated: ``[B, 77 * k, C]``. Every prompt of a
  batch gets the same ``k`` (the longest prompt's, at most ``max_chunks``); shorter prompts get empty
  chunks, as A1111 pads. Tokens past ``75 * max_chunks`` are dropped.
- SD1/SD2: ``clip_skip=1`` is the last layer (with the final LayerNorm, i.e. ``last_hidden_state``);
  ``clip_skip=n`` takes ``hidden_states[-n]`` and applies the final LayerNorm (kohya and A1111 both do
  this for SD1 and SD2; SD2's diffusers text encoder already stops at OpenCLIP's penultimate layer).
- SDXL: both towers use ``hidden_states[-(clip_skip + 1)]`` (penultimate for the default ``clip_skip=1``)
  *without* the final LayerNorm and are concatenated on the channel axis; the pooled ``text_embeds``
  is the second tower's projection of its last layer at the first chunk's EOS (kohya takes the
  first chunk's pool too). kohya warns that clip skip has no effect on SDXL; we shift the layer so
  the option is never silently ignored.

Nothing here disables gradients: when a method trains a text encoder, gradients flow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..train.method import Conditioning
    from .bundle import ModelBundle

CHUNK_TOKENS = 75


def final_layer_norm(text_encoder: Any) -> Any:
    """The final LayerNorm of a CLIP text encoder, whatever the transformers module layout."""
    if hasattr(text_encoder, "final_layer_norm"):
        return text_encoder.final_layer_norm
    return text_encoder.text_model.final_layer_norm


def prompt_token_ids(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt without BOS/EOS and without truncation."""
    encoded = tokenizer(list(prompts), add_special_tokens=False, truncation=False, padding=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def chunk_count(tokenizer: Any, prompts: Sequence[str], *, max_chunks: int = 3) -> int:
    """How many 77-token chunks the batch needs (at least 1, at most ``max_chunks``)."""
    longest = max((len(ids) for ids in prompt_token_ids(tokenizer, prompts)), default=0)
    return max(1, min(max_chunks, -(-longest // CHUNK_TOKENS)))


def chunked_input_ids(tokenizer: Any, prompts: Sequence[str], *, chunks: int) -> torch.Tensor:
    """``[B, chunks, 77]`` ids: each chunk is ``BOS + up to 75 tokens + EOS`` then pad tokens."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    rows = []
    for ids in prompt_token_ids(tokenizer, prompts):
        prompt_chunks = []
        for index in range(chunks):
            part = ids[index * CHUNK_TOKENS : (index + 1) * CHUNK_TOKENS]
            row = [bos, *part, eos]
            row += [pad] * (CHUNK_TOKENS + 2 - len(row))
            prompt_chunks.append(row)
        rows.append(prompt_chunks)
    return torch.tensor(rows, dtype=torch.long)


def weighted_input_ids(tokenizer: Any, prompts: Sequence[str], *, chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, chunks, 77]`` ids and per-token weights of prompts with kohya's ``--weighted_captions``
    emphasis (:func:`~sdcore.generate.prompt_syntax.parse_kohya_emphasis`: A1111's brackets, no spaces
    around a weight, no ``BREAK``).

    The emphasis is parsed and tokenized run by run by the generation code
    (:func:`sdcore.generate.conditioning.tokenize_weighted`, without comma backtracking, so chunks
    split every 75 tokens as in :func:`chunked_input_ids`); BOS, EOS and padding weigh 1.0. A prompt
    without emphasis gets exactly :func:`chunked_input_ids`'s ids and weights of 1.0. Tokens past
    ``75 * chunks`` are dropped, as kohya truncates at its token limit.
    """
    import torch

    from ..generate.conditioning import tokenize_weighted
    from ..generate.prompt_syntax import parse_kohya_emphasis

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    empty = [bos, eos] + [pad] * CHUNK_TOKENS
    ids, weights = [], []
    for prompt in prompts:
        tokens = tokenize_weighted(tokenizer, parse_kohya_emphasis(prompt), comma_backtrack=0)
        missing = max(0, chunks - len(tokens))
        ids.append(tokens.ids[:chunks] + [empty] * missing)
        weights.append(tokens.multipliers[:chunks] + [[1.0] * len(empty)] * missing)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def weighted_chunk_count(tokenizer: Any, prompts: Sequence[str], *, max_chunks: int = 3) -> int:
    """:func:`chunk_count` for prompts with emphasis (brackets and weights take no tokens)."""
    from ..generate.conditioning import tokenize_weighted
    from ..generate.prompt_syntax import parse_kohya_emphasis

    longest = max(
        (len(tokenize_weighted(tokenizer, parse_kohya_emphasis(p), comma_backtrack=0)) for p in prompts),
        default=1,
    )
    return max(1, min(max_chunks, longest))


def _emphasis(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """kohya's weighted captions: each token's hidden state times its weight, the mean NOT restored
    (kohya's ``encode_tokens_with_weights``; A1111 generation restores it)."""
    if weights is None:
        return hidden
    from ..generate.conditioning import apply_emphasis

    return apply_emphasis(hidden, weights.reshape(hidden.shape[0], -1), restore_mean=False)


def _encoder_device(text_encoder: Any) -> Any:
    return next(text_encoder.parameters()).device


def _run_encoder(text_encoder: Any, ids: torch.Tensor, layer: int) -> Any:
    out = text_encoder(ids.to(_encoder_device(text_encoder)), output_hidden_states=True, return_dict=True)
    if -layer > len(out.hidden_states) - 1:
        from ..errors import ConfigError

        raise ConfigError(f"--clip-skip too large: the text encoder has only {len(out.hidden_states) - 1} layers")
    return out


def deepest_clip_skip(depth: int, family: str) -> int:
    """The largest ``clip_skip`` the encoders take for a CLIP text encoder ``depth`` layers deep: SD1/SD2 read
    ``hidden_states[-clip_skip]`` (:func:`encode_prompts`) and SD3 diffusers' ``-(n + 2)`` with ``n = clip_skip - 1``,
    so the depth itself; SDXL reads ``hidden_states[-(clip_skip + 1)]`` (clip skip 1 is already the penultimate
    layer), one less. :func:`_run_encoder` and SD3's ``clip_embeds`` refuse deeper ones once the encoder runs."""
    return depth - 1 if family.startswith("sdxl") else depth


def clip_skip_problem(clip_skip: int, family: str, encoder_configs: Sequence[Mapping[str, Any]]) -> str | None:
    """``--clip-skip N`` deeper than the shallowest CLIP text encoder of ``family`` takes (its ``config.json``s, as a
    model layout holds them: known before any weight loads), for the pre-flight; ``None`` when it fits or no CLIP
    depth is known (a T5's config says ``num_layers``, not ``num_hidden_layers``: clip skip does not reach it)."""
    depths = [int(c["num_hidden_layers"]) for c in encoder_configs if isinstance(c.get("num_hidden_layers"), int)]
    if clip_skip <= 1 or not depths:
        return None
    depth = min(depths)
    deepest = deepest_clip_skip(depth, family)
    if clip_skip <= deepest:
        return None
    sdxl = " (SDXL counts from the penultimate layer: clip skip 1 is already one layer back)"
    return (
        f"--clip-skip {clip_skip} too large: the {family} model's text encoder has only {depth} layers, so "
        f"--clip-skip is at most {deepest}{sdxl if family.startswith('sdxl') else ''}"
    )


def encode_prompts(
    bundle: ModelBundle,
    prompts: Sequence[str],
    *,
    clip_skip: int = 1,
    max_chunks: int = 3,
    chunks: int | None = None,
    weighted: bool = False,
) -> Conditioning:
    """Encode ``prompts`` into UNet conditioning for ``bundle``'s family.

    ``chunks`` forces the chunk count (text-encoder caches use it to make batches line up);
    by default it is the longest prompt's, capped at ``max_chunks``. ``weighted`` reads A1111
    emphasis in the prompts (kohya's ``--weighted_captions``, see :func:`weighted_input_ids`): each
    token's hidden states (after clip skip and, SD1/SD2, the final norm; for SDXL each tower's
    before they are joined) are multiplied by its weight; the pooled embedding is unweighted.
    """
    import torch

    from ..train.method import Conditioning

    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    prompts = list(prompts)
    tokenizers, encoders = bundle.tokenizers, bundle.text_encoders
    if chunks is None:
        count = weighted_chunk_count if weighted else chunk_count
        chunks = count(tokenizers[0], prompts, max_chunks=max_chunks)
    batch = len(prompts)

    def ids_of(tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not weighted:
            return chunked_input_ids(tokenizer, prompts, chunks=chunks).reshape(batch * chunks, -1), None
        ids, weights = weighted_input_ids(tokenizer, prompts, chunks=chunks)
        return ids.reshape(batch * chunks, -1), weights.reshape(batch * chunks, -1)

    if not bundle.is_sdxl:
        ids, weights = ids_of(tokenizers[0])
        out = _run_encoder(encoders[0], ids, -clip_skip)
        if clip_skip == 1:
            hidden = out.last_hidden_state
        else:
            hidden = final_layer_norm(encoders[0])(out.hidden_states[-clip_skip])
        hidden = _emphasis(hidden, weights)
        return Conditioning(hidden.reshape(batch, chunks * hidden.shape[1], hidden.shape[-1]))

    layer = -(clip_skip + 1)
    states = []
    pooled = None
    for index, (tokenizer, encoder) in enumerate(zip(tokenizers, encoders, strict=True)):
        ids, weights = ids_of(tokenizer)
        out = _run_encoder(encoder, ids, layer)
        hidden = _emphasis(out.hidden_states[layer], weights)
        states.append(hidden.reshape(batch, chunks * hidden.shape[1], hidden.shape[-1]))
        if index == len(encoders) - 1:
            embeds = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            pooled = embeds.reshape(batch, chunks, -1)[:, 0]
    return Conditioning(torch.cat(states, dim=-1), pooled)


def sdxl_time_ids(
    original_sizes: Sequence[tuple[int, int]],
    crop_coords: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
    *,
    device: Any = None,
    dtype: Any = None,
) -> torch.Tensor:
    """SDXL micro-conditioning ``[B, 6]``: original (h, w), crop (top, left), target (h, w)."""
    import torch

    rows = [
        [float(o[0]), float(o[1]), float(c[0]), float(c[1]), float(t[0]), float(t[1])]
        for o, c, t in zip(original_sizes, crop_coords, target_sizes, strict=True)
    ]
    return torch.tensor(rows, device=device, dtype=dtype or torch.float32)


def pad_conditioning(conditioning: Conditioning, chunks: int, empty_chunk: torch.Tensor) -> Conditioning:
    """Append copies of ``empty_chunk`` ([77, C], an encoded empty prompt) up to ``chunks`` chunks.

    Chunks are encoded independently, so this equals encoding the prompt with ``chunks`` chunks;
    cached single prompts of different lengths can then share a batch.
    """
    import torch

    from ..train.method import Conditioning

    hidden = conditioning.hidden_states
    have = hidden.shape[-2] // empty_chunk.shape[0]
    if have >= chunks:
        return conditioning
    extra = empty_chunk.to(hidden).unsqueeze(0).expand(hidden.shape[0], -1, -1).repeat(1, chunks - have, 1)
    return Conditioning(torch.cat([hidden, extra], dim=-2), conditioning.pooled, conditioning.extra)
