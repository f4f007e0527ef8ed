"""kohya module names, both ways, for SD1/SD2 (diffusers-style) and SDXL (SGM/ldm-style).

Every LoRA file in the wild names a module by flattening a module path with ``_``:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. The path is the one of
the UNet the trainer used: sd-scripts trains SD1/SD2 on a UNet with diffusers names but SDXL on a
UNet with Stability's SGM (ldm) names (``lora_unet_input_blocks_4_1_...``). Text encoders keep the
``text_model_`` segment that transformers 4 had, even though transformers 5 dropped that level
from :class:`CLIPTextModel`.

Flattened names cannot be un-flattened (``to_out_0`` vs ``transformer_blocks``), so the reverse
direction is a table built from the loaded model: :class:`ModuleIndex`. The SGM numbering is
derived from the UNet config (:func:`sgm_block_table`), so tiny and real layouts are named alike.

SD3/SD3.5 and FLUX.1 (:mod:`sdplugin_lora.dit`) have a diffusers transformer as denoiser: its
modules are named ``lora_transformer_<diffusers path>`` here, and kohya's SAI/BFL names (some of
them fused q/k/v modules) resolve to one or several of them through :attr:`ModuleIndex.kohya`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dit import KohyaModule

UNET_PREFIX = "lora_unet"
TE_PREFIXES = {1: ("lora_te",), 2: ("lora_te1", "lora_te2")}

#: kohya's target classes (networks/lora.py)
UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
#: kohya's T5 targets (lora_sd3/lora_flux, only with ``train_t5xxl``)
T5_TARGETS = ("T5Attention", "T5DenseGatedActDense")

#: ResNet sub-module names: diffusers -> SGM
_RESNET_TO_SGM = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
    "norm1": "in_layers.0",
    "norm2": "out_layers.0",
}
#: top-level UNet modules: diffusers -> SGM (only LyCORIS "full" preset files use them)
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def flatten(prefix: str, path: str) -> str:
    """``("lora_unet", "a.b.c") -> "lora_unet_a_b_c"`` (kohya's ``replace(".", "_")``)."""
    return f"{prefix}_{path}".replace(".", "_") if path else prefix


def _per_block(value: Any, count: int) -> list[int]:
    if isinstance(value, int):
        return [value] * count
    return [int(v) for v in value]


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def sgm_block_table(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """Map diffusers block prefixes to SGM prefixes, numbered as ldm/kohya number them.

    ``input_blocks`` index = 1 + sum over earlier blocks of (layers + 1 for a downsampler) + layer;
    sub-index 0 is the ResNet, 1 the attention; the downsampler is ``input_blocks.K.0.op``.
    Output blocks have layers+1 layers per block; an upsampler sits at sub-index 2 (1 when the
    block has no attention) of the block's last layer: ``output_blocks.2.2.conv`` for SDXL.
    """
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    count = len(down_types)
    layers = _per_block(unet_config.get("layers_per_block", 2), count)
    table: dict[str, str] = {}
    index = 1
    for i, block_type in enumerate(down_types):
        for j in range(layers[i]):
            table[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if _has_attention(block_type):
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if i < count - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    table["mid_block.resnets.0"] = "middle_block.0"
    table["mid_block.attentions.0"] = "middle_block.1"
    table["mid_block.resnets.1"] = "middle_block.2"
    up_layers = list(reversed(layers))
    index = 0
    for i, block_type in enumerate(up_types):
        attention = _has_attention(block_type)
        for j in range(up_layers[i] + 1):
            table[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
            if j == up_layers[i] and i < len(up_types) - 1:
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attention else 1}.conv"
            index += 1
    table.update(_TOP_TO_SGM)
    return table


def _split_prefix(path: str, table: Mapping[str, str]) -> tuple[str, str] | None:
    """Longest table key that is ``path`` or a dotted prefix of it -> (key, rest)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return head, ".".join(parts[cut:])
    return None


def unet_path_to_sgm(path: str, table: Mapping[str, str]) -> str | None:
    """A diffusers UNet module path in SGM names (``None`` when it has no SGM equivalent)."""
    found = _split_prefix(path, table)
    if found is None:
        return None
    head, rest = found
    mapped = table[head]
    if ".resnets." in head and rest:
        first, _, tail = rest.partition(".")
        rest = _RESNET_TO_SGM.get(first, first) + (f".{tail}" if tail else "")
    return f"{mapped}.{rest}" if rest else mapped


def te_relative_path(path: str) -> str:
    """Path inside the text transformer, without the ``text_model.`` level either way round."""
    return path[len("text_model.") :] if path.startswith("text_model.") else path


def te_name(prefix: str, path: str) -> str:
    """kohya name of a text-encoder module: always ``<prefix>_text_model_...``."""
    return flatten(prefix, "text_model." + te_relative_path(path))


def unet_name(path: str, *, sgm_table: Mapping[str, str] | None) -> str:
    """kohya name of a UNet module: SGM-flattened for SDXL (``sgm_table`` given), else diffusers."""
    if sgm_table is not None:
        sgm = unet_path_to_sgm(path, sgm_table)
        if sgm is not None:
            return flatten(UNET_PREFIX, sgm)
    return flatten(UNET_PREFIX, path)


def te_prefixes(family: str, count: int) -> tuple[str, ...]:
    """``("lora_te",)`` for one encoder, ``("lora_te1", "lora_te2")`` for SDXL; refiner: te2 only."""
    if family == "sdxl-refiner":
        return ("lora_te2",)
    return TE_PREFIXES[2] if count == 2 else TE_PREFIXES[1]


@dataclass
class Target:
    """One Linear/Conv2d a LoRA can patch."""

    name: str  # canonical kohya name (what we write)
    component: str  # "unet" or "transformer" (the denoiser), "text_encoder", "text_encoder_2", "text_encoder_3"
    path: str  # module path inside the component (this transformers/diffusers version)
    module: Any
    group: str  # "transformer" (default denoiser targets), "resnet", "te", "t5", "other"
    aliases: tuple[str, ...] = ()

    @property
    def is_conv(self) -> bool:
        return type(self.module).__name__ == "Conv2d" or hasattr(self.module, "kernel_size")

    @property
    def is_conv3x3(self) -> bool:
        """kohya's test: a Conv2d whose kernel is not 1x1 (it gets the conv rank)."""
        return self.is_conv and tuple(self.module.kernel_size) != (1, 1)

    @property
    def is_text_encoder(self) -> bool:
        return self.component.startswith("text_encoder")


def _linear_or_conv(module: Any) -> bool:
    return type(module).__name__ in ("Linear", "Conv2d") or (
        hasattr(module, "weight") and type(module).__name__ in ("LoRACompatibleLinear", "LoRACompatibleConv")
    )


def _affine_norm(module: Any) -> bool:
    """A GroupNorm/LayerNorm with affine parameters: what LyCORIS' ``train_norm`` adapts."""
    return type(module).__name__ in ("GroupNorm", "LayerNorm") and getattr(module, "weight", None) is not None


def _groups(root: Any, classes: Mapping[str, str], pick: Any = _linear_or_conv) -> dict[str, str]:
    """Every Linear/Conv2d (or what ``pick`` accepts) under a module of a class in ``classes`` ->
    that class's group name."""
    found: dict[str, str] = {}
    for parent_name, parent in root.named_modules():
        group = classes.get(type(parent).__name__)
        if group is None:
            continue
        for child_name, child in parent.named_modules():
            if child_name and pick(child):
                path = f"{parent_name}.{child_name}" if parent_name else child_name
                found.setdefault(path, group)
    return found


def _flux_norm_scales(transformer: Any) -> dict[str, Target]:
    """A FLUX.1 transformer's attention RMSNorms by the BFL name of their scale (sdcore's Flux key plan)."""
    from sdcore.models.flux.convert import key_plan

    config = transformer.config
    modules = dict(transformer.named_modules())
    found: dict[str, Target] = {}
    for group in key_plan(int(config.num_layers), int(config.num_single_layers), bool(config.guidance_embeds)):
        if not group.bfl.endswith("norm.scale"):
            continue
        path = group.diffusers[0].removesuffix(".weight")
        if path in modules:
            found[group.bfl] = Target(
                flatten(TRANSFORMER_NORM_PREFIX, path), "transformer", path, modules[path], "norm"
            )
    return found


#: the canonical names of :func:`_flux_norm_scales`' targets (no file writes them; they key a match)
TRANSFORMER_NORM_PREFIX = "norm_transformer"


@dataclass
class ModuleIndex:
    """Every patchable module of a bundle, by canonical kohya name and by every alias.

    Aliases make foreign files resolvable: SGM names on SD1, diffusers-style names on SDXL,
    ``unet.<path>`` / ``text_encoder.<path>`` dotted paths (diffusers/PEFT).
    """

    family: str
    targets: dict[str, Target] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    paths: dict[tuple[str, str], str] = field(default_factory=dict)
    #: the denoiser's component name: "unet", or "transformer" for SD3/Flux
    denoiser: str = "unet"
    #: SD3/Flux: kohya (SAI/BFL) module name -> the diffusers modules it stacks
    kohya: dict[str, KohyaModule] = field(default_factory=dict)
    #: SD1/SD2/SDXL: the affine GroupNorm/LayerNorm of the UNet's transformer and ResNet blocks
    #: (LyCORIS ``train_norm``), by canonical name and every alias; group ``transformer`` or ``resnet``
    norms: dict[str, Target] = field(default_factory=dict)
    #: FLUX.1: the attention RMSNorms by BFL's name (``double_blocks.0.img_attn.norm.query_norm.scale``), whose
    #: scale a file may set in full (BFL's control LoRAs: :attr:`sdplugin_lora.format.LoraFile.norm_scales`)
    scales: dict[str, Target] = field(default_factory=dict)

    @classmethod
    def from_bundle(cls, bundle: Any) -> ModuleIndex:
        components = bundle.components()
        encoders = [(name, module) for name, module in components.items() if name.startswith("text_encoder")]
        if "transformer" in components and "unet" not in components:
            try:  # the family's declared kohya prefixes (sdcore.models.family), when it is registered
                prefixes: Mapping[str, str] | None = dict(bundle.family_spec.lora_prefixes) or None
            except Exception:
                prefixes = None
            return cls.build_dit(bundle.family, components["transformer"], encoders, prefixes=prefixes)
        return cls.build(bundle.family, components["unet"], encoders)

    @classmethod
    def build_dit(
        cls,
        family: str,
        transformer: Any,
        encoders: Iterable[tuple[str, Any]],
        *,
        prefixes: Mapping[str, str] | None = None,
    ) -> ModuleIndex:
        """SD3/Flux: every Linear/Conv2d of the diffusers transformer as ``lora_transformer_<path>``,
        kohya's SAI/BFL names as aliases (1:1 modules) or stacks of parts (fused q/k/v, swapped
        halves), and the text encoders as kohya names them (te1 CLIP-L, te2 CLIP-G, te3 T5):
        ``prefixes`` (component -> prefix, the family's declaration), else kohya's order per family."""
        from .dit import DIT_TE_PREFIXES, TRANSFORMER_PREFIX, block_linears, kohya_table

        index = cls(family=family, denoiser="transformer")
        table = kohya_table(family, transformer)
        if table:
            default_paths = {part.path for module in table if module.default for part in module.parts}
        else:  # a family without kohya names (a plugin's): the Linears of its blocks
            default_paths = block_linears(transformer)
        alias_of = {module.parts[0].path: module.name for module in table if module.direct}
        for path, module in transformer.named_modules():
            if not path or not _linear_or_conv(module):
                continue
            canonical = flatten(TRANSFORMER_PREFIX, path)
            aliases = tuple(n for n in (alias_of.get(path), flatten(UNET_PREFIX, path)) if n and n != canonical)
            group = "transformer" if path in default_paths else "other"
            index._add(Target(canonical, "transformer", path, module, group, aliases))
        index.kohya = {module.name: module for module in table}
        if family == "flux":
            index.scales = _flux_norm_scales(transformer)
        encoders = list(encoders)
        order = DIT_TE_PREFIXES.get(family, ("lora_te1", "lora_te2", "lora_te3"))
        for position, (component, encoder) in enumerate(encoders):
            prefix = (prefixes or {}).get(component) or (order[position] if position < len(order) else None)
            if prefix is not None:
                index._add_encoder(component, encoder, prefix)
        return index

    @classmethod
    def build(cls, family: str, unet: Any, encoders: Iterable[tuple[str, Any]]) -> ModuleIndex:
        index = cls(family=family)
        table = sgm_block_table(unet.config)
        sdxl = family.startswith("sdxl")
        groups = _groups(unet, {name: "transformer" for name in UNET_TARGETS})
        for name, group in _groups(unet, {name: "resnet" for name in UNET_CONV_TARGETS}).items():
            groups.setdefault(name, group)
        for path, module in unet.named_modules():
            if not path or not _linear_or_conv(module):
                continue
            diffusers_name = flatten(UNET_PREFIX, path)
            sgm = unet_path_to_sgm(path, table)
            sgm_name = flatten(UNET_PREFIX, sgm) if sgm is not None else None
            canonical = (sgm_name or diffusers_name) if sdxl else diffusers_name
            aliases = tuple(n for n in (diffusers_name, sgm_name) if n and n != canonical)
            index._add(Target(canonical, "unet", path, module, groups.get(path, "other"), aliases))
        # LyCORIS' kohya wrapper: with train_norm, every module whose class name has "Norm" inside its
        # target blocks (preset full: Transformer2DModel, ResnetBlock2D, Down/Upsample2D; the CLIP
        # attention/MLP blocks hold none) becomes a NormModule
        norm_groups = _groups(unet, {name: "transformer" for name in UNET_TARGETS}, _affine_norm)
        for name, group in _groups(unet, {name: "resnet" for name in UNET_CONV_TARGETS}, _affine_norm).items():
            norm_groups.setdefault(name, group)
        modules = dict(unet.named_modules())
        for path, group in norm_groups.items():
            diffusers_name = flatten(UNET_PREFIX, path)
            sgm = unet_path_to_sgm(path, table)
            sgm_name = flatten(UNET_PREFIX, sgm) if sgm is not None else None
            canonical = (sgm_name or diffusers_name) if sdxl else diffusers_name
            aliases = tuple(n for n in (diffusers_name, sgm_name) if n and n != canonical)
            norm = Target(canonical, "unet", path, modules[path], group, aliases)
            for key in (canonical, *aliases):
                index.norms.setdefault(key, norm)
        encoders = list(encoders)
        prefixes = te_prefixes(family, len(encoders))
        for (component, encoder), prefix in zip(encoders, prefixes, strict=False):
            index._add_encoder(component, encoder, prefix)
        return index

    def _add_encoder(self, component: str, encoder: Any, prefix: str) -> None:
        """A CLIP encoder's modules named ``<prefix>_text_model_...``; a T5 encoder's by its own paths
        (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``), as kohya names them."""
        clip = type(encoder).__name__.startswith("CLIP")
        te_groups = _groups(encoder, {name: "te" for name in TE_TARGETS})
        te_groups.update(_groups(encoder, {name: "t5" for name in T5_TARGETS}))
        if not te_groups:  # neither CLIP nor T5 (a plugin family's UMT5, Gemma...): every Linear trains with the TE
            te_groups = {p: "te" for p, m in encoder.named_modules() if p and _linear_or_conv(m)}
        for path, module in encoder.named_modules():
            if not path or not _linear_or_conv(module):
                continue
            canonical = te_name(prefix, path) if clip else flatten(prefix, path)
            te_aliases: tuple[str, ...] = ()
            if prefix == "lora_te1" and self.denoiser == "unet":  # some trainers write SDXL's first encoder as lora_te
                te_aliases = (te_name("lora_te", path),)
            self._add(Target(canonical, component, path, module, te_groups.get(path, "other"), te_aliases))

    def _add(self, target: Target) -> None:
        known = self.targets.get(target.name)
        if known is not None and (known.component, known.path) != (target.component, target.path):
            from sdcore.errors import ModelFormatError

            # kohya refuses it too ("duplicated lora name"): one name would train one module and lose the other
            raise ModelFormatError(
                f"{known.component}: {known.path} and {target.path} are both named {target.name} in a LoRA file "
                "(dots flatten to underscores); this model cannot get kohya-style LoRA names"
            )
        self.targets[target.name] = target
        for alias in target.aliases:
            self.aliases.setdefault(alias, target.name)
        self.paths[(target.component, target.path)] = target.name
        if target.is_text_encoder:
            self.paths[(target.component, te_relative_path(target.path))] = target.name
            self.paths[(target.component, "text_model." + te_relative_path(target.path))] = target.name

    # --- lookups --------------------------------------------------------------------------
    def resolve(self, name: str) -> Target | None:
        """A kohya-flattened name (canonical or alias) -> its target."""
        if name in self.targets:
            return self.targets[name]
        canonical = self.aliases.get(name)
        return self.targets[canonical] if canonical else self.norms.get(name)

    def resolve_path(self, component: str, path: str) -> Target | None:
        """A dotted module path (``unet``/``transformer`` / ``text_encoder``...) -> its target
        (``unet`` and ``transformer`` both mean the denoiser)."""
        if component in ("unet", "transformer"):
            component = self.denoiser
        name = self.paths.get((component, path))
        return self.targets[name] if name else None

    def resolve_kohya(self, name: str) -> KohyaModule | None:
        """SD3/Flux: a kohya (SAI/BFL) module name that stacks several diffusers modules or
        orders their rows otherwise (``None`` for plain names, which :meth:`resolve` handles)."""
        module = self.kohya.get(name)
        if module is None and name.endswith("_linear1_qkv"):
            return self._linear1_qkv(name)
        return module if module is not None and not module.direct else None

    def _linear1_qkv(self, name: str) -> KohyaModule | None:
        """FLUX.1's single-block ``linear1`` less its MLP rows: the q/k/v rows that XLabs' ``qkv_lora`` adds to,
        under ComfyUI's name for them (``single_blocks.<i>.linear1_qkv``); no trainer writes it, so it is built
        from ``linear1``'s module when a file names it, not kept in :attr:`kohya`."""
        from .dit import KohyaModule

        linear1 = self.kohya.get(name.removesuffix("_qkv"))
        if linear1 is None or len(linear1.parts) != 4:  # to_q, to_k, to_v, proj_mlp
            return None
        return KohyaModule(name, linear1.parts[:3], default=False)

    def name_of(self, component: str, path: str) -> str:
        """Module path -> canonical kohya name (``KeyError`` when the module is not patchable)."""
        name = self.paths.get((component, path))
        if name is None:
            raise KeyError(f"{component}.{path} is not a Linear/Conv2d of this model")
        return name

    def select(
        self, *, unet: bool = True, text_encoder: bool = True, conv: bool = False, t5: bool = False
    ) -> list[Target]:
        """kohya's default targets (LoRA-LierLa), plus ResNet/down/upsampler modules with ``conv``
        (LoRA-C3Lier: 3x3 convs at the conv rank, ``time_emb_proj``/``conv_shortcut`` at the linear rank).

        SD3/Flux (``unet`` means the transformer): every Linear of kohya's blocks (attention, MLP,
        modulation) and the CLIP encoders' attention/MLP; T5 only with ``t5`` (kohya ``train_t5xxl``)."""
        chosen = []
        for target in self.targets.values():
            if not target.is_text_encoder:
                if not unet:
                    continue
                if target.group == "transformer" or (conv and target.group == "resnet"):
                    chosen.append(target)
            elif text_encoder and (target.group == "te" or (t5 and target.group == "t5")):
                chosen.append(target)
        return chosen

    def select_norms(self, *, conv: bool = False) -> list[Target]:
        """LyCORIS ``train_norm``'s norm layers for the blocks :meth:`select` adapts: the transformer
        blocks' GroupNorm/LayerNorms, and with ``conv`` the ResNets' GroupNorms (each once)."""
        chosen: dict[str, Target] = {}
        for target in self.norms.values():
            if target.group == "transformer" or (conv and target.group == "resnet"):
                chosen.setdefault(target.name, target)
        return list(chosen.values())


@dataclass(frozen=True)
class LayerFilter:
    """OneTrainer's custom layer filter (``layer_filter``, ``layer_filter_regex``; its ``ModuleFilter``): the
    comma-separated patterns, each stripped of surrounding spaces, are matched against a module's path inside
    the denoiser (diffusers names: ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``), as a
    substring or, with ``regex``, by ``re.search``; an empty pattern matches every path. A module is kept when
    any pattern matches it. OneTrainer refuses a run where a pattern matched nothing."""

    patterns: tuple[str, ...]
    regex: bool = False

    @classmethod
    def parse(cls, text: str, *, regex: bool = False, flag: str = "--layer-filter") -> LayerFilter:
        """The filter of ``text``; ``ConfigError`` (every problem in one line, naming ``flag``) for a
        non-printable character or a pattern that is not a regular expression (OneTrainer's ``ValueError``s)."""
        from sdcore.errors import ConfigError

        problems = [f"{flag} {raw!r}: a non-printable character" for raw in text.split(",") if not raw.isprintable()]
        patterns = tuple(raw.strip() for raw in text.split(","))
        for pattern in patterns if regex else ():
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(f"{flag} {pattern!r}: not a regular expression ({exc})")
        if problems:
            raise ConfigError("; ".join(problems))
        return cls(patterns, regex)

    def matches(self, pattern: str, path: str) -> bool:
        if not pattern:
            return True
        return re.search(pattern, path) is not None if self.regex else pattern in path

    def select(self, paths: Iterable[str]) -> tuple[set[str], list[str]]:
        """The ``paths`` some pattern matches, and the patterns that match none of them."""
        paths = list(paths)
        kept = {path for path in paths if any(self.matches(p, path) for p in self.patterns)}
        unused = [p for p in self.patterns if not any(self.matches(p, path) for path in paths)]
        return kept, unused


_KOHYA_PREFIX = re.compile(r"^(lora_unet|lora_transformer|lora_te[123]?)_")


def kohya_component(name: str) -> str | None:
    """Which part a kohya name belongs to: ``unet`` (the denoiser: ``lora_unet_``, ``lora_transformer_``),
    ``te``, ``te1``, ``te2``, ``te3`` or ``None``."""
    match = _KOHYA_PREFIX.match(name)
    if not match:
        return None
    prefix = match.group(1)
    return "unet" if prefix in ("lora_unet", "lora_transformer") else prefix[len("lora_") :]


__all__ = [
    "LayerFilter",
    "ModuleIndex",
    "Target",
    "flatten",
    "kohya_component",
    "sgm_block_table",
    "te_name",
    "te_prefixes",
    "te_relative_path",
    "unet_name",
    "unet_path_to_sgm",
]
