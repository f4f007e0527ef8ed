"""New tokens with their own embedding rows, for any method that teaches the text encoder a word.

Textual inversion, DreamArtist, Custom Diffusion's ``<new1>`` and "pivotal tuning" LoRAs all add tokens to a
model's tokenizers and give them vectors. This module does it once, for all of them:

- the tokens are added to the tokenizers (:func:`add_tokens`); their ids lie past the tokenizer's own (past
  CLIP's matrix, or in T5-XXL's spare rows, 32100-32127);
- an :class:`ExtendedTokenEmbedding` is put in front of each text encoder's input embeddings: it answers those
  ids from small tables (one per key) and every other id from the untouched original rows. The original
  matrix is never resized or copied, so removing the tokens restores the model bit for bit, and in training
  only the small tables receive gradients;
- the tokens are declared one token group (:func:`sdcore.generate.conditioning.add_token_group`), so the
  prompt chunker keeps them in one 75-token chunk;
- output rows (OneTrainer's "output embeddings"): vectors that replace the text encoder's *output* at the tokens'
  positions, kept on the encoder (:func:`add_output_rows`) and put in by every prompt encoding
  (:func:`replace_output_rows`, after the layer the family reads: clip skip, final layer norm);
- :meth:`TokenRows.remove` undoes all of it (tokens, groups, tables, output rows; the original input embeddings
  come back when the last table goes).

A method calls :func:`add_token_rows` in ``prepare`` and trains ``rows.parameters()``; it declares
``Capabilities(trains_text_encoder=True)`` so captions are encoded every step. Importing this module does not
import torch (the lookup module lives in :mod:`sdcore.models._token_table`, loaded on first use).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NetworkMismatchError

if TYPE_CHECKING:
    import torch

    from ._token_table import (
        LEGACY_EOS,
        ExtendedTokenEmbedding,
        extend_input_embeddings,
        pool_at_eos,
        release_input_embeddings,
    )
    from .bundle import ModelBundle

_LAZY = ("LEGACY_EOS", "ExtendedTokenEmbedding", "extend_input_embeddings", "pool_at_eos", "release_input_embeddings")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import _token_table

        return getattr(_token_table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- output rows (OneTrainer's output embeddings) ----------------------------------------------------
#: the text-encoder attribute holding its output rows: ``{token id: [width] float32 tensor}``
OUTPUT_ROWS_ATTR = "sdcore_output_rows"


def output_rows(encoder: Any) -> dict[int, torch.Tensor]:
    """The output rows declared on ``encoder`` (:func:`add_output_rows`); empty when there are none."""
    rows = getattr(encoder, OUTPUT_ROWS_ATTR, None)
    return rows if isinstance(rows, dict) else {}


def add_output_rows(encoder: Any, ids: Sequence[int], vectors: torch.Tensor) -> None:
    """Declare that wherever token ``ids[i]`` stands in a prompt, ``encoder``'s output there is ``vectors[i]``
    (OneTrainer's output embedding, ``BaseModel._apply_output_embeddings``: the hidden states at the placeholder
    tokens' positions are replaced after the text encoder has run; the tokens' input rows are zeros there)."""
    import torch

    if int(vectors.shape[0]) != len(ids):
        raise NetworkMismatchError(f"{int(vectors.shape[0])} output vectors for {len(ids)} tokens")
    rows = dict(output_rows(encoder))
    for index, token in enumerate(ids):
        rows[int(token)] = vectors[index].detach().to(device="cpu", dtype=torch.float32).clone()
    setattr(encoder, OUTPUT_ROWS_ATTR, rows)


def remove_output_rows(encoder: Any, ids: Iterable[int]) -> None:
    """Undo :func:`add_output_rows` (the attribute goes when the last row does)."""
    rows = {key: value for key, value in output_rows(encoder).items() if key not in {int(i) for i in ids}}
    if rows:
        setattr(encoder, OUTPUT_ROWS_ATTR, rows)
    elif hasattr(encoder, OUTPUT_ROWS_ATTR):
        delattr(encoder, OUTPUT_ROWS_ATTR)


def replace_output_rows(encoder: Any, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[N, T, D]`` (``encoder``'s output for token ids ``ids`` ``[N, T]``, at the layer the family
    reads) with each declared output row put in at every position of its token: ``out[n, t] = row[ids[n, t]]``
    where ``ids[n, t]`` has one, ``hidden[n, t]`` elsewhere (in ``hidden``'s dtype). ``hidden`` itself when the
    encoder has no output rows, so an encoding without output embeddings is untouched bit for bit."""
    rows = output_rows(encoder)
    if not rows:
        return hidden
    ids = ids.to(hidden.device)
    present = [token for token in rows if bool((ids == token).any())]
    if not present:
        return hidden
    out = hidden.clone()
    for token in present:
        out[ids == token] = rows[token].to(device=hidden.device, dtype=hidden.dtype)
    return out


# --- tokenizer bookkeeping -------------------------------------------------------------------------
#: what stands in for a removed token whose id lies below an active one (:func:`remove_tokens`): an added token
#: no prompt can spell (sdcore's prompt, caption and style readers refuse NUL characters), so the removed word is
#: text again while the ids above it stay where their rows are
_FREE_PREFIX = "\x00sdcore-free-"


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind a fast (Rust-backed) tokenizer, or None for a pure-Python one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if backend is not None and hasattr(backend, "get_added_tokens_decoder") else None


def has_token(tokenizer: Any, token: str) -> bool:
    """Whether ``token`` is one token of ``tokenizer``'s vocabulary (its own words or an added token).

    A fast tokenizer is asked for the one word (``token_to_id``: the added vocabulary, then the model);
    ``get_vocab()`` would build a dict of every word (49,408 for CLIP, about 25-70 ms) per question."""
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.token_to_id(token) is not None
    return token in tokenizer.get_vocab()


def add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and return their ids; NetworkMismatchError when one is already there."""
    existing = [t for t in tokens if has_token(tokenizer, t)]
    if existing:
        raise NetworkMismatchError(f"placeholder token {existing[0]!r} already exists in the tokenizer")
    tokenizer.add_tokens(tokens)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


def _rebuilt_backend(backend: Any, keep: list[tuple[int, Any]]) -> Any:
    """A ``tokenizers.Tokenizer`` with ``backend``'s pipeline and only the added tokens ``keep`` (id, AddedToken).

    ``tokenizers`` has no call that removes an added token. Its own way back, the JSON round trip
    (``Tokenizer.from_str(to_str())``), re-parses the whole vocabulary and merges (about 0.3 s for CLIP).
    The model, normalizer, pre-tokenizer, post-processor and decoder are immutable here (nothing in
    sdcore changes them), so the new tokenizer shares them with the old one and only the added vocabulary is
    built again, by the same calls the JSON loader makes (special ones with ``add_special_tokens``, in id
    order), which gives every token the id and flags (special, normalized, lstrip, rstrip, single_word) it had.
    """
    from tokenizers import Tokenizer

    fresh = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(fresh, part, value)
    if backend.truncation is not None:
        fresh.enable_truncation(**backend.truncation)
    if backend.padding is not None:
        fresh.enable_padding(**backend.padding)
    fresh.encode_special_tokens = backend.encode_special_tokens
    for _, token in sorted(keep, key=lambda item: item[0]):
        if token.special:
            fresh.add_special_tokens([token])
        else:
            fresh.add_tokens([token])
    return fresh


def _install_backend(tokenizer: Any, old: Any, fresh: Any) -> None:
    """Put ``fresh`` behind ``tokenizer`` with what the wrapper had set on ``old`` itself: transformers'
    CLIPTokenizer replaces the backend's ``decode`` by a closure over that backend (it turns ``</w>`` into
    spaces), which is made again for ``fresh``; any other attribute is carried over as it is."""
    extra = dict(getattr(old, "__dict__", {}))
    rewrap = "decode" in extra and callable(getattr(tokenizer, "_wrap_decode_method_backend_tokenizer", None))
    if rewrap:
        del extra["decode"]
    for name, value in extra.items():
        setattr(fresh, name, value)
    tokenizer._tokenizer = fresh
    if rewrap:
        tokenizer._wrap_decode_method_backend_tokenizer()


def remove_tokens(tokenizer: Any, tokens: Iterable[str]) -> None:
    """Remove added tokens again (without renumbering the others).

    A fast tokenizer gets a new backend that shares the old one's model and pipeline and holds the
    remaining added tokens (:func:`_rebuilt_backend`: well under a millisecond instead of a JSON round trip).
    ``tokenizers`` numbers added tokens one after another, so a token removed from below others still active
    (``A`` removed while a later ``B`` is added) cannot simply go: ``B`` would be renumbered and cut off from its
    rows. Its id is kept by a stand-in token no prompt can spell (a NUL character), so ``A``'s word is plain text
    at once; the stand-ins go when the tokens above them do, and ``len(tokenizer)`` is back to the start. Removing
    in reverse order of adding (what every caller here does) needs no stand-in.
    """
    drop = set(tokens)
    backend = _backend(tokenizer)
    if backend is not None:
        from tokenizers import AddedToken

        added = sorted(backend.get_added_tokens_decoder().items(), key=lambda item: item[0])
        base = backend.get_vocab_size(with_added_tokens=False)  # the tokenizer's own words are never removed
        if not any(i >= base and token.content in drop for i, token in added):
            return
        keep = [
            (i, AddedToken(f"{_FREE_PREFIX}{i}\x00", special=True, normalized=False))
            if i >= base and token.content in drop
            else (i, token)
            for i, token in added
        ]
        while keep and keep[-1][0] >= base and keep[-1][1].content.startswith(_FREE_PREFIX):
            keep.pop()
        fresh = _rebuilt_backend(backend, keep)
        # every remaining token keeps its id (true by construction; checked because a renumbered token would
        # silently read another token's row): otherwise (an unusual tokenizer file) the old backend stays
        if all(fresh.token_to_id(token.content) == i for i, token in keep):
            _install_backend(tokenizer, backend, fresh)
        return
    # slow (pure Python) tokenizers
    for token in drop:
        token_id = tokenizer._added_tokens_encoder.pop(token, None)
        if token_id is not None:
            tokenizer._added_tokens_decoder.pop(token_id, None)
    if hasattr(tokenizer, "_update_trie"):
        tokenizer._update_trie()


def has_placeholder(prompt: str, placeholder: str) -> bool:
    """Whether :func:`replace_placeholder` changes ``prompt``: the one rule a dataset check uses to say which
    captions an embedding trains on (plain text, case-sensitive, anywhere)."""
    return bool(placeholder) and placeholder in prompt


def replace_placeholder(prompt: str, placeholder: str, tokens: Sequence[str]) -> str:
    """Every occurrence of ``placeholder`` (plain text, case-sensitive, anywhere: OneTrainer's ``str.replace`` of
    an embedding's placeholder in captions and sample prompts) replaced by ``tokens``, with a space where a word
    character touches them so the tokenizer sees them apart."""
    if not has_placeholder(prompt, placeholder):
        return prompt
    joined = " ".join(tokens)
    pieces = prompt.split(placeholder)
    out = pieces[0]
    for piece in pieces[1:]:
        left = " " if out and (out[-1].isalnum() or out[-1] == "_") else ""
        right = " " if piece and (piece[0].isalnum() or piece[0] == "_") else ""
        out += left + joined + right + piece
    return out


def init_rows(encoder: Any, tokenizer: Any, init_text: str, count: int, *, cut: bool) -> torch.Tensor:
    """A1111's starting vectors of a new embedding in one text encoder: the init text's raw token-embedding rows
    spread over ``count`` vectors, ``vec[i] = rows[i * L // count]`` (repeated when L < count, sampled when
    L > count); zeros for an empty init text. ``cut`` first keeps ``count`` tokens (A1111 tokenizes SD1's encoder
    and every CLIP-L with ``max_length=count``; its OpenCLIP path does not cut). On a shapes-only (meta) encoder,
    for the pre-flight's plan, an empty meta tensor of the shape."""
    import torch

    table = encoder.get_input_embeddings()
    weight = table.weight.detach()
    if weight.is_meta:
        return torch.empty(count, weight.shape[1], dtype=torch.float32, device="meta")
    ids = tokenizer(init_text, add_special_tokens=False).input_ids if init_text.strip() else []
    ids = [i for i in ids if i < int(table.num_embeddings)]
    if cut:
        ids = ids[:count]
    vectors = torch.zeros(count, weight.shape[1], dtype=torch.float32)
    if ids:
        rows = weight[torch.tensor(ids, device=weight.device)].float().cpu()
        for i in range(count):
            vectors[i] = rows[i * len(ids) // count]
    return vectors


# --- a bundle's tokenizers and text encoders --------------------------------------------------------
@dataclass
class TokenRows:
    """New tokens active in a bundle (:func:`add_token_rows`); :meth:`remove` undoes it exactly.

    ``tables`` and ``ids`` are by text-encoder index (``bundle.text_encoders``): the ``[n, width]`` rows that
    encoder reads for the tokens and the tokens' ids in its tokenizer.
    """

    bundle: Any
    key: str
    tokens: list[str]
    tables: dict[int, torch.Tensor] = field(default_factory=dict)
    ids: dict[int, list[int]] = field(default_factory=dict)
    #: (tokenizer, the tokens' ids) declared as a token group, undone by :meth:`remove`
    groups: list[tuple[Any, list[int]]] = field(default_factory=list)
    #: the tokenizers the tokens were added to (each once, though two encoders may share one)
    tokenizers: list[Any] = field(default_factory=list)
    #: (text encoder, the tokens' ids) given output rows (:func:`add_output_rows`), undone by :meth:`remove`
    outputs: list[tuple[Any, list[int]]] = field(default_factory=list)
    removed: bool = False

    def parameters(self) -> list[torch.Tensor]:
        """The tables in text-encoder order (leaf Parameters when added ``trainable``)."""
        return [self.tables[i] for i in sorted(self.tables)]

    def remove(self) -> None:
        from ..generate.conditioning import remove_token_group
        from ._token_table import ExtendedTokenEmbedding, release_input_embeddings

        if self.removed:
            return
        self.removed = True
        for index, encoder in enumerate(self.bundle.text_encoders):
            current = encoder.get_input_embeddings()
            if index in self.tables and isinstance(current, ExtendedTokenEmbedding):
                current.remove_table(self.key)
            release_input_embeddings(encoder)  # every one: a failed add may have left an empty lookup
        for encoder, ids in self.outputs:
            remove_output_rows(encoder, ids)
        for tokenizer, ids in self.groups:
            remove_token_group(tokenizer, ids)
        for tokenizer in self.tokenizers:
            remove_tokens(tokenizer, self.tokens)


def add_token_rows(
    bundle: ModelBundle,
    key: str,
    tokens: Sequence[str],
    rows: Sequence[torch.Tensor | None],
    *,
    trainable: bool = False,
    outputs: Sequence[torch.Tensor | None] | None = None,
) -> TokenRows:
    """Add ``tokens`` to ``bundle`` with the vectors ``rows`` (one entry per text encoder, in
    ``bundle.text_encoders`` order: ``[len(tokens), width]``, or ``None`` for an encoder whose tokenizer should
    read the words as text, e.g. T5 when only CLIP vectors exist).

    ``key`` names the table in each encoder (an embedding's name; two active tables may not share one). The
    tables are float32 copies of ``rows``; with ``trainable`` they are leaf ``nn.Parameter`` s on the
    encoder's device, for an optimizer. A tokenizer shared by two encoders gets the tokens once. All or nothing:
    on error, whatever was added is removed again (NetworkMismatchError for a token the tokenizer already has
    or rows of the wrong shape).

    ``outputs`` (one entry per text encoder, like ``rows``; ``None`` where there are none): output rows
    (:func:`add_output_rows`) for the tokens, OneTrainer's output embedding; its ``rows`` entry is then zeros.
    """
    import torch

    from ..generate.conditioning import add_token_group
    from ._token_table import extend_input_embeddings

    tokens = list(tokens)
    if len(rows) != len(bundle.text_encoders):
        raise NetworkMismatchError(
            f"{key!r}: {len(rows)} row tables for a model with {len(bundle.text_encoders)} text encoders"
        )
    added = TokenRows(bundle=bundle, key=key, tokens=tokens)
    ids_per_tokenizer: dict[int, list[int]] = {}
    try:
        for index, (encoder, tokenizer, source) in enumerate(
            zip(bundle.text_encoders, bundle.tokenizers, rows, strict=True)
        ):
            if source is None:
                continue
            if id(tokenizer) not in ids_per_tokenizer:
                # new tokens get ids past the tokenizer's own: rows its words never use (past
                # CLIP's matrix, or T5's spare rows), which the table then answers for
                ids_per_tokenizer[id(tokenizer)] = add_tokens(tokenizer, tokens)
                added.tokenizers.append(tokenizer)
                # the prompt chunker keeps the vectors in one 75-token chunk, as A1111 does
                add_token_group(tokenizer, ids_per_tokenizer[id(tokenizer)])
                added.groups.append((tokenizer, ids_per_tokenizer[id(tokenizer)]))
            ids = ids_per_tokenizer[id(tokenizer)]
            table = source.detach().to(dtype=torch.float32).clone()
            if trainable:
                table = torch.nn.Parameter(table.to(encoder.get_input_embeddings().weight.device))
            extend_input_embeddings(encoder, tokenizer).add_table(key, ids, table)
            added.tables[index] = table
            added.ids[index] = ids
            output = outputs[index] if outputs is not None else None
            if output is not None:
                add_output_rows(encoder, ids, output)
                added.outputs.append((encoder, ids))
    except BaseException:
        added.remove()
        raise
    return added


__all__ = [
    "LEGACY_EOS",
    "OUTPUT_ROWS_ATTR",
    "ExtendedTokenEmbedding",
    "TokenRows",
    "add_output_rows",
    "add_token_rows",
    "add_tokens",
    "extend_input_embeddings",
    "has_token",
    "init_rows",
    "output_rows",
    "pool_at_eos",
    "release_input_embeddings",
    "remove_output_rows",
    "remove_tokens",
    "replace_output_rows",
    "replace_placeholder",
]
