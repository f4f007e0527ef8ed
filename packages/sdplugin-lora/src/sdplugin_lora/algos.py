"""The names of the LoRA-family algorithms (torch-free: the CLI options import this).

The algorithms themselves live in :mod:`sdplugin_lora.adapters`, one variant class each; its
registry is checked against :data:`ALGOS` so the two cannot drift apart.
"""

from __future__ import annotations

#: what ``--algo`` accepts. ``locon`` is LoRA with conv modules; ``dora`` is LoRA with DoRA's
#: weight decomposition; ``oft`` is kohya's ``networks.oft`` (``--rank`` = blocks, ``--alpha`` = constraint);
#: ``lora_fa`` is kohya's ``networks.lora_fa`` (LoRA-FA: ``lora_down`` frozen at its init, only ``lora_up``
#: trains); ``dylora`` is kohya's ``networks.dylora`` (nested ranks trained ``--dylora-unit`` at a time).
#: Both write plain LoRA files. ``diag_oft`` and ``boft`` are LyCORIS' ``diag-oft`` and ``boft`` (``--rank`` =
#: LyCORIS' network_dim, the block size; ``--constraint``, ``--rescaled``). ``ia3``, ``glora`` and ``full`` are
#: LyCORIS' (IA)^3 (per-channel scaling vectors), GLoRA (``W + W·A + B``) and native fine-tuning (the whole
#: weight change ``diff``), in LyCORIS' keys.
ALGOS = (
    "lora",
    "locon",
    "loha",
    "lokr",
    "dora",
    "oft",
    "lora_fa",
    "dylora",
    "diag_oft",
    "boft",
    "ia3",
    "glora",
    "full",
)

ALGO_HELP = (
    "lora; locon (= lora with conv modules, conv rank defaults to --rank); LyCORIS loha, lokr or dora "
    "(files load in A1111/ComfyUI and here, not in diffusers); oft (kohya networks.oft: --rank = blocks, "
    "--alpha = constraint, default 1e-3); lora_fa (kohya networks.lora_fa: lora_down frozen, only lora_up "
    "trains); dylora (kohya networks.dylora: each step trains one --dylora-unit slice of the rank). lora_fa and "
    "dylora files are plain LoRA files. LyCORIS diag_oft / boft (orthogonal rotations: --rank = block size, "
    "--constraint, --rescaled; files load in ComfyUI and LyCORIS), ia3 (per-channel scaling, --rank unused, lr "
    "~5e-3..1e-2), glora (W + W·A + B) or full (the whole weight change: "
    "large files)."
)

#: ``ss_network_module`` each algorithm's files carry (what sd-scripts writes)
NETWORK_MODULE = {
    "lora": "networks.lora",
    "locon": "networks.lora",
    "loha": "lycoris.kohya",
    "lokr": "lycoris.kohya",
    "dora": "lycoris.kohya",
    "oft": "networks.oft",
    "lora_fa": "networks.lora_fa",
    "dylora": "networks.dylora",
    "diag_oft": "lycoris.kohya",
    "boft": "lycoris.kohya",
    "ia3": "lycoris.kohya",
    "glora": "lycoris.kohya",
    "full": "lycoris.kohya",
}

#: kohya's plain-LoRA module of its FLUX.1 and SD3 scripts (flux_train_network.py, sd3_train_network.py)
FAMILY_LORA_MODULE = {"flux": "networks.lora_flux", "chroma": "networks.lora_flux", "sd3": "networks.lora_sd3"}
#: every ``ss_network_module`` of a plain kohya LoRA file
PLAIN_LORA_MODULES = ("networks.lora", *FAMILY_LORA_MODULE.values())


#: kohya's OFT module of flux_train_network.py (FLUX.1 and Chroma: BFL's DoubleStreamBlock/SingleStreamBlock)
FAMILY_OFT_MODULE = {"flux": "networks.oft_flux", "chroma": "networks.oft_flux"}


def network_module(algo: str, family: str) -> str:
    """The ``ss_network_module`` sd-scripts writes for ``algo`` on ``family``: a plain LoRA on FLUX.1 or SD3
    comes from that family's own module, OFT on FLUX.1 from ``networks.oft_flux``."""
    module = NETWORK_MODULE[algo]
    if module == "networks.oft":
        return FAMILY_OFT_MODULE.get(family, module)
    return FAMILY_LORA_MODULE.get(family, module) if module == "networks.lora" else module


__all__ = [
    "ALGOS",
    "ALGO_HELP",
    "FAMILY_LORA_MODULE",
    "FAMILY_OFT_MODULE",
    "NETWORK_MODULE",
    "PLAIN_LORA_MODULES",
    "network_module",
]
