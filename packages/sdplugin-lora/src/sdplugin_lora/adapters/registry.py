"""Which variant a file module's tensors are, and which adapter class holds each variant (files) or
trains each ``--algo`` (training)."""

from __future__ import annotations

from torch import nn

from ..algos import ALGOS
from .adapter import Adapter
from .boft import BoftAdapter, BoftVariant
from .diag_oft import DiagOftAdapter, DiagOftVariant
from .dylora import DyLoraAdapter
from .full import FullAdapter, FullVariant
from .glora import GloraAdapter, GloraVariant
from .ia3 import Ia3Adapter, Ia3Variant
from .loha import LohaAdapter, LohaVariant
from .lokr import LokrAdapter, LokrVariant
from .lora import LoraAdapter, LoraVariant
from .lora_fa import LoraFaAdapter
from .maths import Tensors
from .norm import NormAdapter, NormVariant
from .oft import OftAdapter, OftVariant
from .variant import Variant

VARIANTS: tuple[type[Variant], ...] = (
    LoraVariant,
    LohaVariant,
    LokrVariant,
    FullVariant,
    BoftVariant,
    DiagOftVariant,
    OftVariant,
    NormVariant,
    Ia3Variant,
    GloraVariant,
)


def variant_of(t: Tensors, key: str | None = None) -> type[Variant] | None:
    """The variant whose tensors ``t`` holds (``None`` when none is complete).

    ``key`` is the module's name in the file, when known: 3-D ``oft_blocks`` under a LyCORIS name
    (``lora_unet_``/``lora_te``...) are diag-oft, under kohya's ``oft_unet_`` kohya OFT, as ComfyUI
    tells them apart (it loads ``lora_`` modules with LyCORIS' maths and no ``oft_unet_`` module).
    Without a name, only ``rescale`` marks diag-oft; the two compute the same change without it."""
    for variant in VARIANTS:
        if variant.matches(t):
            if variant is OftVariant and key is not None and not key.startswith("oft_"):
                variant = DiagOftVariant
            return variant if variant.complete(t) else None
    return None


#: the adapter class of each variant (for files) and of each ``--algo`` (for training)
ADAPTER_OF_VARIANT: dict[type[Variant], type[Adapter]] = {
    LoraVariant: LoraAdapter,
    LohaVariant: LohaAdapter,
    LokrVariant: LokrAdapter,
    FullVariant: FullAdapter,
    OftVariant: OftAdapter,
    NormVariant: NormAdapter,
    DiagOftVariant: DiagOftAdapter,
    BoftVariant: BoftAdapter,
    Ia3Variant: Ia3Adapter,
    GloraVariant: GloraAdapter,
}


TRAINING_ADAPTERS: dict[str, type[Adapter]] = {
    "lora": LoraAdapter,
    "locon": LoraAdapter,
    "dora": LoraAdapter,
    "loha": LohaAdapter,
    "lokr": LokrAdapter,
    "oft": OftAdapter,
    "lora_fa": LoraFaAdapter,
    "dylora": DyLoraAdapter,
    "diag_oft": DiagOftAdapter,
    "boft": BoftAdapter,
    "ia3": Ia3Adapter,
    "glora": GloraAdapter,
    "full": FullAdapter,
}


assert set(TRAINING_ADAPTERS) == set(ALGOS), "algos.ALGOS and the adapter registry must list the same algorithms"


def adapter_from_tensors(
    name: str, base: nn.Module, t: Tensors, *, multiplier: float = 1.0, variant: type[Variant] | None = None
) -> Adapter:
    """The adapter of a file module's tensors on ``base`` (``ValueError`` if no variant fits); ``variant``
    when the caller knows it from the file's key (:func:`variant_of`)."""
    variant = variant or variant_of(t)
    if variant is None:
        raise ValueError(f"{name}: unsupported LoRA module with tensors {sorted(t)}")
    return ADAPTER_OF_VARIANT[variant].from_tensors(name, base, t, multiplier=multiplier)
