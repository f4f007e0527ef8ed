"""LyCORIS presets (``network_args = ["preset=attn-only"]``, ``preset=my_preset.toml``): which modules a
kohya run with ``network_module = lycoris.kohya`` adapts, and with which algo and rank.

A kohya run builds LyCORIS' ``LycorisNetworkKohya`` over sd-scripts' own UNet (SD1/SD2: diffusers paths and
class names, its attention class named ``CrossAttention``; SDXL: Stability's SGM paths such as
``input_blocks.4.1``) and the transformers CLIP encoders (``text_model.encoder...``). The preset's
``*_target_module`` lists name module classes whose Linear/Conv sub-modules get adapters;
``*_target_name`` lists module paths matched from their start (``re.match``, or ``fnmatch`` with
``use_fnmatch``). :func:`select` walks sdcore's diffusers modules with the kohya path and class of each
(:func:`_unet_nodes`) and repeats that walk rule for rule, so the set of adapted modules is the kohya run's
(LyCORIS f49d30d ``lycoris/kohya.py`` ``create_modules``/``create_modules_``/``create_single_module``):

- a module of a target class (and not matched by a target name) adapts every Linear (rank) and 1x1 conv
  (rank) under it, kxk convs only with a conv rank; with ``train_norm`` every module whose class has "Norm"
  in its name becomes a norm module first;
- a module matched by a target name is adapted itself by the same rule (a block matched by name adapts
  nothing);
- ``module_algo_map`` (class -> settings) applies to a target block of that class and to every module of
  that class inside one (the outermost map wins); ``name_algo_map`` (path pattern -> settings) to modules
  taken by name. The settings' ``dim``/``alpha`` replace the rank and alpha (a ``dim`` also lets a kxk conv
  in without a conv rank), ``algo`` the algo;
- ``enable_conv = false`` sets the conv rank to 0.

SD3, FLUX.1 and Chroma: kohya's ``sd3_train_network.py``/``flux_train_network.py`` hand LyCORIS SAI's and BFL's own
model classes (sd-scripts ``library/sd3_models.py`` ``MMDiT``, ``library/flux_models.py`` ``Flux``), named
``lora_unet_<path>`` (``lora_unet_double_blocks_0_img_attn_qkv``). :func:`select` walks that model's tree
(:func:`_flux_tree`, :func:`_sd3_tree`) over the kohya modules of :mod:`sdplugin_lora.dit`: the built-in lists'
``DoubleStreamBlock``/``SingleStreamBlock`` (Flux) and ``SingleDiTBlock`` (SD3's x/context blocks) adapt every
Linear of those blocks (kohya's default LoRA targets), ``attn-only``'s ``SelfAttention`` is Flux's double-block
img/txt attention (``qkv``, ``proj``) and no SD3 module (its class is ``AttentionLinears``), and no top-level name
(``conv_in``, ``time_embedding.linear_1``) exists there. Chroma (``flux_train_network.py --model_type chroma``):
kohya hands LyCORIS sd-scripts' ``library/chroma_models.py`` ``Chroma`` (:func:`_chroma_tree`), whose
``DoubleStreamBlock``/``SingleStreamBlock`` are BFL's without modulation Linears (its ``Approximator`` makes every
modulation): the same lists adapt the same attention/MLP Linears; a preset that reaches the approximator
(``MLPEmbedder``, ``distilled_guidance_layer``) is refused, as sdcore has no kohya module for it. A fused ``qkv``/``linear1`` is one LyCORIS module
(:class:`sdplugin_lora.adapters.FusedMixin` for LoHa/LoKr, the shared-down LoRA for LoRA). Of the other
built-in classes (HunYuan, Wan, Lumina...) no sdcore model has any. ``preset=ia3`` names ``to_k``/``to_v``/``ff.net.2`` and
``k_proj``/``v_proj``/``mlp.fc2``, which ``re.match`` compares with the start of each full path: no module
of an SD UNet or CLIP encoder matches, so it trains nothing and is refused.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcore.errors import ConfigError

from .naming import ModuleIndex, Target, flatten, sgm_block_table, te_relative_path, unet_path_to_sgm

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the DiT block classes of LyCORIS' lists that kohya's FLUX.1 and SD3 models have (flux_models.py, sd3_models.py)
_DIT_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock")
_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", *_DIT_BLOCKS)
_CLIP_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


@dataclass(frozen=True)
class ModuleSettings:
    """One ``module_algo_map``/``name_algo_map`` entry (the keys sdcore can train)."""

    algo: str | None = None
    dim: int | None = None
    alpha: float | None = None
    factor: int | None = None
    use_tucker: bool | None = None
    decompose_both: bool | None = None


@dataclass(frozen=True)
class LycorisPreset:
    """A LyCORIS preset as ``LycorisNetworkKohya.apply_preset`` reads it (missing keys keep ``full``'s values)."""

    name: str
    enable_conv: bool = True
    unet_target_module: tuple[str, ...] = _UNET_BLOCKS
    unet_target_name: tuple[str, ...] = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
    text_encoder_target_module: tuple[str, ...] = _CLIP_BLOCKS
    text_encoder_target_name: tuple[str, ...] = ()
    module_algo_map: Mapping[str, ModuleSettings] = field(default_factory=dict)
    name_algo_map: Mapping[str, ModuleSettings] = field(default_factory=dict)
    use_fnmatch: bool = False

    @property
    def has_unet(self) -> bool:
        return bool(self.unet_target_module or self.unet_target_name)

    @property
    def has_text_encoder(self) -> bool:
        return bool(self.text_encoder_target_module or self.text_encoder_target_name)


#: LyCORIS' built-in presets (lycoris/config.py PRESET, f49d30d): the SD UNet/CLIP class names and the DiT blocks
#: kohya's FLUX.1/SD3 models have (HunYuan, Wan, Lumina... entries name classes no sdcore model has)
BUILTIN: dict[str, LycorisPreset] = {
    "full": LycorisPreset("full"),
    "full-lin": LycorisPreset(
        "full-lin",
        enable_conv=False,
        unet_target_module=("Transformer2DModel", "ResnetBlock2D", *_DIT_BLOCKS),
        unet_target_name=("time_embedding.linear_1", "time_embedding.linear_2"),
    ),
    "attn-mlp": LycorisPreset(
        "attn-mlp", enable_conv=False, unet_target_module=("Transformer2DModel", *_DIT_BLOCKS), unet_target_name=()
    ),
    "attn-only": LycorisPreset(
        "attn-only",
        enable_conv=False,
        unet_target_module=("CrossAttention", "SelfAttention"),
        unet_target_name=(),
        text_encoder_target_module=("CLIPAttention", "CLIPSdpaAttention"),
    ),
    "unet-only": LycorisPreset("unet-only", text_encoder_target_module=()),
    "unet-transformer-only": LycorisPreset(
        "unet-transformer-only",
        enable_conv=False,
        unet_target_module=("Transformer2DModel", *_DIT_BLOCKS),
        unet_target_name=(),
        text_encoder_target_module=(),
    ),
    "unet-convblock-only": LycorisPreset(
        "unet-convblock-only",
        unet_target_module=("ResnetBlock2D", "Downsample2D", "Upsample2D"),
        unet_target_name=("conv_in", "conv_out"),
        text_encoder_target_module=(),
    ),
}
#: built-in presets sdcore refuses -> why
REFUSED = {
    "ia3": "LyCORIS' ia3 preset names to_k/to_v/ff.net.2 and k_proj/v_proj/mlp.fc2, which it matches (re.match) "
    "against the start of each full module path: no module of an SD1/SD2/SDXL UNet or CLIP encoder matches, "
    "so a kohya run trains an empty network; use preset=attn-only or a preset TOML with use_fnmatch and "
    "'*.to_k'-style names",
}
#: the LyCORIS algos a map entry may name -> sdcore's --algo
MAP_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "full": "full", "ia3": "ia3", "glora": "glora",
             "diag-oft": "diag_oft", "boft": "boft"}  # fmt: skip
_LIST_KEYS = ("unet_target_module", "unet_target_name", "text_encoder_target_module", "text_encoder_target_name")
#: keys of LyCORIS' generic wrapper (LycorisNetwork) that lycoris.kohya's apply_preset does not read
_WRAPPER_ONLY = ("target_module", "target_name", "lora_prefix", "exclude_name")


def is_builtin(text: str) -> bool:
    return text in BUILTIN or text in REFUSED


def load_preset(text: str) -> LycorisPreset:
    """A built-in preset by its exact name (LyCORIS compares case-sensitively), else a TOML file; every
    problem at once as a :class:`ConfigError`."""
    if text in BUILTIN:
        return BUILTIN[text]
    if text in REFUSED:
        raise ConfigError(f"LyCORIS preset {text!r}: {REFUSED[text]}")
    path = Path(text)
    if not path.is_file():
        names = ", ".join([*BUILTIN, *REFUSED])
        raise ConfigError(f"LyCORIS preset {text!r} is neither a built-in preset ({names}) nor a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"LyCORIS preset {text}: not a readable TOML file ({exc})") from None
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                problems.append(f"{key} must be a list of strings")
            else:
                values[key] = tuple(value)
        elif key in ("enable_conv", "use_fnmatch"):
            if not isinstance(value, bool):
                problems.append(f"{key} must be true or false")
            else:
                values[key] = value
        elif key in ("module_algo_map", "name_algo_map"):
            if not isinstance(value, dict):
                problems.append(f"{key} must be a table of tables")
                continue
            values[key] = {name: _settings(f"{key}.{name}", entry, problems) for name, entry in value.items()}
        elif key in _WRAPPER_ONLY:
            problems.append(
                f"{key} is read by LyCORIS' generic wrapper only: lycoris.kohya (what kohya runs) ignores it, so "
                "a kohya run would adapt those modules; narrow the target lists instead"
            )
        else:
            problems.append(f"unknown key {key!r}")
    for pattern in values.get("unet_target_name", ()) + values.get("text_encoder_target_name", ()):
        if not values.get("use_fnmatch", False):
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"target name {pattern!r} is not a regular expression ({exc}); or set use_fnmatch")
    if problems:
        raise ConfigError(f"LyCORIS preset {text}: " + "; ".join(problems), problems)
    return LycorisPreset(str(text), **values)


def _settings(where: str, entry: Any, problems: list[str]) -> ModuleSettings:
    if not isinstance(entry, dict):
        problems.append(f"{where} must be a table (algo, dim, alpha, ...)")
        return ModuleSettings()
    known: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "algo":
            if not isinstance(value, str) or value.lower() not in MAP_ALGOS:
                problems.append(f"{where}.algo {value!r}: sdcore trains {', '.join(MAP_ALGOS)} per module")
            else:
                known["algo"] = MAP_ALGOS[value.lower()]
        elif key in ("dim", "factor"):
            if not isinstance(value, int) or isinstance(value, bool):
                problems.append(f"{where}.{key} must be an integer")
            else:
                known[key] = value
        elif key == "alpha":
            if not isinstance(value, int | float) or isinstance(value, bool):
                problems.append(f"{where}.alpha must be a number")
            else:
                known["alpha"] = float(value)
        elif key in ("use_tucker", "decompose_both"):
            if not isinstance(value, bool):
                problems.append(f"{where}.{key} must be true or false")
            else:
                known[key] = value
        else:
            problems.append(
                f"{where}.{key}: sdcore applies algo, dim, alpha, factor, use_tucker, decompose_both per module"
            )
    return ModuleSettings(**known)


# --- the walk ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    path: str  # sdcore (diffusers / transformers) path in the component
    kohya_path: str | None  # the path in a kohya run's model (None: that model has no such module)
    kohya_class: str | None
    module: Any


@dataclass(frozen=True)
class Choice:
    """One adapted module: its target, the algo map's settings (``None``: the network's) and whether it is
    a norm module (``train_norm``)."""

    target: Target
    settings: ModuleSettings | None
    norm: bool = False


#: sd-scripts' SDXL UNet (sdxl_original_unet.py) classes that diffusers' UNet has too; its containers are
#: plain Sequential/ModuleList, so diffusers' block classes (CrossAttnDownBlock2D...) have no counterpart
_SDXL_CLASSES = {"Transformer2DModel", "BasicTransformerBlock", "CrossAttention", "FeedForward", "GEGLU",
                 "ResnetBlock2D", "Downsample2D", "Upsample2D"}  # fmt: skip


def _kohya_class(module: Any, sdxl: bool) -> str | None:
    name = type(module).__name__
    name = "CrossAttention" if name == "Attention" else name  # sd-scripts' attention class
    if sdxl and name not in _SDXL_CLASSES and not type(module).__module__.startswith("torch.nn"):
        return None
    return name


def _unet_nodes(unet: Any, sdxl: bool) -> list[_Node]:
    table = sgm_block_table(unet.config) if sdxl else None
    nodes = []
    for path, module in unet.named_modules():
        kohya_path: str | None = path
        if table is not None and path:
            kohya_path = unet_path_to_sgm(path, table)
            if kohya_path is None and type(module).__name__ in ("Downsample2D", "Upsample2D"):
                conv = unet_path_to_sgm(f"{path}.conv", table)  # the sampler itself: its conv's parent
                kohya_path = conv.rsplit(".", 1)[0] if conv else None
        nodes.append(_Node(path, kohya_path, _kohya_class(module, sdxl), module))
    return nodes


def _te_nodes(encoder: Any) -> list[_Node]:
    nodes = []
    for path, module in encoder.named_modules():
        kohya_path = "text_model." + te_relative_path(path) if path and path != "text_model" else path
        nodes.append(_Node(path, kohya_path, type(module).__name__, module))
    return nodes


class _Walk:
    """LyCORIS' create_modules over one component (kohya names for duplicates, sdcore targets out)."""

    def __init__(self, preset: LycorisPreset, index: ModuleIndex, component: str, *, conv: bool, norms: bool) -> None:
        self.preset = preset
        self.index = index
        self.component = component
        self.conv = conv
        self.norms = norms
        self.norm_prefix = ""

    def match(self, pattern: str, name: str | None) -> bool:
        if name is None:
            return False
        if self.preset.use_fnmatch:
            return fnmatch.fnmatch(name, pattern)
        return re.match(pattern, name) is not None

    def name_settings(self, name: str) -> ModuleSettings | None:
        names = self.preset.name_algo_map
        if name in names:
            return names[name]
        return next((value for key, value in names.items() if self.match(key, name)), None)

    def run(self, nodes: list[_Node], classes: Iterable[str], names: Iterable[str]) -> list[Choice]:
        classes, names = tuple(classes), tuple(names)
        out: list[Choice] = []
        for i, node in enumerate(nodes):
            by_name = node.kohya_path is not None and (
                node.kohya_path in names or any(self.match(t, node.kohya_path) for t in names)
            )
            if node.kohya_class in classes and not by_name:
                settings = self.preset.module_algo_map.get(node.kohya_class or "")
                out.extend(self.block(nodes, i, settings))
            elif by_name:
                settings = self.name_settings(node.kohya_path or "")
                if settings is None:
                    settings = self.preset.module_algo_map.get(node.kohya_class or "")
                choice = self.single(node, settings)
                if choice is not None:
                    out.append(choice)
        return out

    def block(self, nodes: list[_Node], start: int, settings: ModuleSettings | None) -> list[Choice]:
        """create_modules_: the block and everything under it; a nested map class restarts with its settings."""
        root = nodes[start]
        inside = [n for n in nodes[start:] if n is root or not root.path or n.path.startswith(root.path + ".")]
        found: dict[str, Choice] = {}
        for j, node in enumerate(inside):
            if node is not root and node.kohya_class in self.preset.module_algo_map:
                nested = self.preset.module_algo_map[node.kohya_class or ""]
                algo = nested.algo or (settings.algo if settings else None)  # else the parent block's algo
                for inner in self.block(inside, j, ModuleSettings(**{**vars(nested), "algo": algo})):
                    found.setdefault(inner.target.name, inner)
                continue
            choice = self.single(node, settings)
            if choice is not None:
                found.setdefault(choice.target.name, choice)
        return list(found.values())

    def single(self, node: _Node, settings: ModuleSettings | None) -> Choice | None:
        """create_single_module: a norm (train_norm), a Linear, a 1x1 conv, a kxk conv with a conv rank or a
        mapped dim; anything else gets no module."""
        module = node.module
        kind = type(module).__name__
        if self.norms and "Norm" in kind:
            return Choice(self.norm_target(node), settings, norm=True) if hasattr(module, "weight") else None
        target = self.index.resolve_path(self.component, node.path)
        if target is None:
            return None
        if target.is_conv3x3 and not (self.conv or (settings is not None and settings.dim)):
            return None
        return Choice(target, settings)

    def norm_target(self, node: _Node) -> Target:
        """A norm module, named as the kohya run names it (SDXL's UNet in SGM paths)."""
        if self.component == "unet":
            sdxl = self.index.family.startswith("sdxl")
            name = flatten("lora_unet", (node.kohya_path if sdxl else None) or node.path)
        else:
            name = flatten(self.norm_prefix, node.kohya_path or node.path)
        return Target(name, self.component, node.path, node.module, "other")


# --- SD3 / FLUX.1: kohya's SAI/BFL model as LyCORIS walks it ---------------------------------------------


def _bfl_blocks(blocks: int, singles: int, *, modulation: bool) -> list[tuple[str, str]]:
    """(path, class) of BFL's ``double_blocks``/``single_blocks`` in ``named_modules`` order; Chroma's
    blocks (sd-scripts ``library/chroma_models.py``, the same class names) have no ``Modulation``."""
    tree = [("double_blocks", "ModuleList")]
    for i in range(blocks):
        b = f"double_blocks.{i}"
        tree.append((b, "DoubleStreamBlock"))
        for s in ("img", "txt"):
            if modulation:
                tree += [(f"{b}.{s}_mod", "Modulation"), (f"{b}.{s}_mod.lin", "Linear")]
            tree += [(f"{b}.{s}_attn", "SelfAttention"), (f"{b}.{s}_attn.qkv", "Linear")]
            tree += [(f"{b}.{s}_attn.proj", "Linear"), (f"{b}.{s}_mlp", "Sequential")]
            tree += [(f"{b}.{s}_mlp.0", "Linear"), (f"{b}.{s}_mlp.2", "Linear")]
    tree.append(("single_blocks", "ModuleList"))
    for i in range(singles):
        b = f"single_blocks.{i}"
        tree += [(b, "SingleStreamBlock"), (f"{b}.linear1", "Linear"), (f"{b}.linear2", "Linear")]
        if modulation:
            tree += [(f"{b}.modulation", "Modulation"), (f"{b}.modulation.lin", "Linear")]
    return tree


def _flux_tree(blocks: int, singles: int) -> list[tuple[str, str]]:
    """(path, class) of kohya's ``library/flux_models.py`` ``Flux`` in ``named_modules`` order: its
    containers and Linears (norms and activations hold nothing LyCORIS adapts without ``train_norm``)."""
    tree = [("img_in", "Linear")]
    for emb in ("time_in", "vector_in", "guidance_in"):
        tree += [(emb, "MLPEmbedder"), (f"{emb}.in_layer", "Linear"), (f"{emb}.out_layer", "Linear")]
    tree += [("txt_in", "Linear"), *_bfl_blocks(blocks, singles, modulation=True)]
    tree += [("final_layer", "LastLayer"), ("final_layer.linear", "Linear")]
    tree += [("final_layer.adaLN_modulation", "Sequential"), ("final_layer.adaLN_modulation.1", "Linear")]
    return tree


def _chroma_tree(blocks: int, singles: int, layers: int) -> list[tuple[str, str]]:
    """(path, class) of kohya's ``library/chroma_models.py`` ``Chroma`` (``--model_type chroma``) in
    ``named_modules`` order: FLUX.1's blocks without modulation Linears (the ``Approximator``
    ``distilled_guidance_layer`` computes every modulation), and a ``LastLayer`` without ``adaLN_modulation``."""
    tree = [("img_in", "Linear"), ("distilled_guidance_layer", "Approximator")]
    a = "distilled_guidance_layer"
    tree += [(f"{a}.in_proj", "Linear"), (f"{a}.layers", "ModuleList")]
    for i in range(layers):
        tree += [(f"{a}.layers.{i}", "MLPEmbedder")]
        tree += [(f"{a}.layers.{i}.in_layer", "Linear"), (f"{a}.layers.{i}.out_layer", "Linear")]
    tree += [(f"{a}.norms", "ModuleList"), *((f"{a}.norms.{i}", "RMSNorm") for i in range(layers))]
    tree += [(f"{a}.out_proj", "Linear"), ("txt_in", "Linear"), *_bfl_blocks(blocks, singles, modulation=False)]
    return [*tree, ("final_layer", "LastLayer"), ("final_layer.linear", "Linear")]


def _sd3_tree(blocks: int) -> list[tuple[str, str]]:
    """(path, class) of kohya's ``library/sd3_models.py`` ``MMDiT`` in ``named_modules`` order (its
    attention class is ``AttentionLinears``, so no SD3 module is a ``SelfAttention``/``CrossAttention``)."""
    tree = [("x_embedder", "PatchEmbed"), ("x_embedder.proj", "Conv2d")]
    for emb, cls in (("t_embedder", "TimestepEmbedding"), ("y_embedder", "Embedder")):
        tree += [(emb, cls), (f"{emb}.mlp", "Sequential"), (f"{emb}.mlp.0", "Linear"), (f"{emb}.mlp.2", "Linear")]
    tree += [("context_embedder", "Linear"), ("joint_blocks", "ModuleList")]
    for i in range(blocks):
        tree.append((f"joint_blocks.{i}", "MMDiTBlock"))
        for part in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{part}"
            tree += [(b, "SingleDiTBlock")]
            for attn in ("attn", "attn2"):
                tree += [(f"{b}.{attn}", "AttentionLinears"), (f"{b}.{attn}.qkv", "Linear")]
                tree += [(f"{b}.{attn}.proj", "Linear")]
            tree += [(f"{b}.mlp", "MLP"), (f"{b}.mlp.fc1", "Linear"), (f"{b}.mlp.fc2", "Linear")]
            tree += [(f"{b}.adaLN_modulation", "Sequential"), (f"{b}.adaLN_modulation.1", "Linear")]
    tree += [("final_layer", "UnPatch"), ("final_layer.linear", "Linear")]
    tree += [("final_layer.adaLN_modulation", "Sequential"), ("final_layer.adaLN_modulation.1", "Linear")]
    return tree


#: the DiT families whose kohya model sdcore walks for presets
DIT_PRESET_FAMILIES = ("flux", "sd3", "chroma")
#: kohya model layers that sdcore has no module table for (a preset reaching one is refused, not dropped)
_UNTABLED = ("distilled_guidance_layer.",)


def _dit_nodes(transformer: Any, index: ModuleIndex) -> list[_Node]:
    """kohya's model of ``index.family`` as LyCORIS sees it: containers (module ``None``) and the Linears
    that this model has (module: their :class:`~sdplugin_lora.dit.KohyaModule`, named by kohya's path;
    ``None`` for a layer sdcore has no kohya module for, Chroma's approximator)."""
    blocks = len(getattr(transformer, "transformer_blocks", ()))
    singles = len(getattr(transformer, "single_transformer_blocks", ()))
    if index.family == "flux":
        tree = _flux_tree(blocks, singles)
    elif index.family == "chroma":
        layers = len(getattr(getattr(transformer, "distilled_guidance_layer", None), "layers", ()))
        tree = _chroma_tree(blocks, singles, layers)
    else:
        tree = _sd3_tree(blocks)
    nodes = []
    for path, cls in tree:
        leaf = cls in ("Linear", "Conv2d")
        module = index.kohya.get(flatten("lora_unet", path)) if leaf else None
        if leaf and module is None and not path.startswith(_UNTABLED):
            continue  # this configuration has no such layer (attn2, a pre-only block's proj/MLP, guidance_in...)
        nodes.append(_Node(path, path, cls, module))
    return nodes


class _DitWalk(_Walk):
    """The walk over kohya's SAI/BFL model: a chosen Linear is one kohya module (fused or not)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: kohya paths of Linears the preset reaches that sdcore cannot train under kohya's name
        self.untabled: list[str] = []

    def single(self, node: _Node, settings: ModuleSettings | None) -> Choice | None:
        module = node.module
        if module is None and node.kohya_class == "Linear" and not self.norms:
            self.untabled.append(node.path)
            return None
        if module is None or self.norms:
            return None  # a container, or a norm (train_norm is refused on SD3/Flux before this)
        first = self.index.resolve_path("transformer", module.parts[0].path)
        if first is None:
            return None
        if first.is_conv3x3 and not (self.conv or (settings is not None and settings.dim)):
            return None
        return Choice(Target(module.name, "transformer", node.path, module, first.group), settings)


def _dit_parts(choices: list[Choice], index: ModuleIndex) -> list[Choice]:
    """kohya-module choices -> one choice per diffusers module they stack (the network's targets)."""
    out = []
    for choice in choices:
        if choice.target.component != "transformer" or choice.target.name not in index.kohya:
            out.append(choice)
            continue
        for part in index.kohya[choice.target.name].parts:
            target = index.resolve_path("transformer", part.path)
            if target is not None:
                out.append(Choice(target, choice.settings))
    return out


def select(
    bundle: Any,
    index: ModuleIndex,
    preset: LycorisPreset,
    *,
    unet: bool = True,
    text_encoder: bool = True,
    conv: bool = True,
    norms: bool = False,
) -> list[Choice]:
    """The modules a kohya run with ``preset`` adapts on ``bundle`` (SD1/SD2/SDXL), each once, in the
    run's order (text encoders first). ``conv``: a conv rank is set (kxk convs get modules; the preset's
    ``enable_conv = false`` turns it off). A module reached twice is an error, as in LyCORIS (its
    ``duplicated lora name`` assertion)."""
    conv = conv and preset.enable_conv
    components = bundle.components()
    sdxl = index.family.startswith("sdxl")
    chosen: list[Choice] = []
    if text_encoder:
        for component, encoder in components.items():
            if not component.startswith("text_encoder"):
                continue
            walk = _Walk(preset, index, component, conv=conv, norms=norms)
            some = next((t for t in index.targets.values() if t.component == component), None)
            walk.norm_prefix = some.name.split("_text_model_")[0] if some else component
            chosen += walk.run(_te_nodes(encoder), preset.text_encoder_target_module, preset.text_encoder_target_name)
    if unet and index.kohya:  # SD3/Flux: kohya's SAI/BFL model, its modules named as lycoris.kohya names them
        dit = _DitWalk(preset, index, "transformer", conv=conv, norms=norms)
        nodes = _dit_nodes(components["transformer"], index)
        chosen += dit.run(nodes, preset.unet_target_module, preset.unet_target_name)
        if dit.untabled:
            raise ConfigError(
                f"LyCORIS preset {preset.name}: it reaches {len(dit.untabled)} Linears of {index.family}'s "
                f"approximator ({', '.join(dit.untabled[:3])}), which sdcore does not train (kohya's LoRA names "
                "none of them); leave distilled_guidance_layer/MLPEmbedder/Approximator out of the preset"
            )
    elif unet:
        walk = _Walk(preset, index, "unet", conv=conv, norms=norms)
        chosen += walk.run(_unet_nodes(components["unet"], sdxl), preset.unet_target_module, preset.unet_target_name)
    seen: set[str] = set()
    twice = []
    for choice in chosen:
        if choice.target.name in seen:
            twice.append(choice.target.name)
        seen.add(choice.target.name)
    if twice:
        raise ConfigError(
            f"LyCORIS preset {preset.name}: {len(twice)} modules are reached twice (a target name or class inside "
            f"another target block), which stops a kohya run (LyCORIS: duplicated lora name): {', '.join(twice[:5])}"
        )
    return _dit_parts(chosen, index) if index.kohya else chosen


__all__ = ["BUILTIN", "MAP_ALGOS", "REFUSED", "Choice", "LycorisPreset", "ModuleSettings", "load_preset", "select"]
