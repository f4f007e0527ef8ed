"""T5 text encoder helpers shared by the families that condition on T5-XXL (SD3/3.5, Flux.1).

Why this module exists: SD3 and Flux both use Google's T5 v1.1 XXL *encoder*, and users hold it in
several shapes: a diffusers component folder (``text_encoder_3``/``text_encoder_2`` with
``config.json``), a lone ``.safetensors`` in the transformers layout (``t5xxl_fp16.safetensors``:
``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``, ``encoder.final_layer_norm.weight``;
fp8 copies of it, some with ComfyUI's ``scale_weight`` per tensor), or embedded in an all-in-one
checkpoint under ``text_encoders.t5xxl.transformer.``. All of them are read here, offline, with the
model config inferred from tensor shapes when no ``config.json`` is at hand.

Tests cannot download T5's SentencePiece model, so :func:`tiny_t5_tokenizer` builds a small
Unigram tokenizer in code with T5's special-token layout (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
``</s>`` appended to every sequence) as transformers' ``T5TokenizerFast`` (an alias of ``T5Tokenizer``
in transformers 5, which is the class used here).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError

#: where ComfyUI / SAI all-in-one checkpoints keep T5-XXL (SD3 releases, Flux "full" files)
COMFY_T5_PREFIX = "text_encoders.t5xxl.transformer."
#: other prefixes met in the wild for a lone T5 encoder inside a bigger file
KNOWN_T5_PREFIXES: tuple[str, ...] = (COMFY_T5_PREFIX, "text_encoder_3.", "text_encoder_2.", "t5xxl.", "")
#: the block-0 tensor every T5 encoder has; used to find the prefix
_PROBE = "encoder.block.0.layer.0.SelfAttention.q.weight"
_FINAL_NORM = "encoder.final_layer_norm.weight"

#: google/t5-v1_1-xxl encoder: the T5 both SD3 and Flux.1 use
T5_XXL_CONFIG: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

#: the tokenizer SD3 and Flux ship for T5-XXL (the same SentencePiece model as google/t5-v1_1-xxl)
T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's word-start marker
#: whole words the tiny tokenizer knows, so test prompts give short, distinct sequences
_TINY_WORDS = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting", "portrait", "cat", "dog",
    "red", "blue", "green", "purple", "yellow", "black", "white", "ring", "circle", "square", "triangle", "star",
    "man", "woman", "girl", "boy", "smiling", "sky", "tree", "house", "car", "style", "art", "detailed", "best",
    "quality", "sks", "person", "landscape", "mountain", "sea", "city", "night", "day", "flower", "small", "big",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------- tokenizer


def tiny_t5_vocab() -> list[tuple[str, float]]:
    """The tiny tokenizer's Unigram vocabulary: T5's three specials first, then pieces with log-probs.

    Every printable ASCII character exists both word-initial (``▁x``) and inside a word (``x``), so any
    ASCII prompt tokenizes without ``<unk>``; the listed words score higher and win as single pieces.
    """
    vocab: list[tuple[str, float]] = [(PAD_TOKEN, 0.0), (EOS_TOKEN, 0.0), (UNK_TOKEN, 0.0), (SPACE, -4.0)]
    chars = [c for c in string.printable if not c.isspace()]
    vocab += [(SPACE + c, -9.0) for c in chars]
    vocab += [(c, -10.0) for c in chars]
    vocab += [(SPACE + w, -3.0) for w in _TINY_WORDS]
    return vocab


def tiny_t5_tokenizer(model_max_length: int = 512) -> Any:
    """A ``T5TokenizerFast`` built in code (no hub, no SentencePiece file): ids <pad>=0, </s>=1, <unk>=2."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=tiny_t5_vocab(), extra_ids=0, model_max_length=model_max_length)


def load_t5_tokenizer(path: str | os.PathLike[str] | None = None, *, vocab_size: int | None = None) -> Any:
    """A T5 tokenizer from ``path`` (a tokenizer folder, or a model folder with ``tokenizer_2``/``tokenizer_3``).

    Without a path: the tiny tokenizer when the encoder's ``vocab_size`` is the tiny one, else the
    ``google/t5-v1_1-xxl`` tokenizer if it is already in the Hugging Face cache (never downloaded);
    otherwise a :class:`ModelFormatError` saying which option to give.
    """
    if path is not None:
        folder = Path(path)
        for candidate in (folder, folder / "tokenizer_3", folder / "tokenizer_2"):
            if (candidate / "tokenizer.json").is_file() or (candidate / "spiece.model").is_file():
                return _read_tokenizer(candidate)
        raise ModelFormatError(f"{folder}: no T5 tokenizer here (expected tokenizer.json or spiece.model)")
    if vocab_size is None or vocab_size == len(tiny_t5_vocab()):
        return tiny_t5_tokenizer()
    # transformers quietly returns an empty-vocabulary tokenizer for a name it cannot find, so the
    # cache is asked for the folder first and only a real folder is read.
    from .load import cached_hub_folder

    try:
        return _read_tokenizer(cached_hub_folder(T5_TOKENIZER_REPO))
    except ModelFormatError:
        raise ModelFormatError(
            "no T5 tokenizer: give the folder of one (a model's tokenizer_2/tokenizer_3, or a T5 tokenizer with "
            f"tokenizer.json/spiece.model) with t5_tokenizer=..., or put {T5_TOKENIZER_REPO} in the Hugging Face cache"
        ) from None


def _read_tokenizer(folder: Path) -> Any:
    from transformers import T5Tokenizer

    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        raise ModelFormatError(f"{folder}: no T5 tokenizer here (expected tokenizer.json or spiece.model)")
    try:
        return T5Tokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{folder}: unreadable T5 tokenizer ({exc})") from None


# ----------------------------------------------------------------------------------------------- configs


def tiny_t5_config(**overrides: Any) -> dict[str, Any]:
    """A T5 v1.1 encoder config (gated-GELU, relative attention) with a tiny width and the tiny vocab."""
    config = {
        **T5_XXL_CONFIG,
        "vocab_size": len(tiny_t5_vocab()),
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "dropout_rate": 0.0,
    }
    config.update(overrides)
    return config


def find_t5_prefix(keys: Collection[str]) -> str | None:
    """The prefix under which ``keys`` hold a T5 encoder, or ``None`` when there is none."""
    for prefix in KNOWN_T5_PREFIXES:
        if prefix + _PROBE in keys:
            return prefix
    for key in keys:  # any other wrapper: "<something>.encoder.block.0.layer.0.SelfAttention.q.weight"
        if key.endswith("." + _PROBE):
            return key[: -len(_PROBE)]
    return None


def t5_config_from_shapes(
    keys: Collection[str], shape: Callable[[str], tuple[int, ...]], prefix: str = ""
) -> dict[str, Any]:
    """An encoder config read off the tensor shapes (T5 v1.1 conventions for what weights cannot tell).

    Shapes give the vocabulary, widths, layer count and head count (the relative-attention bias is
    ``[buckets, heads]``); a gated feed-forward (``wi_0``/``wi_1``) means v1.1's gated-GELU, a single
    ``wi`` the original T5's ReLU. ``relative_attention_max_distance`` and the norm epsilon are not in
    the weights and keep T5's values (128, 1e-6).
    """
    embed = prefix + "shared.weight"
    if embed not in keys:
        embed = prefix + "encoder.embed_tokens.weight"
    if embed not in keys or prefix + _PROBE not in keys:
        raise ModelFormatError(f"not a T5 encoder: no {prefix}shared.weight / {prefix}{_PROBE}")
    vocab, d_model = shape(embed)
    layers = 0
    while f"{prefix}encoder.block.{layers}.layer.0.SelfAttention.q.weight" in keys:
        layers += 1
    bias = prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if bias not in keys:
        raise ModelFormatError(f"not a T5 encoder: no {bias}")
    buckets, heads = shape(bias)
    inner = shape(prefix + _PROBE)[0]
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    wi = "wi_0" if gated else "wi"
    d_ff = shape(f"{prefix}encoder.block.0.layer.1.DenseReluDense.{wi}.weight")[0]
    return {
        **T5_XXL_CONFIG,
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
    }


# ----------------------------------------------------------------------------------------------- modules


def create_tiny_t5(*, seed: int = 0, **overrides: Any) -> tuple[Any, Any]:
    """A tiny random ``T5EncoderModel`` and its tokenizer, deterministic per ``seed``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = T5EncoderModel(T5Config(**tiny_t5_config(**overrides)))
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model, tiny_t5_tokenizer()


def empty_t5(config: dict[str, Any]) -> Any:
    """A ``T5EncoderModel`` with parameters on the meta device (filled by :func:`assign_t5`)."""
    from transformers import T5Config, T5EncoderModel

    from .load import config_fields, empty_module

    return empty_module(lambda: T5EncoderModel(T5Config(**config_fields(config))))


def t5_tensors(
    keys: Collection[str], get: Callable[[str], Any], prefix: str = "", *, dtype: Any = None
) -> dict[str, Any]:
    """The encoder's tensors under the module's own keys, from a file's ``keys`` under ``prefix``.

    ``encoder.embed_tokens.weight`` is the same tensor as ``shared.weight`` (tied); files keep either.
    ComfyUI's scaled-fp8 files store ``W / scale`` in float8 with ``<name>.scale_weight``: the weight
    is rebuilt as ``W8.float() * scale``. Tensors are cast to ``dtype``; ``None`` keeps the stored
    dtype (the scaled-fp8 ones come out as fp32).
    """
    import torch

    target = dtype
    out: dict[str, Any] = {}
    for key in keys:
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.endswith((".scale_weight", ".scale_input")) or name in ("scaled_fp8", "spiece_model"):
            continue
        if not (name.startswith("encoder.") or name == "shared.weight"):
            continue  # decoder / lm_head of a full T5 checkpoint
        value = get(key)
        scale_key = key[: -len("weight")] + "scale_weight" if key.endswith(".weight") else None
        if scale_key is not None and scale_key in keys:
            value = value.to(torch.float32) * get(scale_key).to(torch.float32)
        if target is not None and value.is_floating_point() and value.dtype != target:
            value = value.to(target)
        if name == "encoder.embed_tokens.weight":
            out.setdefault("shared.weight", value)
            continue
        out[name] = value
    if "shared.weight" in out:  # the module has both names until tie_weights() makes them one parameter
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def assign_t5(model: Any, tensors: dict[str, Any], path: str | os.PathLike[str], dtype: Any = None) -> Any:
    """Fill a meta-device T5 encoder with ``tensors`` (strict: a missing or extra key is an error)."""
    from .load import _assign

    _assign(model, tensors, "T5 encoder", Path(path), dtype)
    model.encoder.embed_tokens = model.shared  # tied as in from_pretrained: one parameter, two names
    return model


def load_t5_encoder(
    path: str | os.PathLike[str],
    *,
    dtype: Any = None,
    config: dict[str, Any] | str | os.PathLike[str] | None = None,
    prefix: str | None = None,
) -> Any:
    """Read a T5 encoder from a diffusers/transformers folder or a single ``.safetensors``/``.pt`` file.

    A folder may be the component folder itself (``config.json`` + weights) or a pipeline folder with
    ``text_encoder_3``/``text_encoder_2`` holding a T5. A single file may use transformers keys with no
    prefix or any prefix :func:`find_t5_prefix` knows (ComfyUI's ``text_encoders.t5xxl.transformer.``);
    ``prefix`` forces one. ``config`` (dict or folder with ``config.json``) wins over shape inference.
    ``dtype``: fp32 when ``None``, each tensor as stored when ``"auto"``.
    """
    import torch

    from ..dtypes import resolve_dtype

    # None: fp32 as load_model; "auto": each tensor as stored (model info of an fp8 file)
    target = None if dtype == "auto" else (resolve_dtype(dtype) if dtype is not None else torch.float32)
    file = Path(path).expanduser()
    if file.is_dir():
        return _load_t5_folder(file, target or torch.float32)
    if not file.is_file():
        raise ModelFormatError(f"{file}: no such T5 encoder file or folder")
    from .source import CheckpointSource

    source = CheckpointSource(file)
    try:
        found = prefix if prefix is not None else find_t5_prefix(source.keys)
        if found is None:
            raise ModelFormatError(f"{file}: no T5 encoder in this file (no key ending in {_PROBE})")
        if isinstance(config, dict):
            cfg = dict(config)
        elif config is not None:
            cfg = _read_config(Path(config))
        else:
            cfg = t5_config_from_shapes(source.keys, source.shape, found)
        model = empty_t5(cfg)
        tensors = t5_tensors(source.keys, source.get, found, dtype=target)
        assign_t5(model, tensors, file, target)
    finally:
        source.close()
    return model


def _read_config(folder: Path) -> dict[str, Any]:
    file = folder / "config.json" if folder.is_dir() else folder
    try:
        return dict(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{file}: cannot read T5 config ({exc})") from None


def _load_t5_folder(folder: Path, dtype: Any) -> Any:
    from transformers import T5EncoderModel

    candidates = [folder, folder / "text_encoder_3", folder / "text_encoder_2"]
    for candidate in candidates:
        config = candidate / "config.json"
        if config.is_file() and _read_config(candidate).get("model_type") == "t5":
            try:
                from .load import quiet_transformers_loading

                with quiet_transformers_loading():  # no "Loading weights" bar in a command's output
                    model = T5EncoderModel.from_pretrained(str(candidate), local_files_only=True, dtype=dtype)
            except (OSError, ValueError) as exc:
                raise ModelFormatError(f"{candidate}: cannot read T5 encoder ({exc})") from None
            model.eval()
            return model
    raise ModelFormatError(f"{folder}: no T5 encoder folder here (config.json with model_type t5)")


def t5_file_tensors(model: Any, prefix: str = "") -> dict[str, Any]:
    """The encoder's weights under transformers' file keys (``shared.weight``, no tied duplicate),
    with ``prefix`` put in front (``COMFY_T5_PREFIX`` for an all-in-one checkpoint)."""
    return {prefix + key: value for key, value in model.state_dict().items() if key != "encoder.embed_tokens.weight"}


# ----------------------------------------------------------------------------------------------- encoding


def encode_t5(
    encoder: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_length: int,
    attention_mask: bool = False,
    device: Any = None,
) -> tuple[Any, Any]:
    """T5 hidden states of ``prompts`` padded to ``max_length``, as diffusers' SD3/Flux pipelines make them.

    Returns ``(embeds [B, max_length, d_model], mask [B, max_length])``. The pipelines run the encoder
    without a mask (padding tokens attend and are attended to); ``attention_mask=True`` passes the mask
    to the encoder instead, which some trainers offer (kohya's ``--apply_t5_attn_mask``). Output rows declared
    on the encoder (OneTrainer's output embeddings, :func:`sdcore.models.token_embeddings.add_output_rows`) are put
    in at their tokens' positions.
    """
    tokens = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    dev = device if device is not None else next(encoder.parameters()).device
    ids = tokens.input_ids.to(dev)
    mask = tokens.attention_mask.to(dev)
    out = encoder(ids, attention_mask=mask if attention_mask else None, output_hidden_states=False)[0]
    from .token_embeddings import replace_output_rows

    # OneTrainer's output embeddings (SD3, FLUX.1, Chroma) replace T5's output at their tokens' positions
    return replace_output_rows(encoder, ids, out), mask
