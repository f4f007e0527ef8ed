"""The LoRA family: one variant per algorithm, one hooked module per adapted layer.

A *variant* (:class:`LoraVariant`, :class:`LohaVariant`, :class:`LokrVariant`, :class:`FullVariant`)
is the algorithm itself, written once over a dict of tensors keyed as the files name them
(``lora_down.weight``, ``hada_w1_a``, ``lokr_w2_b``...): which tensors it has, its rank, its
alpha/rank scale and its ``ΔW`` formula. :class:`Dora` is DoRA's weight decomposition, which
LyCORIS allows on top of any of them (``dora_scale``).

An *adapter* (:class:`LoraAdapter`, :class:`LohaAdapter`, :class:`LokrAdapter`,
:class:`FullAdapter`) is one adapted Linear/Conv2d: it holds the variant's tensors as
parameters (so its ``state_dict`` is the file layout), adds its update to the layer's output by
a forward hook, and merges into / unmerges from the layer's weight. Training
(:mod:`sdplugin_lora.network`), applying files (:mod:`sdplugin_lora.apply`, hooked and merged),
reading them (:mod:`sdplugin_lora.format`) and the tools (merge, extract, resize, info) all use
these classes, so training and applying cannot drift apart.

Every formula matches what kohya's sd-scripts, LyCORIS, ComfyUI and A1111 compute (the tests
write their formulas independently and compare numbers); the code is our own.

One module per job, every public name re-exported here (import from ``sdplugin_lora.adapters``):

- the groundwork: :mod:`.maths` (Tucker product, LyCORIS' factorisation), :mod:`.variant` (the
  variant base classes), :mod:`.dora` (DoRA's decomposition), :mod:`.dropout` (the dropouts),
  :mod:`.adapter` (the adapter base class: hook, merge, unmerge), :mod:`.change_cache` (the
  sampling/validation cache of rebuilt changes);
- one module per algorithm, its variant and its adapter together: :mod:`.lora`, :mod:`.lora_fa`,
  :mod:`.dylora`, :mod:`.loha`, :mod:`.lokr`, :mod:`.oft` (kohya OFT), :mod:`.diag_oft`, :mod:`.boft`,
  :mod:`.ia3`, :mod:`.glora`, :mod:`.full`, :mod:`.norm`;
- the modules over a fused SAI/BFL Linear's diffusers parts: :mod:`.members` (their hooks),
  :mod:`.shared_down` (kohya's shared-down LoRA), :mod:`.fused` (LyCORIS LoHa/LoKr);
- :mod:`.registry` (which variant a file module is, which adapter class holds it or trains an
  ``--algo``) and :mod:`.changes` (a file module's dense weight change, for the tools).
"""

from __future__ import annotations

from .adapter import Adapter
from .boft import BoftAdapter, BoftVariant, butterfly_factorization
from .change_cache import ChangeCache
from .changes import effective_delta, needs_base, weight_change
from .diag_oft import DiagOftAdapter, DiagOftVariant, lycoris_cayley
from .dora import Dora
from .dropout import lora_input, rank_dropout_mask, scaled_hidden
from .dylora import DyLoraAdapter
from .full import FullAdapter, FullVariant
from .fused import FUSED_ADAPTERS, FusedLohaAdapter, FusedLokrAdapter, FusedMixin, fused_adapter
from .glora import GloraAdapter, GloraVariant
from .ia3 import Ia3Adapter, Ia3Variant
from .loha import LohaAdapter, LohaVariant
from .lokr import LokrAdapter, LokrVariant
from .lora import UP_BIAS_KEY, LoraAdapter, LoraVariant
from .lora_fa import LoraFaAdapter
from .maths import Tensors, factorization, tucker
from .members import MemberHooks
from .norm import NormAdapter, NormVariant
from .oft import OftAdapter, OftVariant
from .registry import ADAPTER_OF_VARIANT, TRAINING_ADAPTERS, VARIANTS, adapter_from_tensors, variant_of
from .shared_down import SharedDownLora
from .variant import AdditiveVariant, Variant

__all__ = [
    "ADAPTER_OF_VARIANT",
    "FUSED_ADAPTERS",
    "TRAINING_ADAPTERS",
    "UP_BIAS_KEY",
    "VARIANTS",
    "Adapter",
    "AdditiveVariant",
    "BoftAdapter",
    "BoftVariant",
    "ChangeCache",
    "DiagOftAdapter",
    "DiagOftVariant",
    "Dora",
    "DyLoraAdapter",
    "FullAdapter",
    "FullVariant",
    "FusedLohaAdapter",
    "FusedLokrAdapter",
    "FusedMixin",
    "GloraAdapter",
    "GloraVariant",
    "Ia3Adapter",
    "Ia3Variant",
    "LohaAdapter",
    "LohaVariant",
    "LokrAdapter",
    "LokrVariant",
    "LoraAdapter",
    "LoraFaAdapter",
    "LoraVariant",
    "MemberHooks",
    "NormAdapter",
    "NormVariant",
    "OftAdapter",
    "OftVariant",
    "SharedDownLora",
    "Tensors",
    "Variant",
    "adapter_from_tensors",
    "butterfly_factorization",
    "effective_delta",
    "factorization",
    "fused_adapter",
    "lora_input",
    "lycoris_cayley",
    "needs_base",
    "rank_dropout_mask",
    "scaled_hidden",
    "tucker",
    "variant_of",
    "weight_change",
]
