"""Aesthetic-gradient personalisation of a prompt's conditioning at generation time.

For each 77-token chunk of the prompt (A1111 extension semantics, arXiv 2209.12330):

1. copy the text tower, then run ``steps`` Adam steps (``lr``) on the copy's weights to raise
   ``unit(project(pooled(chunk))) . target``, where ``target`` is the unit aesthetic embedding or,
   with ``text``, its slerp towards that text's raw CLIP features by ``slerp_angle``;
2. encode the chunk with the tuned copy (honouring clip skip);
3. blend with the chunk's normal conditioning: ``(1 - w) * z + w * zn`` (or the extension's
   slerp, which normalises over the chunk's 77 tokens).

A1111 >= 1.0 encodes a long prompt chunk by chunk and calls the extension once per 77-token
chunk, so tuning, target and slerp are all per chunk here. (From A1111 1.6 the extension's hook
no longer changes the output at all; what is matched is the last A1111 where it worked.)

Which tower is copied: the model's own text encoder when it has exactly the CLIP model's text
architecture (SD1: it *is* OpenAI CLIP ViT-L/14's text tower, and a fine-tuned model keeps its own
weights), else the CLIP model's text tower (SD2: diffusers' OpenCLIP-H encoder stops one layer
short, so its states are the full tower's ``hidden_states[-2]`` through the final LayerNorm). The
projection to the embedding space is always the CLIP model's ``text_projection``, frozen.
The tuned states are cached per (chunk tokens, embedding hash, settings).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from sdcore.errors import NetworkMismatchError

from .create import embedding_hash

if TYPE_CHECKING:
    from sdcore.models.bundle import ModelBundle

CHUNK = 77


@dataclass(frozen=True)
class AestheticSettings:
    """The user's knobs (A1111 extension names and defaults)."""

    weight: float = 0.9
    steps: int = 5
    lr: float = 1e-4
    text: str | None = None
    text_negative: bool = False
    slerp: bool = False
    slerp_angle: float = 0.1

    @property
    def active(self) -> bool:
        return self.weight != 0 and self.steps != 0 and self.lr != 0


def slerp(low: torch.Tensor, high: torch.Tensor, value: float) -> torch.Tensor:
    """Spherical interpolation along dim 1, as the extension computes it.

    For ``[1, D]`` vectors dim 1 is the feature axis. For ``[B, 77, C]`` conditionings it is the
    token axis (one angle per channel), an oddity of the extension kept for identical results.
    """
    low_unit = low / low.norm(dim=1, keepdim=True)
    high_unit = high / high.norm(dim=1, keepdim=True)
    omega = torch.acos((low_unit * high_unit).sum(1).clamp(-1.0, 1.0))
    sin_omega = torch.sin(omega)
    safe = sin_omega.abs() > 1e-6
    sin_omega = torch.where(safe, sin_omega, torch.ones_like(sin_omega))
    low_w = torch.where(safe, torch.sin((1.0 - value) * omega) / sin_omega, torch.full_like(omega, 1.0 - value))
    high_w = torch.where(safe, torch.sin(value * omega) / sin_omega, torch.full_like(omega, value))
    return low_w.unsqueeze(1) * low + high_w.unsqueeze(1) * high


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _config_of(module: Any) -> Any:
    return module.config


def tower_source(bundle: ModelBundle, clip_model: Any) -> tuple[Any, int]:
    """The text tower to copy and how many layers it has beyond the model's encoder (see module doc)."""
    if bundle.is_sdxl:
        raise NetworkMismatchError("aesthetic gradients support SD1 and SD2 models, not SDXL")
    encoder = bundle.text_encoders[0]
    tower = clip_model.text_model
    ours, theirs = _config_of(encoder), _config_of(tower)
    if ours.hidden_size != theirs.hidden_size:
        raise NetworkMismatchError(
            f"the aesthetic CLIP model's text width {theirs.hidden_size} does not match the {bundle.family} "
            f"text encoder's {ours.hidden_size}; use the CLIP model the checkpoint's text encoder comes from"
        )
    own_shapes = {k: v.shape for k, v in encoder.state_dict().items()}
    clip_shapes = {k: v.shape for k, v in tower.state_dict().items()}
    if own_shapes == clip_shapes:
        return encoder, 0
    offset = theirs.num_hidden_layers - ours.num_hidden_layers
    if offset < 0:
        raise NetworkMismatchError(
            f"the aesthetic CLIP model's text tower has {theirs.num_hidden_layers} layers, fewer than the "
            f"text encoder's {ours.num_hidden_layers}"
        )
    return tower, offset


def tower_states(tower: Any, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Token states of ``tower``: ``last_hidden_state`` for layer 1, else ``final_ln(hidden_states[-layer])``."""
    out = tower(input_ids=ids, output_hidden_states=layer != 1, return_dict=True)
    if layer == 1:
        return out.last_hidden_state
    norm = tower.final_layer_norm if hasattr(tower, "final_layer_norm") else tower.text_model.final_layer_norm
    return norm(out.hidden_states[-layer])


class PersonalizationCache:
    """A small LRU of tuned chunk states (a tuned tower serves only the chunk it was tuned on)."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.hits = 0

    def get(self, key: tuple[Any, ...]) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: tuple[Any, ...], value: torch.Tensor) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


_DEFAULT_CACHE = PersonalizationCache()


def aesthetic_target(
    clip_model: Any, tokenizer: Any, embedding: torch.Tensor, settings: AestheticSettings, device: Any
) -> torch.Tensor:
    """The target ``[1, D]`` the tuning steers towards, as the extension computes it.

    Without ``settings.text``: the unit aesthetic embedding ``e``. With it: ``t`` = the text's raw
    (unnormalised) CLIP features, or ``unit(e - t)`` with ``text_negative``; the target is
    ``slerp(e, t, slerp_angle)``, not renormalised (its length scales the loss, as in the extension).
    """
    target = _unit(embedding.detach().float().reshape(1, -1).to(device))
    if settings.text:
        from .create import text_features

        # unpadded, as the extension tokenizes it (truncated to CLIP's 77 where it would fail)
        ids = tokenizer([settings.text], truncation=True, max_length=CHUNK, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            text = text_features(clip_model, ids).float()
        if settings.text_negative:
            text = _unit(target - text)
        target = slerp(target, text, settings.slerp_angle)
    return target


def tune_tower(
    source: Any, projection: Any, ids: torch.Tensor, target: torch.Tensor, steps: int, lr: float
) -> tuple[Any, list[float]]:
    """Copy ``source`` and run ``steps`` Adam steps raising cos(features(ids), target).

    Returns the tuned copy and the cosine similarity before each step and after the last.
    """
    tower = copy.deepcopy(source).float()
    tower.requires_grad_(True)
    projection = projection.float() if next(projection.parameters()).dtype != torch.float32 else projection
    optimizer = torch.optim.Adam([p for p in tower.parameters() if p.requires_grad], lr=lr)
    history: list[float] = []
    with torch.enable_grad():  # generation runs under no_grad; tuning needs gradients
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            features = _unit(projection(tower(input_ids=ids).pooler_output))
            similarity = (features @ target.T).mean()
            history.append(float(similarity.detach()))
            (-similarity).backward()
            optimizer.step()
    with torch.no_grad():
        features = _unit(projection(tower(input_ids=ids).pooler_output))
        history.append(float((features @ target.T).mean()))
    tower.requires_grad_(False)
    return tower, history


def personalized_conditioning(
    bundle: ModelBundle,
    prompt: str,
    clip_model: Any,
    embedding: torch.Tensor,
    weight: float = 0.9,
    steps: int = 5,
    lr: float = 1e-4,
    text: str | None = None,
    slerp: bool = False,
    slerp_angle: float = 0.1,
    *,
    text_negative: bool = False,
    clip_skip: int = 1,
    base: Any = None,
    chunk_ids: Any = None,
    cache: PersonalizationCache | None = None,
) -> Any:
    """``prompt``'s conditioning for ``bundle`` with the aesthetic embedding blended in.

    ``base`` is the normal conditioning when the caller already has it: a
    :class:`sdcore.train.method.Conditioning` (``hidden_states``) or a
    :class:`sdcore.generate.conditioning.Conditioning` (``embeds``), for one prompt of 77-token
    chunks; the result has the same type. Without it the prompt is encoded here as
    ``sdcore generate`` does (emphasis, comma backtrack). ``chunk_ids`` are the ``[chunks, 77]``
    token rows the caller encoded (A1111 tunes on exactly those); by default they are rebuilt from
    ``prompt`` the way ``sdcore generate`` tokenizes. ``weight``, ``steps`` or ``lr`` of 0 returns
    ``base`` unchanged. ``clip_model`` is a transformers ``CLIPModel`` (see
    :func:`sdplugin_aesthetic.create.load_clip`).
    """
    settings = AestheticSettings(weight, steps, lr, text, text_negative, slerp, slerp_angle)
    return personalize(
        bundle,
        prompt,
        clip_model,
        embedding,
        settings,
        clip_skip=clip_skip,
        base=base,
        chunk_ids=chunk_ids,
        cache=cache,
    )


def _hidden_of(conditioning: Any) -> torch.Tensor:
    hidden = getattr(conditioning, "hidden_states", None)
    if hidden is None:
        hidden = getattr(conditioning, "embeds", None)
    if hidden is None:
        raise TypeError(f"not a conditioning (no hidden_states/embeds): {type(conditioning).__name__}")
    return hidden


def _with_hidden(conditioning: Any, hidden: torch.Tensor) -> Any:
    name = "hidden_states" if getattr(conditioning, "hidden_states", None) is not None else "embeds"
    return dataclasses.replace(conditioning, **{name: hidden})


def prompt_chunk_ids(bundle: ModelBundle, prompt: str, chunks: int) -> torch.Tensor:
    """``[chunks, 77]`` token rows of ``prompt`` as ``sdcore generate`` tokenizes it (padded with empty chunks)."""
    tokenizer = bundle.tokenizers[0]
    try:
        from sdcore.generate.conditioning import tokenize_weighted
        from sdcore.generate.prompt_syntax import Chunk, parse_emphasis
    except ImportError:  # generation not installed: plain 75-token chunks
        from sdcore.models.text import chunked_input_ids

        return chunked_input_ids(tokenizer, [prompt], chunks=chunks)[0]
    rows = tokenize_weighted(tokenizer, parse_emphasis(prompt)).ids
    empty = tokenize_weighted(tokenizer, [Chunk("", 1.0)]).ids[0]
    rows = (rows + [empty] * chunks)[:chunks]
    return torch.tensor(rows, dtype=torch.long)


def encode_for_generation(bundle: ModelBundle, prompt: str, clip_skip: int) -> Any:
    """The conditioning ``sdcore generate`` would use for ``prompt`` (falls back to the training encoder)."""
    with torch.no_grad():
        try:
            from sdcore.generate.conditioning import encode_weighted_prompts
        except ImportError:
            from sdcore.models.text import encode_prompts

            return encode_prompts(bundle, [prompt], clip_skip=clip_skip)
        return encode_weighted_prompts(bundle, [prompt], clip_skip=clip_skip)


def personalize(
    bundle: ModelBundle,
    prompt: str,
    clip_model: Any,
    embedding: torch.Tensor,
    settings: AestheticSettings,
    *,
    clip_skip: int = 1,
    base: Any = None,
    chunk_ids: Any = None,
    cache: PersonalizationCache | None = None,
) -> Any:
    """:func:`personalized_conditioning` with the knobs in one :class:`AestheticSettings`."""
    if base is None:
        base = encode_for_generation(bundle, prompt, clip_skip)
    if not settings.active:
        return base
    cache = _DEFAULT_CACHE if cache is None else cache
    source, offset = tower_source(bundle, clip_model)
    projection = clip_model.text_projection
    if embedding.numel() != projection.out_features:
        raise NetworkMismatchError(
            f"the aesthetic embedding has {embedding.numel()} values but the CLIP model projects to {projection.out_features}"
        )
    hidden = _hidden_of(base)
    chunks = hidden.shape[1] // CHUNK
    if hidden.shape[0] != 1 or chunks * CHUNK != hidden.shape[1]:
        raise ValueError(f"base conditioning must be one prompt of 77-token chunks, got {list(hidden.shape)}")
    device = next(source.parameters()).device
    projection = projection.to(device)
    if chunk_ids is None:
        ids = prompt_chunk_ids(bundle, prompt, chunks)
    else:
        ids = torch.as_tensor(chunk_ids, dtype=torch.long).reshape(-1, CHUNK)
        if ids.shape[0] != chunks:
            raise ValueError(f"{ids.shape[0]} token chunks given for a conditioning of {chunks} chunks")
    ids = ids.to(device)
    target = aesthetic_target(clip_model.to(device), bundle.tokenizers[0], embedding, settings, device)
    target_key = embedding_hash(target)
    layer = clip_skip + offset
    tuned_chunks = []
    for chunk_row in ids:
        key = (tuple(chunk_row.tolist()), target_key, settings.steps, settings.lr, layer, id(source), str(device))
        states = cache.get(key)
        if states is None:
            row = chunk_row.unsqueeze(0)
            tower, _ = tune_tower(source, projection, row, target, settings.steps, settings.lr)
            with torch.no_grad():
                states = tower_states(tower, row, layer)[0].detach()
            del tower
            cache.put(key, states)
        tuned_chunks.append(states)
    tuned = torch.cat(tuned_chunks, dim=0).unsqueeze(0).to(hidden)
    w = float(settings.weight)
    with torch.no_grad():
        if settings.slerp:  # per 77-token chunk, as A1111 hands the extension one chunk at a time
            per_chunk = slerp(hidden.reshape(chunks, CHUNK, -1), tuned.reshape(chunks, CHUNK, -1), w)
            blended = per_chunk.reshape(hidden.shape)
        else:
            blended = (1.0 - w) * hidden + w * tuned
    return _with_hidden(base, blended.to(hidden.dtype))


class AestheticPersonalizer:
    """One aesthetic embedding + CLIP model + settings, applied to prompts with a shared cache.

    ``sdcore generate --aesthetic style.pt`` builds one per run and calls it for the prompt's
    conditioning (and, with ``personalize_negative``, the negative prompt's, as the A1111
    extension does; the original paper's code leaves the unconditional prompt alone).
    """

    def __init__(
        self,
        embedding: torch.Tensor,
        clip_model: Any,
        settings: AestheticSettings | None = None,
        *,
        personalize_negative: bool = False,
        cache: PersonalizationCache | None = None,
    ) -> None:
        self.embedding = embedding
        self.clip_model = clip_model
        self.settings = settings or AestheticSettings()
        self.personalize_negative = personalize_negative
        self.cache = cache or PersonalizationCache()

    def __call__(
        self,
        bundle: ModelBundle,
        prompt: str,
        *,
        base: Any = None,
        chunk_ids: Any = None,
        clip_skip: int = 1,
        negative: bool = False,
    ) -> Any:
        settings = self.settings
        if negative and not self.personalize_negative:
            settings = AestheticSettings(weight=0.0)
        return personalize(
            bundle,
            prompt,
            self.clip_model,
            self.embedding,
            settings,
            clip_skip=clip_skip,
            base=base,
            chunk_ids=chunk_ids,
            cache=self.cache,
        )

    def info(self, name: str) -> dict[str, str]:
        """PNG-info fields with the extension's keys."""
        s = self.settings
        fields = {
            "Aesthetic LR": f"{s.lr:g}",
            "Aesthetic weight": f"{s.weight:g}",
            "Aesthetic steps": str(s.steps),
            "Aesthetic embedding": name,
            "Aesthetic slerp": str(s.slerp),
        }
        if s.text:
            fields.update(
                {
                    "Aesthetic text": s.text,
                    "Aesthetic text negative": str(s.text_negative),
                    "Aesthetic slerp angle": f"{s.slerp_angle:g}",
                }
            )
        return fields
