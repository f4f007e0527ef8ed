"""FLUX.1 (and Chroma) LoRA modules under BFL's, ComfyUI's or XLabs' names, rewritten under kohya's for writing.

sdcore reads an XLabs x-flux single-block ``qkv_lora`` as ComfyUI's ``single_blocks.<i>.linear1_qkv`` (the q/k/v
rows of ``linear1``, not its MLP rows), a name only ComfyUI and sdcore read: kohya, Forge, diffusers and x-flux
cannot. Files that sdcore *writes* (``lora resize``, ``lora merge``, ``lora convert --to kohya``) hold kohya's
``lora_unet_single_blocks_<i>_linear1`` instead, with the same down and alpha and ``lora_up`` padded with zero rows
for the MLP part: ``alpha/r · up @ down`` is exactly the same change of the same rows, and every client reads that
name (:func:`widen_linear1_qkv`). :func:`kohya_names` also flattens the other BFL dotted names
(``diffusion_model.double_blocks.0.img_attn.qkv``) to kohya's (``lora_unet_double_blocks_0_img_attn_qkv``), which
is all kohya's FLUX.1 names are.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .format import LoraFile, ModuleWeights

#: BFL's ``SingleStreamBlock`` ``mlp_ratio`` of FLUX.1 dev/schnell and Chroma: ``linear1`` has ``3 * hidden`` q/k/v
#: rows then ``4 * hidden`` MLP rows, and ``linear2`` reads ``hidden + 4 * hidden`` inputs
FLUX_MLP_RATIO = 4

_SINGLE = re.compile(r"^single_blocks_(\d+)_(linear1_qkv|linear1|linear2)$")


def bfl_path(key: str) -> str | None:
    """The transformer path (BFL's, flattened with ``_``) a file's module key names, for kohya's ``lora_unet_``,
    ComfyUI's ``diffusion_model.``, bare and ``transformer.`` dotted keys; ``None`` for a text encoder's key."""
    from .format import _strip_component

    if key.startswith("lora_unet_"):
        return key.removeprefix("lora_unet_")
    if key.startswith(("lora_te", "text_encoders.")):
        return None
    component, path = _strip_component(key)
    return path.replace(".", "_") if component in ("unet", "transformer") else None


def kohya_name(key: str) -> str | None:
    """kohya's name of a FLUX.1/Chroma transformer Linear a file's key names under kohya's (kept) or BFL's dotted
    names (``diffusion_model.``/``transformer.``/bare: ``lora_unet_double_blocks_0_img_attn_qkv``), ``None`` for any
    other key (text encoders, diffusers' paths)."""
    from .dit import is_bfl_linear
    from .format import _strip_component

    if key.startswith("lora_unet_"):
        return key
    if key.startswith(("lora_te", "text_encoders.")):
        return None
    component, path = _strip_component(key)
    return (
        "lora_unet_" + path.replace(".", "_") if component in ("unet", "transformer") and is_bfl_linear(path) else None
    )


def _single(key: str) -> tuple[int, str] | None:
    """(block, ``linear1_qkv``/``linear1``/``linear2``) of a FLUX.1 single-block module key, else ``None``."""
    path = bfl_path(key)
    found = _SINGLE.match(path) if path is not None else None
    return (int(found.group(1)), found.group(2)) if found else None


def _plain(lora: LoraFile, key: str, weights: ModuleWeights, role: str) -> None:
    """Refuse (one line) a module of ``role`` in the rewrite that is not a plain Linear LoRA."""
    from sdcore.errors import NetworkMismatchError

    if not weights.plain_lora or weights.down.dim() != 2:
        kind = "DoRA" if weights.is_dora else ("Tucker LoRA" if weights.is_tucker else weights.kind)
        raise NetworkMismatchError(
            f"{lora.label}: {key} is {kind}; {role} is written as kohya's single-block linear1 (the q/k/v rows' LoRA "
            "with zero MLP rows), which only a plain LoRA can be"
        )


def widen_linear1_qkv(lora: LoraFile) -> LoraFile:
    """``lora`` with every ``single_blocks.<i>.linear1_qkv`` module (any spelling) as kohya's
    ``lora_unet_single_blocks_<i>_linear1``: the same ``lora_down`` and alpha, ``lora_up`` (and ``lora_up.bias``)
    padded with zero rows ``3 * hidden ..`` for the MLP part, so the change is exactly the same. The MLP width is
    the file's own ``linear1`` rows or ``linear2`` inputs of that block when it has them, else FLUX.1's
    ``4 * hidden`` (:data:`FLUX_MLP_RATIO`).

    A file that also has a ``linear1`` module of the same block gets one module for both, the sum ComfyUI applies
    (:func:`~sdplugin_lora.format.stack_ranks`): ``down = [down_qkv; down_1]``, ``up = [pad(up_qkv) · s_qkv, up_1 ·
    s_1]`` and alpha = the total rank (scale 1), or ``R · s`` when both share the scale ``s`` (factors unscaled).
    Only plain LoRA modules can be padded or stacked: any other kind is refused in one line
    (``NetworkMismatchError``). A file without ``linear1_qkv`` is returned as it is."""
    import torch
    from sdcore.errors import NetworkMismatchError

    from .format import ModuleWeights, stack_ranks

    singles = {key: found for key in lora.modules if (found := _single(key)) is not None}
    qkv = {block: key for key, (block, leaf) in singles.items() if leaf == "linear1_qkv"}
    if not qkv:
        return lora
    others = {(block, leaf): key for key, (block, leaf) in singles.items() if leaf != "linear1_qkv"}
    replaced: dict[str, tuple[str, ModuleWeights]] = {}  # old key -> (new key, weights); "" drops the old key
    for block, key in qkv.items():
        weights = lora.modules[key]
        _plain(lora, key, weights, "ComfyUI's linear1_qkv")
        up, down = weights.up.float().flatten(1), weights.down.float().flatten(1)
        rows, hidden = up.shape[0], down.shape[1]
        if rows != 3 * hidden:
            raise NetworkMismatchError(
                f"{lora.label}: {key} has {rows} output rows for {hidden} inputs; linear1's q/k/v rows are 3 x {hidden}"
            )
        linear1 = lora.modules.get(others.get((block, "linear1"), ""))
        linear2 = lora.modules.get(others.get((block, "linear2"), ""))
        width = None
        if linear1 is not None and (io := linear1.in_out()) is not None:
            width = io[1]
        elif linear2 is not None and (io := linear2.in_out()) is not None:
            width = 3 * hidden + (io[0] - hidden)  # linear2 reads the attention output and the MLP's
        width = width if width is not None else (3 + FLUX_MLP_RATIO) * hidden
        if width <= rows:
            raise NetworkMismatchError(
                f"{lora.label}: {key}: the file's single block {block} gives linear1 {width} rows, not more than the "
                f"{rows} q/k/v rows"
            )
        padded = torch.zeros(width, up.shape[1], dtype=up.dtype)
        padded[:rows] = up
        bias = None
        if "lora_up.bias" in weights.tensors:
            bias = torch.zeros(width, dtype=torch.float32)
            bias[:rows] = weights.tensors["lora_up.bias"].float()
        name = f"lora_unet_single_blocks_{block}_linear1"
        tensors = {"lora_down.weight": down, "lora_up.weight": padded, "alpha": torch.tensor(weights.alpha)}
        if bias is not None:
            tensors["lora_up.bias"] = bias
        widened = ModuleWeights(tensors, key=name)
        if linear1 is None:
            replaced[key] = (name, widened)
            continue
        old = others[(block, "linear1")]
        _plain(lora, old, linear1, f"stacked with {key}, it")
        replaced[key] = (name, stack_ranks(widened, linear1))
        replaced[old] = ("", linear1)
    modules: dict[str, ModuleWeights] = {}
    for key, weights in lora.modules.items():
        name, new = replaced.get(key, (key, weights))
        if name:
            modules[name] = new
    return dataclasses.replace(lora, modules=modules)


def kohya_names(lora: LoraFile) -> LoraFile:
    """A FLUX.1/Chroma file with every transformer module under kohya's name: ``linear1_qkv`` widened
    (:func:`widen_linear1_qkv`), BFL's dotted paths (``diffusion_model.``, bare, XLabs' read as ComfyUI's) flattened
    to ``lora_unet_<path>``, kohya's names kept. The tensors are the file's (no maths beyond the padding).

    Refused in one line (``NetworkMismatchError``): a file for another family, one that sets norm scales in full or
    widens ``img_in`` (a control LoRA, which loaders recognise only in BFL's layout), and modules with no kohya
    name here (text encoders under ComfyUI's or diffusers' names, diffusers' transformer paths)."""
    from sdcore.errors import NetworkMismatchError

    from .format import detect_family, widened_input

    family, why = detect_family(lora)
    if family not in ("flux", "chroma"):
        raise NetworkMismatchError(
            f"{lora.label}: --to kohya rewrites FLUX.1/Chroma files under BFL's, ComfyUI's or XLabs' names; this one "
            f"is {family or 'of no family sdcore can tell'} (from {why})"
        )
    if lora.norm_scales or widened_input(lora) is not None:
        raise NetworkMismatchError(
            f"{lora.label}: a FLUX.1 control LoRA (norm scales set in full or a widened img_in): diffusers and ComfyUI "
            "recognise it only in BFL's layout, which it already has"
        )
    lora = widen_linear1_qkv(lora)
    modules: dict[str, ModuleWeights] = {}
    nameless = []
    for key, weights in lora.modules.items():
        if key.startswith(("lora_unet_", "lora_te", "oft_unet_")):  # kohya's names already
            modules[key] = weights
            continue
        name = kohya_name(key)
        if name is None:
            nameless.append(key)
            continue
        modules[name] = dataclasses.replace(weights, key=name)
    if nameless:
        shown = ", ".join(nameless[:5]) + (f" (+{len(nameless) - 5} more)" if len(nameless) > 5 else "")
        raise NetworkMismatchError(
            f"{lora.label}: {len(nameless)} modules have no kohya name this command can give them ({shown}); "
            "only FLUX.1's BFL dotted names (diffusion_model.double_blocks.0.img_attn.qkv, XLabs' processors) are "
            "renamed"
        )
    return dataclasses.replace(lora, modules=modules)


def for_writing(lora: LoraFile) -> LoraFile:
    """``lora`` as ``lora resize``/``merge`` write it: an XLabs x-flux file entirely under kohya's names
    (:func:`kohya_names`: x-flux's own names are read by none of the tools that read kohya's, and ComfyUI's that
    sdcore reads them under by few), any other file with its names kept but ``linear1_qkv`` widened
    (:func:`widen_linear1_qkv`)."""
    return kohya_names(lora) if lora.layout == "xlabs" else widen_linear1_qkv(lora)


__all__ = ["FLUX_MLP_RATIO", "bfl_path", "for_writing", "kohya_name", "kohya_names", "widen_linear1_qkv"]
