"""The one in-memory form of a textual-inversion embedding, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: key of the single tensor of SD1/SD2 embeddings (A1111 ``string_to_param['*']``)
SINGLE = "*"
#: keys of SDXL embeddings: CLIP-L (text encoder 1) and OpenCLIP-bigG (text encoder 2)
CLIP_L = "clip_l"
CLIP_G = "clip_g"


#: the family an embedding of one text-encoder width was made for (SDXL ones have clip_l + clip_g)
_FAMILY_BY_WIDTH = {768: "SD1", 1024: "SD2"}


@dataclass
class Embedding:
    """A TI embedding: ``vectors`` maps an encoder key to a ``[n, D]`` tensor.

    SD1/SD2 embeddings have the single key ``"*"``; SDXL ones ``"clip_l"`` and ``"clip_g"``
    (the refiner uses only ``"clip_g"``). ``name`` is the word typed in prompts (the file stem,
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

    def __post_init__(self) -> None:
        for key, tensor in list(self.vectors.items()):
            if tensor.dim() == 1:
                self.vectors[key] = tensor.unsqueeze(0)
            elif tensor.dim() != 2:
                where = self.source or self.name
                raise ValueError(f"embedding {where}: tensor {key!r} has shape {tuple(tensor.shape)}, want [n, D]")

    @property
    def is_sdxl(self) -> bool:
        return CLIP_L in self.vectors or CLIP_G in self.vectors

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

    def describe(self) -> str:
        """``4 vectors of width 768 (SD1)`` or ``clip_l: 4 vectors of width 768, clip_g: ... (SDXL)``."""
        parts = []
        for key, tensor in self.vectors.items():
            count, width = int(tensor.shape[0]), int(tensor.shape[1])
            text = f"{count} vector{'s' if count != 1 else ''} of width {width}"
            parts.append(text if key == SINGLE else f"{key}: {text}")
        family = "SDXL" if self.is_sdxl else _FAMILY_BY_WIDTH.get(next(iter(self.widths.values()), 0))
        return ", ".join(parts) + (f" ({family})" if family else "")
