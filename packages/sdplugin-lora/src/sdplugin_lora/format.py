"""Reading and writing LoRA files: kohya/LyCORIS ``.safetensors`` plus diffusers/PEFT key styles.

Every reader returns a :class:`LoraFile`: per-module weights keyed as the file names them, the
header metadata, and what could not be parsed. :func:`match_modules` then resolves those keys
against a loaded model's :class:`~sdplugin_lora.naming.ModuleIndex`, so kohya SD1 (diffusers-style
names), kohya SDXL (SGM names), LyCORIS LoCon, ``unet.<path>.lora_A.weight`` (PEFT) and
``...processor.to_q_lora.down.weight`` (old diffusers) files all end up in the same form.

Files we write are exactly kohya's layout (``<name>.lora_down.weight``, ``.lora_up.weight``,
``.alpha``) with kohya's ``ss_*`` metadata, ModelSpec ``modelspec.*`` keys and the
``sshs_model_hash``/``sshs_legacy_hash`` that A1111 shows as the LoRA hash.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from sdcore.errors import ModelFormatError, NetworkMismatchError
from sdcore.models.bundled_embeddings import BundledEmbedding, bundled_embeddings, is_bundle_key
from sdcore.models.hashes import sshs_hashes

from .adapters import VARIANTS, GloraVariant, Variant, variant_of
from .naming import ModuleIndex, Target, flatten

if TYPE_CHECKING:
    from .dit import KohyaModule

# --- internal representation ------------------------------------------------------------------

#: the part name a PEFT ``lora_magnitude_vector`` is read under until :func:`_peft_magnitudes` makes it a
#: ``dora_scale``
_PEFT_MAGNITUDE = "lora_magnitude_vector"

#: per-module tensor suffixes -> the name the variants use (kohya/LyCORIS spelling); longest first
#: so ".lora_A.default.weight" wins over ".lora_A.weight"
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_down.weight": "lora_down.weight",
            ".lora_up.weight": "lora_up.weight",
            ".lora_mid.weight": "lora_mid.weight",
            ".lora_A.default.weight": "lora_down.weight",
            ".lora_B.default.weight": "lora_up.weight",
            ".lora_A.weight": "lora_down.weight",
            ".lora_B.weight": "lora_up.weight",
            ".lora.down.weight": "lora_down.weight",
            ".lora.up.weight": "lora_up.weight",
            ".lora_B.bias": "lora_up.bias",  # BFL's LinearLora (its control LoRAs): lora_B has a bias
            ".lora_up.bias": "lora_up.bias",
            ".lora_linear_layer.down.weight": "lora_down.weight",
            ".lora_linear_layer.up.weight": "lora_up.weight",
            "_lora.down.weight": "lora_down.weight",
            "_lora.up.weight": "lora_up.weight",
            ".alpha": "alpha",
            ".scale": "scale",
            ".dora_scale": "dora_scale",
            # PEFT's DoRA magnitude (a ParameterDict entry: get_peft_model_state_dict drops the ".weight" that a raw
            # state_dict has), per output row; turned into LyCORIS' per-output dora_scale by _peft_magnitudes
            ".lora_magnitude_vector.default.weight": _PEFT_MAGNITUDE,
            ".lora_magnitude_vector.weight": _PEFT_MAGNITUDE,
            ".lora_magnitude_vector": _PEFT_MAGNITUDE,
            **{f".{key}": key for variant in VARIANTS for key in variant.keys if "." not in key and key != "weight"},
            **{f".{key}": key for key in GloraVariant.keys},
        }.items(),
        key=lambda item: -len(item[0]),
    )
)


#: kohya ``networks.oft_flux``'s tensors: ``<module>.oft_blocks.<i>`` (its ``oft_blocks`` ParameterList)
_OFT_PART = re.compile(r"^(.+)\.(oft_blocks\.\d+)$")


@dataclass
class ModuleWeights:
    """The tensors of one module of a file, by variant tensor name; the maths is its variant's."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the module's name in the file ("" when unknown): it tells kohya OFT from LyCORIS diag-oft
    key: str = ""

    @property
    def variant(self) -> type[Variant] | None:
        return variant_of(self.tensors, self.key or None)

    @property
    def kind(self) -> str:
        """``lora`` (LoRA/LoCon), ``loha``, ``lokr``, ``full``, ``ia3``, ``glora``, ``oft``, ``norm`` or ``unknown``."""
        variant = self.variant
        return variant.algo if variant is not None else "unknown"

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]

    @property
    def rank(self) -> int:
        variant = self.variant
        return variant.rank(self.tensors) if variant is not None else 0

    @property
    def alpha(self) -> float:
        """The stored alpha; a missing (or zero) alpha means alpha = rank, as every loader does."""
        variant = self.variant
        return variant.alpha(self.tensors) if variant is not None else 1.0

    @property
    def scale(self) -> float:
        variant = self.variant
        return variant.scale(self.tensors) if variant is not None else 1.0

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def is_tucker(self) -> bool:
        variant = self.variant
        return variant is not None and variant.is_tucker(self.tensors)

    @property
    def full_matrix(self) -> bool:
        variant = self.variant
        return variant is not None and variant.full_matrix(self.tensors)

    @property
    def plain_lora(self) -> bool:
        """kohya LoRA/LoCon without Tucker or DoRA (what merge and resize re-factor)."""
        return self.kind == "lora" and not self.is_tucker and not self.is_dora

    def in_out(self) -> tuple[int, int] | None:
        """(input width, output width) when the kind makes it cheap to tell."""
        variant = self.variant
        return variant.in_out(self.tensors) if variant is not None else None

    def delta(self, shape: tuple[int, ...]) -> torch.Tensor:
        """``scale * ΔW`` in fp32 with the target weight's ``shape`` (multiplier and DoRA not applied)."""
        variant = self.variant
        if variant is None:
            raise NetworkMismatchError(f"unsupported LoRA module with tensors {sorted(self.tensors)}")
        return variant.delta(self.tensors, shape)


@dataclass
class LoraFile:
    """A parsed LoRA file: module key (as the file names it) -> weights, plus the header metadata."""

    modules: dict[str, ModuleWeights]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    unknown_keys: list[str] = field(default_factory=list)
    embedding_keys: list[str] = field(default_factory=list)
    #: full RMSNorm scales the file sets rather than changes (``<key>.scale`` of a ``query_norm``/``key_norm``: BFL's
    #: control LoRAs carry every attention norm's; diffusers' ``.attn.norm_q.weight`` ... of a control LoRA its
    #: trainer wrote), by the file's key; applied as diffusers' ``load_lora_weights``
    #: applies them, replacing the model's for as long as the file is applied (:func:`match_modules` resolves them)
    norm_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the embeddings bundled in the file (``bundle_emb.*``, OneTrainer's pivotal tuning), read by sdcore's one
    #: parser; the LoRA loader applies none of them: ``sdcore generate`` offers them to the embedding handler
    bundled: list[BundledEmbedding] = field(default_factory=list)
    #: ``"xlabs"`` when the file's modules are XLabs x-flux keys (read under ComfyUI's names), else ``""``: what sdcore
    #: writes from it gets kohya's names (:func:`sdplugin_lora.bfl_names.for_writing`); ``"peft"`` when every module
    #: is in diffusers' PEFT layout (:data:`PEFT_LAYOUT`): ``lora resize``/``merge`` write it back in that layout
    layout: str = ""

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "<in memory>"

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Back to flat ``<key>.<tensor name>`` tensors in kohya/LyCORIS spelling (alpha made explicit)."""
        out: dict[str, torch.Tensor] = {}
        for key, weights in self.modules.items():
            for name, tensor in weights.tensors.items():
                out[f"{key}.{name}"] = tensor
            if weights.rank and "alpha" not in weights.tensors:
                out[f"{key}.alpha"] = torch.tensor(weights.alpha)
        return out


#: diffusers' PEFT layout (``save_lora_weights``, sdcore's ``--key-layout diffusers``): ``<component>.<module path>``
#: with these tensors, the alphas in the ``lora_adapter_metadata`` header (never an ``.alpha`` tensor)
PEFT_LAYOUT = "peft"
_PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_PEFT_TENSORS = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_A.default.weight",
    ".lora_B.default.weight",
    ".lora_B.bias",
    ".lora_magnitude_vector.default.weight",
    ".lora_magnitude_vector.weight",
    ".lora_magnitude_vector",
)


def parse_state_dict(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, path: Path | None = None
) -> LoraFile:
    """Group flat tensors into modules, whatever key style the trainer used."""
    modules: dict[str, ModuleWeights] = {}
    unknown: list[str] = []
    embeddings: list[str] = []
    norm_scales: dict[str, torch.Tensor] = {}
    peft = True  # every module tensor under a diffusers component with PEFT's suffixes
    for raw_key, tensor in state.items():
        key = xlabs_key(raw_key) or raw_key  # XLabs' x-flux names -> BFL's (ComfyUI's spelling)
        if is_bundle_key(key):
            embeddings.append(key)
            continue
        if key.endswith(".weight") and key[: -len(".weight")] + ".on_input" in state:  # LyCORIS (IA)^3's vector
            modules.setdefault(key[: -len(".weight")], ModuleWeights()).tensors["weight"] = tensor
            continue
        oft_part = _OFT_PART.match(key)
        if oft_part:  # kohya oft_flux: one block set per row part of a fused Linear (a ParameterList)
            module_key = oft_part.group(1)
            modules.setdefault(module_key, ModuleWeights(key=module_key)).tensors[oft_part.group(2)] = tensor
            continue
        for suffix, part in _SUFFIXES:
            if key.endswith(suffix):
                module_key = key[: -len(suffix)]
                modules.setdefault(module_key, ModuleWeights(key=module_key)).tensors[part] = tensor
                peft = peft and suffix in _PEFT_TENSORS and module_key.split(".", 1)[0] in _PEFT_COMPONENTS
                break
        else:
            if key.endswith(_DIFFUSERS_NORM_WEIGHTS) and tensor.dim() == 1:  # diffusers' trained norms, set in full
                norm_scales[key] = tensor
            else:
                unknown.append(key)
    unknown.extend(_peft_magnitudes(modules))
    # a lone ".alpha"/".scale" without weights is not a module; a lone RMSNorm ".scale" is a norm the file sets
    for key in [k for k, w in modules.items() if w.kind == "unknown"]:
        tensors = modules.pop(key).tensors
        if key.endswith(_NORM_MODULES) and set(tensors) == {"scale"} and tensors["scale"].dim() == 1:
            norm_scales[f"{key}.scale"] = tensors["scale"]
        else:
            unknown.extend(f"{key}.{part}" for part in tensors)
    _peft_alphas(modules, (metadata or {}).get("lora_adapter_metadata"))
    bundled = bundled_embeddings({key: state[key] for key in embeddings}, source=path)
    layout = "xlabs" if any(xlabs_key(key) is not None for key in state) else ""
    if not layout and peft and modules:
        layout = PEFT_LAYOUT
    return LoraFile(
        modules, dict(metadata or {}), path, sorted(unknown), sorted(embeddings), norm_scales, bundled, layout
    )


#: BFL's names of FLUX.1's attention RMSNorms (``<block>.img_attn.norm.query_norm``), whose ``scale`` a control LoRA
#: holds in full
_NORM_MODULES = (".query_norm", ".key_norm")
#: the same norms' weights by diffusers' names (``transformer_blocks.<i>.attn.norm_q.weight``), which diffusers'
#: ``train_control_lora_flux.py --train_norm_layers`` saves in full beside its LoRA (its ``NORM_LAYER_PREFIXES``) and
#: ``FluxControlPipeline.load_lora_weights`` sets on the model (``_load_norm_into_transformer``)
_DIFFUSERS_NORM_WEIGHTS = tuple(f".attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"))


def _peft_magnitudes(modules: dict[str, ModuleWeights]) -> list[str]:
    """PEFT's DoRA magnitude (``lora_magnitude_vector``: ``[out]`` for a Linear, ``[1, out, 1, 1]`` for a conv) as
    the ``dora_scale`` of LyCORIS' ``wd_on_out=True`` layout (``[out, 1]`` / ``[out, 1, 1, 1]``), the one
    :class:`~sdplugin_lora.adapters.Dora` reads per output row. Both mean ``W' = m · (W + s·ΔW) / ‖W + s·ΔW‖``
    with the norm over each output row (PEFT's ``DoraLinearLayer.get_weight_norm``: ``dim=1``; its conv layer:
    every axis but the output one), so the values carry over unchanged. A magnitude whose size is not the
    module's output width is returned as an unknown key (listed as unmatched wherever the file is applied)."""
    unknown = []
    for key, weights in modules.items():
        magnitude = weights.tensors.pop(_PEFT_MAGNITUDE, None)
        if magnitude is None:
            continue
        up = weights.tensors.get("lora_up.weight")
        if up is None or magnitude.numel() != up.shape[0]:
            unknown.append(f"{key}.{_PEFT_MAGNITUDE}")
            continue
        weights.tensors["dora_scale"] = magnitude.reshape(up.shape[0], *[1] * (up.dim() - 1))
    return unknown


def _peft_alphas(modules: dict[str, ModuleWeights], raw: str | None) -> None:
    """diffusers/PEFT files keep alpha in the ``lora_adapter_metadata`` header, not in tensors.

    The header is the PEFT config with component prefixes (``unet.lora_alpha``,
    ``text_encoder.alpha_pattern`` ...); a module without an ``.alpha`` tensor gets its pattern's
    alpha (the first that matches, :func:`peft_pattern_key`), else its component's ``lora_alpha``.
    """
    if not raw:
        return
    try:
        config = json.loads(raw)
    except ValueError:
        return
    if not isinstance(config, dict):
        return
    for key, weights in modules.items():
        if "alpha" in weights.tensors or "." not in key:
            continue
        component, _, path = key.partition(".")
        alpha = config.get(f"{component}.lora_alpha")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        pattern = peft_pattern_key(patterns if isinstance(patterns, dict) else {}, path)
        if pattern is not None:
            alpha = patterns[pattern]
        if alpha is None:
            continue
        alpha = float(alpha)
        if config.get(f"{component}.use_rslora") and weights.rank:
            alpha *= math.sqrt(weights.rank)  # PEFT's rsLoRA scales by alpha/sqrt(r): kohya's alpha/r with this alpha
        weights.tensors["alpha"] = torch.tensor(alpha)


def peft_pattern_key(patterns: Iterable[str], path: str) -> str | None:
    """The ``rank_pattern``/``alpha_pattern`` entry PEFT gives the module at ``path`` (its name in the component):
    the *first* pattern, in the header's order, whose regex ``(.*[.])?(<pattern>)$`` matches ``path``, as
    PEFT's ``get_pattern_key`` does (the pattern is a regular expression: ``.`` matches any character). ``None``
    when none matches; a pattern that is no valid regular expression matches nothing here (PEFT would raise)."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", path):
                return pattern
        except re.error:
            continue
    return None


def peft_header(modules: Mapping[str, tuple[int, float, bool]], dora: Iterable[str] = ()) -> str:
    """The ``lora_adapter_metadata`` header diffusers' ``load_lora_weights`` builds each component's PEFT
    ``LoraConfig`` from, for ``modules`` (``<component>.<module path>`` -> rank, alpha, has a ``lora_B`` bias):
    ``r``/``lora_alpha`` the most common, ``rank_pattern``/``alpha_pattern`` the modules that differ (full paths),
    ``target_modules`` every path, ``lora_bias`` when a module has a bias, ``use_dora`` for a component with a
    module in ``dora`` (its keys: PEFT's DoRA is per config, so every module of it needs its magnitude). Alphas are
    kohya's (scale alpha/r: no ``use_rslora``). Written fresh for every file sdcore writes in this layout, so no
    rank or alpha of another file (a resized or merged one's source) survives in it."""
    configs: dict[str, dict[str, Any]] = {}
    dora = set(dora)
    for key, (rank, alpha, bias) in modules.items():
        component, _, path = key.partition(".")
        config = configs.setdefault(component, {"ranks": {}, "alphas": {}, "bias": False, "dora": False})
        config["ranks"][path] = int(rank)
        config["alphas"][path] = _number(alpha)
        config["bias"] = config["bias"] or bias
        config["dora"] = config["dora"] or key in dora
    header: dict[str, Any] = {}
    for component, config in configs.items():
        ranks, alphas = config["ranks"], config["alphas"]
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        alpha = max(set(alphas.values()), key=list(alphas.values()).count)
        header[f"{component}.r"] = rank
        header[f"{component}.lora_alpha"] = alpha
        header[f"{component}.target_modules"] = sorted(ranks)
        header[f"{component}.rank_pattern"] = {p: r for p, r in ranks.items() if r != rank}
        header[f"{component}.alpha_pattern"] = {p: a for p, a in alphas.items() if a != alpha}
        if config["bias"]:  # diffusers builds the LoraConfig from this header alone when it is there
            header[f"{component}.lora_bias"] = True
        if config["dora"]:
            header[f"{component}.use_dora"] = True
    return json.dumps(header, sort_keys=True)


def peft_state_dict(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain LoRA modules in kohya's spelling (``<key>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``,
    ``.lora_up.bias``) under diffusers' dotted names, as ``lora resize``/``merge`` compute them from a PEFT-layout
    file (:data:`PEFT_LAYOUT`), back in that layout: ``lora_A``/``lora_B`` (``lora_B.bias``) and the header
    (:func:`peft_header`, ``format: pt`` as diffusers writes). diffusers refuses an ``.alpha`` tensor in a file of
    dotted names ("Invalid LoRA checkpoint"), so the alphas live in the header alone."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix in (".lora_down.weight", ".lora_up.weight", ".lora_up.bias", ".alpha", ".dora_scale"):
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix[1:]] = tensor
                break
        else:
            raise NetworkMismatchError(f"{key}: diffusers' PEFT layout holds LoRA and DoRA modules only")
    out: dict[str, torch.Tensor] = {}
    entries: dict[str, tuple[int, float, bool]] = {}
    for key, module in modules.items():
        down, up = module["lora_down.weight"], module["lora_up.weight"]
        rank = int(down.shape[0])
        out[f"{key}.lora_A.weight"] = down
        out[f"{key}.lora_B.weight"] = up
        if "lora_up.bias" in module:
            out[f"{key}.lora_B.bias"] = module["lora_up.bias"]
        if "dora_scale" in module:
            # with ".weight", as a raw PEFT state dict has it: diffusers (0.42) loads a text encoder's magnitude
            # only so (without it the module silently fuses as LoRA with W's own norm), a UNet's either way
            out[f"{key}.lora_magnitude_vector.weight"] = _peft_magnitude(key, module["dora_scale"], up)
        alpha = float(module["alpha"]) if "alpha" in module else float(rank)
        entries[key] = (rank, alpha, "lora_up.bias" in module)
    dora = {key for key, module in modules.items() if "dora_scale" in module}
    dora_components = {key.split(".", 1)[0] for key in dora}
    mixed = [key for key in modules if key not in dora and key.split(".", 1)[0] in dora_components]
    if mixed:
        raise NetworkMismatchError(
            f"{mixed[0]}: a plain LoRA module beside DoRA modules of the same component; diffusers' PEFT layout makes "
            "DoRA a setting of the whole component (use_dora), so it cannot hold both"
        )
    return out, {"lora_adapter_metadata": peft_header(entries, dora), "format": "pt"}


def _peft_magnitude(key: str, dora_scale: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A per-output-row ``dora_scale`` (``[out, 1, ...]``) as PEFT's ``lora_magnitude_vector`` shape: ``[out]``
    for a Linear, ``[1, out, 1, 1]`` for a conv (what ``get_peft_model_state_dict`` gives); a per-input-channel one
    (sdcore's and A1111's ``[1, in, ...]``) has no PEFT form and is refused in one line."""
    out = int(up.shape[0])
    if dora_scale.numel() != out or (dora_scale.dim() > 1 and dora_scale.shape[0] != out):
        raise NetworkMismatchError(
            f"{key}: its DoRA magnitude is per input channel (shape {list(dora_scale.shape)}); PEFT's DoRA keeps one "
            "per output row, so diffusers' layout cannot hold it"
        )
    return dora_scale.reshape(out) if up.dim() == 2 else dora_scale.reshape(1, out, *[1] * (up.dim() - 2))


def is_lora_key(key: str) -> bool:
    """Whether a tensor name is a LoRA/LyCORIS part (``.alpha``/``.scale`` alone do not count)."""
    if _OFT_PART.match(key) or xlabs_key(key) is not None:
        return True
    return any(key.endswith(suffix) for suffix, part in _SUFFIXES if part not in ("alpha", "scale"))


#: XLabs' x-flux trainer (``DoubleStreamBlockLoraProcessor``/``SingleStreamBlockLoraProcessor``): one ``LoRALinearLayer``
#: (``down``/``up`` Linears, no alpha saved: scale 1) per BFL Linear it adds to, keyed by the block's processor
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(double_blocks|single_blocks)\.(\d+)\.processor\.(qkv|proj)_lora([12]?)\.(down|up)\.weight$"
)
#: (blocks, lora, stream) -> the BFL module it adds to, as x-flux's processors apply them: ``qkv_lora1``/``proj_lora1``
#: on the image stream's ``img_attn.qkv``/``img_attn.proj``, ``..._lora2`` on the text stream's; in a single block
#: ``qkv_lora`` adds to the q/k/v rows of ``linear1`` only (not its MLP rows: ComfyUI's ``linear1_qkv``) and
#: ``proj_lora`` to ``linear2``, which diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` and ComfyUI's
#: ``convert_uso_lora`` map alike
_XLABS_MODULES = {
    ("double_blocks", "qkv", "1"): "img_attn.qkv",
    ("double_blocks", "proj", "1"): "img_attn.proj",
    ("double_blocks", "qkv", "2"): "txt_attn.qkv",
    ("double_blocks", "proj", "2"): "txt_attn.proj",
    ("single_blocks", "qkv", ""): "linear1_qkv",
    ("single_blocks", "proj", ""): "linear2",
}


def xlabs_key(key: str) -> str | None:
    """An XLabs FLUX.1 LoRA key (``double_blocks.0.processor.qkv_lora1.down.weight``) by BFL's dotted name, as
    ComfyUI converts it (``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight``); ``None`` for any other
    key. The files hold no alpha and x-flux applies ``up(down(x))`` unscaled, so the missing alpha (= rank) is
    exact; diffusers and ComfyUI agree on that."""
    found = _XLABS.match(key)
    if found is None:
        return None
    blocks, index, kind, stream, part = found.groups()
    module = _XLABS_MODULES.get((blocks, kind, stream))
    return None if module is None else f"diffusion_model.{blocks}.{index}.{module}.lora_{part}.weight"


#: layouts no loader maps onto a model sdcore has: (what the keys look like, the layout, why it cannot apply)
_UNMAPPABLE: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (
        re.compile(r"^lora_prior_(unet|te)_"),
        "a Stable Cascade LoRA (lora_prior_unet_/lora_prior_te_ keys: ComfyUI's names of Stable Cascade's prior)",
        "sdcore has no Stable Cascade model to apply it to",
    ),
    (
        re.compile(r"(^|\.)(double|single)_blocks\.\d+\.processor\.ip_adapter_"),
        "an XLabs IP-Adapter for FLUX.1 (processor.ip_adapter_* keys): image-prompt attention layers, not a LoRA",
        "neither diffusers' load_lora_weights nor ComfyUI's LoRA loader applies it",
    ),
    (
        re.compile(r"(^|\.)(double|single)_blocks\.\d+\.processor\."),
        "an XLabs (x-flux) FLUX.1 file with processor keys other than qkv_lora1/2, proj_lora1/2 (double blocks) and "
        "qkv_lora, proj_lora (single blocks)",
        "diffusers and ComfyUI map only those to FLUX.1's Linears",
    ),
)


@dataclass(frozen=True)
class Unmappable:
    """A file of a layout no loader maps onto a model sdcore has: the layout's name, why it cannot be applied, and
    the first key that tells."""

    layout: str
    why: str
    key: str

    def __str__(self) -> str:
        return f"{self.layout}; {self.why} (key {self.key})"


def unmappable(keys: Iterable[str]) -> Unmappable | None:
    """The layout of a file whose keys no loader maps onto a model sdcore has (:class:`Unmappable`), ``None`` when
    every key is of a known layout or merely unknown (those are listed as unmatched when applied)."""
    for key in keys:
        if xlabs_key(key) is not None:
            continue
        for pattern, layout, why in _UNMAPPABLE:
            if pattern.search(key):
                return Unmappable(layout, why, key)
    return None


def unmappable_layout(keys: Iterable[str]) -> str | None:
    """:func:`unmappable` as the one line ``read_lora`` refuses the file with (``None`` when it is mappable)."""
    found = unmappable(keys)
    return None if found is None else str(found)


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a ``.safetensors`` (preferred) or pickle-based ``.pt/.ckpt/.bin`` file,
    read safely, whatever their keys (``ModelFormatError`` for a missing or unreadable file)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path}: LoRA file not found")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from sdcore.models.source import check_safetensors

        check_safetensors(path)  # the same message as every other command for a bad file
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelFormatError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        from sdcore.models.safe_pickle import load_pickle

        loaded = load_pickle(path, mmap=False)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise ModelFormatError(f"{path}: expected a dict of tensors, found {type(loaded).__name__}")
        state = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        metadata = {}
    return state, metadata


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA file (:func:`read_state`); a layout no loader maps (:func:`unmappable`) or a file without LoRA
    modules is a one-line ``ModelFormatError``."""
    path = Path(path)
    state, metadata = read_state(path)
    layout = unmappable_layout(state)
    if layout is not None:
        raise ModelFormatError(f"{path}: {layout}")
    lora = parse_state_dict(state, metadata, path)
    if not lora.modules:
        raise no_modules_error(path, state)
    return lora


def no_modules_error(path: str | Path, state: Mapping[str, Any]) -> ModelFormatError:
    """The one-line error for a file without LoRA modules: what it is when it is a model checkpoint or a model part
    (they sit beside LoRAs in the models folders, and a key list helps nobody), else its first keys."""
    from sdcore.errors import SdcoreError
    from sdcore.models.detect import detect_family
    from sdcore.models.parts import PART_LABELS, parts_in

    keys = list(state)
    try:
        family = detect_family(keys, path)
    except SdcoreError:
        family = None
    if family is not None:
        return ModelFormatError(
            f"{path}: no LoRA modules: it is a {family} model checkpoint (`sdcore model info` describes it)"
        )
    found = parts_in(keys)
    if found:
        labels = " / ".join(dict.fromkeys(PART_LABELS[name] for name in found))
        return ModelFormatError(f"{path}: no LoRA modules: it holds a {labels} alone (a model part)")
    return ModelFormatError(f"{path}: no LoRA modules found (first keys: {', '.join(keys[:5])})")


# --- family detection ---------------------------------------------------------------------------

_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}


#: kohya's ``ss_base_model_version`` of SD3 files is the MMDiT's model type (sd3_utils)
_SD3_VERSIONS = ("medium", "5-large", "5-medium", "large")


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """kohya ``ss_base_model_version``/``ss_v2`` or ModelSpec ``modelspec.architecture``; a family kohya does not
    know (a plugin's) by its own name there, as :func:`network_metadata` writes it (``auraflow``, ``auraflow/lora``)."""
    version = metadata.get("ss_base_model_version", "")
    for declared in (version, metadata.get("modelspec.architecture", "").removesuffix("/lora")):
        if declared and declared not in BASE_MODEL_VERSION and family_label(declared) is not None:
            return declared
    if version and version not in BASE_MODEL_VERSION and metadata.get("modelspec.architecture") == f"{version}/lora":
        return version  # the same name twice is how sdcore writes a plugin's family, installed here or not
    if version.startswith("chroma"):
        return "chroma"
    if version.startswith("flux"):
        return "flux"
    if version.startswith("sd3") or version in _SD3_VERSIONS:
        return "sd3"
    if version.startswith("sdxl"):
        return "sdxl-refiner" if "refiner" in version else "sdxl"
    if version.startswith("sd_v2"):
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    architecture = metadata.get("modelspec.architecture", "")
    if architecture.startswith("chroma"):
        return "chroma"
    if architecture.startswith("flux-1"):
        return "flux"
    if architecture.startswith("stable-diffusion-3"):
        return "sd3"
    if architecture.startswith("stable-diffusion-xl"):
        return "sdxl-refiner" if "refiner" in architecture else "sdxl"
    if architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return None


def detect_family(lora: LoraFile) -> tuple[str | None, str]:
    """The family a LoRA was made for and why we think so (``None`` when nothing tells)."""
    family = family_from_metadata(lora.metadata)
    if family:
        return family, "its metadata"
    keys = list(lora.modules)
    dit = _dit_family(keys)
    if dit is not None:
        return dit
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "its two text encoders (te1/te2 keys)"
    for key, weights in lora.modules.items():
        widths = weights.in_out()
        if widths is None:
            continue
        if key.replace(".", "_").endswith(("attn2_to_k", "attn2_to_v")) and widths[0] in _CROSS_WIDTH:
            return _CROSS_WIDTH[widths[0]], f"its cross-attention width {widths[0]}"
        if key.startswith("lora_te_") and key.endswith("q_proj") and widths[0] in _TE_WIDTH:
            return _TE_WIDTH[widths[0]], f"its text-encoder width {widths[0]}"
    return None, "nothing in the file"


_FLUX_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks")


def _dit_family(keys: list[str]) -> tuple[str, str] | None:
    """SD3/Flux from module names: kohya's SAI/BFL block names, diffusers' Flux-only single blocks,
    SD3.5's ``attn2``, or a T5 encoder (``lora_te3``; with a CLIP-G ``lora_te2`` it is SD3)."""
    flat = [k.replace(".", "_") for k in keys]
    if any(k.startswith("lora_unet_joint_blocks_") or "joint_blocks_" in k for k in flat):
        return "sd3", "its SAI joint_blocks names"
    if any(marker in k for k in flat for marker in _FLUX_MARKERS):
        return "flux", "its BFL/diffusers single and double block names"
    if any(k.startswith(("transformer.transformer_blocks.", "lora_transformer_transformer_blocks_")) for k in keys):
        if any("attn2" in k for k in flat):
            return "sd3", "its MMDiT-X attn2 layers"
        return None
    if any(k.startswith("lora_te3_") for k in keys):
        if any(k.startswith("lora_te2_") for k in keys):
            return "sd3", "its CLIP-G and T5 encoder names (lora_te2, lora_te3)"
        return "flux", "its T5 encoder without CLIP-G (lora_te3 only)"
    return None


def _declared_family(name: str | None) -> Any:
    """The family's declaration in sdcore's family registry (``sdcore.models.family.ModelFamily``: its label,
    native resolution, text encoders), ``None`` when the registry does not know it."""
    if not name:
        return None
    try:
        from sdcore.models.family import get_family  # type: ignore[import-not-found,unused-ignore]

        return get_family(name)
    except Exception:  # registry absent or family unknown there
        return None


def family_label(name: str | None) -> str | None:
    """The family's human name from sdcore's family registry (``FLUX.1``...), when it has one."""
    declared = _declared_family(name)
    return str(declared.label) if declared is not None else None  # else the name says it


def _named(name: str) -> str:
    label = family_label(name)
    return f"{name} ({label})" if label and label != name else name


def _same_family(made_for: str, loaded: str) -> bool:
    return made_for == loaded


# --- matching against a model --------------------------------------------------------------------


@dataclass
class Match:
    """Modules of a LoRA file resolved against a model."""

    modules: dict[str, tuple[Target, ModuleWeights]]
    unmatched: list[str]
    #: the file's norm scales (:attr:`LoraFile.norm_scales`) by the norm they replace: (that norm, the scale)
    scales: dict[str, tuple[Target, torch.Tensor]] = field(default_factory=dict)

    def summary(self) -> str:
        shown = ", ".join(self.unmatched[:12]) + (
            f" (+{len(self.unmatched) - 12} more)" if len(self.unmatched) > 12 else ""
        )
        return f"{len(self.unmatched)} keys matched no module of the model: {shown}"


def _strip_component(key: str) -> tuple[str, str]:
    for component in ("text_encoder_3", "text_encoder_2", "text_encoder", "transformer", "unet"):
        if key.startswith(component + "."):
            return component, key[len(component) + 1 :]
    for prefix in ("base_model.model.", "diffusion_model."):
        if key.startswith(prefix):
            return "unet", key[len(prefix) :]
    return "unet", key


def _normalise_dotted(path: str) -> str:
    """Old diffusers attention-processor keys (``attn1.processor.to_out_lora``) -> module paths."""
    path = path.replace(".processor.", ".")
    for old, new in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v"), ("to_out_lora", "to_out.0")):
        if path.endswith(old):
            path = path[: -len(old)] + new
    return path


#: ComfyUI's text encoders (``text_encoders.<name>.transformer.<path>``, its generic key form) -> the kohya prefixes
#: that name the same encoder in sdcore's index: CLIP-L is ``lora_te`` alone (SD1) or ``lora_te1``, SD2's OpenCLIP-H
#: ``lora_te``, CLIP-G ``lora_te2``, T5-XXL ``lora_te3`` (ComfyUI's own mapping of OneTrainer's names)
_COMFY_ENCODERS = {"clip_l": ("lora_te1", "lora_te"), "clip_h": ("lora_te",), "clip_g": ("lora_te2",),
                   "t5xxl": ("lora_te3",)}  # fmt: skip


def resolve_key(index: ModuleIndex, key: str) -> Target | None:
    if key.startswith("text_encoders."):
        encoder, _, path = key[len("text_encoders.") :].partition(".")
        path = path.removeprefix("transformer.")
        for prefix in _COMFY_ENCODERS.get(encoder, ()):
            found = index.resolve(flatten(prefix, path))
            if found is not None:
                return found
        return None
    if key.startswith(("lora_unet_", "lora_te", "lora_transformer_")):
        return index.resolve(key)
    if key.startswith("oft_unet_"):  # kohya networks.oft
        return index.resolve("lora_unet_" + key[len("oft_unet_") :])
    if key.startswith("lycoris_"):
        return index.resolve("lora_unet_" + key[len("lycoris_") :])
    component, path = _strip_component(key)
    found = index.resolve_path(component, _normalise_dotted(path))
    if found is None and component in ("unet", "transformer"):
        # dotted SAI/BFL paths, and ComfyUI's generic ``diffusion_model.<ldm path>`` of an SD1/SD2/SDXL UNet
        # (``input_blocks.4.1...``): flattened, they are kohya's SGM names, aliases of every UNet module
        found = index.resolve("lora_unet_" + path.replace(".", "_"))
    return found


def _kohya_stack(index: ModuleIndex, key: str) -> KohyaModule | None:
    """SD3/Flux: the fused/reordered kohya module a file key names (kohya or dotted SAI/BFL form)."""
    if not index.kohya:
        return None
    if key.startswith("lora_unet_"):
        return index.resolve_kohya(key)
    if key.startswith("oft_unet_"):  # kohya networks.oft_flux names the same BFL modules
        return index.resolve_kohya("lora_unet_" + key[len("oft_unet_") :])
    component, path = _strip_component(key)
    if component in ("unet", "transformer"):
        return index.resolve_kohya("lora_unet_" + path.replace(".", "_"))
    return None


def check_family(lora: LoraFile, family: str) -> None:
    """Refuse a LoRA made for another family with one line naming both."""
    made_for, why = detect_family(lora)
    if made_for == "flux" and family == "chroma" and why != "its metadata":
        return  # BFL block names alone do not tell FLUX.1 from Chroma: the shapes decide
    if why != "its metadata" and family not in BASE_MODEL_VERSION:
        return  # names only tell sdcore's own families apart; on a plugin's family the modules' match decides
    if family not in BASE_MODEL_VERSION and made_for not in BASE_MODEL_VERSION and family_label(made_for) is None:
        return  # a name no installed family has (kohya's hunyuan-image-2.1...) may be this plugin's model: the match
    if made_for is not None and not _same_family(made_for, family):
        raise NetworkMismatchError(
            f"{lora.label}: this LoRA was made for {_named(made_for)} (from {why}); "
            f"the loaded model is {_named(family)}"
        )


#: the module names (after a component prefix) of FLUX.1's patch embedding: BFL's ``img_in``, diffusers' ``x_embedder``
_PATCH_EMBEDDING = ("img_in", "x_embedder", "lora_unet_img_in", "lora_transformer_x_embedder")
#: FLUX.1's packed latent width (16 channels x 2x2): what a plain dev/schnell ``img_in`` takes
_FLUX_LATENT_WIDTH = 64


def patch_input_width(lora: LoraFile) -> int | None:
    """The input width of the file's FLUX.1 patch-embedding module (``img_in``/``x_embedder``), ``None`` without
    one."""
    for key, weights in lora.modules.items():
        name = _strip_component(key)[1]
        if name.startswith("diffusion_model."):
            name = name[len("diffusion_model.") :]
        widths = weights.in_out() if name in _PATCH_EMBEDDING else None
        if widths is not None:
            return widths[0]
    return None


def widened_input(lora: LoraFile) -> int | None:
    """The input width a FLUX.1 LoRA's patch-embedding module takes when it is not the 64 of dev's ``img_in``: BFL's
    control LoRAs (``flux1-depth-dev-lora``, ``flux1-canny-dev-lora``) take 128, the noisy latents and a control
    image's latents, and come with full RMSNorm scales (``...norm.query_norm.scale``)."""
    width = patch_input_width(lora)
    return width if width is not None and width != _FLUX_LATENT_WIDTH else None


def file_input_width(path: str | Path) -> int | None:
    """:func:`widened_input` of a ``.safetensors`` file from its header alone (the shapes of its patch-embedding
    ``lora_A``/``lora_down``), without reading a tensor; ``None`` for other files or when it cannot tell."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return None
    from sdcore.errors import ModelFormatError
    from sdcore.models.source import read_safetensors_header

    try:
        header, _ = read_safetensors_header(path)
    except (OSError, ModelFormatError):
        return None
    for key, entry in header.items():
        module, _, part = key.rpartition(".lora_")
        name = _strip_component(module)[1].removeprefix("diffusion_model.")
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if name in _PATCH_EMBEDDING and part in ("A.weight", "down.weight") and shape and len(shape) == 2:
            width = int(shape[1])
            return width if width != _FLUX_LATENT_WIDTH else None
    return None


#: the ``img_in`` width of BFL's control LoRAs: the noisy latents and the control image's latents, 64 + 64
CONTROL_WIDTH = 128
#: what sdcore calls a file whose ``img_in`` takes :data:`CONTROL_WIDTH` inputs
CONTROL_LORA = "a FLUX.1 Depth/Canny control LoRA (BFL's flux1-depth-dev-lora / flux1-canny-dev-lora)"
#: the ``sdcore_control_lora`` header value of a control LoRA sdcore trained (``sdcore train lora --control-lora``)
CONTROL_LORA_TRAINED = (
    "FLUX.1 dev control LoRA in BFL's layout: img_in takes 128 inputs (the noisy latents and a control image's "
    "latents); apply with a control image (sdcore generate --control-image, FluxControlPipeline)"
)


def control_lora_problem(lora: LoraFile, model_width: int = _FLUX_LATENT_WIDTH) -> str | None:
    """One line for a LoRA whose FLUX.1 ``img_in`` takes another input width than the model's (``model_width``),
    None otherwise.

    BFL's Depth/Canny control LoRAs take 128 where dev takes 64: generation applies them by widening dev's
    ``img_in`` first (``apply_loras(widen=True)``, as diffusers' ``load_lora_weights`` does), and runs the call on
    ``FluxControlPipeline`` with the control image. Everything else that applies a LoRA to a model (training's
    ``--network-weights`` and ``--base-weights``, ``sdcore lora merge``) changes no module's shape, so it refuses
    them with this line instead of applying part of one."""
    width = patch_input_width(lora)
    if width is None or width == model_width:
        return None
    if width == CONTROL_WIDTH and model_width == _FLUX_LATENT_WIDTH:
        return (
            f"{lora.label}: {CONTROL_LORA}: it widens img_in from {model_width} to {width} inputs, which sdcore does "
            "only when generating (<lora:name:weight> in the prompt with --control-image), not in training or merges"
        )
    return (
        f"{lora.label}: a LoRA for a FLUX.1 transformer whose img_in takes {width} inputs; the loaded model's takes "
        f"{model_width}"
    )


def _model_input_width(index: ModuleIndex) -> int:
    target = index.resolve_path(index.denoiser, "x_embedder")
    return int(target.module.weight.shape[1]) if target is not None else _FLUX_LATENT_WIDTH


def match_modules(lora: LoraFile, index: ModuleIndex, *, check: bool = True) -> Match:
    """Resolve every module of ``lora`` on the model; shape mismatches and wrong families raise."""
    if check:
        check_family(lora, index.family)
    if index.family == "flux" and (problem := control_lora_problem(lora, _model_input_width(index))) is not None:
        raise NetworkMismatchError(problem)
    matched: dict[str, tuple[Target, ModuleWeights]] = {}
    sources: dict[str, list[str]] = {}  # target name -> the file's keys that adapt it
    unmatched: list[str] = []

    def add(target: Target, key: str, weights: ModuleWeights) -> None:
        """Two keys of one file on one layer (ComfyUI's ``linear1_qkv`` beside ``linear1``: an offset patch and a
        whole one, both applied by ComfyUI) add up, as they do there."""
        keys = sources.setdefault(target.name, [])
        keys.append(key)
        known = matched.get(target.name)
        if known is not None:
            where = f"{lora.label}: {' and '.join(keys)}"
            weights = _add_modules(known[1], weights, tuple(target.module.weight.shape), where)
        matched[target.name] = (target, weights)

    for key, weights in lora.modules.items():
        stack = _kohya_stack(index, key)
        if stack is not None:  # one kohya module over several diffusers modules: split exactly
            from .dit import split_module

            for part, part_weights in zip(stack.parts, split_module(key, weights, stack, lora.label), strict=True):
                part_target = index.resolve_path(index.denoiser, part.path)
                if part_target is not None:
                    add(part_target, key, part_weights)
            continue
        target = resolve_key(index, key)
        if target is None:
            unmatched.append(key)
            continue
        weights = _one_oft_part(weights)
        shape = tuple(target.module.weight.shape)
        widths = weights.in_out()
        if widths is not None:
            flat = len(shape) == 4 and weights.kind == "lora" and weights.down.dim() == 2  # a kxk LoRA down, flattened
            fan_in = shape[1] * (shape[2] * shape[3] if flat else 1)
            if widths != (fan_in, shape[0]):
                made_for, _ = detect_family(lora)
                hint = f"; it looks made for {made_for}" if made_for else ""
                raise NetworkMismatchError(
                    f"{lora.label}: {key} has in/out {widths} but {target.path} is {tuple(shape[:2][::-1])}: "
                    f"this LoRA does not fit the loaded {index.family} model{hint}"
                )
        add(target, key, weights)
    scales = _match_scales(lora, index, unmatched)
    unmatched.extend(lora.unknown_keys)
    # bundled embeddings (lora.bundled) are no modules: ``sdcore generate`` hands them to the embedding handler
    if not matched:
        made_for, why = detect_family(lora)
        hint = f" (it looks made for {made_for}, from {why})" if made_for else ""
        raise NetworkMismatchError(
            f"{lora.label}: none of its {len(lora.modules)} modules match the loaded {index.family} model{hint}; "
            f"first keys: {', '.join(list(lora.modules)[:5])}"
        )
    return Match(matched, unmatched, scales)


def stack_ranks(first: ModuleWeights, second: ModuleWeights) -> ModuleWeights:
    """One plain LoRA whose change is ``first``'s plus ``second``'s, exactly: ranks stacked (``down = [d1; d2]``,
    ``up = [u1, u2]``). kohya, ComfyUI and diffusers all scale a module by its alpha over its ``lora_down`` rows, so
    the stacked module keeps both factors as they are with alpha = ``R · s`` when both have the scale ``s``, and
    otherwise folds each scale into its ``up`` block with alpha = ``R`` (scale 1). ``lora_up.bias`` (BFL's/PEFT's)
    is summed at the new scale. Both must be plain Linear LoRAs of one shape (``NetworkMismatchError`` otherwise)."""
    import torch

    if not (first.plain_lora and second.plain_lora and first.down.dim() == 2 and second.down.dim() == 2):
        raise NetworkMismatchError("only plain Linear LoRA modules can be stacked")
    ups = (first.up.float(), second.up.float())
    downs = (first.down.float(), second.down.float())
    if ups[0].shape[0] != ups[1].shape[0] or downs[0].shape[1] != downs[1].shape[1]:
        shapes = [(int(u.shape[0]), int(d.shape[1])) for u, d in zip(ups, downs, strict=True)]
        raise NetworkMismatchError(f"LoRA modules of different (out, in) shapes {shapes} cannot be stacked")
    scales = (first.scale, second.scale)
    same = abs(scales[0] - scales[1]) <= 1e-12 * max(1.0, abs(scales[0]))
    scale = scales[0] if same else 1.0
    fold = (1.0, 1.0) if same else scales
    total = int(downs[0].shape[0] + downs[1].shape[0])
    tensors = {
        "lora_down.weight": torch.cat(downs),
        "lora_up.weight": torch.cat([ups[0] * fold[0], ups[1] * fold[1]], dim=1),
        "alpha": torch.tensor(total * scale),
    }
    biases = [w.tensors["lora_up.bias"].float() * s for w, s in zip((first, second), scales, strict=True)
              if "lora_up.bias" in w.tensors]  # fmt: skip
    if biases:
        tensors["lora_up.bias"] = sum(biases[1:], biases[0]) / scale
    return ModuleWeights(tensors)


def _add_modules(known: ModuleWeights, new: ModuleWeights, shape: tuple[int, ...], where: str) -> ModuleWeights:
    """One module for two a file holds on the same layer: plain LoRAs stacked (:func:`stack_ranks`), any other
    additive pair as their summed difference (LyCORIS ``full``); DoRA and OFT change the weight they get, which two
    modules of one file cannot share (``NetworkMismatchError``)."""
    if known.plain_lora and new.plain_lora and known.down.dim() == new.down.dim() == 2:
        return stack_ranks(known, new)
    for weights in (known, new):
        variant = weights.variant
        if weights.is_dora or variant is None or variant.multiplicative or "lora_up.bias" in weights.tensors:
            kind = "DoRA" if weights.is_dora else weights.kind
            raise NetworkMismatchError(
                f"{where} adapt the same layer and one is {kind}, which sdcore cannot add to another module"
            )
    diff_b = [w.tensors[k].float() for w in (known, new) for k in ("diff_b", "b_norm") if k in w.tensors]
    tensors = {"diff": known.delta(shape) + new.delta(shape)}
    if diff_b:
        tensors["diff_b"] = sum(diff_b[1:], diff_b[0])
    return ModuleWeights(tensors)


def _match_scales(lora: LoraFile, index: ModuleIndex, unmatched: list[str]) -> dict[str, tuple[Target, torch.Tensor]]:
    """The file's norm scales (BFL's names or diffusers') on the model's norms (:attr:`ModuleIndex.scales`); a key
    naming no norm goes to ``unmatched``, a scale of another width is a mismatch."""
    scales: dict[str, tuple[Target, torch.Tensor]] = {}
    by_path = {f"{target.path}.weight": target for target in index.scales.values()}  # diffusers' names
    for key, tensor in lora.norm_scales.items():
        name = _strip_component(key)[1].removeprefix("diffusion_model.")
        target = index.scales.get(name) or by_path.get(name)
        if target is None:
            unmatched.append(key)
            continue
        shape = tuple(target.module.weight.shape)
        if tuple(tensor.shape) != shape:
            raise NetworkMismatchError(
                f"{lora.label}: {key} has shape {tuple(tensor.shape)} but {target.path} is {shape}: this LoRA does "
                f"not fit the loaded {index.family} model"
            )
        scales[target.name] = (target, tensor)
    return scales


def _one_oft_part(weights: ModuleWeights) -> ModuleWeights:
    """kohya oft_flux's unfused Linears keep their one block set as ``oft_blocks.0``: the module as
    ``networks.oft`` stores it (``oft_blocks``), which the adapters and a warm start read."""
    if "oft_blocks.0" not in weights.tensors or weights.kind != "oft":
        return weights
    from .adapters import OftVariant

    parts = OftVariant.parts(weights.tensors)
    if len(parts) != 1:
        return weights  # several parts on a plain layer: the adapter names the problem
    rest = {k: v for k, v in weights.tensors.items() if k != "oft_blocks.0"}
    return ModuleWeights({"oft_blocks": parts[0], **rest}, key=weights.key)


# --- hashes and metadata ------------------------------------------------------------------------


def file_sshs_hash(path: str | Path) -> str:
    """``sshs_model_hash`` of an existing file (from its header, else recomputed from its data)."""
    from sdcore.models.hashes import autov3_hash, sha256_file

    lora = read_lora(path)
    value = lora.metadata.get("sshs_model_hash")
    if value:
        return value
    return autov3_hash(path) if Path(path).suffix.lower() == ".safetensors" else sha256_file(path)


BASE_MODEL_VERSION = {
    "sd1": "sd_v1",
    "sd2": "sd_v2",
    "sdxl": "sdxl_base_v1-0",
    "sdxl-refiner": "sdxl_refiner_v1-0",
    "flux": "flux1",  # kohya flux_utils.MODEL_VERSION_FLUX_V1
    "chroma": "chroma",  # kohya flux_utils.MODEL_VERSION_CHROMA
    "sd3": "medium",  # kohya writes the MMDiT model type: medium, 5-large or 5-medium (see ``variant``)
}
ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sd2-v": "stable-diffusion-v2-768-v/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner/lora",
}
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
FLUX_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # kohya sai_model_spec IMPL_CHROMA
#: the families kohya's flux_train_network.py trains (one modelspec shape: no prediction type)
_FLUX_SCRIPT = ("flux", "chroma")


def _dit_architecture(family: str, variant: str | None) -> str:
    """kohya's sai_model_spec ids: ``flux-1-dev``/``flux-1-schnell``, ``stable-diffusion-3-<model type>``."""
    if family == "chroma":
        return "chroma"
    if family == "flux":
        return {"dev": "flux-1-dev", "schnell": "flux-1-schnell", "chroma": "chroma"}.get(variant or "", "flux-1")
    return f"stable-diffusion-3-{variant or 'medium'}"


#: kept by ``minimal`` metadata (kohya's ``--no_metadata`` set)
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def network_metadata(
    *,
    family: str,
    prediction_type: str = "epsilon",
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    network_module: str = "networks.lora",
    network_args: Mapping[str, Any] | None = None,
    title: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    clip_skip: int | None = None,
    extra: Mapping[str, Any] | None = None,
    variant: str | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` network/model keys plus the ModelSpec set, all as strings.

    ``variant`` names the SD3/Flux model as kohya does (:func:`sdplugin_lora.dit.variant_of_transformer`):
    Flux ``dev``/``schnell``, SD3 ``medium``/``5-large``/``5-medium``.

    ``extra`` (training keys such as ``ss_learning_rate``, ``ss_tag_frequency``) is merged last;
    dicts/lists are JSON-encoded and ``None`` becomes ``"None"`` as kohya writes it.
    """
    v_pred = prediction_type == "v_prediction"
    base_version = BASE_MODEL_VERSION.get(family, family)
    if family == "sd3" and variant:
        base_version = variant
    if v_pred and family in ("sd1", "sd2"):
        base_version += "_v"
    args = dict(network_args or {})
    if conv_rank:
        args.setdefault("conv_dim", str(conv_rank))
        args.setdefault("conv_alpha", str(_number(conv_alpha if conv_alpha is not None else 1)))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if resolution is None:
        dit = family in ("sd3", *_FLUX_SCRIPT)
        side = 1024 if family.startswith("sdxl") or dit else (768 if v_pred and family == "sd2" else 512)
        if family not in BASE_MODEL_VERSION and (declared := _declared_family(family)) is not None:
            side = int(declared.native_resolution)  # a plugin's family (lora extract/merge: no run resolution)
        resolution = (side, side)
    meta: dict[str, Any] = {
        "ss_network_module": network_module,
        "ss_network_dim": rank,
        "ss_network_alpha": _number(alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in args.items()}) if args else None,
        "ss_base_model_version": base_version,
        "ss_v2": family == "sd2",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": ARCHITECTURE["sd2-v" if (family == "sd2" and v_pred) else family]
        if family in ARCHITECTURE
        else (f"{_dit_architecture(family, variant)}/lora" if family in ("sd3", *_FLUX_SCRIPT) else f"{family}/lora"),
        "modelspec.implementation": SGM_IMPLEMENTATION
        if family.startswith("sdxl")
        else {"flux": FLUX_IMPLEMENTATION, "chroma": CHROMA_IMPLEMENTATION}.get(family, "diffusers"),
        "modelspec.title": title or f"LoRA@{time.strftime('%Y-%m-%d %H:%M:%S')}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.implementation_version": "sdcore/sdplugin-lora",
    }
    if family in _FLUX_SCRIPT:  # kohya writes no prediction type for Flux or Chroma (sai_model_spec)
        del meta["modelspec.prediction_type"]
    elif family not in BASE_MODEL_VERSION and prediction_type not in ("epsilon", "v_prediction"):
        del meta["modelspec.prediction_type"]  # a plugin's flow family: neither epsilon nor v
    if clip_skip is not None and _has_clip_encoder(family):
        meta["modelspec.encoder_layer"] = clip_skip
    if extra:
        meta.update(extra)
    return stringify(meta)


def _has_clip_encoder(family: str) -> bool:
    """Whether a CLIP skip (``modelspec.encoder_layer``) means anything for ``family``: it has a CLIP encoder
    (not Chroma's T5 alone, not a plugin family's UMT5); a family the registry does not know keeps it."""
    declared = _declared_family(family)
    return declared is None or any("clip" in spec.kind for spec in declared.text_encoders)


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def stringify(meta: Mapping[str, Any]) -> dict[str, str]:
    """kohya's rule: every value a string; JSON for dicts/lists, ``str()`` otherwise."""
    out: dict[str, str] = {}
    for key, value in meta.items():
        if isinstance(value, (dict, list, tuple)):
            out[key] = json.dumps(value)
        else:
            out[key] = str(value)
    return out


SAVE_DTYPES = ("fp16", "bf16", "fp32", "float")


def save_lora(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: str = "fp16",
    minimal: bool = False,
) -> Path:
    """Write a kohya LoRA ``.safetensors`` atomically, adding the ``sshs_*`` hashes.

    ``minimal`` keeps only kohya's ``--no_metadata`` set (network/model keys, ModelSpec, hashes)
    for users who do not want dataset folder names or tags in the file.
    """
    from safetensors.torch import save_file
    from sdcore.dtypes import resolve_dtype
    from sdcore.io import atomic_path

    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save dtype {dtype!r}: choose fp16, bf16 or fp32")
    target = resolve_dtype(dtype)
    out = {k: v.detach().to("cpu", target).contiguous() for k, v in tensors.items()}
    meta = dict(metadata or {})
    if minimal:
        keep = (*MINIMUM_KEYS, "lora_adapter_metadata", "format")  # diffusers needs its header for the alphas
        meta = {k: v for k, v in meta.items() if k in keep or k.startswith("modelspec.")}
    model_hash, legacy_hash = sshs_hashes(out, meta)
    meta["sshs_model_hash"] = model_hash
    meta["sshs_legacy_hash"] = legacy_hash
    if "modelspec.hash_sha256" in meta:  # a source file's (resize, merge, convert): the sha256 of these tensors now
        meta["modelspec.hash_sha256"] = "0x" + model_hash
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path


#: save dtypes by torch dtype name (:func:`source_save_dtype`)
_DTYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def source_save_dtype(lora: LoraFile) -> str:
    """The save dtype that keeps ``lora``'s weights as stored (``lora convert``'s default): the dtype of its module
    tensors and norm scales (0-d alphas left out: several writers keep them float32 beside fp16 weights), mixed ones
    as the widest (``fp32`` also for fp16 beside bf16, which neither holds exactly; float64 as ``fp32``)."""
    found = {
        _DTYPE_NAMES.get(str(tensor.dtype).removeprefix("torch."), "fp32")
        for tensors in (*(w.tensors for w in lora.modules.values()), lora.norm_scales)
        for tensor in tensors.values()
        if tensor.dim() > 0 and tensor.is_floating_point()
    }
    return found.pop() if len(found) == 1 else "fp32"


def tag_frequency(captions_by_dir: Mapping[str, list[str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder basename, lower-cased comma-separated tag counts."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_dir.items():
        counts: dict[str, int] = {}
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
        out[Path(folder).name] = counts
    return out


def header_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file without reading its tensors (the header alone: a multi-GB file
    costs one small read). A missing, truncated or non-safetensors file raises sdcore's one-line
    :class:`~sdcore.errors.ModelFormatError` (``FileNotFoundError`` for a missing path, as ``open``)."""
    from sdcore.models.source import read_safetensors_header

    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__", {}))


__all__ = [
    "CONTROL_LORA_TRAINED",
    "PEFT_LAYOUT",
    "LoraFile",
    "Match",
    "ModuleWeights",
    "Unmappable",
    "check_family",
    "control_lora_problem",
    "detect_family",
    "family_from_metadata",
    "family_label",
    "file_input_width",
    "file_sshs_hash",
    "header_metadata",
    "match_modules",
    "network_metadata",
    "parse_state_dict",
    "peft_header",
    "peft_state_dict",
    "read_lora",
    "read_state",
    "resolve_key",
    "save_lora",
    "source_save_dtype",
    "sshs_hashes",
    "stack_ranks",
    "stringify",
    "tag_frequency",
    "unmappable",
    "unmappable_layout",
    "xlabs_key",
]
