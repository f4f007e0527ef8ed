"""Embeddings carried inside another network's file ("bundled" embeddings, pivotal tuning).

OneTrainer (``bundle_additional_embeddings``, its default) writes the embeddings it trained with a LoRA into the LoRA
file, and A1111 (``extensions-builtin/Lora/networks.py``, 1.7+) reads them when the LoRA is activated by
``<lora:...>``. The keys are ``bundle_emb.<name>.<part>``: ``string_to_param.*`` (A1111's SD1/SD2 layout, older
OneTrainer), ``clip_l`` / ``clip_g`` / ``t5`` (SDXL, SD3, Flux; newer OneTrainer also writes SD1's one tensor as
``clip_l``) and OneTrainer's output embeddings ``<part>_out``. The name is everything between the first two dots
(A1111 splits at the first dot after ``bundle_emb``), so it may hold spaces or angle brackets, never a dot.

This is the one parser of those keys: the LoRA plugin uses it to read a file and to list what it carries; the
textual-inversion plugin turns a :class:`BundledEmbedding` into its own embedding. The generation session hands the
embeddings a tagged handler offers (:attr:`sdcore.generate.networks.Activation.embeddings`) to the handlers that
apply embeddings, so neither plugin needs the other. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

#: the key prefix OneTrainer writes and A1111 reads
PREFIX = "bundle_emb."
#: the part name of SD1/SD2's single tensor (A1111's ``string_to_param['*']``)
SINGLE = "*"
#: the suffix of OneTrainer's output embeddings (vectors it puts in the encoder's output, not its input)
OUTPUT_SUFFIX = "_out"

V = TypeVar("V")

#: the part name of each text-encoder kind of the transformer families (SD3/SD3.5, FLUX.1, Chroma), as OneTrainer's
#: savers write them (``StableDiffusion3LoRASaver``, ``FluxLoRASaver``, ``ChromaLoRASaver``): the one table of the
#: textual-inversion plugin's files and the LoRA plugin's pivotal tuning. The UNet families differ (SD1/SD2's one
#: tensor is ``clip_l`` or ``*`` whatever its encoder), so each plugin keeps its own rule for those.
PART_BY_KIND: dict[str, str] = {"clip-l": "clip_l", "clip-g": "clip_g", "t5-xxl": "t5"}

#: the input parts in text-encoder order (a safetensors file stores its keys sorted: ``clip_g`` before ``clip_l``)
_PART_ORDER = (SINGLE, "clip_l", "clip_g", "t5", "t5xxl")


def split_key(key: str) -> tuple[str, str] | None:
    """``(name, part)`` of a ``bundle_emb.`` key, else ``None``. ``string_to_param.<anything>`` is the single tensor
    ``"*"`` (A1111 reads every ``string_to_param.X``); any other part is kept as written (``clip_l``, ``t5_out``)."""
    if not key.startswith(PREFIX):
        return None
    name, dot, part = key[len(PREFIX) :].partition(".")
    if not dot or not name or not part:
        return None
    if part.split(".", 1)[0] == "string_to_param":
        part = SINGLE
    return name, part


def group_keys(values: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """``{name: {part: value}}`` for the bundle keys of ``values`` (tensors, or shapes when only a header was read),
    in file order; other keys are left out."""
    grouped: dict[str, dict[str, V]] = {}
    for key, value in values.items():
        split = split_key(key)
        if split is not None:
            grouped.setdefault(split[0], {})[split[1]] = value
    return grouped


def is_bundle_key(key: str) -> bool:
    """Whether ``key`` belongs to a bundled embedding (a LoRA loader leaves such keys to the embedding handlers)."""
    return key.startswith(PREFIX)


@dataclass
class BundledEmbedding:
    """One embedding found in a network file.

    ``vectors`` maps an input part (``"*"``, ``"clip_l"``, ``"clip_g"``, ``"t5"``...) to a ``[n, width]`` tensor;
    ``output_vectors`` holds OneTrainer's ``<part>_out`` tensors (A1111 ignores them; the textual-inversion plugin
    applies them as OneTrainer does: :func:`sdcore.models.token_embeddings.add_output_rows`). ``network`` is how the prompt named the network that carries it (``my_lora`` for ``<lora:my_lora>``):
    A1111 writes it in place of a hash in the infotext's ``TI hashes``. ``shapes`` are the tensors' shapes, also
    when only a file header was read (then ``vectors`` is empty)."""

    name: str
    vectors: dict[str, Any] = field(default_factory=dict)
    output_vectors: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    source: Path | None = None
    network: str = ""

    @property
    def parts(self) -> list[str]:
        """The input parts (encoders) it has vectors for, in text-encoder order (unknown parts last, as stored)."""
        parts = [part for part in self.shapes if not part.endswith(OUTPUT_SUFFIX)]
        return sorted(parts, key=lambda part: _PART_ORDER.index(part) if part in _PART_ORDER else len(_PART_ORDER))

    @property
    def num_vectors(self) -> int:
        """How many vectors (tokens) the word stands for: the first input part's rows (A1111 counts ``clip_g``'s
        for SDXL; OneTrainer writes the same count for every part)."""
        for part in self.parts:
            shape = self.shapes[part]
            return int(shape[0]) if len(shape) == 2 else 1
        return 0

    def describe(self) -> str:
        """``"2 vectors (clip_l 768, clip_g 1280)"``: what ``lora info`` and messages say about it."""
        widths = ", ".join(
            f"{'vectors' if part == SINGLE else part} {shape[-1] if shape else '?'}"
            for part, shape in self.shapes.items()
        )
        count = self.num_vectors
        return f"{count} vector{'s' if count != 1 else ''} ({widths})"


def bundled_embeddings(
    values: Mapping[str, Any], *, source: Path | None = None, network: str = ""
) -> list[BundledEmbedding]:
    """The embeddings bundled in ``values`` (a state dict: tensors; or a header: key -> shape tuple), in file order.

    With tensors, ``vectors`` and ``output_vectors`` hold them (a 1-D tensor is one vector); with shapes only,
    ``shapes`` is filled and the vectors stay empty (enough to list names before anything is loaded)."""
    out: list[BundledEmbedding] = []
    for name, parts in group_keys(values).items():
        emb = BundledEmbedding(name=name, source=source, network=network)
        for part, value in parts.items():
            if isinstance(value, tuple):
                emb.shapes[part] = tuple(int(d) for d in value)
                continue
            tensor = value.unsqueeze(0) if value.dim() == 1 else value
            emb.shapes[part] = tuple(int(d) for d in tensor.shape)
            (emb.output_vectors if part.endswith(OUTPUT_SUFFIX) else emb.vectors)[part] = tensor
        out.append(emb)
    return out


def header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the bundle keys in a ``.safetensors`` file's header, without reading a tensor; ``{}`` for
    another kind of file or a header that cannot be read (the loader reports that in its own words)."""
    import json
    import struct

    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                return {}
            header = json.loads(handle.read(size))
    except (OSError, ValueError, struct.error):
        return {}
    if not isinstance(header, dict):
        return {}
    return {
        key: tuple(int(d) for d in value.get("shape", ()))
        for key, value in header.items()
        if key.startswith(PREFIX) and isinstance(value, dict)
    }


__all__ = [
    "OUTPUT_SUFFIX",
    "PART_BY_KIND",
    "PREFIX",
    "SINGLE",
    "BundledEmbedding",
    "bundled_embeddings",
    "group_keys",
    "header_shapes",
    "is_bundle_key",
    "split_key",
]
