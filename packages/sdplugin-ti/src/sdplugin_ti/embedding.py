"""The one in-memory form of a textual-inversion embedding, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdcore.models.bundled_embeddings import SINGLE
from sdcore.models.embedding_files import CLIP_G, CLIP_L, ENCODER_KEYS, T5, T5_ALIAS

if TYPE_CHECKING:
    import torch

# the keys are sdcore's (:mod:`sdcore.models.embedding_files`, the layout every embedding file here is written in):
# ``SINGLE`` ("*") is SD1/SD2's one tensor (A1111's ``string_to_param['*']``), ``clip_l``/``clip_g`` SDXL's encoders,
# ``t5`` the T5-XXL vectors of SD3, FLUX.1 and Chroma (OneTrainer's key; ComfyUI's ``t5xxl``, ``T5_ALIAS``, is read
# as it: :func:`sdcore.models.embedding_files.encoder_part_keys`)


#: the family an embedding of one text-encoder width was made for (SDXL ones have clip_l + clip_g)
_FAMILY_BY_WIDTH = {768: "SD1", 1024: "SD2"}


@dataclass
class Embedding:
    """A TI embedding: ``vectors`` maps an encoder key to a ``[n, D]`` tensor.

    SD1/SD2 embeddings have the single key ``"*"``; SDXL ones ``"clip_l"`` and ``"clip_g"``
    (the refiner uses only ``"clip_g"``); SD3 ones ``"clip_l"``, ``"clip_g"`` and optionally ``"t5"``;
    Flux.1 ones ``"clip_l"`` and optionally ``"t5"``; Chroma ones ``"t5"``. ``name`` is the word typed in prompts (the file stem,
    as A1111 does); the name stored inside the file is kept in ``stored_name``.
    """

    name: str
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    stored_name: str | None = None
    source: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: OneTrainer's output embedding: per encoder key (as ``vectors``), the ``[n, D]`` vectors that replace the text
    #: encoder's output at the word's positions (``emp_params_out``, ``clip_l_out``...); empty for a plain embedding
    output_vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.vectors, self.output_vectors):
            for key, tensor in list(table.items()):
                if tensor.dim() == 1:
                    table[key] = tensor.unsqueeze(0)
                elif tensor.dim() != 2:
                    where = self.source or self.name
                    raise ValueError(f"embedding {where}: tensor {key!r} has shape {tuple(tensor.shape)}, want [n, D]")

    @property
    def is_output(self) -> bool:
        """True for OneTrainer's output embedding (it has output vectors)."""
        return bool(self.output_vectors)

    @property
    def is_sdxl(self) -> bool:
        """True for the per-encoder layout (``clip_l``/``clip_g``/``t5`` keys, SDXL's, SD3/Flux's and Chroma's),
        False for SD1/SD2's single tensor; the name is kept from when SDXL was the only such family."""
        return any(key in self.vectors for key in ENCODER_KEYS)

    @property
    def family_hint(self) -> str | None:
        """The family the file was made for, as far as it tells: sdcore's ``sdcore.family`` header,
        else its keys and widths (an SDXL and an SD3 CLIP pair look alike: same encoders, same widths)."""
        stored = self.metadata.get("sdcore.family")
        if stored:
            return stored
        keys = set(self.vectors)
        if keys == {SINGLE}:
            return _FAMILY_BY_WIDTH.get(next(iter(self.widths.values()), 0))
        if keys == {T5}:
            return "Chroma"  # its one encoder; OneTrainer's ChromaEmbeddingSaver writes t5 alone
        if T5 in keys:
            return "SD3" if CLIP_G in keys else "FLUX.1"
        if keys == {CLIP_L, CLIP_G}:
            return "SDXL or SD3"
        if keys == {CLIP_L}:
            return "FLUX.1"
        return "SDXL" if CLIP_G in keys else None

    @property
    def num_vectors(self) -> int:
        """Vectors per prompt occurrence (A1111 uses ``clip_g``'s count for SDXL)."""
        key = CLIP_G if CLIP_G in self.vectors else next(iter(self.vectors))
        return int(self.vectors[key].shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(t.shape[1]) for key, t in self.vectors.items()}

    def describe_widths(self) -> str:
        return ", ".join(f"{k}={w}" if k != SINGLE else str(w) for k, w in self.widths.items())

    @property
    def output_keys(self) -> list[str]:
        """OneTrainer's file keys of the output vectors (``emp_params_out`` for SD1/SD2's one tensor,
        ``clip_l_out``...), for messages about them."""
        return ["emp_params_out" if key == SINGLE else f"{key}_out" for key in self.output_vectors]

    def describe(self) -> str:
        """``4 vectors of width 768 (SD1)`` or ``clip_l: 4 vectors of width 768, clip_g: ... (SDXL or SD3)``."""
        parts = []
        for key, tensor in self.vectors.items():
            count, width = int(tensor.shape[0]), int(tensor.shape[1])
            text = f"{count} vector{'s' if count != 1 else ''} of width {width}"
            parts.append(text if key == SINGLE else f"{key}: {text}")
        family = self.family_hint
        text = ", ".join(parts) + (f" ({family})" if family else "")
        if self.output_vectors:
            outputs = ", ".join("output" if key == SINGLE else f"{key} output" for key in self.output_vectors)
            text += f"; an output embedding (OneTrainer: {outputs} vectors)"
        return text


__all__ = ["CLIP_G", "CLIP_L", "ENCODER_KEYS", "SINGLE", "T5", "T5_ALIAS", "Embedding"]
