"""Prompt text -> UNet conditioning, the A1111 way (emphasis, 75-token chunks, BREAK, clip skip).

Why not the pipeline's own ``encode_prompt``: it truncates at 77 tokens and knows no emphasis.
Here a prompt is parsed into weighted runs (:mod:`.prompt_syntax`), tokenized run by run and
packed into chunks of 75 tokens (``BREAK`` starts a new chunk; when a chunk fills up and a comma
was seen in its last 20 tokens the words after that comma move on to the next chunk). Each chunk
becomes ``BOS + 75 tokens + EOS`` (the rest padded with the tokenizer's pad token: EOS for CLIP-L,
``!`` for OpenCLIP), runs through the text encoder, and the chunks are concatenated, so a prompt
of ``k`` chunks gives ``77 * k`` positions.

Token groups: a run of ids that stands for one thing (a multi-vector embedding's placeholder
tokens) is never split over two chunks, as in A1111 (``sd_hijack_clip.py`` ``tokenize_line``): when
it would cross the 75-token boundary the chunk is closed (padded) and the whole group starts the
next one. Whoever adds such tokens to a tokenizer declares them with :func:`add_token_group`; the
core knows nothing else about them. A group longer than 75 tokens cannot fit any chunk (A1111's chunk
then outgrows the text encoder's 77 positions and fails); sdcore splits it at the boundaries like words.

Output embeddings (OneTrainer's; :func:`sdcore.models.token_embeddings.add_output_rows`): each encoder's hidden
states at the layer read (after clip skip and, for SD1/SD2, the final layer norm) have the output rows put in at
their tokens' positions, before emphasis, where OneTrainer puts them (``encode_text``: after ``encode_clip``).

Emphasis ("Original" mode): the hidden states are multiplied by each token's weight and then
rescaled so their mean equals the mean before weighting. With all weights 1.0 nothing is touched,
so plain prompts encode exactly as an ordinary 77-token encoding does.

Which hidden states: SD1/SD2 use ``hidden_states[-clip_skip]`` followed by the final layer norm
(``clip_skip=1`` is the normal last layer; diffusers-layout SD2 encoders already drop OpenCLIP's
last layer). SDXL concatenates the penultimate layers (``hidden_states[-(clip_skip + 1)]``, no
final norm) of both encoders; the pooled embedding comes from the second encoder's projection of
the first chunk. These are the rules of :func:`sdcore.models.text.encode_prompts` (training),
which has no emphasis, BREAK or comma backtracking; both give the same tensors for a plain prompt
of up to 75 tokens (tested), so samples during training see what training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..models.text import final_layer_norm
from .prompt_syntax import Chunk, is_break, parse_emphasis

if TYPE_CHECKING:
    import torch

    from ..models.bundle import ModelBundle

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20
#: the tokenizer attribute holding its token groups: ``{first id: (every id of the group, in order)}``
TOKEN_GROUPS_ATTR = "sdcore_token_groups"


def token_groups(tokenizer: Any) -> dict[int, tuple[int, ...]]:
    """The token groups declared on ``tokenizer`` (see module doc); empty when there are none."""
    groups = getattr(tokenizer, TOKEN_GROUPS_ATTR, None)
    return groups if isinstance(groups, dict) else {}


def add_token_group(tokenizer: Any, ids: list[int] | tuple[int, ...]) -> None:
    """Declare that ``ids``, wherever they occur together in this order, stay in one 75-token chunk."""
    if len(ids) > 1:
        groups = dict(token_groups(tokenizer))
        groups[int(ids[0])] = tuple(int(i) for i in ids)
        setattr(tokenizer, TOKEN_GROUPS_ATTR, groups)


def remove_token_group(tokenizer: Any, ids: list[int] | tuple[int, ...]) -> None:
    """Undo :func:`add_token_group` (the attribute goes when the last group does)."""
    groups = dict(token_groups(tokenizer))
    if ids and groups.get(int(ids[0])) == tuple(int(i) for i in ids):
        del groups[int(ids[0])]
    if groups:
        setattr(tokenizer, TOKEN_GROUPS_ATTR, groups)
    elif hasattr(tokenizer, TOKEN_GROUPS_ATTR):
        delattr(tokenizer, TOKEN_GROUPS_ATTR)


@dataclass
class TokenChunks:
    """One prompt tokenized into chunks: ``ids`` and ``multipliers`` are lists of 77-long lists."""

    ids: list[list[int]]
    multipliers: list[list[float]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Conditioning:
    """Encoder output for a batch: ``embeds`` ``[B, 77*k, D]``, ``pooled`` ``[B, P]`` (SDXL only)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


def _special_ids(tokenizer: Any) -> tuple[int, int, int, int]:
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma is None or comma == tokenizer.unk_token_id:
        comma = -1
    return int(bos), int(eos), int(pad), int(comma)


def tokenize_weighted(
    tokenizer: Any,
    chunks: list[Chunk] | list[tuple[str, float]],
    *,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> TokenChunks:
    """Tokenize weighted runs into 77-token chunks with per-token multipliers (see module doc)."""
    bos, eos, pad, comma = _special_ids(tokenizer)
    groups = token_groups(tokenizer)
    texts = [chunk[0] for chunk in chunks if not is_break(chunk)]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []
    token_lists = iter(encoded)

    out = TokenChunks(ids=[], multipliers=[])
    current: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def finish() -> None:
        nonlocal current, weights, last_comma
        fill = CHUNK_TOKENS - len(current)
        out.ids.append([bos, *current, eos] + [pad] * fill)
        out.multipliers.append([1.0, *weights, 1.0] + [1.0] * fill)
        current, weights, last_comma = [], [], -1

    for chunk in chunks:
        if is_break(chunk):
            finish()
            continue
        weight = float(chunk[1])
        tokens = [int(t) for t in next(token_lists)]
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(current)
            elif (
                comma_backtrack
                and len(current) == CHUNK_TOKENS
                and last_comma != -1
                and len(current) - last_comma <= comma_backtrack
            ):
                cut = last_comma + 1
                moved, moved_weights = current[cut:], weights[cut:]
                current, weights = current[:cut], weights[:cut]
                finish()
                current, weights = moved, moved_weights
            if len(current) == CHUNK_TOKENS:
                finish()
            group = groups.get(token)
            if group is None or len(group) > CHUNK_TOKENS or tuple(tokens[position : position + len(group)]) != group:
                current.append(token)
                weights.append(weight)
                position += 1
                continue
            if len(current) + len(group) > CHUNK_TOKENS:
                finish()  # the whole group moves on to the next chunk
            current.extend(group)
            weights.extend([weight] * len(group))
            position += len(group)
    if current or not out.ids:
        finish()
    return out


def encode_hidden(text_encoder: Any, ids: torch.Tensor, *, layer: int, final_norm: bool) -> tuple[Any, Any]:
    """Run ``ids`` ``[N, 77]``; return ``(hidden_states[-layer] (normed if asked), text_embeds or None)``."""
    output = text_encoder(ids, output_hidden_states=True)
    hidden_states = output.hidden_states
    if layer < 1 or layer >= len(hidden_states):
        raise ConfigError(f"clip skip {layer} is out of range: this text encoder has {len(hidden_states) - 1} layers")
    if layer == 1 and final_norm:
        z = output.last_hidden_state
    else:
        z = hidden_states[-layer]
        if final_norm:
            z = final_layer_norm(text_encoder)(z)
    pooled = getattr(output, "text_embeds", None)
    return z, pooled


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, *, restore_mean: bool = True) -> torch.Tensor:
    """Scale ``z`` ``[N, T, D]`` by ``multipliers`` ``[N, T]``, then restore each row's mean.

    Rows whose multipliers are all 1.0 are returned unchanged (bit for bit).
    """
    import torch

    if bool(torch.all(multipliers == 1.0)):
        return z
    original_mean = z.float().mean(dim=(1, 2), keepdim=True)
    weighted = z.float() * multipliers.to(device=z.device, dtype=torch.float32).unsqueeze(-1)
    if restore_mean:
        new_mean = weighted.mean(dim=(1, 2), keepdim=True)
        # a zero mean (all weights 0) cannot be rescaled; leave such rows as weighted
        ratio = torch.where(new_mean != 0, original_mean / torch.where(new_mean != 0, new_mean, 1.0), 1.0)
        weighted = weighted * ratio
    return weighted.to(z.dtype)


def _encoders(bundle: ModelBundle) -> list[tuple[Any, Any]]:
    return list(zip(bundle.text_encoders, bundle.tokenizers, strict=True))


def _pad_chunks(tokens: TokenChunks, count: int, tokenizer: Any) -> TokenChunks:
    """Append empty-prompt chunks until there are ``count`` (cond/uncond and batch items must match)."""
    if len(tokens) >= count:
        return tokens
    empty = tokenize_weighted(tokenizer, [Chunk("", 1.0)])
    missing = count - len(tokens)
    return TokenChunks(tokens.ids + empty.ids * missing, tokens.multipliers + empty.multipliers * missing)


def encode_weighted_prompts(
    bundle: ModelBundle,
    prompts: list[str],
    *,
    clip_skip: int = 1,
    emphasis: bool = True,
    min_chunks: int = 1,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> Conditioning:
    """Encode prompts (already stripped of ``<network:...>`` tags) into conditioning.

    Every prompt is padded with empty chunks to the longest one (and to ``min_chunks``) so the
    batch stacks. ``emphasis=False`` treats brackets as plain text weights of 1.0 (they are still
    removed from the text).
    """
    import torch

    from ..models.token_embeddings import replace_output_rows

    if clip_skip < 1:
        raise ConfigError(f"clip skip must be 1 or more (1 = last layer), got {clip_skip}")
    parsed = [parse_emphasis(prompt) for prompt in prompts]
    if not emphasis:
        parsed = [[Chunk(c.text, 1.0) if not is_break(c) else c for c in chunks] for chunks in parsed]
    encoders = _encoders(bundle)
    per_encoder = [
        [tokenize_weighted(tok, chunks, comma_backtrack=comma_backtrack) for chunks in parsed] for _, tok in encoders
    ]
    count = max([min_chunks] + [len(t) for tokens in per_encoder for t in tokens])
    device = bundle.device
    outputs: list[torch.Tensor] = []
    pooled_out: torch.Tensor | None = None
    sdxl = bundle.is_sdxl
    with torch.no_grad():
        for (encoder, tokenizer), tokens in zip(encoders, per_encoder, strict=True):
            padded = [_pad_chunks(t, count, tokenizer) for t in tokens]
            # each encoder where it lives (a trainer may keep a frozen one elsewhere); results go to the UNet
            where = next(encoder.parameters()).device
            ids = torch.tensor([row for t in padded for row in t.ids], dtype=torch.long, device=where)
            mults = torch.tensor([row for t in padded for row in t.multipliers], dtype=torch.float32, device=where)
            z, pooled = encode_hidden(encoder, ids, layer=clip_skip + 1 if sdxl else clip_skip, final_norm=not sdxl)
            z = replace_output_rows(encoder, ids, z)  # output embeddings: at the layer read, before emphasis
            z = apply_emphasis(z, mults)
            batch = len(prompts)
            z = z.reshape(batch, count * z.shape[1], z.shape[2])
            outputs.append(z.to(device))
            if pooled is not None:
                pooled_out = pooled.reshape(batch, count, -1)[:, 0].to(device)
    embeds = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
    return Conditioning(embeds=embeds, pooled=pooled_out if sdxl else None)


def chunk_count(bundle: ModelBundle, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK) -> int:
    """How many 77-token chunks ``prompt`` needs (the most over the bundle's tokenizers)."""
    chunks = parse_emphasis(prompt)
    return max(len(tokenize_weighted(tok, chunks, comma_backtrack=comma_backtrack)) for tok in bundle.tokenizers)


def encode_cond_uncond(
    bundle: ModelBundle,
    prompts: list[str],
    negative_prompts: list[str],
    *,
    clip_skip: int = 1,
    emphasis: bool = True,
) -> tuple[Conditioning, Conditioning]:
    """Encode prompts and negatives padded to the same number of chunks (the pipeline needs equal shapes)."""
    if len(prompts) != len(negative_prompts):
        raise ConfigError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
    count = max(chunk_count(bundle, p) for p in [*prompts, *negative_prompts])
    cond = encode_weighted_prompts(bundle, prompts, clip_skip=clip_skip, emphasis=emphasis, min_chunks=count)
    uncond = encode_weighted_prompts(bundle, negative_prompts, clip_skip=clip_skip, emphasis=emphasis, min_chunks=count)
    return cond, uncond


__all__ = [
    "CHUNK_TOKENS",
    "TOKEN_GROUPS_ATTR",
    "Conditioning",
    "TokenChunks",
    "add_token_group",
    "apply_emphasis",
    "chunk_count",
    "encode_cond_uncond",
    "encode_hidden",
    "encode_weighted_prompts",
    "remove_token_group",
    "token_groups",
    "tokenize_weighted",
]
