"""The names of the LoRA-family algorithms (torch-free: the CLI options import this).

The algorithms themselves live in :mod:`sdplugin_lora.adapters`, one variant class each; its
registry is checked against :data:`ALGOS` so the two cannot drift apart.
"""

from __future__ import annotations

#: what ``--algo`` accepts. ``locon`` is LoRA with conv modules; ``dora`` is LoRA with DoRA's
#: weight decomposition; ``oft`` is kohya's ``networks.oft`` (``--rank`` = blocks, ``--alpha`` = constraint).
ALGOS = ("lora", "locon", "loha", "lokr", "dora", "oft")

ALGO_HELP = (
    "lora; locon (= lora with conv modules, conv rank defaults to --rank); LyCORIS loha, lokr or dora "
    "(files load in A1111/ComfyUI and here, not in diffusers); oft (kohya networks.oft: --rank = blocks, "
    "--alpha = constraint, default 1e-3)."
)

#: ``ss_network_module`` each algorithm's files carry (what sd-scripts writes)
NETWORK_MODULE = {
    "lora": "networks.lora",
    "locon": "networks.lora",
    "loha": "lycoris.kohya",
    "lokr": "lycoris.kohya",
    "dora": "lycoris.kohya",
    "oft": "networks.oft",
}

__all__ = ["ALGOS", "ALGO_HELP", "NETWORK_MODULE"]
