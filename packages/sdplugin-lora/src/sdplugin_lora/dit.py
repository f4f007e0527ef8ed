"""kohya's LoRA names for the DiT families (SD3/SD3.5, FLUX.1, Chroma) on diffusers transformers.

kohya's sd-scripts (``networks/lora_sd3.py``, ``networks/lora_flux.py``) trains SAI's and BFL's own
model classes, so its module names are those checkpoints' paths flattened with ``_``:
``lora_unet_joint_blocks_0_x_block_attn_qkv``, ``lora_unet_double_blocks_0_img_attn_qkv``,
``lora_unet_single_blocks_0_linear1``. ComfyUI and Forge read those names. Several of those
modules are *fused*: one ``qkv`` Linear where diffusers has ``to_q``, ``to_k`` and ``to_v``, and
Flux's ``linear1`` is q, k, v and the MLP input at once. And where SAI/BFL put ``[shift; scale]``
in a continuous-AdaLN projection, diffusers puts ``[scale; shift]`` (SD3's last, "pre-only"
context block and both families' final layer).

So one kohya module is a stack of row blocks of diffusers modules, in kohya's row order: a
:class:`KohyaModule` of :class:`Part` s, built from the loaded transformer (so tiny and real
models are named alike). The conversions are exact, with no new LoRA maths:

* file -> model (:func:`split_module`): a fused LoRA ``(down [R, in], up [sum rows, R], alpha)``
  becomes one LoRA per part with the same down and alpha/rank and the part's rows of up (halves
  swapped back where needed), so each part's ``alpha/R · up_j @ down`` is exactly its rows of the
  fused update. Columns of ``up_j`` that are zero (the other parts' blocks of a block-diagonal up)
  are dropped with their down rows, which is exact too and gives back the factors of every file
  we fused. Other algorithms (LoHa, LoKr...) are split as full-matrix differences.
* training (:func:`shared_down_groups`): by default, as kohya, one LoRA per fused Linear whose down
  is shared by the parts (:class:`sdplugin_lora.adapters.SharedDownLora`); its state dict is
  already the kohya module, so it is saved as it is.
* model -> file (:func:`fuse_parts`, ``split_qkv``): q/k/v (and Flux's MLP input) LoRAs with their own downs
  become ``down = cat(downs)`` (rank ``R = Σ r_j``) and ``up`` block-diagonal; alpha is written as
  ``R · s`` so that alpha/rank keeps each part's scale ``s`` (parts with different scales have
  their scale folded into their up block and alpha = R). kohya's own ``split_qkv`` writer keeps
  the per-part alpha instead, so its fused files load with a third of the trained scale in every
  loader that reads fused modules (kohya's own ``create_network_from_weights`` included); sdcore
  does not repeat that.
* OFT (kohya ``networks.oft_flux``, :func:`oft_flux_modules`): kohya rotates each fused Linear per part
  ("to mimic the split qkv of FLUX as same as Diffusers"), so each diffusers module trains as one OFT
  module and the file keeps one ``oft_blocks.<i>`` per part (:func:`oft_flux_state_dict`, :func:`split_module`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .format import ModuleWeights
    from .naming import ModuleIndex, Target

#: families whose denoiser is a diffusers transformer with kohya names from SAI/BFL checkpoints
DIT_FAMILIES = ("sd3", "flux", "chroma")
#: kohya text-encoder prefixes per family (te1 CLIP-L, te2 CLIP-G, te3 T5-XXL), in bundle order (Chroma: kohya's
#: lora_flux keeps T5 second behind a dummy CLIP-L, so its only encoder is lora_te3)
DIT_TE_PREFIXES = {"sd3": ("lora_te1", "lora_te2", "lora_te3"), "flux": ("lora_te1", "lora_te3"),
                   "chroma": ("lora_te3",)}  # fmt: skip
#: our own name of a transformer module (the diffusers path flattened, as OneTrainer writes it and ComfyUI reads it)
TRANSFORMER_PREFIX = "lora_transformer"


@dataclass(frozen=True)
class Part:
    """One diffusers module inside a kohya module: its rows, in kohya's row order."""

    path: str  # module path inside the diffusers transformer
    rows: int  # output rows of that module
    swap_halves: bool = False  # kohya [shift; scale] <-> diffusers [scale; shift]


@dataclass(frozen=True)
class KohyaModule:
    """A module as kohya names it, and the diffusers modules whose rows it stacks."""

    name: str  # lora_unet_double_blocks_0_img_attn_qkv
    parts: tuple[Part, ...]
    default: bool  # in kohya's default targets (every Linear of the blocks); embedders/final layer are opt-in

    @property
    def direct(self) -> bool:
        """One diffusers module with the same row order: the names are plain aliases."""
        return len(self.parts) == 1 and not self.parts[0].swap_halves

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)


def _get(root: Any, path: str) -> Any:
    module = root
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module if hasattr(module, "weight") else None


class _Table:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.modules: list[KohyaModule] = []

    def add(self, name: str, paths: Iterable[str], *, default: bool = True, swap: bool = False) -> None:
        found = [(path, _get(self.root, path)) for path in paths]
        if any(module is None for _, module in found):
            return  # this configuration has no such module (SD3's pre-only context block, no attn2...)
        parts = tuple(Part(path, int(module.weight.shape[0]), swap) for path, module in found)
        self.modules.append(KohyaModule(f"lora_unet_{name}", parts, default))


def flux_table(transformer: Any) -> list[KohyaModule]:
    """kohya ``lora_flux`` names on a diffusers :class:`FluxTransformer2DModel`.

    Default targets are every Linear of BFL's ``DoubleStreamBlock`` (img/txt attention qkv and
    proj, MLP 0 and 2, modulation) and ``SingleStreamBlock`` (``linear1``, ``linear2``,
    ``modulation.lin``); kohya's ``in_dims`` adds the embedders, and ComfyUI also maps the final layer.
    A diffusers ``ChromaTransformer2DModel`` gets the same table less the modules Chroma lacks (modulation
    Linears, time/vector/guidance embedders): kohya's Chroma blocks are these blocks without them.
    """
    t = _Table(transformer)
    for i in range(len(getattr(transformer, "transformer_blocks", ()))):
        b, k = f"transformer_blocks.{i}", f"double_blocks_{i}"
        t.add(f"{k}_img_attn_qkv", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"))
        t.add(f"{k}_img_attn_proj", (f"{b}.attn.to_out.0",))
        t.add(f"{k}_img_mlp_0", (f"{b}.ff.net.0.proj",))
        t.add(f"{k}_img_mlp_2", (f"{b}.ff.net.2",))
        t.add(f"{k}_img_mod_lin", (f"{b}.norm1.linear",))
        t.add(f"{k}_txt_attn_qkv", (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"))
        t.add(f"{k}_txt_attn_proj", (f"{b}.attn.to_add_out",))
        t.add(f"{k}_txt_mlp_0", (f"{b}.ff_context.net.0.proj",))
        t.add(f"{k}_txt_mlp_2", (f"{b}.ff_context.net.2",))
        t.add(f"{k}_txt_mod_lin", (f"{b}.norm1_context.linear",))
    for i in range(len(getattr(transformer, "single_transformer_blocks", ()))):
        b, k = f"single_transformer_blocks.{i}", f"single_blocks_{i}"
        t.add(f"{k}_linear1", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"))
        t.add(f"{k}_linear2", (f"{b}.proj_out",))
        t.add(f"{k}_modulation_lin", (f"{b}.norm.linear",))
    emb = "time_text_embed"
    for name, path in (
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        ("time_in_in_layer", f"{emb}.timestep_embedder.linear_1"),
        ("time_in_out_layer", f"{emb}.timestep_embedder.linear_2"),
        ("vector_in_in_layer", f"{emb}.text_embedder.linear_1"),
        ("vector_in_out_layer", f"{emb}.text_embedder.linear_2"),
        ("guidance_in_in_layer", f"{emb}.guidance_embedder.linear_1"),
        ("guidance_in_out_layer", f"{emb}.guidance_embedder.linear_2"),
        ("final_layer_linear", "proj_out"),
    ):
        t.add(name, (path,), default=False)
    t.add("final_layer_adaLN_modulation_1", ("norm_out.linear",), default=False, swap=True)
    return t.modules


def sd3_table(transformer: Any) -> list[KohyaModule]:
    """kohya ``lora_sd3`` names on a diffusers :class:`SD3Transformer2DModel`.

    Default targets are every Linear of SAI's ``SingleDiTBlock`` (the ``x_block`` and
    ``context_block`` of each joint block: attention qkv and proj, SD3.5-medium's ``attn2``, MLP
    fc1/fc2, ``adaLN_modulation.1``); kohya's ``emb_dims`` adds the embedders and final layer.
    """
    t = _Table(transformer)
    blocks = list(getattr(transformer, "transformer_blocks", ()))
    for i, block in enumerate(blocks):
        b, k = f"transformer_blocks.{i}", f"joint_blocks_{i}"
        t.add(f"{k}_x_block_attn_qkv", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"))
        t.add(f"{k}_x_block_attn_proj", (f"{b}.attn.to_out.0",))
        t.add(f"{k}_x_block_attn2_qkv", (f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"))
        t.add(f"{k}_x_block_attn2_proj", (f"{b}.attn2.to_out.0",))
        t.add(f"{k}_x_block_mlp_fc1", (f"{b}.ff.net.0.proj",))
        t.add(f"{k}_x_block_mlp_fc2", (f"{b}.ff.net.2",))
        t.add(f"{k}_x_block_adaLN_modulation_1", (f"{b}.norm1.linear",))
        t.add(f"{k}_context_block_attn_qkv", (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"))
        t.add(f"{k}_context_block_attn_proj", (f"{b}.attn.to_add_out",))
        t.add(f"{k}_context_block_mlp_fc1", (f"{b}.ff_context.net.0.proj",))
        t.add(f"{k}_context_block_mlp_fc2", (f"{b}.ff_context.net.2",))
        # the pre-only context block's AdaLayerNormContinuous keeps (scale, shift) where SAI has (shift, scale)
        pre_only = bool(getattr(block, "context_pre_only", False))
        t.add(f"{k}_context_block_adaLN_modulation_1", (f"{b}.norm1_context.linear",), swap=pre_only)
    emb = "time_text_embed"
    for name, path in (
        ("context_embedder", "context_embedder"),
        ("x_embedder_proj", "pos_embed.proj"),
        ("t_embedder_mlp_0", f"{emb}.timestep_embedder.linear_1"),
        ("t_embedder_mlp_2", f"{emb}.timestep_embedder.linear_2"),
        ("y_embedder_mlp_0", f"{emb}.text_embedder.linear_1"),
        ("y_embedder_mlp_2", f"{emb}.text_embedder.linear_2"),
        ("final_layer_linear", "proj_out"),
    ):
        t.add(name, (path,), default=False)
    t.add("final_layer_adaLN_modulation_1", ("norm_out.linear",), default=False, swap=True)
    return t.modules


def kohya_table(family: str, transformer: Any) -> list[KohyaModule]:
    """kohya's SAI/BFL module names of ``family``'s transformer; empty for a family kohya has no script for
    (a plugin's): its modules keep their diffusers names (``lora_transformer_<path>``), see :func:`block_linears`."""
    if family in ("flux", "chroma"):
        return flux_table(transformer)
    if family == "sd3":
        return sd3_table(transformer)
    return []


def block_linears(transformer: Any) -> set[str]:
    """The default LoRA targets of a transformer without a kohya table (a plugin family): every Linear inside its
    repeated blocks (a path through a numbered ``ModuleList`` entry, ``joint_transformer_blocks.0.attn.to_q``),
    which is kohya's default for SD3 and Flux (every Linear of the blocks; embedders and final layer opt-in)."""
    import torch

    return {
        path
        for path, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(part.isdigit() for part in path.split(".")[:-1])
    }


def variant_of_transformer(family: str, transformer: Any) -> str:
    """What kohya's metadata calls the model: Flux ``dev``/``schnell`` (guidance embedding or not),
    SD3 ``medium`` (3.0: no QK norm), ``5-large`` or ``5-medium`` (3.5 with MMDiT-X ``attn2`` layers)."""
    if family == "chroma":
        return "chroma"  # kohya's flux_train_network model description for --model_type chroma
    config = getattr(transformer, "config", {})
    get = config.get if hasattr(config, "get") else lambda key, default=None: getattr(config, key, default)
    if family == "flux":
        return "dev" if get("guidance_embeds", False) else "schnell"
    if not get("qk_norm", None):
        return "medium"
    return "5-medium" if tuple(get("dual_attention_layers", ()) or ()) else "5-large"


# --- tensors ----------------------------------------------------------------------------------------


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    import torch

    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def split_module(name: str, weights: ModuleWeights, module: KohyaModule, label: str) -> list[ModuleWeights]:
    """A file's fused module -> one module per part (same order as ``module.parts``), exactly.

    Plain LoRA keeps its factors: every part gets the same ``lora_down`` and alpha and its rows of
    ``lora_up``. Other algorithms become full-matrix differences (``diff``) of the part's rows.
    """
    from sdcore.errors import NetworkMismatchError

    from .format import ModuleWeights

    if weights.kind == "oft":
        return _split_oft(name, weights, module, label)
    widths = weights.in_out()
    if widths is not None and widths[1] != module.rows:
        raise NetworkMismatchError(
            f"{label}: {name} has {widths[1]} output rows but the model's {module.name} has {module.rows} "
            f"({' + '.join(str(p.rows) for p in module.parts)}): this LoRA does not fit the loaded model"
        )
    if weights.is_dora:
        raise NetworkMismatchError(
            f"{label}: {name} is a DoRA module on a fused layer; its magnitude cannot be split per "
            "diffusers module (apply it to the original SAI/BFL model instead)"
        )
    out: list[ModuleWeights] = []
    start = 0
    if weights.plain_lora:
        up, down, scale = weights.up.flatten(1), weights.down.flatten(1), weights.scale
        bias = weights.tensors.get("lora_up.bias")  # BFL's LinearLora: split by the same rows
        for part in module.parts:
            rows = up[start : start + part.rows]
            part_bias = None if bias is None else bias[start : start + part.rows]
            if part.swap_halves:
                rows = swap_halves(rows)
                part_bias = None if part_bias is None else swap_halves(part_bias)
            # columns of up that are zero for this part (the other parts' blocks of a block-diagonal
            # up) add nothing: dropping them with their down rows, and keeping alpha/rank, is exact
            # and gives back the factors of each part of a file we fused ourselves
            keep = rows.abs().sum(dim=0) != 0
            if bool(keep.any()) and not bool(keep.all()):
                rows, part_down = rows[:, keep], down[keep]
            else:
                part_down = down
            rank = int(part_down.shape[0])
            tensors = {
                "lora_down.weight": part_down.contiguous(),
                "lora_up.weight": rows.contiguous(),
                "alpha": _scalar(scale * rank),
            }
            if part_bias is not None:
                tensors["lora_up.bias"] = part_bias.contiguous()
            out.append(ModuleWeights(tensors))
            start += part.rows
        return out
    in_dim = widths[0] if widths is not None else None
    shape = weights.variant.shape(weights.tensors) if weights.variant is not None else None
    if in_dim is None and shape is not None and len(shape) == 2:  # LoHa/LoKr: the factors tell the fused shape
        if shape[0] != module.rows:
            raise NetworkMismatchError(
                f"{label}: {name} has {shape[0]} output rows but the model's {module.name} has {module.rows}: "
                "this LoRA does not fit the loaded model"
            )
        in_dim = shape[1]
    if in_dim is None:
        raise NetworkMismatchError(f"{label}: {name}: cannot tell the input width of this {weights.kind} module")
    delta = weights.delta((module.rows, in_dim))
    for part in module.parts:
        rows = delta[start : start + part.rows]
        out.append(ModuleWeights({"diff": (swap_halves(rows) if part.swap_halves else rows).contiguous()}))
        start += part.rows
    return out


def _split_oft(name: str, weights: ModuleWeights, module: KohyaModule, label: str) -> list[ModuleWeights]:
    """kohya oft_flux's fused module -> one OFT module per part: block set ``i`` rotates part ``i``'s rows
    with the module's alpha, and a part's clamp ``alpha · its rows`` is kohya's ``alpha · split_dim``."""
    from sdcore.errors import NetworkMismatchError

    from .adapters import OftVariant
    from .format import ModuleWeights

    parts = OftVariant.parts(weights.tensors)
    rows = [int(b.shape[0]) * int(b.shape[1]) for b in parts]
    if rows != [part.rows for part in module.parts] or any(part.swap_halves for part in module.parts):
        raise NetworkMismatchError(
            f"{label}: {name} has OFT block sets over {' + '.join(map(str, rows))} rows but the model's "
            f"{module.name} has {' + '.join(str(p.rows) for p in module.parts)}: this OFT does not fit the loaded model"
        )
    alpha = {"alpha": weights.tensors["alpha"]} if "alpha" in weights.tensors else {}
    return [ModuleWeights({"oft_blocks": blocks, **alpha}, key=name) for blocks in parts]


def oft_flux_modules(index: ModuleIndex, all_linear: bool) -> list[KohyaModule]:
    """The BFL Linears kohya's ``networks.oft_flux`` rotates: with ``enable_all_linear`` every Linear of
    the ``DoubleStreamBlock`` and ``SingleStreamBlock`` modules, else those of their ``SelfAttention``
    (BFL's single blocks have none: the double blocks' img/txt ``attn.qkv`` and ``attn.proj`` only).
    kohya's fused parts are split "as diffusers does": ``qkv`` in q, k, v and ``linear1`` in q, k, v and the
    MLP input (kohya writes 3072 and 12288, FLUX.1's widths; here the loaded model's widths)."""
    chosen = []
    for module in index.kohya.values():
        block = module.name.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_"))
        attention = module.name.startswith("lora_unet_double_blocks_") and (
            "_img_attn_" in module.name or "_txt_attn_" in module.name
        )
        if attention or (all_linear and block):
            chosen.append(module)
    return chosen


def oft_flux_state_dict(state: Mapping[str, torch.Tensor], index: ModuleIndex) -> dict[str, torch.Tensor]:
    """An OFT network's ``state_dict`` (``lora_transformer_<path>.oft_blocks``/``.alpha``) in kohya's
    ``networks.oft_flux`` layout: ``oft_unet_<BFL name>.oft_blocks.<i>`` per part (its ParameterList,
    ``.0`` alone for an unfused Linear) and one ``.alpha``, which kohya's loader and sdcore's read."""
    from sdcore.errors import NetworkMismatchError

    by_name: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.rpartition(".")
        by_name.setdefault(name, {})[part] = tensor
    by_path = {index.targets[name].path: (name, t) for name, t in by_name.items() if name in index.targets}
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for module in index.kohya.values():
        found = [by_path.get(part.path) for part in module.parts]
        if not any(found):
            continue
        missing = [part.path for part, f in zip(module.parts, found, strict=True) if f is None]
        if missing:
            raise NetworkMismatchError(f"{module.name}: OFT on some of its parts only (not {', '.join(missing)})")
        key = "oft_unet_" + module.name[len("lora_unet_") :]
        for i, (name, tensors) in enumerate(f for f in found if f is not None):
            out[f"{key}.oft_blocks.{i}"] = tensors["oft_blocks"]
            out.setdefault(f"{key}.alpha", tensors["alpha"])
            used.add(name)
    left = sorted(set(by_name) - used)
    if left:
        raise NetworkMismatchError(f"{len(left)} OFT modules have no kohya oft_flux name ({', '.join(left[:5])})")
    return out


def _scalar(value: float) -> torch.Tensor:
    import torch

    return torch.tensor(float(value))


def fuse_parts(name: str, module: KohyaModule, parts: Mapping[str, ModuleWeights]) -> ModuleWeights:
    """LoRAs of some of ``module``'s parts (by diffusers path) -> the kohya module, exactly.

    ``down = cat(downs)``, ``up`` block-diagonal (zero rows for parts without a LoRA), alpha
    ``R · s`` when all parts share the scale ``s`` (else each up block carries its own scale and
    alpha = R), halves swapped where SAI/BFL order them otherwise.
    """
    import torch
    from sdcore.errors import NetworkMismatchError

    from .format import ModuleWeights

    present = [(part, parts[part.path]) for part in module.parts if part.path in parts]
    if not present:
        raise ValueError(f"{name}: no part has weights")
    for part, weights in present:
        if not weights.plain_lora:
            raise NetworkMismatchError(
                f"{name}: only plain LoRA can be written in kohya's fused names ({part.path} is {weights.kind}"
                f"{' with DoRA' if weights.is_dora else ''}); save in the diffusers layout instead"
            )
    scales = [weights.scale for _, weights in present]
    total_rank = sum(weights.rank for _, weights in present)
    same = all(abs(s - scales[0]) <= 1e-12 * max(1.0, abs(scales[0])) for s in scales)
    ref = present[0][1].down
    down = torch.cat([weights.down.float() for _, weights in present], dim=0)
    up = torch.zeros(module.rows, total_rank, dtype=torch.float32, device=ref.device)
    row = col = 0
    for part in module.parts:
        found = parts.get(part.path)
        if found is not None:
            block = found.up.float().reshape(part.rows, found.rank)
            if not same:
                block = block * found.scale
            if part.swap_halves:
                block = swap_halves(block)
            up[row : row + part.rows, col : col + found.rank] = block
            col += found.rank
        row += part.rows
    alpha = total_rank * scales[0] if same else float(total_rank)
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _scalar(alpha)}
    if any("lora_up.bias" in weights.tensors for _, weights in present):  # --lora-bias: the rows' biases, stacked
        bias = torch.zeros(module.rows, dtype=torch.float32, device=ref.device)
        row = 0
        for part in module.parts:
            found = parts.get(part.path)
            if found is not None and "lora_up.bias" in found.tensors:
                block = found.tensors["lora_up.bias"].float().reshape(part.rows)
                if not same:
                    block = block * found.scale
                bias[row : row + part.rows] = swap_halves(block) if part.swap_halves else block
            row += part.rows
        tensors["lora_up.bias"] = bias
    return ModuleWeights(tensors)


def shared_down_groups(index: ModuleIndex, targets: Iterable[Target]) -> list[tuple[str, list[Target]]]:
    """kohya's fused modules (q/k/v, Flux's ``linear1``) whose every part is among ``targets``:
    what kohya trains as *one* LoRA unless ``split_qkv`` (kohya name, member targets in row order).
    Only modules of several parts in the same row order qualify (a swapped-halves module is one part)."""
    chosen = {t.path: t for t in targets if t.component == index.denoiser and not t.is_conv}
    groups: list[tuple[str, list[Target]]] = []
    for module in index.kohya.values():
        if len(module.parts) < 2 or any(part.swap_halves for part in module.parts):
            continue
        members = [chosen.get(part.path) for part in module.parts]
        if all(member is not None for member in members):
            groups.append((module.name, [m for m in members if m is not None]))
    return groups


def fused_groups(
    index: ModuleIndex, targets: Iterable[Target]
) -> tuple[list[tuple[str, list[Target]]], dict[str, tuple[bool, ...]]]:
    """The kohya modules that LyCORIS' LoHa/LoKr train as one module over the fused weight
    (:class:`sdplugin_lora.adapters.FusedMixin`): every module that is not a plain alias (several parts,
    or halves in another order) whose every part is among ``targets``; and, per group, which members
    have their halves swapped. A module with only some parts among ``targets`` is a ``ConfigError``:
    LyCORIS adapts the fused Linear whole, and a LoHa/LoKr of a part alone has no kohya name."""
    from sdcore.errors import ConfigError

    chosen = {t.path: t for t in targets if t.component == index.denoiser and not t.is_conv}
    groups: list[tuple[str, list[Target]]] = []
    swapped: dict[str, tuple[bool, ...]] = {}
    partial: list[str] = []
    for module in index.kohya.values():
        if module.direct:
            continue
        members = [chosen.get(part.path) for part in module.parts]
        if all(member is not None for member in members):
            groups.append((module.name, [m for m in members if m is not None]))
            swapped[module.name] = tuple(part.swap_halves for part in module.parts)
        elif any(member is not None for member in members):
            partial.append(module.name)
    if partial:
        raise ConfigError(
            f"{len(partial)} fused SAI/BFL layers would get a LoHa/LoKr on some of their diffusers parts only "
            f"({', '.join(partial[:3])}): LyCORIS adapts each fused Linear whole; adapt all its parts or none"
        )
    return groups, swapped


def shared_down_weights(
    name: str, module: KohyaModule, raw: ModuleWeights | None, parts: Mapping[str, ModuleWeights]
) -> ModuleWeights | None:
    """A file's weights for a shared-down module ``name`` (training warm start / resume).

    ``raw`` is the file's module of that kohya name: a fused module of the same rank is taken as it
    is. Otherwise ``parts`` (the file's modules per diffusers path, e.g. a diffusers/PEFT file) give
    it when every part is a plain LoRA with the same down and scale: ``up = cat(ups)``. ``None``
    when the file does not have it (another rank: it was trained with ``split_qkv``)."""
    import torch

    from .format import ModuleWeights

    widths = raw.in_out() if raw is not None else None
    if raw is not None and raw.plain_lora and widths is not None and widths[1] == module.rows:
        return raw
    found = [parts.get(part.path) for part in module.parts]
    if any(w is None or not w.plain_lora for w in found):
        return None
    first = found[0]
    assert first is not None
    for weights in found[1:]:
        assert weights is not None
        same = weights.down.shape == first.down.shape and torch.equal(weights.down.float(), first.down.float())
        if not same or abs(weights.scale - first.scale) > 1e-12 * max(1.0, abs(first.scale)):
            return None
    up = torch.cat([w.up.flatten(1).float() for w in found if w is not None], dim=0)
    return ModuleWeights(
        {"lora_down.weight": first.down.flatten(1).float(), "lora_up.weight": up, "alpha": _scalar(first.alpha)}
    )


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, ModuleWeights]:
    from .format import parse_state_dict

    return parse_state_dict(state).modules


def kohya_state_dict(state: Mapping[str, torch.Tensor], index: ModuleIndex) -> dict[str, torch.Tensor]:
    """A network's ``state_dict`` (``lora_transformer_<path>`` names) in kohya's SAI/BFL names.

    Text-encoder modules keep their (already kohya) names; transformer modules are renamed or
    fused (:func:`fuse_parts`). A transformer module outside kohya's table has no kohya name:
    an error, since the file would not load in kohya's loaders.
    """
    from sdcore.errors import NetworkMismatchError

    modules = _modules(state)
    by_path: dict[str, tuple[str, ModuleWeights]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, weights in modules.items():
        target = index.targets.get(name)
        if target is not None and target.component == index.denoiser:
            by_path[target.path] = (name, weights)
        else:
            out.update({f"{name}.{key}": tensor for key, tensor in weights.tensors.items()})
    used: set[str] = set()
    for module in index.kohya.values():
        parts = {part.path: by_path[part.path][1] for part in module.parts if part.path in by_path}
        if not parts:
            continue
        if module.direct:
            weights = next(iter(parts.values()))
        else:
            weights = fuse_parts(module.name, module, parts)
        out.update({f"{module.name}.{key}": tensor for key, tensor in weights.tensors.items()})
        used.update(parts)
    left = sorted(by_path[path][0] for path in set(by_path) - used)
    if left:
        raise NetworkMismatchError(
            f"{len(left)} transformer modules have no kohya name ({', '.join(left[:5])}); save in the diffusers layout"
        )
    return out


def control_targets(index: ModuleIndex) -> list[Target]:
    """The targets of a FLUX.1 control LoRA: every Linear of the transformer, embedders and final layer included,
    as BFL's control LoRAs adapt them (BFL's ``replace_linear_with_lora`` swaps every ``nn.Linear``; diffusers'
    ``_convert_bfl_flux_control_lora_to_diffusers`` expects each one); ``img_in`` is already widened."""
    paths = {part.path for module in index.kohya.values() for part in module.parts}
    return [t for t in index.targets.values() if t.component == index.denoiser and t.path in paths]


#: diffusers' ``train_control_lora_flux.py`` target modules without ``--lora_layers``: img_in, the attention
#: projections (the single blocks' q/k/v too, by PEFT's suffix match) and the double blocks' feed-forwards; not the
#: modulation Linears, the single blocks' MLP (``proj_mlp``, ``proj_out``), the other embedders or the final layer
DIFFUSERS_CONTROL_TARGETS = (
    "x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def control_lora_layers(targets: Iterable[Target], lora_layers: str | None) -> list[Target]:
    """The control-LoRA targets diffusers' ``--lora_layers`` picks from ``targets`` (every Linear of the transformer):
    ``all-linear`` keeps them all (the script collects every ``nn.Linear``'s name: BFL's releases' set); otherwise
    the comma-separated names (:data:`DIFFUSERS_CONTROL_TARGETS` when ``None``) plus ``x_embedder``, each matched as
    PEFT matches a list of ``target_modules``: the module path itself or a path ending in ``.<name>``.

    A given name that matches no Linear is a ``ConfigError`` listing all of them (PEFT accepts a list as long as
    one name matches, or fails on a non-Linear module: sdcore says which names did nothing)."""
    from sdcore.errors import ConfigError

    targets = list(targets)
    if lora_layers is not None and lora_layers.strip() == "all-linear":
        return targets
    names = list(DIFFUSERS_CONTROL_TARGETS) if lora_layers is None else [n.strip() for n in lora_layers.split(",")]
    if "x_embedder" not in names:  # the script adds the input layer, which takes the control latents
        names.append("x_embedder")
    chosen: set[str] = set()
    unmatched: list[str] = []
    for name in names:
        found = {t.path for t in targets if name and (t.path == name or t.path.endswith("." + name))}
        if not found:
            unmatched.append(repr(name))
        chosen |= found
    if unmatched and lora_layers is not None:
        raise ConfigError(
            f"--lora-layers: {len(unmatched)} name(s) match no Linear of the transformer: {', '.join(unmatched)} "
            "(diffusers module names such as attn.to_q, ff.net.2, proj_mlp, norm1.linear, or all-linear)"
        )
    return [t for t in targets if t.path in chosen]


@functools.cache
def _bfl_linear_names() -> tuple[frozenset[str], frozenset[str]]:
    """(every Linear of a FLUX.1 transformer by BFL's name, its block index written ``N``; the Linears whose row
    halves BFL and diffusers order differently), from sdcore's Flux key plan."""
    from sdcore.models.flux.convert import key_plan

    plan = [group for group in key_plan(1, 1, True) if group.bfl.endswith(".weight")]
    names = {group.bfl.removesuffix(".weight"): group.op for group in plan}
    generic = frozenset(re.sub(r"^(double_blocks|single_blocks)\.0\.", r"\1.N.", name) for name in names)
    return generic, frozenset(name for name, op in names.items() if op == "swap")


def is_bfl_linear(name: str) -> bool:
    """Whether a file's module key is a Linear of FLUX.1 under BFL's dotted name (``double_blocks.3.img_attn.qkv``,
    ``img_in``): the keys of BFL's control LoRAs and of sdcore's ``--control-lora`` results."""
    return re.sub(r"^(double_blocks|single_blocks)\.\d+\.", r"\1.N.", name) in _bfl_linear_names()[0]


def control_module(
    bfl: str, down: torch.Tensor, up: torch.Tensor, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One module of a control LoRA in BFL's layout: ``<bfl>.lora_A.weight`` = ``down`` [r, in] and
    ``.lora_B.weight`` = ``up`` [out, r], the scale already folded into ``up`` (the files have no alpha).

    The final layer's ``adaLN_modulation.1`` is written at rank ``2r`` with ``lora_A = [down; down]`` and
    ``lora_B = [up, up] / 2`` (the same ``B A``): diffusers' converter swaps the halves of this module's
    ``lora_A`` as well as ``lora_B``'s (its rank halves, where only the output rows are BFL's (shift, scale)); with
    equal halves, that swap of lora_A changes nothing and every loader gets ``B A``. Training's writer
    (:func:`control_state_dict`) and ``sdcore lora resize`` both write through here. ``bias`` (``--lora-bias``,
    scale folded in like ``up``'s) is ``lora_B.bias``, one value per output row whatever the rank.
    """
    import torch

    if bfl in _bfl_linear_names()[1]:
        down, up = torch.cat([down, down]), torch.cat([up, up], dim=1) / 2
    out = {f"{bfl}.lora_A.weight": down.contiguous(), f"{bfl}.lora_B.weight": up.contiguous()}
    if bias is not None:
        out[f"{bfl}.lora_B.bias"] = bias.contiguous()
    return out


def control_rank(bfl: str, down: torch.Tensor) -> int:
    """The rank of a control-LoRA module as :func:`control_module` counts it: ``lora_A``'s rows, half of them for a
    module it wrote twice over (equal halves)."""
    import torch

    rank = int(down.shape[0])
    if bfl in _bfl_linear_names()[1] and rank % 2 == 0 and torch.equal(down[: rank // 2], down[rank // 2 :]):
        return rank // 2
    return rank


def control_state_dict(
    state: Mapping[str, torch.Tensor], index: ModuleIndex, transformer: Any
) -> dict[str, torch.Tensor]:
    """A control LoRA network's ``state_dict`` in the layout of BFL's ``flux1-depth-dev-lora`` /
    ``flux1-canny-dev-lora``: ``<BFL module>.lora_A.weight`` [rank, in] and ``.lora_B.weight`` [out, rank] for
    every Linear (fused ``qkv``/``linear1`` as one module, the final ``adaLN_modulation.1`` rows in BFL's (shift,
    scale) order: kohya's fused modules, :func:`kohya_state_dict`, under BFL's dotted names), no alpha (the
    files apply at PEFT's scale 1, so alpha/rank is folded into ``lora_B``), and every attention RMSNorm's scale
    in full (``...norm.query_norm.scale``: the model's, trained or not). ComfyUI recognises the layout by
    ``img_in.lora_A.weight`` with ``single_blocks.0.norm.key_norm.scale``, diffusers' ``load_lora_weights`` by
    any ``query_norm.scale``; both then widen ``img_in`` from ``lora_A``'s width, as sdcore's loader does.

    diffusers' converter (``_convert_bfl_flux_control_lora_to_diffusers``) pops every Linear's ``lora_A``/``lora_B``
    unconditionally, so a file without one fails to load there: a Linear the run did not adapt (``--lora-layers``,
    whose default is diffusers' list, not every Linear) is written as a rank-1 module of zeros, which changes
    nothing in any loader and costs a few kilobytes. ``--lora-bias`` modules carry ``lora_B.bias`` (scale folded
    in), as BFL's own files do; diffusers' converter and sdcore's loader read it. With biases the zero modules get a
    zero bias too: PEFT builds every module with ``lora_bias`` once a file has one, and a bias the file lacks stays
    unloaded (on the meta device under diffusers' low-memory loading, which then fails)."""
    from sdcore.errors import NetworkMismatchError
    from sdcore.models.flux.convert import key_plan

    config = transformer.config
    plan = key_plan(int(config.num_layers), int(config.num_single_layers), bool(config.guidance_embeds))
    bfl_of = {
        group.diffusers[0].removesuffix(".weight"): group.bfl.removesuffix(".weight")
        for group in plan
        if group.bfl.endswith(".weight")
    }
    names = {module.name: bfl_of.get(module.parts[0].path) for module in index.kohya.values()}
    out: dict[str, torch.Tensor] = {}
    for name, weights in _modules(kohya_state_dict(state, index)).items():
        bfl = names.pop(name, None)
        if bfl is None or not weights.plain_lora:
            raise NetworkMismatchError(f"{name}: a FLUX.1 control LoRA holds plain LoRA on BFL's Linears only")
        up = (weights.up.flatten(1).float() * weights.scale).to(weights.up.dtype)
        bias = weights.tensors.get("lora_up.bias")
        if bias is not None:
            bias = (bias.float() * weights.scale).to(bias.dtype)
        out.update(control_module(bfl, weights.down.flatten(1), up, bias))
    import torch

    biased = any(key.endswith(".lora_B.bias") for key in out)
    for name, left in names.items():  # a Linear --lora-layers left out: a zero rank-1 module (see the docstring)
        if left is None:
            continue
        module = index.kohya[name]
        base = _get(transformer, module.parts[0].path)
        dtype = base.weight.dtype
        zero_down = torch.zeros(1, int(base.weight.shape[1]), dtype=dtype)
        zero_bias = torch.zeros(module.rows, dtype=dtype) if biased else None
        out.update(control_module(left, zero_down, torch.zeros(module.rows, 1, dtype=dtype), zero_bias))
    for bfl, target in index.scales.items():
        out[bfl] = target.module.weight.detach().clone()
    return out


def diffusers_state_dict(
    state: Mapping[str, torch.Tensor], index: ModuleIndex
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A network's ``state_dict`` in diffusers/PEFT's layout plus its header.

    Keys are ``transformer.<path>.lora_A.weight`` / ``.lora_B.weight`` (``text_encoder.<path>`` for
    the encoders); alphas go where diffusers' ``save_lora_weights`` puts them, the
    ``lora_adapter_metadata`` header (the PEFT ``LoraConfig`` per component: ``r``,
    ``lora_alpha``, ``target_modules``, and ``rank_pattern``/``alpha_pattern`` for modules that differ;
    ``lora_bias`` when the modules carry PEFT's ``lora_B.bias``, ``--lora-bias``).
    """
    from sdcore.errors import NetworkMismatchError

    from .format import peft_header

    out: dict[str, torch.Tensor] = {}
    configs: dict[str, tuple[int, float, bool]] = {}  # <component>.<path> -> rank, alpha, bias (the header's)
    for name, weights in _modules(state).items():
        target = index.targets.get(name)
        fused = index.kohya.get(name) if target is None else None
        if target is None and fused is None:
            raise NetworkMismatchError(f"{name}: not a module of the loaded model")
        if not weights.plain_lora:
            raise NetworkMismatchError(f"{name}: diffusers/PEFT files hold plain LoRA only (this is {weights.kind})")
        bias = weights.tensors.get("lora_up.bias")  # --lora-bias: PEFT's lora_B.bias
        entries: list[tuple[str, str, torch.Tensor, torch.Tensor | None]] = []  # (component, path, lora_B, bias)
        if target is not None:
            component = "transformer" if target.component == index.denoiser else target.component
            entries.append((component, target.path, weights.up, bias))  # the loaded modules' own paths
        else:
            assert fused is not None  # a shared-down module: each member keeps the down and its rows of up
            up, start = weights.up.flatten(1), 0
            for part in fused.parts:
                rows = up[start : start + part.rows]
                part_bias = bias[start : start + part.rows] if bias is not None else None
                if part.swap_halves:
                    rows = swap_halves(rows)
                    part_bias = swap_halves(part_bias) if part_bias is not None else None
                entries.append(("transformer", part.path, rows, part_bias))
                start += part.rows
        for component, path, lora_b, lora_b_bias in entries:
            # one copy of the shared down per member: safetensors refuses tensors that share memory
            out[f"{component}.{path}.lora_A.weight"] = weights.down.clone() if fused is not None else weights.down
            out[f"{component}.{path}.lora_B.weight"] = lora_b.contiguous()
            if lora_b_bias is not None:
                out[f"{component}.{path}.lora_B.bias"] = lora_b_bias.contiguous()
            configs[f"{component}.{path}"] = (weights.rank, weights.alpha, lora_b_bias is not None)
    return out, {"lora_adapter_metadata": peft_header(configs), "format": "pt"}


__all__ = [
    "DIFFUSERS_CONTROL_TARGETS",
    "DIT_FAMILIES",
    "DIT_TE_PREFIXES",
    "TRANSFORMER_PREFIX",
    "KohyaModule",
    "Part",
    "block_linears",
    "control_lora_layers",
    "control_state_dict",
    "control_targets",
    "diffusers_state_dict",
    "flux_table",
    "fuse_parts",
    "fused_groups",
    "kohya_state_dict",
    "kohya_table",
    "oft_flux_modules",
    "oft_flux_state_dict",
    "sd3_table",
    "shared_down_groups",
    "shared_down_weights",
    "split_module",
    "swap_halves",
    "variant_of_transformer",
]
