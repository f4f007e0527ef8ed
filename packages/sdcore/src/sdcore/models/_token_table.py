"""The torch half of :mod:`sdcore.models.token_embeddings` (kept apart so that module imports without torch):
the input-embedding lookup with extra rows for new token ids, and putting it in front of a text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import NetworkMismatchError


class ExtendedTokenEmbedding(nn.Embedding):
    """An input-embedding lookup with extra rows for placeholder ids at or past ``num_embeddings``.

    It shares the original module's ``weight`` Parameter, so the text encoder's ``state_dict``
    keys and values are unchanged while extra rows are active (a model saved meanwhile is the
    plain model). The tables (one per key: an embedding, a method's new tokens) are kept outside
    the module's parameters on purpose: whoever added a table owns it (and trains it).
    """

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        self.weight = base.weight
        object.__setattr__(self, "original", base)  # not a submodule: no extra state_dict keys
        self._tables: dict[str, tuple[list[int], torch.Tensor]] = {}
        #: (module, its eos_token_id) changed by :func:`pool_at_eos`, put back on release
        self.restore_eos: list[tuple[Any, int]] = []

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(
            input_ids,
            self.weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def add_table(self, key: str, ids: Sequence[int], vectors: torch.Tensor) -> None:
        if key in self._tables:
            raise NetworkMismatchError(f"embedding {key!r} is already active in this text encoder")
        if vectors.shape != (len(ids), self.embedding_dim):
            raise NetworkMismatchError(
                f"embedding {key!r}: vectors {tuple(vectors.shape)} do not fit {len(ids)} tokens of width {self.embedding_dim}"
            )
        self._tables[key] = (list(ids), vectors)

    def remove_table(self, key: str) -> None:
        self._tables.pop(key, None)

    @property
    def empty(self) -> bool:
        return not self._tables

    def table_items(self) -> list[tuple[str, list[int], torch.Tensor]]:
        """The active tables as ``(key, ids, vectors)``, by key (what a text cache's store digest hashes)."""
        return [(key, list(ids), vectors) for key, (ids, vectors) in sorted(self._tables.items())]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the tables for their ids, the original rows for every other id.

        Table ids are usually past the matrix (CLIP: the tokenizer is as long as the matrix), but T5's
        matrix has spare rows (32128 rows for 32100 tokens), so an id added to its tokenizer can lie
        inside the matrix: any id a table holds is looked up in the table.
        """
        vocab = self.num_embeddings
        if not self._tables:
            return self._lookup(input_ids)
        ids = [i for ids, _ in self._tables.values() for i in ids]
        id_tensor = torch.tensor(ids, device=input_ids.device)
        extra = torch.isin(input_ids, id_tensor)
        stray = (input_ids >= vocab) & ~extra
        if bool(stray.any()):
            bad = int(input_ids[stray][0])
            raise NetworkMismatchError(f"token id {bad} is past the vocabulary and belongs to no active embedding")
        if not bool(extra.any()):
            return self._lookup(input_ids)
        out = self._lookup(torch.where(extra, torch.zeros_like(input_ids), input_ids))
        rows = torch.cat([t for _, t in self._tables.values()]).to(device=out.device, dtype=out.dtype)
        low = min(ids)
        index = torch.full((max(ids) - low + 1,), -1, dtype=torch.long, device=input_ids.device)
        index[id_tensor - low] = torch.arange(len(ids), device=input_ids.device)
        row = index[(input_ids - low).clamp(min=0, max=len(index) - 1)]
        return torch.where(extra.unsqueeze(-1), rows[row.clamp(min=0)], out)


#: the ``eos_token_id`` of CLIP configs written before transformers PR #24773 (OpenAI's CLIP-L
#: config, which SDXL, SD3 and Flux folders ship): transformers then pools at the *largest* id
LEGACY_EOS = 2


def pool_at_eos(text_encoder: Any, tokenizer: Any) -> list[tuple[Any, int]]:
    """Make a legacy-config CLIP pool at its end-of-text token while new tokens are active.

    With ``eos_token_id == 2`` transformers takes the pooled output at ``argmax(input_ids)``: the
    highest id, which is EOS (49407) for plain prompts but a new token (>= 49408) once one is in
    the prompt, so the pooled vector would stop at that word (diffusers has the same
    flaw; transformers' comment says such a model "can't work correctly with extra new tokens").
    Pooling at the first EOS instead is the same position for every plain prompt and the right one
    with new tokens; this matters most for Flux, whose only CLIP input is the pooled vector.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int) or eos == LEGACY_EOS:
        return []
    changed = []
    for module in text_encoder.modules():
        if getattr(module, "eos_token_id", None) == LEGACY_EOS and not isinstance(module, ExtendedTokenEmbedding):
            changed.append((module, LEGACY_EOS))
            module.eos_token_id = eos
    return changed


def extend_input_embeddings(text_encoder: Any, tokenizer: Any = None) -> ExtendedTokenEmbedding:
    """The text encoder's :class:`ExtendedTokenEmbedding`, installed in front of its input embeddings
    (with :func:`pool_at_eos` for ``tokenizer``) when it has none yet; several users share one."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, ExtendedTokenEmbedding):
        return current
    wrapper = ExtendedTokenEmbedding(current)
    text_encoder.set_input_embeddings(wrapper)
    wrapper.restore_eos = pool_at_eos(text_encoder, tokenizer)
    return wrapper


def release_input_embeddings(text_encoder: Any) -> None:
    """Put the original input embeddings (and pooling) back once the last table is gone."""
    current = text_encoder.get_input_embeddings()
    if isinstance(current, ExtendedTokenEmbedding) and current.empty:
        text_encoder.set_input_embeddings(current.original)
        for module, value in current.restore_eos:
            module.eos_token_id = value
